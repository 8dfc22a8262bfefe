//! 3x3x3 stride-1 padding-1 convolutions (rows a multiple of 8): taps read straight from a
//! zero-padded slab of input rows, no im2col. Two microkernels over the same slab and weight
//! panels: AVX-512 (8 channels x 32 positions) and AVX2 + FMA (4 channels x 16 positions).

use super::{finish, Isa, PackedWeights, Tail, MAX_COLS, MR, NR, NV};
use crate::engine::cpu::conv::ConvShape;
use crate::engine::cpu::par::SharedMut;
use crate::model::graph::Act;
use rayon::prelude::*;

/// Weight rows per direct-kernel task are capped so that their weights (streamed once per 32
/// outputs) stay in L2; wider layers are split over output channels as well as positions.
const DIRECT_WEIGHT_BYTES: usize = 384 * 1024;
/// Input slab floats per direct-kernel task at most (about 384 KiB, L2 beside the weights).
const SLAB_FLOATS: usize = 96 * 1024;

/// Whether the direct kernel handles this shape: 3x3x3, stride 1, padding 1, rows a multiple of 8
/// (each 16-output vector is one run of 16 in a row, or two runs of 8).
pub fn fits(s: ConvShape) -> bool {
    takes_kernel(s.k, s.stride, s.pad) && s.dims[2].is_multiple_of(8)
}

/// The kernel part of `fits`: whether convolutions of this kernel, stride and padding take the
/// direct kernel at some input sizes.
pub fn takes_kernel(k: usize, stride: usize, pad: usize) -> bool {
    k == 3 && stride == 1 && pad == 1
}

/// Direct convolution: a task copies the input rows its outputs need (3 planes x rows+2, every
/// input channel) into a zero-padded slab, and the microkernel loads each tap's 16 inputs straight
/// from it: no im2col, no border tests, whole K in registers, one store per output. The copy also
/// takes the channels out of the input's power-of-two stride, under which they would all compete
/// for the same cache sets.
#[allow(clippy::too_many_arguments)]
pub fn conv3d(
    isa: Isa,
    x: &[f32],
    n: usize,
    s: ConvShape,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    act: Act,
    out: &mut [f32],
) {
    let [d, h, wd] = s.dims;
    let vol = d * h * wd;
    let kdim = s.cin * 27;
    let m_rows = ((DIRECT_WEIGHT_BYTES / (kdim * 4)) / MR * MR).clamp(MR, s.cout.div_ceil(MR) * MR);
    let m_chunks = s.cout.div_ceil(m_rows);
    // Output rows per task: the slab fits SLAB_FLOATS, at most MAX_COLS outputs, and about four
    // tasks per thread.
    let by_cache = (SLAB_FLOATS / (s.cin * 3 * (wd + 2)))
        .saturating_sub(2)
        .max(1);
    let by_threads = (n * d * h * m_chunks).div_ceil(4 * rayon::current_num_threads());
    let rows = by_cache.min(MAX_COLS / wd).min(by_threads).clamp(1, h);
    let row_blocks = h.div_ceil(rows);
    let outp = SharedMut::new(out);
    (0..m_chunks * n * d * row_blocks).into_par_iter().for_each(|t| {
        thread_local! {
            static SLAB: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SLAB.with_borrow_mut(|slab| {
            let (mc, b, z, rb) = (t / (n * d * row_blocks), (t / (d * row_blocks)) % n, (t / row_blocks) % d, t % row_blocks);
            let y0 = rb * rows;
            let ny = rows.min(h - y0);
            let geom = Slab::new(wd, ny);
            slab.resize(s.cin * geom.channel, 0.0);
            geom.fill(&x[b * s.cin * vol..(b + 1) * s.cin * vol], s.cin, s.dims, z, y0, slab);
            let outputs = ny * wd;
            let m_end = ((mc + 1) * m_rows).min(s.cout);
            let (panel, channels) = match isa {
                Isa::Avx512 => (NR, MR),
                Isa::Avx2 => (NR_AVX2, MR_AVX2),
            };
            for p in (0..outputs).step_by(panel) {
                let taps512 = (isa == Isa::Avx512).then(|| geom.taps(p, outputs));
                let taps2 = (isa == Isa::Avx2).then(|| geom.taps_avx2(p, outputs));
                for m0 in (mc * m_rows..m_end).step_by(channels) {
                    let rows = channels.min(s.cout - m0);
                    let mut bias_rows = [0.0f32; MR];
                    if let Some(bv) = bias {
                        bias_rows[..rows].copy_from_slice(&bv[m0..m0 + rows]);
                    }
                    let tail = Tail { rows, cols: panel.min(outputs - p), first: true, last: true, bias: bias_rows, act };
                    // Weight panel holding row m0 (AVX2 reads half a panel: rows m0..m0+4 of 8).
                    let a = &w.panels[(m0 / MR) * MR * kdim + m0 % MR..];
                    // SAFETY: rows y0..y0+ny of plane z of these channels of sample b belong to
                    // this task; masked-off lanes are not read.
                    unsafe {
                        let c = outp.ptr().add((b * s.cout + m0) * vol + (z * h + y0) * wd + p);
                        match (&taps512, &taps2) {
                            (Some(t512), _) => kernel_direct(s.cin, geom.channel, a, slab, t512, c, vol, &tail),
                            (_, Some(t2)) => kernel_direct_avx2(s.cin, geom.channel, a, slab, t2, c, vol, &tail),
                            _ => unreachable!(),
                        }
                    }
                }
            }
        });
    });
}

/// Output channels per AVX2 microkernel call (half a weight panel).
const MR_AVX2: usize = 4;
/// 8-float vectors per row of the AVX2 output block: 4 x 2 accumulators leave the 16 ymm registers
/// room for the operands (4 x 3 spilled and ran slower than the portable path).
const NV_AVX2: usize = 2;
/// Output positions per AVX2 microkernel call.
const NR_AVX2: usize = 8 * NV_AVX2;

/// The taps of one 16-output panel for the AVX2 kernel: each 8-lane vector is one run of a row.
struct Taps8 {
    /// Per vector and (kz, ky): slab offset (within a channel) of lane 0 at kx = 0. Vectors past
    /// the outputs point at offset 0: they are computed from valid memory and never stored.
    base: [[isize; 9]; NV_AVX2],
}

/// Layout of a task's input slab: per input channel, 3 planes of `ny + 2` rows of `w + 2` floats
/// (one zero column each side).
struct Slab {
    w: usize,
    ny: usize,
    /// Floats per input channel, nudged off multiples of 1 KiB so channels spread over cache sets.
    channel: usize,
}

impl Slab {
    fn new(w: usize, ny: usize) -> Self {
        let plain = 3 * (ny + 2) * (w + 2);
        let channel = if plain.is_multiple_of(256) { plain + 16 } else { plain };
        Self { w, ny, channel }
    }

    /// Copies the input rows around output rows `y0..y0+ny` of plane `z`; rows outside the volume
    /// and the side columns are zero.
    fn fill(&self, x: &[f32], cin: usize, dims: [usize; 3], z: usize, y0: usize, slab: &mut [f32]) {
        let [d, h, w] = dims;
        let row = w + 2;
        for ci in 0..cin {
            let xc = &x[ci * d * h * w..(ci + 1) * d * h * w];
            for kz in 0..3 {
                let iz = z as isize + kz as isize - 1;
                for r in 0..self.ny + 2 {
                    let iy = (y0 + r) as isize - 1;
                    let dst =
                        &mut slab[ci * self.channel + (kz * (self.ny + 2) + r) * row..][..row];
                    if iz < 0 || iz >= d as isize || iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                    } else {
                        dst[0] = 0.0;
                        dst[row - 1] = 0.0;
                        dst[1..=w].copy_from_slice(&xc[(iz as usize * h + iy as usize) * w..][..w]);
                    }
                }
            }
        }
    }

    /// Where the 32 outputs from `p` (of `outputs`, flat over the task's rows) read their taps.
    fn taps(&self, p: usize, outputs: usize) -> DirectTaps {
        let run = if self.w.is_multiple_of(16) { 16 } else { 8 };
        let mut t = DirectTaps {
            base: [[[0; 2]; 9]; NV],
            lanes: [[0; 2]; NV],
            split: run < 16,
        };
        for v in 0..NV {
            for half in 0..16 / run {
                let lane0 = half * run;
                let q = p + 16 * v + lane0;
                if q >= outputs {
                    continue;
                }
                let (r, xo) = (q / self.w, q % self.w);
                t.lanes[v][half] = (((1u32 << run) - 1) << lane0) as u16;
                for (tap, base) in t.base[v].iter_mut().enumerate() {
                    let (kz, ky) = (tap / 3, tap % 3);
                    // Lane j reads padded column xo + (j - lane0) + kx of slab row r + ky.
                    base[half] = ((kz * (self.ny + 2) + r + ky) * (self.w + 2) + xo) as isize
                        - lane0 as isize;
                }
            }
        }
        t
    }

    /// Where the 16 outputs from `p` read their taps, for the AVX2 kernel.
    fn taps_avx2(&self, p: usize, outputs: usize) -> Taps8 {
        let mut t = Taps8 { base: [[0; 9]; NV_AVX2] };
        for (v, base) in t.base.iter_mut().enumerate() {
            let q = p + 8 * v;
            if q >= outputs {
                continue;
            }
            let (r, xo) = (q / self.w, q % self.w);
            for (tap, b) in base.iter_mut().enumerate() {
                let (kz, ky) = (tap / 3, tap % 3);
                *b = ((kz * (self.ny + 2) + r + ky) * (self.w + 2) + xo) as isize;
            }
        }
        t
    }
}

/// The taps of one 32-output panel in a slab: each 16-lane vector is one run of 16 outputs or two
/// runs of 8 (halves 0 and 1).
struct DirectTaps {
    /// Per vector, (kz, ky) and half: slab offset (within a channel) read by lane 0 at kx = 0.
    base: [[[isize; 2]; 9]; NV],
    /// Per vector and half: the lanes that hold outputs.
    lanes: [[u16; 2]; NV],
    /// Whether the second half needs its own load (runs of 8).
    split: bool,
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_direct(
    cin: usize,
    channel: usize,
    a: &[f32],
    slab: &[f32],
    taps: &DirectTaps,
    c: *mut f32,
    ldc: usize,
    t: &Tail,
) {
    if taps.split {
        kernel_direct_avx512::<true>(cin, channel, a.as_ptr(), slab.as_ptr(), taps, c, ldc, t)
    } else {
        kernel_direct_avx512::<false>(cin, channel, a.as_ptr(), slab.as_ptr(), taps, c, ldc, t)
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_direct(
    _: usize,
    _: usize,
    _: &[f32],
    _: &[f32],
    _: &DirectTaps,
    _: *mut f32,
    _: usize,
    _: &Tail,
) {
    unreachable!("panel kernel needs x86_64 with AVX-512")
}

/// C[8 x 32] = A[cin*27 x 8]^T X, the 27 taps of each input channel loaded from the slab.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_direct_avx512<const SPLIT: bool>(
    cin: usize,
    channel: usize,
    a: *const f32,
    slab: *const f32,
    taps: &DirectTaps,
    c: *mut f32,
    ldc: usize,
    t: &Tail,
) {
    use std::arch::x86_64::*;
    let masks = t.lane_masks();
    // Blocked summation: a few input channels (~100 products) per register block, blocks added in
    // order into `total`, so the rounding error grows with K/block + block rather than with K.
    const CHANNELS_PER_BLOCK: usize = 4;
    let mut total = [[_mm512_setzero_ps(); NV]; MR];
    for c0 in (0..cin).step_by(CHANNELS_PER_BLOCK) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for ci in c0..(c0 + CHANNELS_PER_BLOCK).min(cin) {
            let xc = slab.wrapping_add(ci * channel);
            for q in 0..9 {
                let ak = a.add((ci * 27 + q * 3) * MR);
                for kx in 0..3 {
                    // wrapping: a masked-off lane's address may lie outside the slab.
                    let bv: [__m512; NV] = std::array::from_fn(|v| {
                        let lo = _mm512_maskz_loadu_ps(
                            taps.lanes[v][0],
                            xc.wrapping_offset(taps.base[v][q][0] + kx as isize),
                        );
                        if SPLIT {
                            _mm512_mask_loadu_ps(
                                lo,
                                taps.lanes[v][1],
                                xc.wrapping_offset(taps.base[v][q][1] + kx as isize),
                            )
                        } else {
                            lo
                        }
                    });
                    let akx = ak.add(kx * MR);
                    for (r, row) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_ps(*akx.add(r));
                        for v in 0..NV {
                            row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
                        }
                    }
                }
            }
        }
        for (tr, ar) in total.iter_mut().zip(&acc) {
            for (tv, av) in tr.iter_mut().zip(ar) {
                *tv = _mm512_add_ps(*tv, *av);
            }
        }
    }
    finish(total, masks, c, ldc, t);
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_direct_avx2(cin: usize, channel: usize, a: &[f32], slab: &[f32], taps: &Taps8, c: *mut f32, ldc: usize, t: &Tail) {
    kernel_direct_avx2_fma(cin, channel, a.as_ptr(), slab.as_ptr(), taps, c, ldc, t)
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_direct_avx2(_: usize, _: usize, _: &[f32], _: &[f32], _: &Taps8, _: *mut f32, _: usize, _: &Tail) {
    unreachable!("AVX2 kernel needs x86_64")
}

/// C[4 x 16] = A[cin*27 x 4]^T X with AVX2 + FMA: `a` points at row 0 of the 4 within an 8-row
/// weight panel. Same blocked summation and epilogue as the AVX-512 kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_direct_avx2_fma(cin: usize, channel: usize, a: *const f32, slab: *const f32, taps: &Taps8, c: *mut f32, ldc: usize, t: &Tail) {
    use std::arch::x86_64::*;
    const CHANNELS_PER_BLOCK: usize = 4;
    let zero = _mm256_setzero_ps();
    let mut total = [[zero; NV_AVX2]; MR_AVX2];
    for c0 in (0..cin).step_by(CHANNELS_PER_BLOCK) {
        let mut acc = [[zero; NV_AVX2]; MR_AVX2];
        for ci in c0..(c0 + CHANNELS_PER_BLOCK).min(cin) {
            let xc = slab.add(ci * channel);
            for q in 0..9 {
                let ak = a.add((ci * 27 + q * 3) * MR);
                for kx in 0..3 {
                    let bv: [__m256; NV_AVX2] = std::array::from_fn(|v| _mm256_loadu_ps(xc.offset(taps.base[v][q] + kx as isize)));
                    let akx = ak.add(kx * MR);
                    for (r, row) in acc.iter_mut().enumerate() {
                        let av = _mm256_broadcast_ss(&*akx.add(r));
                        for v in 0..NV_AVX2 {
                            row[v] = _mm256_fmadd_ps(av, bv[v], row[v]);
                        }
                    }
                }
            }
        }
        for (tr, ar) in total.iter_mut().zip(&acc) {
            for (tv, av) in tr.iter_mut().zip(ar) {
                *tv = _mm256_add_ps(*tv, *av);
            }
        }
    }
    let full_vectors = t.cols / 8;
    for (r, row) in total.iter().enumerate().take(t.rows) {
        let bv = _mm256_set1_ps(t.bias[r]);
        for (v, y) in row.iter().enumerate().take(full_vectors) {
            let mut y = _mm256_add_ps(*y, bv);
            match t.act {
                Act::Relu => y = _mm256_max_ps(y, zero),
                Act::LeakyRelu(slope) => {
                    let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(y, zero);
                    y = _mm256_blendv_ps(y, _mm256_mul_ps(y, _mm256_set1_ps(slope)), neg);
                }
                _ => {}
            }
            _mm256_storeu_ps(c.add(r * ldc + 8 * v), y);
        }
    }
    if !matches!(t.act, Act::None | Act::Relu | Act::LeakyRelu(_)) {
        for r in 0..t.rows {
            for j in 0..8 * full_vectors {
                let p = c.add(r * ldc + j);
                *p = t.act.apply(*p);
            }
        }
    }
}
