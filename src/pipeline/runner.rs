//! One tomogram through the whole detector: normalise, tile, run the ensemble (with optional
//! test-time augmentation), blend, detect.

use super::blend::{Blender, Maps};
use super::detect::{detect, detect_from_candidates, sigmas_for, Detection};
use super::tiling::{extract_tile, normalize_unit_range, TileGrid};
use crate::engine::cuda::gpu::Gpu;
use crate::engine::cuda::tomogram::CANDIDATE_CAPACITY;
use crate::engine::cuda::{DeviceVolume, PendingVolume, TomogramAccumulator};
use crate::engine::TileEngine;
use crate::particles::{ANGSTROM_PER_VOXEL, SEED_THRESHOLDS};
use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::Instant;

/// Test-time augmentation, averaged with the plain pass before blending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tta {
    None,
    /// Plain + z, y and x flips.
    Flip,
    /// The four rotations in the yx plane (needs a square yx window).
    Rot90,
}

impl Tta {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Tta::None,
            "flip" => Tta::Flip,
            "rot90" => Tta::Rot90,
            _ => bail!("unknown --tta {s:?}: expected none, flip or rot90"),
        })
    }

    /// The name `--tta` takes.
    pub fn name(self) -> &'static str {
        match self {
            Tta::None => "none",
            Tta::Flip => "flip",
            Tta::Rot90 => "rot90",
        }
    }
}

/// Everything that defines a detection run besides the models. Defaults are the seed's.
#[derive(Debug, Clone)]
pub struct Settings {
    pub window: [usize; 3],
    pub tiles: [usize; 3],
    pub thresholds: Vec<f32>,
    pub iou_threshold: f64,
    pub pre_nms_top_k: usize,
    pub blend_sigma: f64,
    pub tta: Tta,
    /// Tiles per engine call.
    pub batch: usize,
    /// Voxel size in Å: converts picks to Å and particle radii to voxels.
    pub voxel_size: f64,
    /// Average the ensemble and blend the tiles on the GPU when every engine is a CUDA engine on
    /// one device (per-tile outputs stay there; the maps come back once); the volume is uploaded
    /// once and the tiles are cut there, one copy per batch for all models; else ignored. Off in
    /// `Settings::default()` (the host path is the reference); `fastdet run` turns it on unless
    /// `--host-blend`.
    pub device_blend: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            window: [192, 128, 128],
            tiles: [1, 9, 9],
            thresholds: SEED_THRESHOLDS.to_vec(),
            iou_threshold: 0.85,
            pre_nms_top_k: 16536,
            blend_sigma: 15.0,
            tta: Tta::None,
            batch: 1,
            voxel_size: ANGSTROM_PER_VOXEL,
            device_blend: false,
        }
    }
}

/// Seconds spent in each stage of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timing {
    /// Reading, checking and (in `fastdet run`) normalising the volume.
    pub read: f64,
    /// The volume's copy to the device (device blending; else each batch's copies are in `infer`).
    /// With `upload_overlapped`, the uploading thread's time: the fp16 conversion and issuing the
    /// copy, which then runs on its own.
    pub upload: f64,
    /// The copy was issued ahead, from another thread, on a side stream (`SideUploader`): beside
    /// the previous tomogram's compute, except for the first tomogram of a worker.
    pub upload_overlapped: bool,
    pub infer: f64,
    pub blend: f64,
    pub detect: f64,
    /// Windows computed (each through every model); set by `fastdet run`.
    pub tiles: usize,
}

/// An engine's out-of-memory error: the runner retries the batch in halves before giving up.
#[derive(Debug)]
pub struct OutOfMemory(pub String);

impl std::fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "out of device memory: {}", self.0)
    }
}

impl std::error::Error for OutOfMemory {}

/// Models averaged tile by tile (means of sigmoid scores and of offsets).
pub struct Ensemble {
    pub engines: Vec<Box<dyn TileEngine>>,
    pub num_classes: usize,
    pub stride: usize,
}

/// A spatial transform of a tile and its inverse on the stride-2 outputs.
#[derive(Debug, Clone, Copy)]
enum View {
    Plain,
    Flip(usize),
    Rot(usize),
}

fn views(tta: Tta) -> Vec<View> {
    match tta {
        Tta::None => vec![View::Plain],
        Tta::Flip => vec![View::Plain, View::Flip(0), View::Flip(1), View::Flip(2)],
        Tta::Rot90 => vec![View::Plain, View::Rot(1), View::Rot(2), View::Rot(3)],
    }
}

/// Reverses axis `axis` (0 = z, 1 = y, 2 = x) of a `[c, d, h, w]` array.
fn flip(a: &[f32], c: usize, dims: [usize; 3], axis: usize) -> Vec<f32> {
    let [d, h, w] = dims;
    let mut out = vec![0.0; a.len()];
    for ch in 0..c {
        for z in 0..d {
            for y in 0..h {
                for x in 0..w {
                    let (sz, sy, sx) = match axis {
                        0 => (d - 1 - z, y, x),
                        1 => (z, h - 1 - y, x),
                        _ => (z, y, w - 1 - x),
                    };
                    out[((ch * d + z) * h + y) * w + x] = a[((ch * d + sz) * h + sy) * w + sx];
                }
            }
        }
    }
    out
}

/// numpy `rot90(a, k, axes=(y, x))` of a `[c, d, n, n]` array: one turn is out[y, x] = a[x, n-1-y].
fn rot90(a: &[f32], c: usize, dims: [usize; 3], k: usize) -> Vec<f32> {
    let [d, n, n2] = dims;
    assert_eq!(n, n2, "rot90 needs a square yx plane");
    let mut cur = a.to_vec();
    for _ in 0..k % 4 {
        let mut out = vec![0.0; a.len()];
        for p in 0..c * d {
            let (src, dst) = (&cur[p * n * n..(p + 1) * n * n], &mut out[p * n * n..(p + 1) * n * n]);
            for y in 0..n {
                for x in 0..n {
                    dst[y * n + x] = src[x * n + (n - 1 - y)];
                }
            }
        }
        cur = out;
    }
    cur
}

impl View {
    /// The view's code in kernels/ensemble.cu (`ensemble_accumulate_view_f32`).
    fn kernel_code(self) -> usize {
        match self {
            View::Plain => 0,
            View::Flip(a) => 1 + a,
            View::Rot(k) => 3 + k,
        }
    }

    fn forward(self, tile: &[f32], dims: [usize; 3]) -> Vec<f32> {
        match self {
            View::Plain => tile.to_vec(),
            View::Flip(a) => flip(tile, 1, dims, a),
            View::Rot(k) => rot90(tile, 1, dims, k),
        }
    }

    /// Maps outputs computed on the transformed tile back to the tile's frame; offsets are
    /// vectors (channels x, y, z) and turn with the volume.
    fn inverse(self, scores: &mut Vec<f32>, offsets: &mut Vec<f32>, nc: usize, dims: [usize; 3]) {
        match self {
            View::Plain => {}
            View::Flip(a) => {
                *scores = flip(scores, nc, dims, a);
                *offsets = flip(offsets, 3, dims, a);
                let ch = 2 - a; // z → channel 2, y → 1, x → 0
                let vol: usize = dims.iter().product();
                for v in &mut offsets[ch * vol..(ch + 1) * vol] {
                    *v = -*v;
                }
            }
            View::Rot(k) => {
                let back = (4 - k % 4) % 4;
                *scores = rot90(scores, nc, dims, back);
                let mut o = rot90(offsets, 3, dims, back);
                let vol: usize = dims.iter().product();
                // One turn maps a tile displacement (dy, dx) to (dx, -dy) in the rotated frame, so
                // an offset (ox', oy') predicted there is (-oy', ox') here; apply it k times.
                for _ in 0..k % 4 {
                    let (ox, rest) = o.split_at_mut(vol);
                    let oy = &mut rest[..vol];
                    for (x, y) in ox.iter_mut().zip(oy.iter_mut()) {
                        let (nx, ny) = (-*y, *x);
                        *x = nx;
                        *y = ny;
                    }
                }
                *offsets = o;
            }
        }
    }
}

impl Ensemble {
    /// Averaged scores and offsets of every model and view for a batch of tiles `[n, 1, window]`.
    pub fn infer(&mut self, tiles: &[f32], n: usize, window: [usize; 3], tta: Tta) -> Result<(Vec<f32>, Vec<f32>)> {
        let out_dims = window.map(|l| l / self.stride);
        let tile_len: usize = window.iter().product();
        let vol: usize = out_dims.iter().product();
        let nc = self.num_classes;
        let mut acc_s = vec![0.0f32; n * nc * vol];
        let mut acc_o = vec![0.0f32; n * 3 * vol];
        let vs = views(tta);
        let count = (vs.len() * self.engines.len()) as f32;
        for view in vs {
            let input: Vec<f32> = (0..n).flat_map(|b| view.forward(&tiles[b * tile_len..(b + 1) * tile_len], window)).collect();
            for e in self.engines.iter_mut() {
                let out = e.forward(&input, n, window, false)?;
                for b in 0..n {
                    let mut s = out.scores[b * nc * vol..(b + 1) * nc * vol].to_vec();
                    let mut o = out.offsets[b * 3 * vol..(b + 1) * 3 * vol].to_vec();
                    view.inverse(&mut s, &mut o, nc, out_dims);
                    for (a, v) in acc_s[b * nc * vol..].iter_mut().zip(&s) {
                        *a += v;
                    }
                    for (a, v) in acc_o[b * 3 * vol..].iter_mut().zip(&o) {
                        *a += v;
                    }
                }
            }
        }
        if count > 1.0 {
            acc_s.iter_mut().for_each(|v| *v /= count);
            acc_o.iter_mut().for_each(|v| *v /= count);
        }
        Ok((acc_s, acc_o))
    }

    /// The GPU all engines run on, when every one is a CUDA engine on the same device.
    pub fn cuda_device(&mut self) -> Option<Arc<Gpu>> {
        let mut gpu: Option<Arc<Gpu>> = None;
        for e in self.engines.iter_mut() {
            let g = e.as_cuda()?.gpu_arc();
            match &gpu {
                Some(first) if !Arc::ptr_eq(first, &g) => return None,
                Some(_) => {}
                None => gpu = Some(g),
            }
        }
        gpu
    }

    /// The device whose volume input the device path would use (`cuda_device`, with every network
    /// taking one input channel): where a volume may be uploaded ahead (`Prepared::upload`).
    pub fn volume_device(&mut self) -> Option<Arc<Gpu>> {
        let gpu = self.cuda_device()?;
        self.engines.iter_mut().all(|e| e.as_cuda().is_some_and(|c| c.input_channels() == 1)).then_some(gpu)
    }

    /// `infer` with the outputs left on the device, averaged into `acc`'s batch buffers: the same
    /// sums in the same order (views outer, models inner, then one division). Every engine must be
    /// a CUDA engine on `acc`'s device. With `BatchInput::Device` every model (and view) reads the
    /// one copy of the batch cut on the device; with `BatchInput::Host` each model uploads the
    /// host tiles itself (`CudaEngine::forward_device`).
    fn infer_device(&mut self, acc: &mut TomogramAccumulator, mut input: BatchInput, n: usize, window: [usize; 3], tta: Tta) -> Result<()> {
        let tile_len: usize = window.iter().product();
        acc.begin_batch(n)?;
        let vs = views(tta);
        let count = vs.len() * self.engines.len();
        for view in vs {
            match &mut input {
                BatchInput::Host(tiles) => {
                    let input: Vec<f32> = (0..n).flat_map(|b| view.forward(&tiles[b * tile_len..(b + 1) * tile_len], window)).collect();
                    for e in self.engines.iter_mut() {
                        let cuda = e.as_cuda().context("internal error: device blending with a non-CUDA engine")?;
                        let out = cuda.forward_device(&input, n, window, false)?;
                        let r = acc.accumulate(&out, view.kernel_code());
                        // Recycled once the accumulate is issued: the pool's reuse is ordered after it.
                        cuda.recycle(out);
                        r?;
                    }
                }
                BatchInput::Device(dv) => {
                    if dv.batch() != n {
                        bail!("internal error: {} tiles on the device for a batch of {n}", dv.batch());
                    }
                    let x = dv.view(view.kernel_code())?;
                    for e in self.engines.iter_mut() {
                        let cuda = e.as_cuda().context("internal error: device blending with a non-CUDA engine")?;
                        let out = cuda.forward_device_input(x, n, window, false)?;
                        let r = acc.accumulate(&out, view.kernel_code());
                        cuda.recycle(out);
                        r?;
                    }
                }
            }
        }
        acc.average(count)
    }
}

/// A batch's network input for `Ensemble::infer_device`.
enum BatchInput<'a> {
    /// Tiles `[n, 1, window]` cut on the host.
    Host(&'a [f32]),
    /// Tiles cut from the volume on the device (`DeviceVolume::extract` done for this batch).
    Device(&'a mut DeviceVolume),
}

/// What the caller did to a volume before `predict_and_detect`.
#[derive(Default)]
pub struct Prepared {
    /// Already normalised (`normalize_unit_range`); the runner does not do it again.
    pub normalized: bool,
    /// Its copy to the device, already issued (`SideUploader::upload` of the normalised volume,
    /// on the device of `Ensemble::volume_device`); used when the device path takes the volume
    /// whole, and else dropped.
    pub upload: Option<PendingVolume>,
}

/// Normalises `volume` in place and returns the blended maps; `progress(done, total)` after each batch.
/// With `s.device_blend` and every engine a CUDA engine on one device, the averaging and blending
/// run there (the same f32 operations in the same order, so the same maps given the same model
/// outputs); otherwise, or when the device has no room for the accumulators, on the host. On the
/// device path the normalised volume is uploaded once and each batch's tiles (and test-time
/// augmentation views) are cut there, one copy read by every model; when the volume does not fit
/// (or a network takes more than one input channel), the tiles are cut on the host and each model
/// uploads them.
pub fn predict_maps(
    ens: &mut Ensemble,
    volume: &mut [f32],
    shape: [usize; 3],
    s: &Settings,
    progress: &mut dyn FnMut(usize, usize),
    timing: &mut Timing,
) -> Result<Maps> {
    predict_maps_with(ens, volume, shape, s, progress, timing, true, Prepared::default())
}

/// `predict_maps` of a volume the caller has `prepared`, as `predict_and_detect` takes it.
pub fn predict_prepared_maps(
    ens: &mut Ensemble,
    volume: &mut [f32],
    shape: [usize; 3],
    s: &Settings,
    progress: &mut dyn FnMut(usize, usize),
    timing: &mut Timing,
    prepared: Prepared,
) -> Result<Maps> {
    predict_maps_with(ens, volume, shape, s, progress, timing, true, prepared)
}

/// `predict_maps`; `device_input: false` cuts the tiles on the host on the device path too (tests).
#[allow(clippy::too_many_arguments)]
fn predict_maps_with(
    ens: &mut Ensemble,
    volume: &mut [f32],
    shape: [usize; 3],
    s: &Settings,
    progress: &mut dyn FnMut(usize, usize),
    timing: &mut Timing,
    device_input: bool,
    prepared: Prepared,
) -> Result<Maps> {
    match predict_blended(ens, volume, shape, s, progress, timing, device_input, prepared)? {
        Blended::Host(maps) => Ok(maps),
        Blended::Device(mut acc) => read_device_maps(&mut acc, timing),
    }
}

/// `predict_maps` followed by `detect_maps`, with the same detections, and the maps when
/// `want_maps`. On the device path (see `predict_maps`) the first stage of detection (peaks and
/// thresholds) runs on the device too and only the candidates are read back, so the maps are
/// read back only when asked for. Detection (candidate extraction included) counts as
/// `timing.detect`. `prepared`: what the caller already did to the volume (`Prepared::default()`:
/// nothing; `fastdet run`'s reader thread normalises it and issues its upload while the previous
/// volume is computed).
#[allow(clippy::too_many_arguments)]
pub fn predict_and_detect(
    ens: &mut Ensemble,
    volume: &mut [f32],
    shape: [usize; 3],
    s: &Settings,
    progress: &mut dyn FnMut(usize, usize),
    timing: &mut Timing,
    want_maps: bool,
    prepared: Prepared,
) -> Result<(Vec<Detection>, Option<Maps>)> {
    predict_and_detect_with(ens, volume, shape, s, progress, timing, want_maps, true, CANDIDATE_CAPACITY, prepared)
}

#[allow(clippy::too_many_arguments)]
fn predict_and_detect_with(
    ens: &mut Ensemble,
    volume: &mut [f32],
    shape: [usize; 3],
    s: &Settings,
    progress: &mut dyn FnMut(usize, usize),
    timing: &mut Timing,
    want_maps: bool,
    device_input: bool,
    capacity: usize,
    prepared: Prepared,
) -> Result<(Vec<Detection>, Option<Maps>)> {
    let stride = ens.stride;
    let maps = match predict_blended(ens, volume, shape, s, progress, timing, device_input, prepared)? {
        Blended::Host(maps) => maps,
        Blended::Device(mut acc) => {
            let t = Instant::now();
            match acc.candidates_with_capacity(&s.thresholds, capacity) {
                Ok(cands) => {
                    let dets = detect_from_candidates(cands, acc.dims(), s.iou_threshold, s.pre_nms_top_k, stride, &sigmas_for(s.voxel_size));
                    timing.detect += t.elapsed().as_secs_f64();
                    let maps = if want_maps { Some(read_device_maps(&mut acc, timing)?) } else { None };
                    return Ok((dets, maps));
                }
                Err(e) if e.downcast_ref::<OutOfMemory>().is_some() => {
                    crate::errln!("  the detection candidates do not fit on the device ({e:#}); detecting on the host");
                    timing.detect += t.elapsed().as_secs_f64();
                    read_device_maps(&mut acc, timing)?
                }
                Err(e) => return Err(e),
            }
        }
    };
    let t = Instant::now();
    let dets = detect_maps(&maps, s, stride);
    timing.detect += t.elapsed().as_secs_f64();
    Ok((dets, want_maps.then_some(maps)))
}

/// The maps blended on the device, read back (timed as blending).
fn read_device_maps(acc: &mut TomogramAccumulator, timing: &mut Timing) -> Result<Maps> {
    let t = Instant::now();
    let maps = acc.read_maps()?;
    timing.blend += t.elapsed().as_secs_f64();
    Ok(maps)
}

/// Blended maps: on the host, or finished on the device (`predict_maps`). One per tomogram, so
/// its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Blended {
    Host(Maps),
    Device(TomogramAccumulator),
}

#[allow(clippy::too_many_arguments)]
fn predict_blended(
    ens: &mut Ensemble,
    volume: &mut [f32],
    shape: [usize; 3],
    s: &Settings,
    progress: &mut dyn FnMut(usize, usize),
    timing: &mut Timing,
    device_input: bool,
    prepared: Prepared,
) -> Result<Blended> {
    if s.tta == Tta::Rot90 && s.window[1] != s.window[2] {
        bail!("--tta rot90 needs a square yx window, got {:?}", s.window);
    }
    let Prepared { normalized, mut upload } = prepared;
    if !normalized {
        normalize_unit_range(volume);
    }
    let grid = TileGrid::new(shape, s.window, s.tiles);
    let origins = grid.origins();
    if s.device_blend {
        if let Some(gpu) = ens.cuda_device() {
            match TomogramAccumulator::new(gpu.clone(), ens.num_classes, shape, s.window, ens.stride, s.blend_sigma) {
                Ok(mut acc) => {
                    let one_channel = ens.volume_device().is_some();
                    let ahead = upload.take().filter(|u| device_input && one_channel && u.is_for(&gpu) && u.voxels() == volume.len());
                    let mut dv = if let Some(u) = ahead {
                        timing.upload_overlapped = true;
                        timing.upload += u.issue_s();
                        Some(DeviceVolume::from_upload(gpu.clone(), u, shape, s.window)?)
                    } else if device_input && one_channel {
                        // Waited for on both sides (the accumulators' zeroing before), so that
                        // the copy is timed on its own.
                        gpu.sync("zeroing the blend accumulators")?;
                        let t = Instant::now();
                        match DeviceVolume::new(gpu.clone(), volume, shape, s.window).and_then(|v| gpu.sync("uploading the volume").map(|()| v)) {
                            Ok(v) => {
                                timing.upload += t.elapsed().as_secs_f64();
                                Some(v)
                            }
                            Err(e) if e.downcast_ref::<OutOfMemory>().is_some() => {
                                crate::errln!("  the volume does not fit on the device ({e:#}); cutting the tiles on the host");
                                None
                            }
                            Err(e) => return Err(e),
                        }
                    } else {
                        None
                    };
                    let host_volume = if dv.is_some() { None } else { Some(&*volume) };
                    for_each_batch(host_volume, shape, s, &origins, progress, timing, |chunk, tiles, timing| {
                        let t0 = Instant::now();
                        let r = match dv.as_mut() {
                            Some(dv) => dv.extract(chunk, s.tta != Tta::None).and_then(|()| ens.infer_device(&mut acc, BatchInput::Device(&mut *dv), chunk.len(), s.window, s.tta)),
                            None => ens.infer_device(&mut acc, BatchInput::Host(tiles), chunk.len(), s.window, s.tta),
                        };
                        if let (Err(_), Some(dv)) = (&r, dv.as_mut()) {
                            // A retry in halves should not find this batch's buffers still held.
                            dv.release_batch();
                        }
                        r?;
                        // Synchronised per stage so that the timing splits (and kernel faults are
                        // reported) per batch.
                        acc.sync("ensemble on the device")?;
                        let t1 = Instant::now();
                        acc.blend(chunk)?;
                        acc.sync("blending on the device")?;
                        timing.infer += (t1 - t0).as_secs_f64();
                        timing.blend += t1.elapsed().as_secs_f64();
                        Ok(())
                    })?;
                    drop(dv);
                    let t = Instant::now();
                    acc.finish_device()?;
                    timing.blend += t.elapsed().as_secs_f64();
                    return Ok(Blended::Device(acc));
                }
                Err(e) if e.downcast_ref::<OutOfMemory>().is_some() => {
                    crate::errln!("  the blend accumulators do not fit on the device ({e:#}); blending on the host");
                }
                Err(e) => return Err(e),
            }
        }
    }
    // A volume uploaded ahead is of no use on the host path: its device memory goes back now.
    drop(upload);
    let mut blender = Blender::new(ens.num_classes, shape, s.window, ens.stride, s.blend_sigma);
    let out_vol: usize = s.window.map(|l| l / ens.stride).iter().product();
    let nc = ens.num_classes;
    for_each_batch(Some(volume), shape, s, &origins, progress, timing, |chunk, tiles, timing| {
        let t0 = Instant::now();
        let (sc, of) = ens.infer(tiles, chunk.len(), s.window, s.tta)?;
        let t1 = Instant::now();
        for (i, o) in chunk.iter().enumerate() {
            blender.add_tile(*o, &sc[i * nc * out_vol..(i + 1) * nc * out_vol], &of[i * 3 * out_vol..(i + 1) * 3 * out_vol]);
        }
        timing.infer += (t1 - t0).as_secs_f64();
        timing.blend += t1.elapsed().as_secs_f64();
        Ok(())
    })?;
    let t = Instant::now();
    let maps = blender.finish();
    timing.blend += t.elapsed().as_secs_f64();
    Ok(Blended::Host(maps))
}

/// Hands the tiles at `origins` to `step` batch by batch (`s.batch` per call), extracted on the
/// host from `volume` when it is given (else `step` gets an empty slice and cuts them itself);
/// when `step` runs out of device memory, the same tiles again in halves, down to one tile per
/// call. `step` must leave nothing half done when it fails that way.
fn for_each_batch(
    volume: Option<&[f32]>,
    shape: [usize; 3],
    s: &Settings,
    origins: &[[usize; 3]],
    progress: &mut dyn FnMut(usize, usize),
    timing: &mut Timing,
    mut step: impl FnMut(&[[usize; 3]], &[f32], &mut Timing) -> Result<()>,
) -> Result<()> {
    let tile_len: usize = s.window.iter().product();
    let mut batch = s.batch.max(1);
    let mut tiles = vec![0.0f32; if volume.is_some() { batch * tile_len } else { 0 }];
    let mut done = 0;
    while done < origins.len() {
        let chunk = &origins[done..(done + batch).min(origins.len())];
        let t0 = Instant::now();
        let host = match volume {
            Some(volume) => {
                for (i, o) in chunk.iter().enumerate() {
                    extract_tile(volume, shape, *o, s.window, &mut tiles[i * tile_len..(i + 1) * tile_len]);
                }
                &tiles[..chunk.len() * tile_len]
            }
            None => &tiles[..0],
        };
        timing.infer += t0.elapsed().as_secs_f64();
        match step(chunk, host, timing) {
            Ok(()) => {}
            Err(e) if batch > 1 && e.downcast_ref::<OutOfMemory>().is_some() => {
                batch /= 2;
                crate::errln!("  out of memory with {} tiles per call; retrying with {batch}", chunk.len());
                continue;
            }
            Err(e) => return Err(e),
        }
        done += chunk.len();
        progress(done, origins.len());
    }
    Ok(())
}

/// Peaks → thresholds → greedy NMS with the settings' parameters.
pub fn detect_maps(maps: &Maps, s: &Settings, stride: usize) -> Vec<Detection> {
    detect(maps, &s.thresholds, s.iou_threshold, s.pre_nms_top_k, stride, &sigmas_for(s.voxel_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cuda::{gpu::Gpu, ConvBackend, CudaEngine};
    use crate::engine::Outputs;
    use crate::model::spec::ModelSpec;
    use crate::weights::Weights;

    /// `shape` voxels uniform in [0, 1) from `seed`.
    fn random_volume(shape: [usize; 3], seed: u64) -> Vec<f32> {
        let mut vol = vec![0.0; shape.iter().product()];
        crate::util::SplitMix64::new(seed).fill_uniform(&mut vol, 0.0, 1.0);
        vol
    }

    /// One CUDA engine per weights file on `gpu` (the kernel emulator in these tests).
    fn cuda_engines(gpu: &Arc<Gpu>, weights: &[Weights]) -> Vec<Box<dyn TileEngine>> {
        weights.iter().map(|w| Box::new(CudaEngine::on(gpu.clone(), w, ConvBackend::Auto).unwrap()) as Box<dyn TileEngine>).collect()
    }

    /// An engine that is exactly equivariant under flips and yx rotations: scores = 2x2x2 mean of
    /// the input, offsets = central differences of those means (a vector field).
    struct Equivariant;

    impl TileEngine for Equivariant {
        fn forward(&mut self, input: &[f32], n: usize, tile: [usize; 3], _: bool) -> Result<Outputs> {
            let [d, h, w] = tile.map(|l| l / 2);
            let vol = d * h * w;
            let mut scores = vec![0.0; n * vol];
            let mut offsets = vec![0.0; n * 3 * vol];
            for b in 0..n {
                let t = &input[b * 8 * vol..];
                let m = |z: usize, y: usize, x: usize| {
                    let mut s = 0.0;
                    for dz in 0..2 {
                        for dy in 0..2 {
                            for dx in 0..2 {
                                s += t[((2 * z + dz) * tile[1] + 2 * y + dy) * tile[2] + 2 * x + dx];
                            }
                        }
                    }
                    s / 8.0
                };
                let g = |z: isize, y: isize, x: isize| {
                    if z < 0 || y < 0 || x < 0 || z >= d as isize || y >= h as isize || x >= w as isize {
                        0.0
                    } else {
                        m(z as usize, y as usize, x as usize)
                    }
                };
                for z in 0..d as isize {
                    for y in 0..h as isize {
                        for x in 0..w as isize {
                            let i = ((z as usize * h) + y as usize) * w + x as usize;
                            scores[b * vol + i] = g(z, y, x);
                            offsets[b * 3 * vol + i] = g(z, y, x + 1) - g(z, y, x - 1);
                            offsets[b * 3 * vol + vol + i] = g(z, y + 1, x) - g(z, y - 1, x);
                            offsets[b * 3 * vol + 2 * vol + i] = g(z + 1, y, x) - g(z - 1, y, x);
                        }
                    }
                }
            }
            Ok(Outputs { scores, offsets, fm2: None })
        }
        fn name(&self) -> String {
            "equivariant".into()
        }
    }

    #[test]
    fn tta_views_invert_exactly_for_an_equivariant_model() {
        let mut ens = Ensemble { engines: vec![Box::new(Equivariant)], num_classes: 1, stride: 2 };
        let window = [4, 6, 6];
        let mut r = crate::util::SplitMix64::new(3);
        let mut tile = vec![0.0; 4 * 36];
        r.fill_uniform(&mut tile, 0.0, 1.0);
        let (s0, o0) = ens.infer(&tile, 1, window, Tta::None).unwrap();
        for tta in [Tta::Flip, Tta::Rot90] {
            let (s, o) = ens.infer(&tile, 1, window, tta).unwrap();
            let ds = s.iter().zip(&s0).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            let dof = o.iter().zip(&o0).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(ds < 1e-6 && dof < 1e-6, "{tta:?}: {ds} {dof}");
        }
        // And a non-trivial check that the offsets are not all zero.
        assert!(o0.iter().any(|v| v.abs() > 0.01));
    }

    /// Fails with OutOfMemory above `limit` tiles per call, else scores = tile mean.
    struct Small {
        limit: usize,
        calls: Vec<usize>,
    }

    impl TileEngine for Small {
        fn forward(&mut self, input: &[f32], n: usize, tile: [usize; 3], _: bool) -> Result<Outputs> {
            self.calls.push(n);
            if n > self.limit {
                return Err(OutOfMemory(format!("{n} tiles")).into());
            }
            let vol = tile.iter().map(|l| l / 2).product::<usize>();
            let len: usize = tile.iter().product();
            let scores = (0..n).flat_map(|b| {
                let m = input[b * len..(b + 1) * len].iter().sum::<f32>() / len as f32;
                std::iter::repeat_n(m, vol)
            });
            Ok(Outputs { scores: scores.collect(), offsets: vec![0.0; n * 3 * vol], fm2: None })
        }
        fn name(&self) -> String {
            "small".into()
        }
    }

    #[test]
    fn out_of_memory_halves_the_batch_and_gives_the_same_maps() {
        let shape = [4, 16, 16];
        let vol = random_volume(shape, 5);
        let run = |batch: usize, limit: usize| {
            let mut ens = Ensemble { engines: vec![Box::new(Small { limit, calls: vec![] })], num_classes: 1, stride: 2 };
            let s = Settings { window: [4, 8, 8], tiles: [1, 3, 3], batch, ..Settings::default() };
            let mut v = vol.clone();
            let maps = predict_maps(&mut ens, &mut v, shape, &s, &mut |_, _| {}, &mut Timing::default()).unwrap();
            maps.scores
        };
        let reference = run(1, 1);
        assert_eq!(run(8, 2), reference);
        assert_eq!(run(9, 9), reference);
        // A failure at batch 1 is reported, not retried forever.
        let mut ens = Ensemble { engines: vec![Box::new(Small { limit: 0, calls: vec![] })], num_classes: 1, stride: 2 };
        let s = Settings { window: [4, 8, 8], tiles: [1, 3, 3], batch: 4, ..Settings::default() };
        let e = predict_maps(&mut ens, &mut vol.clone(), shape, &s, &mut |_, _| {}, &mut Timing::default()).unwrap_err();
        assert!(e.to_string().contains("out of device memory"), "{e}");
    }

    /// A tomogram with overlapping tiles and a tile past the end (z = 12 < window 16) through an
    /// ensemble of 2 CUDA engines on the kernel emulator, without and with test-time augmentation:
    /// blending on the device gives the host path's maps bit for bit (the kernels repeat the
    /// host's f32 operations in its order, and both paths see the same engine outputs), hence the
    /// same detections, whether the tiles (and their views) are cut on the device from the volume
    /// uploaded once or on the host and uploaded by every model. Cut on the device, nothing but
    /// the volume and a few small tables goes to the device: less than one tile's upload.
    #[test]
    fn device_blend_on_emulator_matches_host_blend() {
        let gpu = Gpu::emulator().unwrap();
        let weights = [Weights::random(&ModelSpec::segresnet(8, 16, 8), 11), Weights::random(&ModelSpec::dynunet(&[8, 16, 32], 16, 16, 8), 12)];
        let engines = || cuda_engines(&gpu, &weights);
        let shape = [12, 37, 41];
        let vol = random_volume(shape, 9);
        let nc = weights[0].spec.num_classes;
        let window = [16, 24, 24];
        let tile_bytes = (window.iter().product::<usize>() * 4) as u64;
        let volume_bytes = (vol.len() * 4) as u64;
        for (batch, tta, nviews) in [(2, Tta::None, 1), (2, Tta::Flip, 4), (1, Tta::None, 1), (1, Tta::Flip, 4), (2, Tta::Rot90, 4)] {
            let s = Settings { window, tiles: [1, 2, 3], batch, tta, thresholds: vec![0.3; nc], ..Settings::default() };
            // (device_blend, device_input) → maps, timing, bytes copied to the device.
            let run = |device_blend: bool, device_input: bool| {
                let mut ens = Ensemble { engines: engines(), num_classes: nc, stride: 2 };
                let s = Settings { device_blend, ..s.clone() };
                let mut timing = Timing::default();
                let mut calls = 0;
                let sent = gpu.bytes_to_device();
                let maps = predict_maps_with(&mut ens, &mut vol.clone(), shape, &s, &mut |_, _| calls += 1, &mut timing, device_input, Prepared::default()).unwrap();
                assert_eq!(calls, 6usize.div_ceil(batch));
                (maps, timing, gpu.bytes_to_device() - sent)
            };
            let (host, _, _) = run(false, true);
            let live = gpu.memory_live();
            let (uploaded, cut_on_host, per_model) = run(true, false);
            let (dev, timing, shared) = run(true, true);
            assert_eq!(gpu.memory_live(), live, "the device accumulators and volume are freed with the tomogram");
            assert!(timing.infer > 0.0 && timing.blend > 0.0, "{timing:?}");
            // The volume's copy is timed on its own; with tiles cut on the host there is none.
            assert!(timing.upload > 0.0 && cut_on_host.upload == 0.0, "{timing:?} {cut_on_host:?}");
            assert_eq!(dev.dims, [6, 18, 20]);
            let d = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            let (ds, dof) = (d(&dev.scores, &host.scores), d(&dev.offsets, &host.offsets));
            crate::errln!("batch {batch} {tta:?}: max |d| scores {ds:e}, offsets {dof:e}; to the device {per_model} B cut on the host, {shared} B cut on the device");
            assert!(dev == host, "batch {batch} {tta:?}: the maps differ (max |d| scores {ds:e}, offsets {dof:e})");
            assert!(uploaded == host, "batch {batch} {tta:?}: host-cut tiles on the device path differ");
            assert!(host.offsets.iter().any(|v| *v != 0.0));
            // Every model uploads every view of every tile, or nothing but the volume (and the
            // blend weights and tile origins) does.
            assert!(per_model >= 2 * nviews * 6 * tile_bytes, "{per_model}");
            assert!(shared >= volume_bytes && shared < volume_bytes + tile_bytes, "{shared}");
            let (dh, dd) = (detect_maps(&host, &s, 2), detect_maps(&dev, &s, 2));
            assert!(!dh.is_empty());
            assert_eq!(format!("{dh:?}"), format!("{dd:?}"));
        }
    }

    /// `predict_and_detect` on the device path (candidates extracted on the device, maps not read
    /// back) gives exactly the detections of `detect_maps` on the host-blended maps: a 2-model
    /// ensemble, overlapping tiles with a partial edge tile, a constant region (plateaus), a class
    /// with threshold 0 (every cell a candidate, ties at score 0 cut by top-K), an empty class,
    /// and a first candidate pass too small for them (the second pass).
    #[test]
    fn device_detection_on_emulator_matches_host_detection() {
        let gpu = Gpu::emulator().unwrap();
        let weights = [Weights::random(&ModelSpec::segresnet(8, 16, 8), 21), Weights::random(&ModelSpec::dynunet(&[8, 16, 32], 16, 16, 8), 22)];
        let engines = || cuda_engines(&gpu, &weights);
        let shape = [12, 37, 41];
        let mut vol = random_volume(shape, 4);
        // A constant block: equal model outputs there, so plateaus of equal scores.
        for z in 0..shape[0] {
            for y in 0..20 {
                for x in 0..22 {
                    vol[(z * shape[1] + y) * shape[2] + x] = 0.5;
                }
            }
        }
        let nc = weights[0].spec.num_classes;
        let mut thresholds = vec![0.3f32; nc];
        thresholds[0] = 0.0;
        thresholds[1] = 1e30;
        let base = Settings { window: [16, 24, 24], tiles: [1, 2, 3], batch: 2, thresholds, pre_nms_top_k: 500, ..Settings::default() };
        for (tta, capacity) in [(Tta::None, CANDIDATE_CAPACITY), (Tta::Flip, 7)] {
            let s = Settings { tta, ..base.clone() };
            let mut ens = Ensemble { engines: engines(), num_classes: nc, stride: 2 };
            let host = predict_maps(&mut ens, &mut vol.clone(), shape, &Settings { device_blend: false, ..s.clone() }, &mut |_, _| {}, &mut Timing::default()).unwrap();
            let want = detect_maps(&host, &s, 2);
            let maps_bytes = ((host.scores.len() + host.offsets.len()) * 4) as u64;
            let s = Settings { device_blend: true, ..s };
            let live = gpu.memory_live();
            for want_maps in [false, true] {
                let mut timing = Timing::default();
                let read = gpu.bytes_to_host();
                let (dets, maps) = predict_and_detect_with(&mut ens, &mut vol.clone(), shape, &s, &mut |_, _| {}, &mut timing, want_maps, true, capacity, Prepared::default()).unwrap();
                let read = gpu.bytes_to_host() - read;
                assert_eq!(gpu.memory_live(), live, "device buffers are freed with the tomogram");
                assert!(timing.detect > 0.0, "{timing:?}");
                assert_eq!(dets, want, "{tta:?} capacity {capacity} want_maps {want_maps}");
                match maps {
                    Some(m) => {
                        assert!(want_maps && m == host);
                        assert!(read >= maps_bytes);
                    }
                    None => {
                        assert!(!want_maps);
                        // Candidates only (index, score, 3 offsets: 20 B each; class 0 has every
                        // cell) and the totals (once per pass).
                        let cands: usize = (0..nc).map(|c| crate::pipeline::detect::class_candidates(&host, c, s.thresholds[c]).len()).sum();
                        let cand_bytes = 20 * cands as u64;
                        assert!(read >= cand_bytes && read <= cand_bytes + 8 * nc as u64 && read < maps_bytes, "{read} B read back, {cands} candidates, maps {maps_bytes} B");
                    }
                }
            }
            let per_class = |c: usize| want.iter().filter(|d| d.class == c).count();
            assert!(per_class(0) > 1 && per_class(0) <= 500);
            assert!(want.iter().filter(|d| d.class == 0).any(|d| d.score == 0.0), "class 0 keeps ties at score 0");
            assert_eq!(per_class(1), 0);
            assert!((2..nc).filter(|&c| per_class(c) > 1).count() >= 2, "{:?}", (0..nc).map(per_class).collect::<Vec<_>>());
        }
    }

    /// A volume normalised and uploaded ahead (by another thread, as `fastdet run`'s reader does)
    /// gives the same detections and maps as the runner's own normalisation and upload; an upload
    /// the device path cannot take (another volume's, or host blending) is dropped unused, and the
    /// device memory comes back either way.
    #[test]
    fn a_volume_uploaded_ahead_gives_the_same_detections_and_maps() {
        use crate::engine::cuda::SideUploader;
        let gpu = Gpu::emulator().unwrap();
        let weights = [Weights::random(&ModelSpec::segresnet(8, 16, 8), 31), Weights::random(&ModelSpec::dynunet(&[8, 16, 32], 16, 16, 8), 32)];
        let nc = weights[0].spec.num_classes;
        let shape = [12, 37, 41];
        let raw: Vec<f32> = random_volume(shape, 9).iter().map(|v| 3.0 * v - 1.0).collect();
        let s = Settings { window: [16, 24, 24], tiles: [1, 2, 3], batch: 2, tta: Tta::Flip, thresholds: vec![0.3; nc], device_blend: true, ..Settings::default() };
        let mut ens = Ensemble { engines: cuda_engines(&gpu, &weights), num_classes: nc, stride: 2 };
        assert!(ens.volume_device().is_some_and(|g| Arc::ptr_eq(&g, &gpu)));
        let mut timing = Timing::default();
        let (want, want_maps) = predict_and_detect(&mut ens, &mut raw.clone(), shape, &s, &mut |_, _| {}, &mut timing, true, Prepared::default()).unwrap();
        assert!(!want.is_empty() && !timing.upload_overlapped && timing.upload > 0.0, "{timing:?}");

        let mut normalized = raw.clone();
        normalize_unit_range(&mut normalized);
        let mut up = SideUploader::new(gpu.clone()).unwrap();
        let live = gpu.memory_live();
        let ahead = |up: &mut SideUploader, v: &[f32]| std::thread::scope(|t| t.spawn(|| up.upload(v)).join().unwrap()).unwrap();
        // (The second upload is of a volume one voxel shorter.)
        for (what, used, skip) in [("uploaded ahead", true, 0), ("another volume's upload", false, 1)] {
            let upload = ahead(&mut up, &normalized[skip..]);
            let mut timing = Timing::default();
            let sent = gpu.bytes_to_device();
            let prepared = Prepared { normalized: true, upload: Some(upload) };
            let (dets, maps) = predict_and_detect(&mut ens, &mut normalized.clone(), shape, &s, &mut |_, _| {}, &mut timing, true, prepared).unwrap();
            assert_eq!(dets, want, "{what}");
            assert!(maps == want_maps, "{what}");
            assert_eq!(timing.upload_overlapped, used, "{what}: {timing:?}");
            // The volume goes up once: ahead, or now.
            let now = gpu.bytes_to_device() - sent;
            assert_eq!(now >= (normalized.len() * 4) as u64, !used, "{what}: {now} B sent now");
            assert_eq!(gpu.memory_live(), live, "{what}: the uploaded volume is freed with the tomogram");
        }
        let host = Settings { device_blend: false, ..s.clone() };
        let prepared = Prepared { normalized: true, upload: Some(ahead(&mut up, &normalized)) };
        let (dets, _) = predict_and_detect(&mut ens, &mut normalized.clone(), shape, &host, &mut |_, _| {}, &mut Timing::default(), false, prepared).unwrap();
        assert_eq!(dets.len(), want.len());
        assert_eq!(gpu.memory_live(), live);
    }

    /// A volume that does not fit on the device next to the accumulators: the tiles are cut on
    /// the host and uploaded by each model (the previous device path), with the same maps.
    #[test]
    fn device_blend_cuts_tiles_on_the_host_when_the_volume_does_not_fit() {
        let gpu = Gpu::emulator().unwrap();
        let w = Weights::random(&ModelSpec::segresnet(8, 16, 8), 7);
        let nc = w.spec.num_classes;
        let shape = [16, 128, 128];
        let vol = random_volume(shape, 12);
        let s = Settings { window: [16, 16, 16], tiles: [1, 2, 2], batch: 2, device_blend: true, ..Settings::default() };
        let run = |device_input: bool| {
            let mut ens = Ensemble { engines: cuda_engines(&gpu, std::slice::from_ref(&w)), num_classes: nc, stride: 2 };
            gpu.reset_memory_peak();
            let sent = gpu.bytes_to_device();
            let maps = predict_maps_with(&mut ens, &mut vol.clone(), shape, &s, &mut |_, _| {}, &mut Timing::default(), device_input, Prepared::default()).unwrap();
            (maps, gpu.memory_peak(), gpu.bytes_to_device() - sent)
        };
        let (want, peak, per_model) = run(false);
        let (shared_maps, shared_peak, shared) = run(true);
        assert!(shared_maps == want);
        assert!(shared_peak > peak + 64 * 1024, "{peak} {shared_peak}");
        let tile_bytes = 16 * 16 * 16 * 4;
        assert!(shared >= (vol.len() * 4) as u64 && per_model >= 4 * tile_bytes && per_model < (vol.len() * 4) as u64, "{shared} {per_model}");
        // Room for the previous path but not for the volume too.
        gpu.set_emulated_memory_limit(peak + 64 * 1024);
        let (got, got_peak, sent) = run(true);
        gpu.set_emulated_memory_limit(usize::MAX);
        assert!(got == want);
        assert_eq!((got_peak, sent), (peak, per_model));
    }

    /// Out of device memory on the device path: the batch is retried in halves (the tomogram's
    /// accumulators are only touched once a batch's models have all run) with the same maps.
    #[test]
    fn device_blend_halves_the_batch_when_out_of_memory() {
        let gpu = Gpu::emulator().unwrap();
        let w = Weights::random(&ModelSpec::segresnet(8, 16, 8), 4);
        let nc = w.spec.num_classes;
        let shape = [16, 40, 40];
        let vol = random_volume(shape, 6);
        let run = |batch: usize, device_blend: bool| {
            let mut ens = Ensemble { engines: cuda_engines(&gpu, std::slice::from_ref(&w)), num_classes: nc, stride: 2 };
            let s = Settings { window: [16, 16, 16], tiles: [1, 2, 2], batch, device_blend, ..Settings::default() };
            let mut calls = 0;
            // Each run from an empty activation arena (it outlives the engines on the handle).
            gpu.arena().release();
            gpu.reset_memory_peak();
            let maps = predict_maps(&mut ens, &mut vol.clone(), shape, &s, &mut |_, _| calls += 1, &mut Timing::default());
            (maps, calls, gpu.memory_peak())
        };
        let (want, _, _) = run(1, false);
        let (_, _, p1) = run(1, true);
        let (_, _, p2) = run(2, true);
        assert!(p2 > p1 + 64 * 1024, "{p1} {p2}");
        // Room for one tile per call, not two: 4 → 2 → 1.
        gpu.set_emulated_memory_limit((p1 + p2) / 2);
        let (got, calls, _) = run(4, true);
        gpu.set_emulated_memory_limit(usize::MAX);
        assert_eq!(calls, 4, "one progress call per tile after the halving");
        assert!(got.unwrap() == want.unwrap());
    }

    /// device_blend with an engine that is not a CUDA engine (or engines on different devices)
    /// blends on the host, with the host's result.
    #[test]
    fn device_blend_falls_back_to_the_host_without_one_cuda_device() {
        let shape = [4, 16, 16];
        let vol = random_volume(shape, 5);
        let w = Weights::random(&ModelSpec::segresnet(8, 16, 8), 3);
        let nc = w.spec.num_classes;
        let cpu = |w: &Weights| Box::new(crate::engine::cpu::CpuEngine::new(w).unwrap()) as Box<dyn TileEngine>;
        let emu = |w: &Weights| Box::new(CudaEngine::on(Gpu::emulator().unwrap(), w, ConvBackend::Auto).unwrap()) as Box<dyn TileEngine>;
        let run = |engines: Vec<Box<dyn TileEngine>>, device_blend: bool| {
            let num_classes = if engines[0].name() == "small" { 1 } else { nc };
            let mut ens = Ensemble { engines, num_classes, stride: 2 };
            assert!(ens.cuda_device().is_none());
            let s = Settings { window: [8, 8, 8], tiles: [1, 3, 3], batch: 2, device_blend, ..Settings::default() };
            predict_maps(&mut ens, &mut vol.clone(), shape, &s, &mut |_, _| {}, &mut Timing::default()).unwrap()
        };
        assert_eq!(run(vec![cpu(&w), cpu(&w)], true), run(vec![cpu(&w), cpu(&w)], false));
        assert_eq!(run(vec![Box::new(Small { limit: 9, calls: vec![] })], true), run(vec![Box::new(Small { limit: 9, calls: vec![] })], false));
        // A CUDA engine next to a CPU one, and two emulators (two devices).
        assert_eq!(run(vec![emu(&w), cpu(&w)], true), run(vec![emu(&w), cpu(&w)], false));
        assert_eq!(run(vec![emu(&w), emu(&w)], true), run(vec![emu(&w), emu(&w)], false));
    }

    #[test]
    fn rot90_matches_numpy_convention() {
        // numpy.rot90([[0,1],[2,3]]) == [[1,3],[0,2]]
        let a = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(rot90(&a, 1, [1, 2, 2], 1), vec![1.0, 3.0, 0.0, 2.0]);
        assert_eq!(rot90(&a, 1, [1, 2, 2], 4), a.to_vec());
    }
}
