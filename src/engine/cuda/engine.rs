//! The CUDA engine: walks the model's op graph (`model::graph`) on one GPU.
//!
//! - Activations are NDHWC fp16 (`[n, d, h, w, c]`), statistics f32/f64, head outputs f32 NCDHW
//!   (the `Outputs` layout). Weights are uploaded once per engine: cuDNN convolutions get fp16
//!   filters in cuDNN's NHWC filter layout `[cout, kd, kh, kw, cin]`; the first convolution
//!   (cin = 1), the heads' last 1x1x1 convolutions, biases and GroupNorm affines get f32.
//! - Conv: cuDNN (`dnn.rs`), then bias + activation (`bias_act_f16`) when the op has them; the
//!   first conv (1 input channel) is `conv3d_c1_k3_f16`; the heads' last 1x1x1 conv is
//!   `head_conv1x1_act_f32` (bias, sigmoid / tanh·2, NCDHW f32 out). With `FASTDET_CONV=direct`,
//!   on cards without tensor cores when cuDNN is missing, or for a shape no cuDNN algorithm runs,
//!   convolutions run on `conv3d_igemm_f16` with bias + activation fused; when cuDNN is missing
//!   on a card with tensor cores, the tensor-core path below.
//! - GroupNorm / InstanceNorm: `norm.cu` (three launches, fixed reduction order), in place when
//!   the input dies there. Add: `add_act_f16`, in place likewise.
//! - `ConvBackend::TensorCore` (`FASTDET_CONV=tc`): general convolutions on `conv3d_tc_f16`
//!   (WMMA), bias + activation in its store; a norm whose only reader is such a 1x1x1 conv
//!   (`NormInLoads`; `FASTDET_TC_NORM_IN_LOADS=all` for any kernel size) computes its statistics
//!   only (`Val::Pending`) and the conv applies it while loading, so the normalised activation is
//!   never written; before a 3x3x3 conv, whose loads would renormalise each element 27 times, the
//!   norm is a `norm_apply` pass of its own. With `TcPolicy::halo` (`FASTDET_TC_HALO=on`) the
//!   3x3x3 stride-1 convs with Cin a multiple of 16 whose output whole 2x4x16 bricks tile run on
//!   `conv3d_tc_halo` (`ops::halo_fits`), which stages each block's input once per 16 channels: a
//!   norm in its loads costs about 3.4 applications per element and block of 32 output channels
//!   (the implicit GEMM: 27 per block of 32 or 64). A conv whose output goes only to a residual Add adds the other
//!   operand in its store; a conv (or conv + Add) whose output a norm reads also writes that
//!   norm's per-block statistics (when whole blocks of the conv's tile, 64 or 128 output voxels,
//!   lie in one sample: `ops::conv_tc_stats_blocks`), so the norm reads no statistics pass of
//!   its own over the activation.
//! - Upsample2x followed by the decoder's skip Add: one `upsample2x_add_f16`.
//! - ConvTranspose2 feeding a Concat: written straight into channels `[0, cout)` of the concat
//!   buffer; the skip is copied into the channels after it (`copy_channels_f16`).
//! - Activations live in the device handle's arena (`arena.rs`), shared by the engines of one
//!   worker, and go back after the value's last reader (`Graph::last_use`); all work is on one
//!   stream, so reuse is ordered. Outputs come from the engine's own pool, so they outlive the
//!   walk. No float atomics anywhere: results are deterministic for a given device, cuDNN
//!   algorithm choice and batch size.
//! - CUDA graphs: every walk of one shape makes the same arena requests in the same order, so it
//!   gets the same addresses. The second walk of a shape (batch, tile, fm2, host or device input)
//!   is captured once into a graph and run; later walks stage their input into the same slot,
//!   take back the same output buffers and launch the graph: one launch per tile instead of a
//!   few hundred. A walk that cannot be replayed (the arena grew since, an output buffer is still
//!   held by the caller) runs eagerly; a shape whose capture fails runs eagerly from then on,
//!   with a note. `FASTDET_CUDA_GRAPHS=0` turns graphs off.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use half::f16;

use super::dnn::{ConvPlan, Dnn, DnnApi};
use super::gpu::{guard, DevBuf, DeviceGraph, Gpu, Pool};
use super::env_choice;
use super::ops::{self, vol, ConvShape, TcTiles};
use crate::engine::{Outputs, TileEngine};
use crate::model::graph::{op_in_place, Act, Graph, Op, OpKind, ValueId};
use crate::weights::Weights;

/// Which convolution implementation the engine uses for the general convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvBackend {
    /// cuDNN when it loads, else `TensorCore` on sm_70+ (and the emulators), else `Direct`; per
    /// shape, the direct kernel when cuDNN cannot run it.
    Auto,
    /// cuDNN only (an error when it cannot run a shape).
    Cudnn,
    /// Whichever of cuDNN and the tensor-core variants walks the network fastest on this device,
    /// timed on the run's own batch and tile and remembered per device and network
    /// (`choose.rs`); `Auto` where no tile shape is known.
    Measure,
    /// `conv3d_igemm_f16` only.
    Direct,
    /// `conv3d_tc_f16` (tensor cores, sm_70+), with each GroupNorm / InstanceNorm whose only
    /// reader is a convolution applied in that convolution's loads instead of its own pass.
    TensorCore,
}

/// Which norms a tensor-core convolution applies while loading its input, instead of a pass of
/// their own (`FASTDET_TC_NORM_IN_LOADS`). An implicit-GEMM conv reads each input element once
/// per tap and per block of output channels, so a k^3 conv would normalise every element k^3
/// times (27 for 3x3x3): about a dozen ALU instructions each, per element, against the tensor
/// cores' k^3 * Cout multiply-adds for it; the separate pass it would save reads and writes each
/// element once. For a 1x1x1 conv the fused norm costs what the pass would, minus the pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormInLoads {
    /// Before 1x1x1 convs only (the default).
    #[default]
    Pointwise,
    /// Before every tensor-core conv (measuring the k^3 trade-off).
    All,
    /// Never: every norm has its pass (statistics still come from the conv's store).
    Never,
}

impl NormInLoads {
    /// `FASTDET_TC_NORM_IN_LOADS` = pointwise | all | never (default pointwise).
    pub fn from_env() -> Result<NormInLoads> {
        env_choice("FASTDET_TC_NORM_IN_LOADS", &[("pointwise", NormInLoads::Pointwise), ("all", NormInLoads::All), ("never", NormInLoads::Never)])
    }

    /// Whether a norm read only by a tensor-core conv with kernel `k` is applied in its loads.
    fn applies_to(self, k: usize) -> bool {
        match self {
            NormInLoads::Pointwise => k == 1,
            NormInLoads::All => true,
            NormInLoads::Never => false,
        }
    }
}

/// How the tensor-core path runs (ignored by the other backends): which norms its convs apply
/// while loading, and which block tiles they use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcPolicy {
    pub norm_in_loads: NormInLoads,
    pub tiles: TcTiles,
    /// Load through cp.async (three stages) where a conv allows it: no norm in its loads, Cin a
    /// multiple of 8 (`FASTDET_TC_ASYNC=on`; asynchronous on sm_80+).
    pub async_loads: bool,
    /// Run the 3x3x3 stride-1 convs with Cin a multiple of 16 whose output whole 2 x 4 x 16 bricks
    /// tile on the halo-tile kernels (`FASTDET_TC_HALO=on`; `ops::halo_fits`): each block stages
    /// its input once per 16 channels, so a norm in their loads is applied about 3.4 times per
    /// element and block of 32 output channels, not 27 per block of 32 or 64.
    pub halo: bool,
}

impl TcPolicy {
    /// The policies the self-test and the benches time side by side: (bench label, self-test
    /// label suffix, policy) for the default, every norm in the loads, the wide tiles, the
    /// cp.async loads and the halo tiles with every norm in the loads.
    pub fn compared() -> [(&'static str, &'static str, TcPolicy); 5] {
        let default = TcPolicy::default();
        [
            ("tc", "", default),
            ("tc_norm_in_loads", " norms in loads", TcPolicy { norm_in_loads: NormInLoads::All, ..default }),
            ("tc_wide", " wide tiles", TcPolicy { tiles: TcTiles::Wide, ..default }),
            ("tc_async", " async loads", TcPolicy { async_loads: true, ..default }),
            ("tc_halo_norm_in_loads", " halo tiles, norms in loads", TcPolicy { halo: true, norm_in_loads: NormInLoads::All, ..default }),
        ]
    }

    /// `FASTDET_TC_NORM_IN_LOADS`, `FASTDET_TC_TILES`, `FASTDET_TC_ASYNC` and `FASTDET_TC_HALO`
    /// (off | on, default off).
    pub fn from_env() -> Result<TcPolicy> {
        Ok(TcPolicy {
            norm_in_loads: NormInLoads::from_env()?,
            tiles: TcTiles::from_env()?,
            async_loads: env_choice("FASTDET_TC_ASYNC", &[("off", false), ("on", true)])?,
            halo: env_choice("FASTDET_TC_HALO", &[("off", false), ("on", true)])?,
        })
    }
}

impl ConvBackend {
    /// `FASTDET_CONV` = auto | cudnn | direct | tc | measure (default auto).
    pub fn from_env() -> Result<ConvBackend> {
        env_choice(
            "FASTDET_CONV",
            &[("auto", ConvBackend::Auto), ("cudnn", ConvBackend::Cudnn), ("direct", ConvBackend::Direct), ("tc", ConvBackend::TensorCore), ("measure", ConvBackend::Measure)],
        )
    }
}

/// How a convolution op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConvKind {
    /// `conv3d_c1_k3_f16` (f32 weights `[cout, 27]`).
    First,
    /// `head_conv1x1_act_f32` (f32 weights `[cout, cin]`), f32 NCDHW output.
    Head,
    /// cuDNN or `conv3d_igemm_f16` (fp16 weights `[cout, k, k, k, cin]`).
    General,
}

struct ConvStep {
    kind: ConvKind,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    act: Act,
    w: DevBuf,
    bias: Option<DevBuf>,
    /// General convolutions: run on cuDNN (else on the direct kernel).
    use_dnn: bool,
    /// General convolutions: run on conv3d_tc_f16.
    tc: bool,
    /// Tensor-core convolutions: the next op is an Add of this output and another value, done in
    /// the conv's store.
    fuse_add: bool,
    /// Tensor-core convolutions: a norm reads the output (after the fused Add): write its
    /// per-block statistics.
    stats: bool,
}

enum Step {
    Conv(ConvStep),
    ConvT { w: DevBuf, cin: usize, cout: usize, into_concat: Option<usize> },
    /// `deferred`: only the statistics; the single reader (a tensor-core conv) normalises.
    Norm { groups: usize, gamma: Option<DevBuf>, beta: Option<DevBuf>, act: Act, deferred: bool },
    Add,
    Concat,
    /// Trilinear x2; `fuse_add`: the next op is the skip Add, done in the same kernel.
    Upsample { fuse_add: bool },
}

/// A live value on the device.
enum Val {
    /// NDHWC fp16.
    H(DevBuf),
    /// NCDHW f32 (the head outputs).
    F(DevBuf),
    /// Lives in channels [0, c) of a concat buffer (a ConvTranspose2 output).
    InConcat,
    /// NDHWC fp16 owned by the caller (`forward_device_input`'s input): read, never written,
    /// reused in place or returned to the pool.
    Borrowed(u64),
    /// A deferred norm's output: the raw input at `x` (owned when the norm was its last reader)
    /// and the statistics, applied by the reading conv (`ops::NormPrologue`).
    Pending { x: u64, owned: Option<DevBuf>, params: DevBuf, post: Act },
}

/// A step's parameters by value (device addresses), so `exec` can borrow the engine mutably.
#[derive(Clone, Copy)]
enum StepInfo {
    Conv { kind: ConvKind, cin: usize, cout: usize, k: usize, stride: usize, pad: usize, act: Act, w: u64, bias: Option<u64>, use_dnn: bool, tc: bool, fuse_add: bool, stats: bool },
    ConvT { w: u64, cin: usize, cout: usize, into_concat: Option<usize> },
    Norm { groups: usize, gamma: Option<u64>, beta: Option<u64>, act: Act, deferred: bool },
    Add,
    Concat,
    Upsample { fuse_add: bool },
}

impl Step {
    fn info(&self) -> StepInfo {
        match self {
            Step::Conv(c) => StepInfo::Conv {
                kind: c.kind,
                cin: c.cin,
                cout: c.cout,
                k: c.k,
                stride: c.stride,
                pad: c.pad,
                act: c.act,
                w: c.w.ptr,
                bias: c.bias.as_ref().map(|b| b.ptr),
                use_dnn: c.use_dnn,
                tc: c.tc,
                fuse_add: c.fuse_add,
                stats: c.stats,
            },
            Step::ConvT { w, cin, cout, into_concat } => StepInfo::ConvT { w: w.ptr, cin: *cin, cout: *cout, into_concat: *into_concat },
            Step::Norm { groups, gamma, beta, act, deferred } => StepInfo::Norm {
                groups: *groups,
                gamma: gamma.as_ref().map(|b| b.ptr),
                beta: beta.as_ref().map(|b| b.ptr),
                act: *act,
                deferred: *deferred,
            },
            Step::Add => StepInfo::Add,
            Step::Concat => StepInfo::Concat,
            Step::Upsample { fuse_add } => StepInfo::Upsample { fuse_add: *fuse_add },
        }
    }
}

/// `CudaEngine::forward_device`'s outputs, on the device, f32 NCDHW.
pub struct DeviceOutputs {
    /// `[n, num_classes, dims]` sigmoid scores.
    pub scores: DevBuf,
    /// `[n, offset_channels (3), dims]` offsets (channels x, y, z).
    pub offsets: DevBuf,
    /// `[n, fm2_channels, fm2_dims]` when asked for.
    pub fm2: Option<DevBuf>,
    pub n: usize,
    pub num_classes: usize,
    pub offset_channels: usize,
    pub fm2_channels: usize,
    /// Output grid of one tile (`tile / stride`).
    pub dims: [usize; 3],
    pub fm2_dims: [usize; 3],
}

impl DeviceOutputs {
    /// f32 values of `scores` (the buffer may hold more).
    pub fn scores_len(&self) -> usize {
        self.n * self.num_classes * vol(self.dims)
    }

    /// f32 values of `offsets`.
    pub fn offsets_len(&self) -> usize {
        self.n * self.offset_channels * vol(self.dims)
    }
}

/// What a walk's graph depends on besides the arena: the batch, the tile, whether fm2 is kept,
/// and whether the input comes from the host (f32, staged and converted) or the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct WalkKey {
    n: usize,
    tile: [usize; 3],
    fm2: bool,
    /// A device input is copied into the arena (graphs on) rather than read in place.
    staged: bool,
    host_input: bool,
}

/// A walk shape's graph, and how far into the arena its last eager walk reached.
struct GraphEntry {
    high: usize,
    state: GraphState,
}

/// Ends the arena's walk and any capture still open when `run_walk` unwinds.
struct WalkGuard(Option<std::sync::Arc<Gpu>>);

impl Drop for WalkGuard {
    fn drop(&mut self) {
        if let Some(gpu) = self.0.take() {
            gpu.abandon_capture();
            gpu.arena().end(&gpu, false);
        }
    }
}

/// How one walk runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WalkMode {
    Eager,
    /// Captured into a graph, which is then run.
    Capture,
    Replay,
}

/// A walk's input in the arena.
enum Staged {
    /// f32 NCDHW from the host, converted by the walk.
    F32(DevBuf),
    /// NDHWC fp16 copied from the caller's buffer.
    F16(DevBuf),
    /// The caller's NDHWC fp16 buffer itself (graphs off).
    Borrowed(u64),
}

/// A walk shape's graph.
enum GraphState {
    /// Walked eagerly once (plans, cuDNN workspace and arena size are settled by then).
    Walked,
    /// Captured: replayable while the arena keeps its generation and the cuDNN workspace its
    /// address, into the output buffers at these addresses.
    Ready { graph: DeviceGraph, generation: u64, workspace: (u64, usize), outputs: [Option<(u64, usize)>; 3] },
    /// Capture failed (the reason is in the notes): always eager.
    Off,
}

/// Whether walks are captured into CUDA graphs on `gpu`: on unless `FASTDET_CUDA_GRAPHS=0` or
/// every kernel is synchronised (`FASTDET_CUDA_SYNC=1`).
fn graphs_wanted(gpu: &Gpu) -> bool {
    std::env::var("FASTDET_CUDA_GRAPHS").map_or(true, |v| v != "0") && !gpu.sync_each()
}

/// A walk's input.
#[derive(Clone, Copy)]
enum WalkInput<'a> {
    /// `[n, cin, tile]` f32 NCDHW on the host.
    Host(&'a [f32]),
    /// `[n, tile, cin]` NDHWC fp16 at this device address (the caller's).
    Device(u64),
}

/// One model on one GPU.
pub struct CudaEngine {
    gpu: std::sync::Arc<Gpu>,
    /// cuDNN plans per (batch, tile), indexed by op. Declared before `dnn`, so dropped before
    /// it: the graph API's plans hold its handle, which must outlive them.
    plans: HashMap<(usize, [usize; 3]), Vec<Option<ConvPlan>>>,
    dnn: Option<Dnn>,
    graph: Graph,
    last: Vec<usize>,
    steps: Vec<Step>,
    /// The outputs' buffers (activations are in the device's arena).
    outputs: Pool,
    /// The current walk's output buffers (scores, offsets, fm2 in f32), taken before it starts.
    walk_outputs: [Option<DevBuf>; 3],
    /// CUDA graphs, per walk shape.
    graphs: HashMap<WalkKey, GraphEntry>,
    /// Whether walks may be captured into graphs (`FASTDET_CUDA_GRAPHS`, not with
    /// `FASTDET_CUDA_SYNC=1`).
    graphs_on: bool,
    /// Walks run by replaying a graph, and eagerly (`graph_counts`).
    replays: usize,
    eager_walks: usize,
    name: String,
    backend: ConvBackend,
    /// How the tensor-core convolutions run (block tiles, cp.async loads; the norm fusion is in
    /// `steps`).
    tc: TcPolicy,
    /// The kernel the transposed convolutions ask for (`FASTDET_CONVT`; the FMA kernel on a
    /// device without tensor cores).
    convt: ops::ConvtKernel,
    notes: Vec<String>,
    /// Convolutions that cuDNN's graph API could not plan or run, taken by its legacy API
    /// instead: (op name, why).
    graph_api_fallbacks: Vec<(String, String)>,
    /// Per value, during a walk: the per-block statistics a tensor-core conv wrote for it.
    tile_stats: Vec<Option<DevBuf>>,
    /// While `profile_walk` runs: a pair of timing marks around each step of the walk.
    profile: Option<Vec<StepMarks>>,
}

/// Timing marks around one step of a walk: ops `first..first + used` (a step may fuse several).
struct StepMarks {
    first: usize,
    used: usize,
    start: super::gpu::Mark,
    end: super::gpu::Mark,
}

/// One step of a profiled walk (`CudaEngine::profile_walk`): ops `first..first + used` of the
/// graph as the engine ran them (one launch sequence, fused where the engine fuses).
#[derive(Debug, Clone)]
pub struct StepTime {
    pub first: usize,
    pub used: usize,
    /// What the step computes, e.g. "conv3x3x3/s1 32->32 + groupnorm(8)+relu @ 192x128x128".
    pub label: String,
    /// The ops' kinds, e.g. "conv3x3x3 + groupnorm": what the profile sums by.
    pub kind: String,
    pub ms: f64,
    pub flops: u64,
    /// The least memory traffic of the step as this engine runs it (`step_min_bytes`).
    pub min_bytes: u64,
}

fn f32_of(w: &Weights, name: &str) -> Result<Vec<f32>> {
    w.f32(name).with_context(|| format!("weights {}: tensor {name}", w.name))
}

fn f16_of<'a>(w: &'a Weights, name: &str) -> Result<&'a [f16]> {
    w.tensors.get(name).map(|(_, d)| d.as_slice()).with_context(|| format!("weights {}: tensor {name} is missing", w.name))
}

/// Whether op `i`'s output goes only into op `i + 1`, an Add of it and a different value: then
/// op `i` can do that Add itself (the Add's other operand is read where op `i` writes).
fn feeds_only_the_next_add(g: &Graph, last: &[usize], i: usize) -> bool {
    let out = g.ops[i].output;
    g.ops.get(i + 1).is_some_and(|next| matches!(next.kind, OpKind::Add) && next.inputs.contains(&out) && next.inputs[0] != next.inputs[1] && last[out] == i + 1)
}

/// PyTorch's `[cout, cin, k, k, k]` → cuDNN's NHWC filter layout `[cout, k, k, k, cin]`.
pub fn to_ktrsc(w: &[f16], cout: usize, cin: usize, k: usize) -> Vec<f16> {
    let kk = k * k * k;
    assert_eq!(w.len(), cout * cin * kk, "to_ktrsc: weight length");
    let mut out = vec![f16::ZERO; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..kk {
                out[(co * kk + t) * cin + ci] = w[(co * cin + ci) * kk + t];
            }
        }
    }
    out
}

impl CudaEngine {
    /// An engine for `weights` on GPU `ordinal`; kernels compiled into / loaded from
    /// `kernel_cache` (default `$FASTDET_KERNEL_CACHE` or `~/.cache/fastdet/kernels`).
    pub fn new(weights: &Weights, ordinal: usize, kernel_cache: Option<PathBuf>) -> Result<Self> {
        Self::with_backend(weights, ordinal, kernel_cache, ConvBackend::from_env()?)
    }

    pub fn with_backend(weights: &Weights, ordinal: usize, kernel_cache: Option<PathBuf>, backend: ConvBackend) -> Result<Self> {
        let gpu = Gpu::open(ordinal, kernel_cache)?;
        Self::on(gpu, weights, backend)
    }

    /// An engine on an opened device (or the kernel emulator, `Gpu::emulator`).
    pub fn on(gpu: std::sync::Arc<Gpu>, weights: &Weights, backend: ConvBackend) -> Result<Self> {
        Self::on_with(gpu, weights, backend, TcPolicy::from_env()?)
    }

    /// `on`, with the tensor-core path's `policy` (ignored by other backends).
    pub fn on_with(gpu: std::sync::Arc<Gpu>, weights: &Weights, backend: ConvBackend, policy: TcPolicy) -> Result<Self> {
        let mut notes = vec![gpu.info.describe(), format!("kernels: {}", gpu.kernels_note)];
        // A measured choice needs the shape it is for (`choose::open_measured`); without one, auto.
        let backend = if backend == ConvBackend::Measure {
            notes.push("FASTDET_CONV=measure: no tile shape to measure on here; auto".into());
            ConvBackend::Auto
        } else {
            backend
        };
        // A typo here is an error, as in the other settings, not "cuDNN unavailable".
        DnnApi::from_env()?;
        let mut no_dnn = None;
        let dnn = match backend {
            ConvBackend::Direct | ConvBackend::TensorCore => None,
            ConvBackend::Cudnn => Some(Dnn::new(&gpu)?),
            ConvBackend::Auto | ConvBackend::Measure if gpu.is_emulator() => None,
            ConvBackend::Auto | ConvBackend::Measure => match Dnn::new(&gpu) {
                Ok(d) => Some(d),
                Err(e) => {
                    no_dnn = Some(e);
                    None
                }
            },
        };
        if let Some(d) = &dnn {
            notes.push(format!("cuDNN {}", d.version_string()));
        }
        let graph = Graph::build(&weights.spec)?;
        let last = graph.last_use();
        // Auto without cuDNN: our tensor-core kernel where the device has tensor cores, the
        // direct kernel elsewhere.
        let tc = match backend {
            ConvBackend::TensorCore => {
                gpu.check_tensor_cores().map_err(|why| anyhow!("FASTDET_CONV=tc: {why}"))?;
                true
            }
            ConvBackend::Auto | ConvBackend::Measure => dnn.is_none() && gpu.check_tensor_cores().is_ok(),
            _ => false,
        };
        if let Some(e) = no_dnn {
            notes.push(format!("cuDNN unavailable ({e:#}); convolutions run on {}", if tc { "conv3d_tc_f16" } else { "conv3d_igemm_f16" }));
        }
        let steps = guard("uploading weights", || Self::build_steps(&gpu, &graph, &last, weights, dnn.is_some(), tc, policy.norm_in_loads))?;
        if tc {
            let (deferred, stats, adds) = Self::fusion_counts(&steps);
            let loads = match policy.norm_in_loads {
                NormInLoads::Pointwise => "before 1x1x1 convs",
                NormInLoads::All => "before any conv",
                NormInLoads::Never => "never",
            };
            let tiles = match policy.tiles {
                TcTiles::Standard => "64x64 tiles",
                TcTiles::Wide => "128x64 tiles",
            };
            let staging = if policy.async_loads { "cp.async loads where no norm is applied in them" } else { "register-staged loads" };
            let halo = if policy.halo { ", halo tiles for the 3x3x3 convs they fit" } else { "" };
            notes.push(format!(
                "convolutions on the tensor cores (conv_tc.cu, {tiles}, 128x32 for <= 32 channels, {staging}{halo}); {deferred} norm(s) applied in the next conv's loads ({loads}), {stats} conv(s) writing the next norm's statistics, {adds} residual add(s) in the conv's store"
            ));
        }
        let convt = match ops::ConvtKernel::from_env()? {
            ops::ConvtKernel::TensorCore if gpu.check_tensor_cores().is_err() => ops::ConvtKernel::Fma,
            k => k,
        };
        if steps.iter().any(|s| matches!(s, Step::ConvT { .. })) {
            notes.push(match convt {
                ops::ConvtKernel::TensorCore => "transposed convolutions on the tensor cores (conv_transpose2_tc_f16) where Cin % 16 == 0 and Cout % 8 == 0".into(),
                ops::ConvtKernel::Fma => "transposed convolutions on the CUDA cores (conv_transpose2_f16)".into(),
            });
        }
        gpu.sync("uploading weights")?;
        let graphs_on = graphs_wanted(&gpu);
        Ok(CudaEngine {
            gpu,
            dnn,
            graph,
            last,
            steps,
            plans: HashMap::new(),
            outputs: Pool::default(),
            walk_outputs: [None, None, None],
            graphs: HashMap::new(),
            graphs_on,
            replays: 0,
            eager_walks: 0,
            name: weights.name.clone(),
            backend,
            tc: policy,
            convt,
            notes,
            graph_api_fallbacks: Vec::new(),
            tile_stats: Vec::new(),
            profile: None,
        })
    }

    /// (norms applied in a conv's loads, convs writing a norm's statistics, Adds done in a
    /// conv's store).
    fn fusion_counts(steps: &[Step]) -> (usize, usize, usize) {
        let deferred = steps.iter().filter(|s| matches!(s, Step::Norm { deferred: true, .. })).count();
        let stats = steps.iter().filter(|s| matches!(s, Step::Conv(c) if c.stats)).count();
        let adds = steps.iter().filter(|s| matches!(s, Step::Conv(c) if c.fuse_add)).count();
        (deferred, stats, adds)
    }

    fn build_steps(gpu: &Gpu, g: &Graph, last: &[usize], w: &Weights, have_dnn: bool, tc: bool, norm_in_loads: NormInLoads) -> Result<Vec<Step>> {
        let mut steps = Vec::with_capacity(g.ops.len());
        for (i, op) in g.ops.iter().enumerate() {
            let vname = &g.values[op.output].name;
            let cout_v = g.values[op.output].channels;
            let is_out = op.output == g.scores || op.output == g.offsets;
            // Every fp16 activation the kernels see must have an even channel count (half2).
            if !is_out && !cout_v.is_multiple_of(2) {
                bail!("{vname}: {cout_v} channels; the CUDA engine needs even channel counts");
            }
            let step = match &op.kind {
                OpKind::Conv { weight, bias, cin, cout, k, stride, pad, act } => {
                    let (cin, cout, k, stride, pad, act) = (*cin, *cout, *k, *stride, *pad, *act);
                    let kind = if cin == 1 && k == 3 && stride == 1 && pad == 1 && cout % 2 == 0 && cout <= ops::CONV_FIRST_MAX_COUT {
                        ConvKind::First
                    } else if is_out && k == 1 && ops::head_conv_fits(cin, cout) {
                        ConvKind::Head
                    } else {
                        ConvKind::General
                    };
                    let wt = match kind {
                        ConvKind::First | ConvKind::Head => gpu.upload(&f32_of(w, weight)?)?,
                        ConvKind::General => gpu.upload(&to_ktrsc(f16_of(w, weight)?, cout, cin, k))?,
                    };
                    let bias = match bias {
                        Some(b) => Some(gpu.upload(&f32_of(w, b)?)?),
                        None => None,
                    };
                    // bias_act_f16 needs an even width; odd widths (a fallback head) go direct.
                    let use_dnn = have_dnn && kind == ConvKind::General && cout % 2 == 0;
                    let tc = tc && kind == ConvKind::General;
                    // The store computes act(conv + bias + residual): the Add must come before
                    // any activation, and it must be the output's only reader.
                    let fuse_add = tc && act == Act::None && feeds_only_the_next_add(g, last, i);
                    Step::Conv(ConvStep { kind, cin, cout, k, stride, pad, act, w: wt, bias, use_dnn, tc, fuse_add, stats: false })
                }
                OpKind::ConvTranspose2 { weight, cin, cout } => {
                    let into_concat = (i + 1..g.ops.len())
                        .find(|&j| matches!(g.ops[j].kind, OpKind::Concat) && g.ops[j].inputs[0] == op.output && last[op.output] == j);
                    Step::ConvT { w: gpu.upload(f16_of(w, weight)?)?, cin: *cin, cout: *cout, into_concat }
                }
                OpKind::GroupNorm { groups, weight, bias, act } => {
                    ops::norm_check(cout_v, *groups, 1).with_context(|| vname.clone())?;
                    Step::Norm {
                        groups: *groups,
                        gamma: Some(gpu.upload(&f32_of(w, weight)?)?),
                        beta: Some(gpu.upload(&f32_of(w, bias)?)?),
                        act: *act,
                        deferred: false,
                    }
                }
                OpKind::InstanceNorm { act } => {
                    ops::norm_check(cout_v, cout_v, 1).with_context(|| vname.clone())?;
                    Step::Norm { groups: cout_v, gamma: None, beta: None, act: *act, deferred: false }
                }
                OpKind::Add => Step::Add,
                OpKind::Concat => Step::Concat,
                OpKind::Upsample2x => {
                    Step::Upsample { fuse_add: feeds_only_the_next_add(g, last, i) }
                }
            };
            steps.push(step);
        }
        // A norm whose only reader is a tensor-core conv (of a kernel size `norm_in_loads` takes)
        // is applied in that conv's loads: its output is never written. The raw input must live
        // until the conv: either the norm is its last reader (the pending value takes the
        // buffer) or it is read again after the conv.
        for i in 0..g.ops.len() {
            let out = g.ops[i].output;
            if !matches!(steps[i], Step::Norm { .. }) || out == g.scores || out == g.offsets || out == g.fm2 {
                continue;
            }
            let readers: Vec<usize> = (i + 1..g.ops.len()).filter(|&j| g.ops[j].inputs.contains(&out)).collect();
            let raw = g.ops[i].inputs[0];
            let fusable = match readers[..] {
                [j] => matches!(&steps[j], Step::Conv(c) if c.tc && norm_in_loads.applies_to(c.k)) && g.ops[j].inputs[0] == out && (last[raw] == i || last[raw] > j),
                _ => false,
            };
            if let Step::Norm { deferred, .. } = &mut steps[i] {
                *deferred = fusable;
            }
        }
        // A norm whose input a tensor-core conv (or conv + fused Add) produces takes its
        // statistics from that conv's store.
        for i in 0..g.ops.len() {
            if !matches!(steps[i], Step::Norm { .. }) {
                continue;
            }
            let x = g.ops[i].inputs[0];
            let Some(mut p) = (0..i).find(|&p| g.ops[p].output == x) else { continue };
            if matches!(steps[p], Step::Add) && p > 0 && matches!(&steps[p - 1], Step::Conv(c) if c.fuse_add) {
                p -= 1;
            }
            if let Step::Conv(c) = &mut steps[p] {
                c.stats |= c.tc && !(g.ops[p].output == g.scores || g.ops[p].output == g.offsets);
            }
        }
        Ok(steps)
    }

    /// Device, kernels, cuDNN and fallbacks, one line each.
    pub fn notes(&self) -> Vec<String> {
        let mut n = self.notes.clone();
        // General convolutions on conv3d_tc_f16: `TensorCore`, or `Auto` without cuDNN on sm_70+.
        let tensor_cores = self.steps.iter().any(|s| matches!(s, Step::Conv(c) if c.tc));
        let how = match (self.dnn.is_some(), tensor_cores) {
            (true, _) => "",
            (false, true) => " (tensor-core kernel)",
            (false, false) => " (no cuDNN: direct kernel)",
        };
        n.push(format!("conv backend {:?}{how}", self.backend));
        n.push(if self.graphs_on {
            "CUDA graphs on: the second walk of each shape is captured, later ones replay it (FASTDET_CUDA_GRAPHS=0 turns them off)".to_string()
        } else {
            "CUDA graphs off".to_string()
        });
        n
    }

    /// Adds a line to `notes` (how the engine was chosen, `choose.rs`).
    pub fn push_note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Whether cuDNN's plans time their algorithms at their first run (`dnn.rs`, `Dnn::find`);
    /// for the plans made after this call. No effect without cuDNN.
    pub fn set_cudnn_find(&mut self, on: bool) {
        if let Some(d) = &mut self.dnn {
            d.find = on;
            self.plans.clear();
        }
    }

    /// Which of cuDNN's APIs plans the convolutions (`dnn.rs`, `Dnn::api`); for the plans made
    /// after this call. No effect without cuDNN.
    pub fn set_cudnn_api(&mut self, api: DnnApi) {
        if let Some(d) = &mut self.dnn {
            d.api = api;
            self.plans.clear();
        }
    }

    /// The kernel the transposed convolutions ask for from now on (`FASTDET_CONVT` chose it at
    /// opening); walks captured before are dropped so that none replays the other kernel.
    pub fn set_convt_kernel(&mut self, kernel: ops::ConvtKernel) {
        if kernel != self.convt {
            self.convt = kernel;
            self.graphs.clear();
        }
    }

    /// Whether any convolution runs on cuDNN.
    pub fn uses_cudnn(&self) -> bool {
        self.dnn.is_some() && self.steps.iter().any(|s| matches!(s, Step::Conv(c) if c.use_dnn))
    }

    /// The cuDNN algorithm of every planned convolution: (op name, tile, algorithm).
    pub fn conv_algorithms(&self) -> Vec<(String, [usize; 3], String)> {
        let mut out = Vec::new();
        for ((_, tile), plans) in &self.plans {
            for (i, p) in plans.iter().enumerate() {
                if let Some(p) = p {
                    out.push((self.graph.values[self.graph.ops[i].output].name.clone(), *tile, p.algo().unwrap_or_else(|| "not run".into())));
                }
            }
        }
        out.sort();
        out
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Activation memory for the current walk: a slot of the device handle's arena.
    fn take(&mut self, bytes: usize) -> Result<DevBuf> {
        self.gpu.arena().take(&self.gpu, bytes)
    }

    /// Hands a buffer back: an arena slot to the arena, an output buffer to the engine's pool.
    fn give(&mut self, b: DevBuf) {
        if b.is_slot() {
            self.gpu.arena().give(&self.gpu, b);
        } else {
            self.outputs.give(b);
        }
    }

    fn release(&mut self, v: Val) {
        match v {
            Val::H(b) | Val::F(b) => self.give(b),
            Val::InConcat | Val::Borrowed(_) => {}
            Val::Pending { owned, params, .. } => {
                if let Some(b) = owned {
                    self.give(b);
                }
                self.give(params);
            }
        }
    }

    /// Output `k` (0 scores, 1 offsets, 2 fm2 as f32) of the current walk: the buffer taken for
    /// it before the walk began (so that a captured walk writes where its replays will).
    fn take_output(&mut self, k: usize, bytes: usize) -> Result<DevBuf> {
        let b = self.walk_outputs[k].take().with_context(|| format!("internal error: output {k} written twice or not prepared"))?;
        if b.bytes < bytes {
            bail!("internal error: output {k} has {} bytes, {bytes} needed", b.bytes);
        }
        Ok(b)
    }

    /// Bytes of the outputs (scores, offsets, fm2 f32; 0 when not wanted) of a walk.
    fn output_bytes(&self, n: usize, tile: [usize; 3], want_fm2: bool) -> [usize; 3] {
        let g = &self.graph;
        let dims = vol(g.dims(g.scores, tile));
        [
            n * g.values[g.scores].channels * dims * 4,
            n * g.values[g.offsets].channels * dims * 4,
            if want_fm2 { n * g.values[g.fm2].channels * vol(g.dims(g.fm2, tile)) * 4 } else { 0 },
        ]
    }

    /// Checks a forward call's arguments.
    fn check_input(&self, input: &[f32], n: usize, tile: [usize; 3]) -> Result<()> {
        let g = &self.graph;
        g.check_tile(tile)?;
        let cin = g.values[g.input].channels;
        let tvol = vol(tile);
        if input.len() != n * cin * tvol {
            bail!("input holds {} values, expected {} for {n} tile(s) of {tile:?}", input.len(), n * cin * tvol);
        }
        Ok(())
    }

    /// Uploads a host input `[n, cin, tile]` f32 NCDHW and walks the graph from it (the walk
    /// converts it to the internal NDHWC fp16).
    fn forward_device_inner(&mut self, input: &[f32], n: usize, tile: [usize; 3], want_fm2: bool) -> Result<DeviceOutputs> {
        self.check_input(input, n, tile)?;
        if n == 0 {
            bail!("a forward pass on the device needs at least one tile");
        }
        self.gpu.bind()?;
        self.run_walk(WalkInput::Host(input), n, tile, want_fm2)
    }

    /// The cuDNN workspace's address and size ((0, 0) without one).
    fn workspace(&self) -> (u64, usize) {
        self.gpu.dnn_workspace().as_ref().map_or((0, 0), |b| (b.ptr, b.bytes))
    }

    /// Whether the cuDNN workspace a graph was captured with is still there: the same address
    /// and at least the size (a smaller buffer at the same address would be overrun).
    fn workspace_holds(&self, captured: (u64, usize)) -> bool {
        let now = self.workspace();
        now.0 == captured.0 && now.1 >= captured.1
    }

    /// How the next walk of `key` runs.
    fn walk_mode(&self, key: &WalkKey) -> WalkMode {
        let Some(entry) = self.graphs.get(key) else { return WalkMode::Eager };
        let arena = self.gpu.arena();
        match &entry.state {
            GraphState::Off => WalkMode::Eager,
            GraphState::Ready { generation, workspace, .. } if *generation == arena.generation() && self.workspace_holds(*workspace) => WalkMode::Replay,
            _ if self.graphs_on && arena.capacity() >= entry.high => WalkMode::Capture,
            _ => WalkMode::Eager,
        }
    }

    /// One forward pass in the device's arena: eager, captured into a graph, or a replay of the
    /// graph (see the module's note). A failed capture is noted and the walk runs eagerly.
    fn run_walk(&mut self, input: WalkInput, n: usize, tile: [usize; 3], want_fm2: bool) -> Result<DeviceOutputs> {
        let host_input = matches!(input, WalkInput::Host(_));
        let key = WalkKey { n, tile, fm2: want_fm2, host_input, staged: host_input || self.graphs_on };
        let mode = self.walk_mode(&key);
        self.gpu.arena().begin(&self.gpu)?;
        // A panic below (turned into an error by `guard`) must not leave the arena busy or a
        // capture open: every later walk on the handle would fail.
        let mut unwinding = WalkGuard(Some(self.gpu.clone()));
        let r = self.walk_once(key, input, mode);
        unwinding.0 = None;
        for b in std::mem::take(&mut self.walk_outputs).into_iter().flatten() {
            self.outputs.give(b);
        }
        let end = self.gpu.arena().end(&self.gpu, matches!(r, Ok(Ok(_))));
        match r? {
            Ok((out, ran)) => {
                if ran == WalkMode::Replay {
                    self.replays += 1;
                } else {
                    // The walk ran (or was captured) whole: how far it reached is what the
                    // arena must hold for a capture of it.
                    let entry = self.graphs.entry(key).or_insert(GraphEntry { high: 0, state: GraphState::Walked });
                    entry.high = end.high;
                    if ran == WalkMode::Eager {
                        self.eager_walks += 1;
                    } else {
                        self.replays += 1;
                    }
                }
                Ok(out)
            }
            Err(capture_error) => {
                let msg = format!("{}: no CUDA graph for {n} tile(s) of {tile:?} ({capture_error:#}); running it without one", self.name);
                crate::errln!("warning: {msg}");
                self.notes.push(msg);
                self.graphs.insert(key, GraphEntry { high: end.high, state: GraphState::Off });
                self.run_walk(input, n, tile, want_fm2)
            }
        }
    }

    /// The body of `run_walk` inside the arena: Err is a hard error, Ok(Err) a failed capture
    /// (nothing ran; the caller runs the walk again eagerly), Ok(Ok) the outputs and how they were
    /// made.
    #[allow(clippy::type_complexity)]
    fn walk_once(&mut self, key: WalkKey, input: WalkInput, mode: WalkMode) -> Result<Result<(DeviceOutputs, WalkMode)>> {
        let WalkKey { n, tile, fm2: want_fm2, .. } = key;
        let elems = n * self.input_channels() * vol(tile);
        // The input, staged in the walk's first slot, outside any capture (a copy from the host
        // cannot be captured, and the caller's buffer may move between calls).
        let staged = match input {
            WalkInput::Host(x) => {
                let b = self.take(elems * 4)?;
                self.gpu.write(b.ptr, x)?;
                Staged::F32(b)
            }
            WalkInput::Device(p) if self.graphs_on => {
                let b = self.take(elems * 2)?;
                self.gpu.copy(b.ptr, p, elems * 2)?;
                Staged::F16(b)
            }
            WalkInput::Device(p) => Staged::Borrowed(p),
        };
        let mut mode = mode;
        if mode == WalkMode::Replay {
            if let Some(GraphEntry { state: GraphState::Ready { outputs, .. }, .. }) = self.graphs.get(&key) {
                let outputs = *outputs;
                for (k, o) in outputs.iter().enumerate() {
                    if let Some((ptr, bytes)) = *o {
                        self.walk_outputs[k] = self.outputs.take_at(ptr, bytes);
                    }
                }
                if outputs.iter().zip(&self.walk_outputs).any(|(o, b)| o.is_some() != b.is_some()) {
                    // The caller still holds an earlier call's outputs: this call runs eagerly.
                    mode = WalkMode::Eager;
                    for b in std::mem::take(&mut self.walk_outputs).into_iter().flatten() {
                        self.outputs.give(b);
                    }
                }
            }
        }
        match mode {
            WalkMode::Replay => {
                let Some(GraphEntry { state: GraphState::Ready { graph, .. }, .. }) = self.graphs.get(&key) else { bail!("internal error: no graph to replay") };
                self.gpu.replay(graph)?;
            }
            WalkMode::Eager => {
                self.take_outputs(n, tile, want_fm2)?;
                self.walk(staged, n, tile, want_fm2)?;
            }
            WalkMode::Capture => {
                let outputs = self.take_outputs(n, tile, want_fm2)?;
                if let Err(e) = self.gpu.begin_capture() {
                    return Ok(Err(e));
                }
                let r = self.walk(staged, n, tile, want_fm2);
                let graph = match (r, self.gpu.end_capture()) {
                    (Ok(()), Ok(graph)) => graph,
                    (Err(e), _) | (Ok(()), Err(e)) => return Ok(Err(e)),
                };
                // Captured, not run: run it.
                let r = self.gpu.replay(&graph);
                let (generation, workspace) = (self.gpu.arena().generation(), self.workspace());
                let high = self.graphs.get(&key).map_or(0, |e| e.high);
                self.graphs.insert(key, GraphEntry { high, state: GraphState::Ready { graph, generation, workspace, outputs } });
                r?;
            }
        }
        Ok(Ok((self.outputs_of(n, tile, want_fm2)?, mode)))
    }

    /// Takes the output buffers of a walk that runs (eagerly or captured) from the engine's pool;
    /// returns their (address, bytes) for a graph to record.
    fn take_outputs(&mut self, n: usize, tile: [usize; 3], want_fm2: bool) -> Result<[Option<(u64, usize)>; 3]> {
        let sizes = self.output_bytes(n, tile, want_fm2);
        for (k, &bytes) in sizes.iter().enumerate() {
            if bytes > 0 {
                self.walk_outputs[k] = Some(self.outputs.take(&self.gpu, bytes)?);
            }
        }
        Ok(std::array::from_fn(|k| self.walk_outputs[k].as_ref().map(|b| (b.ptr, sizes[k]))))
    }

    /// The walk's outputs: the buffers it (or its graph) wrote.
    fn outputs_of(&mut self, n: usize, tile: [usize; 3], want_fm2: bool) -> Result<DeviceOutputs> {
        let g = &self.graph;
        let (nc, no, nf) = (g.values[g.scores].channels, g.values[g.offsets].channels, g.values[g.fm2].channels);
        let (dims, fm2_dims) = (g.dims(g.scores, tile), g.dims(g.fm2, tile));
        let scores = self.walk_outputs[0].take().context("internal error: no scores buffer")?;
        let offsets = self.walk_outputs[1].take().context("internal error: no offsets buffer")?;
        let fm2 = if want_fm2 { Some(self.walk_outputs[2].take().context("internal error: no fm2 buffer")?) } else { None };
        Ok(DeviceOutputs { scores, offsets, fm2, n, num_classes: nc, offset_channels: no, fm2_channels: nf, dims, fm2_dims })
    }

    /// The graph walk from the staged input (NDHWC fp16 `[n, tile, cin]`, or f32 NCDHW to convert
    /// first) into the output buffers taken for it (`walk_outputs`), which it leaves there; the
    /// outputs stay on the device (no synchronisation: kernel faults surface at the caller's next
    /// sync or read). Makes no allocation but arena slots, so it can be captured.
    fn walk(&mut self, staged: Staged, n: usize, tile: [usize; 3], want_fm2: bool) -> Result<()> {
        let nvals = self.graph.values.len();
        let mut vals: Vec<Option<Val>> = (0..nvals).map(|_| None).collect();
        // Left over from a failed walk (slots of an ended walk: nothing to free).
        self.tile_stats = (0..nvals).map(|_| None).collect();
        let r = self.walk_ops(staged, &mut vals, n, tile, want_fm2);
        // Whatever is left (everything, after an error) goes back; nothing is freed, which a
        // capture could not hold.
        for v in vals.iter_mut() {
            if let Some(v) = v.take() {
                self.release(v);
            }
        }
        for s in std::mem::take(&mut self.tile_stats).into_iter().flatten() {
            self.give(s);
        }
        r
    }

    fn walk_ops(&mut self, staged: Staged, vals: &mut [Option<Val>], n: usize, tile: [usize; 3], want_fm2: bool) -> Result<()> {
        let input_v = self.graph.input;
        match staged {
            Staged::F32(x32) => {
                let cin = self.input_channels();
                let x16 = self.take(n * cin * vol(tile) * 2)?;
                let dst = x16.ptr;
                vals[input_v] = Some(Val::H(x16));
                let r = ops::to_ndhwc_f16(&self.gpu, x32.ptr, dst, n, cin, vol(tile)).context("input to NDHWC fp16");
                self.give(x32);
                r?;
            }
            Staged::F16(b) => vals[input_v] = Some(Val::H(b)),
            Staged::Borrowed(p) => vals[input_v] = Some(Val::Borrowed(p)),
        }

        let mut i = 0;
        while i < self.graph.ops.len() {
            let start = if self.profile.is_some() { Some(self.gpu.mark()?) } else { None };
            let used = self.exec(i, n, tile, vals).with_context(|| {
                let op = &self.graph.ops[i];
                format!("op {i} ({}) on {n} tile(s) of {tile:?}", self.graph.values[op.output].name)
            })?;
            if let Some(start) = start {
                let end = self.gpu.mark()?;
                if let Some(p) = self.profile.as_mut() {
                    p.push(StepMarks { first: i, used, start, end });
                }
            }
            for j in i..i + used {
                let inputs = self.graph.ops[j].inputs.clone();
                for v in inputs {
                    if self.last[v] == j {
                        if let Some(val) = vals[v].take() {
                            self.release(val);
                        }
                    }
                }
            }
            i += used;
        }

        // The heads wrote into the output buffers taken for this walk: back where `outputs_of`
        // takes them from.
        let g = &self.graph;
        let (scores_v, offsets_v, fm2_v) = (g.scores, g.offsets, g.fm2);
        for (k, v) in [(0, scores_v), (1, offsets_v)] {
            match vals[v].take() {
                Some(Val::F(b)) => self.walk_outputs[k] = Some(b),
                _ => bail!("internal error: output value {v} was not produced as f32"),
            }
        }
        if want_fm2 {
            let h = match vals[fm2_v].take() {
                Some(Val::H(b)) => b,
                _ => bail!("internal error: fm2 was not kept"),
            };
            let nf = self.graph.values[fm2_v].channels;
            let fm2_vol = vol(self.graph.dims(fm2_v, tile));
            let f = self.take_output(2, n * nf * fm2_vol * 4)?;
            let dst = f.ptr;
            self.walk_outputs[2] = Some(f);
            let r = ops::to_ncdhw_f32(&self.gpu, h.ptr, dst, n, nf, fm2_vol);
            self.give(h);
            r?;
        }
        Ok(())
    }

    /// `forward` = the device forward + one read back of each output.
    fn forward_inner(&mut self, input: &[f32], n: usize, tile: [usize; 3], want_fm2: bool) -> Result<Outputs> {
        self.check_input(input, n, tile)?;
        if n == 0 {
            return Ok(Outputs { scores: vec![], offsets: vec![], fm2: want_fm2.then(Vec::new) });
        }
        let out = self.forward_device_inner(input, n, tile, want_fm2)?;
        let r = (|| -> Result<Outputs> {
            self.gpu.sync("forward pass")?;
            let scores = self.gpu.read::<f32>(out.scores.ptr, out.scores_len())?;
            let offsets = self.gpu.read::<f32>(out.offsets.ptr, out.offsets_len())?;
            let fm2 = match &out.fm2 {
                Some(f) => Some(self.gpu.read::<f32>(f.ptr, out.n * out.fm2_channels * vol(out.fm2_dims))?),
                None => None,
            };
            Ok(Outputs { scores, offsets, fm2 })
        })();
        self.recycle(out);
        r
    }

    /// The network outputs of `n` tiles left on the device: `scores [n, C, dims]` (sigmoid) and
    /// `offsets [n, 3, dims]` f32 NCDHW, as `forward` returns them on the host (`forward` is this
    /// plus a read back). The buffers come from the engine's pool and may be larger than the
    /// outputs; hand them back with `recycle` once the work that reads them has been issued (all
    /// work is on one stream, so the reuse is ordered after it; a replayed graph writes into the
    /// same buffers again, so until they are back the next call runs without its graph). Nothing
    /// is synchronised here.
    pub fn forward_device(&mut self, input: &[f32], n: usize, tile: [usize; 3], want_fm2: bool) -> Result<DeviceOutputs> {
        let name = self.name();
        guard(&name.clone(), || self.forward_device_inner(input, n, tile, want_fm2)).with_context(|| format!("{name}: forward pass"))
    }

    /// `forward_device` from an input already on the device in the engine's internal layout:
    /// `input` holds `[n, tile, cin]` NDHWC fp16 (for the 1-channel networks, `[n, tile]`, as
    /// `ops::extract_tiles` writes it), which is what `forward_device` makes of its host input
    /// (`ops::to_ndhwc_f16`), so the outputs are the same. The buffer stays the caller's: it is
    /// only read (with graphs on, copied into the walk's first slot), so several engines on the
    /// device can run on one copy of a batch. Nothing is synchronised; the caller keeps `input`
    /// alive and unchanged until the work is issued (one stream orders later writes after it).
    pub fn forward_device_input(&mut self, input: &DevBuf, n: usize, tile: [usize; 3], want_fm2: bool) -> Result<DeviceOutputs> {
        let name = self.name();
        guard(&name.clone(), || {
            self.graph.check_tile(tile)?;
            if n == 0 {
                bail!("a forward pass on the device needs at least one tile");
            }
            let need = n * self.input_channels() * vol(tile) * 2;
            if input.bytes < need {
                bail!("device input holds {} bytes, expected {need} for {n} tile(s) of {tile:?}", input.bytes);
            }
            self.gpu.bind()?;
            self.run_walk(WalkInput::Device(input.ptr), n, tile, want_fm2)
        })
        .with_context(|| format!("{name}: forward pass"))
    }

    /// Input channels of the network (1 for the seed networks).
    pub fn input_channels(&self) -> usize {
        self.graph.values[self.graph.input].channels
    }

    /// Returns `forward_device`'s buffers to the engine's pool.
    pub fn recycle(&mut self, out: DeviceOutputs) {
        self.outputs.give(out.scores);
        self.outputs.give(out.offsets);
        if let Some(f) = out.fm2 {
            self.outputs.give(f);
        }
    }

    /// The least memory traffic of the step running ops `first..first + used` on `n` tiles:
    /// the graph's (`Graph::span_min_bytes`), except where this engine moves less than the
    /// graph says. A norm applied in the next conv's loads writes nothing (and reads its input
    /// at most once, for statistics the conv did not gather): at least nothing. A concat whose
    /// first part a transposed conv wrote in place copies only its second input.
    fn step_min_bytes(&self, first: usize, used: usize, tile: [usize; 3], n: usize) -> u64 {
        let g = &self.graph;
        match &self.steps[first] {
            Step::Norm { deferred: true, .. } => 0,
            Step::Concat if self.steps.iter().any(|s| matches!(s, Step::ConvT { into_concat: Some(j), .. } if *j == first)) => {
                (g.numel(g.ops[first].inputs[1], tile) * 2 * 2 * n) as u64
            }
            _ => g.span_min_bytes(first, used, tile, n),
        }
    }

    /// One walk of `n` tiles of `tile` from `input` (as `forward_device_input` takes it), run
    /// eagerly with a timing mark around each step: where a walk's time goes. The marks keep the
    /// steps apart, so the sum is a little over a graph replay's time.
    pub fn profile_walk(&mut self, input: &DevBuf, n: usize, tile: [usize; 3]) -> Result<Vec<StepTime>> {
        // Without graphs the walk has a key of its own (not staged): it runs eagerly, and the
        // graphs held for the other walks stay.
        let graphs_on = std::mem::replace(&mut self.graphs_on, false);
        self.profile = Some(Vec::new());
        let r = self.forward_device_input(input, n, tile, false);
        let marks = self.profile.take().unwrap_or_default();
        self.graphs_on = graphs_on;
        let out = r?;
        self.gpu.sync("profiling a walk")?;
        self.recycle(out);
        let g = &self.graph;
        marks
            .into_iter()
            .map(|m| {
                let ops = &g.ops[m.first..m.first + m.used];
                let describe = |op: &Op, full: bool| -> String {
                    match &op.kind {
                        OpKind::Conv { cin, cout, k, stride, act, .. } if full => format!("conv{k}x{k}x{k}/s{stride} {cin}->{cout}{act}"),
                        OpKind::Conv { k, .. } => format!("conv{k}x{k}x{k}"),
                        OpKind::ConvTranspose2 { cin, cout, .. } if full => format!("convT2x2x2 {cin}->{cout}"),
                        OpKind::ConvTranspose2 { .. } => "convT2x2x2".into(),
                        OpKind::GroupNorm { groups, act, .. } if full => format!("groupnorm({groups}){act}"),
                        OpKind::GroupNorm { .. } => "groupnorm".into(),
                        OpKind::InstanceNorm { act } if full => format!("instancenorm{act}"),
                        OpKind::InstanceNorm { .. } => "instancenorm".into(),
                        OpKind::Add => "add".into(),
                        OpKind::Concat => "concat".into(),
                        OpKind::Upsample2x => "upsample2x".into(),
                    }
                };
                let last = &ops[ops.len() - 1];
                let d = g.dims(last.output, tile);
                let label = format!("{} @ {}x{}x{}", ops.iter().map(|o| describe(o, true)).collect::<Vec<_>>().join(" + "), d[0], d[1], d[2]);
                let kind = ops.iter().map(|o| describe(o, false)).collect::<Vec<_>>().join(" + ");
                let flops = ops.iter().map(|o| g.op_flops(o, tile)).sum::<u64>() * n as u64;
                let min_bytes = self.step_min_bytes(m.first, m.used, tile, n);
                Ok(StepTime { first: m.first, used: m.used, label, kind, ms: self.gpu.elapsed_ms(&m.start, &m.end)?, flops, min_bytes })
            })
            .collect()
    }

    /// Turns CUDA graphs on or off for this engine's later walks (on by default, see
    /// `graphs_wanted`); off drops the graphs it holds.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs_on = on && graphs_wanted(&self.gpu);
        if !self.graphs_on {
            self.graphs.clear();
        }
    }

    /// CUDA graphs held, and how the walks so far ran: (graphs, replayed, eager).
    pub fn graph_counts(&self) -> (usize, usize, usize) {
        let ready = self.graphs.values().filter(|e| matches!(e.state, GraphState::Ready { .. })).count();
        (ready, self.replays, self.eager_walks)
    }

    /// The device this engine runs on, shared with the other engines opened on it.
    pub fn gpu_arc(&self) -> std::sync::Arc<Gpu> {
        self.gpu.clone()
    }

    fn h(vals: &[Option<Val>], v: ValueId) -> Result<u64> {
        match &vals[v] {
            Some(Val::H(b)) => Ok(b.ptr),
            Some(Val::Borrowed(p)) => Ok(*p),
            Some(Val::F(_)) => bail!("internal error: value {v} is f32, an fp16 activation was expected"),
            Some(Val::InConcat) => bail!("internal error: value {v} lives in a concat buffer"),
            Some(Val::Pending { .. }) => bail!("internal error: value {v} is a deferred norm, read by a conv that does not apply it"),
            None => bail!("internal error: value {v} is not available"),
        }
    }

    /// Takes value `v`'s buffer for an in-place op when op `i` is its last reader.
    fn take_in_place(&self, vals: &mut [Option<Val>], v: ValueId, i: usize) -> Option<DevBuf> {
        if self.last[v] != i || !matches!(vals[v], Some(Val::H(_))) {
            return None;
        }
        match vals[v].take() {
            Some(Val::H(b)) => Some(b),
            _ => None,
        }
    }

    /// Runs op `i` (and the next one when fused); returns how many ops it consumed.
    fn exec(&mut self, i: usize, n: usize, tile: [usize; 3], vals: &mut [Option<Val>]) -> Result<usize> {
        let op = self.graph.ops[i].clone();
        let out_dims = self.graph.dims(op.output, tile);
        let in_dims = self.graph.dims(op.inputs[0], tile);
        let c_out = self.graph.values[op.output].channels;
        let c_in = self.graph.values[op.inputs[0]].channels;
        let gpu = self.gpu.clone();
        match self.steps[i].info() {
            StepInfo::Conv { kind, cin, cout, k, stride, pad, act, w, bias, use_dnn, tc, fuse_add, stats } => {
                let (x, prologue) = match &vals[op.inputs[0]] {
                    Some(Val::Pending { x, params, post, .. }) if tc => (*x, Some(ops::NormPrologue { params: params.ptr, pre: Act::None, post: *post })),
                    _ => (Self::h(vals, op.inputs[0])?, None),
                };
                let is_out = op.output == self.graph.scores || op.output == self.graph.offsets;
                let ovol = vol(out_dims);
                let shape = ConvShape { n, dims: in_dims, cin, cout, k, stride, pad };
                match kind {
                    ConvKind::First => {
                        let out = self.take(n * ovol * cout * 2)?;
                        ops::conv_first(&gpu, x, w, bias, out.ptr, n, in_dims, cout, act)?;
                        vals[op.output] = Some(Val::H(out));
                    }
                    ConvKind::Head => {
                        let out = if is_out { self.take_output(usize::from(op.output == self.graph.offsets), n * ovol * cout * 4)? } else { self.take(n * ovol * cout * 4)? };
                        ops::head_conv(&gpu, x, w, bias, out.ptr, n, ovol, cin, cout, act)?;
                        vals[op.output] = Some(Val::F(out));
                    }
                    ConvKind::General if tc && !is_out => {
                        // The fused residual Add: out = conv + other, in the other's buffer when
                        // the Add is its last reader and the conv does not read it.
                        let (out_v, residual, out) = if fuse_add {
                            let (add_inputs, add_out) = (self.graph.ops[i + 1].inputs.clone(), self.graph.ops[i + 1].output);
                            let other = if add_inputs[0] == op.output { add_inputs[1] } else { add_inputs[0] };
                            let rp = Self::h(vals, other)?;
                            let own = if rp != x { self.take_in_place(vals, other, i + 1) } else { None };
                            let out = match own {
                                Some(b) => b,
                                None => self.take(n * ovol * cout * 2)?,
                            };
                            (add_out, Some(rp), out)
                        } else {
                            (op.output, None, self.take(n * ovol * cout * 2)?)
                        };
                        let sb = match ops::conv_tc_stats_bytes(n, ovol, cout).filter(|_| stats) {
                            Some(bytes) => Some(self.take(bytes)?),
                            None => None,
                        };
                        let r = self.conv_tc(x, w, bias, residual, prologue, out.ptr, sb.as_ref().map(|b| b.ptr), shape, act);
                        vals[out_v] = Some(Val::H(out));
                        self.tile_stats[out_v] = sb;
                        r?;
                        return Ok(if fuse_add { 2 } else { 1 });
                    }
                    ConvKind::General => {
                        let out = self.take(n * ovol * cout * 2)?;
                        let mut direct = !use_dnn && !tc;
                        if tc {
                            // A head conv the head kernel cannot take.
                            self.conv_tc(x, w, bias, None, prologue, out.ptr, None, shape, act)?;
                        }
                        if use_dnn {
                            match self.run_dnn(i, tile, shape, x, w, out.ptr) {
                                Ok(()) => {
                                    if bias.is_some() || act != Act::None {
                                        ops::bias_act(&gpu, out.ptr, out.ptr, bias, n * ovol * cout, cout, act)?;
                                    }
                                }
                                // In a capture the failure may be the capture's own: the eager
                                // rerun decides about the fallback. A full device is not cuDNN's
                                // failure: the runner halves the batch; at one tile, which cannot
                                // be halved, our kernel (it needs no workspace) takes this call only.
                                Err(e) if self.backend == ConvBackend::Auto && !gpu.capturing() => {
                                    let full = e.downcast_ref::<crate::pipeline::runner::OutOfMemory>().is_some();
                                    if full && shape.n > 1 {
                                        return Err(e);
                                    }
                                    let name = &self.graph.values[op.output].name;
                                    if full {
                                        let msg = format!("{name}: no room for cuDNN's workspace; conv3d_igemm_f16 when it does not fit");
                                        if !self.notes.contains(&msg) {
                                            crate::errln!("warning: {msg} ({e:#})");
                                            self.notes.push(msg);
                                        }
                                    } else {
                                        let msg = format!("{name}: cuDNN failed ({e:#}); using conv3d_igemm_f16 for it");
                                        crate::errln!("warning: {msg}");
                                        self.notes.push(msg);
                                        if let Step::Conv(c) = &mut self.steps[i] {
                                            c.use_dnn = false;
                                        }
                                    }
                                    direct = true;
                                }
                                Err(e) => return Err(e),
                            }
                        }
                        if direct {
                            ops::conv_direct(&gpu, x, w, bias, out.ptr, shape, act)?;
                        }
                        if is_out {
                            // A head conv the head kernel cannot take: fp16 result -> NCDHW f32.
                            let f = self.take_output(usize::from(op.output == self.graph.offsets), n * ovol * cout * 4)?;
                            ops::head_act(&gpu, out.ptr, f.ptr, n, ovol, cout, Act::None)?;
                            self.give(out);
                            vals[op.output] = Some(Val::F(f));
                        } else {
                            vals[op.output] = Some(Val::H(out));
                        }
                    }
                }
                Ok(1)
            }
            StepInfo::ConvT { w, cin, cout, into_concat } => {
                let x = Self::h(vals, op.inputs[0])?;
                let ovol = vol(out_dims);
                match into_concat {
                    Some(j) => {
                        let cat = self.graph.ops[j].output;
                        let ctot = self.graph.values[cat].channels;
                        let buf = self.take(n * ovol * ctot * 2)?;
                        ops::conv_transpose2(&gpu, self.convt, x, w, buf.ptr, n, in_dims, cin, cout, ctot, 0)?;
                        vals[cat] = Some(Val::H(buf));
                        vals[op.output] = Some(Val::InConcat);
                    }
                    None => {
                        let buf = self.take(n * ovol * cout * 2)?;
                        ops::conv_transpose2(&gpu, self.convt, x, w, buf.ptr, n, in_dims, cin, cout, cout, 0)?;
                        vals[op.output] = Some(Val::H(buf));
                    }
                }
                Ok(1)
            }
            StepInfo::Concat => {
                let (a, b) = (op.inputs[0], op.inputs[1]);
                let ca = self.graph.values[a].channels;
                let cb = self.graph.values[b].channels;
                let rows = n * vol(out_dims);
                let bp = Self::h(vals, b)?;
                if matches!(vals[a], Some(Val::InConcat)) {
                    let dst = Self::h(vals, op.output)?;
                    ops::copy_channels(&gpu, bp, dst, rows, cb, c_out, ca)?;
                } else {
                    let ap = Self::h(vals, a)?;
                    let buf = self.take(rows * c_out * 2)?;
                    ops::copy_channels(&gpu, ap, buf.ptr, rows, ca, c_out, 0)?;
                    ops::copy_channels(&gpu, bp, buf.ptr, rows, cb, c_out, ca)?;
                    vals[op.output] = Some(Val::H(buf));
                }
                Ok(1)
            }
            StepInfo::Norm { groups, gamma, beta, act, deferred } => {
                let v = vol(in_dims);
                let x = Self::h(vals, op.inputs[0])?;
                let params = self.take(n * c_in * 3 * 4)?;
                if let Err(e) = self.norm_params(op.inputs[0], x, n, c_in, v, groups, gamma, beta, act, params.ptr) {
                    self.give(params);
                    return Err(e);
                }
                let owned = self.take_in_place(vals, op.inputs[0], i);
                if deferred {
                    vals[op.output] = Some(Val::Pending { x, owned, params, post: act });
                    return Ok(1);
                }
                debug_assert!(op_in_place(&op.kind));
                let out = match owned {
                    Some(b) => b,
                    None => self.take(n * v * c_in * 2)?,
                };
                let r = ops::norm_apply(&gpu, x, out.ptr, n, c_in, v, params.ptr, Act::None, act);
                self.give(params);
                vals[op.output] = Some(Val::H(out));
                r?;
                Ok(1)
            }
            StepInfo::Add => {
                let (a, b) = (op.inputs[0], op.inputs[1]);
                let ap = Self::h(vals, a)?;
                let bp = Self::h(vals, b)?;
                let elems = n * vol(out_dims) * c_out;
                let out = match self.take_in_place(vals, a, i) {
                    Some(buf) => buf,
                    None => match if a != b { self.take_in_place(vals, b, i) } else { None } {
                        Some(buf) => buf,
                        None => self.take(elems * 2)?,
                    },
                };
                ops::add_act(&gpu, ap, bp, out.ptr, elems, Act::None)?;
                vals[op.output] = Some(Val::H(out));
                Ok(1)
            }
            StepInfo::Upsample { fuse_add } => {
                let x = Self::h(vals, op.inputs[0])?;
                let ovol = vol(out_dims);
                if fuse_add {
                    let add = self.graph.ops[i + 1].clone();
                    let skip = if add.inputs[0] == op.output { add.inputs[1] } else { add.inputs[0] };
                    let sp = Self::h(vals, skip)?;
                    let out = match self.take_in_place(vals, skip, i + 1) {
                        Some(b) => b,
                        None => self.take(n * ovol * c_out * 2)?,
                    };
                    ops::upsample_add(&gpu, x, Some(sp), out.ptr, n, in_dims, c_out)?;
                    vals[add.output] = Some(Val::H(out));
                    Ok(2)
                } else {
                    let out = self.take(n * ovol * c_out * 2)?;
                    ops::upsample_add(&gpu, x, None, out.ptr, n, in_dims, c_out)?;
                    vals[op.output] = Some(Val::H(out));
                    Ok(1)
                }
            }
        }
    }

    /// A norm's `[n][c][3]` parameters for value `xv` (at `x`) into `params`: from the statistics
    /// the producing conv wrote when there are some, else from a pass over `x`.
    #[allow(clippy::too_many_arguments)]
    fn norm_params(&mut self, xv: ValueId, x: u64, n: usize, c: usize, v: usize, groups: usize, gamma: Option<u64>, beta: Option<u64>, post: Act, params: u64) -> Result<()> {
        if let Some(tiles) = self.tile_stats.get_mut(xv).and_then(Option::take) {
            let r = ops::norm_params_from_tiles(&self.gpu, tiles.ptr, n, c, v, groups, gamma, beta, params);
            self.give(tiles);
            return r;
        }
        let (pb, _) = ops::norm_scratch_bytes(n, c, v);
        let partial = self.take(pb)?;
        let r = ops::norm(&self.gpu, x, None, n, c, v, groups, gamma, beta, Act::None, post, partial.ptr, params);
        self.give(partial);
        r
    }

    /// The tensor-core conv of `shape`, with its split-K buffer taken from the arena for the call.
    #[allow(clippy::too_many_arguments)]
    fn conv_tc(&mut self, x: u64, w: u64, bias: Option<u64>, residual: Option<u64>, prologue: Option<ops::NormPrologue>, out: u64, stats: Option<u64>, shape: ConvShape, act: Act) -> Result<()> {
        let v = self.tc.tiles.variant(shape.cout).with_async_loads(self.tc.async_loads).with_halo(self.tc.halo);
        let ws = match ops::conv_tc_splitk_bytes(&self.gpu, v, shape) {
            0 => None,
            bytes => Some(self.take(bytes)?),
        };
        let r = ops::conv_tc(&self.gpu, v, x, w, bias, residual, prologue, out, stats, ws.as_ref(), shape, act);
        if let Some(b) = ws {
            self.give(b);
        }
        r
    }

    /// A cuDNN convolution. On the graph API (`FASTDET_CUDNN_API=graph`), a convolution it cannot
    /// plan, or whose every engine fails eagerly (a full device aside), goes to the legacy API,
    /// with a warning and a note (`graph_api_fallbacks`).
    fn run_dnn(&mut self, i: usize, tile: [usize; 3], shape: ConvShape, x: u64, w: u64, y: u64) -> Result<()> {
        let dnn = self.dnn.as_ref().context("internal error: no cuDNN handle")?;
        let nops = self.graph.ops.len();
        let plans = self.plans.entry((shape.n, tile)).or_insert_with(|| (0..nops).map(|_| None).collect());
        let gpu = self.gpu.clone();
        // A graph-API failure goes to the legacy API, except for a full device (the runner
        // halves the batch) and inside a capture (the failure may be the capture's own).
        let falls_back = |e: &anyhow::Error| dnn.api == DnnApi::Graph && e.downcast_ref::<crate::pipeline::runner::OutOfMemory>().is_none() && !gpu.capturing();
        let (graph, fallbacks, notes) = (&self.graph, &mut self.graph_api_fallbacks, &mut self.notes);
        // Said once per op (a batch halved by the runner plans the op again); the legacy
        // planning's failure is the error, with the graph API's reason.
        let mut legacy_plan = |why: String| -> Result<ConvPlan> {
            let name = graph.values[graph.ops[i].output].name.clone();
            if !fallbacks.iter().any(|(n, _)| *n == name) {
                crate::errln!("warning: {name}: cuDNN's graph API failed ({why}); its legacy API runs this convolution");
                if fallbacks.is_empty() {
                    notes.push("cuDNN graph API: some convolutions fell back to the legacy API (see the warnings)".into());
                }
                fallbacks.push((name, why.clone()));
            }
            ConvPlan::new_api(dnn, shape, DnnApi::Legacy).with_context(|| format!("cuDNN's graph API failed first ({why})"))
        };
        if plans[i].is_none() {
            plans[i] = Some(match ConvPlan::new(dnn, shape) {
                Ok(p) => p,
                Err(e) if falls_back(&e) => legacy_plan(format!("{e:#}"))?,
                Err(e) => return Err(e),
            });
        }
        let plan = plans[i].as_mut().expect("plan just built");
        let mut workspace = gpu.dnn_workspace();
        match plan.run(dnn, &gpu, x, w, y, &mut workspace) {
            Err(e) if matches!(plan, ConvPlan::Graph(_)) && falls_back(&e) => {
                *plan = legacy_plan(format!("{e:#}"))?;
                plan.run(dnn, &gpu, x, w, y, &mut workspace)
            }
            r => r,
        }
    }

    /// Which convolutions cuDNN's graph API could not plan or run, so that its legacy API took
    /// them (`run_dnn`): "N convolution(s) fell back to cuDNN's legacy API; first OP: WHY", or
    /// None when none did. A graph-API walk that says so did not measure the graph API.
    pub fn graph_api_fallback_summary(&self) -> Option<String> {
        let (op, why) = self.graph_api_fallbacks.first()?;
        Some(format!("{} convolution(s) fell back to cuDNN's legacy API; first {op}: {why}", self.graph_api_fallbacks.len()))
    }
}

/// What the CUDA engine's buffers take on one device handle (one worker) for `models` run one
/// after the other on batches of `n` tiles from the host: computed by walking the models on an
/// emulator that allocates as a device would and runs no kernel (`Gpu::emulator_plan`), so the
/// figures are those of the allocator, at full size, without a GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// The activation arena, shared by the models.
    pub arena: usize,
    /// Per model: weights (as uploaded), outputs (scores and offsets, f32).
    pub weights: Vec<usize>,
    pub outputs: Vec<usize>,
    /// Held once every model has run three batches (eager, captured, replayed).
    pub held: usize,
    /// The most held at once (the first batch of each model allocates its walk piece by piece
    /// before the arena grows to fit it).
    pub peak: usize,
    /// With a tomogram: what `fastdet run` holds for it on the device while it blends there
    /// (the volume, the blend accumulators, one batch's tiles and ensemble sums); included in
    /// `held` and `peak`. Zero without one.
    pub tomogram: usize,
    /// With a tomogram: the next one's volume, copied to the device while this one is computed
    /// (`side_upload`; zero with `FASTDET_OVERLAP_UPLOAD=0`); included in `held` and `peak`.
    pub next_volume: usize,
}

/// The device memory of one worker running `models` on batches of `n` tiles of `tile`, and
/// with `tomogram` (a volume shape, `tile` the window) the buffers for blending it on the device.
pub fn memory_plan(models: &[&Weights], backend: ConvBackend, n: usize, tile: [usize; 3], tomogram: Option<[usize; 3]>) -> Result<MemoryPlan> {
    memory_plan_on(Gpu::emulator_plan()?, models, backend, n, tile, tomogram)
}

/// `memory_plan` on a given device handle (a fresh one: its byte counts are the plan's).
fn memory_plan_on(gpu: std::sync::Arc<Gpu>, models: &[&Weights], backend: ConvBackend, n: usize, tile: [usize; 3], tomogram: Option<[usize; 3]>) -> Result<MemoryPlan> {
    let mut engines = Vec::new();
    let mut weights = Vec::new();
    for w in models {
        let before = gpu.memory_live();
        engines.push(CudaEngine::on(gpu.clone(), w, backend)?);
        weights.push(gpu.memory_live() - before);
    }
    // As the runner does before a tomogram's first batch: the accumulators, the volume, the
    // batch's tiles and ensemble sums.
    let before = gpu.memory_live();
    let _held_for_the_tomogram = match (tomogram, models.first()) {
        (Some(shape), Some(w)) => {
            let sigma = crate::pipeline::runner::Settings::default().blend_sigma;
            let mut acc = super::TomogramAccumulator::new(gpu.clone(), w.spec.num_classes, shape, tile, w.spec.stride, sigma)?;
            let mut dv = super::DeviceVolume::new(gpu.clone(), &vec![0.0f32; vol(shape)], shape, tile)?;
            dv.extract(&vec![[0, 0, 0]; n], false)?;
            acc.begin_batch(n)?;
            Some((acc, dv))
        }
        _ => None,
    };
    let tomogram_bytes = gpu.memory_live() - before;
    // (Copied ahead only where the volume goes to the device whole: one-channel networks.)
    let ahead = super::side_upload::overlap_enabled() && models.iter().all(|w| w.spec.in_channels == 1);
    let next_volume = tomogram.filter(|_| ahead).map(|shape| gpu.alloc_side(None, 2 * vol(shape))).transpose()?;
    let next_volume_bytes = next_volume.as_ref().map_or(0, |b| b.bytes);
    let input = vec![0.5f32; n * vol(tile) * models.first().map_or(1, |w| w.spec.in_channels)];
    for _ in 0..3 {
        for e in engines.iter_mut() {
            let out = e.forward_device(&input, n, tile, false)?;
            e.recycle(out);
        }
    }
    let outputs = engines.iter().map(|e| e.outputs.pooled_bytes()).collect();
    let arena = gpu.arena().capacity();
    Ok(MemoryPlan { arena, weights, outputs, held: gpu.memory_live(), peak: gpu.memory_peak(), tomogram: tomogram_bytes, next_volume: next_volume_bytes })
}

impl TileEngine for CudaEngine {
    fn forward(&mut self, input: &[f32], n: usize, tile: [usize; 3], want_fm2: bool) -> Result<Outputs> {
        let name = self.name();
        guard(&name.clone(), || self.forward_inner(input, n, tile, want_fm2)).with_context(|| format!("{name}: forward pass"))
    }

    fn name(&self) -> String {
        let device = if self.gpu.is_emulator() { "emu" } else { "cuda" };
        format!("{device}:{}:{}", self.gpu.info.ordinal, self.name)
    }

    fn device_memory_peak(&self) -> Option<usize> {
        Some(self.gpu.memory_peak())
    }

    fn as_cuda(&mut self) -> Option<&mut CudaEngine> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ktrsc_moves_input_channels_last() {
        let (cout, cin, k) = (2, 3, 3);
        let w: Vec<f16> = (0..cout * cin * 27).map(|i| f16::from_f32(i as f32)).collect();
        let t = to_ktrsc(&w, cout, cin, k);
        for co in 0..cout {
            for ci in 0..cin {
                for tap in 0..27 {
                    assert_eq!(t[(co * 27 + tap) * cin + ci], w[(co * cin + ci) * 27 + tap]);
                }
            }
        }
    }

    fn compare(name: &str, got: &[f32], want: &[f32], tol_rel: f64) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let (mut d2, mut r2, mut mx) = (0.0f64, 0.0f64, 0.0f64);
        for (g, w) in got.iter().zip(want) {
            let d = (*g as f64 - *w as f64).abs();
            assert!(d.is_finite(), "{name}: non-finite");
            d2 += d * d;
            r2 += (*w as f64) * (*w as f64);
            mx = mx.max(d);
        }
        let rel = (d2 / r2.max(1e-30)).sqrt();
        crate::errln!("{name}: max |d| {mx:.3e}, rel {rel:.3e}");
        assert!(rel < tol_rel, "{name}: rel {rel}");
    }

    /// The whole engine (graph walk, buffer pool, in-place ops, fusions, weight layouts, launch
    /// arguments) on the kernel emulator against the CPU engine, both architectures, batch 2.
    #[test]
    fn engine_on_emulator_matches_cpu_engine() {
        engine_matches_cpu_engine(Gpu::emulator().unwrap(), ConvBackend::Direct, TcPolicy::default(), [16, 24, 32], false);
    }

    /// The tensor-core backend, every norm read by a conv applied in its loads, on the emulator.
    #[test]
    fn tensor_core_engine_with_fused_norms_matches_cpu_engine() {
        engine_matches_cpu_engine(Gpu::emulator().unwrap(), ConvBackend::TensorCore, TcPolicy { norm_in_loads: NormInLoads::All, ..TcPolicy::default() }, [16, 24, 32], false);
    }

    /// The wide tiles (SegResNet's 64-channel level takes the 128 x 64 tile), with every fusion.
    #[test]
    fn tensor_core_engine_with_wide_tiles_matches_cpu_engine() {
        engine_matches_cpu_engine(Gpu::emulator().unwrap(), ConvBackend::TensorCore, TcPolicy { norm_in_loads: NormInLoads::All, tiles: TcTiles::Wide, async_loads: false, halo: false }, [16, 24, 32], false);
    }

    /// The tensor-core backend's default, norms in the loads of 1x1x1 convs only (DynUNet's
    /// deep-supervision head; every other norm has its pass, on statistics from the conv's
    /// store), and with no norm in any load, there with the cp.async kernels.
    #[test]
    fn tensor_core_engine_with_norm_passes_matches_cpu_engine() {
        for (norm_in_loads, async_loads) in [(NormInLoads::Pointwise, false), (NormInLoads::Never, true)] {
            engine_matches_cpu_engine(Gpu::emulator().unwrap(), ConvBackend::TensorCore, TcPolicy { norm_in_loads, tiles: TcTiles::Standard, async_loads, halo: false }, [16, 24, 32], true);
        }
    }

    /// The same with the kernels' own source compiled for the host (conv_tc.cu's WMMA code, the
    /// fused prologue of DynUNet's 1x1x1 head conv, the statistics-only norm path; a small
    /// tile), on the wide tiles with cp.async loads: the 128 x 64 kernel on SegResNet's
    /// 64-channel level, whose 8 voxels leave its second store pass empty, and the 128 x 32 one
    /// elsewhere (the 64 x 64 kernel and every norm in the loads have the self-test's rows and
    /// its host-kernel network test).
    #[test]
    fn tensor_core_engine_on_host_kernels_matches_cpu_engine() {
        if !super::super::host_kernels::available_for_tests() {
            return;
        }
        engine_matches_cpu_engine(Gpu::emulator_host_kernels().unwrap(), ConvBackend::TensorCore, TcPolicy { norm_in_loads: NormInLoads::Pointwise, tiles: TcTiles::Wide, async_loads: true, halo: false }, [16, 16, 16], true);
    }

    /// The halo tiles with every norm in the loads: the 3x3x3 convs of the levels whole bricks
    /// tile (16 channels and more) run on conv3d_tc_halo, the others on the implicit GEMM.
    #[test]
    fn tensor_core_engine_with_halo_tiles_matches_cpu_engine() {
        let gpu = Gpu::emulator().unwrap();
        engine_matches_cpu_engine(gpu.clone(), ConvBackend::TensorCore, TcPolicy { norm_in_loads: NormInLoads::All, halo: true, ..TcPolicy::default() }, [16, 32, 32], false);
        let emu = gpu.emu().unwrap();
        let halo: Vec<usize> = ops::HALO_KERNELS.iter().map(|k| emu.launches(k)).collect();
        // The 16-channel level (8x16x16) of both networks fits; the 8-channel one (Cin % 16)
        // and the 4x8x8 one (8 voxels in x) do not. No conv here has more than 32 output
        // channels where bricks fit, so the 64-voxel unit is left to the self-test's halo rows.
        assert!(halo[0] > 0 && halo[1] == 0, "halo kernels launched: {halo:?}");
        assert!(emu.launches("conv3d_tc_n32_f16") > 0, "the convs the bricks do not fit run on the implicit GEMM");
    }

    /// `quick`: one tile, one pass (every thread of every launch runs on the host kernels).
    fn engine_matches_cpu_engine(gpu: std::sync::Arc<Gpu>, backend: ConvBackend, policy: TcPolicy, tile: [usize; 3], quick: bool) {
        use crate::model::spec::ModelSpec;
        for spec in [ModelSpec::segresnet(8, 16, 8), ModelSpec::dynunet(&[8, 16, 32, 32], 16, 16, 8)] {
            let w = Weights::random(&spec, 7);
            let n = if quick { 1 } else { 2 };
            let mut r = crate::util::SplitMix64::new(3);
            let mut x = vec![0.0f32; n * tile.iter().product::<usize>()];
            r.fill_uniform(&mut x, 0.0, 1.0);
            // Both engines see the same fp16-representable input.
            x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32());
            let mut cpu = crate::engine::cpu::CpuEngine::new(&w).unwrap();
            let want = cpu.forward(&x, n, tile, true).unwrap();
            let mut e = CudaEngine::on_with(gpu.clone(), &w, backend, policy).unwrap();
            if backend == ConvBackend::TensorCore {
                // All: SegResNet's every norm feeds one conv; DynUNet's all but the ones before
                // a residual add or the decoder's concat. Pointwise: only norms read by a 1x1x1
                // tensor-core conv: one in DynUNet, none in SegResNet.
                let (fused, stats, adds) = CudaEngine::fusion_counts(&e.steps);
                let norms = e.steps.iter().filter(|s| matches!(s, Step::Norm { .. })).count();
                crate::errln!("{}: {fused} of {norms} norms fused, {stats} convs writing statistics, {adds} adds fused", spec.arch.name());
                match policy.norm_in_loads {
                    NormInLoads::All => assert!(fused > 0 && fused <= norms),
                    // DynUNet's deep-supervision head (backbone.deep_supervision_heads.0): norm -> 1x1x1 conv.
                    NormInLoads::Pointwise => assert_eq!(fused, usize::from(spec.arch == crate::model::spec::Arch::Dynunet)),
                    NormInLoads::Never => assert_eq!(fused, 0),
                }
                // A deferred norm's one reader is a tensor-core conv the policy takes.
                for (i, s) in e.steps.iter().enumerate() {
                    if let Step::Norm { deferred: true, .. } = s {
                        let out = e.graph.ops[i].output;
                        let j = (i + 1..e.graph.ops.len()).find(|&j| e.graph.ops[j].inputs.contains(&out)).unwrap();
                        assert!(matches!(&e.steps[j], Step::Conv(c) if c.tc && policy.norm_in_loads.applies_to(c.k)));
                    }
                }
                // Every norm of these networks reads a conv's (or conv + residual's) output,
                // except SegResNet's decoder norms after the upsample + skip add.
                assert!(stats > 0 && stats <= norms);
                // SegResNet's blocks end conv -> + identity; DynUNet's end norm -> + residual.
                assert_eq!(adds > 0, spec.arch == crate::model::spec::Arch::Segresnetv2, "{adds} adds fused");
                assert!(e.notes().iter().any(|n| n.contains(&format!("{fused} norm(s) applied in the next conv's loads"))), "{:?}", e.notes());
            }
            for round in 0..if quick { 1 } else { 2 } {
                let got = e.forward(&x, n, tile, true).unwrap();
                let a = spec.arch.name();
                compare(&format!("{a} scores (round {round})"), &got.scores, &want.scores, 2e-2);
                compare(&format!("{a} offsets (round {round})"), &got.offsets, &want.offsets, 2e-2);
                compare(&format!("{a} fm2 (round {round})"), got.fm2.as_ref().unwrap(), want.fm2.as_ref().unwrap(), 2e-2);
            }
            if quick {
                continue;
            }
            // The second round reused pooled buffers and must give identical results.
            let a = e.forward(&x, n, tile, false).unwrap();
            let b = e.forward(&x, n, tile, false).unwrap();
            assert_eq!(a.scores, b.scores);
            assert!(a.fm2.is_none());
        }
    }

    /// DynUNet's transposed convs (32->32 and 32->16 here, both fitting the tensor cores; the
    /// full-resolution one is pruned: the stride-2 head does not read it) run on
    /// the tensor-core kernel by default and on the FMA kernel when asked; both walks give the
    /// CPU engine's maps.
    #[test]
    fn transposed_convs_run_on_the_kernel_asked_for() {
        let spec = crate::model::spec::ModelSpec::dynunet(&[8, 16, 32, 32], 16, 16, 8);
        let w = Weights::random(&spec, 7);
        let tile = [16, 32, 32];
        let mut x = random_input(1, tile, 3);
        x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32());
        let want = crate::engine::cpu::CpuEngine::new(&w).unwrap().forward(&x, 1, tile, true).unwrap();
        let gpu = Gpu::emulator().unwrap();
        let emu = gpu.emu().unwrap();
        let mut e = CudaEngine::on_with(gpu.clone(), &w, ConvBackend::Direct, TcPolicy::default()).unwrap();
        assert_eq!(e.convt, ops::ConvtKernel::from_env().unwrap());
        assert!(e.notes().iter().any(|n| n.contains("transposed convolutions on the")), "{:?}", e.notes());
        for kernel in [ops::ConvtKernel::TensorCore, ops::ConvtKernel::Fma] {
            e.set_convt_kernel(kernel);
            let before = [emu.launches("conv_transpose2_tc_f16"), emu.launches("conv_transpose2_f16")];
            let got = e.forward(&x, 1, tile, true).unwrap();
            let ran = [emu.launches("conv_transpose2_tc_f16") - before[0], emu.launches("conv_transpose2_f16") - before[1]];
            let expect = if kernel == ops::ConvtKernel::TensorCore { [2, 0] } else { [0, 2] };
            assert_eq!(ran, expect, "{kernel:?}: launches of (tc, fma)");
            compare(&format!("{kernel:?} scores"), &got.scores, &want.scores, 2e-2);
            compare(&format!("{kernel:?} offsets"), &got.offsets, &want.offsets, 2e-2);
            compare(&format!("{kernel:?} fm2"), got.fm2.as_ref().unwrap(), want.fm2.as_ref().unwrap(), 2e-2);
        }
    }

    /// The tensor-core transposed conv takes Cin % 16 == 0, Cout % 8 == 0 and 16-byte-aligned
    /// input and weights; anything else, or the FMA kernel asked for, runs on the FMA kernel.
    #[test]
    fn transposed_convs_fall_back_to_the_fma_kernel_where_the_tensor_cores_do_not_fit() {
        use ops::ConvtKernel::{Fma, TensorCore};
        assert_eq!(TensorCore.for_shape(320, 256, 256, 512), TensorCore);
        assert_eq!(TensorCore.for_shape(16, 8, 0, 0), TensorCore);
        assert_eq!(TensorCore.for_shape(8, 8, 0, 0), Fma, "Cin % 16");
        assert_eq!(TensorCore.for_shape(32, 12, 0, 0), Fma, "Cout % 8");
        assert_eq!(TensorCore.for_shape(32, 16, 8, 0), Fma, "x misaligned");
        assert_eq!(TensorCore.for_shape(32, 16, 0, 24), Fma, "w misaligned");
        assert_eq!(Fma.for_shape(320, 256, 0, 0), Fma);
    }

    fn random_input(n: usize, tile: [usize; 3], seed: u64) -> Vec<f32> {
        let mut r = crate::util::SplitMix64::new(seed);
        let mut x = vec![0.0f32; n * tile.iter().product::<usize>()];
        r.fill_uniform(&mut x, 0.0, 1.0);
        x
    }

    /// CUDA graphs (on the emulator, the recorded operations, slot bookkeeping included): the
    /// first walk of a shape runs eagerly, the second is captured and run, later ones replay. On
    /// fresh inputs every call gives, bit for bit, what an engine without graphs gives, from the
    /// host and from a device input alike.
    #[test]
    fn graph_replays_match_eager_walks_on_fresh_inputs() {
        use crate::model::spec::ModelSpec;
        let (n, tile) = (1, [8, 16, 16]);
        for (spec, backend) in [(ModelSpec::segresnet(8, 16, 8), ConvBackend::Auto), (ModelSpec::dynunet(&[8, 16, 32], 16, 16, 8), ConvBackend::TensorCore)] {
            let w = Weights::random(&spec, 11);
            let gpu = Gpu::emulator().unwrap();
            let mut e = CudaEngine::on(gpu.clone(), &w, backend).unwrap();
            let mut plain = CudaEngine::on(Gpu::emulator().unwrap(), &w, backend).unwrap();
            plain.graphs_on = false;
            let a = spec.arch.name();
            for k in 0..4 {
                let x = random_input(n, tile, 40 + k as u64);
                let got = e.forward(&x, n, tile, true).unwrap();
                let want = plain.forward(&x, n, tile, true).unwrap();
                assert!(got.scores == want.scores && got.offsets == want.offsets && got.fm2 == want.fm2, "{a}: call {k}");
                assert_eq!(e.graph_counts(), (usize::from(k > 0), k, 1), "{a}: call {k}");
            }
            assert!(plain.graphs.values().all(|g| matches!(g.state, GraphState::Walked)));
            // From a device input: another shape, the same sequence.
            let x16 = gpu.alloc(n * vol(tile) * 2).unwrap();
            for k in 0..3 {
                let x = random_input(n, tile, 50 + k as u64);
                let x32 = gpu.upload(&x).unwrap();
                ops::to_ndhwc_f16(&gpu, x32.ptr, x16.ptr, n, 1, vol(tile)).unwrap();
                let out = e.forward_device_input(&x16, n, tile, false).unwrap();
                let want = plain.forward(&x, n, tile, false).unwrap();
                assert_eq!(gpu.read::<f32>(out.scores.ptr, out.scores_len()).unwrap(), want.scores, "{a}: device input, call {k}");
                assert_eq!(gpu.read::<f32>(out.offsets.ptr, out.offsets_len()).unwrap(), want.offsets, "{a}: device input, call {k}");
                e.recycle(out);
            }
            assert_eq!(e.graph_counts(), (2, 3 + 2, 2), "{a}");
        }
    }

    /// A small SegResNet (random weights `seed`) on an emulator with graphs, and the same model
    /// on another emulator without.
    fn engine_with_graphs_and_one_without(seed: u64) -> (std::sync::Arc<Gpu>, CudaEngine, CudaEngine) {
        let w = Weights::random(&crate::model::spec::ModelSpec::segresnet(8, 16, 8), seed);
        let gpu = Gpu::emulator().unwrap();
        let e = CudaEngine::on(gpu.clone(), &w, ConvBackend::Auto).unwrap();
        let mut plain = CudaEngine::on(Gpu::emulator().unwrap(), &w, ConvBackend::Auto).unwrap();
        plain.set_graphs(false);
        (gpu, e, plain)
    }

    /// A call made while the caller still holds the outputs a graph writes runs eagerly (into
    /// other buffers); once they are back, the graph is replayed again. A graph captured before
    /// the arena grew is not replayed: it is captured again.
    #[test]
    fn held_outputs_and_a_grown_arena_make_a_walk_eager() {
        let (n, tile) = (1, [8, 16, 16]);
        let (gpu, mut e, mut plain) = engine_with_graphs_and_one_without(12);
        let xs: Vec<Vec<f32>> = (0..6).map(|k| random_input(n, tile, 60 + k)).collect();
        let check = |e: &CudaEngine, out: &DeviceOutputs, x: &[f32], plain: &mut CudaEngine| {
            let want = plain.forward(x, n, tile, false).unwrap();
            assert_eq!(e.gpu.read::<f32>(out.scores.ptr, out.scores_len()).unwrap(), want.scores);
        };
        for x in &xs[..2] {
            let out = e.forward_device(x, n, tile, false).unwrap();
            e.recycle(out);
        }
        assert_eq!(e.graph_counts(), (1, 1, 1));
        let held = e.forward_device(&xs[2], n, tile, false).unwrap();
        let other = e.forward_device(&xs[3], n, tile, false).unwrap();
        assert_eq!(e.graph_counts(), (1, 2, 2), "the second call ran eagerly");
        assert_ne!(held.scores.ptr, other.scores.ptr);
        check(&e, &held, &xs[2], &mut plain);
        check(&e, &other, &xs[3], &mut plain);
        e.recycle(held);
        e.recycle(other);
        let out = e.forward_device(&xs[4], n, tile, false).unwrap();
        check(&e, &out, &xs[4], &mut plain);
        e.recycle(out);
        assert_eq!(e.graph_counts(), (1, 3, 2));
        // A larger batch grows the arena: the old graph is stale and is captured again (the
        // arena is large enough for it), then replayed.
        let gen = gpu.arena().generation();
        let big = random_input(3, tile, 70);
        e.forward(&big, 3, tile, false).unwrap();
        assert_ne!(gpu.arena().generation(), gen);
        let Some(GraphEntry { state: GraphState::Ready { graph, .. }, .. }) = e.graphs.get(&WalkKey { n, tile, fm2: false, host_input: true, staged: true }) else { panic!("no graph") };
        let old_nodes = graph.nodes;
        for (k, x) in xs.iter().enumerate().take(3) {
            let out = e.forward_device(x, n, tile, false).unwrap();
            check(&e, &out, x, &mut plain);
            e.recycle(out);
            assert_eq!(e.graph_counts(), (1, 4 + k, 3), "call {k} after the growth");
        }
        let Some(GraphEntry { state: GraphState::Ready { graph, generation, .. }, .. }) = e.graphs.get(&WalkKey { n, tile, fm2: false, host_input: true, staged: true }) else { panic!("no graph") };
        assert_eq!((graph.nodes, *generation), (old_nodes, gpu.arena().generation()));
    }

    /// A capture that cannot be made (here: every kernel synchronised) is reported once and the
    /// shape runs eagerly from then on, with the same results.
    #[test]
    fn a_failed_capture_is_noted_and_the_walk_runs_eagerly() {
        let (n, tile) = (1, [8, 16, 16]);
        let (gpu, mut e, mut plain) = engine_with_graphs_and_one_without(13);
        gpu.set_sync_each(true);
        for k in 0..3 {
            let x = random_input(n, tile, 80 + k);
            assert_eq!(e.forward(&x, n, tile, false).unwrap().scores, plain.forward(&x, n, tile, false).unwrap().scores);
        }
        assert_eq!(e.graph_counts(), (0, 0, 3));
        let notes: Vec<String> = e.notes().into_iter().filter(|n| n.contains("no CUDA graph")).collect();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("FASTDET_CUDA_SYNC"), "{notes:?}");
    }

    /// A walk that unwinds (a panic, which `guard` turns into an error) ends its arena walk and
    /// any capture it had open: the handle keeps working.
    #[test]
    fn an_unwinding_walk_leaves_the_handle_usable() {
        use crate::model::spec::ModelSpec;
        let gpu = Gpu::emulator().unwrap();
        gpu.arena().begin(&gpu).unwrap();
        gpu.begin_capture().unwrap();
        drop(WalkGuard(Some(gpu.clone())));
        assert!(!gpu.capturing());
        let w = Weights::random(&ModelSpec::segresnet(8, 16, 8), 2);
        let mut e = CudaEngine::on(gpu.clone(), &w, ConvBackend::Auto).unwrap();
        let x = random_input(1, [8, 16, 16], 3);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _g = WalkGuard(Some(gpu.clone()));
            gpu.arena().begin(&gpu).unwrap();
            panic!("in the middle of a walk");
        }));
        assert!(r.is_err());
        for _ in 0..3 {
            e.forward(&x, 1, [8, 16, 16], false).unwrap();
        }
        assert_eq!(e.graph_counts(), (1, 2, 1));
    }

    /// The engines on one device handle share its arena: a second model adds its weights and
    /// outputs, not a second set of activations.
    #[test]
    fn engines_on_one_device_share_the_activation_arena() {
        use crate::model::spec::ModelSpec;
        let (n, tile) = (1, [8, 16, 16]);
        let specs = [ModelSpec::segresnet(8, 16, 8), ModelSpec::dynunet(&[8, 16, 32], 16, 16, 8)];
        let x = random_input(n, tile, 90);
        let alone: Vec<usize> = specs
            .iter()
            .map(|s| {
                let gpu = Gpu::emulator().unwrap();
                let mut e = CudaEngine::on(gpu.clone(), &Weights::random(s, 1), ConvBackend::Auto).unwrap();
                e.forward(&x, n, tile, false).unwrap();
                let cap = gpu.arena().capacity();
                cap
            })
            .collect();
        let gpu = Gpu::emulator().unwrap();
        let mut engines: Vec<CudaEngine> = specs.iter().map(|s| CudaEngine::on(gpu.clone(), &Weights::random(s, 1), ConvBackend::Auto).unwrap()).collect();
        for _ in 0..3 {
            for e in engines.iter_mut() {
                e.forward(&x, n, tile, false).unwrap();
            }
        }
        assert_eq!(gpu.arena().capacity(), alone[0].max(alone[1]), "{alone:?}");
        assert!(alone.iter().all(|&a| a > 0));
        // Both captured graphs replay on the one arena.
        for e in &engines {
            assert_eq!(e.graph_counts(), (1, 2, 1));
        }
    }

    /// The memory plan (no kernel run) is what an emulator running the kernels allocates: the
    /// same arena, weights and outputs; the models share one arena.
    #[test]
    fn memory_plan_is_what_the_kernels_allocate() {
        use crate::model::spec::ModelSpec;
        let (n, tile) = (2, [16, 16, 32]);
        let ws = [Weights::random(&ModelSpec::segresnet(8, 16, 8), 3), Weights::random(&ModelSpec::dynunet(&[8, 16, 32], 16, 16, 8), 4)];
        let refs: Vec<&Weights> = ws.iter().collect();
        let plan = memory_plan(&refs, ConvBackend::TensorCore, n, tile, None).unwrap();
        let gpu = Gpu::emulator().unwrap();
        let run = memory_plan_on(gpu.clone(), &refs, ConvBackend::TensorCore, n, tile, None).unwrap();
        assert_eq!(plan, run);
        // (`held` is read inside, while the engines live; the arena and the peak outlive them.)
        assert_eq!((run.arena, run.peak), (gpu.arena().capacity(), gpu.memory_peak()));
        let weights: Vec<usize> = ws.iter().map(|w| w.param_count() * 2).collect();
        assert!(plan.weights.iter().zip(&weights).all(|(&got, &fp16)| got >= fp16), "{:?} {weights:?}", plan.weights);
        let out_bytes = |c: usize| n * c * 8 * 8 * 16 * 4;
        assert_eq!(plan.outputs, vec![out_bytes(ws[0].spec.num_classes) + out_bytes(3), out_bytes(ws[1].spec.num_classes) + out_bytes(3)]);
        assert_eq!(plan.held, plan.arena + plan.weights.iter().sum::<usize>() + plan.outputs.iter().sum::<usize>());
        assert!(plan.peak >= plan.held && plan.tomogram == 0 && plan.next_volume == 0);

        // With a tomogram blended on the device: its volume (fp16), the accumulators (classes +
        // 3 offsets + the weight sum, f32, at the stride-2 grid), the tile weights, and for the
        // batch the tiles (f16), their origins and the ensemble sums, on top of the same rest.
        let shape = [20, 40, 70];
        let with = memory_plan(&refs, ConvBackend::TensorCore, n, tile, Some(shape)).unwrap();
        let (nc, grid, out_tile) = (ws[0].spec.num_classes, 10 * 20 * 35, 8 * 8 * 16);
        let accumulators = (nc + 3 + 1) * grid * 4 + out_tile * 4;
        let batch = n * vol(tile) * 2 + n * 3 * 4 + n * (nc + 3) * out_tile * 4 + n * 3 * 4;
        assert_eq!(with.tomogram, 20 * 40 * 70 * 2 + accumulators + batch, "{with:?}");
        // And the next tomogram's volume (fp16), copied ahead while this one is computed.
        assert_eq!(with.next_volume, 20 * 40 * 70 * 2, "{with:?}");
        assert_eq!(with.held, plan.held + with.tomogram + with.next_volume);
        // The f32 staging of the volume's upload (the whole small volume here) is gone after it.
        assert!(with.peak >= with.held - with.next_volume - batch + 20 * 40 * 70 * 4, "{with:?}");
    }

    /// `forward_device` leaves on the device exactly what `forward` returns, and its buffers go
    /// back to the pool.
    #[test]
    fn forward_device_is_forward_without_the_read_back() {
        use crate::model::spec::ModelSpec;
        let gpu = Gpu::emulator().unwrap();
        let spec = ModelSpec::dynunet(&[8, 16, 32], 16, 16, 8);
        let w = Weights::random(&spec, 5);
        let (n, tile) = (2, [8, 16, 24]);
        let mut r = crate::util::SplitMix64::new(8);
        let mut x = vec![0.0f32; n * tile.iter().product::<usize>()];
        r.fill_uniform(&mut x, 0.0, 1.0);
        let mut e = CudaEngine::on(gpu.clone(), &w, ConvBackend::Auto).unwrap();
        let want = e.forward(&x, n, tile, true).unwrap();
        let out = e.forward_device(&x, n, tile, true).unwrap();
        assert_eq!((out.n, out.num_classes, out.offset_channels, out.dims), (n, spec.num_classes, 3, [4, 8, 12]));
        assert_eq!(gpu.read::<f32>(out.scores.ptr, out.scores_len()).unwrap(), want.scores);
        assert_eq!(gpu.read::<f32>(out.offsets.ptr, out.offsets_len()).unwrap(), want.offsets);
        let fm2 = out.fm2.as_ref().unwrap();
        assert_eq!(gpu.read::<f32>(fm2.ptr, want.fm2.as_ref().unwrap().len()).unwrap(), *want.fm2.as_ref().unwrap());
        let live = gpu.memory_live();
        e.recycle(out);
        assert_eq!(gpu.memory_live(), live, "recycled, not freed");
        // The pool serves the next call: no new device memory.
        let peak = gpu.memory_peak();
        assert_eq!(e.forward(&x, n, tile, false).unwrap().scores, want.scores);
        assert_eq!(gpu.memory_peak(), peak);
        assert!(e.forward_device(&x, 0, tile, false).is_err());
        assert!(e.as_cuda().is_some());
    }

    /// Device memory accounting: the peak covers the weights and the activations of a forward
    /// pass, stays put on a repeat (pooled buffers), and everything is returned when the engine goes.
    /// One fp16 input on the device, in the engine's layout, read by two different networks: each
    /// gives `forward`'s outputs bit for bit, copies nothing from the host and leaves the input as it was.
    #[test]
    fn forward_device_input_shares_one_input_between_engines() {
        use crate::model::spec::ModelSpec;
        let gpu = Gpu::emulator().unwrap();
        let (n, tile) = (2, [8, 16, 16]);
        let mut r = crate::util::SplitMix64::new(21);
        let mut x = vec![0.0f32; n * tile.iter().product::<usize>()];
        r.fill_uniform(&mut x, 0.0, 1.0);
        let x32 = gpu.upload(&x).unwrap();
        let x16 = gpu.alloc(x.len() * 2).unwrap();
        ops::to_ndhwc_f16(&gpu, x32.ptr, x16.ptr, n, 1, vol(tile)).unwrap();
        let before = gpu.read::<u16>(x16.ptr, x.len()).unwrap();
        for (i, spec) in [ModelSpec::segresnet(8, 16, 8), ModelSpec::dynunet(&[8, 16, 32], 16, 16, 8)].iter().enumerate() {
            let mut e = CudaEngine::on(gpu.clone(), &Weights::random(spec, 30 + i as u64), ConvBackend::Auto).unwrap();
            assert_eq!(e.input_channels(), 1);
            let want = e.forward(&x, n, tile, true).unwrap();
            let sent = gpu.bytes_to_device();
            let out = e.forward_device_input(&x16, n, tile, true).unwrap();
            assert_eq!(gpu.bytes_to_device(), sent, "{}: the input was uploaded again", spec.arch.name());
            assert_eq!(gpu.read::<f32>(out.scores.ptr, out.scores_len()).unwrap(), want.scores);
            assert_eq!(gpu.read::<f32>(out.offsets.ptr, out.offsets_len()).unwrap(), want.offsets);
            let fm2 = out.fm2.as_ref().unwrap();
            assert_eq!(gpu.read::<f32>(fm2.ptr, want.fm2.as_ref().unwrap().len()).unwrap(), *want.fm2.as_ref().unwrap());
            e.recycle(out);
            assert_eq!(gpu.read::<u16>(x16.ptr, x.len()).unwrap(), before, "the shared input was written");
            // forward_device is the upload + conversion + this.
            let sent = gpu.bytes_to_device();
            let out = e.forward_device(&x, n, tile, false).unwrap();
            assert_eq!(gpu.bytes_to_device() - sent, (x.len() * 4) as u64);
            assert_eq!(gpu.read::<f32>(out.scores.ptr, out.scores_len()).unwrap(), want.scores);
            e.recycle(out);
            // Too small an input, and no tiles.
            assert!(e.forward_device_input(&x16, n + 1, tile, false).is_err());
            assert!(e.forward_device_input(&x16, 0, tile, false).is_err());
        }
    }

    #[test]
    fn graph_api_fallbacks_are_summed_up_with_the_first() {
        let gpu = Gpu::emulator().unwrap();
        let w = Weights::random(&crate::model::spec::ModelSpec::segresnet(8, 16, 8), 7);
        let mut e = CudaEngine::on(gpu, &w, ConvBackend::Auto).unwrap();
        assert_eq!(e.graph_api_fallback_summary(), None);
        e.graph_api_fallbacks.push(("conv1".into(), "no usable engine".into()));
        e.graph_api_fallbacks.push(("conv2".into(), "CUDNN_STATUS_NOT_SUPPORTED".into()));
        assert_eq!(e.graph_api_fallback_summary().unwrap(), "2 convolution(s) fell back to cuDNN's legacy API; first conv1: no usable engine");
    }

    #[test]
    fn device_memory_peak_counts_weights_and_activations() {
        use crate::model::spec::ModelSpec;
        let gpu = Gpu::emulator().unwrap();
        let spec = ModelSpec::segresnet(8, 16, 8);
        let w = Weights::random(&spec, 7);
        let tile = [16, 16, 16];
        let mut e = CudaEngine::on(gpu.clone(), &w, ConvBackend::Auto).unwrap();
        let weights_bytes = w.param_count() * 2;
        assert!(gpu.memory_live() >= weights_bytes, "{} < {weights_bytes}", gpu.memory_live());
        let x = vec![0.5f32; tile.iter().product()];
        e.forward(&x, 1, tile, false).unwrap();
        let peak = e.device_memory_peak().unwrap();
        // The input tile as fp16 and the first conv's output (8 channels) must have been live.
        assert!(peak >= weights_bytes + 2 * 16 * 16 * 16 * 9, "peak {peak}");
        e.forward(&x, 1, tile, false).unwrap();
        e.forward(&x, 1, tile, false).unwrap();
        assert_eq!(e.device_memory_peak().unwrap(), peak, "repeats reuse the arena and the outputs");
        drop(e);
        // The arena is the device handle's, for the next engine.
        let arena = gpu.arena().capacity();
        assert!(arena >= 2 * 16 * 16 * 16 * 9);
        assert_eq!(gpu.memory_live(), arena, "every other buffer freed with the engine");
        gpu.arena().release();
        assert_eq!(gpu.memory_live(), 0);
        assert!(crate::engine::cpu::CpuEngine::new(&w).unwrap().device_memory_peak().is_none());
    }

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        // Here (no GPU) this must return an error; on a GPU machine it may succeed.
        let w = Weights::random(&crate::model::spec::ModelSpec::segresnet(8, 16, 8), 1);
        match CudaEngine::new(&w, 0, Some(std::env::temp_dir().join("fastdet-test-kernels"))) {
            Ok(_) => {}
            Err(e) => assert!(!format!("{e:#}").is_empty()),
        }
        if !super::super::gpu::driver_available() {
            let e = CudaEngine::new(&w, 0, None).err().expect("no driver: error");
            assert!(format!("{e:#}").contains("no CUDA driver"), "{e:#}");
        }
    }
}
