//! GroupNorm (affine) and InstanceNorm (no affine) with a fused activation, in place or into a
//! new buffer.
//! Statistics are accumulated in f64 per channel (in parallel, combined in a fixed order), so the
//! result does not depend on the thread count.

use crate::model::graph::Act;
use rayon::prelude::*;

pub const EPS: f64 = 1e-5;

/// Normalises `x` = `[n, c, vol]` in place over groups of `c / groups` channels;
/// `gamma`/`beta` are per channel (None: no affine), then applies `act`.
pub fn group_norm(x: &mut [f32], n: usize, c: usize, vol: usize, groups: usize, gamma: Option<&[f32]>, beta: Option<&[f32]>, act: Act) {
    let scale_shift = statistics(x, n, c, vol, groups, gamma, beta);
    x.par_chunks_mut(vol).zip(scale_shift.par_iter()).for_each(|(ch, &ss)| {
        normalise(
            ch.iter_mut().map(|v| {
                let x = *v;
                (v, x)
            }),
            ss,
            act,
        )
    });
}

/// `group_norm` of `src` written to `dst`: one pass less than copying and normalising in place
/// (for inputs that are still needed, such as a residual block's input).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_to(src: &[f32], dst: &mut [f32], n: usize, c: usize, vol: usize, groups: usize, gamma: Option<&[f32]>, beta: Option<&[f32]>, act: Act) {
    assert_eq!(src.len(), dst.len());
    let scale_shift = statistics(src, n, c, vol, groups, gamma, beta);
    dst.par_chunks_mut(vol).zip(src.par_chunks(vol)).zip(scale_shift.par_iter()).for_each(|((d, s), &ss)| normalise(d.iter_mut().zip(s.iter().copied()), ss, act));
}

/// Normalises one channel: each `(dst, x)` pair gets `act((x - mean) * scale + shift)`.
#[inline]
fn normalise<'a>(pairs: impl Iterator<Item = (&'a mut f32, f32)>, (m, sc, bt): (f32, f32, f32), act: Act) {
    match act {
        // The common activations as their own loops, so they vectorise.
        Act::None => pairs.for_each(|(d, x)| *d = (x - m) * sc + bt),
        Act::Relu => pairs.for_each(|(d, x)| *d = ((x - m) * sc + bt).max(0.0)),
        Act::LeakyRelu(slope) => pairs.for_each(|(d, x)| {
            let y = (x - m) * sc + bt;
            *d = if y >= 0.0 { y } else { y * slope };
        }),
        _ => pairs.for_each(|(d, x)| *d = act.apply((x - m) * sc + bt)),
    }
}

/// Per channel (mean, scale, shift) of `x` = `[n, c, vol]` normalised over groups of channels.
fn statistics(x: &[f32], n: usize, c: usize, vol: usize, groups: usize, gamma: Option<&[f32]>, beta: Option<&[f32]>) -> Vec<(f32, f32, f32)> {
    assert!(groups > 0 && c.is_multiple_of(groups), "{c} channels do not split into {groups} groups");
    assert_eq!(x.len(), n * c * vol);
    let cpg = c / groups;
    // Per-channel sums, then per-group statistics in channel order.
    let sums: Vec<(f64, f64)> = x
        .par_chunks(vol)
        .map(channel_sums)
        .collect();
    // Per channel: y = (x - mean) * scale + beta, subtracting first so a large mean loses nothing.
    let mut scale_shift = vec![(0.0f32, 0.0f32, 0.0f32); n * c];
    for b in 0..n {
        for g in 0..groups {
            let (mut s, mut ss) = (0.0, 0.0);
            for ch in 0..cpg {
                let (a, q) = sums[b * c + g * cpg + ch];
                s += a;
                ss += q;
            }
            let cnt = (cpg * vol) as f64;
            let mean = s / cnt;
            let var = (ss / cnt - mean * mean).max(0.0);
            let rstd = 1.0 / (var + EPS).sqrt();
            for ch in g * cpg..(g + 1) * cpg {
                let gm = gamma.map_or(1.0, |g| g[ch] as f64);
                let bt = beta.map_or(0.0, |b| b[ch] as f64);
                let scale = rstd * gm;
                scale_shift[b * c + ch] = (mean as f32, scale as f32, bt as f32);
            }
        }
    }
    scale_shift
}

/// Sum and sum of squares of one channel in f64, over eight interleaved partial sums (a fixed
/// order, so the result is the same on every run; independent chains, so it vectorises).
fn channel_sums(ch: &[f32]) -> (f64, f64) {
    const L: usize = 8;
    let (mut s, mut ss) = ([0.0f64; L], [0.0f64; L]);
    let mut chunks = ch.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            let v = c[i] as f64;
            s[i] += v;
            ss[i] += v * v;
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        s[i] += v as f64;
        ss[i] += v as f64 * v as f64;
    }
    (s.iter().sum(), ss.iter().sum())
}

/// InstanceNorm without affine = GroupNorm with one channel per group.
pub fn instance_norm(x: &mut [f32], n: usize, c: usize, vol: usize, act: Act) {
    group_norm(x, n, c, vol, c, None, None, act);
}

/// `instance_norm` of `src` written to `dst`.
pub fn instance_norm_to(src: &[f32], dst: &mut [f32], n: usize, c: usize, vol: usize, act: Act) {
    group_norm_to(src, dst, n, c, vol, c, None, None, act);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::SplitMix64;

    /// The direct formula: two-pass mean and biased variance in f64.
    fn reference(x: &[f32], n: usize, c: usize, vol: usize, groups: usize, gamma: &[f32], beta: &[f32], act: Act) -> Vec<f32> {
        let cpg = c / groups;
        let mut out = vec![0.0; x.len()];
        for b in 0..n {
            for g in 0..groups {
                let sl = &x[(b * c + g * cpg) * vol..(b * c + (g + 1) * cpg) * vol];
                let mean = sl.iter().map(|&v| v as f64).sum::<f64>() / sl.len() as f64;
                let var = sl.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / sl.len() as f64;
                for ch in 0..cpg {
                    let cc = g * cpg + ch;
                    for i in 0..vol {
                        let idx = (b * c + cc) * vol + i;
                        let y = (x[idx] as f64 - mean) / (var + EPS).sqrt() * gamma[cc] as f64 + beta[cc] as f64;
                        out[idx] = act.apply(y as f32);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn group_norm_with_several_channels_per_group() {
        let (n, c, vol, groups) = (2, 16, 37, 8);
        let mut r = SplitMix64::new(5);
        let mut x = vec![0.0; n * c * vol];
        r.fill_uniform(&mut x, -3.0, 5.0);
        let mut gamma = vec![0.0; c];
        let mut beta = vec![0.0; c];
        r.fill_uniform(&mut gamma, 0.5, 1.5);
        r.fill_uniform(&mut beta, -0.5, 0.5);
        let want = reference(&x, n, c, vol, groups, &gamma, &beta, Act::Relu);
        group_norm(&mut x, n, c, vol, groups, Some(&gamma), Some(&beta), Act::Relu);
        let d = x.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(d < 2e-6, "{d}");
        // ReLU really applied and the statistics really normalised.
        assert!(x.iter().all(|&v| v >= 0.0));
    }

    #[test]
    fn instance_norm_gives_zero_mean_unit_variance() {
        let (n, c, vol) = (1, 3, 1000);
        let mut r = SplitMix64::new(9);
        let mut x = vec![0.0; n * c * vol];
        r.fill_uniform(&mut x, 10.0, 20.0);
        instance_norm(&mut x, n, c, vol, Act::None);
        for ch in x.chunks(vol) {
            let m = ch.iter().map(|&v| v as f64).sum::<f64>() / vol as f64;
            let v = ch.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / vol as f64;
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-3, "{m} {v}");
        }
    }

    #[test]
    fn constant_input_normalises_to_zero() {
        let mut x = vec![7.0f32; 2 * 50];
        instance_norm(&mut x, 1, 2, 50, Act::None);
        assert!(x.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn norm_into_a_new_buffer_equals_norm_in_place() {
        let (n, c, vol, groups) = (2, 8, 53, 4);
        let mut r = SplitMix64::new(11);
        let mut x = vec![0.0; n * c * vol];
        r.fill_uniform(&mut x, -2.0, 3.0);
        let (mut gamma, mut beta) = (vec![0.0; c], vec![0.0; c]);
        r.fill_uniform(&mut gamma, 0.5, 1.5);
        r.fill_uniform(&mut beta, -0.5, 0.5);
        for act in [Act::None, Act::Relu, Act::LeakyRelu(0.01), Act::Silu] {
            let mut in_place = x.clone();
            group_norm(&mut in_place, n, c, vol, groups, Some(&gamma), Some(&beta), act);
            let mut to = vec![f32::NAN; x.len()];
            group_norm_to(&x, &mut to, n, c, vol, groups, Some(&gamma), Some(&beta), act);
            assert_eq!(in_place, to, "{act:?}");
            let want = reference(&x, n, c, vol, groups, &gamma, &beta, act);
            let d = to.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(d < 2e-6, "{act:?}: {d}");
            let mut inst = vec![f32::NAN; x.len()];
            instance_norm_to(&x, &mut inst, n, c, vol, act);
            let mut inst_in_place = x.clone();
            instance_norm(&mut inst_in_place, n, c, vol, act);
            assert_eq!(inst, inst_in_place, "{act:?}");
        }
    }
}
