//! The activation arena: one device buffer per `Gpu` handle (one per worker thread), shared by
//! every engine of that worker and carved up by a deterministic first-fit allocator.
//!
//! Why not a pool of buffers: (1) the models of an ensemble run one after the other, so their
//! activations can share memory; a pool per engine holds every model's working set at once;
//! (2) a CUDA graph replays its kernels with the addresses they were captured with. Here every
//! walk starts from an empty arena and makes the same requests in the same order, so it gets the
//! same offsets every time: a walk that fitted can be captured once and replayed.
//!
//! The first walk of a shape (or a larger one) does not fit: a request past the arena's end gets
//! a buffer of its own for that walk (an "overflow") and the arena records how far the walk
//! reached; when the walk is over, the arena grows to that size, once, and its generation
//! changes (graphs captured on the old buffer are stale).

use anyhow::{bail, Result};

use super::gpu::{DevBuf, Gpu};

/// Offsets and sizes are multiples of this (cudaMalloc's alignment; vector loads need 16 B).
pub const ALIGN: usize = 256;
/// Growth granularity, so that a walk slightly larger than the last one does not regrow.
const GROW_STEP: usize = 64 << 10;
/// The allocator's address space: far more than any device, so a request always gets an offset.
const SPACE: usize = 1 << 50;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// The arena's state; lives in `Gpu` behind a mutex.
#[derive(Default)]
pub struct Arena {
    /// The backing buffer (None until the first walk ends).
    buf: Option<DevBuf>,
    /// Free ranges `[start, end)` of the offset space, sorted and disjoint.
    free: Vec<(usize, usize)>,
    /// The furthest offset the current walk reached.
    high: usize,
    /// Requests of the current walk served by a buffer of their own.
    overflows: usize,
    /// Changes whenever the backing buffer is replaced.
    generation: u64,
    /// Counts walks, so that a slot from an earlier walk is not taken back into this one.
    walk: u64,
    busy: bool,
}

/// How a walk went, for the engine's graph bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkEnd {
    /// Every request fitted in the arena: the same walk again gets the same addresses.
    pub fitted: bool,
    /// The arena's generation after the walk (it changes when the walk made it grow).
    pub generation: u64,
    /// How far into the arena the walk reached (the arena it needs).
    pub high: usize,
}

impl Arena {
    /// Bytes of device memory the arena holds.
    pub fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.bytes)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Starts a walk: every range is free again. Two walks at once on one arena would hand out
    /// the same memory twice, so that is an error.
    pub fn begin(&mut self, gpu: &Gpu) -> Result<()> {
        if self.busy {
            bail!("internal error: two forward passes at once on one device handle (cuda:{}); open one handle per thread", gpu.info.ordinal);
        }
        self.busy = true;
        self.walk += 1;
        self.free = vec![(0, SPACE)];
        self.high = 0;
        self.overflows = 0;
        if let Some(b) = &self.buf {
            gpu.emu_slots_reset(b.ptr);
        }
        Ok(())
    }

    /// `bytes` for the current walk: a slot of the arena, or a buffer of its own past its end.
    pub fn take(&mut self, gpu: &Gpu, bytes: usize) -> Result<DevBuf> {
        if !self.busy {
            bail!("internal error: arena allocation outside a forward pass");
        }
        let len = round_up(bytes.max(1), ALIGN);
        let i = self.free.iter().position(|&(s, e)| e - s >= len).expect("the offset space is never exhausted");
        let off = self.free[i].0;
        self.free[i].0 += len;
        if self.free[i].0 == self.free[i].1 {
            self.free.remove(i);
        }
        self.high = self.high.max(off + len);
        let walk = self.walk;
        match &self.buf {
            Some(b) if off + len <= b.bytes => {
                gpu.emu_slot_open(b.ptr + off as u64, bytes);
                Ok(DevBuf::slot(b.ptr + off as u64, bytes, off, len, walk, None))
            }
            _ => {
                self.overflows += 1;
                match gpu.alloc(bytes) {
                    Ok(own) => Ok(DevBuf::slot(own.ptr, bytes, off, len, walk, Some(own))),
                    Err(e) => {
                        self.release_range(off, len);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Returns a slot taken in this walk (a buffer of any other kind is just dropped).
    pub fn give(&mut self, gpu: &Gpu, b: DevBuf) {
        if let Some((off, len, walk, own)) = b.slot_range() {
            if walk == self.walk && self.busy {
                if !own {
                    if let Some(a) = &self.buf {
                        gpu.emu_slot_close(a.ptr + off as u64);
                    }
                }
                self.release_range(off, len);
            }
        }
    }

    fn release_range(&mut self, off: usize, len: usize) {
        let end = off + len;
        let i = self.free.partition_point(|&(s, _)| s < off);
        debug_assert!(i == 0 || self.free[i - 1].1 <= off, "arena range freed twice");
        debug_assert!(i == self.free.len() || self.free[i].0 >= end, "arena range freed twice");
        let merge_prev = i > 0 && self.free[i - 1].1 == off;
        let merge_next = i < self.free.len() && self.free[i].0 == end;
        match (merge_prev, merge_next) {
            (true, true) => {
                self.free[i - 1].1 = self.free[i].1;
                self.free.remove(i);
            }
            (true, false) => self.free[i - 1].1 = end,
            (false, true) => self.free[i].0 = off,
            (false, false) => self.free.insert(i, (off, end)),
        }
    }

    /// Ends a walk. After a successful one (`grow`) that did not fit, the arena is replaced by one
    /// as large as the walk needed (the old buffer's release is ordered after the work issued on
    /// it; it goes first, and the stream is synchronised, so that the two are never held at once). A failed growth (out of
    /// memory) leaves no arena: later walks overflow, as a first walk does, which works, only
    /// without graphs (the engine captures only when the arena holds the whole walk).
    pub fn end(&mut self, gpu: &Gpu, grow: bool) -> WalkEnd {
        self.busy = false;
        let fitted = self.overflows == 0;
        if grow && self.high > self.capacity() {
            let want = round_up(self.high, GROW_STEP);
            self.buf = None;
            // The stream-ordered free keeps the old block in the driver's pool until a
            // synchronisation; on a nearly full card the larger buffer may need those bytes.
            // Growth is rare (the first walks of a shape), so the stall costs nothing measurable.
            if !gpu.capturing() {
                let _ = gpu.sync("releasing the old activation arena");
            }
            if let Ok(b) = gpu.alloc(want) {
                gpu.emu_slots_track(b.ptr);
                self.buf = Some(b);
            }
            self.generation += 1;
        }
        WalkEnd { fitted, generation: self.generation, high: self.high }
    }

    /// Frees the backing buffer (between walks only).
    pub fn release(&mut self) {
        if !self.busy {
            self.buf = None;
            self.generation += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same requests in the same order get the same addresses in every walk once the arena
    /// has grown; freed ranges are reused first-fit, and neighbours merge.
    #[test]
    fn walks_repeat_their_addresses_once_the_arena_has_grown() {
        let gpu = Gpu::emulator().unwrap();
        let mut a = Arena::default();
        let walk = |a: &mut Arena| -> (Vec<u64>, WalkEnd) {
            a.begin(&gpu).unwrap();
            let x = a.take(&gpu, 1000).unwrap();
            let y = a.take(&gpu, 5000).unwrap();
            let mut ptrs = vec![x.ptr, y.ptr];
            a.give(&gpu, x);
            // First fit: the 1000-byte hole (1024 with alignment) takes 600 but not 3000.
            let z = a.take(&gpu, 600).unwrap();
            let w = a.take(&gpu, 3000).unwrap();
            ptrs.extend([z.ptr, w.ptr]);
            a.give(&gpu, y);
            a.give(&gpu, z);
            a.give(&gpu, w);
            assert_eq!(a.free, vec![(0, SPACE)], "every range back and merged");
            (ptrs, a.end(&gpu, true))
        };
        let (_, first) = walk(&mut a);
        assert!(!first.fitted);
        assert_eq!(a.capacity(), GROW_STEP);
        let base = a.buf.as_ref().unwrap().ptr;
        let (p2, second) = walk(&mut a);
        let (p3, third) = walk(&mut a);
        assert!(second.fitted && third.fitted);
        assert_eq!(second.generation, first.generation);
        assert_eq!(p2, p3);
        assert_eq!(p2, vec![base, base + 1024, base, base + 1024 + 5120]);
        assert_eq!(gpu.memory_live(), GROW_STEP);
    }

    /// A walk that needs more than the arena holds still gets its memory (buffers of its own);
    /// the arena then grows and its generation changes. Two walks at once are refused.
    #[test]
    fn a_larger_walk_overflows_then_grows_the_arena() {
        let gpu = Gpu::emulator().unwrap();
        let mut a = Arena::default();
        a.begin(&gpu).unwrap();
        assert!(a.begin(&gpu).is_err(), "a second walk at once");
        let b = a.take(&gpu, 100).unwrap();
        a.give(&gpu, b);
        let g0 = a.end(&gpu, true).generation;
        a.begin(&gpu).unwrap();
        let big = a.take(&gpu, 3 * GROW_STEP).unwrap();
        gpu.write(big.ptr, &vec![1u8; 3 * GROW_STEP]).unwrap();
        a.give(&gpu, big);
        let end = a.end(&gpu, true);
        assert!(!end.fitted && end.generation > g0);
        assert_eq!((a.capacity(), end.high), (3 * GROW_STEP, 3 * GROW_STEP));
        // A failed walk does not grow it.
        a.begin(&gpu).unwrap();
        let _ = a.take(&gpu, 5 * GROW_STEP).unwrap();
        assert_eq!(a.end(&gpu, false).generation, end.generation);
        assert_eq!(a.capacity(), 3 * GROW_STEP);
    }

    /// A capture refuses what it cannot hold: allocations, host copies, synchronisation, work
    /// from another thread; a buffer dropped during it stays allocated and fails the capture.
    #[test]
    fn a_capture_refuses_what_it_cannot_hold() {
        let gpu = Gpu::emulator().unwrap();
        let keep = gpu.alloc(64).unwrap();
        let doomed = gpu.alloc(128).unwrap();
        gpu.begin_capture().unwrap();
        assert!(gpu.begin_capture().is_err());
        assert!(gpu.alloc(16).is_err());
        assert!(gpu.write(keep.ptr, &[1u8; 4]).is_err());
        assert!(gpu.read::<u8>(keep.ptr, 4).is_err());
        assert!(gpu.sync("test").is_err());
        gpu.zero(keep.ptr, 64).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| assert!(gpu.zero(keep.ptr, 64).is_err(), "another thread's work during a capture"));
        });
        let g = gpu.end_capture().unwrap();
        assert_eq!(g.nodes, 1);
        gpu.begin_capture().unwrap();
        drop(doomed);
        let e = gpu.end_capture().unwrap_err();
        assert!(format!("{e:#}").contains("freed during the capture"), "{e:#}");
        assert_eq!(gpu.memory_live(), 64 + 128, "left allocated");
        // Everything works again afterwards.
        gpu.write(keep.ptr, &[2u8; 64]).unwrap();
        gpu.replay(&g).unwrap();
        assert_eq!(gpu.read::<u8>(keep.ptr, 64).unwrap(), vec![0u8; 64]);
    }

    /// On the emulator a slot is the only memory a kernel may touch: reading a released slot
    /// (or past a live one's end) is an error, as a stray access would be.
    #[test]
    fn the_emulator_rejects_access_outside_live_slots() {
        let gpu = Gpu::emulator().unwrap();
        let mut a = Arena::default();
        a.begin(&gpu).unwrap();
        let s = a.take(&gpu, 512).unwrap();
        a.give(&gpu, s);
        a.end(&gpu, true);
        a.begin(&gpu).unwrap();
        let s = a.take(&gpu, 512).unwrap();
        let t = a.take(&gpu, 512).unwrap();
        gpu.write(s.ptr, &[7u8; 512]).unwrap();
        assert!(gpu.read::<u8>(s.ptr, 513).is_err(), "past the slot's end");
        let p = t.ptr;
        a.give(&gpu, t);
        let e = gpu.read::<u8>(p, 4).unwrap_err();
        assert!(format!("{e:#}").contains("live arena slot"), "{e:#}");
        assert_eq!(gpu.read::<u8>(s.ptr, 512).unwrap(), vec![7u8; 512]);
        a.give(&gpu, s);
        a.end(&gpu, true);
    }
}
