//! The general AVX-512 path: im2col written straight into the microkernel's column panels.
//!
//! A task takes up to MAX_COLS output positions; for each block of KC rows of K it gathers the
//! patches into panels of `[KC][NR]` (L1-sized, reused by every weight panel) and multiplies.
//! Block sums go to a small per-task accumulator and are copied out at the end: output channels
//! are a whole volume apart and would all fall in one cache set.

use super::{finish, PackedWeights, Tail, MAX_COLS, MR, NR, NV};
use crate::engine::cpu::conv::ConvShape;
use crate::engine::cpu::par::SharedMut;
use crate::model::graph::Act;
use rayon::prelude::*;

/// K (cin*k^3) rows per pass over one column panel: 128 x 32 floats = 16 KiB stay in L1.
const KC: usize = 128;

/// Any k x k x k convolution (strided ones, rows not a multiple of 8): im2col gathered straight
/// into column panels, K block by K block, then the panel microkernel.
#[allow(clippy::too_many_arguments)]
pub fn conv3d(x: &[f32], n: usize, s: ConvShape, w: &PackedWeights, bias: Option<&[f32]>, act: Act, out: &mut [f32]) {
    let in_vol: usize = s.dims.iter().product();
    let out_vol: usize = s.out_dims().iter().product();
    let kdim = s.cin * s.k * s.k * s.k;
    // Columns per task: a multiple of NR, at most MAX_COLS (the K block of them stays in L2), with
    // about four tasks per thread so both threads stay busy on the small deep levels.
    let by_threads = (n * out_vol)
        .div_ceil(4 * rayon::current_num_threads())
        .div_ceil(NR)
        * NR;
    let cols = by_threads.clamp(NR, MAX_COLS);
    let per_sample = out_vol.div_ceil(cols);
    let outp = SharedMut::new(out);
    (0..n * per_sample).into_par_iter().for_each(|t| {
        // Per worker thread, kept across calls: the gather block and the task's output block.
        thread_local! {
            static BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        BUFS.with_borrow_mut(|(col, acc)| {
            let (b, c) = (t / per_sample, t % per_sample);
            let p0 = c * cols;
            let np = cols.min(out_vol - p0);
            col.resize(np.div_ceil(NR) * panel_stride(KC), 0.0);
            // The K blocks accumulate into a small contiguous block, not into the output: output
            // rows are a whole volume apart (1 MiB at 64^3) and would all fall in one cache set.
            let ldc = np.div_ceil(NR) * NR + 16;
            acc.resize(s.cout * ldc, 0.0);
            let xb = &x[b * s.cin * in_vol..(b + 1) * s.cin * in_vol];
            let patches = Patches::new(xb, s, p0, np);
            let accp = SharedMut::new(acc);
            let mut k0 = 0;
            while k0 < kdim {
                let k1 = (k0 + KC).min(kdim);
                patches.gather(k0, k1, col);
                // SAFETY: `acc` is this task's own buffer of cout rows of ldc >= np floats.
                unsafe { multiply(w, col, k0, k1, np, accp, 0, ldc, bias, act) };
                k0 = k1;
            }
            for co in 0..s.cout {
                // SAFETY: columns p0..p0+np of every output channel of sample b belong to this task.
                let dst = unsafe { outp.slice(b * s.cout * out_vol + co * out_vol + p0, np) };
                dst.copy_from_slice(&acc[co * ldc..co * ldc + np]);
            }
        });
    });
}

/// The patches of output positions `p0..p0+np` (flat z,y,x), gathered K block by K block.
struct Patches<'a> {
    x: &'a [f32],
    s: ConvShape,
    np: usize,
    pieces: Vec<Piece>,
    /// Per kx, the output x range whose tap lands inside the input row.
    ranges: Vec<(usize, usize)>,
}

/// A run of output positions in one output row and one panel: one contiguous copy per K row.
struct Piece {
    panel: usize,
    /// Column inside the panel.
    lane: usize,
    iz: isize,
    iy: isize,
    x0: usize,
    len: usize,
}

impl<'a> Patches<'a> {
    fn new(x: &'a [f32], s: ConvShape, p0: usize, np: usize) -> Self {
        let [_, oh, ow] = s.out_dims();
        let (st, pad) = (s.stride, s.pad as isize);
        let w = s.dims[2];
        let mut pieces = Vec::new();
        let mut p = p0;
        while p < p0 + np {
            let (z, y, x0) = (p / (oh * ow), (p / ow) % oh, p % ow);
            let q = p - p0;
            let len = (ow - x0).min(p0 + np - p).min(NR - q % NR);
            let (iz, iy) = ((z * st) as isize - pad, (y * st) as isize - pad);
            pieces.push(Piece {
                panel: q / NR,
                lane: q % NR,
                iz,
                iy,
                x0,
                len,
            });
            p += len;
        }
        // 0 <= x*st + kx - pad < w.
        let ranges = (0..s.k)
            .map(|kx| {
                let off = kx as isize - pad;
                let lo = if off >= 0 {
                    0
                } else {
                    ((-off) as usize).div_ceil(st)
                };
                let hi = if (w as isize) - off <= 0 {
                    0
                } else {
                    (((w as isize - off - 1) as usize) / st + 1).min(ow)
                };
                (lo.min(ow), hi.max(lo.min(ow)))
            })
            .collect();
        Self {
            x,
            s,
            np,
            pieces,
            ranges,
        }
    }

    /// Writes K rows `r0..r1` into `col` as panels of `[r1-r0][NR]`; columns past `np` are zero.
    fn gather(&self, r0: usize, r1: usize, col: &mut [f32]) {
        let s = self.s;
        let [d, h, w] = s.dims;
        let (k, st, pad) = (s.k, s.stride, s.pad as isize);
        let kc = r1 - r0;
        let panels = self.np.div_ceil(NR);
        let tail = self.np % NR;
        for r in r0..r1 {
            let (ci, tap) = (r / (k * k * k), r % (k * k * k));
            let (kz, ky, kx) = (tap / (k * k), (tap / k) % k, tap % k);
            let (lo, hi) = self.ranges[kx];
            let xc = &self.x[ci * d * h * w..(ci + 1) * d * h * w];
            let row = (r - r0) * NR;
            for pc in &self.pieces {
                let dst = &mut col[pc.panel * panel_stride(kc) + row + pc.lane..][..pc.len];
                let (iz, iy) = (pc.iz + kz as isize, pc.iy + ky as isize);
                if iz < 0 || iz >= d as isize || iy < 0 || iy >= h as isize {
                    dst.fill(0.0);
                    continue;
                }
                let src = &xc[(iz as usize * h + iy as usize) * w..][..w];
                let x1 = pc.x0 + pc.len;
                if st == 1 && lo <= pc.x0 && x1 <= hi {
                    // Interior run (the common case): one short copy, inlined for the usual lengths.
                    let ix0 = (pc.x0 + kx) as isize - pad;
                    copy_run(dst, &src[ix0 as usize..ix0 as usize + pc.len]);
                    continue;
                }
                // Output x in [lo, hi) reads inside the row; the rest is padding.
                let (lo, hi) = (lo.clamp(pc.x0, x1), hi.clamp(pc.x0, x1));
                dst[..lo - pc.x0].fill(0.0);
                dst[hi - pc.x0..].fill(0.0);
                let ix0 = (lo * st + kx) as isize - pad;
                let body = &mut dst[lo - pc.x0..hi - pc.x0];
                if st == 1 {
                    body.copy_from_slice(&src[ix0 as usize..ix0 as usize + body.len()]);
                } else {
                    for (i, v) in body.iter_mut().enumerate() {
                        *v = src[ix0 as usize + i * st];
                    }
                }
            }
            if tail != 0 {
                col[(panels - 1) * panel_stride(kc) + row + tail..][..NR - tail].fill(0.0);
            }
        }
    }
}

/// Floats from one column panel to the next in the gather buffer: the panel plus one cache line,
/// so that the same K row of successive panels does not map to one L1 set (a 16 KiB stride would).
fn panel_stride(kc: usize) -> usize {
    kc * NR + 16
}

/// `dst.copy_from_slice(src)` with the run lengths that occur (rows of 8, 16 or a whole panel)
/// as fixed-size copies the compiler inlines, instead of a `memcpy` call per run.
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    fn fixed<const L: usize>(dst: &mut [f32], src: &[f32]) {
        let d: &mut [f32; L] = dst.try_into().expect("run length");
        *d = src.try_into().expect("run length");
    }
    match dst.len() {
        NR => fixed::<NR>(dst, src),
        16 => fixed::<16>(dst, src),
        8 => fixed::<8>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

/// `out[co][p0 + j] (+)= sum_{k0<=k<k1} w[co][k] col[k][j]` for `j < np` and every `co`; the first
/// block overwrites, the last adds the bias and applies the activation.
///
/// # Safety
/// The output columns must belong to the caller; `col` holds the panels of `[k1-k0][NR]`.
#[allow(clippy::too_many_arguments)]
unsafe fn multiply(
    w: &PackedWeights,
    col: &[f32],
    k0: usize,
    k1: usize,
    np: usize,
    out: SharedMut,
    off: usize,
    out_stride: usize,
    bias: Option<&[f32]>,
    act: Act,
) {
    let (kdim, kc) = (w.kdim, k1 - k0);
    let mpanels = w.cout.div_ceil(MR);
    let (first, last) = (k0 == 0, k1 == kdim);
    for pi in 0..np.div_ceil(NR) {
        let cols = NR.min(np - pi * NR);
        // This panel's K block (kc x NR floats) stays in L1 while every weight panel passes over it.
        let b = &col[pi * panel_stride(kc)..][..kc * NR];
        for mp in 0..mpanels {
            let rows = MR.min(w.cout - mp * MR);
            let a = &w.panels[(mp * kdim + k0) * MR..(mp * kdim + k1) * MR];
            let c = out.ptr().add(off + mp * MR * out_stride + pi * NR);
            let mut bias_rows = [0.0f32; MR];
            if let Some(bv) = bias {
                bias_rows[..rows].copy_from_slice(&bv[mp * MR..mp * MR + rows]);
            }
            let tail = Tail {
                rows,
                cols,
                first,
                last,
                bias: bias_rows,
                act,
            };
            kernel(kc, a, b, c, out_stride, &tail);
        }
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn kernel(kc: usize, a: &[f32], b: &[f32], c: *mut f32, ldc: usize, t: &Tail) {
    kernel_avx512(kc, a.as_ptr(), b.as_ptr(), c, ldc, t)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: usize, _: &[f32], _: &[f32], _: *mut f32, _: usize, _: &Tail) {
    unreachable!("panel kernel needs x86_64 with AVX-512")
}

/// C[8 x 32] (+)= A[kc x 8]^T B[kc x 32]; on the last K block adds the bias and applies the
/// activation. Rows past `t.rows` and columns past `t.cols` are neither read nor written.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    t: &Tail,
) {
    use std::arch::x86_64::*;
    let masks = t.lane_masks();
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for k in 0..kc {
        let bk = b.add(k * NR);
        let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(bk.add(16 * v)));
        let ak = a.add(k * MR);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ak.add(r));
            for v in 0..NV {
                row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
            }
        }
    }
    // The block's sum is added to the earlier blocks' (blocked summation, as in the direct kernel).
    if !t.first {
        for (r, row) in acc.iter_mut().enumerate().take(t.rows) {
            for (v, a) in row.iter_mut().enumerate() {
                *a = _mm512_add_ps(*a, _mm512_maskz_loadu_ps(masks[v], c.add(r * ldc + 16 * v)));
            }
        }
    }
    finish(acc, masks, c, ldc, t);
}

#[cfg(test)]
mod timing {
    use super::*;
    #[test]
    #[ignore]
    fn time_parts() {
        for (cin, cout, dim) in [(32usize, 32usize, 64usize), (64, 64, 32), (256, 256, 8)] {
            let s = ConvShape {
                cin,
                cout,
                k: 3,
                stride: 1,
                pad: 1,
                dims: [dim; 3],
            };
            let kdim = cin * 27;
            let x = vec![0.5f32; cin * dim * dim * dim];
            let w = PackedWeights::new(&vec![0.01f32; cout * kdim], cout, kdim);
            let np = MAX_COLS.min(dim * dim * dim);
            let panels = np.div_ceil(NR);
            let mut col = vec![0.0f32; panels * panel_stride(KC)];
            let mut out = vec![0.0f32; cout * dim * dim * dim];
            let reps = 200;
            let t = std::time::Instant::now();
            for i in 0..reps {
                Patches::new(&x, s, (i * np) % (dim * dim * dim - np + 1), np)
                    .gather(0, KC, &mut col);
            }
            let ti = t.elapsed().as_secs_f64() / reps as f64;
            let outp = SharedMut::new(&mut out);
            let t = std::time::Instant::now();
            for _ in 0..reps {
                unsafe {
                    multiply(
                        &w,
                        &col,
                        0,
                        KC,
                        np,
                        outp,
                        0,
                        dim * dim * dim,
                        None,
                        Act::None,
                    )
                };
            }
            let tm = t.elapsed().as_secs_f64() / reps as f64;
            let fl = 2.0 * (cout * KC * np) as f64;
            crate::errln!("cin {cin} cout {cout}: im2col {:.1} us, multiply {:.1} us = {:.1} GFLOP/s; overall {:.1} GFLOP/s", ti * 1e6, tm * 1e6, fl / tm * 1e-9, fl / (ti + tm) * 1e-9);
        }
    }
}
