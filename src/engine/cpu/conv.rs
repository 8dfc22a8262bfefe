//! 3-D convolutions on the CPU: cubic kernel k (1 or 3), stride 1 or 2, zero padding, optional
//! bias and fused activation; and the kernel-2 stride-2 transposed convolution.
//!
//! Lowered to matrix products: each task gathers an im2col block for a few output rows of one
//! output plane (small enough to stay in cache) and multiplies it by the weight matrix with
//! `matrixmultiply::sgemm`; tasks run in parallel and write disjoint output rows.

pub use super::simd::PackedWeights;
use super::simd;
use super::par::SharedMut;
use crate::model::graph::Act;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct ConvShape {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    /// Input spatial dims (d, h, w).
    pub dims: [usize; 3],
}

impl ConvShape {
    pub fn out_dims(&self) -> [usize; 3] {
        self.dims.map(|l| (l + 2 * self.pad - self.k) / self.stride + 1)
    }
}

/// im2col floats per task (2 MiB): wide enough that sgemm's packing of the weights is amortised over
/// many columns (deep levels ran 2x faster than with 512 KiB blocks), small enough for L2/L3.
const BLOCK_FLOATS: usize = 512 * 1024;

/// `out[n, cout, od, oh, ow] = act(bias + sum w * x)`; `w` is `[cout, cin, k, k, k]`.
pub fn conv3d(x: &[f32], n: usize, s: ConvShape, w: &[f32], bias: Option<&[f32]>, act: Act, out: &mut [f32]) {
    let packed = wants_panels(s).then(|| PackedWeights::new(w, s.cout, s.cin * s.k * s.k * s.k));
    conv3d_with(x, n, s, w, packed.as_ref(), bias, act, out)
}

/// Whether a convolution of this shape goes through the SIMD kernels on this CPU (pointwise ones
/// never do: they are a plain matrix product already).
pub fn wants_panels(s: ConvShape) -> bool {
    simd::handles(s) && !is_pointwise(s.k, s.stride, s.pad)
}

/// Whether convolutions of this kernel, stride and padding take the SIMD kernels at some input
/// sizes on this CPU: the weights an engine packs once.
pub fn may_want_panels(k: usize, stride: usize, pad: usize) -> bool {
    simd::may_handle(k, stride, pad) && !is_pointwise(k, stride, pad)
}

fn is_pointwise(k: usize, stride: usize, pad: usize) -> bool {
    k == 1 && stride == 1 && pad == 0
}

/// `conv3d` with the weights already packed for the SIMD kernels (`packed` from `may_want_panels`);
/// shapes the kernels do not take here run on the portable path.
#[allow(clippy::too_many_arguments)]
pub fn conv3d_with(x: &[f32], n: usize, s: ConvShape, w: &[f32], packed: Option<&PackedWeights>, bias: Option<&[f32]>, act: Act, out: &mut [f32]) {
    if let Some(p) = packed.filter(|_| wants_panels(s)) {
        return simd::conv3d(x, n, s, p, bias, act, out);
    }
    conv3d_portable(x, n, s, w, bias, act, out)
}

/// The portable path (any CPU): cache-blocked im2col + `matrixmultiply::sgemm`.
pub fn conv3d_portable(x: &[f32], n: usize, s: ConvShape, w: &[f32], bias: Option<&[f32]>, act: Act, out: &mut [f32]) {
    let [d, h, wd] = s.dims;
    let [od, oh, ow] = s.out_dims();
    let in_vol = d * h * wd;
    let out_vol = od * oh * ow;
    let kk = s.k * s.k * s.k;
    let kdim = s.cin * kk;
    assert_eq!(x.len(), n * s.cin * in_vol);
    assert_eq!(w.len(), s.cout * kdim);
    assert_eq!(out.len(), n * s.cout * out_vol);
    let outp = SharedMut::new(out);

    if is_pointwise(s.k, s.stride, s.pad) {
        // Pointwise: out[cout][v] = w[cout][cin] x x[cin][v] on column chunks.
        let chunk = (BLOCK_FLOATS / s.cin.max(1)).clamp(256, 16384);
        let chunks = out_vol.div_ceil(chunk);
        (0..n * chunks).into_par_iter().for_each(|t| {
            let (b, c) = (t / chunks, t % chunks);
            let v0 = c * chunk;
            let nv = chunk.min(out_vol - v0);
            // SAFETY: disjoint columns v0..v0+nv of sample b.
            unsafe {
                matrixmultiply::sgemm(
                    s.cout,
                    s.cin,
                    nv,
                    1.0,
                    w.as_ptr(),
                    s.cin as isize,
                    1,
                    x.as_ptr().add(b * s.cin * in_vol + v0),
                    in_vol as isize,
                    1,
                    0.0,
                    outp.ptr().add(b * s.cout * out_vol + v0),
                    out_vol as isize,
                    1,
                );
                epilogue(outp, b * s.cout * out_vol + v0, out_vol, s.cout, nv, bias, act);
            }
        });
        return;
    }

    // Rows per task: as many as the block holds, but leave about four tasks per thread.
    let by_cache = (BLOCK_FLOATS / (kdim * ow).max(1)).clamp(1, oh);
    let by_threads = (n * od * oh / (4 * rayon::current_num_threads())).max(1);
    let rows = by_cache.min(by_threads);
    let row_blocks = oh.div_ceil(rows);
    let tasks = n * od * row_blocks;
    (0..tasks).into_par_iter().for_each(|t| {
        // One scratch block per worker thread, kept across calls: no allocation per task.
        thread_local! {
            static COL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        COL.with_borrow_mut(|col| {
        let b = t / (od * row_blocks);
        let z = (t / row_blocks) % od;
        let y0 = (t % row_blocks) * rows;
        let ny = rows.min(oh - y0);
        let ncols = ny * ow;
        col.resize(kdim * ncols, 0.0);
        let xb = &x[b * s.cin * in_vol..(b + 1) * s.cin * in_vol];
        im2col_rows(xb, s, z, y0, ny, col);
        let off = b * s.cout * out_vol + z * oh * ow + y0 * ow;
        // SAFETY: rows y0..y0+ny of plane z of sample b belong to this task only.
        unsafe {
            matrixmultiply::sgemm(
                s.cout,
                kdim,
                ncols,
                1.0,
                w.as_ptr(),
                kdim as isize,
                1,
                col.as_ptr(),
                ncols as isize,
                1,
                0.0,
                outp.ptr().add(off),
                out_vol as isize,
                1,
            );
            epilogue(outp, off, out_vol, s.cout, ncols, bias, act);
        }
        });
    });
}

/// Adds the bias and applies the activation to `cout` rows of `len` values, row stride `stride`.
///
/// # Safety
/// The rows must belong to the calling task.
unsafe fn epilogue(out: SharedMut, off: usize, stride: usize, cout: usize, len: usize, bias: Option<&[f32]>, act: Act) {
    if bias.is_none() && act == Act::None {
        return;
    }
    for c in 0..cout {
        let row = out.slice(off + c * stride, len);
        let b = bias.map_or(0.0, |b| b[c]);
        for v in row.iter_mut() {
            *v = act.apply(*v + b);
        }
    }
}

/// Gathers the im2col block of output rows `y0..y0+ny` of output plane `z`:
/// `col[((ci*k + kz)*k + ky)*k + kx][yy*ow + xo]`.
fn im2col_rows(x: &[f32], s: ConvShape, z: usize, y0: usize, ny: usize, col: &mut [f32]) {
    let [d, h, w] = s.dims;
    let [_, _, ow] = s.out_dims();
    let ncols = ny * ow;
    let (k, st, p) = (s.k, s.stride, s.pad as isize);
    // Valid output x range for a tap kx: 0 <= xo*st + kx - p < w.
    let x_range = |kx: usize| -> (usize, usize) {
        let off = kx as isize - p;
        let lo = if off >= 0 { 0 } else { ((-off) as usize).div_ceil(st) };
        let hi_excl = if (w as isize) - off <= 0 { 0 } else { (((w as isize - off - 1) as usize) / st + 1).min(ow) };
        (lo.min(ow), hi_excl.max(lo.min(ow)))
    };
    let mut r = 0;
    for ci in 0..s.cin {
        let xc = &x[ci * d * h * w..(ci + 1) * d * h * w];
        for kz in 0..k {
            let iz = (z * st) as isize + kz as isize - p;
            for ky in 0..k {
                for kx in 0..k {
                    let dst = &mut col[r * ncols..(r + 1) * ncols];
                    r += 1;
                    if iz < 0 || iz >= d as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let (lo, hi) = x_range(kx);
                    for yy in 0..ny {
                        let row = &mut dst[yy * ow..(yy + 1) * ow];
                        let iy = ((y0 + yy) * st) as isize + ky as isize - p;
                        if iy < 0 || iy >= h as isize {
                            row.fill(0.0);
                            continue;
                        }
                        let src = &xc[(iz as usize * h + iy as usize) * w..][..w];
                        row[..lo].fill(0.0);
                        row[hi..].fill(0.0);
                        let ix0 = (lo * st) as isize + kx as isize - p;
                        if st == 1 {
                            row[lo..hi].copy_from_slice(&src[ix0 as usize..ix0 as usize + (hi - lo)]);
                        } else {
                            for (i, v) in row[lo..hi].iter_mut().enumerate() {
                                *v = src[ix0 as usize + i * st];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Transposed convolution, kernel 2, stride 2, no bias: `w` is `[cin, cout, 2, 2, 2]`;
/// `out[co, 2z+a, 2y+b, 2x+c] = sum_ci w[ci, co, a, b, c] * x[ci, z, y, x]`.
pub fn conv_transpose2(x: &[f32], n: usize, cin: usize, cout: usize, dims: [usize; 3], w: &[f32], out: &mut [f32]) {
    let [d, h, wd] = dims;
    let vol = d * h * wd;
    let rows = cout * 8;
    assert_eq!(x.len(), n * cin * vol);
    assert_eq!(w.len(), cin * rows);
    assert_eq!(out.len(), n * cout * vol * 8);
    // Every value is written by the GEMM (beta 0) before the scatter reads it.
    let mut tmp = super::pool::for_overwrite(rows * vol);
    for b in 0..n {
        // tmp[(co, a, b, c)][v] = sum_ci w[ci][(co,a,b,c)] * x[ci][v]: A is w transposed.
        let chunk = (BLOCK_FLOATS / cin.max(1)).clamp(256, 16384);
        let tp = SharedMut::new(&mut tmp);
        let xb = &x[b * cin * vol..(b + 1) * cin * vol];
        (0..vol.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let v0 = c * chunk;
            let nv = chunk.min(vol - v0);
            // SAFETY: disjoint columns of tmp.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    cin,
                    nv,
                    1.0,
                    w.as_ptr(),
                    1,
                    rows as isize,
                    xb.as_ptr().add(v0),
                    vol as isize,
                    1,
                    0.0,
                    tp.ptr().add(v0),
                    vol as isize,
                    1,
                );
            }
        });
        let ob = &mut out[b * cout * vol * 8..(b + 1) * cout * vol * 8];
        let (oh, ow) = (2 * h, 2 * wd);
        ob.par_chunks_mut(vol * 8).enumerate().for_each(|(co, oc)| {
            for tap in 0..8 {
                let (a, bb, c) = (tap >> 2, (tap >> 1) & 1, tap & 1);
                let src = &tmp[(co * 8 + tap) * vol..][..vol];
                for z in 0..d {
                    for y in 0..h {
                        let orow = ((2 * z + a) * oh + 2 * y + bb) * ow + c;
                        let srow = &src[(z * h + y) * wd..][..wd];
                        for (xx, &v) in srow.iter().enumerate() {
                            oc[orow + 2 * xx] = v;
                        }
                    }
                }
            }
        });
    }
    super::pool::release(tmp);
}

/// The direct formula, for tests: one output element at a time, f64 accumulation.
#[allow(clippy::too_many_arguments)]
pub fn conv3d_naive(x: &[f32], n: usize, s: ConvShape, w: &[f32], bias: Option<&[f32]>, act: Act) -> Vec<f32> {
    let [d, h, wd] = s.dims;
    let [od, oh, ow] = s.out_dims();
    let k = s.k;
    let mut out = vec![0.0f32; n * s.cout * od * oh * ow];
    let mut i = 0;
    for b in 0..n {
        for co in 0..s.cout {
            for z in 0..od {
                for y in 0..oh {
                    for xo in 0..ow {
                        let mut acc = bias.map_or(0.0, |b| b[co] as f64);
                        for ci in 0..s.cin {
                            for kz in 0..k {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let iz = (z * s.stride + kz) as isize - s.pad as isize;
                                        let iy = (y * s.stride + ky) as isize - s.pad as isize;
                                        let ix = (xo * s.stride + kx) as isize - s.pad as isize;
                                        if iz < 0 || iy < 0 || ix < 0 || iz >= d as isize || iy >= h as isize || ix >= wd as isize {
                                            continue;
                                        }
                                        let xv = x[(((b * s.cin + ci) * d + iz as usize) * h + iy as usize) * wd + ix as usize];
                                        let wv = w[(((co * s.cin + ci) * k + kz) * k + ky) * k + kx];
                                        acc += xv as f64 * wv as f64;
                                    }
                                }
                            }
                        }
                        out[i] = act.apply(acc as f32);
                        i += 1;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::util::SplitMix64;

    /// A conv test case: (cin, cout, k, stride, pad, input dims, with bias, fused activation).
    pub(crate) type CaseSpec = (usize, usize, usize, usize, usize, [usize; 3], bool, Act);

    /// Case `i` of a table: its shape, random input (batch 2), weights and bias, and the direct
    /// formula's output, for the tests of every conv path.
    pub(crate) struct Case {
        pub s: ConvShape,
        pub n: usize,
        pub x: Vec<f32>,
        pub w: Vec<f32>,
        pub bias: Option<Vec<f32>>,
        pub act: Act,
        pub want: Vec<f32>,
    }

    pub(crate) fn case(i: usize, &(cin, cout, k, stride, pad, dims, bias, act): &CaseSpec) -> Case {
        let s = ConvShape { cin, cout, k, stride, pad, dims };
        let n = 2;
        let x = rand(n * cin * dims.iter().product::<usize>(), i as u64);
        let w = rand(cout * cin * k * k * k, 100 + i as u64);
        let bias = bias.then(|| rand(cout, 200 + i as u64));
        let want = conv3d_naive(&x, n, s, &w, bias.as_deref(), act);
        Case { s, n, x, w, bias, act, want }
    }

    pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        let mut v = vec![0.0; n];
        r.fill_uniform(&mut v, -1.0, 1.0);
        v
    }


    #[test]
    fn conv_matches_direct_formula() {
        let cases: [CaseSpec; 6] = [
            (3, 5, 3, 1, 1, [5, 7, 6], true, Act::None),
            (4, 6, 3, 2, 1, [6, 9, 7], false, Act::Relu),
            (2, 4, 3, 2, 1, [5, 5, 5], true, Act::Silu),
            (6, 3, 1, 1, 0, [3, 4, 5], true, Act::Sigmoid),
            (1, 8, 3, 1, 1, [4, 6, 8], false, Act::LeakyRelu(0.01)),
            (5, 2, 3, 1, 1, [1, 1, 3], true, Act::TanhScale(2.0)),
        ];
        for (i, spec) in cases.iter().enumerate() {
            let Case { s, n, x, w, bias, act, want } = case(i, spec);
            let mut got = vec![f32::NAN; want.len()];
            conv3d_portable(&x, n, s, &w, bias.as_deref(), act, &mut got);
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "case {i}: portable path, max |diff| {d}");
            let mut got = vec![f32::NAN; want.len()];
            conv3d(&x, n, s, &w, bias.as_deref(), act, &mut got);
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "case {i}: dispatched path, max |diff| {d}");
        }
    }

    #[test]
    fn transposed_conv_matches_direct_formula() {
        let (n, cin, cout, dims) = (2, 3, 4, [2, 3, 4]);
        let x = rand(n * cin * 24, 1);
        let w = rand(cin * cout * 8, 2);
        let mut got = vec![f32::NAN; n * cout * 24 * 8];
        conv_transpose2(&x, n, cin, cout, dims, &w, &mut got);
        let (od, oh, ow) = (4, 6, 8);
        for b in 0..n {
            for co in 0..cout {
                for z in 0..od {
                    for y in 0..oh {
                        for xx in 0..ow {
                            let mut acc = 0.0f64;
                            for ci in 0..cin {
                                let wi = (((ci * cout + co) * 2 + z % 2) * 2 + y % 2) * 2 + xx % 2;
                                let xi = (((b * cin + ci) * 2 + z / 2) * 3 + y / 2) * 4 + xx / 2;
                                acc += w[wi] as f64 * x[xi] as f64;
                            }
                            let g = got[(((b * cout + co) * od + z) * oh + y) * ow + xx];
                            assert!((g as f64 - acc).abs() < 1e-5, "{g} vs {acc}");
                        }
                    }
                }
            }
        }
    }
}
