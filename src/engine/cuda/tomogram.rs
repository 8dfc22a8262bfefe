//! A whole tomogram's blended maps kept on the device: the ensemble (and test-time augmentation)
//! average of each batch of tiles and the weighted blending of those tiles, so per-tile outputs
//! never go back to the host; `finish` reads the finished maps once. `DeviceVolume` is the input
//! side: the normalised volume uploaded once, each batch's tiles (and views) cut from it on the
//! device and read by every model.
//!
//! CPU twins, with the same f32 operations in the same order (so the maps equal the host
//! pipeline's bit for bit given the same model outputs):
//! - `accumulate` / `average`: `pipeline::runner::Ensemble::infer` (acc starts at 0, one add per
//!   (view, model) output with views outer and models inner, then a division by the count when
//!   it is > 1), via `ensemble_accumulate_view_f32` and `ensemble_divide_f32`;
//! - `blend`: `pipeline::blend::Blender::add_tile` over the batch's tiles in order, via
//!   `blend_tiles_f32` (one thread per cell, tiles in order, no atomics);
//! - `finish`: `Blender::finish`, via `blend_finish_f32`;
//! - `candidates`: the first stage of `pipeline::detect::detect` (`class_candidates`: peaks,
//!   threshold, ascending flat index) on the finished maps, via `nms.cu`, so that only the
//!   candidates (index, score, offsets) go back to the host; `pipeline::detect::
//!   detect_from_candidates` does the rest there.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::engine::DeviceOutputs;
use super::gpu::{DevBuf, Gpu};
use super::side_upload::PendingVolume;
use super::ops::{self, vol};
use crate::pipeline::blend::{tile_weight, Maps};
use crate::pipeline::detect::Candidate;

/// Device accumulators of one tomogram (`Blender`'s) plus the ensemble sums of the current batch.
pub struct TomogramAccumulator {
    gpu: Arc<Gpu>,
    num_classes: usize,
    /// Accumulator grid: volume / stride.
    dims: [usize; 3],
    /// One tile's output grid: window / stride.
    tile: [usize; 3],
    stride: usize,
    weight: DevBuf,
    acc_s: DevBuf,
    acc_o: DevBuf,
    counter: DevBuf,
    /// Ensemble sums `[n, C, tile]` / `[n, 3, tile]` of the current batch (`Ensemble::infer`'s
    /// acc_s / acc_o) and its tile origins in cells `[n, 3]` i32; they hold `cap` tiles.
    ens_s: Option<DevBuf>,
    ens_o: Option<DevBuf>,
    origins: Option<DevBuf>,
    cap: usize,
    /// Tiles in the current batch.
    n: usize,
    /// Whether `acc_s` / `acc_o` hold the finished maps (`finish_device` ran).
    finished: bool,
}

/// Candidates per class the first `candidates` pass makes room for (more: a second pass).
pub const CANDIDATE_CAPACITY: usize = 1 << 16;

impl TomogramAccumulator {
    /// Zeroed accumulators for a volume `volume_shape` tiled by `window` (arguments as `Blender::new`).
    pub fn new(gpu: Arc<Gpu>, num_classes: usize, volume_shape: [usize; 3], window: [usize; 3], stride: usize, sigma: f64) -> Result<Self> {
        if stride == 0 {
            bail!("TomogramAccumulator: stride must be > 0");
        }
        gpu.bind()?;
        let dims = volume_shape.map(|l| l / stride);
        let tile = window.map(|w| w / stride);
        let g = vol(dims);
        let zeroed = |len: usize| -> Result<DevBuf> {
            let b = gpu.alloc(len * 4)?;
            gpu.zero(b.ptr, len * 4)?;
            Ok(b)
        };
        let acc_s = zeroed(num_classes * g)?;
        let acc_o = zeroed(3 * g)?;
        let counter = zeroed(g)?;
        let weight = gpu.upload(&tile_weight(tile, sigma))?;
        Ok(TomogramAccumulator { gpu, num_classes, dims, tile, stride, weight, acc_s, acc_o, counter, ens_s: None, ens_o: None, origins: None, cap: 0, n: 0, finished: false })
    }

    /// Accumulator grid `[D / stride, H / stride, W / stride]`.
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// Starts a batch of `n` tiles: zeroed ensemble sums. Allocates here (before any model runs)
    /// so that an out-of-memory error leaves the tomogram's accumulators untouched and the batch
    /// can be retried in halves.
    pub fn begin_batch(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            bail!("TomogramAccumulator: an empty batch");
        }
        if self.finished {
            bail!("TomogramAccumulator: a batch after the blend was finished");
        }
        let tv = vol(self.tile);
        if n > self.cap {
            // Old buffers go first so that they do not count twice against the device.
            (self.ens_s, self.ens_o, self.origins, self.cap) = (None, None, None, 0);
            self.ens_s = Some(self.gpu.alloc(n * self.num_classes * tv * 4)?);
            self.ens_o = Some(self.gpu.alloc(n * 3 * tv * 4)?);
            self.origins = Some(self.gpu.alloc(n * 3 * 4)?);
            self.cap = n;
        }
        self.n = n;
        let (s, o) = self.ens();
        self.gpu.zero(s, n * self.num_classes * tv * 4)?;
        self.gpu.zero(o, n * 3 * tv * 4)
    }

    fn ens(&self) -> (u64, u64) {
        match (&self.ens_s, &self.ens_o) {
            (Some(s), Some(o)) => (s.ptr, o.ptr),
            _ => (0, 0),
        }
    }

    /// Adds one model's outputs for the batch, mapped back from `view` (kernel view codes: 0 plain,
    /// 1..3 flips of z, y, x, 4..6 rot90 k = 1..3 in the yx plane); CPU twin: the inner loop of
    /// `Ensemble::infer` (`View::inverse`, then `acc += ...`).
    pub fn accumulate(&mut self, out: &DeviceOutputs, view: usize) -> Result<()> {
        if self.n == 0 {
            bail!("TomogramAccumulator::accumulate before begin_batch");
        }
        if out.n != self.n || out.num_classes != self.num_classes || out.offset_channels != 3 || out.dims != self.tile {
            bail!(
                "model outputs [{}, {}+{}, {:?}] do not fit the batch [{}, {}+3, {:?}]",
                out.n,
                out.num_classes,
                out.offset_channels,
                out.dims,
                self.n,
                self.num_classes,
                self.tile
            );
        }
        let (s, o) = self.ens();
        ops::ensemble_accumulate_view(&self.gpu, s, out.scores.ptr, self.n, self.num_classes, self.tile, view, false)?;
        ops::ensemble_accumulate_view(&self.gpu, o, out.offsets.ptr, self.n, 3, self.tile, view, true)
    }

    /// Divides the batch's sums by `count` (the number of (view, model) outputs added) when it is
    /// > 1; CPU twin: the end of `Ensemble::infer`.
    pub fn average(&mut self, count: usize) -> Result<()> {
        if count > 1 {
            let tv = vol(self.tile);
            let (s, o) = self.ens();
            ops::ensemble_divide(&self.gpu, s, self.n * self.num_classes * tv, count as f32)?;
            ops::ensemble_divide(&self.gpu, o, self.n * 3 * tv, count as f32)?;
        }
        Ok(())
    }

    /// Blends the batch's averaged tiles, whose voxel origins are `origins` (in tile order), into
    /// the tomogram; CPU twin: `Blender::add_tile` for each tile in order.
    pub fn blend(&mut self, origins: &[[usize; 3]]) -> Result<()> {
        if origins.len() != self.n {
            bail!("TomogramAccumulator::blend: {} origins for a batch of {}", origins.len(), self.n);
        }
        let cells: Vec<[usize; 3]> = origins.iter().map(|o| o.map(|x| x / self.stride)).collect();
        // The box the batch covers, clipped to the grid (the kernel crops each tile to it).
        let lo = [0, 1, 2].map(|a| cells.iter().map(|c| c[a]).min().unwrap_or(0).min(self.dims[a]));
        let hi = [0, 1, 2].map(|a| cells.iter().map(|c| c[a] + self.tile[a]).max().unwrap_or(0).min(self.dims[a]));
        let size = [0, 1, 2].map(|a| hi[a].saturating_sub(lo[a]));
        self.n = 0;
        if vol(size) == 0 {
            return Ok(());
        }
        // Origins are at most the grid's extents, which blend_tiles checks against i32.
        let org: Vec<i32> = cells.iter().flat_map(|c| c.map(|x| x.min(i32::MAX as usize) as i32)).collect();
        let optr = self.origins.as_ref().map(|b| b.ptr).unwrap_or(0);
        // Stream-ordered: this write lands after the previous batch's blend has read the buffer.
        self.gpu.write(optr, &org)?;
        let (s, o) = self.ens();
        ops::blend_tiles(&self.gpu, self.acc_s.ptr, self.acc_o.ptr, self.counter.ptr, self.num_classes, self.dims, s, o, self.weight.ptr, optr, cells.len(), self.tile, lo, size)
    }

    /// Waits for the work issued so far; errors name `what`.
    pub fn sync(&self, what: &str) -> Result<()> {
        self.gpu.sync(what)
    }

    /// `acc / counter` (0 where nothing landed), read back once; CPU twin: `Blender::finish`.
    pub fn finish(mut self) -> Result<Maps> {
        self.read_maps()
    }

    /// Finishes the blend on the device (`acc / counter`, once); no more tiles may be blended.
    pub fn finish_device(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        let g = vol(self.dims);
        ops::blend_finish(&self.gpu, self.acc_s.ptr, self.counter.ptr, self.num_classes, g)?;
        ops::blend_finish(&self.gpu, self.acc_o.ptr, self.counter.ptr, 3, g)?;
        self.gpu.sync("blending on the device")?;
        self.finished = true;
        Ok(())
    }

    /// The finished maps (`finish_device` first), read back; the accumulator stays usable for
    /// `candidates`.
    pub fn read_maps(&mut self) -> Result<Maps> {
        self.finish_device()?;
        let g = vol(self.dims);
        let scores = self.gpu.read::<f32>(self.acc_s.ptr, self.num_classes * g)?;
        let offsets = self.gpu.read::<f32>(self.acc_o.ptr, 3 * g)?;
        Ok(Maps { num_classes: self.num_classes, dims: self.dims, scores, offsets })
    }

    /// The detection candidates of every class of the finished maps (`finish_device` first):
    /// `[c]` = `pipeline::detect::class_candidates(&maps, c, thresholds[c])`, the same values in
    /// the same order (ascending flat index), computed on the device; only they are read back.
    pub fn candidates(&mut self, thresholds: &[f32]) -> Result<Vec<Vec<Candidate>>> {
        self.candidates_with_capacity(thresholds, CANDIDATE_CAPACITY)
    }

    /// `candidates`, with room for `capacity` candidates per class in the first pass (tests).
    pub fn candidates_with_capacity(&mut self, thresholds: &[f32], capacity: usize) -> Result<Vec<Vec<Candidate>>> {
        let nc = self.num_classes;
        if thresholds.len() < nc {
            bail!("candidates: {} thresholds for {nc} classes", thresholds.len());
        }
        self.finish_device()?;
        let cells = vol(self.dims);
        if nc == 0 || cells == 0 {
            return Ok(vec![Vec::new(); nc]);
        }
        let g = &self.gpu;
        let thr = g.upload(&thresholds[..nc])?;
        let nblk = ops::nms_blocks(cells);
        let counts = g.alloc(nc * nblk * 4)?;
        let offs = g.alloc(nc * nblk * 4)?;
        let totals = g.alloc(nc * 4)?;
        let mut cap = capacity.clamp(1, cells);
        let (tot, idx, sc, of) = loop {
            let idx = g.alloc(nc * cap * 4)?;
            let sc = g.alloc(nc * cap * 4)?;
            ops::nms(g, self.acc_s.ptr, nc, self.dims, thr.ptr, counts.ptr, offs.ptr, totals.ptr, cap, idx.ptr, sc.ptr)?;
            let tot: Vec<u32> = g.read(totals.ptr, nc)?;
            let most = tot.iter().copied().max().unwrap_or(0) as usize;
            if most <= cap {
                let of = g.alloc(nc * cap * 3 * 4)?;
                ops::nms_gather_offsets(g, self.acc_o.ptr, cells, nc, totals.ptr, cap, idx.ptr, of.ptr)?;
                break (tot, idx, sc, of);
            }
            // Too many candidates for the first pass: again, with room for all of them.
            drop((idx, sc));
            cap = most;
        };
        g.sync("detection candidates on the device")?;
        let mut out = Vec::with_capacity(nc);
        for (c, &t) in tot.iter().enumerate() {
            let t = t as usize;
            let base = (c * cap) as u64;
            let index: Vec<u32> = g.read(idx.ptr + base * 4, t)?;
            let score: Vec<f32> = g.read(sc.ptr + base * 4, t)?;
            let offset: Vec<f32> = g.read(of.ptr + base * 12, 3 * t)?;
            out.push(
                (0..t)
                    .map(|k| Candidate { index: index[k] as usize, score: score[k], offset: [offset[3 * k], offset[3 * k + 1], offset[3 * k + 2]] })
                    .collect(),
            );
        }
        Ok(out)
    }
}

/// Voxels converted per step when a volume is stored (16 MiB of f32 staging).
pub const STAGING_VOXELS: usize = 1 << 22;

/// A tomogram's normalised volume on the device (uploaded once) and the current batch's network
/// input cut from it there, shared by every model of the ensemble: `ops::extract_tiles` writes
/// the tiles straight into the engines' input layout (`[n, window]` fp16 = NDHWC with one
/// channel; `CudaEngine::forward_device_input`). CPU twin: `pipeline::tiling::extract_tile`
/// (zero past the volume's end) followed by the engine's conversion of its input to fp16, so the
/// models see the same fp16 values as with host tiles.
///
/// The volume is kept in fp16 (2 bytes a voxel: 139 MiB less than f32 for the seed's 184x630x630),
/// rounded once on the device as it arrives (`f32_to_f16`, through an f32 staging buffer of at
/// most `STAGING_VOXELS`): the tiles cut from it are exactly the fp16 values the engine would
/// make of host tiles.
///
/// Test-time augmentation views are made on the device too (`view`): fp16 tiles → f32 (exact),
/// the view's permutation through `ensemble_accumulate_view_f32` into zeros (`0 + x == x`; the
/// normalised volume has no negative zeros), → fp16 (exact, the values came from fp16): the same
/// values as the host's `View::forward` of the f32 tiles then converted to fp16.
pub struct DeviceVolume {
    gpu: Arc<Gpu>,
    volume: DevBuf,
    shape: [usize; 3],
    window: [usize; 3],
    /// Tile origins `[cap, 3]` i32, the plain tiles `[cap, window]` fp16 and, once a view other
    /// than the plain one was asked for, f32 staging `[cap, window]` x 2 and the view's fp16 tiles.
    origins: Option<DevBuf>,
    tiles: Option<DevBuf>,
    views: Option<(DevBuf, DevBuf, DevBuf)>,
    cap: usize,
    /// Tiles in the current batch.
    n: usize,
}

impl DeviceVolume {
    /// Uploads `volume` (`shape`, z-major f32, already normalised) for tiles of `window` voxels.
    /// An `OutOfMemory` error here means the volume does not fit: the caller cuts tiles on the host.
    pub fn new(gpu: Arc<Gpu>, volume: &[f32], shape: [usize; 3], window: [usize; 3]) -> Result<Self> {
        if volume.len() != vol(shape) {
            bail!("DeviceVolume: {} voxels for a volume of {shape:?}", volume.len());
        }
        gpu.bind()?;
        let half = gpu.alloc(volume.len() * 2)?;
        let staging = gpu.alloc(volume.len().clamp(1, STAGING_VOXELS) * 4)?;
        let mut done = 0;
        for chunk in volume.chunks(STAGING_VOXELS) {
            // Stream-ordered: each copy lands after the previous chunk's conversion has read it.
            gpu.write(staging.ptr, chunk)?;
            ops::f32_to_f16(&gpu, staging.ptr, half.ptr + 2 * done as u64, chunk.len())?;
            done += chunk.len();
        }
        Ok(DeviceVolume { gpu, volume: half, shape, window, origins: None, tiles: None, views: None, cap: 0, n: 0 })
    }

    /// The volume whose copy `SideUploader::upload` issued (the same fp16 bits as `new` makes of
    /// the same f32 volume); the handle's stream waits for that copy before anything reads it.
    pub fn from_upload(gpu: Arc<Gpu>, upload: PendingVolume, shape: [usize; 3], window: [usize; 3]) -> Result<Self> {
        if !upload.is_for(&gpu) {
            bail!("DeviceVolume: the volume was uploaded for another device handle");
        }
        if upload.voxels() != vol(shape) {
            bail!("DeviceVolume: {} voxels uploaded for a volume of {shape:?}", upload.voxels());
        }
        gpu.bind()?;
        let volume = upload.wait()?;
        Ok(DeviceVolume { gpu, volume, shape, window, origins: None, tiles: None, views: None, cap: 0, n: 0 })
    }

    /// Cuts the tiles at the voxel origins `origins` (a batch, in order) into the plain input.
    /// Allocates before anything runs, so an out-of-memory error leaves nothing half done. `tta`:
    /// whether views other than the plain one will be asked for (their buffers are allocated here too).
    pub fn extract(&mut self, origins: &[[usize; 3]], tta: bool) -> Result<()> {
        let n = origins.len();
        if n == 0 {
            bail!("DeviceVolume: an empty batch");
        }
        let wv = vol(self.window);
        if n > self.cap || (tta && self.views.is_none()) {
            // Old buffers go first so that they do not count twice against the device; the new
            // ones are kept only when all of them fit.
            self.release_batch();
            let origins = self.gpu.alloc(n * 3 * 4)?;
            let tiles = self.gpu.alloc(n * wv * 2)?;
            let views = if tta { Some((self.gpu.alloc(n * wv * 4)?, self.gpu.alloc(n * wv * 4)?, self.gpu.alloc(n * wv * 2)?)) } else { None };
            (self.origins, self.tiles, self.views, self.cap) = (Some(origins), Some(tiles), views, n);
        }
        self.n = 0;
        // The kernel reads i32 origins; the extents are checked against i32 by extract_tiles, and an
        // origin past them only yields zeros.
        let org: Vec<i32> = origins.iter().flat_map(|o| o.map(|x| x.min(i32::MAX as usize) as i32)).collect();
        let (optr, tptr) = (self.origins.as_ref().map_or(0, |b| b.ptr), self.tiles.as_ref().map_or(0, |b| b.ptr));
        // Stream-ordered: lands after the previous batch's extraction has read the buffer.
        self.gpu.write(optr, &org)?;
        ops::extract_tiles(&self.gpu, self.volume.ptr, self.shape, optr, n, self.window, tptr)?;
        self.n = n;
        Ok(())
    }

    /// The fp16 volume on the device (tests).
    #[cfg(test)]
    pub(super) fn volume_ptr(&self) -> u64 {
        self.volume.ptr
    }

    /// Tiles in the current batch.
    pub fn batch(&self) -> usize {
        self.n
    }

    /// Frees the batch buffers (the volume stays), e.g. before a batch is retried in halves.
    pub fn release_batch(&mut self) {
        (self.origins, self.tiles, self.views, self.cap, self.n) = (None, None, None, 0, 0);
    }

    /// The batch's network input `[n, window]` fp16 seen through `view` (kernel view codes as
    /// `TomogramAccumulator::accumulate`: 0 plain, 1..3 flips of z, y, x, 4..6 rot90 k = 1..3 in
    /// the yx plane; this applies the view itself, not its inverse). View 0 is the extracted tiles.
    pub fn view(&mut self, view: usize) -> Result<&DevBuf> {
        if self.n == 0 {
            bail!("DeviceVolume::view before extract");
        }
        let tiles = self.tiles.as_ref().expect("allocated by extract");
        if view == 0 {
            return Ok(tiles);
        }
        // The kernel applies a view's inverse: flips are their own, rot90 k is undone by rot90 4 - k.
        let inverse_of = match view {
            1..=3 => view,
            4..=6 => 10 - view,
            _ => bail!("DeviceVolume::view: view {view} (0..=6)"),
        };
        let Some((plain, turned, out)) = &self.views else { bail!("DeviceVolume::view: extract was not told about views") };
        let (n, wv) = (self.n, vol(self.window));
        ops::to_ncdhw_f32(&self.gpu, tiles.ptr, plain.ptr, n, 1, wv)?;
        self.gpu.zero(turned.ptr, n * wv * 4)?;
        ops::ensemble_accumulate_view(&self.gpu, turned.ptr, plain.ptr, n, 1, self.window, inverse_of, false)?;
        ops::to_ndhwc_f16(&self.gpu, turned.ptr, out.ptr, n, 1, wv)?;
        Ok(out)
    }
}
