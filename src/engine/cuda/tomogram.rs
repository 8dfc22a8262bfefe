//! A whole tomogram's blended maps kept on the device: the ensemble (and test-time augmentation)
//! average of each batch of tiles and the weighted blending of those tiles, so per-tile outputs
//! never go back to the host; `finish` reads the finished maps once.
//!
//! CPU twins, with the same f32 operations in the same order (so the maps equal the host
//! pipeline's bit for bit given the same model outputs):
//! - `accumulate` / `average`: `pipeline::runner::Ensemble::infer` (acc starts at 0, one add per
//!   (view, model) output with views outer and models inner, then a division by the count when
//!   it is > 1), via `ensemble_accumulate_view_f32` and `ensemble_divide_f32`;
//! - `blend`: `pipeline::blend::Blender::add_tile` over the batch's tiles in order, via
//!   `blend_tiles_f32` (one thread per cell, tiles in order, no atomics);
//! - `finish`: `Blender::finish`, via `blend_finish_f32`.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::engine::DeviceOutputs;
use super::gpu::{DevBuf, Gpu};
use super::ops::{self, vol};
use crate::pipeline::blend::{tile_weight, Maps};

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
}

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
        Ok(TomogramAccumulator { gpu, num_classes, dims, tile, stride, weight, acc_s, acc_o, counter, ens_s: None, ens_o: None, origins: None, cap: 0, n: 0 })
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
    pub fn finish(self) -> Result<Maps> {
        let g = vol(self.dims);
        ops::blend_finish(&self.gpu, self.acc_s.ptr, self.counter.ptr, self.num_classes, g)?;
        ops::blend_finish(&self.gpu, self.acc_o.ptr, self.counter.ptr, 3, g)?;
        self.gpu.sync("blending on the device")?;
        let scores = self.gpu.read::<f32>(self.acc_s.ptr, self.num_classes * g)?;
        let offsets = self.gpu.read::<f32>(self.acc_o.ptr, 3 * g)?;
        Ok(Maps { num_classes: self.num_classes, dims: self.dims, scores, offsets })
    }
}
