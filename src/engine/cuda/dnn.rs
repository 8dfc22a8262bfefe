//! cuDNN convolutions on NDHWC fp16 tensors (legacy descriptor API through cudarc's `result`
//! layer, raw device pointers): x `[N, D, H, W, Cin]`, filter in cuDNN's NHWC filter layout
//! `[Cout, kd, kh, kw, Cin]` (KTRSC), y `[N, OD, OH, OW, Cout]`, compute type f32
//! (PSEUDO_HALF_CONFIG), tensor-core math allowed.
//!
//! Algorithms come from `cudnnGetConvolutionForwardAlgorithm_v7` (heuristics, best first),
//! deterministic ones first; a plan tries them in order on its first run and keeps the first that
//! executes (cuDNN can list algorithms that then refuse a 3-D NDHWC shape). When none runs, the
//! caller falls back to our own implicit-GEMM kernel (`conv3d.cu`), unless the device was full:
//! that `OutOfMemory` goes up to the runner, which retries the batch in halves.
//!
//! With `find` (`FASTDET_CUDNN_FIND=1`, or the measured choice `cudnn-find`), a plan's first run
//! times the candidates on the real buffers (`cudnnFindConvolutionForwardAlgorithmEx`, as
//! PyTorch's `cudnn.benchmark`) and tries them fastest first, deterministic ones still first;
//! the order is kept per device and shape for the rest of the process, so an ensemble of one
//! architecture times each shape once.
//!
//! `ConvPlan` is either such a legacy plan or a graph-API plan (`dnn_graph.rs`,
//! `FASTDET_CUDNN_API=graph` or the measured choices `cudnn-graph*`), which lists cuDNN's
//! engines for the shape instead of its legacy algorithms.

use anyhow::{anyhow, bail, Result};
use cudarc::cudnn::{result, sys};

use super::device_wide::device_wide;
use super::dnn_graph::GraphPlan;
use super::gpu::{guard, DevBuf, Gpu};
use super::ops::ConvShape;
use crate::pipeline::runner::OutOfMemory;

/// Largest workspace a convolution may use (bytes); algorithms wanting more are skipped.
/// `FASTDET_CUDNN_WORKSPACE_MIB` overrides it.
pub(super) fn workspace_limit() -> usize {
    std::env::var("FASTDET_CUDNN_WORKSPACE_MIB").ok().and_then(|v| v.parse::<usize>().ok()).map_or(1 << 30, |m| m << 20)
}

/// Where cuDNN 9 and the libraries it loads come from in pip wheels.
const HINT: &str = "put the directories of libcudnn*.so.9 (site-packages/nvidia/cudnn/lib) and of libcublasLt \
(site-packages/nvidia/cu13/lib or nvidia/cublas/lib) on LD_LIBRARY_PATH";

/// A cuDNN handle bound to the device's stream.
pub struct Dnn {
    handle: sys::cudnnHandle_t,
    /// The device's ordinal: creating and destroying the handle synchronise the device, which
    /// waits for other threads' graph captures there (`device_wide`).
    pub(super) ordinal: usize,
    /// `cudnnGetVersion()`, e.g. 91000 for 9.10.0.
    pub version: usize,
    /// Order each plan's algorithms by timing them at its first run (see the module's note).
    pub find: bool,
    /// Which of cuDNN's APIs plans the convolutions.
    pub api: DnnApi,
}

/// The legacy descriptor API (`LegacyPlan`, the default) or the graph API (`dnn_graph.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DnnApi {
    #[default]
    Legacy,
    Graph,
}

impl DnnApi {
    /// `FASTDET_CUDNN_API` = legacy | graph (default legacy).
    pub fn from_env() -> Result<DnnApi> {
        super::env_choice("FASTDET_CUDNN_API", &[("legacy", DnnApi::Legacy), ("graph", DnnApi::Graph)])
    }
}

// SAFETY: the handle is used by one engine at a time (TileEngine::forward takes &mut self).
unsafe impl Send for Dnn {}

impl Drop for Dnn {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            let handle = self.handle;
            // SAFETY: created by create_handle, destroyed once.
            let _ = std::panic::catch_unwind(|| device_wide(self.ordinal, || unsafe { result::destroy_handle(handle) }));
        }
    }
}

impl Dnn {
    /// A handle on `gpu`'s stream; an error (never a panic) when libcudnn is missing or too old.
    pub fn new(gpu: &Gpu) -> Result<Dnn> {
        if !super::gpu::cudnn_available() {
            bail!("cuDNN not found (libcudnn.so.9 cannot be loaded); {HINT}");
        }
        let Some(stream) = gpu.stream() else { bail!("cuDNN does not run on the kernel emulator") };
        // Before the handle exists: an error here leaves nothing to destroy.
        let api = DnnApi::from_env()?;
        gpu.bind()?;
        let dnn = guard("creating a cuDNN handle", || {
            let version = result::get_version();
            if version < 90000 {
                bail!("cuDNN {version} is too old: fastdet's bindings need cuDNN 9");
            }
            let handle = device_wide(gpu.info.ordinal, result::create_handle).map_err(|e| anyhow!("cudnnCreate: {e}"))?;
            let dnn = Dnn { handle, ordinal: gpu.info.ordinal, version, find: std::env::var("FASTDET_CUDNN_FIND").is_ok_and(|v| v == "1"), api };
            // SAFETY: valid handle; the stream belongs to gpu's context, which is current.
            unsafe { result::set_stream(dnn.handle, stream.cu_stream() as sys::cudaStream_t) }.map_err(|e| anyhow!("cudnnSetStream: {e}"))?;
            Ok(dnn)
        })?;
        // Once per device and process (every engine opens a handle; the libraries are the same):
        // later handles take the first answer. A failure of the probe convolution itself is not
        // kept (it may be passing, e.g. an earlier error surfacing there): the next engine probes
        // again. guard: a symbol missing from the library panics inside cudarc's loader.
        static PROBED: std::sync::Mutex<Vec<(usize, Result<(), String>)>> = std::sync::Mutex::new(Vec::new());
        let mut probed = PROBED.lock().unwrap_or_else(|e| e.into_inner());
        let ordinal = gpu.info.ordinal;
        if !probed.iter().any(|(o, _)| *o == ordinal) {
            match guard("loading cuDNN's libraries", Dnn::libraries_load) {
                Err(e) => probed.push((ordinal, Err(format!("{e:#}")))),
                Ok(()) => {
                    guard("probing cuDNN", || dnn.probe(gpu))?;
                    probed.push((ordinal, Ok(())));
                }
            }
        }
        if let Some((_, Err(msg))) = probed.iter().find(|(o, _)| *o == ordinal) {
            bail!("{msg}");
        }
        Ok(dnn)
    }

    /// cuDNN 9's libcudnn.so.9 only dispatches: the convolutions live in libcudnn_cnn.so.9 (which
    /// needs libcudnn_ops.so.9, the engine libraries and cuBLASLt), loaded at their first use.
    fn libraries_load() -> Result<()> {
        // SAFETY: plain status queries.
        for (lib, st) in [("libcudnn_ops.so.9", unsafe { sys::cudnnOpsVersionCheck() }), ("libcudnn_cnn.so.9", unsafe { sys::cudnnCnnVersionCheck() })] {
            if st != sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
                bail!("cuDNN's {lib} does not load or does not match libcudnn.so.9 (status {}); {HINT}", st as u32);
            }
        }
        Ok(())
    }

    /// One small convolution run here makes a missing piece one clear error when the engine
    /// opens (where `auto` then takes our own kernels) instead of a failure at every conv.
    fn probe(&self, gpu: &Gpu) -> Result<()> {
        let shape = ConvShape { n: 1, dims: [4, 4, 4], cin: 8, cout: 8, k: 3, stride: 1, pad: 1 };
        let mut plan = ConvPlan::new_api(self, shape, DnnApi::Legacy).map_err(|e| anyhow!("cuDNN cannot plan a convolution: {e:#}; {HINT}"))?;
        let (x, w, y) = (gpu.alloc(1024)?, gpu.alloc(27 * 128)?, gpu.alloc(1024)?);
        for b in [&x, &w] {
            gpu.zero(b.ptr, b.bytes)?;
        }
        let mut workspace = None;
        plan.run(self, gpu, x.ptr, w.ptr, y.ptr, &mut workspace)
            .and_then(|()| gpu.sync("cuDNN's probe convolution"))
            .map_err(|e| anyhow!("cuDNN cannot run a convolution: {e:#}; {HINT}"))
    }

    pub(super) fn handle(&self) -> sys::cudnnHandle_t {
        self.handle
    }

    pub fn version_string(&self) -> String {
        format!("{}.{}.{}", self.version / 10000, (self.version / 100) % 100, self.version % 100)
    }

    /// The version of the cuDNN that works on `gpu` (opens a handle and passes the probe), None
    /// where it does not or on an emulator: what remembered choices and checks are keyed by.
    pub fn working_version(gpu: &Gpu) -> Option<String> {
        if gpu.is_emulator() {
            return None;
        }
        Dnn::new(gpu).ok().map(|d| d.version_string())
    }
}

struct TensorDesc(sys::cudnnTensorDescriptor_t);
impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}
struct FilterDesc(sys::cudnnFilterDescriptor_t);
impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { result::destroy_filter_descriptor(self.0) };
    }
}
struct ConvDesc(sys::cudnnConvolutionDescriptor_t);
impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

/// An NDHWC fp16 tensor descriptor `[n, c, d, h, w]` with channels-last strides.
fn ndhwc_desc(n: usize, c: usize, d: [usize; 3]) -> Result<TensorDesc> {
    let dims = [n, c, d[0], d[1], d[2]];
    let strides = [d[0] * d[1] * d[2] * c, 1, d[1] * d[2] * c, d[2] * c, c];
    if dims.iter().chain(strides.iter()).any(|&v| v > i32::MAX as usize) {
        bail!("tensor [{n}, {c}, {d:?}] exceeds cuDNN's 32-bit dims");
    }
    let desc = TensorDesc(result::create_tensor_descriptor().map_err(|e| anyhow!("cudnnCreateTensorDescriptor: {e}"))?);
    let di: Vec<i32> = dims.iter().map(|&v| v as i32).collect();
    let si: Vec<i32> = strides.iter().map(|&v| v as i32).collect();
    // SAFETY: 5 dims and strides.
    unsafe { result::set_tensornd_descriptor(desc.0, sys::cudnnDataType_t::CUDNN_DATA_HALF, 5, di.as_ptr(), si.as_ptr()) }
        .map_err(|e| anyhow!("cudnnSetTensorNdDescriptor(dims {dims:?}, NDHWC strides {strides:?}): {e}"))?;
    Ok(desc)
}

fn algo_name(a: sys::cudnnConvolutionFwdAlgo_t) -> &'static str {
    use sys::cudnnConvolutionFwdAlgo_t as A;
    match a {
        A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM => "IMPLICIT_GEMM",
        A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM => "IMPLICIT_PRECOMP_GEMM",
        A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM => "GEMM",
        A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT => "DIRECT",
        A::CUDNN_CONVOLUTION_FWD_ALGO_FFT => "FFT",
        A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING => "FFT_TILING",
        A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD => "WINOGRAD",
        A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED => "WINOGRAD_NONFUSED",
        _ => "?",
    }
}

/// One convolution shape, ready to run, on either API.
pub enum ConvPlan {
    Legacy(LegacyPlan),
    Graph(GraphPlan),
}

impl ConvPlan {
    /// A plan on the handle's API (`Dnn::api`).
    pub fn new(dnn: &Dnn, shape: ConvShape) -> Result<ConvPlan> {
        ConvPlan::new_api(dnn, shape, dnn.api)
    }

    /// A plan on `api`. The graph API builds at most 16 candidates when they are to be timed
    /// (`Dnn::find`), else 3 (the first that runs is kept).
    pub fn new_api(dnn: &Dnn, shape: ConvShape, api: DnnApi) -> Result<ConvPlan> {
        Ok(match api {
            DnnApi::Legacy => ConvPlan::Legacy(LegacyPlan::new(dnn, shape)?),
            DnnApi::Graph => ConvPlan::Graph(GraphPlan::new(dnn, shape, if dnn.find { 16 } else { 3 })?),
        })
    }

    /// The algorithm or engine in use (after the first run).
    pub fn algo(&self) -> Option<String> {
        match self {
            ConvPlan::Legacy(p) => p.algo().map(str::to_string),
            ConvPlan::Graph(p) => p.algo(),
        }
    }

    /// Largest workspace any candidate may need.
    pub fn max_workspace(&self) -> usize {
        match self {
            ConvPlan::Legacy(p) => p.max_workspace(),
            ConvPlan::Graph(p) => p.max_workspace(),
        }
    }

    /// `y = conv(x, w)`; see `LegacyPlan::run`.
    pub fn run(&mut self, dnn: &Dnn, gpu: &Gpu, x: u64, w: u64, y: u64, workspace: &mut Option<DevBuf>) -> Result<()> {
        match self {
            ConvPlan::Legacy(p) => p.run(dnn, gpu, x, w, y, workspace),
            ConvPlan::Graph(p) => p.run(dnn, gpu, x, w, y, workspace),
        }
    }
}

/// One convolution shape on the legacy API, ready to run.
pub struct LegacyPlan {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
    /// Candidate (algorithm, workspace bytes, deterministic), best first.
    algos: Vec<(sys::cudnnConvolutionFwdAlgo_t, usize, bool)>,
    /// Index into `algos` of the algorithm that ran; None before the first run.
    chosen: Option<usize>,
    /// Whether the candidates were put in the order of their times (`Dnn::find`).
    timed: bool,
    pub what: String,
}

/// The candidates `cands` (algorithm, workspace, deterministic; best first) fastest first by the
/// times cuDNN measured (`timed`: algorithm, ms), deterministic ones still before the others; a
/// candidate without a time goes after those with one, in its old order.
pub fn order_by_time<A: PartialEq + Copy>(cands: &[(A, usize, bool)], timed: &[(A, f32)]) -> Vec<(A, usize, bool)> {
    let time = |a: A| timed.iter().find(|t| t.0 == a).map_or(f32::INFINITY, |t| t.1);
    let mut out = cands.to_vec();
    // Stable: equal keys keep the heuristic order.
    out.sort_by(|p, q| (!p.2).cmp(&!q.2).then(time(p.0).total_cmp(&time(q.0))));
    out
}

/// Orders found per (device, plan) in this process: an ensemble of one architecture times each
/// shape once.
type FoundOrders = std::sync::Mutex<Vec<((usize, String), Vec<(sys::cudnnConvolutionFwdAlgo_t, usize, bool)>)>>;
static FOUND: FoundOrders = std::sync::Mutex::new(Vec::new());

// SAFETY: descriptors are plain host objects, used by one engine at a time.
unsafe impl Send for LegacyPlan {}

impl LegacyPlan {
    /// A plan for `x [n, dims, cin]` → `[n, out dims, cout]`, cubic kernel k, stride, pad.
    pub fn new(dnn: &Dnn, shape: ConvShape) -> Result<LegacyPlan> {
        let ConvShape { n, dims, cin, cout, k, stride, pad } = shape;
        let what = format!("cuDNN conv {k}x{k}x{k}/s{stride} {cin}->{cout} on [{n}, {}, {}, {}]", dims[0], dims[1], dims[2]);
        guard(&what.clone(), || {
            let od = shape.out_dims();
            let x = ndhwc_desc(n, cin, dims)?;
            let y = ndhwc_desc(n, cout, od)?;
            let w = FilterDesc(result::create_filter_descriptor().map_err(|e| anyhow!("cudnnCreateFilterDescriptor: {e}"))?);
            let fd = [cout as i32, cin as i32, k as i32, k as i32, k as i32];
            // SAFETY: 5 filter dims; NHWC format = [K, kd, kh, kw, C] in memory.
            unsafe { result::set_filternd_descriptor(w.0, sys::cudnnDataType_t::CUDNN_DATA_HALF, sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC, 5, fd.as_ptr()) }
                .map_err(|e| anyhow!("cudnnSetFilterNdDescriptor({fd:?}, NHWC): {e}"))?;
            let conv = ConvDesc(result::create_convolution_descriptor().map_err(|e| anyhow!("cudnnCreateConvolutionDescriptor: {e}"))?);
            let (p, s, dl) = ([pad as i32; 3], [stride as i32; 3], [1i32; 3]);
            // SAFETY: arrays of 3.
            unsafe {
                result::set_convolutionnd_descriptor(
                    conv.0,
                    3,
                    p.as_ptr(),
                    s.as_ptr(),
                    dl.as_ptr(),
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                )
            }
            .map_err(|e| anyhow!("cudnnSetConvolutionNdDescriptor: {e}"))?;
            // SAFETY: valid descriptor.
            unsafe { result::set_convolution_math_type(conv.0, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH) }.map_err(|e| anyhow!("cudnnSetConvolutionMathType: {e}"))?;
            // cuDNN's own idea of the output shape must be ours.
            let mut got = [0i32; 5];
            // SAFETY: 5 output dims.
            unsafe { sys::cudnnGetConvolutionNdForwardOutputDim(conv.0, x.0, w.0, 5, got.as_mut_ptr()) }
                .result()
                .map_err(|e| anyhow!("cudnnGetConvolutionNdForwardOutputDim: {e}"))?;
            let want = [n as i32, cout as i32, od[0] as i32, od[1] as i32, od[2] as i32];
            if got != want {
                bail!("cuDNN computes output dims {got:?}, fastdet expects {want:?}");
            }
            const COUNT: usize = 8;
            let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; COUNT] = unsafe { std::mem::zeroed() };
            let mut returned = 0i32;
            // SAFETY: room for COUNT results.
            unsafe { result::get_convolution_forward_algorithm(dnn.handle, x.0, w.0, conv.0, y.0, COUNT as i32, &mut returned, perf.as_mut_ptr()) }
                .map_err(|e| anyhow!("cudnnGetConvolutionForwardAlgorithm_v7: {e}"))?;
            let limit = workspace_limit();
            let mut cands: Vec<(sys::cudnnConvolutionFwdAlgo_t, usize, bool)> = Vec::new();
            for p in perf.iter().take((returned.max(0) as usize).min(COUNT)) {
                if p.status != sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
                    continue;
                }
                // SAFETY: valid descriptors.
                let ws = unsafe { result::get_convolution_forward_workspace_size(dnn.handle, x.0, w.0, conv.0, y.0, p.algo) }.unwrap_or(p.memory);
                if ws > limit {
                    continue;
                }
                let det = p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC;
                if !cands.iter().any(|c| c.0 == p.algo) {
                    cands.push((p.algo, ws, det));
                }
            }
            // Deterministic algorithms first, heuristic order kept within each class.
            cands.sort_by_key(|c| !c.2);
            let algos = cands;
            if algos.is_empty() {
                bail!("cuDNN offers no usable forward algorithm ({returned} listed, none within {} MiB of workspace)", limit >> 20);
            }
            Ok(LegacyPlan { x, w, y, conv, algos, chosen: None, timed: false, what: what.clone() })
        })
    }

    /// The algorithm in use (after the first run).
    pub fn algo(&self) -> Option<&'static str> {
        self.chosen.map(|i| algo_name(self.algos[i].0))
    }

    /// Largest workspace any candidate may need.
    pub fn max_workspace(&self) -> usize {
        self.algos.iter().map(|a| a.1).max().unwrap_or(0)
    }

    /// Times every candidate on these buffers (`y` is overwritten) and orders them fastest first
    /// (`order_by_time`), or takes the order found earlier in this process for this device and
    /// shape. Eager only (cuDNN synchronises while timing).
    fn time_candidates(&mut self, dnn: &Dnn, gpu: &Gpu, x: u64, w: u64, y: u64, workspace: &mut Option<DevBuf>) -> Result<()> {
        let key = (gpu.info.ordinal, format!("{} ws<={}", self.what, workspace_limit()));
        if let Some((_, order)) = FOUND.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(k, _)| *k == key) {
            self.algos = order.clone();
            return Ok(());
        }
        let need = self.max_workspace();
        let grown = need > 0 && workspace.as_ref().is_none_or(|b| b.bytes < need);
        if grown {
            *workspace = None;
            *workspace = Some(gpu.alloc(need)?);
        }
        let (wp, wb) = workspace.as_ref().map_or((0, 0), |b| (b.ptr, b.bytes));
        const COUNT: usize = 8;
        // SAFETY: plain-data results, written by cuDNN.
        let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; COUNT] = unsafe { std::mem::zeroed() };
        let mut returned = 0i32;
        guard("cudnnFindConvolutionForwardAlgorithmEx", || {
            // SAFETY: the descriptors match the buffers the engine allocated for this shape; room
            // for COUNT results; the workspace holds `wb` bytes.
            device_wide(gpu.info.ordinal, || unsafe {
                sys::cudnnFindConvolutionForwardAlgorithmEx(
                    dnn.handle,
                    self.x.0,
                    x as *const _,
                    self.w.0,
                    w as *const _,
                    self.conv.0,
                    self.y.0,
                    y as *mut _,
                    COUNT as i32,
                    &mut returned,
                    perf.as_mut_ptr(),
                    wp as *mut _,
                    wb,
                )
            })
            .result()
            .map_err(|e| anyhow!("{e}"))
        })?;
        // cuDNN may time an algorithm under both math types; the descriptor asks for tensor-op
        // math, so its times come first (`order_by_time` takes an algorithm's first time).
        let mut timed: Vec<(bool, sys::cudnnConvolutionFwdAlgo_t, f32)> = perf
            .iter()
            .take((returned.max(0) as usize).min(COUNT))
            .filter(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= wb)
            .map(|p| (p.mathType != sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH, p.algo, p.time))
            .collect();
        timed.sort_by_key(|t| t.0);
        let timed: Vec<(sys::cudnnConvolutionFwdAlgo_t, f32)> = timed.into_iter().map(|(_, a, t)| (a, t)).collect();
        self.algos = order_by_time(&self.algos, &timed);
        if grown {
            // Sized for the slowest candidate's needs: `run` allocates what the chosen one needs.
            *workspace = None;
        }
        FOUND.lock().unwrap_or_else(|e| e.into_inner()).push((key, self.algos.clone()));
        Ok(())
    }

    /// `y = conv(x, w)`; `workspace` is grown as needed. Errors only when no candidate runs.
    /// In a CUDA graph capture only the algorithm chosen by an eager run is tried: a failure
    /// there may be the capture's own, and an algorithm first run inside a capture would be
    /// kept without ever having been checked eagerly.
    pub fn run(&mut self, dnn: &Dnn, gpu: &Gpu, x: u64, w: u64, y: u64, workspace: &mut Option<DevBuf>) -> Result<()> {
        if dnn.find && !self.timed && self.chosen.is_none() && !gpu.capturing() {
            self.timed = true;
            // Timing is an optimisation: on failure the heuristic order stands.
            if let Err(e) = self.time_candidates(dnn, gpu, x, w, y, workspace) {
                crate::errln!("warning: {}: timing cuDNN's algorithms failed ({e:#}); taking its heuristic order", self.what);
            }
        }
        let (start, end) = candidates_to_try(self.chosen, self.algos.len(), gpu.capturing(), &self.what)?;
        let algos = &self.algos[start..end];
        let named: Vec<(&str, usize)> = algos.iter().map(|a| (algo_name(a.0), a.1)).collect();
        let ran = first_that_runs(&self.what, &named, workspace, gpu.capturing(), |bytes| gpu.alloc(bytes), |i, wp, wb| {
            let algo = algos[i].0;
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: descriptors match the buffers the engine allocated for this shape; alpha /
            // beta are f32 as cuDNN wants for half data.
            guard("cudnnConvolutionForward", || {
                unsafe {
                    result::convolution_forward(
                        dnn.handle,
                        &alpha as *const f32 as *const _,
                        self.x.0,
                        x as *const _,
                        self.w.0,
                        w as *const _,
                        self.conv.0,
                        algo,
                        wp as *mut _,
                        wb,
                        &beta as *const f32 as *const _,
                        self.y.0,
                        y as *mut _,
                    )
                }
                .map_err(|e| anyhow!("{e}"))
            })
        })?;
        self.chosen = Some(start + ran);
        if gpu.sync_each() {
            gpu.sync(&format!("{} ({})", self.what, named[ran].0))?;
        }
        Ok(())
    }
}

/// The candidates a plan's run tries, `start..end` of `len`: from the chosen one (the first
/// before any ran) to the last; in a CUDA graph capture only the chosen one, and an error before
/// an eager run chose one.
pub(super) fn candidates_to_try(chosen: Option<usize>, len: usize, capturing: bool, what: &str) -> Result<(usize, usize)> {
    match (chosen, capturing) {
        (None, true) => bail!("{what}: first run inside a CUDA graph capture (an eager run must choose the algorithm)"),
        (Some(i), true) => Ok((i, i + 1)),
        (c, false) => Ok((c.unwrap_or(0), len)),
    }
}

/// Runs the candidates `(name, workspace bytes)` in order (`run(index, workspace pointer,
/// workspace bytes)`) until one runs; returns its index.
/// The workspace grows as a candidate needs: the new buffer is allocated while the old one is
/// held and replaces it only once it exists, and when the device is full the old one is freed
/// and the allocation tried once more. A candidate whose workspace does not fit is skipped, as
/// one that fails, since a later one may need less. When none runs and one of them found the
/// device full, the error is that `OutOfMemory` (the runner retries the batch in halves; an
/// engine does not give up cuDNN for a full device); otherwise it lists every candidate's error.
pub(super) fn first_that_runs(
    what: &str,
    algos: &[(&str, usize)],
    workspace: &mut Option<DevBuf>,
    capturing: bool,
    alloc: impl Fn(usize) -> Result<DevBuf>,
    mut run: impl FnMut(usize, u64, usize) -> Result<()>,
) -> Result<usize> {
    let is_oom = |e: &anyhow::Error| e.downcast_ref::<OutOfMemory>().is_some();
    let mut errors = Vec::new();
    let mut full = None;
    for (i, &(name, ws)) in algos.iter().enumerate() {
        if ws > 0 && workspace.as_ref().is_none_or(|b| b.bytes < ws) {
            if capturing {
                // Replacing the buffer would free memory the capture may have used.
                bail!("{what}: cuDNN's workspace must grow to {ws} bytes during a CUDA graph capture");
            }
            let grown = match alloc(ws) {
                Err(e) if is_oom(&e) && workspace.is_some() => {
                    *workspace = None;
                    alloc(ws)
                }
                r => r,
            };
            match grown {
                Ok(b) => *workspace = Some(b),
                Err(e) if is_oom(&e) => {
                    errors.push(format!("{name}: workspace of {ws} bytes: {e:#}"));
                    full.get_or_insert(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let (wp, wb) = match workspace.as_ref() {
            Some(b) if ws > 0 => (b.ptr, ws),
            _ => (0, 0),
        };
        match run(i, wp, wb) {
            Ok(()) => return Ok(i),
            Err(e) => errors.push(format!("{name}: {e:#}")),
        }
    }
    let listed = format!("{what}: no cuDNN algorithm ran: {}", errors.join("; "));
    match full {
        Some(e) => Err(e.context(listed)),
        None => bail!(listed),
    }
}

#[cfg(test)]
mod tests {
    use super::{candidates_to_try, first_that_runs, order_by_time};
    use crate::engine::cuda::gpu::Gpu;
    use crate::pipeline::runner::OutOfMemory;

    /// On a device with room for one workspace of 1000 bytes: the held 600-byte one is freed to
    /// make room for a 1000-byte one rather than skipping that candidate; a candidate wanting
    /// more than the device holds is skipped for the next; and when every candidate either fails
    /// or does not fit, the error is the `OutOfMemory` (the runner halves the batch on it), with
    /// every candidate's reason in its message. Without a full device it is a plain error.
    #[test]
    fn a_workspace_that_does_not_fit_skips_its_algorithm_and_reports_the_full_device() {
        let gpu = Gpu::emulator().unwrap();
        gpu.set_emulated_memory_limit(gpu.memory_live() + 1500);
        let alloc = |bytes| gpu.alloc(bytes);
        let mut ws = Some(gpu.alloc(600).unwrap());
        let mut seen = Vec::new();
        let i = first_that_runs("conv", &[("A", 1000), ("B", 0)], &mut ws, false, alloc, |i, wp, wb| {
            seen.push((i, wp != 0, wb));
            Ok(())
        })
        .unwrap();
        assert_eq!((i, seen), (0, vec![(0, true, 1000)]));
        assert_eq!(ws.as_ref().map(|b| b.bytes), Some(1000));

        // Too big for the device: skipped; the next, without workspace, runs.
        let mut seen = Vec::new();
        let i = first_that_runs("conv", &[("BIG", 4000), ("B", 0)], &mut ws, false, alloc, |i, wp, wb| {
            seen.push((i, wp, wb));
            Ok(())
        })
        .unwrap();
        assert_eq!((i, seen), (1, vec![(1, 0, 0)]));

        // Nothing runs, one did not fit: OutOfMemory, naming both.
        let e = first_that_runs("conv", &[("BIG", 4000), ("B", 0)], &mut ws, false, alloc, |_, _, _| anyhow::bail!("not supported")).unwrap_err();
        assert!(e.downcast_ref::<OutOfMemory>().is_some(), "{e:#}");
        let msg = format!("{e:#}");
        assert!(msg.contains("no cuDNN algorithm ran") && msg.contains("BIG: workspace of 4000 bytes") && msg.contains("B: not supported"), "{msg}");

        // Nothing runs, all fit: a plain error.
        let e = first_that_runs("conv", &[("B", 0), ("C", 100)], &mut ws, false, alloc, |_, _, _| anyhow::bail!("not supported")).unwrap_err();
        assert!(e.downcast_ref::<OutOfMemory>().is_none(), "{e:#}");
        assert!(format!("{e:#}").contains("B: not supported; C: not supported"), "{e:#}");

        // In a capture the workspace never grows.
        let mut small = None;
        let e = first_that_runs("conv", &[("A", 100)], &mut small, true, alloc, |_, _, _| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("during a CUDA graph capture"), "{e:#}");
    }

    /// Eagerly a run tries from the chosen candidate (the first before any ran) to the last; in a
    /// capture only the chosen one, and none before an eager run chose.
    #[test]
    fn a_run_tries_from_the_chosen_candidate_and_only_it_in_a_capture() {
        assert_eq!(candidates_to_try(None, 4, false, "c").unwrap(), (0, 4));
        assert_eq!(candidates_to_try(Some(2), 4, false, "c").unwrap(), (2, 4));
        assert_eq!(candidates_to_try(Some(2), 4, true, "c").unwrap(), (2, 3));
        let e = candidates_to_try(None, 4, true, "conv").unwrap_err();
        assert!(format!("{e:#}").contains("conv: first run inside a CUDA graph capture"), "{e:#}");
    }

    /// Timed candidates go fastest first, deterministic ones still before the others; one cuDNN
    /// did not time keeps its place after the timed ones of its class; equal times keep the
    /// heuristic order.
    #[test]
    fn timed_algorithms_go_fastest_first_within_their_determinism() {
        // (algorithm, workspace, deterministic), in the heuristic order.
        let cands = [(1u32, 0, true), (2, 64, true), (3, 0, true), (4, 0, true), (5, 128, false), (6, 0, false)];
        let timed = [(6, 0.5), (2, 1.0), (5, 2.0), (3, 3.0), (1, 1.0)];
        let order: Vec<u32> = order_by_time(&cands, &timed).iter().map(|c| c.0).collect();
        assert_eq!(order, [1, 2, 3, 4, 6, 5]);
        // Workspace sizes and flags travel with their algorithm.
        assert!(order_by_time(&cands, &timed).iter().all(|c| cands.contains(c)));
        // Nothing timed: the heuristic order.
        assert_eq!(order_by_time(&cands, &[]), cands.to_vec());
    }
}
