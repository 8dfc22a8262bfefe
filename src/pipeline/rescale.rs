//! A tomogram brought to the models' voxel size (`fastdet run --resample`).
//!
//! Separable linear interpolation; when shrinking, the triangle widens to the size ratio so that
//! every source voxel counts (an antialiased resize, as PIL's bilinear one), and a 5 Å tomogram
//! brought to 10 Å is smoothed rather than aliased. Voxel i spans [i, i+1) in both grids (SPEC),
//! so output voxel j's centre lies at source coordinate (j + 0.5) · step, step = target / source
//! voxel size: "Å = voxel coordinate × voxel size" holds in both grids, and picks made on the
//! resampled grid are in the tomogram's own Å. Edges take the voxels there are (the weights are
//! normalised over them), so a constant volume stays constant.

use rayon::prelude::*;

/// Relative voxel-size difference up to which a tomogram is not resampled: the models cannot
/// tell particles 1% larger, and picks use the tomogram's own voxel size either way.
pub const RESAMPLE_TOLERANCE: f64 = 0.01;

/// Whether a tomogram of `from` Å voxels is resampled for models of `to` Å voxels.
pub fn needs_resampling(from: f64, to: f64) -> bool {
    (from / to - 1.0).abs() > RESAMPLE_TOLERANCE
}

/// Length of an axis of `n` voxels of `from` Å resampled to `to` Å: the same extent, rounded
/// (at least one voxel).
pub fn resampled_len(n: usize, from: f64, to: f64) -> usize {
    ((n as f64 * from / to).round() as usize).max(1)
}

/// The most voxels a resampled tomogram may have: 2^30 (4 GiB of f32), about 14.7 of the
/// competition's 184 · 630 · 630. More means a voxel size in the wrong unit, or a binned size on
/// an unbinned tomogram.
pub const MAX_RESAMPLED_VOXELS: usize = 1 << 30;

/// The fewest voxels a resampled tomogram may have along an axis: 32 of 10 Å hold a ribosome
/// (150 Å radius) with a little room. Fewer means a voxel size in the wrong unit, or a header's
/// unset 1 Å.
pub const MIN_RESAMPLED_AXIS: usize = 32;

/// The resampled shape, when it has at most [`MAX_RESAMPLED_VOXELS`] voxels.
pub fn checked_resampled_shape(shape: [usize; 3], from: f64, to: f64) -> Option<[usize; 3]> {
    let voxels: f64 = shape.iter().map(|&n| (n as f64 * from / to).round().max(1.0)).product();
    (voxels.is_finite() && voxels <= MAX_RESAMPLED_VOXELS as f64).then(|| shape.map(|n| resampled_len(n, from, to)))
}

/// One output voxel's taps along an axis: its first source voxel and the normalised weights of
/// it and the ones after it.
#[derive(Debug)]
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// The triangle filter's weight of the source voxel centred at `centre` for a sample at `c`.
fn triangle(centre: f64, c: f64, support: f64) -> f64 {
    (1.0 - (centre - c).abs() / support).max(0.0)
}

fn axis_taps(n_in: usize, n_out: usize, step: f64) -> Vec<Taps> {
    let support = step.max(1.0);
    (0..n_out)
        .map(|j| {
            let c = (j as f64 + 0.5) * step;
            // Source voxels whose centre (i + 0.5) lies within `support` of c.
            let lo = ((c - support - 0.5).floor().max(0.0) as usize).min(n_in - 1);
            let hi = ((c + support - 0.5).ceil().max(0.0) as usize + 1).min(n_in);
            let w: Vec<f64> = (lo..hi).map(|i| triangle(i as f64 + 0.5, c, support)).collect();
            let (first, last) = match (w.iter().position(|&x| x > 0.0), w.iter().rposition(|&x| x > 0.0)) {
                (Some(f), Some(l)) => (f, l),
                // A sample beyond the last centre by a whole support cannot happen for the
                // lengths `resampled_len` gives; the nearest voxel, were it to.
                _ => return Taps { start: (c as usize).min(n_in - 1), weights: vec![1.0] },
            };
            let sum: f64 = w[first..=last].iter().sum();
            Taps { start: lo + first, weights: w[first..=last].iter().map(|&x| (x / sum) as f32).collect() }
        })
        .collect()
}

/// `data` (C-order z, y, x of `shape`) resampled from voxels of `from` Å to voxels of `to` Å;
/// with its shape ([`resampled_len`] per axis). `data` is freed after the first pass (x).
pub fn resample(data: Vec<f32>, shape: [usize; 3], from: f64, to: f64) -> (Vec<f32>, [usize; 3]) {
    assert_eq!(data.len(), shape.iter().product::<usize>(), "data does not match shape {shape:?}");
    assert!(from > 0.0 && to > 0.0 && from.is_finite() && to.is_finite(), "voxel sizes must be positive: {from} -> {to}");
    let step = to / from;
    let out_shape = shape.map(|n| resampled_len(n, from, to));
    if data.is_empty() {
        return (Vec::new(), shape);
    }
    let ([d, h, w], [od, oh, ow]) = (shape, out_shape);
    // x first, then y, then z: each pass works on whole rows or planes of the previous one.
    let tx = axis_taps(w, ow, step);
    let mut along_x = vec![0f32; d * h * ow];
    along_x.par_chunks_mut(ow).zip(data.par_chunks(w)).for_each(|(out, row)| {
        for (o, t) in out.iter_mut().zip(&tx) {
            *o = row[t.start..t.start + t.weights.len()].iter().zip(&t.weights).map(|(v, k)| v * k).sum();
        }
    });
    drop(data);
    // One output line (a row or a plane) as the weighted sum of whole lines of `src`.
    let combine = |src: &[f32], t: &Taps, out: &mut [f32]| {
        let line = out.len();
        for (k, &weight) in t.weights.iter().enumerate() {
            let s = &src[(t.start + k) * line..][..line];
            out.iter_mut().zip(s).for_each(|(o, &v)| *o += weight * v);
        }
    };
    let ty = axis_taps(h, oh, step);
    let mut along_y = vec![0f32; d * oh * ow];
    along_y.par_chunks_mut(oh * ow).zip(along_x.par_chunks(h * ow)).for_each(|(out, plane)| {
        for (row, t) in out.chunks_mut(ow).zip(&ty) {
            combine(plane, t, row);
        }
    });
    drop(along_x);
    let tz = axis_taps(d, od, step);
    let mut out = vec![0f32; od * oh * ow];
    out.par_chunks_mut(oh * ow).zip(tz.par_iter()).for_each(|(plane, t)| combine(&along_y, t, plane));
    (out, out_shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn halving_takes_the_antialiased_triangle() {
        let t = axis_taps(10, 5, 2.0);
        // Output voxel 2 (centre at source 5.0): source voxels 3..=6, centres 3.5, 4.5, 5.5, 6.5.
        assert_eq!(t[2].start, 3);
        assert_eq!(t[2].weights, vec![0.125, 0.375, 0.375, 0.125]);
        // The first: source voxel -1 does not exist, so the other three share its weight.
        assert_eq!(t[0].start, 0);
        let w0 = [0.375 / 0.875, 0.375 / 0.875, 0.125 / 0.875];
        assert!(t[0].weights.iter().zip(w0).all(|(a, b)| (a - b).abs() < 1e-7) && t[0].weights.len() == 3, "{:?}", t[0]);
        // Doubling: linear interpolation between the two nearest centres, the edges replicated.
        let u = axis_taps(4, 8, 0.5);
        assert_eq!((u[0].start, u[0].weights.clone()), (0, vec![1.0]));
        assert_eq!((u[3].start, u[3].weights.clone()), (1, vec![0.75, 0.25]));
        assert_eq!((u[7].start, u[7].weights.clone()), (3, vec![1.0]));
    }

    #[test]
    fn the_same_voxel_size_copies_and_a_constant_stays() {
        let shape = [5, 7, 9];
        let v = random(5 * 7 * 9, 1);
        assert_eq!(resample(v.clone(), shape, 10.0, 10.0), (v.clone(), shape));
        for (from, to) in [(5.0, 10.012), (10.012, 4.0), (7.84, 10.012), (10.0, 27.0)] {
            let (out, s) = resample(vec![0.75; 5 * 7 * 9], shape, from, to);
            assert_eq!(s, shape.map(|n| resampled_len(n, from, to)));
            assert!(out.iter().all(|&x| (x - 0.75).abs() < 1e-6), "{from} -> {to}: {out:?}");
        }
    }

    #[test]
    fn a_linear_ramp_stays_linear_away_from_the_edges() {
        // Value a·(source coordinate) + b at each centre: resampled, each output centre holds
        // the same function of its own source coordinate (j + 0.5) · step: exactly when growing
        // (linear interpolation) or shrinking by a whole factor (a symmetric set of taps); else
        // the sampled triangle's centroid is off c by up to about 0.05 source voxels (0.5 Å at
        // 10 Å: nothing to particles of 60 Å and more).
        let (n, a, b) = (64usize, 0.3f64, -2.0f64);
        let line: Vec<f32> = (0..n).map(|i| (a * (i as f64 + 0.5) + b) as f32).collect();
        let data: Vec<f32> = (0..3 * 2).flat_map(|_| line.iter().copied()).collect();
        for (from, to, off) in [(5.0, 10.0, 0.0), (10.0, 4.0, 0.0), (5.006, 10.012, 0.0), (10.0, 13.0, 0.06), (4.0, 10.0, 0.06), (3.0, 10.0, 0.06)] {
            let step = to / from;
            let (out, s) = resample(data.clone(), [3, 2, n], from, to);
            let support = step.max(1.0);
            let mut interior = 0;
            for j in 0..s[2] {
                let c = (j as f64 + 0.5) * step;
                if c - support >= 0.0 && c + support <= n as f64 {
                    interior += 1;
                    for row in out.chunks(s[2]) {
                        let want = a * c + b;
                        assert!((row[j] as f64 - want).abs() <= a * off + 1e-4, "{from} -> {to}: voxel {j}: {} vs {want}", row[j]);
                    }
                }
            }
            assert!(interior >= s[2] / 2, "{from} -> {to}: {interior} interior voxels of {}", s[2]);
        }
    }

    /// Every output voxel straight from the triangle formula over every source voxel (no
    /// separable passes, no tap bounds): the separable passes must give the same.
    #[test]
    fn separable_passes_equal_the_direct_sum() {
        let shape = [6, 11, 13];
        let v = random(6 * 11 * 13, 7);
        for (from, to) in [(10.0, 17.0), (10.0, 6.0), (3.0, 10.0)] {
            let (out, s) = resample(v.clone(), shape, from, to);
            let step = to / from;
            let support = step.max(1.0);
            let weights = |n: usize, j: usize| -> Vec<f64> { (0..n).map(|i| triangle(i as f64 + 0.5, (j as f64 + 0.5) * step, support)).collect() };
            for z in 0..s[0] {
                for y in 0..s[1] {
                    for x in 0..s[2] {
                        let (wz, wy, wx) = (weights(shape[0], z), weights(shape[1], y), weights(shape[2], x));
                        let (mut sum, mut total) = (0.0f64, 0.0f64);
                        for (i, a) in wz.iter().enumerate() {
                            for (k, b) in wy.iter().enumerate() {
                                for (l, c) in wx.iter().enumerate() {
                                    let wgt = a * b * c;
                                    sum += wgt * v[(i * shape[1] + k) * shape[2] + l] as f64;
                                    total += wgt;
                                }
                            }
                        }
                        let got = out[(z * s[1] + y) * s[2] + x] as f64;
                        assert!((got - sum / total).abs() < 1e-5, "{from} -> {to} at ({z}, {y}, {x}): {got} vs {}", sum / total);
                    }
                }
            }
        }
    }

    #[test]
    fn lengths_keep_the_extent_and_small_differences_are_left_alone() {
        assert_eq!(resampled_len(630, 10.012, 10.012), 630);
        assert_eq!(resampled_len(1260, 5.006, 10.012), 630);
        assert_eq!(resampled_len(184, 7.84, 10.012), 144);
        assert_eq!(resampled_len(1, 1.0, 100.0), 1);
        assert!(!needs_resampling(10.0, 10.012));
        assert!(!needs_resampling(10.1, 10.012));
        assert!(needs_resampling(10.2, 10.012));
        assert!(needs_resampling(5.006, 10.012));
        // A competition-sized tomogram grown 2x per axis: 0.58 G voxels, allowed; one of twice
        // that size grown 2x (a 20 Å label on a 10 Å tomogram), or an absurd size, is not.
        assert_eq!(checked_resampled_shape([184, 630, 630], 10.012, 5.006), Some([368, 1260, 1260]));
        assert_eq!(checked_resampled_shape([368, 1260, 1260], 20.024, 10.012), None);
        assert_eq!(checked_resampled_shape([184, 630, 630], 1e30, 10.012), None);
        assert_eq!(checked_resampled_shape([368, 1260, 1260], 5.006, 10.012), Some([184, 630, 630]));
    }
}
