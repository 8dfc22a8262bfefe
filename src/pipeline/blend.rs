//! Weighted blending of per-tile network outputs onto the stride-2 grid of the whole volume,
//! with the reference semantics (`tile_weight` and the accumulation in `predict_maps` of
//! `shared/reference/pipeline.py`). Layouts are C-order `[C, D, H, W]`, storage f32.

use rayon::prelude::*;

/// Per-voxel tile weight on the stride grid of a window, shape `grid = [d, h, w]`:
/// `exp(-r / sigma²)³` with `r = sqrt((i - d/2)² + (j - h/2)² + (k - w/2)²)`, integer indices and
/// float centres, computed in f64 and rounded to f32 (the reference's `tile_weight`).
pub fn tile_weight(grid: [usize; 3], sigma: f64) -> Vec<f32> {
    let c = [grid[0] as f64 / 2.0, grid[1] as f64 / 2.0, grid[2] as f64 / 2.0];
    let s2 = sigma * sigma;
    let mut out = Vec::with_capacity(grid[0] * grid[1] * grid[2]);
    for i in 0..grid[0] {
        let di = i as f64 - c[0];
        for j in 0..grid[1] {
            let dj = j as f64 - c[1];
            for k in 0..grid[2] {
                let dk = k as f64 - c[2];
                let r = ((di * di + dj * dj) + dk * dk).sqrt();
                out.push((-r / s2).exp().powf(3.0) as f32);
            }
        }
    }
    out
}

/// What to say when `--blend-sigma` is so small that the tile weight rounds to 0 in f32 at some
/// of the tile's cells (`grid`, the window on the stride grid): a cell that only such weights
/// cover gets score 0, and no pick (the reference computes the same).
pub fn vanishing_weight_warning(grid: [usize; 3], sigma: f64) -> Option<String> {
    let zero = tile_weight(grid, sigma).iter().filter(|&&w| w == 0.0).count();
    let n: usize = grid.iter().product();
    (zero > 0).then(|| {
        format!(
            "--blend-sigma {sigma}: the tile weight rounds to 0 at {zero} of the tile's {n} cells (the farthest from its centre); where no other tile covers a cell better it gets score 0 and no pick (seed: 15)"
        )
    })
}

/// Blended maps of a whole volume on the stride grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Maps {
    pub num_classes: usize,
    /// `[D / stride, H / stride, W / stride]`.
    pub dims: [usize; 3],
    /// Class scores `[num_classes, dims...]`.
    pub scores: Vec<f32>,
    /// Offsets `[3, dims...]`, channels x, y, z, in voxels.
    pub offsets: Vec<f32>,
}

impl Maps {
    /// Elements per channel (`dims` product).
    pub fn channel_len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Score channel `c`.
    pub fn class_scores(&self, c: usize) -> &[f32] {
        let n = self.channel_len();
        &self.scores[c * n..(c + 1) * n]
    }

    /// The maps of the `dims` corner at the origin (no axis longer than now), every channel:
    /// the grid of the unpadded volume, for a volume padded at its ends.
    pub fn cropped(self, dims: [usize; 3]) -> Maps {
        let n = self.channel_len();
        let crop = |v: &[f32]| v.chunks(n).flat_map(|c| crate::pipeline::tiling::crop_volume(c, self.dims, dims)).collect::<Vec<f32>>();
        Maps { num_classes: self.num_classes, dims, scores: crop(&self.scores), offsets: crop(&self.offsets) }
    }
}

/// Accumulates weighted tile outputs: `acc += out * w`, `counter += w` (f32 product, then f32
/// add, as numpy does), then `finish` divides.
#[derive(Debug, Clone)]
pub struct Blender {
    num_classes: usize,
    dims: [usize; 3],
    tile: [usize; 3],
    stride: usize,
    weight: Vec<f32>,
    scores: Vec<f32>,
    offsets: Vec<f32>,
    counter: Vec<f32>,
}

impl Blender {
    /// Accumulators for a volume `volume_shape = [D, H, W]`; tiles of `window` voxels give network
    /// outputs of `window / stride` cells, weighted by `tile_weight(window / stride, sigma)`.
    pub fn new(
        num_classes: usize,
        volume_shape: [usize; 3],
        window: [usize; 3],
        stride: usize,
        sigma: f64,
    ) -> Self {
        assert!(stride > 0, "Blender: stride must be > 0");
        let dims = volume_shape.map(|l| l / stride);
        let tile = window.map(|w| w / stride);
        let n: usize = dims.iter().product();
        Blender {
            num_classes,
            dims,
            tile,
            stride,
            weight: tile_weight(tile, sigma),
            scores: vec![0.0; num_classes * n],
            offsets: vec![0.0; 3 * n],
            counter: vec![0.0; n],
        }
    }

    /// Accumulator grid `[D / stride, H / stride, W / stride]`.
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// Shape of one tile's output per channel: `window / stride`.
    pub fn tile_dims(&self) -> [usize; 3] {
        self.tile
    }

    /// The tile weight (shape `tile_dims()`).
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }

    /// Add one tile's output. `origin_voxel` is the tile's start in voxels (it lands at
    /// `origin / stride`); `scores` is `[C, tile_dims]`, `offsets` `[3, tile_dims]`. The tile
    /// (and its weight) is cropped to what fits in the accumulators.
    pub fn add_tile(&mut self, origin_voxel: [usize; 3], scores: &[f32], offsets: &[f32]) {
        let tn: usize = self.tile.iter().product();
        assert_eq!(scores.len(), self.num_classes * tn, "add_tile: scores length");
        assert_eq!(offsets.len(), 3 * tn, "add_tile: offsets length");
        let r = origin_voxel.map(|o| o / self.stride);
        let v = [0, 1, 2].map(|a| self.tile[a].min(self.dims[a].saturating_sub(r[a])));
        if v.contains(&0) {
            return;
        }
        let n: usize = self.dims.iter().product();
        if n == 0 || tn == 0 {
            return;
        }
        let (dims, tile, weight) = (self.dims, self.tile, &self.weight);
        let add = |acc: &mut [f32], out: &[f32]| {
            for z in 0..v[0] {
                for y in 0..v[1] {
                    let a0 = ((r[0] + z) * dims[1] + r[1] + y) * dims[2] + r[2];
                    let t0 = (z * tile[1] + y) * tile[2];
                    let acc = &mut acc[a0..a0 + v[2]];
                    let out = &out[t0..t0 + v[2]];
                    let w = &weight[t0..t0 + v[2]];
                    for ((a, &o), &w) in acc.iter_mut().zip(out).zip(w) {
                        *a += o * w;
                    }
                }
            }
        };
        // Counter: += weight (same cropping).
        for z in 0..v[0] {
            for y in 0..v[1] {
                let a0 = ((r[0] + z) * dims[1] + r[1] + y) * dims[2] + r[2];
                let t0 = (z * tile[1] + y) * tile[2];
                for (c, &w) in self.counter[a0..a0 + v[2]].iter_mut().zip(&weight[t0..t0 + v[2]]) {
                    *c += w;
                }
            }
        }
        // Channels are independent: parallel and deterministic.
        self.scores
            .par_chunks_mut(n)
            .zip(scores.par_chunks(tn))
            .chain(self.offsets.par_chunks_mut(n).zip(offsets.par_chunks(tn)))
            .for_each(|(acc, out)| add(acc, out));
    }

    /// `acc / counter`, 0 where `counter == 0` (f32 division).
    pub fn finish(self) -> Maps {
        let n: usize = self.dims.iter().product();
        let Blender { num_classes, dims, mut scores, mut offsets, counter, .. } = self;
        if n > 0 {
            let counter = &counter;
            scores
                .par_chunks_mut(n)
                .chain(offsets.par_chunks_mut(n))
                .for_each(|ch| {
                    for (a, &c) in ch.iter_mut().zip(counter) {
                        *a = if c > 0.0 { *a / c } else { 0.0 };
                    }
                });
        }
        Maps { num_classes, dims, scores, offsets }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vanishing_weights_are_named() {
        // The seed's window on the stride-2 grid: corners at r = sqrt(48² + 32² + 32²) ≈ 66.
        assert_eq!(vanishing_weight_warning([96, 64, 64], 15.0), None);
        assert_eq!(vanishing_weight_warning([96, 64, 64], 1.5), None);
        let w = vanishing_weight_warning([96, 64, 64], 1.0).unwrap();
        let zero = tile_weight([96, 64, 64], 1.0).iter().filter(|&&x| x == 0.0).count();
        assert!(zero > 0 && w.contains(&format!("at {zero} of the tile's 393216 cells")), "{w}");
    }

    #[test]
    fn weight_values() {
        let w = tile_weight([96, 64, 64], 15.0);
        assert_eq!(w.len(), 96 * 64 * 64);
        // centre (48, 32, 32): r = 0
        assert_eq!(w[(48 * 64 + 32) * 64 + 32], 1.0);
        // corner (0,0,0): r = sqrt(48² + 32² + 32²); numpy gives 0.41495057940483093 (f32)
        assert_eq!(w[0], 0.414_950_58_f32);
        let want = ((-(4352f64).sqrt() / 225.0).exp().powf(3.0)) as f32;
        assert_eq!(w[0], want);
        // (47, 32, 34): r = sqrt(1 + 0 + 4); numpy 0.9706258177757263
        assert_eq!(w[(47 * 64 + 32) * 64 + 34], 0.970_625_8_f32);
        // odd size: centres are float: (1.5, 0.5, 0.5)
        let w = tile_weight([3, 1, 1], 1.0);
        let e = |r2: f64| ((-r2.sqrt()).exp().powf(3.0)) as f32;
        assert_eq!(w, vec![e(2.75), e(0.75), e(0.75)]);
    }

    #[test]
    fn blend_two_overlapping_tiles() {
        // 1 class, volume [2, 2, 8] voxels → grid [1, 1, 4]; window [2, 2, 4] → tile [1, 1, 2].
        let mut b = Blender::new(1, [2, 2, 8], [2, 2, 4], 2, 1.0);
        let w = b.weight().to_vec();
        // centre (0.5, 0.5, 1): k=0 → r = sqrt(.25+.25+1) ; k=1 → r = sqrt(.5)
        let e = |r2: f64| ((-r2.sqrt()).exp().powf(3.0)) as f32;
        assert_eq!(w, vec![e(1.5), e(0.5)]);
        // tile A at voxel x=0 → cells 0,1 ; tile B at voxel x=2 → cells 1,2
        b.add_tile([0, 0, 0], &[1.0, 2.0], &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
        b.add_tile([0, 0, 2], &[3.0, 4.0], &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        let m = b.finish();
        assert_eq!(m.dims, [1, 1, 4]);
        let (w0, w1) = (w[0], w[1]);
        let cell1 = (2.0f32 * w1 + 3.0 * w0) / (w1 + w0);
        assert_eq!(m.scores, vec![(1.0 * w0) / w0, cell1, (4.0 * w1) / w1, 0.0]);
        assert_eq!(m.scores[0], 1.0);
        assert_eq!(m.scores[2], 4.0);
        // offsets channel y (index 1): cells 0, 1
        let oy1 = (0.4f32 * w1 + 1.0 * w0) / (w1 + w0);
        assert_eq!(&m.offsets[4..8], &[(0.3f32 * w0) / w0, oy1, 1.0, 0.0]);
    }

    #[test]
    fn blend_crops_past_end() {
        // volume D = 3 → grid 1; window 4 → tile 2: second z-plane of the tile is dropped.
        let mut b = Blender::new(2, [3, 2, 2], [4, 2, 2], 2, 15.0);
        assert_eq!(b.dims(), [1, 1, 1]);
        assert_eq!(b.tile_dims(), [2, 1, 1]);
        let w = b.weight()[0];
        b.add_tile([0, 0, 0], &[0.5, 9.0, 0.25, 9.0], &[1.0, 9.0, 2.0, 9.0, 3.0, 9.0]);
        let m = b.finish();
        let f = |x: f32| (x * w) / w; // f32 product then division, e.g. 3.0 → 2.9999998
        assert_eq!(m.scores, vec![f(0.5), f(0.25)]);
        assert_eq!(m.offsets, vec![f(1.0), f(2.0), f(3.0)]);
        assert_eq!(m.class_scores(1), &[f(0.25)]);
    }
}
