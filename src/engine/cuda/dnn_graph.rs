//! The same NDHWC fp16 convolutions as `dnn.rs`, through cuDNN's graph (backend) API.
//!
//! Why a second way in: the legacy API reaches a fixed handful of algorithms (its
//! IMPLICIT_PRECOMP_GEMM ran the seed networks at 147-179 TFLOP/s on an H200, where PyTorch's
//! compiled networks ran faster), while the graph API lists every engine and knob setting cuDNN
//! has for a shape, which is how PyTorch calls cuDNN. A plan here is one convolution node:
//! tensors X (uid 1), W (uid 2), Y (uid 3), compute type f32, cross-correlation; its candidates
//! are the engine configurations of cuDNN's heuristics (mode A, then the fallback list), built
//! into execution plans, deterministic ones first, runtime-compiled engines and ones that reduce
//! in reduced precision left out (compile time at every cold start, unless
//! `FASTDET_CUDNN_RUNTIME_COMPILED=1`; fp16 sums). As in `dnn.rs` a
//! plan tries its candidates in order at its first run and keeps the first that executes; with
//! `find` it first times each on the real buffers (median of a few runs between timing events)
//! and tries them fastest first, the order kept per device and shape for the process.

use std::ffi::{c_char, c_void};

use anyhow::{anyhow, bail, Result};
use cudarc::cudnn::sys;
use sys::cudnnBackendAttributeName_t as Attr;
use sys::cudnnBackendAttributeType_t as Ty;
use sys::cudnnBackendDescriptorType_t as Kind;

use super::device_wide::device_wide;
use super::dnn::{candidates_to_try, first_that_runs, order_by_time, workspace_limit, Dnn};
use super::gpu::{guard, DevBuf, Gpu};
use super::ops::ConvShape;

const UID_X: i64 = 1;
const UID_W: i64 = 2;
const UID_Y: i64 = 3;
/// The byte alignment the tensors promise cuDNN (the arena's offsets are multiples of 256).
const ALIGNMENT: i64 = 16;

/// cuDNN's explanation of its last error, where the library has one.
fn last_error() -> String {
    let mut buf = [0 as c_char; 1024];
    let ptr = buf.as_mut_ptr();
    // SAFETY: room for buf.len() bytes; guard against an old library without the symbol.
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { sys::cudnnGetLastErrorString(ptr, 1024) }));
    if got.is_err() {
        return String::new();
    }
    // SAFETY: cuDNN writes a NUL-terminated string within the buffer (zeroed beforehand).
    let msg = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().trim().to_string();
    if msg.is_empty() {
        String::new()
    } else {
        format!(" ({msg})")
    }
}

fn check(st: sys::cudnnStatus_t, what: impl FnOnce() -> String) -> Result<()> {
    if st == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    bail!("{}: {st:?}{}", what(), last_error())
}

/// One backend descriptor, destroyed on drop. Private to this module: `set` and `get` trust
/// their callers that `T` is the C layout of the cuDNN type they name.
struct Desc(sys::cudnnBackendDescriptor_t);

impl Drop for Desc {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created once by cudnnBackendCreateDescriptor, destroyed once.
            let _ = unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
        }
    }
}

impl Desc {
    fn new(kind: Kind) -> Result<Desc> {
        let mut d: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
        // SAFETY: cuDNN writes one descriptor.
        check(unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut d) }, || format!("cudnnBackendCreateDescriptor({kind:?})"))?;
        Ok(Desc(d))
    }

    /// Sets attribute `name` to `vals`, elements of cuDNN type `ty` (`T` must be its C layout).
    fn set<T>(&self, name: Attr, ty: Ty, vals: &[T]) -> Result<()> {
        // SAFETY: vals holds vals.len() elements of the layout `ty` names; cuDNN copies them.
        check(unsafe { sys::cudnnBackendSetAttribute(self.0, name, ty, vals.len() as i64, vals.as_ptr() as *const c_void) }, || format!("setting {name:?}"))
    }

    fn set_i64(&self, name: Attr, vals: &[i64]) -> Result<()> {
        self.set(name, Ty::CUDNN_TYPE_INT64, vals)
    }

    fn set_descs(&self, name: Attr, descs: &[&Desc]) -> Result<()> {
        let raw: Vec<sys::cudnnBackendDescriptor_t> = descs.iter().map(|d| d.0).collect();
        self.set(name, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
    }

    fn finalize(&self, what: &str) -> Result<()> {
        // SAFETY: a descriptor of ours.
        check(unsafe { sys::cudnnBackendFinalize(self.0) }, || format!("finalizing {what}"))
    }

    /// Up to `cap` elements of attribute `name` (cuDNN type `ty`, C layout `T`), starting from
    /// copies of `fill`; as many as cuDNN wrote.
    fn get<T: Copy>(&self, name: Attr, ty: Ty, cap: usize, fill: T) -> Result<Vec<T>> {
        let mut out = vec![fill; cap];
        let mut count = 0i64;
        // SAFETY: room for `cap` elements.
        check(unsafe { sys::cudnnBackendGetAttribute(self.0, name, ty, cap as i64, &mut count, out.as_mut_ptr() as *mut c_void) }, || format!("reading {name:?}"))?;
        out.truncate((count.max(0) as usize).min(cap));
        Ok(out)
    }

    /// How many elements attribute `name` holds (a query for 0 of them).
    fn count(&self, name: Attr, ty: Ty) -> Result<usize> {
        let mut count = 0i64;
        // SAFETY: cuDNN writes only the count when 0 elements are requested.
        check(unsafe { sys::cudnnBackendGetAttribute(self.0, name, ty, 0, &mut count, std::ptr::null_mut()) }, || format!("counting {name:?}"))?;
        Ok(count.max(0) as usize)
    }

    /// Attribute `name` as descriptors of `kind`: cuDNN fills descriptors we create.
    fn get_descs(&self, name: Attr, kind: Kind, cap: usize) -> Result<Vec<Desc>> {
        if cap == 0 {
            return Ok(Vec::new());
        }
        let descs = (0..cap).map(|_| Desc::new(kind)).collect::<Result<Vec<_>>>()?;
        let mut raw: Vec<sys::cudnnBackendDescriptor_t> = descs.iter().map(|d| d.0).collect();
        let mut count = 0i64;
        // SAFETY: `cap` descriptors of the kind cuDNN fills for this attribute.
        check(
            unsafe { sys::cudnnBackendGetAttribute(self.0, name, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, cap as i64, &mut count, raw.as_mut_ptr() as *mut c_void) },
            || format!("reading {name:?}"),
        )?;
        let mut descs = descs;
        descs.truncate((count.max(0) as usize).min(cap));
        Ok(descs)
    }
}

/// `[n, c, d, h, w]` dims and NDHWC (channels-last) strides.
pub fn ndhwc_dims_strides(n: usize, c: usize, d: [usize; 3]) -> ([i64; 5], [i64; 5]) {
    let dims = [n, c, d[0], d[1], d[2]].map(|v| v as i64);
    let strides = [d[0] * d[1] * d[2] * c, 1, d[1] * d[2] * c, d[2] * c, c].map(|v| v as i64);
    (dims, strides)
}

fn tensor(uid: i64, dims: [i64; 5], strides: [i64; 5]) -> Result<Desc> {
    let t = Desc::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    t.set(Attr::CUDNN_ATTR_TENSOR_DATA_TYPE, Ty::CUDNN_TYPE_DATA_TYPE, &[sys::cudnnDataType_t::CUDNN_DATA_HALF])?;
    t.set_i64(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, &dims)?;
    t.set_i64(Attr::CUDNN_ATTR_TENSOR_STRIDES, &strides)?;
    t.set_i64(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[uid])?;
    t.set_i64(Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[ALIGNMENT])?;
    t.finalize(&format!("tensor {uid} {dims:?}"))?;
    Ok(t)
}

/// The convolution node's descriptors, host objects only (no handle needed): X, W, Y, the
/// convolution and the forward operation, finalized.
struct ConvNode {
    _x: Desc,
    _w: Desc,
    /// Read by the host test (cuDNN's view of the output dims).
    #[cfg_attr(not(test), allow(dead_code))]
    y: Desc,
    _conv: Desc,
    op: Desc,
}

impl ConvNode {
    fn new(shape: ConvShape) -> Result<ConvNode> {
        let ConvShape { n, dims, cin, cout, k, stride, pad } = shape;
        let od = shape.out_dims();
        let (xd, xs) = ndhwc_dims_strides(n, cin, dims);
        let (yd, ys) = ndhwc_dims_strides(n, cout, od);
        // The filter [Cout, Cin, k, k, k] stored as [Cout, k, k, k, Cin] (KTRSC, as `dnn.rs`).
        let (wd, ws) = ndhwc_dims_strides(cout, cin, [k; 3]);
        let x = tensor(UID_X, xd, xs)?;
        let w = tensor(UID_W, wd, ws)?;
        let y = tensor(UID_Y, yd, ys)?;
        let conv = Desc::new(Kind::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
        conv.set(Attr::CUDNN_ATTR_CONVOLUTION_COMP_TYPE, Ty::CUDNN_TYPE_DATA_TYPE, &[sys::cudnnDataType_t::CUDNN_DATA_FLOAT])?;
        conv.set(Attr::CUDNN_ATTR_CONVOLUTION_CONV_MODE, Ty::CUDNN_TYPE_CONVOLUTION_MODE, &[sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION])?;
        conv.set_i64(Attr::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, &[3])?;
        conv.set_i64(Attr::CUDNN_ATTR_CONVOLUTION_DILATIONS, &[1; 3])?;
        conv.set_i64(Attr::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, &[stride as i64; 3])?;
        conv.set_i64(Attr::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, &[pad as i64; 3])?;
        conv.set_i64(Attr::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, &[pad as i64; 3])?;
        conv.finalize("the convolution descriptor")?;
        let op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
        op.set_descs(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, &[&x])?;
        op.set_descs(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, &[&w])?;
        op.set_descs(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, &[&y])?;
        op.set_descs(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, &[&conv])?;
        op.set(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, Ty::CUDNN_TYPE_FLOAT, &[1.0f32])?;
        op.set(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, Ty::CUDNN_TYPE_FLOAT, &[0.0f32])?;
        op.finalize("the convolution forward operation")?;
        Ok(ConvNode { _x: x, _w: w, y, _conv: conv, op })
    }
}

/// Whether engines cuDNN compiles at run time are candidates too
/// (`FASTDET_CUDNN_RUNTIME_COMPILED=1`): their compile happens when a plan is built, at every
/// process start, so they are left out by default.
fn runtime_compiled_allowed() -> bool {
    std::env::var("FASTDET_CUDNN_RUNTIME_COMPILED").is_ok_and(|v| v == "1")
}

/// What an engine's notes say about using it: `Err(reason)` to leave it out; `Ok(deterministic)`.
/// `runtime_compiled`: whether engines compiled at run time may be used.
pub fn usable(numerical: &[u32], behavior: &[u32], runtime_compiled: bool) -> std::result::Result<bool, &'static str> {
    use sys::cudnnBackendBehaviorNote_t as B;
    use sys::cudnnBackendNumericalNote_t as N;
    if !runtime_compiled && behavior.contains(&(B::CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION as u32)) {
        return Err("compiled at run time");
    }
    if numerical.contains(&(N::CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION as u32)) {
        return Err("reduces in reduced precision");
    }
    if numerical.contains(&(N::CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS as u32)) {
        return Err("down-converts its inputs");
    }
    Ok(!numerical.contains(&(N::CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC as u32)))
}

/// "left out N: K reason, ..." for the `why` lines ("name: reason") of the configurations left
/// out, reasons counted, the commonest first: cuDNN statuses by their name, workspaces too large
/// as one; "" when none was.
pub fn left_out_summary(why: &[String]) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for w in why {
        let reason = w.split_once(": ").map_or(w.as_str(), |(_, r)| r);
        let reason = if reason.starts_with("workspace ") {
            "workspace too large".to_string()
        } else if let Some(at) = reason.find("CUDNN_STATUS_") {
            reason[at..].split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or("").to_string()
        } else {
            reason.to_string()
        };
        match counts.iter_mut().find(|c| c.0 == reason) {
            Some(c) => c.1 += 1,
            None => counts.push((reason, 1)),
        }
    }
    if counts.is_empty() {
        return String::new();
    }
    // Stable: equal counts keep their first appearance's order.
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    format!("left out {}: {}", why.len(), counts.iter().map(|(r, n)| format!("{n} {r}")).collect::<Vec<_>>().join(", "))
}

/// One engine configuration built into an execution plan.
struct Candidate {
    plan: Desc,
    /// The engine configuration the plan was built from, kept alive with it.
    _cfg: Desc,
    workspace: usize,
    deterministic: bool,
    /// "eng<global index>" and its knob choices, e.g. "eng12 k2=1 k3=0".
    name: String,
}

/// A readable name for an engine configuration: the engine's global index and knob choices, and
/// whether both were read (best effort: "eng?" where cuDNN does not say).
fn config_name(cfg: &Desc) -> (String, bool) {
    let engine = cfg.get_descs(Attr::CUDNN_ATTR_ENGINECFG_ENGINE, Kind::CUDNN_BACKEND_ENGINE_DESCRIPTOR, 1).ok().and_then(|mut v| v.pop());
    let index = engine.as_ref().and_then(|e| e.get(Attr::CUDNN_ATTR_ENGINE_GLOBAL_INDEX, Ty::CUDNN_TYPE_INT64, 1, -1i64).ok()).and_then(|v| v.first().copied());
    let mut complete = index.is_some();
    let mut name = index.map_or("eng?".to_string(), |i| format!("eng{i}"));
    // Room for every knob type there is (as cuDNN's own frontend asks), no count query first.
    match cfg.get_descs(Attr::CUDNN_ATTR_ENGINECFG_KNOB_CHOICES, Kind::CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR, 64) {
        Err(_) => complete = false,
        Ok(knobs) => {
            for knob in &knobs {
                let ty = knob.get(Attr::CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE, Ty::CUDNN_TYPE_KNOB_TYPE, 1, 0u32).ok().and_then(|v| v.first().copied());
                let val = knob.get(Attr::CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE, Ty::CUDNN_TYPE_INT64, 1, 0i64).ok().and_then(|v| v.first().copied());
                match (ty, val) {
                    (Some(t), Some(v)) => name.push_str(&format!(" k{t}={v}")),
                    _ => complete = false,
                }
            }
        }
    }
    (name, complete)
}

/// Engine notes of an engine configuration (numerical, behaviour), as raw enum values.
fn config_notes(cfg: &Desc) -> Result<(Vec<u32>, Vec<u32>)> {
    let engine = cfg.get_descs(Attr::CUDNN_ATTR_ENGINECFG_ENGINE, Kind::CUDNN_BACKEND_ENGINE_DESCRIPTOR, 1)?.pop().ok_or_else(|| anyhow!("an engine configuration without engine"))?;
    let numerical = engine.get(Attr::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, Ty::CUDNN_TYPE_NUMERICAL_NOTE, 16, u32::MAX)?;
    let behavior = engine.get(Attr::CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE, Ty::CUDNN_TYPE_BEHAVIOR_NOTE, 16, u32::MAX)?;
    Ok((numerical, behavior))
}

/// The engine configurations cuDNN's heuristics list for `graph` in `mode`, best first.
fn heuristics(graph: &Desc, mode: sys::cudnnBackendHeurMode_t) -> Result<Vec<Desc>> {
    let heur = Desc::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heur.set_descs(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[graph])?;
    heur.set(Attr::CUDNN_ATTR_ENGINEHEUR_MODE, Ty::CUDNN_TYPE_HEUR_MODE, &[mode])?;
    heur.finalize(&format!("the heuristics ({mode:?})"))?;
    // Where the count cannot be asked for, room for 32 (cuDNN fills what it has).
    let n = heur.count(Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR).unwrap_or(32);
    heur.get_descs(Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS, Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, n.min(64))
}

/// How many nondeterministic candidates past `keep` `select_candidates` builds looking for a
/// deterministic one (configurations that fail to build do not count: they cost little).
const SEARCH_PAST_KEEP: usize = 8;

/// The engine configurations to build, from cuDNN's heuristic lists (`configs`, best first):
/// each configuration's `name` (and whether it was read in full), its `notes` verdict (`usable`;
/// notes that cannot be read leave it in as possibly nondeterministic, behind the deterministic
/// ones, where timing and the self-test still judge it) and its `build` (a plan and its
/// workspace, or why not). The lists overlap: a configuration read in full is judged once,
/// built or left out; one whose name is partial cannot be told apart and keeps its place (its
/// position is added to the name). The scan stops once `keep` are built and one of them is
/// deterministic, so a deterministic one further down still gets in, or once
/// `keep + SEARCH_PAST_KEEP` are built without one (each build finalizes a plan: host time at
/// every start); the result is deterministic ones first in heuristic order, then the others, at
/// most `keep`. Each configuration left out adds its reason to `why`. Returns (configuration,
/// build, deterministic, name).
#[allow(clippy::type_complexity)]
fn select_candidates<C, B>(
    configs: Vec<C>,
    keep: usize,
    why: &mut Vec<String>,
    name: impl Fn(&C) -> (String, bool),
    notes: impl Fn(&C) -> Result<std::result::Result<bool, &'static str>>,
    mut build: impl FnMut(&C) -> Result<B>,
) -> Vec<(C, B, bool, String)> {
    let mut out: Vec<(C, B, bool, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (position, cfg) in configs.into_iter().enumerate() {
        if out.len() >= keep && (out.iter().any(|c| c.2) || out.len() >= keep + SEARCH_PAST_KEEP) {
            break;
        }
        let name = match name(&cfg) {
            (n, true) if !seen.insert(n.clone()) => continue,
            (n, true) => n,
            (n, false) => format!("{n} #{position}"),
        };
        let deterministic = match notes(&cfg) {
            Ok(Ok(d)) => d,
            Ok(Err(reason)) => {
                why.push(format!("{name}: {reason}"));
                continue;
            }
            Err(_) => false,
        };
        match build(&cfg) {
            Ok(b) => out.push((cfg, b, deterministic, name)),
            Err(e) => why.push(format!("{name}: {e:#}")),
        }
    }
    // Stable: heuristic order within each class.
    out.sort_by_key(|c| !c.2);
    out.truncate(keep.max(1));
    out
}

/// A graph-API plan for one convolution shape.
pub struct GraphPlan {
    _node: ConvNode,
    _graph: Desc,
    /// Deterministic ones first, heuristic order within each class (or timed, with `find`).
    cands: Vec<Candidate>,
    chosen: Option<usize>,
    timed: bool,
    /// With `find`: what the timing found, e.g. "eng3 0.520 ms, fastest of 9 timed".
    timing: Option<String>,
    /// The engine configurations left out and why, counted (`left_out_summary`).
    left_out: String,
    pub what: String,
}

// SAFETY: descriptors are host objects, used by one engine at a time.
unsafe impl Send for GraphPlan {}

/// Orders found per (device, plan) in this process: candidate names, fastest first, and the
/// timing's summary.
type FoundOrders = std::sync::Mutex<Vec<((usize, String), (Vec<String>, String))>>;
static FOUND: FoundOrders = std::sync::Mutex::new(Vec::new());

/// What timing found, from (name, ms, deterministic) of each candidate that ran and the name
/// kept: its time and, when a nondeterministic engine was faster, that one's (the price of
/// bit-identical repeats).
pub fn timing_summary(timed: &[(String, f32, bool)], kept: &str) -> String {
    let Some(k) = timed.iter().find(|t| t.0 == kept) else { return format!("{kept} (not timed; {} timed)", timed.len()) };
    let mut s = format!("{kept} {:.3} ms of {} timed", k.1, timed.len());
    if let Some(f) = timed.iter().filter(|t| !t.2).min_by(|a, b| a.1.total_cmp(&b.1)) {
        if f.1 < k.1 {
            s.push_str(&format!("; nondeterministic {} {:.3} ms", f.0, f.1));
        }
    }
    s
}

impl GraphPlan {
    /// Heuristics mode A, then the fallback list; at most `keep` candidates are kept, and at
    /// most `keep + SEARCH_PAST_KEEP` built (each build is host work at the engine's opening).
    /// Failed builds do not count.
    pub fn new(dnn: &Dnn, shape: ConvShape, keep: usize) -> Result<GraphPlan> {
        let ConvShape { n, dims, cin, cout, k, stride, pad } = shape;
        let what = format!("cuDNN graph conv {k}x{k}x{k}/s{stride}/p{pad} {cin}->{cout} on [{n}, {}, {}, {}]", dims[0], dims[1], dims[2]);
        let (xd, xs) = ndhwc_dims_strides(n, cin.max(cout), dims);
        if xd.iter().chain(xs.iter()).any(|&v| v > i32::MAX as i64) {
            bail!("{what}: exceeds cuDNN's 32-bit dims");
        }
        guard(&what.clone(), || {
            device_wide(dnn.ordinal, || {
                let node = ConvNode::new(shape)?;
                let graph = Desc::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
                graph.set(Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, Ty::CUDNN_TYPE_HANDLE, &[dnn.handle()])?;
                graph.set_descs(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, &[&node.op])?;
                graph.finalize("the operation graph")?;
                let mut configs = Vec::new();
                let mut why = Vec::new();
                for mode in [sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A, sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK] {
                    match heuristics(&graph, mode) {
                        Ok(c) => configs.extend(c),
                        Err(e) => why.push(format!("{e:#}")),
                    }
                }
                let limit = workspace_limit();
                let runtime_compiled = runtime_compiled_allowed();
                let cands = select_candidates(
                    configs,
                    keep,
                    &mut why,
                    config_name,
                    |cfg| config_notes(cfg).map(|(num, beh)| usable(&num, &beh, runtime_compiled)),
                    |cfg| {
                        let plan = Desc::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
                        plan.set(Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, Ty::CUDNN_TYPE_HANDLE, &[dnn.handle()])?;
                        plan.set_descs(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[cfg])?;
                        plan.finalize("the execution plan")?;
                        let ws = plan.get(Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, Ty::CUDNN_TYPE_INT64, 1, 0i64)?;
                        let ws = ws.first().copied().unwrap_or(0).max(0) as usize;
                        if ws > limit {
                            bail!("workspace {ws} bytes over {} MiB", limit >> 20);
                        }
                        Ok((plan, ws))
                    },
                );
                let cands: Vec<Candidate> = cands.into_iter().map(|(cfg, (plan, workspace), deterministic, name)| Candidate { plan, _cfg: cfg, workspace, deterministic, name }).collect();
                if cands.is_empty() {
                    bail!("cuDNN's heuristics offer no usable engine: {}", if why.is_empty() { "none listed".to_string() } else { why.join("; ") });
                }
                Ok(GraphPlan { _node: node, _graph: graph, cands, chosen: None, timed: false, timing: None, left_out: left_out_summary(&why), what: what.clone() })
            })
        })
    }

    /// The engine in use (after the first run), with what timing found when it timed and which
    /// engine configurations were left out.
    pub fn algo(&self) -> Option<String> {
        let i = self.chosen?;
        let mut notes: Vec<&str> = Vec::new();
        // The timing's pick is the first candidate; a later one ran only if it failed.
        if let Some(t) = self.timing.as_deref().filter(|_| i == 0) {
            notes.push(t);
        }
        if !self.left_out.is_empty() {
            notes.push(&self.left_out);
        }
        let name = &self.cands[i].name;
        Some(if notes.is_empty() { name.clone() } else { format!("{name} [{}]", notes.join("; ")) })
    }

    pub fn max_workspace(&self) -> usize {
        self.cands.iter().map(|c| c.workspace).max().unwrap_or(0)
    }

    /// A variant pack of one call's pointers (workspace 0: none).
    fn pack(x: u64, w: u64, y: u64, wp: u64) -> Result<Desc> {
        if [x, w, y].iter().any(|p| p % ALIGNMENT as u64 != 0) {
            bail!("a buffer is not aligned to {ALIGNMENT} bytes");
        }
        let pack = Desc::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set_i64(Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, &[UID_X, UID_W, UID_Y])?;
        let ptrs = [x as *mut c_void, w as *mut c_void, y as *mut c_void];
        pack.set(Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, Ty::CUDNN_TYPE_VOID_PTR, &ptrs)?;
        pack.set(Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE, Ty::CUDNN_TYPE_VOID_PTR, &[wp as *mut c_void])?;
        pack.finalize("the variant pack")?;
        Ok(pack)
    }

    /// Runs candidate `i` once on `pack`'s buffers.
    fn launch(&self, dnn: &Dnn, i: usize, pack: &Desc) -> Result<()> {
        // SAFETY: the plan was built for tensors of the pack's buffers' shapes; the workspace
        // holds what the plan asked for (or is null when it asked for none).
        check(unsafe { sys::cudnnBackendExecute(dnn.handle(), self.cands[i].plan.0, pack.0) }, || "cudnnBackendExecute".to_string())
    }

    /// Runs candidate `i` once: a variant pack of this call's pointers, then cuDNN's execute.
    fn execute(&self, dnn: &Dnn, i: usize, x: u64, w: u64, y: u64, wp: u64) -> Result<()> {
        self.launch(dnn, i, &Self::pack(x, w, y, wp)?)
    }

    /// Times every candidate on these buffers (`y` is overwritten: median of 3 runs after one
    /// untimed) and orders them fastest first, deterministic ones still first; or takes the order
    /// found earlier in this process for this device and shape.
    fn time_candidates(&mut self, dnn: &Dnn, gpu: &Gpu, x: u64, w: u64, y: u64, workspace: &mut Option<DevBuf>) -> Result<()> {
        let key = (gpu.info.ordinal, format!("{} ws<={}", self.what, workspace_limit()));
        let found = FOUND.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(k, _)| *k == key).map(|(_, o)| o.clone());
        let (order, summary) = match found {
            Some(o) => o,
            None => {
                let need = self.max_workspace();
                let grown = need > 0 && workspace.as_ref().is_none_or(|b| b.bytes < need);
                if grown {
                    *workspace = None;
                    *workspace = Some(gpu.alloc(need)?);
                }
                let wp = workspace.as_ref().map_or(0, |b| b.ptr);
                let mut timed: Vec<(usize, f32)> = Vec::new();
                for i in 0..self.cands.len() {
                    // The pack is built before the marks: only the execution is timed. A
                    // candidate that fails is left untimed (it goes after the timed ones).
                    let Ok(pack) = Self::pack(x, w, y, if self.cands[i].workspace > 0 { wp } else { 0 }) else { continue };
                    if self.launch(dnn, i, &pack).is_err() {
                        continue;
                    }
                    let mut times = Vec::new();
                    for _ in 0..3 {
                        let a = gpu.mark()?;
                        let ran = self.launch(dnn, i, &pack);
                        let b = gpu.mark()?;
                        if ran.is_err() {
                            break;
                        }
                        times.push(gpu.elapsed_ms(&a, &b)?);
                    }
                    if times.len() < 3 {
                        continue;
                    }
                    times.sort_by(f64::total_cmp);
                    timed.push((i, times[1] as f32));
                }
                gpu.sync("timing cuDNN's engines")?;
                if grown {
                    // Sized for the hungriest candidate: `run` allocates what the chosen one needs
                    // (as `LegacyPlan::time_candidates`).
                    *workspace = None;
                }
                let named: Vec<(String, f32, bool)> = timed.iter().map(|&(i, ms)| (self.cands[i].name.clone(), ms, self.cands[i].deterministic)).collect();
                let cands: Vec<(usize, usize, bool)> = self.cands.iter().enumerate().map(|(i, c)| (i, c.workspace, c.deterministic)).collect();
                let order: Vec<String> = order_by_time(&cands, &timed).iter().map(|c| self.cands[c.0].name.clone()).collect();
                let summary = timing_summary(&named, order.first().map_or("", |s| s.as_str()));
                FOUND.lock().unwrap_or_else(|e| e.into_inner()).push((key, (order.clone(), summary.clone())));
                (order, summary)
            }
        };
        self.timing = Some(summary);
        let mut cands = std::mem::take(&mut self.cands);
        cands.sort_by_key(|c| order.iter().position(|n| *n == c.name).unwrap_or(usize::MAX));
        self.cands = cands;
        Ok(())
    }

    /// `y = conv(x, w)`, as `dnn::LegacyPlan::run`.
    pub fn run(&mut self, dnn: &Dnn, gpu: &Gpu, x: u64, w: u64, y: u64, workspace: &mut Option<DevBuf>) -> Result<()> {
        if dnn.find && !self.timed && self.chosen.is_none() && !gpu.capturing() {
            self.timed = true;
            if let Err(e) = guard("timing cuDNN's engines", || self.time_candidates(dnn, gpu, x, w, y, workspace)) {
                crate::errln!("warning: {}: timing cuDNN's engines failed ({e:#}); taking its heuristic order", self.what);
            }
        }
        let (start, end) = candidates_to_try(self.chosen, self.cands.len(), gpu.capturing(), &self.what)?;
        let named: Vec<(&str, usize)> = self.cands[start..end].iter().map(|c| (c.name.as_str(), c.workspace)).collect();
        let ran = first_that_runs(&self.what, &named, workspace, gpu.capturing(), |bytes| gpu.alloc(bytes), |i, wp, _| {
            guard("cudnnBackendExecute", || self.execute(dnn, start + i, x, w, y, wp))
        })?;
        self.chosen = Some(start + ran);
        if gpu.sync_each() {
            gpu.sync(&format!("{} ({})", self.what, self.cands[start + ran].name))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndhwc_strides_put_channels_innermost() {
        let (dims, strides) = ndhwc_dims_strides(2, 8, [4, 5, 6]);
        assert_eq!(dims, [2, 8, 4, 5, 6]);
        assert_eq!(strides, [4 * 5 * 6 * 8, 1, 5 * 6 * 8, 6 * 8, 8]);
        // The filter as [Cout, Cin, k, k, k] over KTRSC memory.
        let (dims, strides) = ndhwc_dims_strides(32, 16, [3; 3]);
        assert_eq!(dims, [32, 16, 3, 3, 3]);
        assert_eq!(strides, [27 * 16, 1, 9 * 16, 3 * 16, 16]);
    }

    /// Candidates: duplicates across the two lists built once, unusable ones and failed builds
    /// left out with their reasons, a deterministic one found past `keep` nondeterministic ones,
    /// deterministic first, at most `keep`.
    #[test]
    fn candidates_are_deduplicated_filtered_and_deterministic_first() {
        // (name, read in full, notes: Some(det) / None unusable, builds)
        type Cfg = (&'static str, bool, Option<bool>, bool);
        let run = |configs: Vec<Cfg>, keep: usize| {
            let mut why = Vec::new();
            let mut built = Vec::new();
            let got = select_candidates(
                configs,
                keep,
                &mut why,
                |c: &Cfg| (c.0.to_string(), c.1),
                |c: &Cfg| Ok(c.2.ok_or("compiled at run time")),
                |c: &Cfg| {
                    built.push(c.0);
                    if c.3 {
                        Ok(c.0.len())
                    } else {
                        anyhow::bail!("not supported")
                    }
                },
            );
            (got.into_iter().map(|c| (c.3, c.2)).collect::<Vec<_>>(), why, built)
        };
        let cfgs: Vec<Cfg> = vec![
            ("eng1", true, Some(false), true),
            ("eng2", true, None, true),
            ("eng3", true, Some(false), false),
            ("eng1", true, Some(false), true),
            // The heuristics' second list repeats configurations the first left out or failed to
            // build: not judged again (one reason each, one build attempt).
            ("eng2", true, None, true),
            ("eng3", true, Some(false), false),
            ("eng4", true, Some(false), true),
            ("eng5", true, Some(true), true),
            ("eng6", true, Some(true), true),
        ];
        let (got, why, built) = run(cfgs.clone(), 2);
        // eng1 and eng4 fill `keep` but are nondeterministic: the scan goes on to eng5.
        assert_eq!(got, [("eng5".to_string(), true), ("eng1".to_string(), false)]);
        assert_eq!(built, ["eng1", "eng3", "eng4", "eng5"], "eng1 and eng3 tried once, eng2 never, eng6 not needed");
        assert_eq!(why, ["eng2: compiled at run time", "eng3: not supported"]);
        // Room for all: deterministic ones first, each class in heuristic order.
        let (got, _, _) = run(cfgs, 8);
        let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(names, ["eng5", "eng6", "eng1", "eng4"]);
        // Names not read in full are never merged: their positions tell them apart.
        let (got, _, _) = run(vec![("eng?", false, Some(true), true), ("eng?", false, Some(true), true)], 4);
        assert_eq!(got, [("eng? #0".to_string(), true), ("eng? #1".to_string(), true)]);
        // No deterministic one anywhere: the search stops SEARCH_PAST_KEEP builds past `keep`.
        let many: Vec<Cfg> = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9", "e10", "e11", "e12", "e13"].iter().map(|&n| (n, true, Some(false), true)).collect();
        let (got, _, built) = run(many, 2);
        assert_eq!(built.len(), 2 + SEARCH_PAST_KEEP);
        assert_eq!(got, [("e0".to_string(), false), ("e1".to_string(), false)]);
        // Nothing usable: empty, every reason kept.
        let (got, why, _) = run(vec![("eng7", true, None, true), ("eng8", true, Some(true), false)], 3);
        assert!(got.is_empty());
        assert_eq!(why.len(), 2);
    }

    #[test]
    fn left_out_configurations_are_counted_by_reason() {
        let why: Vec<String> = [
            "eng1 k2=1: compiled at run time",
            "eng4: finalizing the execution plan: CUDNN_STATUS_NOT_SUPPORTED (no kernel)",
            "eng5 k1=0: compiled at run time",
            "eng7: workspace 3000000000 bytes over 1024 MiB",
            "eng9: finalizing the execution plan: CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH",
            "eng2: compiled at run time",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            left_out_summary(&why),
            "left out 6: 3 compiled at run time, 1 CUDNN_STATUS_NOT_SUPPORTED, 1 workspace too large, 1 CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH"
        );
        assert_eq!(left_out_summary(&[]), "");
    }

    #[test]
    fn timing_summary_names_the_kept_engine_and_a_faster_nondeterministic_one() {
        let t = |n: &str, ms, det| (n.to_string(), ms, det);
        let timed = [t("eng1", 0.5, true), t("eng7", 0.25, false), t("eng3", 0.4, true)];
        assert_eq!(timing_summary(&timed, "eng3"), "eng3 0.400 ms of 3 timed; nondeterministic eng7 0.250 ms");
        // No faster nondeterministic engine: nothing more to say.
        assert_eq!(timing_summary(&timed[..1], "eng1"), "eng1 0.500 ms of 1 timed");
        assert_eq!(timing_summary(&[t("eng1", 0.5, true), t("eng7", 0.75, false)], "eng1"), "eng1 0.500 ms of 2 timed");
        assert_eq!(timing_summary(&timed, "eng9"), "eng9 (not timed; 3 timed)");
    }

    #[test]
    fn engine_notes_decide_use_and_determinism() {
        use sys::cudnnBackendBehaviorNote_t as B;
        use sys::cudnnBackendNumericalNote_t as N;
        let tc = N::CUDNN_NUMERICAL_NOTE_TENSOR_CORE as u32;
        let rtc = B::CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION as u32;
        assert_eq!(usable(&[tc], &[], false), Ok(true));
        assert_eq!(usable(&[tc, N::CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC as u32], &[], false), Ok(false));
        assert!(usable(&[tc], &[rtc], false).is_err());
        // Allowed (FASTDET_CUDNN_RUNTIME_COMPILED=1): judged by its numerical notes alone.
        assert_eq!(usable(&[tc], &[rtc], true), Ok(true));
        assert!(usable(&[N::CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION as u32], &[rtc], true).is_err());
        assert!(usable(&[N::CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS as u32], &[], false).is_err());
        // Notes this build does not know (a newer library) change nothing.
        assert_eq!(usable(&[tc, 99], &[77], false), Ok(true));
    }

    /// The host-side descriptors (tensors, convolution, forward operation, operation graph)
    /// finalize in the real library: attribute names, types and element counts as cuDNN wants
    /// them. Heuristics and plans need a handle, hence a GPU (the device self-test covers them).
    #[test]
    fn conv_node_descriptors_finalize_in_cudnn() {
        if !super::super::gpu::cudnn_available() {
            eprintln!("skipped: libcudnn.so.9 cannot be loaded here (put its directory on LD_LIBRARY_PATH to run this test)");
            return;
        }
        for shape in [
            ConvShape { n: 1, dims: [192, 128, 128], cin: 32, cout: 32, k: 3, stride: 1, pad: 1 },
            ConvShape { n: 2, dims: [96, 64, 64], cin: 32, cout: 64, k: 3, stride: 2, pad: 1 },
            ConvShape { n: 1, dims: [24, 16, 16], cin: 256, cout: 128, k: 1, stride: 1, pad: 0 },
        ] {
            let node = ConvNode::new(shape).unwrap_or_else(|e| panic!("{shape:?}: {e:#} (cuDNN loads its engine libraries here, which need libcuda.so.1: tools/cudnn-host-check.sh sets up both)"));
            // cuDNN's view of Y is ours.
            let dims = node.y.get(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, Ty::CUDNN_TYPE_INT64, 5, 0i64).unwrap();
            let od = shape.out_dims();
            assert_eq!(dims, [shape.n as i64, shape.cout as i64, od[0] as i64, od[1] as i64, od[2] as i64]);
            // The operation graph of that one node finalizes too (without the handle a run
            // gives it, its heuristics list nothing: they need the device).
            let graph = Desc::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR).unwrap();
            graph.set_descs(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, &[&node.op]).unwrap();
            graph.finalize("the operation graph").unwrap();
        }
        // A wrong attribute type is refused with cuDNN's status, not accepted silently.
        let t = Desc::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR).unwrap();
        let e = t.set(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, Ty::CUDNN_TYPE_FLOAT, &[1.0f32]).unwrap_err();
        assert!(format!("{e:#}").contains("CUDNN_ATTR_TENSOR_UNIQUE_ID"), "{e:#}");
    }
}
