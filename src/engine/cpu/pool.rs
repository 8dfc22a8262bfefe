//! Activation buffers kept for the next op, tile and model instead of freed.
//!
//! A fresh buffer the size of an activation (100 MiB for 8 channels of a 192x128x128 tile) is
//! a new mapping from the allocator: every page faults on its first write and is unmapped again
//! when the buffer is dropped. On a full tomogram that was a sixth of the CPU time, in the
//! kernel. The same sizes come back at every tile and for every model of one tile shape, so
//! released buffers are kept and handed out again for a request of exactly their size.

use std::sync::Mutex;

/// Buffers smaller than this (floats) are left to the allocator, which keeps them itself.
const MIN_KEPT: usize = 1 << 18;
/// Idle buffers kept, in floats, as a multiple of the largest buffer asked for so far: room for
/// one forward pass's distinct sizes, and a bound when tile shapes change (older ones go first).
const IDLE_PER_LARGEST: usize = 6;

struct Pool {
    /// Idle buffers, oldest first; each has `len() == capacity()`.
    idle: Vec<Vec<f32>>,
    idle_floats: usize,
    largest: usize,
}

impl Pool {
    const fn new() -> Self {
        Pool { idle: Vec::new(), idle_floats: 0, largest: 0 }
    }

    /// A kept buffer of exactly `len` floats, its contents whatever they were.
    fn reuse(&mut self, len: usize) -> Option<Vec<f32>> {
        self.largest = self.largest.max(len);
        let i = self.idle.iter().rposition(|b| b.len() == len)?;
        self.idle_floats -= len;
        Some(self.idle.remove(i))
    }

    fn keep(&mut self, buf: Vec<f32>) {
        let limit = IDLE_PER_LARGEST * self.largest.max(buf.len());
        self.idle_floats += buf.len();
        self.idle.push(buf);
        while self.idle_floats > limit {
            let old = self.idle.remove(0);
            self.idle_floats -= old.len();
        }
    }
}

static POOL: Mutex<Pool> = Mutex::new(Pool::new());

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // A panic elsewhere while holding the lock leaves the list itself whole.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `len` floats, every one of which the caller overwrites before reading it.
pub fn for_overwrite(len: usize) -> Vec<f32> {
    if len >= MIN_KEPT {
        if let Some(b) = pool().reuse(len) {
            return b;
        }
    }
    vec![0.0; len]
}

/// An empty buffer with room for `len` floats, for `extend`.
pub fn with_capacity(len: usize) -> Vec<f32> {
    let mut b = for_overwrite(len);
    b.clear();
    b
}

/// Keeps `buf` for a later request of its size.
pub fn release(mut buf: Vec<f32>) {
    let cap = buf.capacity();
    if cap < MIN_KEPT {
        return;
    }
    // SAFETY: f32 has no invalid bit patterns and every float up to the capacity was allocated
    // (by `vec![0.0; n]` or a kept buffer, all of whose floats were written once); the contents
    // are overwritten before they are read (for_overwrite's contract).
    unsafe { buf.set_len(cap) };
    pool().keep(buf);
}

/// Fills every idle buffer with NaN: an op that leaves part of its output unwritten then gives
/// NaN instead of an old value (the tests call it between forward passes).
pub fn poison_idle() {
    for b in pool().idle.iter_mut() {
        b.fill(f32::NAN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_for_their_exact_size_only() {
        let mut p = Pool::new();
        let (a, b) = (MIN_KEPT + 17, MIN_KEPT + 29);
        let x = vec![5.0f32; a];
        let ptr = x.as_ptr();
        p.keep(x);
        assert!(p.reuse(b).is_none());
        let z = p.reuse(a).expect("kept");
        assert_eq!((z.as_ptr(), z.len(), z[0]), (ptr, a, 5.0));
        assert_eq!((p.idle.len(), p.idle_floats), (0, 0));
    }

    #[test]
    fn idle_floats_stay_bounded_oldest_dropped_first() {
        let mut p = Pool::new();
        let base = MIN_KEPT + 101;
        assert!(p.reuse(base + 39).is_none());
        for i in 0..40 {
            p.keep(vec![i as f32; base + i]);
        }
        assert!(p.idle_floats <= IDLE_PER_LARGEST * (base + 39) && p.idle.len() == IDLE_PER_LARGEST, "{}", p.idle.len());
        assert_eq!(p.idle_floats, p.idle.iter().map(Vec::len).sum::<usize>());
        assert_eq!(p.idle[0][0], (40 - p.idle.len()) as f32, "the newest stay");
    }

    #[test]
    fn the_shared_pool_hands_out_what_it_kept_and_empties_it_for_extend() {
        // A size no other test asks for.
        let a = MIN_KEPT + 7919;
        let mut x = for_overwrite(a);
        x[3] = 2.0;
        let ptr = x.as_ptr();
        release(x);
        let z = for_overwrite(a);
        assert_eq!((z.as_ptr(), z.len(), z[3]), (ptr, a, 2.0), "the kept buffer, as it was");
        release(z);
        let e = with_capacity(a);
        assert_eq!((e.as_ptr(), e.len(), e.capacity()), (ptr, 0, a));
        release(e);
        // Small buffers are not kept.
        assert!(pool().idle.iter().all(|b| b.len() >= MIN_KEPT));
    }
}
