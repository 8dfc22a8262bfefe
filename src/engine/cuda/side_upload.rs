//! The next tomogram's volume copied to the device while the current one is computed.
//!
//! The reader thread (`fastdet run`) holds a `SideUploader` of the worker's device handle: it
//! converts the normalised volume to fp16 on the host into a pinned buffer and copies it on a
//! side stream of the same context, so the copy runs beside the main stream's kernels instead
//! of between two tomograms. `DeviceVolume::from_upload` takes the result.
//!
//! Ordering, on the GPU:
//! - the main stream waits for the copy's event before any kernel reads the volume
//!   (`PendingVolume::wait`, issued from the worker thread, outside any graph capture);
//! - the buffer is allocated and freed on the side stream (so the reader thread never touches
//!   the main stream, which the worker may be capturing into a graph); once the main stream has
//!   used it, its free waits for the main stream (`DevBuf`'s drop);
//! - the pinned buffer is refilled only after the previous copy from it has finished.
//!
//! On the emulators the copy lands at the latest moment CUDA allows, the main stream's wait, and
//! the buffer holds fp16 NaNs until then: a kernel that read the volume without the wait would
//! see them.
//!
//! cudarc keeps one error slot per context, which a bind on either thread reads and clears: an
//! error a drop on the worker's side stored may surface in the reader's next call (reported as
//! a failed early copy, after which the volume goes up in its turn), and the reverse.
//!
//! The conversion is `half::f16::from_f32`, round to nearest even like the device's
//! `f32_to_f16` (`__float2half_rn`), so the volume holds the same bits as `DeviceVolume::new`
//! makes (tested).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};
use half::slice::HalfFloatSliceExt;
use half::f16;
use rayon::prelude::*;

use super::gpu::{DevBuf, Gpu};

/// Whether `fastdet run` copies volumes ahead on a side stream (`FASTDET_OVERLAP_UPLOAD`, default
/// on; `0` copies each one when its turn comes).
pub fn overlap_enabled() -> bool {
    std::env::var("FASTDET_OVERLAP_UPLOAD").map_or(true, |v| v != "0")
}

/// The fp16 bits the emulators leave in a volume until its copy lands (a quiet NaN).
pub const NOT_LANDED: u16 = 0x7E00;

/// Uploads volumes on a side stream of one device handle; used from one thread at a time (the
/// reader's), while the handle's own thread computes.
pub struct SideUploader {
    gpu: Arc<Gpu>,
    /// The side stream (None on the emulators).
    side: Option<Arc<CudaStream>>,
    /// Host staging, page-locked so the copy is asynchronous; grown to the largest volume.
    pinned: Option<PinnedHostSlice<u16>>,
    /// The last copy out of `pinned`.
    last_copy: Option<CudaEvent>,
}

/// A volume whose copy to the device was issued on the side stream.
pub struct PendingVolume {
    gpu: Arc<Gpu>,
    buf: DevBuf,
    voxels: usize,
    landing: Landing,
    /// Seconds the uploading thread spent on it (the fp16 conversion and issuing the copy).
    issue_s: f64,
}

enum Landing {
    /// Recorded on the side stream after the copy.
    Cuda(CudaEvent),
    /// The emulators: the bytes the copy will write at the wait.
    Emulated(Vec<u16>),
}

impl SideUploader {
    /// An uploader for `gpu` (its own side stream; the pinned buffer comes with the first volume).
    pub fn new(gpu: Arc<Gpu>) -> Result<Self> {
        gpu.bind()?;
        let side = gpu.new_side_stream()?;
        Ok(SideUploader { gpu, side, pinned: None, last_copy: None })
    }

    /// Issues the copy of `volume` (normalised f32) as fp16 and returns without waiting for it.
    /// An `OutOfMemory` error means the device has no room for a second volume now.
    pub fn upload(&mut self, volume: &[f32]) -> Result<PendingVolume> {
        let started = Instant::now();
        let gpu = self.gpu.clone();
        gpu.bind()?;
        let buf = gpu.alloc_side(self.side.as_ref(), volume.len() * 2)?;
        let landing = match &self.side {
            None => {
                let emu = gpu.emu().ok_or_else(|| anyhow!("internal error: a CUDA handle without a side stream"))?;
                emu.write_bytes(buf.ptr, bytemuck::cast_slice(&vec![NOT_LANDED; volume.len()]))?;
                let mut bits = vec![0u16; volume.len()];
                to_f16_bits(volume, &mut bits);
                Landing::Emulated(bits)
            }
            Some(side) => {
                let side = side.clone();
                match self.copy_through_pinned(&side, buf.ptr, volume) {
                    Ok(event) => Landing::Cuda(event),
                    Err(e) => {
                        // A copy may still be reading the staging: wait for the side stream, and
                        // if even that fails, never refill or free the staging.
                        self.quiesce(&side);
                        return Err(e);
                    }
                }
            }
        };
        gpu.count_to_device(volume.len() * 2);
        Ok(PendingVolume { gpu, buf, voxels: volume.len(), landing, issue_s: started.elapsed().as_secs_f64() })
    }

    /// `upload`, or None when the device has no room for the volume beside the one being
    /// computed (reported, naming `what`): the caller then copies it in its turn.
    pub fn upload_or_defer(&mut self, volume: &[f32], what: &str) -> Result<Option<PendingVolume>> {
        match self.upload(volume) {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.downcast_ref::<crate::pipeline::runner::OutOfMemory>().is_some() => {
                crate::errln!("  {what}: no room on the device for this volume beside the one being computed ({e:#}); it goes up when its turn comes");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Converts `volume` into the page-locked staging (after the previous copy out of it has
    /// finished) and issues its copy to `dst` on `side`; returns the event the main stream waits for.
    fn copy_through_pinned(&mut self, side: &Arc<CudaStream>, dst: u64, volume: &[f32]) -> Result<CudaEvent> {
        if let Some(e) = &self.last_copy {
            e.synchronize().map_err(|e| anyhow!("waiting for the previous volume's copy: {e}"))?;
            self.last_copy = None;
        }
        if self.pinned.as_ref().is_none_or(|p| p.len() < volume.len()) {
            self.pinned = None;
            // SAFETY: written in full below before any copy reads it. Plain (not write-combined)
            // page-locked memory.
            let p = unsafe { side.context().alloc_pinned_with_flags::<u16>(volume.len().max(1), 0) }
                .map_err(|e| anyhow!("allocating {:.0} MiB of page-locked host memory: {e}", volume.len() as f64 * 2.0 / 1048576.0))?;
            self.pinned = Some(p);
        }
        let pinned = self.pinned.as_mut().expect("allocated above");
        let host = &mut pinned.as_mut_slice().map_err(|e| anyhow!("page-locked staging: {e}"))?[..volume.len()];
        to_f16_bits(volume, host);
        // SAFETY: dst holds volume.len() fp16; the staging stays untouched until `last_copy` has
        // completed (waited for before the next refill and on drop; `quiesce` on errors).
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, &*host, side.cu_stream()) }
            .map_err(|e| anyhow!("copy of {} bytes to the device on the side stream: {e}", volume.len() * 2))?;
        let record = || side.record_event(None).map_err(|e| anyhow!("recording the copy's event: {e}"));
        self.last_copy = Some(record()?);
        record()
    }

    /// After an error: waits for everything on the side stream, so the staging is free again; if
    /// that fails too, the staging is leaked (a copy may still read it) and a new one made later.
    fn quiesce(&mut self, side: &CudaStream) {
        match side.synchronize() {
            Ok(()) => self.last_copy = None,
            Err(e) => {
                crate::errln!("warning: the side stream could not be waited for ({e}); its page-locked staging is left allocated");
                std::mem::forget(self.pinned.take());
                self.last_copy = None;
            }
        }
    }
}

impl Drop for SideUploader {
    fn drop(&mut self) {
        // The pinned memory is freed only after the last copy out of it.
        if let (Some(e), Some(side)) = (self.last_copy.take(), self.side.clone()) {
            if e.synchronize().is_err() {
                self.quiesce(&side);
            }
        }
    }
}

/// RNE fp16 bits of `src` into `dst` (same length), in parallel chunks (`half`'s slice
/// conversion, which uses the CPU's conversion instructions where it has them).
fn to_f16_bits(src: &[f32], dst: &mut [u16]) {
    const CHUNK: usize = 1 << 16;
    let dst: &mut [f16] = bytemuck::cast_slice_mut(dst);
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| d.convert_from_f32_slice(s));
}

impl PendingVolume {
    /// Voxels of the volume.
    pub fn voxels(&self) -> usize {
        self.voxels
    }

    /// Seconds the uploading thread spent on it (the fp16 conversion and issuing the copy, which
    /// then runs on its own).
    pub fn issue_s(&self) -> f64 {
        self.issue_s
    }

    /// Whether it was made for (and on) `gpu`'s handle.
    pub fn is_for(&self, gpu: &Arc<Gpu>) -> bool {
        Arc::ptr_eq(&self.gpu, gpu)
    }

    /// Orders the handle's main stream after the copy (work issued later sees the volume) and
    /// returns the device buffer, `voxels` fp16. Call from the handle's own thread, outside a
    /// graph capture.
    pub fn wait(self) -> Result<DevBuf> {
        let PendingVolume { gpu, mut buf, landing, .. } = self;
        if gpu.capturing() {
            bail!("waiting for a side-stream copy during a CUDA graph capture");
        }
        match landing {
            Landing::Cuda(event) => {
                let main = gpu.stream().ok_or_else(|| anyhow!("internal error: a CUDA copy on an emulated handle"))?;
                main.wait(&event).map_err(|e| anyhow!("ordering the main stream after the volume's copy: {e}"))?;
            }
            Landing::Emulated(bits) => {
                let emu = gpu.emu().ok_or_else(|| anyhow!("internal error: an emulated copy on a CUDA handle"))?;
                emu.write_bytes(buf.ptr, bytemuck::cast_slice(&bits))?;
            }
        }
        buf.mark_used_by_main();
        Ok(buf)
    }

    /// The device buffer as it is now, without waiting (tests: the emulators' NaNs before the wait).
    #[cfg(test)]
    pub(super) fn peek(&self) -> u64 {
        self.buf.ptr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cuda::DeviceVolume;

    /// Uniform values in [0, 1) with fp16's hard cases spliced in: ties between two fp16 values
    /// (normal and subnormal), values just either side of a tie, and subnormals.
    fn volume(n: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0.0f32; n];
        crate::util::SplitMix64::new(seed).fill_uniform(&mut v, 0.0, 1.0);
        let p = |e: i32| 2f32.powi(e);
        let hard = [
            1.0 + p(-11),
            1.0 + 3.0 * p(-11),
            0.5 + p(-12),
            p(-25),
            3.0 * p(-25),
            p(-24),
            p(-20) + p(-25),
            (1.0 + p(-11)).next_up(),
            (1.0 + p(-11)).next_down(),
            6.1e-5,
            0.0,
            1.0,
        ];
        for (i, h) in hard.iter().enumerate() {
            v[(i * 7919) % n] = *h;
        }
        v
    }

    /// The copy issued from another thread holds the emulators' NaNs until the wait, then the
    /// bits the device's own conversion (the kernel source of `f32_to_f16`, built for the host)
    /// makes of the same volume; the tiles cut from it match too.
    #[test]
    fn an_upload_lands_at_the_wait_with_the_bits_of_the_device_conversion() {
        let gpu = Gpu::emulator_host_kernels().unwrap();
        let (shape, window) = ([5, 37, 41], [4, 16, 16]);
        let n: usize = shape.iter().product();
        let v = volume(n, 3);
        let mut reference = DeviceVolume::new(gpu.clone(), &v, shape, window).unwrap();
        let want: Vec<u16> = gpu.read(reference.volume_ptr(), n).unwrap();
        assert_eq!(want[0], 0x3C00, "a tie rounds to even (1.0)");
        assert_eq!(want[3 * 7919 % n], 0, "a subnormal tie rounds to even (0)");

        let live = gpu.memory_live();
        let sent = gpu.bytes_to_device();
        let mut up = SideUploader::new(gpu.clone()).unwrap();
        let pending = std::thread::scope(|t| t.spawn(|| up.upload(&v)).join().unwrap()).unwrap();
        assert_eq!(gpu.memory_live(), live + 2 * n);
        assert_eq!(gpu.bytes_to_device() - sent, 2 * n as u64);
        let before: Vec<u16> = gpu.read(pending.peek(), n).unwrap();
        assert!(before.iter().all(|&b| b == NOT_LANDED), "nothing lands before the wait");

        let mut dv = DeviceVolume::from_upload(gpu.clone(), pending, shape, window).unwrap();
        let got: Vec<u16> = gpu.read(dv.volume_ptr(), n).unwrap();
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{differ} voxels differ from the device conversion");

        let origins = [[0, 0, 0], [1, 21, 25], [3, 30, 30]];
        for d in [&mut reference, &mut dv] {
            d.extract(&origins, false).unwrap();
        }
        let tiles = |d: &mut DeviceVolume| -> Vec<u16> {
            let ptr = d.view(0).unwrap().ptr;
            gpu.read(ptr, origins.len() * window.iter().product::<usize>()).unwrap()
        };
        assert_eq!(tiles(&mut dv), tiles(&mut reference));
        drop((dv, reference));
        drop(up);
    }

    /// The free of a side-stream buffer waits for the main stream once that stream used it (on a
    /// GPU: the side stream joins the main one), not before; a used one dropped during a graph
    /// capture is left allocated and fails the capture, as any free in it does, while an unused
    /// one is freed then as always (the reader's side of the device is never captured).
    #[test]
    fn a_side_buffer_is_freed_after_the_main_stream_once_that_stream_used_it() {
        let gpu = Gpu::emulator().unwrap();
        let v = volume(4096, 7);
        let bytes = 2 * v.len();
        let mut up = SideUploader::new(gpu.clone()).unwrap();
        let live = gpu.memory_live();
        drop(up.upload(&v).unwrap());
        assert_eq!((gpu.memory_live(), gpu.side_frees_ordered()), (live, 0), "unused: a plain free");
        let used = up.upload(&v).unwrap().wait().unwrap();
        assert_eq!(gpu.memory_live(), live + bytes);
        drop(used);
        assert_eq!((gpu.memory_live(), gpu.side_frees_ordered()), (live, 1), "used: freed after the main stream");

        let unused = up.upload(&v).unwrap();
        let used = up.upload(&v).unwrap().wait().unwrap();
        gpu.begin_capture().unwrap();
        drop(unused);
        assert_eq!(gpu.memory_live(), live + bytes, "an unused one is freed even during a capture");
        drop(used);
        let e = gpu.end_capture().expect_err("a used side buffer freed in the capture");
        assert!(format!("{e:#}").contains("1 buffer(s) freed during the capture"), "{e:#}");
        assert_eq!((gpu.memory_live(), gpu.side_frees_ordered()), (live + bytes, 1), "left allocated");
    }

    /// No room for a second volume: an `OutOfMemory` error (the caller uploads it later) and
    /// nothing held; an upload dropped without its wait frees its memory.
    #[test]
    fn an_upload_without_room_is_out_of_memory_and_leaves_nothing_allocated() {
        let gpu = Gpu::emulator().unwrap();
        let v = volume(4096, 5);
        let mut up = SideUploader::new(gpu.clone()).unwrap();
        let live = gpu.memory_live();
        gpu.set_emulated_memory_limit(live + 2 * v.len() - 1);
        let e = up.upload(&v).err().expect("over the limit");
        assert!(e.downcast_ref::<crate::pipeline::runner::OutOfMemory>().is_some(), "{e:#}");
        assert_eq!(gpu.memory_live(), live);
        gpu.set_emulated_memory_limit(live + 2 * v.len());
        let pending = up.upload(&v).unwrap();
        assert_eq!(gpu.memory_live(), live + 2 * v.len());
        drop(pending);
        assert_eq!(gpu.memory_live(), live);
        gpu.set_emulated_memory_limit(usize::MAX);

        let other = Gpu::emulator().unwrap();
        let pending = up.upload(&v).unwrap();
        let e = DeviceVolume::from_upload(other, pending, [1, 64, 64], [1, 16, 16]).err().expect("another handle");
        assert!(format!("{e:#}").contains("another device handle"), "{e:#}");
        let e = DeviceVolume::from_upload(gpu.clone(), up.upload(&v).unwrap(), [1, 64, 63], [1, 16, 16]).err().expect("wrong shape");
        assert!(format!("{e:#}").contains("4096 voxels uploaded for a volume of [1, 64, 63]"), "{e:#}");
    }
}
