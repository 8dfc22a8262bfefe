//! Calls that synchronise a whole device against graph captures on it.
//!
//! cuDNN's handle creation and destruction and its algorithm search synchronise the device
//! (`cudnnDestroy` calls `cudaDeviceSynchronize`), and synchronising a device while any stream of
//! its context is capturing a graph is invalid: it breaks that capture. Two workers on one card
//! (`--gpus 0,0`) share its primary context, so one worker opening or dropping an engine could
//! break the other's capture (that shape would then run without a graph). Here such calls and
//! captures on one device exclude each other: a device-wide call waits until no other thread
//! captures on that device, and a capture waits until no device-wide call runs or waits. Captures do not
//! exclude each other (thread-local capture mode keeps them apart), nor do a thread's own capture
//! and its own calls (a device-wide call inside one's own capture is refused elsewhere).

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::thread::ThreadId;

#[derive(Default)]
struct DeviceState {
    capturing: Vec<ThreadId>,
    device_wide: bool,
    /// Device-wide calls waiting for captures to end: new captures wait for them (else two
    /// workers' overlapping captures could hold an engine's opening back indefinitely).
    pending: usize,
}

static STATE: Mutex<BTreeMap<usize, DeviceState>> = Mutex::new(BTreeMap::new());
static CHANGED: Condvar = Condvar::new();

fn state() -> std::sync::MutexGuard<'static, BTreeMap<usize, DeviceState>> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Held while this thread captures a graph on device `ordinal`; dropping it ends the claim.
#[must_use]
pub struct CaptureClaim {
    ordinal: usize,
    thread: ThreadId,
}

/// Claims a capture on `ordinal` for this thread, after any device-wide call running there.
pub fn claim_capture(ordinal: usize) -> CaptureClaim {
    let thread = std::thread::current().id();
    let mut s = state();
    while s.get(&ordinal).is_some_and(|d| d.device_wide || d.pending > 0) {
        s = CHANGED.wait(s).unwrap_or_else(|e| e.into_inner());
    }
    s.entry(ordinal).or_default().capturing.push(thread);
    CaptureClaim { ordinal, thread }
}

impl Drop for CaptureClaim {
    fn drop(&mut self) {
        let mut s = state();
        if let Some(d) = s.get_mut(&self.ordinal) {
            if let Some(i) = d.capturing.iter().position(|t| *t == self.thread) {
                d.capturing.swap_remove(i);
            }
        }
        drop(s);
        CHANGED.notify_all();
    }
}

/// Runs `f`, a call that synchronises device `ordinal`, when no other thread captures there
/// and no other device-wide call runs.
pub fn device_wide<T>(ordinal: usize, f: impl FnOnce() -> T) -> T {
    let me = std::thread::current().id();
    let mut s = state();
    s.entry(ordinal).or_default().pending += 1;
    while s.get(&ordinal).is_some_and(|d| d.device_wide || d.capturing.iter().any(|t| *t != me)) {
        s = CHANGED.wait(s).unwrap_or_else(|e| e.into_inner());
    }
    let d = s.entry(ordinal).or_default();
    d.pending -= 1;
    d.device_wide = true;
    drop(s);
    // Released even when `f` panics (cuDNN's loader can).
    struct Release(usize);
    impl Drop for Release {
        fn drop(&mut self) {
            if let Some(d) = state().get_mut(&self.0) {
                d.device_wide = false;
            }
            CHANGED.notify_all();
        }
    }
    let _release = Release(ordinal);
    f()
}

#[cfg(test)]
mod tests {
    use super::{claim_capture, device_wide};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A device-wide call waits for another thread's capture on that device to end, runs at
    /// once beside a capture on another device or on its own thread's, and a capture started
    /// meanwhile waits for it.
    #[test]
    fn device_wide_calls_wait_for_other_threads_captures_on_their_device() {
        // Ordinals far from any real device's, so that other tests cannot meet them.
        const DEV: usize = 1 << 40;
        let claim = claim_capture(DEV);
        assert_eq!(device_wide(DEV + 1, || 7), 7, "another device is not held");
        assert_eq!(device_wide(DEV, || 8), 8, "the capturing thread's own call is not held");

        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || device_wide(DEV, || tx.send("ran").unwrap()));
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "ran during another thread's capture");
        drop(claim);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok("ran"));
        waiter.join().unwrap();

        // A capture waits while a device-wide call runs.
        let (started_tx, started_rx) = mpsc::channel();
        let (finish_tx, finish_rx) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            device_wide(DEV, || {
                started_tx.send(()).unwrap();
                finish_rx.recv().unwrap();
            })
        });
        started_rx.recv().unwrap();
        let (claimed_tx, claimed_rx) = mpsc::channel();
        let capturer = std::thread::spawn(move || {
            let c = claim_capture(DEV);
            claimed_tx.send(()).unwrap();
            drop(c);
        });
        assert!(claimed_rx.recv_timeout(Duration::from_millis(300)).is_err(), "captured during a device-wide call");
        finish_tx.send(()).unwrap();
        claimed_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        holder.join().unwrap();
        capturer.join().unwrap();
    }

    /// A capture asked for while a device-wide call waits for another capture waits behind that
    /// call (a stream of overlapping captures cannot hold it back).
    #[test]
    fn a_waiting_device_wide_call_goes_before_new_captures() {
        const DEV: usize = (1 << 40) + 3;
        let first = claim_capture(DEV);
        let (order_tx, order_rx) = mpsc::channel();
        let tx = order_tx.clone();
        let wide = std::thread::spawn(move || device_wide(DEV, || tx.send("device-wide").unwrap()));
        std::thread::sleep(Duration::from_millis(200)); // the call is waiting now
        let tx = order_tx.clone();
        let second = std::thread::spawn(move || {
            let c = claim_capture(DEV);
            tx.send("capture").unwrap();
            drop(c);
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(order_rx.try_recv().is_err(), "nothing may run while the first capture lasts");
        drop(first);
        assert_eq!(order_rx.recv_timeout(Duration::from_secs(10)), Ok("device-wide"));
        assert_eq!(order_rx.recv_timeout(Duration::from_secs(10)), Ok("capture"));
        wide.join().unwrap();
        second.join().unwrap();
    }

    /// A panic inside a device-wide call releases the device.
    #[test]
    fn a_panic_in_a_device_wide_call_releases_the_device() {
        const DEV: usize = (1 << 40) + 7;
        assert!(std::panic::catch_unwind(|| device_wide(DEV, || panic!("loader"))).is_err());
        let t = std::thread::spawn(|| device_wide(DEV, || 1));
        assert_eq!(t.join().unwrap(), 1);
        drop(claim_capture(DEV));
    }
}
