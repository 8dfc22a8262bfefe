//! Volume normalisation and sliding-window tiling, with the reference semantics
//! (`unit_range`, `tile_starts` and the tile loop of `predict_maps` in
//! `shared/reference/pipeline.py`). All layouts are C-order `[D, H, W]` (z, y, x).

use rayon::prelude::*;

/// NaN-propagating min / max in f64 (numpy's `min`/`max` return NaN if any element is NaN).
fn nan_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Normalise a volume to [0, 1] in place: `(v - min) / max(v - min)`, computed in f64 and
/// rounded to f32, exactly like the reference `unit_range`.
///
/// A constant volume (max of `v - min` equal to 0) becomes all zeros instead of dividing by 0.
/// A NaN anywhere makes min/max NaN and therefore the whole output NaN, as in numpy.
/// An empty slice is left alone.
pub fn normalize_unit_range(v: &mut [f32]) {
    if v.is_empty() {
        return;
    }
    // min / max are exact (order-independent) reductions, so the parallel result is deterministic.
    let min = v
        .par_iter()
        .fold(|| f64::INFINITY, |m, &x| nan_min(m, x as f64))
        .reduce(|| f64::INFINITY, nan_min);
    let max = v
        .par_iter()
        .fold(|| f64::NEG_INFINITY, |m, &x| nan_max(m, x as f64 - min))
        .reduce(|| f64::NEG_INFINITY, nan_max);
    if max == 0.0 {
        v.par_iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    v.par_iter_mut()
        .for_each(|x| *x = ((*x as f64 - min) / max) as f32);
}

/// Window starts along one axis: `numpy.linspace(0, length - window, n, dtype=int)`.
///
/// Computed the way numpy does it: `step = (stop - start) / (n - 1)` in f64, value `i * step`
/// (or `i / (n-1) * delta` when the step is 0), the last value forced to `stop`, then floor
/// (truncation toward zero, all values are >= 0 here).
///
/// * `n == 0` → `[]` (numpy gives an empty array); `n == 1` → `[0]`.
/// * `length < window` → `[0]` (the only start; the tile is zero-padded at the end). numpy would
///   give negative starts for n > 1; the SPEC fixes this case to a single start.
/// * `length == window` → numpy semantics are kept: `n` starts, all 0.
/// * Duplicates are **not** removed (e.g. `linspace(0, 2, 9)` → `0,0,0,0,1,1,1,1,2`): the reference
///   runs every duplicate tile and blends it once per occurrence, and so do we.
pub fn tile_starts(length: usize, window: usize, n: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    if length < window || n == 1 {
        return vec![0];
    }
    let stop = (length - window) as f64;
    let div = (n - 1) as f64;
    let step = stop / div;
    let mut out: Vec<usize> = (0..n)
        .map(|i| {
            let y = if step == 0.0 {
                (i as f64 / div) * stop
            } else {
                i as f64 * step
            };
            y.floor() as usize
        })
        .collect();
    out[n - 1] = length - window;
    out
}

/// Tile origins of a volume: per-axis starts (z, y, x) and the window size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileGrid {
    /// Starts per axis, in voxels: `[z starts, y starts, x starts]`.
    pub starts: [Vec<usize>; 3],
    /// Window `[Dw, Hw, Ww]` in voxels.
    pub window: [usize; 3],
}

impl TileGrid {
    /// Grid for a volume `shape = [D, H, W]`, window `[Dw, Hw, Ww]`, `tiles` per axis.
    pub fn new(shape: [usize; 3], window: [usize; 3], tiles: [usize; 3]) -> Self {
        let starts = [
            tile_starts(shape[0], window[0], tiles[0]),
            tile_starts(shape[1], window[1], tiles[1]),
            tile_starts(shape[2], window[2], tiles[2]),
        ];
        TileGrid { starts, window }
    }

    /// All tile origins `[z0, y0, x0]`, z outermost then y then x (the reference loop order),
    /// duplicates included.
    pub fn origins(&self) -> Vec<[usize; 3]> {
        let mut out =
            Vec::with_capacity(self.starts[0].len() * self.starts[1].len() * self.starts[2].len());
        for &z in &self.starts[0] {
            for &y in &self.starts[1] {
                for &x in &self.starts[2] {
                    out.push([z, y, x]);
                }
            }
        }
        out
    }

    /// Number of tiles (`origins().len()`).
    pub fn len(&self) -> usize {
        self.starts.iter().map(|s| s.len()).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `volume` (shape `[D, H, W]`) at the origin of a volume of shape `target` (no axis shorter),
/// the rest filled with `value`: `--pad mean` makes a volume shorter than the window this long,
/// so no tile reads past its end.
pub fn pad_volume(volume: &[f32], shape: [usize; 3], target: [usize; 3], value: f32) -> Vec<f32> {
    assert_eq!(volume.len(), shape.iter().product::<usize>(), "pad_volume: volume length != shape");
    assert!((0..3).all(|i| target[i] >= shape[i]), "pad_volume: target {target:?} shorter than {shape:?}");
    let [d, h, w] = shape;
    let [_, th, tw] = target;
    let mut out = vec![value; target.iter().product()];
    for z in 0..d {
        for y in 0..h {
            let (src, dst) = ((z * h + y) * w, (z * th + y) * tw);
            out[dst..dst + w].copy_from_slice(&volume[src..src + w]);
        }
    }
    out
}

/// The corner of shape `target` at the origin of `volume` (shape `shape`, no axis shorter):
/// undoes [`pad_volume`].
pub fn crop_volume(volume: &[f32], shape: [usize; 3], target: [usize; 3]) -> Vec<f32> {
    assert_eq!(volume.len(), shape.iter().product::<usize>(), "crop_volume: volume length != shape");
    assert!((0..3).all(|i| target[i] <= shape[i]), "crop_volume: target {target:?} longer than {shape:?}");
    let [_, h, w] = shape;
    let [td, th, tw] = target;
    let mut out = Vec::with_capacity(target.iter().product());
    for z in 0..td {
        for y in 0..th {
            let src = (z * h + y) * w;
            out.extend_from_slice(&volume[src..src + tw]);
        }
    }
    out
}

/// Copy the window at `origin` of `volume` (shape `[D, H, W]`) into `out` (shape `window`),
/// zero-padding whatever lies past the end of the volume (like `np.pad` after slicing).
///
/// Panics if `volume` or `out` have the wrong length.
pub fn extract_tile(
    volume: &[f32],
    shape: [usize; 3],
    origin: [usize; 3],
    window: [usize; 3],
    out: &mut [f32],
) {
    let [d, h, w] = shape;
    let [wd, wh, ww] = window;
    assert_eq!(volume.len(), d * h * w, "extract_tile: volume length != shape");
    assert_eq!(out.len(), wd * wh * ww, "extract_tile: out length != window");
    let vz = d.saturating_sub(origin[0]).min(wd);
    let vy = h.saturating_sub(origin[1]).min(wh);
    let vx = w.saturating_sub(origin[2]).min(ww);
    for z in 0..wd {
        for y in 0..wh {
            let o = (z * wh + y) * ww;
            let row = &mut out[o..o + ww];
            if z < vz && y < vy {
                let s = ((origin[0] + z) * h + origin[1] + y) * w + origin[2];
                row[..vx].copy_from_slice(&volume[s..s + vx]);
                row[vx..].fill(0.0);
            } else {
                row.fill(0.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_match_numpy() {
        // numpy 2.4: np.linspace(0, 630 - 128, 9, dtype=int)
        assert_eq!(tile_starts(630, 128, 9), vec![0, 62, 125, 188, 251, 313, 376, 439, 502]);
        // np.linspace(0, 2, 9, dtype=int): duplicates kept
        assert_eq!(tile_starts(130, 128, 9), vec![0, 0, 0, 0, 1, 1, 1, 1, 2]);
        // np.linspace(0, 100, 7, dtype=int)
        assert_eq!(tile_starts(228, 128, 7), vec![0, 16, 33, 50, 66, 83, 100]);
        // np.linspace(0, 502, 2) / 3
        assert_eq!(tile_starts(630, 128, 2), vec![0, 502]);
        assert_eq!(tile_starts(630, 128, 3), vec![0, 251, 502]);
    }

    #[test]
    fn starts_edge_cases() {
        assert_eq!(tile_starts(184, 192, 1), vec![0]);
        assert_eq!(tile_starts(184, 192, 3), vec![0]);
        assert_eq!(tile_starts(630, 128, 1), vec![0]);
        assert_eq!(tile_starts(630, 128, 0), Vec::<usize>::new());
        // L == W: numpy gives n zeros
        assert_eq!(tile_starts(128, 128, 3), vec![0, 0, 0]);
    }

    #[test]
    fn grid_order() {
        let g = TileGrid::new([184, 630, 630], [192, 128, 128], [1, 9, 9]);
        let o = g.origins();
        assert_eq!(o.len(), 81);
        assert_eq!(g.len(), 81);
        assert_eq!(o[0], [0, 0, 0]);
        assert_eq!(o[1], [0, 0, 62]);
        assert_eq!(o[9], [0, 62, 0]);
        assert_eq!(o[80], [0, 502, 502]);
        let g = TileGrid::new([10, 10, 10], [4, 4, 4], [2, 1, 2]);
        assert_eq!(g.origins(), vec![[0, 0, 0], [0, 0, 6], [6, 0, 0], [6, 0, 6]]);
    }

    #[test]
    fn unit_range() {
        let mut v = vec![2.0f32, 4.0, 3.0, 6.0];
        normalize_unit_range(&mut v);
        assert_eq!(v, vec![0.0, 0.5, 0.25, 1.0]);
        let mut c = vec![3.5f32; 5];
        normalize_unit_range(&mut c);
        assert_eq!(c, vec![0.0; 5]);
        // rounding: computed in f64 then cast, (0.1 - -0.2) / (0.7 - -0.2)
        let mut v = vec![0.1f32, -0.2, 0.7];
        normalize_unit_range(&mut v);
        let e = ((0.1f32 as f64 - (-0.2f32) as f64) / (0.7f32 as f64 - (-0.2f32) as f64)) as f32;
        assert_eq!(v, vec![e, 0.0, 1.0]);
    }

    #[test]
    fn pad_then_crop_is_the_volume() {
        let shape = [2, 3, 4];
        let v: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let p = pad_volume(&v, shape, [3, 3, 6], -1.0);
        assert_eq!(p.len(), 54);
        // Voxel (z 1, y 2, x 3) keeps its value at its place in the longer rows.
        assert_eq!(p[(3 + 2) * 6 + 3], v[(3 + 2) * 4 + 3]);
        assert_eq!(p[(3 + 2) * 6 + 4], -1.0);
        assert!(p[2 * 18..].iter().all(|&x| x == -1.0), "the added slice is all padding");
        assert_eq!(p.iter().filter(|&&x| x == -1.0).count(), 54 - 24);
        assert_eq!(crop_volume(&p, [3, 3, 6], shape), v);
        assert_eq!(pad_volume(&v, shape, shape, 0.0), v);
    }

    #[test]
    fn extract_pads() {
        // volume 2 x 3 x 4 with values = flat index
        let shape = [2, 3, 4];
        let vol: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let mut out = vec![-1.0f32; 3 * 2 * 3];
        extract_tile(&vol, shape, [1, 1, 2], [3, 2, 3], &mut out);
        #[rustfmt::skip]
        let want = vec![
            18.0, 19.0, 0.0,  22.0, 23.0, 0.0,
            0.0, 0.0, 0.0,    0.0, 0.0, 0.0,
            0.0, 0.0, 0.0,    0.0, 0.0, 0.0,
        ];
        assert_eq!(out, want);
        let mut full = vec![0.0f32; 24];
        extract_tile(&vol, shape, [0, 0, 0], shape, &mut full);
        assert_eq!(full, vol);
    }
}
