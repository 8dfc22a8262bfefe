//! Convolutions with hand-written SIMD microkernels on x86_64 (`Isa`: AVX-512F, or AVX2 + FMA;
//! other CPUs take the portable path in `conv`). The kernels compute a block of output channels
//! x positions in registers (8 x 32 in 16 zmm; 4 x 16 in 8 ymm) from weights packed once per
//! model into 8-row panels (`PackedWeights`), and add the bias and ReLU/LeakyReLU in registers
//! before the one store:
//!
//! - `direct`: 3x3x3 stride-1 convolutions (most of the work; AVX-512 and AVX2): taps loaded
//!   straight from a zero-padded copy of the input rows, no im2col;
//! - `gather` (AVX-512 only): everything else: im2col gathered straight into the kernel's panel
//!   layout. With AVX2 those shapes take the portable path.
//!
//! Products are summed in blocks of about a hundred, blocks added in order, which keeps the
//! rounding error below that of one long chain. CPU twin: `conv::conv3d_naive` (tests below).

mod direct;
mod gather;

use super::conv::ConvShape;
use crate::model::graph::Act;

/// Output channels per microkernel call (rows of the weight panel).
pub const MR: usize = 8;
/// 16-float vectors per row of the output block.
pub const NV: usize = 2;
/// Output positions per microkernel call.
pub const NR: usize = 16 * NV;
/// Output positions per task at most (the gather path's K block of them stays in L2).
pub const MAX_COLS: usize = 16 * NR;

/// The vector instruction sets the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: both kernels.
    Avx512,
    /// AVX2 + FMA: the direct kernel (3x3x3 stride 1); other shapes take the portable path.
    Avx2,
}

/// The best kernel set this CPU runs, or None (portable path only). `FASTDET_CPU_KERNEL=portable`
/// or `=avx2` caps it (comparisons, debugging).
pub fn isa() -> Option<Isa> {
    static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("FASTDET_CPU_KERNEL").unwrap_or_default();
        match cap.as_str() {
            "portable" => None,
            "avx2" => detect().filter(|_| detect_avx2()).map(|_| Isa::Avx2),
            _ => detect(),
        }
    })
}

/// Refuses a `FASTDET_CPU_KERNEL` value [`isa`] would not know (it would silently mean "best").
pub fn check_env() -> anyhow::Result<()> {
    match std::env::var("FASTDET_CPU_KERNEL").as_deref() {
        Err(_) | Ok("" | "portable" | "avx2" | "auto") => Ok(()),
        Ok(v) => anyhow::bail!("FASTDET_CPU_KERNEL={v}: expected portable, avx2 or auto (the best this CPU runs)"),
    }
}

/// Whether this CPU runs the kernels (any `Isa`).
pub fn available() -> bool {
    isa().is_some()
}

/// Whether a convolution of this shape goes through the kernels on this CPU.
pub fn handles(s: ConvShape) -> bool {
    isa().is_some_and(|i| handles_on(i, s))
}

/// Whether the kernels on this CPU take convolutions of this kernel, stride and padding at some input
/// sizes (an engine packs those weights once; `handles` decides per call).
pub fn may_handle(k: usize, stride: usize, pad: usize) -> bool {
    isa().is_some_and(|i| may_handle_on(i, k, stride, pad))
}

/// `may_handle` for the kernels of `isa`.
pub fn may_handle_on(isa: Isa, k: usize, stride: usize, pad: usize) -> bool {
    match isa {
        Isa::Avx512 => true,
        Isa::Avx2 => direct::takes_kernel(k, stride, pad),
    }
}

/// Whether the kernels of `isa` take a convolution of this shape.
pub fn handles_on(isa: Isa, s: ConvShape) -> bool {
    match isa {
        Isa::Avx512 => true,
        Isa::Avx2 => direct::fits(s),
    }
}

/// Every instruction set this CPU runs kernels for (ignoring `FASTDET_CPU_KERNEL`), best first.
pub fn isas_here() -> Vec<Isa> {
    match detect() {
        Some(Isa::Avx512) if detect_avx2() => vec![Isa::Avx512, Isa::Avx2],
        Some(i) => vec![i],
        None => vec![],
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Option<Isa> {
    if std::arch::is_x86_feature_detected!("avx512f") {
        Some(Isa::Avx512)
    } else if detect_avx2() {
        Some(Isa::Avx2)
    } else {
        None
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Option<Isa> {
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2() -> bool {
    false
}

/// Weights `[cout, K]` re-laid as `ceil(cout/MR)` panels of `[K][MR]`, zero rows past `cout`.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    pub cout: usize,
    pub kdim: usize,
    panels: Vec<f32>,
}

impl PackedWeights {
    pub fn new(w: &[f32], cout: usize, kdim: usize) -> Self {
        assert_eq!(w.len(), cout * kdim);
        let np = cout.div_ceil(MR);
        let mut panels = vec![0.0f32; np * kdim * MR];
        for co in 0..cout {
            let (p, r) = (co / MR, co % MR);
            for k in 0..kdim {
                panels[(p * kdim + k) * MR + r] = w[co * kdim + k];
            }
        }
        Self { cout, kdim, panels }
    }
}

/// `out = act(bias + conv(x, w))` for k x k x k convolutions, any stride and padding, with the
/// kernels `isa()` chose; the caller checked `available()`.
#[allow(clippy::too_many_arguments)]
pub fn conv3d(x: &[f32], n: usize, s: ConvShape, w: &PackedWeights, bias: Option<&[f32]>, act: Act, out: &mut [f32]) {
    conv3d_on(isa().expect("caller checked available()"), x, n, s, w, bias, act, out)
}

/// `conv3d` with the given instruction set (the tests and the self-test run every one the CPU
/// has).
#[allow(clippy::too_many_arguments)]
pub fn conv3d_on(isa: Isa, x: &[f32], n: usize, s: ConvShape, w: &PackedWeights, bias: Option<&[f32]>, act: Act, out: &mut [f32]) {
    // The kernels execute these instructions: refuse an instruction set this CPU lacks.
    assert!(isas_here().contains(&isa), "this CPU cannot run the {isa:?} kernels");
    let kdim = s.cin * s.k * s.k * s.k;
    assert_eq!((w.cout, w.kdim), (s.cout, kdim));
    assert_eq!(x.len(), n * s.cin * s.dims.iter().product::<usize>());
    assert_eq!(out.len(), n * s.cout * s.out_dims().iter().product::<usize>());
    if direct::fits(s) {
        direct::conv3d(isa, x, n, s, w, bias, act, out)
    } else {
        assert_eq!(isa, Isa::Avx512, "only the AVX-512 kernels take this shape");
        gather::conv3d(x, n, s, w, bias, act, out)
    }
}

/// What one microkernel call must respect at the edges and at the ends of K.
pub(crate) struct Tail {
    pub rows: usize,
    pub cols: usize,
    pub first: bool,
    pub last: bool,
    pub bias: [f32; MR],
    pub act: Act,
}

impl Tail {
    /// Per 16-lane vector of an output row, the lanes inside `cols` (the masked loads and stores).
    pub fn lane_masks(&self) -> [u16; NV] {
        std::array::from_fn(|v| {
            let n = self.cols.saturating_sub(16 * v).min(16);
            ((1u32 << n) - 1) as u16
        })
    }
}

/// The end of a microkernel call: on the last K block bias and activation, then the masked store.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn finish(
    mut acc: [[std::arch::x86_64::__m512; NV]; MR],
    masks: [std::arch::x86_64::__mmask16; NV],
    c: *mut f32,
    ldc: usize,
    t: &Tail,
) {
    use std::arch::x86_64::*;
    if t.last {
        let zero = _mm512_setzero_ps();
        for (r, row) in acc.iter_mut().enumerate().take(t.rows) {
            let bv = _mm512_set1_ps(t.bias[r]);
            for a in row.iter_mut() {
                *a = _mm512_add_ps(*a, bv);
                match t.act {
                    Act::None => {}
                    Act::Relu => *a = _mm512_max_ps(*a, zero),
                    Act::LeakyRelu(slope) => {
                        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(*a, zero);
                        *a = _mm512_mask_mul_ps(*a, neg, *a, _mm512_set1_ps(slope));
                    }
                    _ => {}
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(t.rows) {
        for (v, a) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), masks[v], *a);
        }
    }
    // Activations with exp/tanh go through the scalar formula on the stored (L1-hot) block.
    if t.last && !matches!(t.act, Act::None | Act::Relu | Act::LeakyRelu(_)) {
        for r in 0..t.rows {
            for j in 0..t.cols {
                let p = c.add(r * ldc + j);
                *p = t.act.apply(*p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::conv::tests::{case, max_diff, Case, CaseSpec};

    #[test]
    fn packing_puts_each_weight_in_its_panel_row() {
        let (cout, kdim) = (11, 5);
        let w: Vec<f32> = (0..cout * kdim).map(|i| i as f32).collect();
        let p = PackedWeights::new(&w, cout, kdim);
        assert_eq!(p.panels.len(), 2 * kdim * MR);
        assert_eq!(p.panels[(kdim + 3) * MR + 2], w[10 * kdim + 3]);
        assert_eq!(
            p.panels[(kdim + 3) * MR + 3],
            0.0,
            "rows past cout are zero"
        );
    }

    #[test]
    fn simd_conv_matches_direct_formula() {
        let mut isas = Vec::new();
        match detect() {
            Some(Isa::Avx512) => isas.extend([Isa::Avx512, Isa::Avx2].into_iter().filter(|&i| i == Isa::Avx512 || detect_avx2())),
            Some(Isa::Avx2) => {
                crate::errln!("SKIP AVX-512 kernels: this CPU has no AVX-512F");
                isas.push(Isa::Avx2);
            }
            None => crate::errln!("SKIP simd_conv_matches_direct_formula: this CPU has neither AVX-512F nor AVX2+FMA (the portable path is tested in conv.rs)"),
        }
        // Edge classes: cout not a multiple of MR, columns not a multiple of NR, stride 2,
        // K longer than KC, 1-voxel axes, every fused activation, batch of 2.
        let cases: [CaseSpec; 13] = [
            (3, 5, 3, 1, 1, [5, 7, 6], true, Act::None),
            (4, 16, 3, 2, 1, [6, 9, 7], false, Act::Relu),
            (2, 9, 3, 2, 1, [5, 5, 5], true, Act::Silu),
            (6, 3, 1, 1, 0, [3, 4, 5], true, Act::Sigmoid),
            (1, 8, 3, 1, 1, [4, 6, 8], false, Act::LeakyRelu(0.01)),
            (5, 2, 3, 1, 1, [1, 1, 3], true, Act::TanhScale(2.0)),
            (12, 24, 3, 1, 1, [6, 8, 10], true, Act::LeakyRelu(0.01)),
            // Direct kernel (rows a multiple of 16): borders on every side, partial panels.
            (3, 13, 3, 1, 1, [3, 5, 16], true, Act::Relu),
            (5, 8, 3, 1, 1, [2, 3, 48], false, Act::None),
            (2, 16, 3, 1, 1, [1, 1, 16], true, Act::Silu),
            (4, 10, 3, 1, 1, [3, 4, 8], true, Act::Relu),
            (3, 8, 3, 1, 1, [2, 1, 24], false, Act::None),
            // Wide enough to be split over output channels (weights past DIRECT_WEIGHT_BYTES).
            (64, 64, 3, 1, 1, [2, 3, 16], true, Act::None),
        ];
        let direct_cases = cases.iter().filter(|c| direct::fits(ConvShape { cin: c.0, cout: c.1, k: c.2, stride: c.3, pad: c.4, dims: c.5 })).count();
        assert!(direct_cases >= 6 && direct_cases < cases.len(), "both kernels are exercised ({direct_cases} direct)");
        for isa in isas {
            for (i, spec) in cases.iter().enumerate() {
                let Case { s, n, x, w, bias, act, want } = case(i, spec);
                // An engine packs weights by kernel, stride and padding alone: every shape the
                // kernels take must be among those.
                assert!(!handles_on(isa, s) || may_handle_on(isa, s.k, s.stride, s.pad), "{isa:?} case {i}: taken but not packed");
                if !handles_on(isa, s) {
                    continue;
                }
                let mut got = vec![f32::NAN; want.len()];
                conv3d_on(isa, &x, n, s, &PackedWeights::new(&w, s.cout, s.cin * s.k * s.k * s.k), bias.as_deref(), act, &mut got);
                let d = max_diff(&got, &want);
                assert!(d < 1e-4, "{isa:?} case {i}: max |diff| {d}");
            }
        }
    }
}
