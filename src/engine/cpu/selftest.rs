//! `fastdet selftest --device cpu`: the CPU engine's SIMD kernels against their twins on fresh
//! random data — every conv kernel on every instruction set this CPU has against the direct
//! formula (`conv::conv3d_naive`, f64 sums), then both seed networks on the SIMD kernels against the
//! same networks on the portable path. Same report format as the GPU self-test.

use super::conv::{conv3d_naive, conv3d_portable, ConvShape, PackedWeights};
use super::simd;
use super::CpuEngine;
use crate::engine::cuda::selftest::{diff, Report, Row, Status};
use crate::engine::TileEngine;
use crate::model::graph::{Act, Graph};
use crate::model::spec::{Arch, ModelSpec};
use crate::util::SplitMix64;
use crate::weights::Weights;
use anyhow::Result;
use std::time::Instant;

/// Conv shapes at the seed's channel counts (small volumes): the first conv, every level's 3x3x3,
/// the strided downsamplings, DynUNet's 320-channel bottom, rows of 8 / 16 / 24 / 32, channel
/// counts that are not multiples of the kernels' blocks, and fused activations.
const SHAPES: &[(usize, usize, usize, usize, [usize; 3], Act)] = &[
    (1, 32, 3, 1, [8, 16, 32], Act::None),
    (32, 32, 3, 1, [6, 16, 32], Act::None),
    (32, 64, 3, 2, [8, 16, 32], Act::None),
    (64, 64, 3, 1, [4, 8, 16], Act::LeakyRelu(0.01)),
    (128, 128, 3, 1, [4, 8, 8], Act::None),
    (256, 256, 3, 1, [2, 4, 8], Act::Relu),
    (320, 320, 3, 1, [2, 2, 4], Act::None),
    (48, 48, 3, 1, [4, 6, 24], Act::Silu),
    (13, 9, 3, 1, [3, 5, 16], Act::None),
    (7, 11, 3, 2, [5, 7, 9], Act::None),
];

/// Tolerances against f64 sums of products of values in [-1, 1]: f32 rounding of K-term sums.
const CONV_TOL_ABS: f64 = 1e-3;
const CONV_TOL_REL: f64 = 1e-5;
/// Networks: SIMD and portable f32 paths sum in different orders; the bounds of the golden tests.
const NET_TOL_ABS: [f64; 3] = [1e-4, 2e-4, 2e-4];
const NET_TOL_REL: f64 = 1e-4;

/// What the CPU self-test checks.
#[derive(Debug, Clone, Copy)]
pub struct CpuChecks {
    pub seed: u64,
    /// The SIMD conv kernels against the direct formula.
    pub kernels: bool,
    /// Both seed networks, SIMD against the portable path, on this tile (a batch of two).
    pub networks: Option<[usize; 3]>,
}

impl CpuChecks {
    /// Everything; the networks on 64^3 (32^3 when `quick`).
    pub fn all(seed: u64, quick: bool) -> CpuChecks {
        CpuChecks { seed, kernels: true, networks: Some(if quick { [32; 3] } else { [64; 3] }) }
    }
}

/// Runs the CPU self-test.
pub fn run(checks: CpuChecks, sink: &mut dyn FnMut(&Row)) -> Result<Report> {
    let seed = checks.seed;
    let mut rows = Vec::new();
    let mut timings = Vec::new();
    let mut notes = Vec::new();
    let mut push = |rows: &mut Vec<Row>, r: Row| {
        sink(&r);
        rows.push(r);
    };
    let isas = simd::isas_here();
    notes.push(format!(
        "instruction sets with kernels here: {}; the engine uses {}; {} thread(s)",
        if isas.is_empty() { "none".to_string() } else { isas.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", ") },
        simd::isa().map_or("the portable path".to_string(), |i| format!("{i:?}")),
        rayon::current_num_threads()
    ));
    let mut rng = SplitMix64::new(seed);
    let t0 = Instant::now();
    if isas.is_empty() && checks.kernels {
        push(&mut rows, unmeasured("conv", "SIMD conv kernels", "-", Status::Skip, "this CPU has neither AVX-512F nor AVX2+FMA: the portable path only"));
    }
    for &(cin, cout, k, stride, dims, act) in SHAPES.iter().filter(|_| checks.kernels) {
        let s = ConvShape { cin, cout, k, stride, pad: k / 2, dims };
        let n = 2;
        let mut x = vec![0.0f32; n * cin * dims.iter().product::<usize>()];
        let mut w = vec![0.0f32; cout * cin * k * k * k];
        let mut b = vec![0.0f32; cout];
        rng.fill_uniform(&mut x, -1.0, 1.0);
        rng.fill_uniform(&mut w, -1.0, 1.0);
        rng.fill_uniform(&mut b, -1.0, 1.0);
        let want = conv3d_naive(&x, n, s, &w, Some(&b), act);
        let shape = format!("{cin}->{cout} k{k} s{stride} {}x{}x{}", dims[0], dims[1], dims[2]);
        let packed = PackedWeights::new(&w, cout, cin * k * k * k);
        for &isa in &isas {
            if !simd::handles_on(isa, s) {
                push(&mut rows, unmeasured("conv", &format!("{isa:?}{act}"), &shape, Status::Skip, "takes the portable path with this instruction set"));
                continue;
            }
            let mut got = vec![f32::NAN; want.len()];
            simd::conv3d_on(isa, &x, n, s, &packed, Some(&b), act, &mut got);
            push(&mut rows, compare("conv", &format!("{isa:?}{act}"), &shape, &got, &want, CONV_TOL_ABS, CONV_TOL_REL));
        }
        let mut got = vec![f32::NAN; want.len()];
        conv3d_portable(&x, n, s, &w, Some(&b), act, &mut got);
        push(&mut rows, compare("conv", &format!("portable{act}"), &shape, &got, &want, CONV_TOL_ABS, CONV_TOL_REL));
    }
    if checks.kernels {
        timings.push(("conv kernels".to_string(), t0.elapsed().as_secs_f64()));
    }

    let (tile, archs) = match checks.networks {
        Some(t) => (t, &[Arch::Segresnetv2, Arch::Dynunet][..]),
        None => ([0; 3], &[][..]),
    };
    for &arch in archs {
        let t = Instant::now();
        let spec = ModelSpec::seed(arch);
        let shape = format!("{}x{}x{} x2", tile[0], tile[1], tile[2]);
        let name = format!("{} (seed widths)", arch.name());
        if simd::isa().is_none() {
            push(&mut rows, unmeasured("network", &name, &shape, Status::Skip, "no SIMD kernels here: nothing to compare with the portable path"));
            continue;
        }
        let w = Weights::random(&spec, seed + 10);
        let mut x = vec![0.0f32; 2 * tile.iter().product::<usize>()];
        rng.fill_uniform(&mut x, 0.0, 1.0);
        let mut simd_engine = CpuEngine::new(&w)?;
        if simd_engine.simd_convs() == 0 {
            push(&mut rows, unmeasured("network", &name, &shape, Status::Fail, "the engine packed no weights for the SIMD kernels: they would never run in it"));
            continue;
        }
        let got = simd_engine.forward(&x, 2, tile, true)?;
        let want = CpuEngine::portable(&w)?.forward(&x, 2, tile, true)?;
        let flops = 2.0 * Graph::build(&spec)?.flops(tile) as f64;
        for (i, (label, g, wv)) in [("scores", &got.scores, &want.scores), ("offsets", &got.offsets, &want.offsets)]
            .into_iter()
            .chain(got.fm2.as_ref().zip(want.fm2.as_ref()).map(|(g, w)| ("fm2", g, w)))
            .enumerate()
        {
            push(&mut rows, compare("network", &format!("{name} {label}"), &shape, g, wv, NET_TOL_ABS[i], NET_TOL_REL));
        }
        timings.push((format!("{} SIMD + portable forward ({:.0} GFLOP)", arch.name(), flops * 1e-9), t.elapsed().as_secs_f64()));
    }
    let passed = rows.iter().all(|r| r.status != Status::Fail);
    Ok(Report { device: "cpu".to_string(), notes, rows, timings, passed })
}

/// A row without numbers: a check that does not apply here, or that failed before comparing.
fn unmeasured(section: &str, name: &str, shape: &str, status: Status, note: &str) -> Row {
    Row {
        section: section.into(),
        name: name.into(),
        shape: shape.into(),
        max_abs: f64::NAN,
        rel: f64::NAN,
        tol_abs: f64::NAN,
        tol_rel: f64::NAN,
        status,
        note: note.into(),
    }
}

fn compare(section: &str, name: &str, shape: &str, got: &[f32], want: &[f32], tol_abs: f64, tol_rel: f64) -> Row {
    let (max_abs, rel, _, _) = diff(got, want);
    let ok = max_abs <= tol_abs && rel <= tol_rel;
    Row {
        section: section.into(),
        name: name.into(),
        shape: shape.into(),
        max_abs,
        rel,
        tol_abs,
        tol_rel,
        status: if ok { Status::Pass } else { Status::Fail },
        note: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick self-test passes here, and has a row for every kernel this CPU runs.
    #[test]
    fn quick_cpu_selftest_passes() {
        let mut lines = 0;
        let r = run(CpuChecks::all(3, true), &mut |_| lines += 1).unwrap();
        assert!(r.passed, "{:#?}", r.rows.iter().filter(|r| r.status == Status::Fail).collect::<Vec<_>>());
        assert_eq!(lines, r.rows.len());
        let portable = r.rows.iter().filter(|r| r.name.starts_with("portable") && r.status == Status::Pass).count();
        assert_eq!(portable, SHAPES.len());
        for isa in simd::isas_here() {
            assert!(r.rows.iter().any(|r| r.name.starts_with(&format!("{isa:?}")) && r.status == Status::Pass), "{isa:?} has no passing row");
        }
    }
}
