//! `FASTDET_CONV=measure`: the convolution path chosen by timing it on the device, per network
//! and shape, instead of by a default.
//!
//! Which path walks a network fastest depends on the card (tensor-core generation, SM count,
//! cuDNN version) and on the network's widths, so it is timed where it runs: each variant
//! (cuDNN's legacy or graph API, each with its heuristic order or timed fastest; the tensor-core kernels with standard or wide tiles,
//! register-staged or cp.async loads (sm_80+), norms applied in the loads of 1x1x1 convs or of
//! every conv) opens an engine for the model, walks `warmup` batches of the run's own batch and
//! tile (the second is captured into its CUDA graph) and then `reps` timed ones, each synchronised;
//! the lowest median wins, and its engine, graph included, is the one handed back. A variant
//! whose outputs differ from the first one's (cuDNN's, when it loads) beyond the self-test's
//! network tolerances does not count: our kernels have not run on every card. (Without cuDNN
//! the reference is one of our own kernels, and either side may be the wrong one: measuring then
//! refuses, naming the disagreement.)
//!
//! The choice is remembered in `conv-choices.json` beside the compiled kernels, under a key
//! naming the device, driver, cuDNN, the kernels' source, the network's spec (not its weights:
//! the time does not depend on their values), the batch and tile, and the settings that change
//! the walks; later runs open the winner directly. Delete the file to measure again.
//!
//! Measuring holds every variant's buffers for a moment: the arena and cuDNN's workspace are
//! released afterwards when the measurement alone made them grow, so that the walks to come
//! size them for the winners.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use half::f16;
use serde::{Deserialize, Serialize};

use super::dnn::{Dnn, DnnApi};
use super::engine::{ConvBackend, CudaEngine, NormInLoads, TcPolicy};
use super::gpu::Gpu;
use super::nvrtc::KernelCache;
use super::ops::{vol, TcTiles};
use super::remembered::{device_key, device_lock, kernels_key, short_hash, JsonStore};
use super::selftest::{diff, TOL_NET_OFFSETS, TOL_NET_SCORES};
use crate::pipeline::runner::OutOfMemory;
use crate::util::SplitMix64;
use crate::weights::Weights;

/// One way of running a network's general convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// Its name in notes and in the remembered choices.
    pub label: &'static str,
    pub backend: ConvBackend,
    pub policy: TcPolicy,
    /// cuDNN's algorithms timed at each plan's first run instead of its heuristic order.
    pub cudnn_find: bool,
    /// Which of cuDNN's APIs plans the convolutions.
    pub cudnn_api: DnnApi,
}

impl Variant {
    /// An engine for `weights` on `gpu` running this variant.
    pub fn open(&self, gpu: &Arc<Gpu>, weights: &Weights) -> Result<CudaEngine> {
        let mut e = CudaEngine::on_with(gpu.clone(), weights, self.backend, self.policy)?;
        e.set_cudnn_api(self.cudnn_api);
        e.set_cudnn_find(self.cudnn_find);
        Ok(e)
    }
}

/// The variants worth timing on `gpu`, the default path first: cuDNN when it loads (`cudnn`; its
/// heuristic algorithms, then the ones it times fastest), then the tensor-core kernels where the device has tensor cores (with cp.async loads only
/// where they are asynchronous, sm_80+, and on the emulators, which run them), else the direct
/// kernel.
pub fn variants(gpu: &Gpu, cudnn: bool) -> Vec<Variant> {
    let tc = TcPolicy::default();
    let on = |label, backend, policy| Variant { label, backend, policy, cudnn_find: false, cudnn_api: DnnApi::Legacy };
    let mut v = Vec::new();
    if cudnn && !gpu.is_emulator() {
        v.push(on("cudnn", ConvBackend::Cudnn, tc));
        v.push(Variant { cudnn_find: true, ..on("cudnn-find", ConvBackend::Cudnn, tc) });
        v.push(Variant { cudnn_api: DnnApi::Graph, ..on("cudnn-graph", ConvBackend::Cudnn, tc) });
        v.push(Variant { cudnn_api: DnnApi::Graph, cudnn_find: true, ..on("cudnn-graph-find", ConvBackend::Cudnn, tc) });
    }
    if gpu.check_tensor_cores().is_ok() {
        let wide = TcPolicy { tiles: TcTiles::Wide, ..tc };
        v.push(on("tc", ConvBackend::TensorCore, tc));
        v.push(on("tc-wide", ConvBackend::TensorCore, wide));
        v.push(on("tc-norms-in-loads", ConvBackend::TensorCore, TcPolicy { norm_in_loads: NormInLoads::All, ..tc }));
        // The halo tiles where they fit: alone, and applying every norm as they stage their input.
        let halo = TcPolicy { halo: true, ..tc };
        v.push(on("tc-halo", ConvBackend::TensorCore, halo));
        v.push(on("tc-halo-norms-in-loads", ConvBackend::TensorCore, TcPolicy { norm_in_loads: NormInLoads::All, ..halo }));
        if gpu.is_emulator() || gpu.info.compute_capability >= (8, 0) {
            v.push(on("tc-async", ConvBackend::TensorCore, TcPolicy { async_loads: true, ..tc }));
            v.push(on("tc-wide-async", ConvBackend::TensorCore, TcPolicy { async_loads: true, ..wide }));
        }
    } else {
        v.push(on("direct", ConvBackend::Direct, tc));
    }
    v
}

/// How long each variant is walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// Untimed walks first (the first runs eagerly and sizes the arena, the second is captured).
    pub warmup: usize,
    /// Timed walks; their median counts.
    pub reps: usize,
}

impl Default for Measure {
    fn default() -> Self {
        Measure { warmup: 2, reps: 5 }
    }
}

/// What a measurement found: the winner, and every variant's milliseconds per walk (or why it
/// did not run).
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub label: String,
    /// The tiles a timed walk took (the batch asked for, or less when that did not fit).
    pub batch: usize,
    pub times: Vec<(String, std::result::Result<f64, String>)>,
    /// Read back from the remembered choices rather than timed now.
    pub remembered: bool,
}

impl Choice {
    /// `summary`, then whether it was measured now or earlier: the line a run logs.
    pub fn log_line(&self) -> String {
        format!("{}, measured {}", self.summary(), if self.remembered { "earlier" } else { "now" })
    }

    /// `tc-wide (12.31 ms a walk; cudnn 15.10, tc 13.02, tc-async failed: ...)`.
    pub fn summary(&self) -> String {
        let ms = |label: &str| self.times.iter().find(|(l, _)| l == label).and_then(|(_, t)| t.as_ref().ok().copied());
        let others: Vec<String> = self
            .times
            .iter()
            .filter(|(l, _)| *l != self.label)
            .map(|(l, t)| match t {
                Ok(ms) => format!("{l} {ms:.2}"),
                Err(why) => format!("{l} failed: {why}"),
            })
            .collect();
        let own = ms(&self.label).map_or(String::new(), |t| format!("{t:.2} ms a walk"));
        match (own.is_empty(), others.is_empty()) {
            (true, true) => self.label.clone(),
            (false, true) => format!("{} ({own})", self.label),
            (true, false) => format!("{} ({})", self.label, others.join(", ")),
            (false, false) => format!("{} ({own}; {})", self.label, others.join(", ")),
        }
    }
}

/// The index of the fastest variant that ran (the earlier one on a tie), None when none did.
pub fn fastest<'a, E: 'a>(times: impl IntoIterator<Item = &'a std::result::Result<f64, E>>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, t) in times.into_iter().enumerate() {
        if let Ok(ms) = *t {
            if best.is_none_or(|(_, b)| ms < b) {
                best = Some((i, ms));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// The remembered choices: `conv-choices.json`, `{key: {"choice": label, "batch": n, "ms": {label: ms or null}}}`.
#[derive(Debug, Clone)]
pub struct ChoiceCache {
    store: JsonStore,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Stored {
    choice: String,
    /// The tiles a timed walk took (less than the key's batch when that did not fit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    ms: BTreeMap<String, Option<f64>>,
}

const WHAT: &str = "remembered convolution choices";

impl ChoiceCache {
    /// `conv-choices.json` in `dir`.
    pub fn in_dir(dir: &Path) -> ChoiceCache {
        ChoiceCache { store: JsonStore::at(dir.join("conv-choices.json")) }
    }

    /// Beside the compiled kernels (`KernelCache::default_dir`).
    pub fn default_location() -> ChoiceCache {
        ChoiceCache::in_dir(&KernelCache::default_dir())
    }

    /// Nothing remembered: every open measures.
    pub fn none() -> ChoiceCache {
        ChoiceCache { store: JsonStore::none() }
    }

    pub fn path(&self) -> Option<&Path> {
        self.store.path()
    }

    fn get(&self, key: &str) -> Option<Stored> {
        self.store.get(WHAT, key)
    }

    fn put(&self, keys: &[String], entry: Stored) -> Result<()> {
        self.store.put(WHAT, keys, &entry)
    }
}

/// What a remembered choice is valid for: the device (name, architecture, SMs, driver), cuDNN,
/// fastdet's version and kernels, the network's spec, the variants to choose from, the batch and
/// tile, and the settings that change the walks.
pub fn choice_key(gpu: &Gpu, cudnn: &str, weights: &Weights, n: usize, tile: [usize; 3]) -> String {
    let spec = serde_json::to_string(&weights.spec).unwrap_or_default();
    // The variants there are to choose from: a choice made before a variant existed is made again.
    let labels: Vec<&str> = variants(gpu, cudnn != "none").iter().map(|v| v.label).collect();
    let env: Vec<String> = ["FASTDET_TC_SPLIT_K", "FASTDET_CUDNN_WORKSPACE_MIB", "FASTDET_CUDA_GRAPHS", "FASTDET_CONVT"]
        .iter()
        .filter_map(|v| std::env::var(v).ok().map(|x| format!("{v}={x}")))
        .collect();
    format!(
        "{} | cuDNN {cudnn} | {} | spec {} | variants {} | {n} x {}x{}x{}{}{}",
        device_key(gpu),
        kernels_key(),
        short_hash(spec.as_bytes()),
        short_hash(labels.join(",").as_bytes()),
        tile[0],
        tile[1],
        tile[2],
        if env.is_empty() { "" } else { " | " },
        env.join(" "),
    )
}

/// The last timed walk's outputs, on the host: what variants are checked against each other by.
struct WalkOutputs {
    scores: Vec<f32>,
    offsets: Vec<f32>,
}

/// Walks `e` on `input` (`n` tiles of `tile`, the engine's device layout) `warmup` times, then
/// `reps` timed times, each synchronised: the median milliseconds of a walk, and the last walk's
/// outputs.
fn time_walks(e: &mut CudaEngine, input: &super::gpu::DevBuf, n: usize, tile: [usize; 3], m: Measure) -> Result<(f64, WalkOutputs)> {
    let (mut ms, last) = walk_times(e, input, n, tile, m)?;
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], last))
}

/// The milliseconds of each timed walk (in order) and the last walk's outputs.
fn walk_times(e: &mut CudaEngine, input: &super::gpu::DevBuf, n: usize, tile: [usize; 3], m: Measure) -> Result<(Vec<f64>, WalkOutputs)> {
    let gpu = e.gpu_arc();
    for _ in 0..m.warmup {
        let out = e.forward_device_input(input, n, tile, false)?;
        e.recycle(out);
    }
    gpu.sync("measuring a convolution path")?;
    let reps = m.reps.max(1);
    let mut ms = Vec::with_capacity(reps);
    let mut last = None;
    for rep in 0..reps {
        let t = Instant::now();
        let out = e.forward_device_input(input, n, tile, false)?;
        gpu.sync("measuring a convolution path")?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        if rep + 1 == reps {
            last = Some(WalkOutputs { scores: gpu.read::<f32>(out.scores.ptr, out.scores_len())?, offsets: gpu.read::<f32>(out.offsets.ptr, out.offsets_len())? });
        }
        e.recycle(out);
    }
    Ok((ms, last.expect("at least one timed walk")))
}

/// Random input of `n` tiles of `tile` for `weights`, in the walk's own layout
/// (`forward_device_input`), on `gpu`: a walk's time does not depend on the values, only on the
/// shape.
fn random_walk_input(gpu: &Gpu, weights: &Weights, n: usize, tile: [usize; 3]) -> Result<super::gpu::DevBuf> {
    let mut x = vec![0f32; n * weights.spec.in_channels * vol(tile)];
    SplitMix64::new(7).fill_uniform(&mut x, -1.0, 1.0);
    let x: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    gpu.upload(&x).with_context(|| format!("{}: the input of {n} tile(s) of {tile:?} to measure on", weights.name))
}

/// The milliseconds of each of `m.reps` walks of `e` (after `m.warmup` untimed ones) on a
/// device-resident random input of `n` tiles of `tile`, outputs left on the device, each walk
/// synchronised: what a walk costs inside `fastdet run` blending on the device, and what
/// device-resident timings of other frameworks compare with (`fastdet bench`).
pub fn device_walk_times(e: &mut CudaEngine, weights: &Weights, n: usize, tile: [usize; 3], m: Measure) -> Result<Vec<f64>> {
    let gpu = e.gpu_arc();
    let input = random_walk_input(&gpu, weights, n, tile)?;
    Ok(walk_times(e, &input, n, tile, m)?.0)
}

/// Where `e`'s walk of `n` tiles of `tile` spends its time: `reps` profiled walks
/// (`CudaEngine::profile_walk`, after one untimed) on a device-resident random input, each
/// step's median.
pub fn profile_device_walk(e: &mut CudaEngine, weights: &Weights, n: usize, tile: [usize; 3], reps: usize) -> Result<Vec<super::engine::StepTime>> {
    let gpu = e.gpu_arc();
    let input = random_walk_input(&gpu, weights, n, tile)?;
    e.profile_walk(&input, n, tile)?;
    let runs: Vec<Vec<super::engine::StepTime>> = (0..reps.max(1)).map(|_| e.profile_walk(&input, n, tile)).collect::<Result<_>>()?;
    let mut steps = runs[0].clone();
    if runs.iter().any(|r| r.len() != steps.len()) {
        bail!("internal error: profiled walks of one shape took different steps");
    }
    for (k, step) in steps.iter_mut().enumerate() {
        let mut ms: Vec<f64> = runs.iter().map(|r| r[k].ms).collect();
        ms.sort_by(f64::total_cmp);
        step.ms = ms[ms.len() / 2];
    }
    Ok(steps)
}

/// Whether `got` (variant `label`) gives what `reference` (variant `reference_label`) gives, to
/// the self-test's tolerances for whole fp16 networks (`TOL_NET_SCORES`, `TOL_NET_OFFSETS`, the
/// absolute part scaled by max(1, max|ref|)): a kernel that computes wrongly on this card must
/// never win by being fast.
fn agrees(label: &str, got: &WalkOutputs, reference_label: &str, reference: &WalkOutputs) -> Result<()> {
    let mut far = Vec::new();
    for (what, g, r, tol) in [("scores", &got.scores, &reference.scores, TOL_NET_SCORES), ("offsets", &got.offsets, &reference.offsets, TOL_NET_OFFSETS)] {
        let (max_abs, rel, ref_max, _) = diff(g, r);
        let abs_tol = tol.0 * ref_max.max(1.0);
        if !(max_abs <= abs_tol && rel <= tol.1) {
            far.push(format!("{what} max|Δ| {max_abs:.3e} (tolerance {abs_tol:.1e}), ‖Δ‖/‖ref‖ {rel:.3e} (tolerance {:.0e})", tol.1));
        }
    }
    if far.is_empty() {
        Ok(())
    } else {
        bail!("{label} disagrees with {reference_label} on this device: {}; not used", far.join(", "))
    }
}

/// What timing the variants found.
struct Timed {
    /// (label, median ms or the error) per variant.
    times: Vec<(String, Result<f64>)>,
    /// The fastest variant's index and engine (only the best so far is kept open, with its graph).
    best: Option<(usize, CudaEngine)>,
    /// A variant disagreed with a reference that is not `trusted` (one of our own kernels, not
    /// cuDNN): either may be the wrong one.
    disputed: bool,
}

/// Every variant timed in turn. A variant whose outputs differ from the first that ran (cuDNN,
/// when it loads) beyond the fp16 tolerances counts as failed, with a warning. `trusted`: whether
/// a reference variant settles a disagreement (cuDNN's does).
fn time_variants(gpu: &Arc<Gpu>, weights: &Weights, candidates: &[Variant], n: usize, tile: [usize; 3], m: Measure, trusted: &dyn Fn(&Variant) -> bool) -> Result<Timed> {
    let input = random_walk_input(gpu, weights, n, tile)?;
    let mut t = Timed { times: Vec::with_capacity(candidates.len()), best: None, disputed: false };
    let mut reference: Option<(&Variant, WalkOutputs)> = None;
    for (i, v) in candidates.iter().enumerate() {
        let timed = v.open(gpu, weights).and_then(|mut e| time_walks(&mut e, &input, n, tile, m).map(|(ms, out)| (e, ms, out))).and_then(|(e, ms, out)| {
            // A graph-API variant whose convolutions went to the legacy API is not what it says.
            match e.graph_api_fallback_summary() {
                Some(fell_back) if v.cudnn_api == DnnApi::Graph => anyhow::bail!("{fell_back}"),
                _ => Ok((e, ms, out)),
            }
        });
        let (engine, time) = match timed {
            Ok((e, ms, out)) => match &reference {
                None => {
                    reference = Some((v, out));
                    (Some(e), Ok(ms))
                }
                Some((r, ref_out)) => match agrees(v.label, &out, r.label, ref_out) {
                    Ok(()) => (Some(e), Ok(ms)),
                    Err(err) => {
                        if trusted(r) {
                            crate::errln!("warning: {}: {err:#}; `fastdet selftest` on this device names the kernel", weights.name);
                        }
                        t.disputed |= !trusted(r);
                        (None, Err(err))
                    }
                },
            },
            Err(err) => (None, Err(err)),
        };
        t.times.push((v.label.to_string(), time));
        if let Some(e) = engine.filter(|_| fastest(t.times.iter().map(|(_, t)| t)) == Some(i)) {
            t.best = Some((i, e));
        }
    }
    Ok(t)
}

/// An engine for `weights` on `gpu` running the convolution path that walks `n` tiles of `tile`
/// fastest there: the remembered choice for this device, network and shape when `cache` has
/// one, else every `variants` timed (`m`) and the winner remembered. A batch that fits no
/// variant is measured at half its size, and so on (the runner halves its batches then too); the
/// choice is remembered under the batch asked for as well. The engine's notes say which and
/// why; so does the returned `Choice`.
pub fn open_measured(gpu: Arc<Gpu>, weights: &Weights, n: usize, tile: [usize; 3], cache: &ChoiceCache, m: Measure) -> Result<(CudaEngine, Choice)> {
    if n == 0 {
        bail!("{}: measuring needs at least one tile", weights.name);
    }
    let cudnn = Dnn::working_version(&gpu);
    let candidates = variants(&gpu, cudnn.is_some());
    let key_for = |n: usize| choice_key(&gpu, cudnn.as_deref().unwrap_or("none"), weights, n, tile);
    // One measurement at a time per device: two workers on one card would time each other's load
    // (the second then finds the first's choice remembered).
    let lock = device_lock(&gpu);
    let _turn = lock.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = open_remembered(&gpu, weights, &candidates, &key_for(n), n, tile, cache) {
        return Ok(found);
    }

    let arena_before = gpu.arena().capacity();
    let workspace_before = gpu.dnn_workspace().as_ref().map_or(0, |b| b.bytes);
    let mut at = n;
    let (won, mut engine, times) = loop {
        let Timed { times, best, disputed } = time_variants(&gpu, weights, &candidates, at, tile, m, &|v| v.backend == ConvBackend::Cudnn)?;
        if disputed {
            // Our own kernels disagree and no cuDNN settles which is right: none is to be trusted.
            let far: Vec<String> = times.iter().filter_map(|(_, t)| t.as_ref().err().map(|e| format!("{e:#}"))).filter(|e| e.contains(" disagrees with ")).collect();
            bail!(
                "{}: our convolution kernels disagree on this device ({}) and there is no cuDNN to settle which is right; \
                 `fastdet selftest` on this device names the wrong kernel; FASTDET_CONV=tc or direct picks a path without measuring",
                weights.name,
                far.join("; ")
            );
        }
        if let Some((won, engine)) = best {
            break (won, engine, times);
        }
        let why: Vec<String> = times.iter().filter_map(|(l, t)| t.as_ref().err().map(|e| format!("{l}: {e:#}"))).collect();
        let oom = times.iter().any(|(_, t)| t.as_ref().is_err_and(|e| e.downcast_ref::<OutOfMemory>().is_some()));
        if !(oom && at > 1) {
            bail!("{}: no convolution path ran on {at} tile(s) of {tile:?}: {}", weights.name, why.join("; "));
        }
        crate::errln!("warning: {}: {at} tiles at once fit on the device in no convolution path; measuring {}", weights.name, at / 2);
        at /= 2;
    };
    // Microseconds are all a walk's time is good for (and what the file keeps).
    let times: Vec<(String, std::result::Result<f64, String>)> = times.into_iter().map(|(l, t)| (l, t.map(|ms| (ms * 1e3).round() / 1e3).map_err(|e| format!("{e:#}")))).collect();
    let choice = Choice { label: candidates[won].label.to_string(), batch: at, times, remembered: false };

    // Memory only the measurement needed goes back; the walks to come size it again (a graph
    // captured on the old buffers is captured again: the arena's generation and the workspace's
    // address change).
    if gpu.arena().capacity() > arena_before {
        gpu.arena().release();
    }
    if gpu.dnn_workspace().as_ref().map_or(0, |b| b.bytes) > workspace_before {
        *gpu.dnn_workspace() = None;
    }

    let stored = Stored { choice: choice.label.clone(), batch: Some(at), ms: choice.times.iter().map(|(l, t)| (l.clone(), t.as_ref().ok().copied())).collect() };
    let keys: Vec<String> = if at == n { vec![key_for(n)] } else { vec![key_for(n), key_for(at)] };
    let kept = match (cache.path(), cache.put(&keys, stored)) {
        (None, _) => "not remembered".to_string(),
        (Some(p), Ok(())) => format!("remembered in {}", p.display()),
        (Some(_), Err(e)) => format!("not remembered: {e:#}"),
    };
    engine.push_note(format!("convolutions: {}, the fastest of {} variant(s) timed on {at} tile(s) of {tile:?}; {kept}", choice.summary(), choice.times.len()));
    Ok((engine, choice))
}

/// The engine of the choice remembered under `key`, when there is one that still opens.
fn open_remembered(gpu: &Arc<Gpu>, weights: &Weights, candidates: &[Variant], key: &str, n: usize, tile: [usize; 3], cache: &ChoiceCache) -> Option<(CudaEngine, Choice)> {
    let stored = cache.get(key)?;
    let v = candidates.iter().find(|v| v.label == stored.choice)?;
    match v.open(gpu, weights) {
        Ok(mut e) => {
            let times = stored.ms.iter().map(|(l, t)| (l.clone(), t.ok_or_else(|| "did not run".to_string()))).collect();
            let batch = stored.batch.unwrap_or(n);
            let choice = Choice { label: v.label.to_string(), batch, times, remembered: true };
            let where_kept = cache.path().map_or(String::new(), |p| format!(" ({})", p.display()));
            e.push_note(format!("convolutions: {}, measured earlier on this device for this network on {batch} tile(s) of {tile:?}{where_kept}", choice.summary()));
            Some((e, choice))
        }
        Err(err) => {
            crate::errln!("warning: {}: the remembered convolution path {} does not open ({err:#}); measuring again", weights.name, v.label);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::TileEngine;
    use crate::model::spec::ModelSpec;

    const QUICK: Measure = Measure { warmup: 1, reps: 1 };

    #[test]
    fn the_fastest_variant_that_ran_wins_and_a_tie_goes_to_the_earlier() {
        type T = std::result::Result<f64, String>;
        let e = || T::Err("x".into());
        assert_eq!(fastest(&[T::Ok(3.0), Ok(2.0), Ok(2.5)]), Some(1));
        assert_eq!(fastest(&[T::Ok(2.0), Ok(2.0)]), Some(0));
        assert_eq!(fastest(&[e(), Ok(9.0), e(), Ok(8.5)]), Some(3));
        assert_eq!(fastest(&[e(), e()]), None);
        assert_eq!(fastest(&[] as &[T]), None);
    }

    #[test]
    fn a_summary_names_the_winner_its_time_and_every_other_variant() {
        let c = Choice { label: "tc-wide".into(), batch: 1, times: vec![("cudnn".into(), Ok(15.104)), ("tc".into(), Err("out of memory".into())), ("tc-wide".into(), Ok(12.3))], remembered: false };
        assert_eq!(c.summary(), "tc-wide (12.30 ms a walk; cudnn 15.10, tc failed: out of memory)");
        let alone = Choice { label: "tc".into(), batch: 2, times: vec![("tc".into(), Ok(1.0))], remembered: true };
        assert_eq!(alone.summary(), "tc (1.00 ms a walk)");
    }

    /// The emulator offers the seven tensor-core variants (it runs cp.async as a GPU would).
    #[test]
    fn the_emulator_times_every_tensor_core_variant() {
        let labels: Vec<&str> = variants(&Gpu::emulator().unwrap(), false).iter().map(|v| v.label).collect();
        assert_eq!(labels, ["tc", "tc-wide", "tc-norms-in-loads", "tc-halo", "tc-halo-norms-in-loads", "tc-async", "tc-wide-async"]);
    }

    /// Measured on the emulator: every variant timed, the fastest kept and remembered; its engine
    /// gives bit for bit what an engine opened on that variant directly gives; a second open
    /// takes the remembered choice without timing; a damaged file or a choice that is no longer
    /// offered is measured again, and the file rewritten whole.
    #[test]
    fn a_measured_choice_is_the_fastest_remembered_and_reused() {
        let (n, tile) = (1, [8, 16, 16]);
        let w = Weights::random(&ModelSpec::segresnet(8, 16, 8), 21);
        let dir = tempfile::tempdir().unwrap();
        let cache = ChoiceCache::in_dir(dir.path());
        let gpu = Gpu::emulator().unwrap();
        let (mut e, c) = open_measured(gpu.clone(), &w, n, tile, &cache, QUICK).unwrap();
        assert!(!c.remembered);
        let labels: Vec<&str> = c.times.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["tc", "tc-wide", "tc-norms-in-loads", "tc-halo", "tc-halo-norms-in-loads", "tc-async", "tc-wide-async"]);
        let ms: Vec<f64> = c.times.iter().map(|(_, t)| *t.as_ref().unwrap()).collect();
        assert!(ms.iter().all(|&t| t > 0.0), "{ms:?}");
        let won = labels.iter().position(|l| *l == c.label).unwrap();
        assert!(ms.iter().all(|&t| t >= ms[won]), "{} won with {ms:?}", c.label);
        assert!(e.notes().iter().any(|l| l.starts_with(&format!("convolutions: {}", c.label)) && l.contains("remembered in")), "{:?}", e.notes());
        // The measurement's arena was released; the winner's next walk sizes it again.
        assert_eq!(gpu.arena().capacity(), 0);

        let v = variants(&gpu, false).into_iter().find(|v| v.label == c.label).unwrap();
        let mut direct = v.open(&Gpu::emulator().unwrap(), &w).unwrap();
        let mut x = vec![0f32; n * vol(tile)];
        SplitMix64::new(3).fill_uniform(&mut x, 0.0, 1.0);
        for _ in 0..2 {
            let (got, want) = (e.forward(&x, n, tile, false).unwrap(), direct.forward(&x, n, tile, false).unwrap());
            assert!(got.scores == want.scores && got.offsets == want.offsets);
        }

        let file = cache.path().unwrap().to_path_buf();
        let stored: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let key = choice_key(&gpu, "none", &w, n, tile);
        assert_eq!(stored[&key]["choice"], c.label.as_str());
        assert_eq!(stored[&key]["ms"].as_object().unwrap().len(), labels.len());

        // Remembered: the same choice and times, no walk.
        let (again, c2) = open_measured(gpu.clone(), &w, n, tile, &cache, QUICK).unwrap();
        assert!(c2.remembered && c2.label == c.label);
        assert_eq!(c2.times.iter().map(|(l, t)| (l.clone(), t.clone().ok())).collect::<BTreeMap<_, _>>(), c.times.iter().map(|(l, t)| (l.clone(), t.clone().ok())).collect());
        assert_eq!(again.graph_counts(), (0, 0, 0));
        assert!(again.notes().iter().any(|l| l.contains("measured earlier")), "{:?}", again.notes());
        // Another shape or another network is another key: measured.
        let (_, other) = open_measured(gpu.clone(), &w, n, [8, 8, 16], &cache, QUICK).unwrap();
        assert!(!other.remembered);
        let all: BTreeMap<String, Stored> = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(all.len(), 2);

        // A choice no longer offered, then a damaged file: measured again, the file whole again.
        let mut all = all;
        all.get_mut(&key).unwrap().choice = "tc-from-an-older-version".into();
        std::fs::write(&file, serde_json::to_string(&all).unwrap()).unwrap();
        assert!(!open_measured(gpu.clone(), &w, n, tile, &cache, QUICK).unwrap().1.remembered);
        std::fs::write(&file, "{ not json").unwrap();
        assert!(!open_measured(gpu.clone(), &w, n, tile, &cache, QUICK).unwrap().1.remembered);
        let all: BTreeMap<String, Stored> = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(all.len(), 1, "only the entry measured since the damage");
        assert!(open_measured(gpu, &w, n, tile, &cache, QUICK).unwrap().1.remembered);
        let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["conv-choices.json", "conv-choices.json.lock"], "no temporary file left behind");
    }

    /// A variant whose kernels compute wrongly on this device (here the cp.async ones, made wrong
    /// on purpose in the emulator) is not chosen however fast it is: its outputs are checked
    /// against the first variant's, and the failure names both and the distance. When that
    /// reference is cuDNN's the others go on; when it is one of our own kernels (the emulator has
    /// no cuDNN) nothing settles which side is wrong, and measuring refuses.
    #[test]
    fn a_variant_that_disagrees_with_the_first_is_never_chosen() {
        let (n, tile) = (1, [8, 16, 16]);
        let w = Weights::random(&ModelSpec::segresnet(8, 16, 8), 24);
        let gpu = Gpu::emulator().unwrap();
        gpu.emu().unwrap().compute_wrongly("async");
        let candidates = variants(&gpu, false);
        // As if the first variant were cuDNN's.
        let t = time_variants(&gpu, &w, &candidates, n, tile, QUICK, &|_| true).unwrap();
        assert!(!t.disputed);
        assert_eq!(t.times.iter().filter(|(l, _)| l.contains("async")).count(), 2);
        for (label, time) in &t.times {
            if label.contains("async") {
                let why = format!("{:#}", time.as_ref().unwrap_err());
                assert!(why.starts_with(&format!("{label} disagrees with tc on this device: scores max|Δ|")) && why.ends_with("not used"), "{why}");
            } else {
                assert!(time.is_ok(), "{label}: {time:?}");
            }
        }
        let (won, _) = t.best.unwrap();
        assert!(!candidates[won].label.contains("async"));
        // The emulator as it is: the reference is our own tc.
        let dir = tempfile::tempdir().unwrap();
        let cache = ChoiceCache::in_dir(dir.path());
        let msg = format!("{:#}", open_measured(gpu, &w, n, tile, &cache, QUICK).err().unwrap());
        assert!(msg.contains("our convolution kernels disagree on this device (tc-async disagrees with tc") && msg.contains("FASTDET_CONV=tc or direct"), "{msg}");
        assert!(!cache.path().unwrap().exists(), "nothing remembered");

        // The check itself: within the network tolerances passes, beyond either fails.
        let out = |s: f32, o: f32| WalkOutputs { scores: vec![0.5, s], offsets: vec![1.0, o] };
        assert!(agrees("b", &out(0.51, 1.02), "a", &out(0.5, 1.0)).is_ok());
        let far = format!("{:#}", agrees("b", &out(0.5, 1.5), "a", &out(0.5, 1.0)).unwrap_err());
        assert!(far.starts_with("b disagrees with a on this device: offsets max|Δ| 5.000e-1"), "{far}");
        assert!(agrees("b", &out(0.7, 1.0), "a", &out(0.5, 1.0)).is_err());
        assert!(agrees("b", &out(f32::NAN, 1.0), "a", &out(0.5, 1.0)).is_err());
    }

    /// Two workers opening the same network on one device at once: one measures, the other waits
    /// and takes its remembered choice (they would otherwise time each other's load).
    #[test]
    fn workers_on_one_device_measure_one_at_a_time() {
        let (n, tile) = (1, [8, 16, 16]);
        let w = Weights::random(&ModelSpec::segresnet(8, 16, 8), 23);
        let dir = tempfile::tempdir().unwrap();
        let cache = ChoiceCache::in_dir(dir.path());
        let choices: Vec<Choice> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2).map(|_| s.spawn(|| open_measured(Gpu::open_emulator(0).unwrap(), &w, n, tile, &cache, QUICK).unwrap().1)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(choices.iter().filter(|c| c.remembered).count(), 1, "{choices:?}");
        assert_eq!(choices[0].label, choices[1].label);
    }

    /// A batch that fits no variant is measured at half its size, and so on (the runner halves
    /// its batches then too); a single tile that fits none is an error naming each variant's failure.
    #[test]
    fn a_batch_that_fits_no_variant_is_measured_at_half() {
        let tile = [16, 32, 32];
        let w = Weights::random(&ModelSpec::segresnet(8, 16, 8), 22);
        // What one tile takes at most, over the variants, measured without a limit.
        let probe = Gpu::emulator().unwrap();
        open_measured(probe.clone(), &w, 1, tile, &ChoiceCache::none(), QUICK).unwrap();
        let one = probe.memory_peak();
        let gpu = Gpu::emulator().unwrap();
        gpu.set_emulated_memory_limit(one);
        let dir = tempfile::tempdir().unwrap();
        let cache = ChoiceCache::in_dir(dir.path());
        let (mut e, c) = open_measured(gpu.clone(), &w, 16, tile, &cache, QUICK).unwrap();
        assert!(c.times.iter().any(|(_, t)| t.is_ok()));
        assert!([8, 4, 2, 1].contains(&c.batch), "{}", c.batch);
        assert!(e.notes().iter().any(|l| l.contains(&format!("timed on {} tile(s)", c.batch))), "{:?}", e.notes());
        drop(e.forward(&vec![0.5; vol(tile)], 1, tile, false).unwrap());
        drop(e);
        // Remembered under the batch asked for too: the next open of 16 tiles times nothing.
        let (again, c2) = open_measured(gpu.clone(), &w, 16, tile, &cache, QUICK).unwrap();
        assert!(c2.remembered && c2.label == c.label && c2.batch == c.batch, "{c2:?}");
        assert!(again.notes().iter().any(|l| l.contains(&format!("measured earlier on this device for this network on {} tile(s)", c.batch))), "{:?}", again.notes());

        let tiny = Gpu::emulator().unwrap();
        // The input fits, no variant does.
        tiny.set_emulated_memory_limit(vol(tile) * 2 + 4096);
        let err = open_measured(tiny, &w, 1, tile, &ChoiceCache::none(), QUICK).err().unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("no convolution path ran on 1 tile(s)") && msg.contains("tc-wide-async:"), "{msg}");
    }
}
