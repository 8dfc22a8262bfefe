//! CenterNet peak extraction and greedy keypoint-similarity NMS, with the reference semantics
//! (`detect` and `to_rows` of `shared/reference/pipeline.py`).

use std::cmp::Ordering;
use std::collections::HashMap;

use rayon::prelude::*;

use super::blend::Maps;
use crate::particles::{Pick, ANGSTROM_PER_VOXEL, CLASSES};

/// One detection, in continuous VOXEL coordinates (voxel index i spans [i, i+1)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub class: usize,
    pub score: f32,
    pub x: f64,
    pub y: f64,
    pub z: f64,
}

/// Seed NMS sigmas in voxels, per class: `radius_Å / ANGSTROM_PER_VOXEL`.
pub fn seed_sigmas() -> Vec<f64> {
    sigmas_for(ANGSTROM_PER_VOXEL)
}

/// NMS sigmas in voxels for tomograms of another voxel size (Å).
pub fn sigmas_for(voxel_size: f64) -> Vec<f64> {
    CLASSES.iter().map(|c| c.radius_a / voxel_size).collect()
}

/// Max that propagates NaN like PyTorch's CPU max-pool (`val > max || isnan(val)`).
#[inline]
fn pmax(a: f32, b: f32) -> f32 {
    if a.is_nan() || !(b <= a) {
        // b > a, or b is NaN (and a is not)
        if a.is_nan() {
            a
        } else {
            b
        }
    } else {
        a
    }
}

/// 3-tap max along one axis of `[D, H, W]` data: `axis` 0 = z, 1 = y, 2 = x. Borders only see the
/// in-bounds neighbours (padding with -inf never wins).
fn max3_axis(src: &[f32], dst: &mut [f32], dims: [usize; 3], axis: usize) {
    let [d, h, w] = dims;
    let plane = h * w;
    match axis {
        2 => dst.par_chunks_mut(w).zip(src.par_chunks(w)).for_each(|(o, s)| {
            for x in 0..w {
                let mut m = s[x];
                if x > 0 {
                    m = pmax(m, s[x - 1]);
                }
                if x + 1 < w {
                    m = pmax(m, s[x + 1]);
                }
                o[x] = m;
            }
        }),
        1 => dst.par_chunks_mut(plane).zip(src.par_chunks(plane)).for_each(|(o, s)| {
            for y in 0..h {
                for x in 0..w {
                    let mut m = s[y * w + x];
                    if y > 0 {
                        m = pmax(m, s[(y - 1) * w + x]);
                    }
                    if y + 1 < h {
                        m = pmax(m, s[(y + 1) * w + x]);
                    }
                    o[y * w + x] = m;
                }
            }
        }),
        _ => dst.par_chunks_mut(plane).enumerate().for_each(|(z, o)| {
            let cur = &src[z * plane..(z + 1) * plane];
            o.copy_from_slice(cur);
            if z > 0 {
                for (m, &v) in o.iter_mut().zip(&src[(z - 1) * plane..z * plane]) {
                    *m = pmax(*m, v);
                }
            }
            if z + 1 < d {
                for (m, &v) in o.iter_mut().zip(&src[(z + 1) * plane..(z + 2) * plane]) {
                    *m = pmax(*m, v);
                }
            }
        }),
    }
}

/// CenterNet NMS of score channel `class` of `scores` (`[C, dims]`): returns
/// `s * (s == maxpool3d(s, 3, stride 1, pad 1))` for that channel, shape `dims`. A voxel is a peak
/// when it equals the max of its (in-bounds) 3x3x3 neighbourhood, so every voxel of a plateau is a
/// peak; a non-peak becomes `s * 0.0` (0, or -0 for negative s). NaN propagates through the max as
/// in PyTorch (a NaN makes its neighbourhood non-peaks).
pub fn peaks(scores: &[f32], dims: [usize; 3], class: usize) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let s = &scores[class * n..(class + 1) * n];
    if n == 0 {
        return Vec::new();
    }
    let mut a = vec![0.0f32; n];
    let mut b = vec![0.0f32; n];
    max3_axis(s, &mut a, dims, 2);
    max3_axis(&a, &mut b, dims, 1);
    max3_axis(&b, &mut a, dims, 0);
    a.par_iter_mut().zip(s.par_iter()).for_each(|(m, &v)| {
        *m = if v == *m { v } else { v * 0.0 };
    });
    a
}

/// Sort key of candidates: score descending, then flat index ascending (numpy's stable argsort of
/// `-score`). Candidates never hold NaN (NaN fails `>= threshold`).
fn cand_order(a: &(usize, f32), b: &(usize, f32)) -> Ordering {
    b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal).then(a.0.cmp(&b.0))
}

/// Greedy NMS over points sorted best first: keep the best remaining, suppress every candidate
/// with `exp(-d² / (2σ²)) > t`. Returns kept indices, in order.
///
/// Exact reference test everywhere; a uniform grid of cell size ≥ the suppression radius
/// (`d² < -2σ² ln t`, with a 1% margin) only prunes pairs that cannot pass the test.
fn greedy_nms(pts: &[[f64; 3]], sigma: f64, t: f64) -> Vec<usize> {
    let n = pts.len();
    let denom = (2.0 * sigma) * sigma;
    let suppresses = |p: &[f64; 3], q: &[f64; 3]| -> bool {
        let (dx, dy, dz) = (q[0] - p[0], q[1] - p[1], q[2] - p[2]);
        let d2 = (dx * dx + dy * dy) + dz * dz;
        (-d2 / denom).exp() > t
    };
    let mut suppressed = vec![false; n];
    let mut keep = Vec::new();

    let r2 = -denom * t.ln();
    let cell = (r2 * 1.01 + 1e-9).sqrt();
    let max_abs = pts
        .iter()
        .flat_map(|p| p.iter())
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let use_grid = n > 64
        && t > 0.0
        && t < 1.0 - 1e-9
        && sigma.is_finite()
        && sigma > 0.0
        && cell.is_finite()
        && cell > 0.0
        && max_abs / cell < 1e12;

    if !use_grid {
        for i in 0..n {
            if suppressed[i] {
                continue;
            }
            keep.push(i);
            for j in i + 1..n {
                if !suppressed[j] && suppresses(&pts[i], &pts[j]) {
                    suppressed[j] = true;
                }
            }
        }
        return keep;
    }

    // Grid mode (0 < t < 1): a non-finite point can neither suppress nor be suppressed (its d² is
    // NaN or +inf, so exp(..) is NaN or 0, never > t > 0); it is left out of the grid.
    let key = |p: &[f64; 3]| -> [i64; 3] { p.map(|v| (v / cell).floor() as i64) };
    let finite = |p: &[f64; 3]| p.iter().all(|v| v.is_finite());
    let mut grid: HashMap<[i64; 3], Vec<usize>> = HashMap::new();
    for (j, p) in pts.iter().enumerate() {
        if finite(p) {
            grid.entry(key(p)).or_default().push(j);
        }
    }
    for i in 0..n {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let p = &pts[i];
        if !finite(p) {
            continue;
        }
        let k = key(p);
        for dz in -1..=1 {
            for dy in -1..=1 {
                for dx in -1..=1 {
                    if let Some(list) = grid.get(&[k[0] + dz, k[1] + dy, k[2] + dx]) {
                        for &j in list {
                            if j > i && !suppressed[j] && suppresses(p, &pts[j]) {
                                suppressed[j] = true;
                            }
                        }
                    }
                }
            }
        }
    }
    keep
}

/// A detection candidate of one class (the first stage of `detect`): flat cell index of the
/// `[D, H, W]` grid, its peak score (`>= threshold`) and the f32 offsets (x, y, z) at that cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub index: usize,
    pub score: f32,
    pub offset: [f32; 3],
}

/// The candidates of class `c` of `maps`, in ascending flat index: peaks (`peaks`) `>= threshold`.
pub fn class_candidates(maps: &Maps, c: usize, threshold: f32) -> Vec<Candidate> {
    let n = maps.channel_len();
    let pk = peaks(&maps.scores, maps.dims, c);
    let o = &maps.offsets;
    pk.iter()
        .enumerate()
        .filter(|(_, &v)| v >= threshold)
        .map(|(i, &v)| Candidate { index: i, score: v, offset: [o[i], o[n + i], o[2 * n + i]] })
        .collect()
}

/// Sort key of `Candidate`s: `cand_order` on (index, score).
fn candidate_order(a: &Candidate, b: &Candidate) -> Ordering {
    cand_order(&(a.index, a.score), &(b.index, b.score))
}

/// The second stage of `detect` for class `c`: from its candidates (in any order; `dims` is the
/// grid they index), the first `pre_nms_top_k` by (score desc, index asc), their centres and the
/// greedy NMS. Shared by the host path (`detect`) and candidates extracted on the device.
pub fn detect_class_candidates(
    c: usize,
    mut cands: Vec<Candidate>,
    dims: [usize; 3],
    iou_threshold: f64,
    pre_nms_top_k: usize,
    stride: usize,
    sigma: f64,
) -> Vec<Detection> {
    let [_, h, w] = dims;
    if cands.is_empty() {
        return Vec::new();
    }
    // Top-K under the total order (score desc, index asc) == stable sort then truncate.
    if cands.len() > pre_nms_top_k {
        if pre_nms_top_k == 0 {
            return Vec::new();
        }
        cands.select_nth_unstable_by(pre_nms_top_k - 1, candidate_order);
        cands.truncate(pre_nms_top_k);
    }
    cands.sort_unstable_by(candidate_order);

    let st = stride as f64;
    let pts: Vec<[f64; 3]> = cands
        .iter()
        .map(|cd| {
            let f = cd.index;
            let x = f % w;
            let y = (f / w) % h;
            let z = f / (w * h);
            [
                (x as f64 + 0.5) * st + cd.offset[0] as f64,
                (y as f64 + 0.5) * st + cd.offset[1] as f64,
                (z as f64 + 0.5) * st + cd.offset[2] as f64,
            ]
        })
        .collect();
    greedy_nms(&pts, sigma, iou_threshold)
        .into_iter()
        .map(|i| Detection { class: c, score: cands[i].score, x: pts[i][0], y: pts[i][1], z: pts[i][2] })
        .collect()
}

/// `detect` from per-class candidates (`per_class[c]`, e.g. extracted on the device) of a grid
/// `dims`: `detect_class_candidates` for each class, concatenated in class order.
///
/// Panics if `sigmas_vox` has fewer than `per_class.len()` entries.
pub fn detect_from_candidates(
    per_class: Vec<Vec<Candidate>>,
    dims: [usize; 3],
    iou_threshold: f64,
    pre_nms_top_k: usize,
    stride: usize,
    sigmas_vox: &[f64],
) -> Vec<Detection> {
    assert!(sigmas_vox.len() >= per_class.len(), "detect: {} sigmas for {} classes", sigmas_vox.len(), per_class.len());
    let per: Vec<Vec<Detection>> = per_class
        .into_par_iter()
        .enumerate()
        .map(|(c, cands)| detect_class_candidates(c, cands, dims, iou_threshold, pre_nms_top_k, stride, sigmas_vox[c]))
        .collect();
    per.into_iter().flatten().collect()
}

/// Detections of all classes, class by class (class order), each class best first.
///
/// Per class c: CenterNet peaks (`peaks`); candidates are the peak values, non-peaks counting as
/// 0 (so they are kept only when `thresholds[c] <= 0`), kept where `>= thresholds[c]` (f32
/// comparison, as numpy does with an f32 array and a Python float); stable sort by score
/// descending (ties: flat index ascending); the first `pre_nms_top_k`; centres
/// `((x + 0.5)·stride + off_x, (y + 0.5)·stride + off_y, (z + 0.5)·stride + off_z)` in f64 from the
/// f32 offsets (voxels); greedy NMS suppressing `exp(-d² / (2σ²)) > iou_threshold`,
/// `σ = sigmas_vox[c]` (see `seed_sigmas`).
///
/// Panics if `thresholds` or `sigmas_vox` have fewer than `maps.num_classes` entries.
pub fn detect(
    maps: &Maps,
    thresholds: &[f32],
    iou_threshold: f64,
    pre_nms_top_k: usize,
    stride: usize,
    sigmas_vox: &[f64],
) -> Vec<Detection> {
    let nc = maps.num_classes;
    assert!(thresholds.len() >= nc, "detect: {} thresholds for {} classes", thresholds.len(), nc);
    assert!(sigmas_vox.len() >= nc, "detect: {} sigmas for {} classes", sigmas_vox.len(), nc);
    let n = maps.channel_len();
    assert_eq!(maps.scores.len(), nc * n, "detect: scores length");
    assert_eq!(maps.offsets.len(), 3 * n, "detect: offsets length");
    let per: Vec<Vec<Detection>> = (0..nc)
        .into_par_iter()
        .map(|c| {
            let cands = class_candidates(maps, c, thresholds[c]);
            detect_class_candidates(c, cands, maps.dims, iou_threshold, pre_nms_top_k, stride, sigmas_vox[c])
        })
        .collect();
    per.into_iter().flatten().collect()
}

/// Picks in Å (voxel coordinate × ANGSTROM_PER_VOXEL) for run `run`.
pub fn to_picks(run: &str, dets: &[Detection]) -> Vec<Pick> {
    to_picks_scaled(run, dets, ANGSTROM_PER_VOXEL)
}

/// Picks in Å for tomograms of voxel size `voxel_size` Å.
pub fn to_picks_scaled(run: &str, dets: &[Detection], voxel_size: f64) -> Vec<Pick> {
    dets.iter()
        .map(|d| Pick {
            run: run.to_string(),
            class: d.class,
            score: d.score,
            x: d.x * voxel_size,
            y: d.y * voxel_size,
            z: d.z * voxel_size,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(nc: usize, dims: [usize; 3], scores: Vec<f32>) -> Maps {
        let n = dims.iter().product::<usize>();
        Maps { num_classes: nc, dims, scores, offsets: vec![0.0; 3 * n] }
    }

    #[test]
    fn plateau_and_border_peaks() {
        // dims [1, 1, 6]: 0.5 0.5 0.2 0.1 0.3 0.9 → plateau at 0,1 (both peaks), border peak at 5.
        let s = vec![0.5f32, 0.5, 0.2, 0.1, 0.3, 0.9];
        assert_eq!(peaks(&s, [1, 1, 6], 0), vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.9]);
        // 3D [2, 3, 3]: maxima in two opposite corners; the 0.1 voxels out of reach of both
        // (corners (y, x) = (0, 2) and (2, 0) of each z-plane) are local maxima (plateau) too.
        let mut s = vec![0.1f32; 18];
        s[0] = 0.8; // (0,0,0)
        s[9 + 8] = 0.4; // (1,2,2)
        let p = peaks(&s, [2, 3, 3], 0);
        let mut want = vec![0.0f32; 18];
        want[0] = 0.8;
        want[17] = 0.4;
        for i in [2, 6, 11, 15] {
            want[i] = 0.1;
        }
        assert_eq!(p, want);
        // second class of a 2-class array
        let mut two = vec![0.0f32; 36];
        two[18..].copy_from_slice(&s);
        assert_eq!(peaks(&two, [2, 3, 3], 1), want);
        // NaN poisons its neighbourhood (PyTorch max-pool propagates NaN)
        let p = peaks(&[0.5f32, f32::NAN, 0.1, 0.3, 0.2], [1, 1, 5], 0);
        assert_eq!((p[0], p[2]), (0.0, 0.0));
        assert!(p[1].is_nan()); // NaN * 0, never >= a threshold
        assert_eq!(&p[3..], &[0.3, 0.0]);
    }

    #[test]
    fn centres_and_threshold() {
        // [1, 2, 4]; peaks at (0,0,0)=0.6 and (0,1,3)=0.3 ; threshold 0.3 keeps both (>=)
        let mut m = maps(1, [1, 2, 4], vec![0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3]);
        m.offsets[7] = 0.25; // x offset of cell 7
        m.offsets[8 + 7] = -1.5; // y
        m.offsets[16 + 7] = 0.125; // z
        let d = detect(&m, &[0.3], 0.85, 100, 2, &[1.0]);
        assert_eq!(
            d,
            vec![
                Detection { class: 0, score: 0.6, x: 1.0, y: 1.0, z: 1.0 },
                Detection { class: 0, score: 0.3, x: 7.0 + 0.25, y: 3.0 - 1.5, z: 1.0 + 0.125 },
            ]
        );
        // threshold just above 0.3 drops it
        let next_up = f32::from_bits(0.3f32.to_bits() + 1);
        let d = detect(&m, &[next_up], 0.85, 100, 2, &[1.0]);
        assert_eq!(d.len(), 1);
        // threshold 0: every non-peak counts as a candidate with score 0 (sorted after, by index)
        let d = detect(&m, &[0.0], 0.0001, 100, 2, &[1e-3]);
        assert_eq!(d.len(), 8);
        assert_eq!((d[0].score, d[1].score, d[2].score), (0.6, 0.3, 0.0));
        assert_eq!((d[2].x, d[3].x), (3.0, 5.0)); // cells 1, 2 in index order
    }

    #[test]
    fn nms_near_and_far() {
        // [1, 1, 12] cells, stride 2: peaks at x-cells 0 (0.9), 2 (0.8), 9 (0.7).
        // centres 1, 5, 19 voxels. sigma 3: exp(-16/18) = 0.41 ≤ 0.85 → cell 2 survives;
        // with sigma 10: exp(-16/200) = 0.923 > 0.85 → suppressed; 19 - 1 = 18: exp(-324/200) = 0.2 kept.
        let mut s = vec![0.0f32; 12];
        s[0] = 0.9;
        s[2] = 0.8;
        s[9] = 0.7;
        let m = maps(1, [1, 1, 12], s);
        let d = detect(&m, &[0.5], 0.85, 100, 2, &[3.0]);
        assert_eq!(d.iter().map(|d| d.x).collect::<Vec<_>>(), vec![1.0, 5.0, 19.0]);
        let d = detect(&m, &[0.5], 0.85, 100, 2, &[10.0]);
        assert_eq!(d.iter().map(|d| (d.x, d.score)).collect::<Vec<_>>(), vec![(1.0, 0.9), (19.0, 0.7)]);
        // suppression is by the KEPT detection only: chain A-B-C where B is suppressed by A and
        // C is close to B but not to A → C survives.
        let mut s = vec![0.0f32; 12];
        s[0] = 0.9;
        s[2] = 0.8;
        s[4] = 0.7;
        let m = maps(1, [1, 1, 12], s);
        // centres 1, 5, 9; sigma 8: A-B exp(-16/128) = 0.882 > 0.85 (B suppressed);
        // B-C would suppress C too, but B is not kept; A-C exp(-64/128) = 0.61 → C kept.
        let d = detect(&m, &[0.5], 0.85, 100, 2, &[8.0]);
        assert_eq!(d.iter().map(|d| d.x).collect::<Vec<_>>(), vec![1.0, 9.0]);
    }

    #[test]
    fn top_k_and_ties() {
        // isolated peaks with equal scores: ties broken by flat index; top-K truncates before NMS
        let mut s = vec![0.0f32; 20];
        for (i, v) in [(1, 0.5f32), (5, 0.7), (9, 0.5), (13, 0.9), (17, 0.5)] {
            s[i] = v;
        }
        let m = maps(1, [1, 1, 20], s);
        let d = detect(&m, &[0.1], 0.85, 3, 2, &[0.1]);
        assert_eq!(
            d.iter().map(|d| (d.score, d.x)).collect::<Vec<_>>(),
            vec![(0.9, 27.0), (0.7, 11.0), (0.5, 3.0)]
        );
        let d = detect(&m, &[0.1], 0.85, 100, 2, &[0.1]);
        assert_eq!(d.iter().map(|d| d.x).collect::<Vec<_>>(), vec![27.0, 11.0, 3.0, 19.0, 35.0]);
        assert!(detect(&m, &[0.1], 0.85, 0, 2, &[0.1]).is_empty());
    }

    #[test]
    fn classes_in_order_and_picks() {
        let dims = [1, 1, 4];
        let m = maps(2, dims, vec![0.0, 0.4, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0]);
        let d = detect(&m, &[0.3, 0.3], 0.85, 10, 2, &[1.0, 1.0]);
        assert_eq!(d.iter().map(|d| (d.class, d.score)).collect::<Vec<_>>(), vec![(0, 0.4), (1, 0.9)]);
        let p = to_picks("TS_1", &d);
        assert_eq!(p[0].run, "TS_1");
        assert_eq!(p[0].x, 3.0 * ANGSTROM_PER_VOXEL);
        assert_eq!(p[1].z, 1.0 * ANGSTROM_PER_VOXEL);
        let sig = seed_sigmas();
        assert_eq!(sig.len(), 6);
        assert_eq!(sig[0], 60.0 / 10.012);
    }

    /// The grid NMS equals the brute-force reference loop on random clustered points.
    #[test]
    fn grid_nms_matches_brute_force() {
        let mut state = 12345u64;
        let mut rnd = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for &(sigma, t) in &[(6.0, 0.85), (13.0, 0.85), (2.0, 0.3), (9.0, 0.99)] {
            let mut pts = Vec::new();
            for _ in 0..400 {
                let c = [rnd() * 200.0 - 50.0, rnd() * 200.0, rnd() * 90.0];
                for _ in 0..(1 + (rnd() * 5.0) as usize) {
                    pts.push([c[0] + rnd() * 8.0, c[1] + rnd() * 8.0, c[2] + rnd() * 8.0]);
                }
            }
            pts.push([f64::NAN, 1.0, 1.0]);
            pts.push([f64::INFINITY, 1.0, 1.0]);
            let got = greedy_nms(&pts, sigma, t);
            // brute force
            let denom = (2.0 * sigma) * sigma;
            let mut sup = vec![false; pts.len()];
            let mut want = Vec::new();
            for i in 0..pts.len() {
                if sup[i] {
                    continue;
                }
                want.push(i);
                for j in 0..pts.len() {
                    let d = [pts[j][0] - pts[i][0], pts[j][1] - pts[i][1], pts[j][2] - pts[i][2]];
                    let d2 = (d[0] * d[0] + d[1] * d[1]) + d[2] * d[2];
                    if (-d2 / denom).exp() > t {
                        sup[j] = true;
                    }
                }
            }
            assert_eq!(got, want, "sigma {sigma} t {t}");
            assert!(want.len() < pts.len() && want.len() > 100);
        }
    }
}
