//! `fastdet selftest`: the CUDA side against the CPU side.
//!
//! 1. kernels: every kernel of `kernels/*.cu` (and cuDNN's convolutions) against its CPU twin on
//!    fresh random inputs of several shapes (odd sizes; 1, 16, 48, 320 channels);
//! 2. networks: both architectures at the seed widths with random weights on one tile, CUDA engine
//!    (cuDNN and direct-kernel convolutions) against the CPU engine; GPU timings;
//! 3. pipeline: a synthetic tomogram through `pipeline::runner` with a 2-model ensemble on both
//!    engines; detections must match.
//!
//! Inputs are made fp16-representable before they reach either side, so input rounding never
//! counts as an error; what remains is the GPU's fp16 storage of results and f32 summation order.
//! Tolerances (below) are stated with their reasons. Runs on a GPU or on the kernel emulator
//! (`Gpu::emulator`, tests only).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use half::f16;
use serde::Serialize;

use super::dnn::{ConvPlan, Dnn, DnnApi};
use super::emu::{from_ndhwc, to_ndhwc};
use super::engine::{to_ktrsc, ConvBackend, CudaEngine, TcPolicy};
use super::gpu::{DevBuf, Gpu};
use super::ops::{self, vol, ConvShape, TcTiles};
use crate::engine::cpu::{conv, norm, resample, CpuEngine};
use crate::engine::{Outputs, TileEngine};
use crate::model::graph::Act;
use crate::model::spec::{Arch, ModelSpec};
use crate::pipeline::blend::{tile_weight, Blender, Maps};
use crate::pipeline::detect::{peaks, Detection};
use crate::pipeline::runner::{detect_maps, predict_and_detect, predict_maps, Ensemble, Settings, Timing, Tta};
use crate::pipeline::tiling::{extract_tile, TileGrid};
use crate::util::SplitMix64;
use crate::weights::Weights;

// ---------------------------------------------------------------------------------------------
// Tolerances. `abs` is scaled by max(1, max |reference|) of the case; a case passes when both its
// max |Δ| and its ‖Δ‖/‖ref‖ are within them.

/// fp16 results of an f32 computation on identical fp16 inputs: the GPU rounds each result once
/// to fp16 (half an ulp = 2^-11 ≈ 4.9e-4 relative, so ‖Δ‖/‖ref‖ ≲ 4.9e-4) and sums in another
/// order than the CPU's sgemm (f32: a few 1e-7 relative even for K = 27 x 320 terms). Hence
/// rel ≤ 1e-3 and |Δ| ≤ 2e-3 · max(1, max|ref|), about twice the rounding bound. (Winograd / FFT
/// algorithms, if cuDNN picks them, stay within this in f32.)
pub const TOL_FP16: (f64, f64) = (2e-3, 1e-3);
/// f32 results of f32 math on identical inputs (head 1x1 conv, activations): summation order
/// and expf/tanhf vs libm, a few ulp of f32 (1.2e-7 each): 1e-5.
pub const TOL_F32: (f64, f64) = (1e-5, 1e-5);
/// Kernels whose headers promise the CPU's exact operation sequence (layout, copies, tile
/// extraction, ensemble averaging, blending): bit-exact.
pub const TOL_EXACT: (f64, f64) = (0.0, 0.0);
/// Blend accumulators merged from two partial sums: the f32 add order differs from the CPU's
/// single pass, so a few ulp: 1e-5.
pub const TOL_MERGED: (f64, f64) = (1e-5, 1e-5);
/// Whole networks at the seed widths: ~40 activations in a chain are each stored in fp16 (each a
/// ≤ 4.9e-4 relative perturbation); norms re-normalise, residual adds and deep convolutions
/// accumulate, so the end-to-end relative error is ~sqrt(40) x 4.9e-4 ≈ 3e-3. The host emulator,
/// which rounds every stored activation like the GPU, measures ‖Δ‖/‖ref‖ = 0.6e-3..5.3e-3 on the
/// seed networks at 64³ with random weights (DynUNet offsets the largest), so rel ≤ 2e-2 leaves a
/// 4x margin. Max |Δ| grows with the number of outputs and with the head's gain: sigmoid' ≤ 1/4
/// keeps scores small (measured 1.3e-2; tolerance 0.05); tanh·2 has gain 2, so offsets (range
/// ±2 voxels) get 0.15 · max(1, max|ref|) = 0.3 voxels (measured 0.08); fm2 gets 0.02 ·
/// max(1, max|ref|) (measured 2e-3..5e-3 relative to its max).
pub const TOL_NET_SCORES: (f64, f64) = (0.05, 2e-2);
pub const TOL_NET_OFFSETS: (f64, f64) = (0.15, 2e-2);
pub const TOL_NET_FM2: (f64, f64) = (0.02, 2e-2);
/// Whole-tomogram check: at least this fraction of the CPU's detections must have a GPU
/// detection of the same class within `MATCH_DIST` voxels and `MATCH_SCORE` in score, and at most
/// `MAX_EXTRA` (as a fraction of the CPU's count) GPU detections may be unmatched. Detections
/// whose score sits within fp16 noise of a threshold may legitimately appear on one side only.
pub const MIN_MATCHED: f64 = 0.99;
pub const MAX_EXTRA: f64 = 0.01;
pub const MATCH_DIST: f64 = 1.0;
pub const MATCH_SCORE: f64 = 0.01;

/// Where the self-test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Cuda(usize),
    /// The host emulator of the kernels (testing the self-test itself; slow).
    Emulator,
    /// The kernels' own CUDA source compiled for the host and run there (testing the kernels
    /// without a GPU; slower still).
    HostKernels,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub target: Target,
    /// Networks on a 64³ tile, no whole-tomogram check.
    pub quick: bool,
    pub kernel_cache: Option<PathBuf>,
    pub seed: u64,
    pub kernels: bool,
    pub networks: bool,
    pub pipeline: bool,
    /// Networks' specs (default: the seed SegResNetV2 and DynUNet).
    pub network_specs: Option<Vec<ModelSpec>>,
    /// Networks' tile (default 64³ with `quick`, else 192x128x128).
    pub network_tile: Option<[usize; 3]>,
    /// Models of the whole-tomogram check (default: weights/demo_*.safetensors when found, else
    /// random weights of the demo widths).
    pub pipeline_weights: Vec<PathBuf>,
    /// Tomogram shape of the whole-tomogram check (default 184 x 630 x 630).
    pub pipeline_shape: [usize; 3],
    /// Sliding window / tiles per axis (default the seed's 192x128x128, 1x9x9).
    pub pipeline_window: [usize; 3],
    pub pipeline_tiles: [usize; 3],
}

impl Options {
    pub fn new(target: Target) -> Self {
        let s = Settings::default();
        Options {
            target,
            quick: false,
            kernel_cache: None,
            seed: 1,
            kernels: true,
            networks: true,
            pipeline: true,
            network_specs: None,
            network_tile: None,
            pipeline_weights: Vec::new(),
            pipeline_shape: [184, 630, 630],
            pipeline_window: s.window,
            pipeline_tiles: s.tiles,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Pass,
    Fail,
    Skip,
    Info,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
            Status::Info => "INFO",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub section: String,
    pub name: String,
    pub shape: String,
    /// Max |GPU - CPU| (for detection rows: 1 - matched fraction).
    pub max_abs: f64,
    /// ‖GPU - CPU‖ / ‖CPU‖ (for detection rows: unmatched GPU detections / CPU detections).
    pub rel: f64,
    pub tol_abs: f64,
    pub tol_rel: f64,
    pub status: Status,
    pub note: String,
}

impl Row {
    /// One table line: name, shape, max|Δ|, rel, tol, status.
    pub fn line(&self) -> String {
        let num = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.2e}") };
        let tol = if matches!(self.status, Status::Info | Status::Skip) { "-".to_string() } else { format!("{}/{}", num(self.tol_abs), num(self.tol_rel)) };
        let mut s = format!(
            "{:<9} {:<44} {:<24} {:>9} {:>9} {:>19} {}",
            self.section,
            self.name,
            self.shape,
            num(self.max_abs),
            num(self.rel),
            tol,
            self.status.label()
        );
        if !self.note.is_empty() {
            s.push_str(&format!("  {}", self.note));
        }
        s
    }

    pub fn header() -> String {
        format!("{:<9} {:<44} {:<24} {:>9} {:>9} {:>19} {}", "section", "name", "shape", "max|Δ|", "rel", "tol abs/rel", "result")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub device: String,
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
    /// (what, seconds)
    pub timings: Vec<(String, f64)>,
    pub passed: bool,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| r.status == Status::Fail).count()
    }
}

// ---------------------------------------------------------------------------------------------
// Host helpers

fn r16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

fn to_f16(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

/// (max |Δ|, ‖Δ‖/‖ref‖, max |ref|, count of differing elements); NaN/Inf mismatches give +inf.
pub fn diff(got: &[f32], want: &[f32]) -> (f64, f64, f64, usize) {
    if got.len() != want.len() {
        return (f64::INFINITY, f64::INFINITY, 0.0, got.len().max(want.len()));
    }
    let (mut mx, mut d2, mut r2, mut rmax, mut ndiff) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        if w.is_nan() && g.is_nan() {
            continue;
        }
        if g != w {
            ndiff += 1;
        }
        let d = (g - w).abs();
        let d = if d.is_nan() { f64::INFINITY } else { d };
        mx = mx.max(d);
        d2 += d * d;
        if w.is_finite() {
            r2 += w * w;
            rmax = rmax.max(w.abs());
        }
    }
    let rel = if r2 > 0.0 { (d2 / r2).sqrt() } else { d2.sqrt() };
    (mx, rel, rmax, ndiff)
}

fn shape_str(parts: &[usize]) -> String {
    parts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("x")
}

struct Ctx<'a> {
    gpu: Arc<Gpu>,
    dnn: Option<Dnn>,
    dnn_why: String,
    rng: SplitMix64,
    rows: Vec<Row>,
    timings: Vec<(String, f64)>,
    notes: Vec<String>,
    sink: &'a mut dyn FnMut(&Row),
    section: &'static str,
    dead: Option<String>,
}

impl Ctx<'_> {
    fn push(&mut self, row: Row) {
        (self.sink)(&row);
        self.rows.push(row);
    }

    fn row(&mut self, name: &str, shape: &str, max_abs: f64, rel: f64, tol: (f64, f64), status: Status, note: String) {
        let section = self.section.to_string();
        self.push(Row { section, name: name.into(), shape: shape.into(), max_abs, rel, tol_abs: tol.0, tol_rel: tol.1, status, note });
    }

    /// Compares and records; `tol.0` is scaled by max(1, max|ref|).
    fn cmp(&mut self, name: &str, shape: &str, got: &[f32], want: &[f32], tol: (f64, f64)) {
        let (mx, rel, rmax, nd) = diff(got, want);
        let abs_tol = tol.0 * rmax.max(1.0);
        let ok = got.len() == want.len() && mx <= abs_tol && rel <= tol.1;
        let note = if got.len() != want.len() {
            format!("length {} vs {}", got.len(), want.len())
        } else if tol == TOL_EXACT {
            if nd > 0 {
                format!("{nd} of {} elements differ", want.len())
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        self.row(name, shape, mx, rel, (abs_tol, tol.1), if ok { Status::Pass } else { Status::Fail }, note);
    }

    fn info(&mut self, name: &str, shape: &str, note: String) {
        self.row(name, shape, f64::NAN, f64::NAN, (f64::NAN, f64::NAN), Status::Info, note);
    }

    fn skip(&mut self, name: &str, shape: &str, note: String) {
        self.row(name, shape, f64::NAN, f64::NAN, (f64::NAN, f64::NAN), Status::Skip, note);
    }

    fn time(&mut self, what: String, secs: f64) {
        self.timings.push((what, secs));
    }

    /// Runs one case; an error becomes a FAIL row. A device that no longer answers ends the run.
    fn case(&mut self, name: &str, shape: &str, f: impl FnOnce(&mut Self) -> Result<()>) {
        if let Some(why) = &self.dead {
            let why = why.clone();
            self.skip(name, shape, format!("device unusable after an earlier error: {why}"));
            return;
        }
        if let Err(e) = f(self) {
            let msg = format!("{e:#}").replace('\n', " | ");
            self.row(name, shape, f64::NAN, f64::NAN, (f64::NAN, f64::NAN), Status::Fail, format!("error: {msg}"));
            if let Err(e2) = self.gpu.sync("health check after a failed case") {
                self.dead = Some(format!("{e2:#}"));
            }
        }
    }

    fn rand(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut v = vec![0.0; n];
        self.rng.fill_uniform(&mut v, lo, hi);
        v
    }

    /// Uniform values already rounded to fp16.
    fn rand16(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        self.rand(n, lo, hi).into_iter().map(r16).collect()
    }

    /// He-normal conv weights, fp16-rounded: `[cout, cin, k, k, k]`.
    fn weights16(&mut self, cout: usize, cin: usize, k: usize) -> Vec<f32> {
        let std = (2.0 / (cin * k * k * k) as f64).sqrt();
        (0..cout * cin * k * k * k).map(|_| r16((self.rng.normal() * std) as f32)).collect()
    }

    fn up16(&self, v: &[f32]) -> Result<DevBuf> {
        self.gpu.upload(&to_f16(v))
    }
    fn up32(&self, v: &[f32]) -> Result<DevBuf> {
        self.gpu.upload(v)
    }
    fn rd16(&self, b: &DevBuf, n: usize) -> Result<Vec<f32>> {
        Ok(self.gpu.read::<f16>(b.ptr, n)?.into_iter().map(|h| h.to_f32()).collect())
    }
    fn rd32(&self, b: &DevBuf, n: usize) -> Result<Vec<f32>> {
        self.gpu.read::<f32>(b.ptr, n)
    }
}

/// Runs the self-test; `sink` sees every row as it is produced.
pub fn run(opts: &Options, sink: &mut dyn FnMut(&Row)) -> Result<Report> {
    let gpu = match opts.target {
        Target::Cuda(i) => Gpu::open(i, opts.kernel_cache.clone())?,
        Target::Emulator => Gpu::emulator()?,
        Target::HostKernels => Gpu::emulator_host_kernels()?,
    };
    run_on(gpu, opts, sink)
}

/// `run` on a device already open (`opts.target` and `opts.kernel_cache` are not used).
pub fn run_on(gpu: Arc<Gpu>, opts: &Options, sink: &mut dyn FnMut(&Row)) -> Result<Report> {
    // Every launch synchronises and names its kernel on failure.
    gpu.set_sync_each(true);
    let (dnn, dnn_why) = if gpu.is_emulator() {
        (None, "the emulator has no cuDNN".to_string())
    } else {
        match Dnn::new(&gpu) {
            Ok(d) => (Some(d), String::new()),
            Err(e) => (None, format!("{e:#}")),
        }
    };
    let mut notes = vec![gpu.info.describe(), format!("kernels: {}", gpu.kernels_note)];
    match &dnn {
        Some(d) => notes.push(format!("cuDNN {}", d.version_string())),
        None => notes.push(format!("no cuDNN: {dnn_why}")),
    }
    let mut ctx = Ctx {
        gpu: gpu.clone(),
        dnn,
        dnn_why,
        rng: SplitMix64::new(opts.seed ^ 0x5eed),
        rows: Vec::new(),
        timings: Vec::new(),
        notes,
        sink,
        section: "kernels",
        dead: None,
    };
    if opts.kernels {
        ctx.section = "kernels";
        kernels(&mut ctx);
    }
    if opts.networks {
        ctx.section = "networks";
        gpu.set_sync_each(true);
        networks(&mut ctx, opts);
    }
    if opts.pipeline && !opts.quick {
        ctx.section = "pipeline";
        // Timed like a real run: no synchronisation after every kernel.
        gpu.set_sync_each(false);
        pipeline(&mut ctx, opts);
    }
    let passed = !ctx.rows.iter().any(|r| r.status == Status::Fail);
    Ok(Report { device: gpu.info.describe(), notes: ctx.notes, rows: ctx.rows, timings: ctx.timings, passed })
}

// ---------------------------------------------------------------------------------------------
// 1. kernels

fn kernels(c: &mut Ctx) {
    layout_cases(c);
    conv_first_cases(c);
    conv_cases(c);
    conv_tc_fused_cases(c);
    conv_tc_stats_cases(c);
    conv_tc_halo_cases(c);
    elementwise_cases(c);
    norm_cases(c);
    upsample_cases(c);
    convt_cases(c);
    head_cases(c);
    ensemble_cases(c);
    blend_cases(c);
    nms_cases(c);
}

fn layout_cases(c: &mut Ctx) {
    let dims = [5, 7, 9];
    let v = vol(dims);
    let n = 2;
    for ch in [1usize, 16, 48, 320] {
        let shape = format!("{n}x{ch}x{}", shape_str(&dims));
        c.case("ncdhw_f32_to_ndhwc_f16", &shape, |c| {
            let x = c.rand(n * ch * v, -4.0, 4.0);
            let xb = c.up32(&x)?;
            let h = c.gpu.alloc(n * ch * v * 2)?;
            ops::to_ndhwc_f16(&c.gpu, xb.ptr, h.ptr, n, ch, v)?;
            let got = c.rd16(&h, n * ch * v)?;
            let want: Vec<f32> = to_ndhwc(&x, n, ch, v).into_iter().map(r16).collect();
            c.cmp("ncdhw_f32_to_ndhwc_f16", &shape, &got, &want, TOL_EXACT);
            let back = c.gpu.alloc(n * ch * v * 4)?;
            ops::to_ncdhw_f32(&c.gpu, h.ptr, back.ptr, n, ch, v)?;
            let got = c.rd32(&back, n * ch * v)?;
            let want: Vec<f32> = x.iter().map(|&a| r16(a)).collect();
            c.cmp("ndhwc_f16_to_ncdhw_f32", &shape, &got, &want, TOL_EXACT);
            Ok(())
        });
    }
    let vd = [37, 41, 43];
    let window = [16, 20, 24];
    let shape = format!("{} in {}", shape_str(&window), shape_str(&vd));
    c.case("f32_to_f16", &shape_str(&vd), |c| {
        // Ties, fp16's largest value, a subnormal and an underflow round as the host's
        // f16::from_f32 does (round to nearest even).
        let mut x = c.rand(vol(vd), -1.0, 1.0);
        for (i, v) in [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 65504.0, 3e-6, -1e-8].into_iter().enumerate() {
            x[i * 7] = v;
        }
        let (src, dst) = (c.up32(&x)?, c.gpu.alloc(x.len() * 2)?);
        ops::f32_to_f16(&c.gpu, src.ptr, dst.ptr, x.len())?;
        let got = c.rd16(&dst, x.len())?;
        let want: Vec<f32> = x.iter().map(|&v| r16(v)).collect();
        c.cmp("f32_to_f16", &shape_str(&vd), &got, &want, TOL_EXACT);
        Ok(())
    });
    // On a GPU, volumes of 25 M voxels (50 MiB fp16, like a third of a seed tomogram), so that
    // the copies take long enough for an ordering fault to show.
    let vu = if c.gpu.is_emulator() { vd } else { [96, 512, 512] };
    c.case("side_upload_f16", &shape_str(&vu), |c| {
        // Two volumes copied from another thread on the side stream (the second reuses the
        // page-locked staging of the first), each read on the main stream after its wait: the
        // host's round-to-nearest-even fp16, as `f32_to_f16` makes on the device.
        let mut up = super::side_upload::SideUploader::new(c.gpu.clone())?;
        let mut x = c.rand(vol(vu), 0.0, 1.0);
        for (i, v) in [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 3.0 * 2f32.powi(-25), 6e-8].into_iter().enumerate() {
            x[i * 7] = v;
        }
        let y: Vec<f32> = x.iter().map(|v| 1.0 - v).collect();
        let pending = std::thread::scope(|t| t.spawn(|| -> Result<_> { Ok((up.upload(&x)?, up.upload(&y)?)) }).join())
            .map_err(|_| anyhow!("the uploading thread panicked"))??;
        for (name, p, v) in [("side_upload_f16", pending.0, &x), ("side_upload_f16 (staging reused)", pending.1, &y)] {
            let buf = p.wait()?;
            let got = c.rd16(&buf, v.len())?;
            let want: Vec<f32> = v.iter().map(|&a| r16(a)).collect();
            c.cmp(name, &shape_str(&vu), &got, &want, TOL_EXACT);
        }
        Ok(())
    });
    c.case("side_upload_f16 (during a graph capture)", &shape_str(&vu), |c| {
        // `fastdet run`'s reader uploads while the worker captures its graphs: the capture must
        // neither fail nor take in the side stream's work, and both must give their values.
        let mut up = super::side_upload::SideUploader::new(c.gpu.clone())?;
        let x = c.rand(vol(vu), 0.0, 1.0);
        let small = c.rand(4099, -2.0, 2.0);
        let (src, dst) = (c.up32(&small)?, c.gpu.alloc(small.len() * 2)?);
        // (The self-test synchronises after each kernel, which a capture cannot hold.)
        let sync_each = c.gpu.sync_each();
        c.gpu.set_sync_each(false);
        let begun = c.gpu.begin_capture();
        let (uploaded, captured) = std::thread::scope(|t| {
            let h = t.spawn(|| up.upload(&x));
            let k = begun.and_then(|()| ops::f32_to_f16(&c.gpu, src.ptr, dst.ptr, small.len()));
            (h.join(), k)
        });
        let graph = if c.gpu.capturing() { c.gpu.end_capture() } else { Err(anyhow!("no capture under way")) };
        c.gpu.set_sync_each(sync_each);
        let pending = uploaded.map_err(|_| anyhow!("the uploading thread panicked"))??;
        captured?;
        let graph = graph.context("the capture beside a side-stream upload")?;
        c.gpu.replay(&graph)?;
        let got = c.rd16(&dst, small.len())?;
        let want: Vec<f32> = small.iter().map(|&a| r16(a)).collect();
        c.cmp("side_upload_f16 (captured kernel)", "4099", &got, &want, TOL_EXACT);
        let buf = pending.wait()?;
        let got = c.rd16(&buf, x.len())?;
        let want: Vec<f32> = x.iter().map(|&a| r16(a)).collect();
        c.cmp("side_upload_f16 (during a graph capture)", &shape_str(&vu), &got, &want, TOL_EXACT);
        Ok(())
    });
    c.case("extract_tiles_f16", &shape, |c| {
        let volume = c.rand(vol(vd), -1.0, 1.0);
        let origins: Vec<[usize; 3]> = vec![[0, 0, 0], [21, 21, 19], [30, 35, 40], [36, 40, 42]];
        // The volume as DeviceVolume keeps it: fp16.
        let vb = c.up16(&volume)?;
        let ob = c.gpu.upload(&origins.iter().flat_map(|o| o.map(|x| x as i32)).collect::<Vec<i32>>())?;
        let wv = vol(window);
        let dst = c.gpu.alloc(origins.len() * wv * 2)?;
        ops::extract_tiles(&c.gpu, vb.ptr, vd, ob.ptr, origins.len(), window, dst.ptr)?;
        let got = c.rd16(&dst, origins.len() * wv)?;
        let mut want = vec![0.0f32; origins.len() * wv];
        for (i, o) in origins.iter().enumerate() {
            extract_tile(&volume, vd, *o, window, &mut want[i * wv..(i + 1) * wv]);
        }
        let want: Vec<f32> = want.into_iter().map(r16).collect();
        c.cmp("extract_tiles_f16", &shape, &got, &want, TOL_EXACT);
        Ok(())
    });
    for (cs, cd, off) in [(16usize, 48usize, 16usize), (32, 64, 32), (3, 8, 5)] {
        let rows = 2 * 315;
        let shape = format!("{rows} rows {cs}->{cd}@{off}");
        c.case("copy_channels_f16", &shape, |c| {
            let src = c.rand16(rows * cs, -2.0, 2.0);
            let dst0 = c.rand16(rows * cd, -2.0, 2.0);
            let sb = c.up16(&src)?;
            let db = c.up16(&dst0)?;
            ops::copy_channels(&c.gpu, sb.ptr, db.ptr, rows, cs, cd, off)?;
            let got = c.rd16(&db, rows * cd)?;
            let mut want = dst0.clone();
            for r in 0..rows {
                want[r * cd + off..r * cd + off + cs].copy_from_slice(&src[r * cs..(r + 1) * cs]);
            }
            c.cmp("copy_channels_f16", &shape, &got, &want, TOL_EXACT);
            Ok(())
        });
    }
}

/// Random norm_finalize parameters `[n][cin][3]` (mean, scale near 1, shift).
fn random_norm_params(c: &mut Ctx, n: usize, cin: usize) -> Vec<f32> {
    let mut params = Vec::with_capacity(n * cin * 3);
    for _ in 0..n * cin {
        let q = c.rand(3, -0.5, 0.5);
        params.extend_from_slice(&[q[0], 1.0 + q[1], q[2]]);
    }
    params
}

/// NCDHW `x` through norm_apply's formula with `params` and activation `post`, rounded to fp16:
/// what a conv applying the norm in its loads convolves.
fn normalised(x: &[f32], params: &[f32], n: usize, cin: usize, post: Act) -> Vec<f32> {
    let iv = x.len() / (n * cin);
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let (b, ch) = (i / (cin * iv), (i / iv) % cin);
            let q = &params[(b * cin + ch) * 3..][..3];
            r16(post.apply((v - q[0]) * q[1] + q[2]))
        })
        .collect()
}

/// `conv3d_tc_f16` with everything fused: the previous norm (+ activation) applied while loading,
/// bias, residual (once in place: residual = out) and activation in the store. CPU twin: norm_apply's
/// formula, rounded to fp16, then the CPU conv, + residual, activation.
fn conv_tc_fused_cases(c: &mut Ctx) {
    // (n, dims, cin, cout, k, stride, norm's activation, residual, act)
    let cases: Vec<(usize, [usize; 3], usize, usize, usize, usize, Act, bool, Act)> = vec![
        // SegResNet block tail: norm + relu -> conv -> + identity.
        (2, [7, 9, 11], 16, 16, 3, 1, Act::Relu, true, Act::None),
        // DynUNet: instance norm + leaky relu -> conv.
        (1, [6, 8, 10], 48, 48, 3, 1, Act::LeakyRelu(0.01), false, Act::None),
        (1, [8, 8, 8], 32, 64, 3, 2, Act::LeakyRelu(0.01), false, Act::None),
        // Cin % 8 != 0: the element-by-element loads.
        (2, [5, 6, 7], 12, 20, 3, 1, Act::Relu, true, Act::Relu),
        (1, [4, 5, 6], 64, 16, 1, 1, Act::None, true, Act::Silu),
        (1, [3, 4, 5], 320, 320, 3, 1, Act::LeakyRelu(0.01), true, Act::None),
    ];
    for (ci, (n, dims, cin, cout, k, stride, post, residual, act)) in cases.into_iter().enumerate() {
        for v in tc_variants(cin, cout, true) {
            let od = ops::conv_out_dims(dims, k, stride, k / 2);
            let shape = format!("{n}x{cin}x{} ->{cout}", shape_str(&dims));
            let in_place = ci == 0;
            let name = format!("{} {k}x{k}x{k}/s{stride} norm{post}+bias{}{act}", tc_label(&c.gpu, v, n, dims, cin, cout, k, stride, true), if !residual { "" } else if in_place { "+res in place" } else { "+res" });
            if let Err(why) = c.gpu.check_tensor_cores() {
                c.skip(&name, &shape, why);
                continue;
            }
            c.case(&name.clone(), &shape.clone(), |c| {
                let (iv, ov) = (vol(dims), vol(od));
                let x = c.rand16(n * cin * iv, -1.0, 1.5);
                let params = random_norm_params(c, n, cin);
                let xt = normalised(&x, &params, n, cin, post);
                let w = c.weights16(cout, cin, k);
                let b = c.rand(cout, -0.5, 0.5);
                let res = c.rand16(n * cout * ov, -1.0, 1.0);
                let conv_out = cpu_conv(&xt, n, dims, cin, cout, k, stride, &w, Some(&b), Act::None);
                let want: Vec<f32> = conv_out.iter().zip(&res).map(|(&y, &r)| act.apply(if residual { y + r } else { y })).collect();
                let wk: Vec<f32> = to_ktrsc(&to_f16(&w), cout, cin, k).into_iter().map(|h| h.to_f32()).collect();
                let xb = c.up16(&to_ndhwc(&x, n, cin, iv))?;
                let wb = c.up16(&wk)?;
                let bb = c.up32(&b)?;
                let pb = c.up32(&params)?;
                let res_nd = to_ndhwc(&res, n, cout, ov);
                let rb = c.up16(&res_nd)?;
                let out = if in_place { c.up16(&res_nd)? } else { c.gpu.alloc(n * ov * cout * 2)? };
                let rp = residual.then_some(if in_place { out.ptr } else { rb.ptr });
                let norm = ops::NormPrologue { params: pb.ptr, pre: Act::None, post };
                ops::conv_tc(&c.gpu, v, xb.ptr, wb.ptr, Some(bb.ptr), rp, Some(norm), out.ptr, None, None, ConvShape { n, dims, cin, cout, k, stride, pad: k / 2 }, act)?;
                let got = from_ndhwc(&c.rd16(&out, n * ov * cout)?, n, cout, ov);
                c.cmp(&name, &shape, &got, &want, TOL_FP16);
                Ok(())
            });
        }
    }
}

/// conv3d_tc_f16's statistics epilogue + norm_finalize_tiles + norm_apply (the norm that reads a
/// tensor-core conv's output without a pass of its own) against the CPU conv, fp16 rounding and
/// GroupNorm / InstanceNorm.
fn conv_tc_stats_cases(c: &mut Ctx) {
    // (n, dims, cin, cout, k, stride, residual, bias offset, groups, affine, norm's activation)
    let cases: Vec<(usize, [usize; 3], usize, usize, usize, usize, bool, f32, usize, bool, Act)> = vec![
        // SegResNet: conv + identity -> GroupNorm(8) + relu; two samples.
        (2, [8, 8, 8], 16, 16, 3, 1, true, 0.0, 8, true, Act::Relu),
        // DynUNet: strided conv -> InstanceNorm + leaky relu.
        (1, [8, 8, 16], 32, 48, 3, 2, false, 0.0, 48, false, Act::LeakyRelu(0.01)),
        // Five 64-channel column blocks, one row block.
        (1, [4, 4, 4], 320, 320, 3, 1, false, 0.0, 320, false, Act::LeakyRelu(0.01)),
        // |mean| >> std: the per-block merge must not lose the variance.
        (1, [4, 8, 8], 16, 16, 3, 1, false, 10.0, 16, false, Act::None),
        // SegResNetV2's first level: 32 channels (the 128 x 32 tile), identity added.
        (1, [8, 8, 12], 32, 32, 3, 1, true, 0.0, 8, true, Act::Relu),
        // 192 voxels a sample, two samples: a 128-row block of the wide tile stores its first
        // 64 rows in sample 0 and the next 64 in sample 1.
        (2, [4, 6, 8], 48, 64, 3, 1, true, 0.0, 8, true, Act::Relu),
        // The same split between samples in the store's two passes (a 1x1x1 conv from 16
        // channels: one k-step, never split).
        (2, [8, 8, 41], 16, 64, 1, 1, true, 0.0, 8, true, Act::Relu),
    ];
    for (n, dims, cin, cout, k, stride, residual, offset, groups, affine, post) in cases {
        for v in tc_variants(cin, cout, false) {
            let od = ops::conv_out_dims(dims, k, stride, k / 2);
            let shape = format!("{n}x{cin}x{} ->{cout}", shape_str(&dims));
            let name = format!(
                "{} {}+stats -> norm_finalize_tiles {}{}{post}{}",
                tc_label(&c.gpu, v, n, dims, cin, cout, k, stride, false),
                if residual { "+res" } else { "" },
                if groups == cout { "instance".to_string() } else { format!("group({groups})") },
                if affine { " affine" } else { "" },
                if offset != 0.0 { format!(" mean {offset}") } else { String::new() }
            );
            if let Err(why) = c.gpu.check_tensor_cores() {
                c.skip(&name, &shape, why);
                continue;
            }
            c.case(&name.clone(), &shape.clone(), |c| {
                let (iv, ov) = (vol(dims), vol(od));
                let x = c.rand16(n * cin * iv, -1.0, 1.0);
                let w = c.weights16(cout, cin, k);
                let b: Vec<f32> = c.rand(cout, -0.5, 0.5).into_iter().map(|v| v + offset).collect();
                let res = c.rand16(n * cout * ov, -1.0, 1.0);
                let (gamma, beta) = if affine { (Some(c.rand(cout, 0.5, 1.5)), Some(c.rand(cout, -0.5, 0.5))) } else { (None, None) };
                // The norm sees the conv's output as stored: rounded to fp16.
                let conv_out = cpu_conv(&x, n, dims, cin, cout, k, stride, &w, Some(&b), Act::None);
                let mut want: Vec<f32> = conv_out.iter().zip(&res).map(|(&y, &r)| r16(if residual { y + r } else { y })).collect();
                norm::group_norm(&mut want, n, cout, ov, groups, gamma.as_deref(), beta.as_deref(), post);
                let wk: Vec<f32> = to_ktrsc(&to_f16(&w), cout, cin, k).into_iter().map(|h| h.to_f32()).collect();
                let xb = c.up16(&to_ndhwc(&x, n, cin, iv))?;
                let wb = c.up16(&wk)?;
                let bb = c.up32(&b)?;
                let rb = c.up16(&to_ndhwc(&res, n, cout, ov))?;
                let gb = match &gamma {
                    Some(g) => Some(c.up32(g)?),
                    None => None,
                };
                let betab = match &beta {
                    Some(v) => Some(c.up32(v)?),
                    None => None,
                };
                let out = c.gpu.alloc(n * ov * cout * 2)?;
                let stats = c.gpu.alloc(ops::conv_tc_stats_bytes(n, ov, cout).context("volume")?)?;
                let params = c.gpu.alloc(n * cout * 3 * 4)?;
                ops::conv_tc(&c.gpu, v, xb.ptr, wb.ptr, Some(bb.ptr), residual.then_some(rb.ptr), None, out.ptr, Some(stats.ptr), None, ConvShape { n, dims, cin, cout, k, stride, pad: k / 2 }, Act::None)?;
                ops::norm_params_from_tiles(&c.gpu, stats.ptr, n, cout, ov, groups, gb.as_ref().map(|b| b.ptr), betab.as_ref().map(|b| b.ptr), params.ptr)?;
                ops::norm_apply(&c.gpu, out.ptr, out.ptr, n, cout, ov, params.ptr, Act::None, post)?;
                let got = from_ndhwc(&c.rd16(&out, n * ov * cout)?, n, cout, ov);
                c.cmp(&name, &shape, &got, &want, TOL_FP16);
                Ok(())
            });
        }
    }
}

/// The halo-tile kernels (conv3d_tc_halo: 3x3x3, stride 1, whole 2x4x16 bricks): the previous
/// norm (+ activation) applied as each block stages its input, bias, residual and activation in
/// the store, then their statistics through norm_finalize_tiles and norm_apply. CPU twin: the
/// norm's formula rounded to fp16, the CPU conv, + residual, activation, fp16, GroupNorm /
/// InstanceNorm. Each case checks the conv's output, then the norm's.
fn conv_tc_halo_cases(c: &mut Ctx) {
    // (n, dims, cin, cout, the input's norm activation (None: no norm), residual (in place: the
    // output buffer holds it), act, groups of the output's norm)
    type Case = (usize, [usize; 3], usize, usize, Option<Act>, Option<bool>, Act, usize);
    let cases: Vec<Case> = vec![
        // SegResNet block: GroupNorm + relu -> conv -> + identity in place; two samples of 2x2x2
        // bricks, the 128-voxel unit.
        (2, [4, 8, 32], 16, 16, Some(Act::Relu), Some(true), Act::None, 8),
        // DynUNet: InstanceNorm + leaky relu -> conv, 48 channels (the 64-voxel unit; the second
        // block of 32 channels half past Cout).
        (1, [2, 4, 16], 32, 48, Some(Act::LeakyRelu(0.01)), None, Act::None, 48),
        // No norm in the loads; 20 channels (not a multiple of 8: the store element by element),
        // relu in the store.
        (1, [4, 4, 16], 48, 20, None, Some(false), Act::Relu, 4),
        // Four 16-channel stages, two channel blocks, two samples.
        (2, [2, 8, 16], 64, 64, Some(Act::Relu), Some(false), Act::None, 8),
    ];
    for (n, dims, cin, cout, norm_act, residual, act, groups) in cases {
        let shape_ = ConvShape { n, dims, cin, cout, k: 3, stride: 1, pad: 1 };
        let v = TcTiles::Standard.variant(cout).with_halo(true);
        let kernel = v.kernel_for(shape_, 0, 0, norm_act.is_some());
        let shape = format!("{n}x{cin}x{} ->{cout}", shape_str(&dims));
        let name = format!(
            "{kernel} 3x3x3{}+bias{}{act}+stats -> norm_finalize_tiles {}",
            norm_act.map_or(String::new(), |a| format!(" norm{a}")),
            match residual {
                Some(true) => "+res in place",
                Some(false) => "+res",
                None => "",
            },
            if groups == cout { "instance".to_string() } else { format!("group({groups})") }
        );
        if let Err(why) = c.gpu.check_tensor_cores() {
            c.skip(&name, &shape, why);
            continue;
        }
        c.case(&name.clone(), &shape.clone(), |c| {
            let iv = vol(dims);
            let x = c.rand16(n * cin * iv, -1.0, 1.5);
            let params = random_norm_params(c, n, cin);
            let xt = match norm_act {
                None => x.clone(),
                Some(post) => normalised(&x, &params, n, cin, post),
            };
            let w = c.weights16(cout, cin, 3);
            let b = c.rand(cout, -0.5, 0.5);
            let res = c.rand16(n * cout * iv, -1.0, 1.0);
            let (gamma, beta) = (c.rand(cout, 0.5, 1.5), c.rand(cout, -0.5, 0.5));
            let conv_out = cpu_conv(&xt, n, dims, cin, cout, 3, 1, &w, Some(&b), Act::None);
            let want_out: Vec<f32> = conv_out.iter().zip(&res).map(|(&y, &r)| r16(act.apply(if residual.is_some() { y + r } else { y }))).collect();
            let mut want_norm = want_out.clone();
            norm::group_norm(&mut want_norm, n, cout, iv, groups, Some(&gamma), Some(&beta), Act::Relu);
            let wk: Vec<f32> = to_ktrsc(&to_f16(&w), cout, cin, 3).into_iter().map(|h| h.to_f32()).collect();
            let xb = c.up16(&to_ndhwc(&x, n, cin, iv))?;
            let wb = c.up16(&wk)?;
            let bb = c.up32(&b)?;
            let pb = c.up32(&params)?;
            let res_nd = to_ndhwc(&res, n, cout, iv);
            let rb = c.up16(&res_nd)?;
            let (gb, betab) = (c.up32(&gamma)?, c.up32(&beta)?);
            let out = if residual == Some(true) { c.up16(&res_nd)? } else { c.gpu.alloc(n * iv * cout * 2)? };
            let rp = residual.map(|in_place| if in_place { out.ptr } else { rb.ptr });
            let stats = c.gpu.alloc(ops::conv_tc_stats_bytes(n, iv, cout).context("volume")?)?;
            let nparams = c.gpu.alloc(n * cout * 3 * 4)?;
            let norm = norm_act.map(|post| ops::NormPrologue { params: pb.ptr, pre: Act::None, post });
            // The kernel conv_tc takes for these very buffers.
            let launched = v.kernel_for(shape_, xb.ptr, wb.ptr, norm.is_some());
            ensure!(ops::HALO_KERNELS.contains(&launched), "{launched} is not a halo kernel: the case's shape and buffers must fit the bricks");
            ops::conv_tc(&c.gpu, v, xb.ptr, wb.ptr, Some(bb.ptr), rp, norm, out.ptr, Some(stats.ptr), None, shape_, act)?;
            let got = from_ndhwc(&c.rd16(&out, n * iv * cout)?, n, cout, iv);
            c.cmp(&format!("{name} (conv)"), &shape, &got, &want_out, TOL_FP16);
            ops::norm_params_from_tiles(&c.gpu, stats.ptr, n, cout, iv, groups, Some(gb.ptr), Some(betab.ptr), nparams.ptr)?;
            ops::norm_apply(&c.gpu, out.ptr, out.ptr, n, cout, iv, nparams.ptr, Act::None, Act::Relu)?;
            let got = from_ndhwc(&c.rd16(&out, n * iv * cout)?, n, cout, iv);
            c.cmp(&format!("{name} (norm)"), &shape, &got, &want_norm, TOL_FP16);
            Ok(())
        });
    }
}

/// The tensor-core kernels for a conv of `cin` -> `cout` channels, with or without a norm in its
/// loads: each tile choice's once, each with its cp.async loads too where they apply.
fn tc_variants(cin: usize, cout: usize, norm: bool) -> Vec<ops::TcVariant> {
    let mut tiles = vec![TcTiles::Standard.variant(cout)];
    if TcTiles::Wide.variant(cout) != tiles[0] {
        tiles.push(TcTiles::Wide.variant(cout));
    }
    let mut v = Vec::new();
    for t in tiles {
        v.push(t);
        if !norm && cin.is_multiple_of(8) {
            v.push(t.with_async_loads(true));
        }
    }
    v
}

/// A tensor-core conv row's kernel: the one `v` launches (device buffers are 16-byte aligned)
/// and, when this device splits its K, how many ways (the split count follows the
/// multiprocessor count).
#[allow(clippy::too_many_arguments)]
fn tc_label(g: &Gpu, v: ops::TcVariant, n: usize, dims: [usize; 3], cin: usize, cout: usize, k: usize, stride: usize, norm: bool) -> String {
    let m = n * vol(ops::conv_out_dims(dims, k, stride, k / 2));
    let kernel = v.kernel_for(ConvShape { n, dims, cin, cout, k, stride, pad: k / 2 }, 0, 0, norm);
    match ops::conv_tc_splits(v, m, cout, k * k * k * cin, g.info.multiprocessors.max(0) as usize) {
        (1, _) => kernel.to_string(),
        (splits, _) => format!("{kernel} splitK{splits}"),
    }
}

/// The CPU twin of a conv: NCDHW f32 in and out.
#[allow(clippy::too_many_arguments)]
fn cpu_conv(x: &[f32], n: usize, dims: [usize; 3], cin: usize, cout: usize, k: usize, stride: usize, w: &[f32], bias: Option<&[f32]>, act: Act) -> Vec<f32> {
    let s = conv::ConvShape { cin, cout, k, stride, pad: k / 2, dims };
    let mut out = vec![0.0f32; n * cout * vol(s.out_dims())];
    conv::conv3d(x, n, s, w, bias, act, &mut out);
    out
}

fn conv_first_cases(c: &mut Ctx) {
    for (n, dims, cout, bias, act) in [
        (2usize, [7usize, 9, 37], 32usize, false, Act::None),
        (2, [5, 6, 33], 16, true, Act::LeakyRelu(0.01)),
        (1, [4, 5, 6], 64, true, Act::Silu),
        (1, [9, 10, 11], 8, false, Act::None),
        // Not a multiple of 8: stored in pairs, the last chunk partial.
        (1, [3, 5, 34], 6, true, Act::Relu),
    ] {
        let shape = format!("{n}x1x{} ->{cout}", shape_str(&dims));
        let name = format!("conv3d_c1_k3_f16{}{act}", if bias { "+bias" } else { "" });
        c.case(&name.clone(), &shape.clone(), |c| {
            let v = vol(dims);
            let x = c.rand16(n * v, 0.0, 1.0);
            let w = c.weights16(cout, 1, 3);
            let b = bias.then(|| c.rand(cout, -0.5, 0.5));
            let want = cpu_conv(&x, n, dims, 1, cout, 3, 1, &w, b.as_deref(), act);
            let xb = c.up16(&x)?;
            let wb = c.up32(&w)?;
            let bb = match &b {
                Some(b) => Some(c.up32(b)?),
                None => None,
            };
            let out = c.gpu.alloc(n * v * cout * 2)?;
            ops::conv_first(&c.gpu, xb.ptr, wb.ptr, bb.as_ref().map(|b| b.ptr), out.ptr, n, dims, cout, act)?;
            let got = from_ndhwc(&c.rd16(&out, n * v * cout)?, n, cout, v);
            c.cmp(&name, &shape, &got, &want, TOL_FP16);
            Ok(())
        });
    }
}

fn conv_cases(c: &mut Ctx) {
    // (n, dims, cin, cout, k, stride, bias, act, cuDNN optional)
    let cases: Vec<(usize, [usize; 3], usize, usize, usize, usize, bool, Act, bool)> = vec![
        (2, [9, 11, 13], 16, 16, 3, 1, false, Act::None, false),
        (2, [9, 10, 11], 48, 48, 3, 2, false, Act::None, false),
        (1, [3, 5, 4], 320, 320, 3, 1, false, Act::None, false),
        (1, [6, 4, 5], 256, 320, 3, 2, false, Act::None, false),
        (2, [8, 8, 8], 32, 64, 3, 2, false, Act::None, false),
        (2, [6, 7, 9], 64, 32, 1, 1, false, Act::None, false),
        (2, [7, 6, 9], 16, 48, 3, 1, true, Act::Silu, false),
        (1, [6, 7, 8], 48, 48, 3, 1, true, Act::Silu, false),
        (2, [5, 6, 7], 16, 64, 1, 1, true, Act::None, false),
        (2, [12, 16, 16], 64, 16, 3, 1, true, Act::Silu, false),
        // The first conv's shape on the generic paths (cuDNN may refuse 1 input channel).
        (1, [9, 8, 7], 1, 32, 3, 1, false, Act::None, true),
    ];
    for (n, dims, cin, cout, k, stride, bias, act, dnn_optional) in cases {
        let od = ops::conv_out_dims(dims, k, stride, k / 2);
        let shape = format!("{n}x{cin}x{} ->{cout}", shape_str(&dims));
        let desc = format!("{k}x{k}x{k}/s{stride}{}{act}", if bias { "+bias" } else { "" });
        let direct_name = format!("conv3d_igemm_f16 {desc}");
        let dnn_name = format!("cuDNN conv {desc}");
        let (iv, ov) = (vol(dims), vol(od));
        let x = c.rand16(n * cin * iv, -1.0, 1.0);
        let w = c.weights16(cout, cin, k);
        let b = bias.then(|| c.rand(cout, -0.5, 0.5));
        let want = cpu_conv(&x, n, dims, cin, cout, k, stride, &w, b.as_deref(), act);
        let wk: Vec<f32> = to_ktrsc(&to_f16(&w), cout, cin, k).into_iter().map(|h| h.to_f32()).collect();
        // Input (NDHWC fp16), weights (KTRSC fp16) and bias on the device, for both conv paths.
        let upload = |c: &mut Ctx| -> Result<(DevBuf, DevBuf, Option<DevBuf>)> {
            let xb = c.up16(&to_ndhwc(&x, n, cin, iv))?;
            let wb = c.up16(&wk)?;
            let bb = match &b {
                Some(b) => Some(c.up32(b)?),
                None => None,
            };
            Ok((xb, wb, bb))
        };
        c.case(&direct_name.clone(), &shape.clone(), |c| {
            let (xb, wb, bb) = upload(c)?;
            let out = c.gpu.alloc(n * ov * cout * 2)?;
            ops::conv_direct(&c.gpu, xb.ptr, wb.ptr, bb.as_ref().map(|b| b.ptr), out.ptr, ConvShape { n, dims, cin, cout, k, stride, pad: k / 2 }, act)?;
            let got = from_ndhwc(&c.rd16(&out, n * ov * cout)?, n, cout, ov);
            c.cmp(&direct_name, &shape, &got, &want, TOL_FP16);
            Ok(())
        });
        for v in tc_variants(cin, cout, false) {
            let tc_name = format!("{} {desc}", tc_label(&c.gpu, v, n, dims, cin, cout, k, stride, false));
            match c.gpu.check_tensor_cores() {
                Err(why) => c.skip(&tc_name, &shape, why),
                Ok(()) => c.case(&tc_name.clone(), &shape.clone(), |c| {
                    let (xb, wb, bb) = upload(c)?;
                    let out = c.gpu.alloc(n * ov * cout * 2)?;
                    ops::conv_tc(&c.gpu, v, xb.ptr, wb.ptr, bb.as_ref().map(|b| b.ptr), None, None, out.ptr, None, None, ConvShape { n, dims, cin, cout, k, stride, pad: k / 2 }, act)?;
                    let got = from_ndhwc(&c.rd16(&out, n * ov * cout)?, n, cout, ov);
                    c.cmp(&tc_name, &shape, &got, &want, TOL_FP16);
                    Ok(())
                }),
            }
        }
        // Both of cuDNN's APIs: the legacy descriptors and the graph API's engines.
        for (api, dnn_name) in [(DnnApi::Legacy, dnn_name.clone()), (DnnApi::Graph, format!("cuDNN graph conv {desc}"))] {
            if c.dnn.is_none() {
                let why = c.dnn_why.clone();
                c.skip(&dnn_name, &shape, why);
                continue;
            }
            c.case(&dnn_name.clone(), &shape.clone(), |c| {
                let (xb, wb, bb) = upload(c)?;
                let out = c.gpu.alloc(n * ov * cout * 2)?;
                let dnn = c.dnn.as_ref().expect("checked");
                let planned = ConvPlan::new_api(dnn, ConvShape { n, dims, cin, cout, k, stride, pad: k / 2 }, api).and_then(|mut p| {
                    let mut ws = None;
                    p.run(dnn, &c.gpu, xb.ptr, wb.ptr, out.ptr, &mut ws)?;
                    Ok(p)
                });
                let plan = match planned {
                    Ok(p) => p,
                    Err(e) if dnn_optional => {
                        c.skip(&dnn_name, &shape, format!("cuDNN does not run this shape (the engine uses conv3d_c1_k3_f16 for it): {e:#}"));
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                if b.is_some() || act != Act::None {
                    ops::bias_act(&c.gpu, out.ptr, out.ptr, bb.as_ref().map(|b| b.ptr), n * ov * cout, cout, act)?;
                }
                let got = from_ndhwc(&c.rd16(&out, n * ov * cout)?, n, cout, ov);
                let name = format!("{dnn_name} [{}]", plan.algo().unwrap_or_else(|| "?".into()));
                c.cmp(&name, &shape, &got, &want, TOL_FP16);
                Ok(())
            });
        }
    }
}

fn elementwise_cases(c: &mut Ctx) {
    let dims = [5, 7, 9];
    let v = vol(dims);
    let n = 2;
    let mut cases: Vec<(usize, bool, Act, bool)> = [Act::None, Act::Relu, Act::LeakyRelu(0.01), Act::Silu, Act::Sigmoid, Act::TanhScale(2.0)]
        .into_iter()
        .enumerate()
        .map(|(i, a)| (16usize, true, a, i % 2 == 0))
        .collect();
    cases.push((48, false, Act::Silu, true));
    cases.push((320, true, Act::Relu, false));
    // Not a multiple of 8 channels: pairs.
    cases.push((6, true, Act::Silu, true));
    for (ch, bias, act, in_place) in cases {
        let shape = format!("{n}x{ch}x{}", shape_str(&dims));
        let name = format!("bias_act_f16{}{act}{}", if bias { " bias" } else { "" }, if in_place { " in place" } else { "" });
        c.case(&name.clone(), &shape.clone(), |c| {
            let x = c.rand16(n * v * ch, -4.0, 4.0);
            let b = bias.then(|| c.rand(ch, -0.5, 0.5));
            let want: Vec<f32> = x.iter().enumerate().map(|(i, &xv)| act.apply(xv + b.as_ref().map_or(0.0, |b| b[i % ch]))).collect();
            let xb = c.up16(&x)?;
            let bb = match &b {
                Some(b) => Some(c.up32(b)?),
                None => None,
            };
            let yb = if in_place { None } else { Some(c.gpu.alloc(x.len() * 2)?) };
            let y = yb.as_ref().map_or(xb.ptr, |b| b.ptr);
            ops::bias_act(&c.gpu, xb.ptr, y, bb.as_ref().map(|b| b.ptr), x.len(), ch, act)?;
            let got = c.rd16(yb.as_ref().unwrap_or(&xb), x.len())?;
            c.cmp(&name, &shape, &got, &want, TOL_FP16);
            Ok(())
        });
    }
    // 16 and 48 channels: 8 halves per step; 6: an element count that is not a multiple of 8 (pairs).
    for (ch, act, in_place) in [(16usize, Act::None, true), (48, Act::Relu, false), (6, Act::LeakyRelu(0.1), true)] {
        let shape = format!("{n}x{ch}x{}", shape_str(&dims));
        let name = format!("add_act_f16{act}{}", if in_place { " in place" } else { "" });
        c.case(&name.clone(), &shape.clone(), |c| {
            let a = c.rand16(n * v * ch, -4.0, 4.0);
            let b = c.rand16(n * v * ch, -4.0, 4.0);
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| act.apply(x + y)).collect();
            let ab = c.up16(&a)?;
            let bb = c.up16(&b)?;
            let yb = if in_place { None } else { Some(c.gpu.alloc(a.len() * 2)?) };
            let y = yb.as_ref().map_or(ab.ptr, |b| b.ptr);
            ops::add_act(&c.gpu, ab.ptr, bb.ptr, y, a.len(), act)?;
            let got = c.rd16(yb.as_ref().unwrap_or(&ab), a.len())?;
            c.cmp(&name, &shape, &got, &want, TOL_FP16);
            Ok(())
        });
    }
}

fn norm_cases(c: &mut Ctx) {
    // (n, channels, groups, dims, affine, pre, post, input offset, in place)
    let cases: Vec<(usize, usize, usize, [usize; 3], bool, Act, Act, f32, bool)> = vec![
        (2, 16, 8, [9, 11, 13], true, Act::None, Act::Relu, 0.0, true),
        (1, 48, 8, [17, 19, 23], true, Act::None, Act::Relu, 0.0, false),
        (2, 320, 320, [5, 6, 7], false, Act::None, Act::LeakyRelu(0.01), 0.0, true),
        (1, 48, 48, [24, 16, 16], false, Act::None, Act::None, 0.0, true),
        (1, 16, 16, [9, 9, 9], false, Act::None, Act::None, 10.0, false),
        (1, 32, 8, [64, 64, 64], true, Act::None, Act::Relu, 0.5, true),
        (1, 16, 16, [7, 8, 9], false, Act::Silu, Act::None, 0.0, false),
        // 32 channels per group (a warp each, four rounds) and 3 (teams of two warps, two left over).
        (1, 256, 8, [6, 8, 10], true, Act::None, Act::Relu, 0.0, false),
        (2, 24, 8, [10, 12, 14], true, Act::None, Act::Relu, 0.0, true),
        // 12 channels per group: a full round of 8, then 4 teams on 4 channels and 4 repeating one.
        (1, 48, 4, [6, 7, 8], true, Act::None, Act::Relu, 0.0, false),
        // Channel counts that are not multiples of 8: the statistics and the apply in pairs.
        (1, 12, 4, [5, 6, 7], true, Act::None, Act::Relu, 0.0, true),
        (2, 10, 10, [4, 5, 6], false, Act::Silu, Act::None, 1.0, false),
    ];
    for (n, ch, groups, dims, affine, pre, post, offset, in_place) in cases {
        let v = vol(dims);
        let shape = format!("{n}x{ch}x{}", shape_str(&dims));
        let name = format!(
            "norm {}{}{}{post}{}{}",
            if groups == ch { "instance".to_string() } else { format!("group({groups})") },
            if affine { " affine" } else { "" },
            if pre != Act::None { format!(" pre{pre}") } else { String::new() },
            if offset != 0.0 { format!(" mean {offset}") } else { String::new() },
            if in_place { " in place" } else { "" }
        );
        c.case(&name.clone(), &shape.clone(), |c| {
            let spread = if offset >= 10.0 { 0.1 } else { 2.0 };
            let x: Vec<f32> = c.rand(n * ch * v, -spread, spread).into_iter().map(|a| r16(a + offset)).collect();
            let (gamma, beta) = if affine { (Some(c.rand(ch, 0.5, 1.5)), Some(c.rand(ch, -0.5, 0.5))) } else { (None, None) };
            let mut want: Vec<f32> = x.iter().map(|&a| pre.apply(a)).collect();
            norm::group_norm(&mut want, n, ch, v, groups, gamma.as_deref(), beta.as_deref(), post);
            let xb = c.up16(&to_ndhwc(&x, n, ch, v))?;
            let gb = match &gamma {
                Some(g) => Some(c.up32(g)?),
                None => None,
            };
            let bb = match &beta {
                Some(b) => Some(c.up32(b)?),
                None => None,
            };
            let yb = if in_place { None } else { Some(c.gpu.alloc(n * v * ch * 2)?) };
            let y = yb.as_ref().map_or(xb.ptr, |b| b.ptr);
            let (pb, qb) = ops::norm_scratch_bytes(n, ch, v);
            let partial = c.gpu.alloc(pb)?;
            let params = c.gpu.alloc(qb)?;
            ops::norm(&c.gpu, xb.ptr, Some(y), n, ch, v, groups, gb.as_ref().map(|b| b.ptr), bb.as_ref().map(|b| b.ptr), pre, post, partial.ptr, params.ptr)?;
            let got = from_ndhwc(&c.rd16(yb.as_ref().unwrap_or(&xb), n * v * ch)?, n, ch, v);
            c.cmp(&name, &shape, &got, &want, TOL_FP16);
            Ok(())
        });
    }
}

fn upsample_cases(c: &mut Ctx) {
    // Channel counts that are multiples of 8 take 8 channels per step; 6 takes pairs.
    for (n, ch, dims, skip, in_place) in [(2usize, 16usize, [5usize, 6, 7], true, true), (1, 48, [3, 4, 5], false, false), (1, 320, [2, 3, 2], true, false), (1, 32, [1, 1, 3], true, false), (2, 6, [3, 2, 4], true, true)] {
        let v = vol(dims);
        let shape = format!("{n}x{ch}x{}", shape_str(&dims));
        let name = format!("upsample2x_add_f16{}{}", if skip { " +skip" } else { "" }, if in_place { " into skip" } else { "" });
        c.case(&name.clone(), &shape.clone(), |c| {
            let x = c.rand16(n * ch * v, -2.0, 2.0);
            let s = c.rand16(n * ch * v * 8, -2.0, 2.0);
            let mut want = resample::upsample2x(&x, n * ch, dims);
            if skip {
                want.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
            }
            let xb = c.up16(&to_ndhwc(&x, n, ch, v))?;
            let sb = c.up16(&to_ndhwc(&s, n, ch, 8 * v))?;
            let ob = if in_place { None } else { Some(c.gpu.alloc(n * 8 * v * ch * 2)?) };
            let out = ob.as_ref().map_or(sb.ptr, |b| b.ptr);
            ops::upsample_add(&c.gpu, xb.ptr, skip.then_some(sb.ptr), out, n, dims, ch)?;
            let got = from_ndhwc(&c.rd16(ob.as_ref().unwrap_or(&sb), n * 8 * v * ch)?, n, ch, 8 * v);
            c.cmp(&name, &shape, &got, &want, TOL_FP16);
            Ok(())
        });
    }
}

/// Each shape on both transposed-conv kernels. The shapes cover a channel slice of the concat
/// buffer (8 of 48), one whose offset is not a multiple of 8 (the tensor-core kernel's element
/// store), Cin not a multiple of its 32-deep step, and partial 64-row tiles.
fn convt_cases(c: &mut Ctx) {
    let shapes = [
        (2usize, 64usize, 32usize, [3usize, 5, 7], 48usize, 8usize),
        (1, 320, 320, [2, 3, 2], 320, 0),
        (1, 128, 64, [4, 4, 4], 128, 0),
        (1, 16, 8, [3, 3, 3], 16, 0),
        (1, 32, 24, [3, 2, 5], 52, 4),
        (2, 48, 16, [5, 4, 3], 16, 0),
    ];
    for (n, cin, cout, dims, ctot, off) in shapes {
        for kernel in [ops::ConvtKernel::TensorCore, ops::ConvtKernel::Fma] {
            let v = vol(dims);
            let name = kernel.name();
            let shape = format!("{n}x{cin}x{} ->{cout}@{off}/{ctot}", shape_str(&dims));
            if kernel == ops::ConvtKernel::TensorCore {
                if let Err(why) = c.gpu.check_tensor_cores() {
                    c.skip(name, &shape, why);
                    continue;
                }
            }
            c.case(name, &shape.clone(), |c| {
                let x = c.rand16(n * cin * v, -1.0, 1.0);
                let w: Vec<f32> = c.rand(cin * cout * 8, -0.2, 0.2).into_iter().map(r16).collect();
                let mut up = vec![0.0f32; n * cout * 8 * v];
                conv::conv_transpose2(&x, n, cin, cout, dims, &w, &mut up);
                let up = to_ndhwc(&up, n, cout, 8 * v);
                let sentinel = c.rand16(n * 8 * v * ctot, -3.0, 3.0);
                let mut want = sentinel.clone();
                for r in 0..n * 8 * v {
                    want[r * ctot + off..r * ctot + off + cout].copy_from_slice(&up[r * cout..(r + 1) * cout]);
                }
                let xb = c.up16(&to_ndhwc(&x, n, cin, v))?;
                let wb = c.up16(&w)?;
                let ob = c.up16(&sentinel)?;
                let ran = ops::conv_transpose2(&c.gpu, kernel, xb.ptr, wb.ptr, ob.ptr, n, dims, cin, cout, ctot, off)?;
                if ran != kernel {
                    bail!("{} ran instead of {name}", ran.name());
                }
                let got = c.rd16(&ob, n * 8 * v * ctot)?;
                c.cmp(name, &shape, &got, &want, TOL_FP16);
                Ok(())
            });
        }
    }
}

fn head_cases(c: &mut Ctx) {
    let dims = [9, 10, 11];
    let v = vol(dims);
    // Cin 48, 16, 64: 8 channels per load; 10: pairs.
    for (n, cin, cout, bias, act) in [(2usize, 48usize, 6usize, true, Act::Sigmoid), (2, 16, 3, true, Act::TanhScale(2.0)), (1, 64, 8, false, Act::None), (1, 10, 6, true, Act::Sigmoid)] {
        let shape = format!("{n}x{cin}x{} ->{cout}", shape_str(&dims));
        let name = format!("head_conv1x1_act_f32{act}");
        c.case(&name.clone(), &shape.clone(), |c| {
            let x = c.rand16(n * cin * v, -3.0, 3.0);
            let w = c.rand(cout * cin, -0.3, 0.3);
            let b = bias.then(|| c.rand(cout, -0.5, 0.5));
            let want = cpu_conv(&x, n, dims, cin, cout, 1, 1, &w, b.as_deref(), act);
            let xb = c.up16(&to_ndhwc(&x, n, cin, v))?;
            let wb = c.up32(&w)?;
            let bb = match &b {
                Some(b) => Some(c.up32(b)?),
                None => None,
            };
            let out = c.gpu.alloc(n * cout * v * 4)?;
            ops::head_conv(&c.gpu, xb.ptr, wb.ptr, bb.as_ref().map(|b| b.ptr), out.ptr, n, v, cin, cout, act)?;
            let got = c.rd32(&out, n * cout * v)?;
            c.cmp(&name, &shape, &got, &want, TOL_F32);
            Ok(())
        });
    }
    let (n, ch) = (2, 6);
    let shape = format!("{n}x{ch}x{}", shape_str(&dims));
    c.case("head_act_f32+sigmoid", &shape.clone(), |c| {
        let x = c.rand16(n * ch * v, -6.0, 6.0);
        let want: Vec<f32> = x.iter().map(|&a| Act::Sigmoid.apply(a)).collect();
        let xb = c.up16(&to_ndhwc(&x, n, ch, v))?;
        let out = c.gpu.alloc(n * ch * v * 4)?;
        ops::head_act(&c.gpu, xb.ptr, out.ptr, n, v, ch, Act::Sigmoid)?;
        let got = c.rd32(&out, n * ch * v)?;
        c.cmp("head_act_f32+sigmoid", &shape, &got, &want, TOL_F32);
        Ok(())
    });
}

/// An engine that returns prepared outputs, one per call: the CPU twin of the ensemble kernels is
/// `Ensemble::infer` itself.
struct Canned {
    outs: Vec<Outputs>,
    next: usize,
}

impl TileEngine for Canned {
    fn forward(&mut self, _: &[f32], _: usize, _: [usize; 3], _: bool) -> Result<Outputs> {
        let o = self.outs.get(self.next).cloned().ok_or_else(|| anyhow!("canned engine called too often"))?;
        self.next += 1;
        Ok(o)
    }
    fn name(&self) -> String {
        "canned".into()
    }
}

fn ensemble_cases(c: &mut Ctx) {
    let window = [6, 10, 10];
    let od = window.map(|l| l / 2);
    let v = vol(od);
    let (n, nc) = (2usize, 6usize);
    for (tta, models) in [(Tta::None, 2usize), (Tta::Flip, 1), (Tta::Flip, 2), (Tta::Rot90, 2)] {
        let views: Vec<usize> = match tta {
            Tta::None => vec![0],
            Tta::Flip => vec![0, 1, 2, 3],
            Tta::Rot90 => vec![0, 4, 5, 6],
        };
        let shape = format!("{n}x{nc}x{} {models} model(s)", shape_str(&od));
        let name = format!("ensemble tta {tta:?}");
        c.case(&name.clone(), &shape.clone(), |c| {
            // outs[model][view]
            let outs: Vec<Vec<Outputs>> = (0..models)
                .map(|_| views.iter().map(|_| Outputs { scores: c.rand(n * nc * v, 0.0, 1.0), offsets: c.rand(n * 3 * v, -2.0, 2.0), fm2: None }).collect())
                .collect();
            let mut ens = Ensemble {
                engines: outs.iter().map(|o| Box::new(Canned { outs: o.clone(), next: 0 }) as Box<dyn TileEngine>).collect(),
                num_classes: nc,
                stride: 2,
            };
            let tiles = vec![0.0f32; n * vol(window)];
            let (want_s, want_o) = ens.infer(&tiles, n, window, tta)?;
            let acc_s = c.gpu.upload(&vec![0.0f32; n * nc * v])?;
            let acc_o = c.gpu.upload(&vec![0.0f32; n * 3 * v])?;
            for (vi, &view) in views.iter().enumerate() {
                for m in outs.iter() {
                    let s = c.up32(&m[vi].scores)?;
                    let o = c.up32(&m[vi].offsets)?;
                    if tta == Tta::None {
                        ops::ensemble_accumulate(&c.gpu, acc_s.ptr, s.ptr, n * nc * v)?;
                        ops::ensemble_accumulate(&c.gpu, acc_o.ptr, o.ptr, n * 3 * v)?;
                    } else {
                        ops::ensemble_accumulate_view(&c.gpu, acc_s.ptr, s.ptr, n, nc, od, view, false)?;
                        ops::ensemble_accumulate_view(&c.gpu, acc_o.ptr, o.ptr, n, 3, od, view, true)?;
                    }
                }
            }
            let count = (views.len() * models) as f32;
            if count > 1.0 {
                ops::ensemble_divide(&c.gpu, acc_s.ptr, n * nc * v, count)?;
                ops::ensemble_divide(&c.gpu, acc_o.ptr, n * 3 * v, count)?;
            }
            let got_s = c.rd32(&acc_s, n * nc * v)?;
            let got_o = c.rd32(&acc_o, n * 3 * v)?;
            c.cmp(&format!("{name} scores"), &shape, &got_s, &want_s, TOL_EXACT);
            c.cmp(&format!("{name} offsets"), &shape, &got_o, &want_o, TOL_EXACT);
            if tta == Tta::None {
                // The one-pass mean over device pointers.
                let bufs: Vec<DevBuf> = outs.iter().map(|m| c.up32(&m[0].scores)).collect::<Result<_>>()?;
                let ptrs = c.gpu.upload(&bufs.iter().map(|b| b.ptr).collect::<Vec<u64>>())?;
                let dst = c.gpu.alloc(n * nc * v * 4)?;
                ops::ensemble_mean(&c.gpu, dst.ptr, ptrs.ptr, bufs.len(), n * nc * v, count)?;
                let got = c.rd32(&dst, n * nc * v)?;
                c.cmp("ensemble_mean_f32", &shape, &got, &want_s, TOL_EXACT);
            }
            Ok(())
        });
    }
}

fn blend_cases(c: &mut Ctx) {
    let shape_v = [20, 37, 41];
    let window = [8, 12, 16];
    let tiles = [3, 4, 4];
    let (nc, stride, sigma) = (6usize, 2usize, 15.0);
    let shape = format!("{} window {}", shape_str(&shape_v), shape_str(&window));
    c.case("blend_tiles_f32 + blend_finish_f32", &shape.clone(), |c| {
        let grid = TileGrid::new(shape_v, window, tiles);
        let origins = grid.origins();
        let td = window.map(|l| l / stride);
        let tv = vol(td);
        let outs: Vec<(Vec<f32>, Vec<f32>)> = origins.iter().map(|_| (c.rand(nc * tv, 0.0, 1.0), c.rand(3 * tv, -2.0, 2.0))).collect();
        let mut bl = Blender::new(nc, shape_v, window, stride, sigma);
        for (o, (s, f)) in origins.iter().zip(&outs) {
            bl.add_tile(*o, s, f);
        }
        let gd = bl.dims();
        let want: Maps = bl.finish();
        let g = vol(gd);
        let wt = c.up32(&tile_weight(td, sigma))?;
        let run = |c: &mut Ctx, parts: &[std::ops::Range<usize>]| -> Result<(Vec<f32>, Vec<f32>)> {
            let mut accs = Vec::new();
            for r in parts {
                let acc_s = c.gpu.upload(&vec![0.0f32; nc * g])?;
                let acc_o = c.gpu.upload(&vec![0.0f32; 3 * g])?;
                let cnt = c.gpu.upload(&vec![0.0f32; g])?;
                let ts: Vec<f32> = outs[r.clone()].iter().flat_map(|(s, _)| s.iter().copied()).collect();
                let to: Vec<f32> = outs[r.clone()].iter().flat_map(|(_, f)| f.iter().copied()).collect();
                let org: Vec<i32> = origins[r.clone()].iter().flat_map(|o| o.map(|x| (x / stride) as i32)).collect();
                let (tsb, tob, ob) = (c.up32(&ts)?, c.up32(&to)?, c.gpu.upload(&org)?);
                ops::blend_tiles(&c.gpu, acc_s.ptr, acc_o.ptr, cnt.ptr, nc, gd, tsb.ptr, tob.ptr, wt.ptr, ob.ptr, r.len(), td, [0, 0, 0], gd)?;
                accs.push((acc_s, acc_o, cnt));
            }
            let (acc_s, acc_o, cnt) = accs.remove(0);
            for (s, o, k) in &accs {
                ops::blend_merge(&c.gpu, acc_s.ptr, s.ptr, nc * g)?;
                ops::blend_merge(&c.gpu, acc_o.ptr, o.ptr, 3 * g)?;
                ops::blend_merge(&c.gpu, cnt.ptr, k.ptr, g)?;
            }
            ops::blend_finish(&c.gpu, acc_s.ptr, cnt.ptr, nc, g)?;
            ops::blend_finish(&c.gpu, acc_o.ptr, cnt.ptr, 3, g)?;
            Ok((c.rd32(&acc_s, nc * g)?, c.rd32(&acc_o, 3 * g)?))
        };
        let (s, o) = run(c, std::slice::from_ref(&(0..origins.len())))?;
        c.cmp("blend_tiles_f32 scores", &shape, &s, &want.scores, TOL_EXACT);
        c.cmp("blend_tiles_f32 offsets", &shape, &o, &want.offsets, TOL_EXACT);
        let half = origins.len() / 2;
        let (s, o) = run(c, &[0..half, half..origins.len()])?;
        c.cmp("blend_merge_f32 (2 partial sums) scores", &shape, &s, &want.scores, TOL_MERGED);
        c.cmp("blend_merge_f32 (2 partial sums) offsets", &shape, &o, &want.offsets, TOL_MERGED);
        Ok(())
    });
}

fn nms_cases(c: &mut Ctx) {
    let dims = [13, 17, 19];
    let nc = 6;
    let thr = [0.3f32, 0.5, 0.0, 0.7, 0.9, 0.255];
    for capacity in [usize::MAX, 10] {
        let cells = vol(dims);
        let cap = capacity.min(cells);
        let shape = format!("{nc}x{} cap {cap}", shape_str(&dims));
        c.case("nms_count + nms_scan + nms_write", &shape.clone(), |c| {
            // Quantised scores make plateaus (ties); one NaN in class 3.
            let mut s: Vec<f32> = c.rand(nc * cells, 0.0, 1.0).into_iter().map(|x| (x * 20.0).round() / 20.0).collect();
            s[3 * cells + cells / 2] = f32::NAN;
            let mut want: Vec<Vec<(u32, f32)>> = Vec::new();
            for (ch, &t) in thr.iter().enumerate().take(nc) {
                let pk = peaks(&s, dims, ch);
                want.push(pk.iter().enumerate().filter(|(_, &p)| p >= t).map(|(i, &p)| (i as u32, p)).collect());
            }
            let nblk = ops::nms_blocks(cells);
            let sb = c.up32(&s)?;
            let tb = c.up32(&thr)?;
            let counts = c.gpu.alloc(nc * nblk * 4)?;
            let offs = c.gpu.alloc(nc * nblk * 4)?;
            let totals = c.gpu.alloc(nc * 4)?;
            let idx = c.gpu.alloc(nc * cap * 4)?;
            let sc = c.gpu.alloc(nc * cap * 4)?;
            ops::nms(&c.gpu, sb.ptr, nc, dims, tb.ptr, counts.ptr, offs.ptr, totals.ptr, cap, idx.ptr, sc.ptr)?;
            let tot = c.gpu.read::<u32>(totals.ptr, nc)?;
            let gi = c.gpu.read::<u32>(idx.ptr, nc * cap)?;
            let gs = c.rd32(&sc, nc * cap)?;
            let mut bad = 0usize;
            let mut total = 0usize;
            for ch in 0..nc {
                total += want[ch].len();
                if tot[ch] as usize != want[ch].len() {
                    bad += want[ch].len().abs_diff(tot[ch] as usize).max(1);
                }
                for (k, &(i, p)) in want[ch].iter().take(cap).enumerate() {
                    if gi[ch * cap + k] != i || gs[ch * cap + k].to_bits() != p.to_bits() {
                        bad += 1;
                    }
                }
            }
            let st = if bad == 0 { Status::Pass } else { Status::Fail };
            c.row("nms_count + nms_scan + nms_write", &shape, bad as f64, f64::NAN, (0.0, f64::NAN), st, format!("{total} candidates; mismatches counted in max|Δ|"));
            // The offsets at the written candidates (nms_gather_offsets): copies, so exact.
            let offsets = c.rand(3 * cells, -2.0, 2.0);
            let ob = c.up32(&offsets)?;
            let go = c.gpu.alloc(nc * cap * 3 * 4)?;
            ops::nms_gather_offsets(&c.gpu, ob.ptr, cells, nc, totals.ptr, cap, idx.ptr, go.ptr)?;
            let got = c.rd32(&go, nc * cap * 3)?;
            let mut bad = 0usize;
            for ch in 0..nc {
                for (k, &(i, _)) in want[ch].iter().take(cap).enumerate() {
                    for a in 0..3 {
                        if got[(ch * cap + k) * 3 + a].to_bits() != offsets[a * cells + i as usize].to_bits() {
                            bad += 1;
                        }
                    }
                }
            }
            let st = if bad == 0 { Status::Pass } else { Status::Fail };
            c.row("nms_gather_offsets", &shape, bad as f64, f64::NAN, (0.0, f64::NAN), st, "mismatching offsets counted in max|Δ|".to_string());
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------------------------
// 2. networks

fn networks(c: &mut Ctx, opts: &Options) {
    if let Some(why) = c.dead.clone() {
        c.skip("networks", "-", format!("device unusable after an earlier error: {why}"));
        return;
    }
    let specs = opts.network_specs.clone().unwrap_or_else(|| vec![ModelSpec::seed(Arch::Segresnetv2), ModelSpec::seed(Arch::Dynunet)]);
    let tile = opts.network_tile.unwrap_or(if opts.quick { [64, 64, 64] } else { [192, 128, 128] });
    for (si, spec) in specs.iter().enumerate() {
        let arch = spec.arch.name();
        let shape = format!("1x1x{}", shape_str(&tile));
        let w = Weights::random(spec, opts.seed.wrapping_add(si as u64 * 101));
        let x = c.rand16(vol(tile), 0.0, 1.0);
        crate::errln!("selftest: {arch} on {shape}: CPU reference...");
        let t0 = Instant::now();
        let want = match CpuEngine::new(&w).and_then(|mut e| e.forward(&x, 1, tile, true)) {
            Ok(o) => o,
            Err(e) => {
                c.row(&format!("{arch} cpu reference"), &shape, f64::NAN, f64::NAN, (f64::NAN, f64::NAN), Status::Fail, format!("error: {e:#}"));
                continue;
            }
        };
        let cpu_s = t0.elapsed().as_secs_f64();
        c.time(format!("{arch} {shape} cpu forward"), cpu_s);
        // cuDNN where it loads (its heuristic algorithms, and those it times fastest), the direct
        // kernel, and the tensor-core path (Auto without cuDNN is
        // one of the last two), the latter as it runs by default, with every norm applied in the
        // next conv's loads, on the wide tiles and with cp.async loads (the timings side by side).
        let mut backends = Vec::new();
        let default = TcPolicy::default();
        let legacy = DnnApi::Legacy;
        if c.dnn.is_some() {
            backends.push((ConvBackend::Auto, default, format!("{arch} cuDNN"), false, legacy));
            // The algorithms cuDNN times fastest (FASTDET_CUDNN_FIND=1, the measured cudnn-find).
            backends.push((ConvBackend::Auto, default, format!("{arch} cuDNN timed algorithms"), true, legacy));
            // The graph API's engines, in heuristic order and timed (FASTDET_CUDNN_API=graph).
            backends.push((ConvBackend::Auto, default, format!("{arch} cuDNN graph API"), false, DnnApi::Graph));
            backends.push((ConvBackend::Auto, default, format!("{arch} cuDNN graph API timed engines"), true, DnnApi::Graph));
        }
        backends.push((ConvBackend::Direct, default, format!("{arch} direct-conv"), false, legacy));
        if c.gpu.check_tensor_cores().is_ok() {
            for (_, suffix, policy) in TcPolicy::compared() {
                backends.push((ConvBackend::TensorCore, policy, format!("{arch} tensor-core{suffix}"), false, legacy));
            }
        }
        for (backend, policy, label, cudnn_find, api) in backends {
            c.case(&label.clone(), &shape.clone(), |c| {
                let mut e = CudaEngine::on_with(c.gpu.clone(), &w, backend, policy)?;
                e.set_cudnn_api(api);
                if cudnn_find {
                    e.set_cudnn_find(true);
                }
                let t = Instant::now();
                let cold = e.forward(&x, 1, tile, true)?;
                let cold_s = t.elapsed().as_secs_f64();
                // Warm and unsynchronised, like a run.
                c.gpu.set_sync_each(false);
                let t = Instant::now();
                let reps = if c.gpu.is_emulator() { 1 } else { 3 };
                let mut got = cold.clone();
                for _ in 0..reps {
                    got = e.forward(&x, 1, tile, true)?;
                }
                let warm_s = t.elapsed().as_secs_f64() / reps as f64;
                c.gpu.set_sync_each(true);
                c.cmp(&format!("{label} scores"), &shape, &got.scores, &want.scores, TOL_NET_SCORES);
                c.cmp(&format!("{label} offsets"), &shape, &got.offsets, &want.offsets, TOL_NET_OFFSETS);
                c.cmp(&format!("{label} fm2"), &shape, got.fm2.as_deref().unwrap_or(&[]), want.fm2.as_deref().unwrap_or(&[]), TOL_NET_FM2);
                let same = cold.scores == got.scores && cold.offsets == got.offsets;
                let flops = crate::model::graph::Graph::build(spec).map(|g| g.flops(tile)).unwrap_or(0) as f64;
                let note = format!(
                    "first {:.3} s, warm {:.4} s ({:.1} TFLOP/s), cpu {:.2} s; repeat {}",
                    cold_s,
                    warm_s,
                    flops / warm_s.max(1e-9) / 1e12,
                    cpu_s,
                    if same { "bit-identical" } else { "DIFFERS" }
                );
                c.info(&format!("{label} timing"), &shape, note);
                c.time(format!("{label} {shape} gpu forward warm"), warm_s);
                if !same {
                    c.row(&format!("{label} determinism"), &shape, f64::NAN, f64::NAN, (0.0, 0.0), Status::Fail, "two runs of the same input differ".into());
                }
                for n in e.notes().into_iter().skip(2) {
                    if !c.notes.contains(&n) {
                        c.notes.push(n);
                    }
                }
                // The graph API's rows check the graph API: a convolution it left to the legacy
                // API fails the row, naming it and why.
                if api == DnnApi::Graph {
                    if let Some(fell_back) = e.graph_api_fallback_summary() {
                        c.row(&format!("{label} plans"), &shape, f64::NAN, f64::NAN, (0.0, 0.0), Status::Fail, fell_back);
                    }
                }
                let algos = e.conv_algorithms();
                if !algos.is_empty() {
                    let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
                    for (_, _, a) in &algos {
                        *counts.entry(a.clone()).or_default() += 1;
                    }
                    c.notes.push(format!("{label} cuDNN algorithms: {counts:?}"));
                }
                Ok(())
            });
        }
        // CUDA graphs: the walks replayed from a graph give, bit for bit, what eager walks give,
        // on fresh inputs; and what the replay saves per tile.
        let inputs: Vec<Vec<f32>> = (0..4).map(|_| c.rand16(vol(tile), 0.0, 1.0)).collect();
        c.case(&format!("{arch} CUDA graph replay"), &shape.clone(), |c| {
            // Graphs need unsynchronised kernels; the engines decide at construction.
            c.gpu.set_sync_each(false);
            let r = graph_replay_check(c, &w, &inputs, tile);
            c.gpu.set_sync_each(true);
            let (identical, counts, eager_s, replay_s) = r?;
            let status = if identical.iter().all(|&same| same) && counts == (1, inputs.len() - 1, 1) { Status::Pass } else { Status::Fail };
            let note = format!(
                "{} calls, graph/eager bit-identical: {identical:?}; (graphs, replays, eager walks) {counts:?}; warm eager {:.4} s, replay {:.4} s per tile",
                inputs.len(),
                eager_s,
                replay_s
            );
            c.row(&format!("{arch} CUDA graph replay"), &shape, f64::NAN, f64::NAN, (0.0, 0.0), status, note);
            c.time(format!("{arch} {shape} gpu forward warm, eager"), eager_s);
            c.time(format!("{arch} {shape} gpu forward warm, graph replay"), replay_s);
            Ok(())
        });
        // Batching: two different tiles in one call equal two single calls.
        let small = [tile[0].min(64), tile[1].min(64), tile[2].min(64)];
        let bshape = format!("2x1x{}", shape_str(&small));
        c.case(&format!("{arch} batch of 2"), &bshape.clone(), |c| {
            let mut e = CudaEngine::on(c.gpu.clone(), &w, ConvBackend::Auto)?;
            let sv = vol(small);
            let xs = c.rand16(2 * sv, 0.0, 1.0);
            let both = e.forward(&xs, 2, small, false)?;
            let a = e.forward(&xs[..sv], 1, small, false)?;
            let b = e.forward(&xs[sv..], 1, small, false)?;
            let single: Vec<f32> = a.scores.iter().chain(&b.scores).copied().collect();
            c.cmp(&format!("{arch} batch of 2 vs 2 single (scores)"), &bshape, &both.scores, &single, TOL_NET_SCORES);
            Ok(())
        });
    }
}

/// Runs `inputs` through an engine with CUDA graphs (eager, capture, replays) and one without:
/// whether each call's outputs are identical, the graph engine's (graphs, replays, eager walks),
/// and the warm seconds per call of each (three more calls of the last input).
fn graph_replay_check(c: &Ctx, w: &Weights, inputs: &[Vec<f32>], tile: [usize; 3]) -> Result<(Vec<bool>, (usize, usize, usize), f64, f64)> {
    let mut graphs = CudaEngine::on(c.gpu.clone(), w, ConvBackend::Auto)?;
    let mut eager = CudaEngine::on(c.gpu.clone(), w, ConvBackend::Auto)?;
    eager.set_graphs(false);
    let mut identical = Vec::new();
    for x in inputs {
        let a = graphs.forward(x, 1, tile, true)?;
        let b = eager.forward(x, 1, tile, true)?;
        identical.push(a.scores == b.scores && a.offsets == b.offsets && a.fm2 == b.fm2);
    }
    let counts = graphs.graph_counts();
    let reps = if c.gpu.is_emulator() { 1 } else { 3 };
    let last = inputs.last().context("no inputs")?;
    let time = |e: &mut CudaEngine| -> Result<f64> {
        let t = Instant::now();
        for _ in 0..reps {
            let out = e.forward_device(last, 1, tile, false)?;
            c.gpu.sync("timing")?;
            e.recycle(out);
        }
        Ok(t.elapsed().as_secs_f64() / reps as f64)
    };
    // forward_device without fm2 is a shape of its own: one eager walk and one capture first.
    for _ in 0..2 {
        let out = graphs.forward_device(last, 1, tile, false)?;
        graphs.recycle(out);
    }
    let eager_s = time(&mut eager)?;
    let replay_s = time(&mut graphs)?;
    Ok((identical, counts, eager_s, replay_s))
}

// ---------------------------------------------------------------------------------------------
// 3. pipeline

/// The demo weights (`weights/demo_*.safetensors`) next to the working directory or the binary.
pub fn find_demo_weights() -> Vec<PathBuf> {
    let names = ["demo_segresnetv2.safetensors", "demo_dynunet.safetensors"];
    let mut roots = vec![PathBuf::from("weights")];
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(4) {
            roots.push(up.join("weights"));
        }
    }
    for r in roots {
        let p: Vec<PathBuf> = names.iter().map(|n| r.join(n)).collect();
        if p.iter().all(|p| p.is_file()) {
            return p;
        }
    }
    Vec::new()
}

/// Per class, greedy: each CPU detection (best first) takes the nearest unused GPU detection of the
/// same class within `MATCH_DIST` voxels and `MATCH_SCORE`. Returns (matched, max distance, max
/// |Δscore|) over the matches.
pub fn match_detections(cpu: &[Detection], gpu: &[Detection]) -> (usize, f64, f64) {
    use std::collections::HashMap;
    let key = |d: &Detection| (d.class, d.x.floor() as i64, d.y.floor() as i64, d.z.floor() as i64);
    let mut grid: HashMap<(usize, i64, i64, i64), Vec<usize>> = HashMap::new();
    for (i, d) in gpu.iter().enumerate() {
        if d.x.is_finite() && d.y.is_finite() && d.z.is_finite() {
            grid.entry(key(d)).or_default().push(i);
        }
    }
    let mut used = vec![false; gpu.len()];
    let (mut matched, mut maxd, mut maxs) = (0usize, 0.0f64, 0.0f64);
    for d in cpu {
        if !(d.x.is_finite() && d.y.is_finite() && d.z.is_finite()) {
            continue;
        }
        let (cl, kx, ky, kz) = key(d);
        let mut best: Option<(f64, usize)> = None;
        for dz in -1..=1 {
            for dy in -1..=1 {
                for dx in -1..=1 {
                    if let Some(list) = grid.get(&(cl, kx + dx, ky + dy, kz + dz)) {
                        for &j in list {
                            if used[j] {
                                continue;
                            }
                            let g = &gpu[j];
                            let dist = ((g.x - d.x).powi(2) + (g.y - d.y).powi(2) + (g.z - d.z).powi(2)).sqrt();
                            if dist <= MATCH_DIST && ((g.score - d.score).abs() as f64) <= MATCH_SCORE && best.is_none_or(|(bd, _)| dist < bd) {
                                best = Some((dist, j));
                            }
                        }
                    }
                }
            }
        }
        if let Some((dist, j)) = best {
            used[j] = true;
            matched += 1;
            maxd = maxd.max(dist);
            maxs = maxs.max((gpu[j].score - d.score).abs() as f64);
        }
    }
    (matched, maxd, maxs)
}

fn pipeline(c: &mut Ctx, opts: &Options) {
    if let Some(why) = c.dead.clone() {
        c.skip("pipeline", "-", format!("device unusable after an earlier error: {why}"));
        return;
    }
    let shape = opts.pipeline_shape;
    let sname = format!("{} w{} t{}", shape_str(&shape), shape_str(&opts.pipeline_window), shape_str(&opts.pipeline_tiles));
    let mut paths = opts.pipeline_weights.clone();
    if paths.is_empty() {
        paths = find_demo_weights();
    }
    let weights: Vec<Weights> = if paths.is_empty() {
        c.notes.push("pipeline: demo weights not found; random weights of the demo widths".into());
        vec![Weights::random(&ModelSpec::segresnet(8, 16, 8), opts.seed), Weights::random(&ModelSpec::dynunet(&[8, 16, 32, 64, 80, 80], 16, 16, 8), opts.seed + 1)]
    } else {
        match paths.iter().map(|p| Weights::load(p)).collect::<Result<Vec<_>>>() {
            Ok(w) => w,
            Err(e) => {
                c.row("pipeline weights", &sname, f64::NAN, f64::NAN, (f64::NAN, f64::NAN), Status::Fail, format!("error: {e:#}"));
                return;
            }
        }
    };
    c.notes.push(format!("pipeline models: {}", weights.iter().map(|w| format!("{} ({})", w.name, w.path.display())).collect::<Vec<_>>().join(", ")));
    crate::errln!("selftest: pipeline: synthetic tomogram {}...", shape_str(&shape));
    let t = Instant::now();
    let tomo = crate::synth::make_tomogram(shape, &crate::synth::counts_for_shape(shape), opts.seed, crate::synth::FIXTURE_NOISE);
    c.time(format!("synthetic tomogram {}", shape_str(&shape)), t.elapsed().as_secs_f64());
    let settings = Settings { window: opts.pipeline_window, tiles: opts.pipeline_tiles, ..Settings::default() };
    let stride = weights[0].spec.stride;
    let nc = weights[0].spec.num_classes;
    let run_with = |engines: Vec<Box<dyn TileEngine>>, settings: &Settings| -> Result<(Maps, Vec<Detection>, f64, Timing)> {
        let mut ens = Ensemble { engines, num_classes: nc, stride };
        let mut v = tomo.data.clone();
        let mut timing = Timing::default();
        let t = Instant::now();
        let maps = predict_maps(&mut ens, &mut v, shape, settings, &mut |_, _| {}, &mut timing)?;
        let dets = detect_maps(&maps, settings, stride);
        Ok((maps, dets, t.elapsed().as_secs_f64(), timing))
    };
    let run = |engines: Vec<Box<dyn TileEngine>>| run_with(engines, &settings);
    crate::errln!("selftest: pipeline: {} model(s) on the CPU ({sname})...", weights.len());
    let cpu = match weights.iter().map(|w| CpuEngine::new(w).map(|e| Box::new(e) as Box<dyn TileEngine>)).collect::<Result<Vec<_>>>().and_then(&run) {
        Ok(r) => r,
        Err(e) => {
            c.row("pipeline cpu reference", &sname, f64::NAN, f64::NAN, (f64::NAN, f64::NAN), Status::Fail, format!("error: {e:#}"));
            return;
        }
    };
    c.time(format!("pipeline cpu {sname}"), cpu.2);
    c.case("pipeline", &sname.clone(), |c| {
        let engines = weights.iter().map(|w| CudaEngine::on(c.gpu.clone(), w, ConvBackend::Auto).map(|e| Box::new(e) as Box<dyn TileEngine>)).collect::<Result<Vec<_>>>()?;
        crate::errln!("selftest: pipeline: the same on the GPU...");
        let gpu = run(engines)?;
        c.time(format!("pipeline gpu {sname}"), gpu.2);
        c.cmp("pipeline blended scores", &sname, &gpu.0.scores, &cpu.0.scores, TOL_NET_SCORES);
        c.cmp("pipeline blended offsets", &sname, &gpu.0.offsets, &cpu.0.offsets, TOL_NET_OFFSETS);
        let (cd, gd) = (&cpu.1, &gpu.1);
        let (matched, maxd, maxs) = match_detections(cd, gd);
        let n = cd.len().max(1) as f64;
        let unmatched_cpu = 1.0 - matched as f64 / n;
        let extra = (gd.len() - matched.min(gd.len())) as f64 / n;
        let ok = (cd.is_empty() && gd.is_empty()) || (matched as f64 >= MIN_MATCHED * cd.len() as f64 && extra <= MAX_EXTRA);
        c.row(
            "pipeline detections (1-matched, extra)",
            &sname,
            unmatched_cpu,
            extra,
            (1.0 - MIN_MATCHED, MAX_EXTRA),
            if ok { Status::Pass } else { Status::Fail },
            format!("cpu {} gpu {} matched {matched} (≤{MATCH_DIST} vox, |Δs|≤{MATCH_SCORE}); max dist {maxd:.3}, max |Δscore| {maxs:.4}", cd.len(), gd.len()),
        );
        if cd.is_empty() {
            c.notes.push("pipeline: the CPU found no detections; the match check is vacuous".into());
        }
        c.info(
            "pipeline timing",
            &sname,
            format!(
                "cpu {:.1} s (infer {:.1}), gpu {:.2} s (infer {:.2}, blend {:.2}); {:.1}x",
                cpu.2,
                cpu.3.infer,
                gpu.2,
                gpu.3.infer,
                gpu.3.blend,
                cpu.2 / gpu.2.max(1e-9)
            ),
        );
        // Averaging and blending on the device: the host blending's f32 operations in its order,
        // on the same engine outputs, so the same maps bit for bit.
        crate::errln!("selftest: pipeline: again blending on the device...");
        let engines = weights.iter().map(|w| CudaEngine::on(c.gpu.clone(), w, ConvBackend::Auto).map(|e| Box::new(e) as Box<dyn TileEngine>)).collect::<Result<Vec<_>>>()?;
        let dev = run_with(engines, &Settings { device_blend: true, ..settings.clone() })?;
        c.cmp("pipeline device blend scores (vs host blend)", &sname, &dev.0.scores, &gpu.0.scores, TOL_EXACT);
        c.cmp("pipeline device blend offsets (vs host blend)", &sname, &dev.0.offsets, &gpu.0.offsets, TOL_EXACT);
        c.info(
            "pipeline device blend timing",
            &sname,
            format!("{:.2} s (upload {:.2}, infer {:.2}, blend {:.2}) vs {:.2} s blending on the host; {} vs {} detections", dev.2, dev.3.upload, dev.3.infer, dev.3.blend, gpu.2, dev.1.len(), gpu.1.len()),
        );
        // Detection candidates from the device maps (the maps never come back): the same
        // detections as the host's detection on the host-blended maps, exactly.
        let engines = weights.iter().map(|w| CudaEngine::on(c.gpu.clone(), w, ConvBackend::Auto).map(|e| Box::new(e) as Box<dyn TileEngine>)).collect::<Result<Vec<_>>>()?;
        let mut ens = Ensemble { engines, num_classes: nc, stride };
        let mut v = tomo.data.clone();
        let mut timing = Timing::default();
        let t = Instant::now();
        let (dets, _) = predict_and_detect(&mut ens, &mut v, shape, &Settings { device_blend: true, ..settings.clone() }, &mut |_, _| {}, &mut timing, false, Default::default())?;
        let elapsed = t.elapsed().as_secs_f64();
        let same = dets == gpu.1;
        let differing = if same { 0 } else { dets.len().abs_diff(gpu.1.len()).max(dets.iter().zip(&gpu.1).filter(|(a, b)| a != b).count()).max(1) };
        c.row(
            "pipeline device blend detections (vs host)",
            &sname,
            differing as f64,
            f64::NAN,
            (0.0, f64::NAN),
            if same { Status::Pass } else { Status::Fail },
            format!("{} vs {} detections; {elapsed:.2} s (detect {:.3} s on the device path)", dets.len(), gpu.1.len(), timing.detect),
        );
        Ok(())
    });
}


/// Checks that the CLI's target exists; the "no GPU" answer for the CLI's exit code 2.
pub fn check_target(t: Target) -> Result<String> {
    match t {
        Target::Emulator => Ok("CPU emulator of the CUDA kernels".into()),
        Target::HostKernels => super::host_kernels::HostKernels::shared().map(|k| format!("kernels/*.cu compiled for the host ({})", k.path.display())),
        Target::Cuda(i) => super::gpu::probe(i).map(|d| d.describe()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_measures() {
        let (mx, rel, rmax, nd) = diff(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.5]);
        assert!((mx - 0.5).abs() < 1e-12 && nd == 1 && rmax == 3.5);
        assert!((rel - 0.5 / (1.0f64 + 4.0 + 12.25).sqrt()).abs() < 1e-12);
        let (mx, _, _, nd) = diff(&[f32::NAN], &[1.0]);
        assert!(mx.is_infinite() && nd == 1);
        let (mx, _, _, nd) = diff(&[f32::NAN], &[f32::NAN]);
        assert!(mx == 0.0 && nd == 0);
        assert!(diff(&[1.0], &[1.0, 2.0]).0.is_infinite());
    }

    fn det(class: usize, score: f32, x: f64, y: f64, z: f64) -> Detection {
        Detection { class, score, x, y, z }
    }

    #[test]
    fn detections_match_within_limits() {
        let cpu = vec![det(0, 0.9, 10.0, 10.0, 10.0), det(0, 0.8, 20.0, 20.0, 20.0), det(1, 0.7, 10.0, 10.0, 10.0), det(2, 0.5, 5.0, 5.0, 5.0)];
        let gpu = vec![
            det(0, 0.901, 10.5, 10.2, 9.9),  // match
            det(0, 0.85, 20.0, 20.0, 20.0),  // score too far
            det(1, 0.7, 11.2, 10.0, 10.0),   // too far away
            det(2, 0.505, 5.9, 5.0, 5.0),    // match, across a cell boundary
            det(3, 0.5, 5.0, 5.0, 5.0),      // other class
        ];
        let (m, d, s) = match_detections(&cpu, &gpu);
        assert_eq!(m, 2);
        assert!(d > 0.89 && d <= 1.0, "{d}");
        assert!(s > 0.004 && s < 0.006, "{s}");
    }

    /// The kernel section on the emulator: exercises every case's plumbing (uploads, layouts,
    /// launch arguments and grids, comparisons) without a GPU. The emulator computes each kernel
    /// from its header, so these rows also check the headers against the CPU twins.
    #[test]
    fn kernel_section_passes_on_the_emulator() {
        let mut o = Options::new(Target::Emulator);
        o.networks = false;
        o.pipeline = false;
        let mut lines = Vec::new();
        let r = run(&o, &mut |row| lines.push(row.line())).unwrap();
        let fails: Vec<&Row> = r.rows.iter().filter(|x| x.status == Status::Fail).collect();
        assert!(fails.is_empty(), "{}", fails.iter().map(|r| r.line()).collect::<Vec<_>>().join("\n"));
        assert!(r.rows.len() > 40, "{}", lines.join("\n"));
        assert!(r.rows.iter().any(|x| x.name.starts_with("cuDNN") && x.status == Status::Skip));
    }

    /// The kernel section with the kernels' own source compiled for the host: every kernel of
    /// kernels/*.cu against its CPU twin, without a GPU. Skips (printing why) only when there is
    /// no C++ compiler, and not even then with FASTDET_REQUIRE_HOST_KERNELS=1.
    #[test]
    fn kernel_section_passes_with_the_kernels_compiled_for_the_host() {
        if !super::super::host_kernels::available_for_tests() {
            return;
        }
        let mut o = Options::new(Target::HostKernels);
        o.networks = false;
        o.pipeline = false;
        let mut lines = Vec::new();
        let r = run(&o, &mut |row| lines.push(row.line())).unwrap();
        println!("{}", lines.join("\n"));
        let fails: Vec<&Row> = r.rows.iter().filter(|x| x.status == Status::Fail).collect();
        assert!(fails.is_empty(), "{}", fails.iter().map(|r| r.line()).collect::<Vec<_>>().join("\n"));
        assert!(r.rows.len() > 40, "{}", lines.join("\n"));
        assert!(r.notes.iter().any(|n| n.contains("compiled for the host")), "{:?}", r.notes);
    }

    /// Both networks and the whole-tomogram check through the kernels' own source compiled for
    /// the host (small widths and shapes: every launch runs its threads as fibers).
    #[test]
    fn network_and_pipeline_sections_pass_with_the_kernels_compiled_for_the_host() {
        if !super::super::host_kernels::available_for_tests() {
            return;
        }
        // Smaller shapes than the emulator's test: here every thread of every launch runs.
        network_and_pipeline_sections_pass_on(Target::HostKernels, [16, 16, 16], [20, 32, 48], [32, 32, 32], [1, 1, 2]);
    }

    #[test]
    fn network_and_pipeline_sections_pass_on_the_emulator() {
        network_and_pipeline_sections_pass_on(Target::Emulator, [16, 32, 32], [24, 70, 62], [32, 32, 32], [1, 3, 3]);
    }

    fn network_and_pipeline_sections_pass_on(target: Target, tile: [usize; 3], shape: [usize; 3], window: [usize; 3], tiles: [usize; 3]) {
        let mut o = Options::new(target);
        o.kernels = false;
        o.network_specs = Some(vec![ModelSpec::segresnet(8, 16, 8), ModelSpec::dynunet(&[8, 16, 32, 32], 16, 16, 8)]);
        o.network_tile = Some(tile);
        o.pipeline_weights = Vec::new();
        o.pipeline_shape = shape;
        o.pipeline_window = window;
        o.pipeline_tiles = tiles;
        let r = run(&o, &mut |_| {}).unwrap();
        let fails: Vec<String> = r.rows.iter().filter(|x| x.status == Status::Fail).map(|r| r.line()).collect();
        assert!(fails.is_empty(), "{}", fails.join("\n"));
        assert!(r.rows.iter().any(|x| x.name.starts_with("pipeline detections") && x.status == Status::Pass));
        assert_eq!(r.rows.iter().filter(|x| x.name.starts_with("pipeline device blend") && x.status == Status::Pass).count(), 3);
        assert!(serde_json::to_string_pretty(&r).unwrap().contains("\"status\": \"PASS\""));
    }
}
