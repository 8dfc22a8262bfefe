//! `fastdet bench`: time one model's forward pass per tile on a device, the same way for the CPU
//! engine and CUDA, so runs on different machines and commits compare directly.
use anyhow::{bail, Result};
use clap::Args;
use fastdet::engine::cuda::engine::StepTime;
use fastdet::engine::cuda::gpu::KernelLoad;
use fastdet::engine::{self, Device};
use fastdet::model::graph::Graph;
use fastdet::model::spec::{Arch, ModelSpec};
use fastdet::util::SplitMix64;
use fastdet::weights::Weights;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args)]
#[command(
    after_help = "Without --weights, each --arch runs at the seed's widths with random weights. A timed call is one\n`forward` as the pipeline makes it: input upload, network, outputs back in host memory. On a GPU\nthe same walks are timed again on a device-resident input with the outputs left there (the walk of\n`run` blending on the device; what PyTorch's device-resident timings compare with).\n'open s' is the engine's creation (weights, kernels), '1st s' the first call. The cold start runs\nfrom the command's start to the first outputs, less the time spent generating random weights.\nExamples:\n  fastdet bench --device cpu --tile 64,64,64\n  fastdet bench --device cuda:0 --arch segresnetv2 --batch 2 --json"
)]
#[command(group = clap::ArgGroup::new("ensemble").args(["tomogram", "plan_memory"]).multiple(true))]
pub struct BenchArgs {
    /// cpu or cuda:N (emu:N: the CUDA engine on a host emulator of its kernels, no GPU; slow,
    /// for testing)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Architectures at the seed widths (random weights): segresnetv2, dynunet or all
    #[arg(long, default_value = "all", value_parser = ["segresnetv2", "dynunet", "all"])]
    pub arch: String,
    /// Time these weights files instead of the seed architectures (one tile each)
    #[arg(long, num_args = 1.., conflicts_with_all = ["arch", "tomogram", "plan_memory"])]
    pub weights: Vec<PathBuf>,
    /// Tile size z,y,x
    #[arg(long, default_value = "192,128,128", value_parser = super::run::parse_triple)]
    pub tile: [usize; 3],
    /// Tiles per forward call
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Untimed calls before timing
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed calls (the median is reported)
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// One JSON object on stdout instead of a table
    #[arg(long)]
    pub json: bool,
    /// Time the whole pipeline per tomogram of this shape z,y,x instead (random volume; tiles,
    /// ensemble, blending and detection; the seed's is 184,630,630)
    #[arg(long, value_parser = super::run::parse_triple)]
    pub tomogram: Option<[usize; 3]>,
    /// With --tomogram: ensemble of this many SegResNetV2,DynUNet at the seed widths (random weights)
    #[arg(long, default_value = "5,5", value_parser = parse_pair, requires = "ensemble")]
    pub models: [usize; 2],
    /// With --tomogram: window z,y,x
    #[arg(long, default_value = "192,128,128", value_parser = super::run::parse_triple, requires = "tomogram")]
    pub window: [usize; 3],
    /// With --tomogram: tiles per axis z,y,x
    #[arg(long, default_value = "1,9,9", value_parser = super::run::parse_triple, requires = "tomogram")]
    pub tiles: [usize; 3],
    /// With --tomogram: average and blend on the CPU (as `run --host-blend`; the default on a
    /// CUDA device is to do it there)
    #[arg(long, requires = "tomogram")]
    pub host_blend: bool,
    /// The default (see --host-blend); accepted for older scripts
    #[arg(long, hide = true, conflicts_with = "host_blend")]
    pub device_blend: bool,
    /// Instead of timing, plan the CUDA engine's device memory for one worker running the
    /// --models ensemble (seed widths) on batches of --batch tiles of --tile: the models are walked
    /// on an emulator that allocates as a GPU would and runs no kernel (no GPU needed); with
    /// --tomogram SHAPE, also that tomogram's buffers for blending on the device (--tile its window)
    #[arg(long)]
    pub plan_memory: bool,
    /// On a GPU, also profile a walk: the time of each step (a conv with what is fused into it, a
    /// norm, ...), on a device-resident input, run without a CUDA graph with a timing event around
    /// each step; summed by kind of step (median of 3 walks), with the TFLOP/s and the bandwidth
    /// each kind reaches at the least (its least memory traffic over its time)
    #[arg(long, conflicts_with_all = ["tomogram", "plan_memory"])]
    pub profile: bool,
}

fn parse_pair(s: &str) -> Result<[usize; 2], String> {
    let v: Vec<usize> = s.split(',').map(|x| x.trim().parse().map_err(|_| format!("bad count {x:?} in {s:?}"))).collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("expected two counts SEGRESNET,DYNUNET, got {s:?}"))
}

struct Row {
    name: String,
    engine: String,
    gflop: f64,
    open_s: f64,
    first_s: f64,
    times_ms: Vec<f64>,
    /// CUDA engines: each timed walk on a device-resident input, outputs left on the device
    /// (milliseconds per call of `batch` tiles).
    device_times_ms: Option<Vec<f64>>,
    /// Seconds spent generating this model's random weights (seed architectures only): not part
    /// of the cold start, since a user's weights come from a file.
    random_weights_s: Option<f64>,
    /// Peak device memory of the engine's buffers (accelerators only).
    device_mib: Option<f64>,
    /// The card's memory in use after the timed walks, the engine still open (CUDA only).
    card_in_use_mib: Option<f64>,
    /// CUDA engines: device, kernels, cuDNN, backend and fusions, one line each.
    notes: Vec<String>,
    /// With FASTDET_CONV=measure: the path chosen and every variant's time.
    conv_choice: Option<fastdet::engine::cuda::choose::Choice>,
    /// With --profile on a GPU: each step of a walk.
    profile: Option<Vec<StepTime>>,
    /// CUDA engines: each cuDNN convolution's algorithm or engine (op, tile, algorithm).
    conv_algorithms: Vec<(String, [usize; 3], String)>,
}

/// The steps of a profiled walk summed by kind, the costliest first.
fn profile_by_kind(steps: &[StepTime]) -> Vec<KindTotal> {
    let mut kinds: Vec<KindTotal> = Vec::new();
    for s in steps {
        match kinds.iter_mut().find(|k| k.kind == s.kind) {
            Some(k) => {
                k.ms += s.ms;
                k.steps += 1;
                k.flops += s.flops;
                k.min_bytes += s.min_bytes;
            }
            None => kinds.push(KindTotal { kind: s.kind.clone(), ms: s.ms, steps: 1, flops: s.flops, min_bytes: s.min_bytes }),
        }
    }
    kinds.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    kinds
}

/// A profile's steps of one kind, summed.
struct KindTotal {
    kind: String,
    ms: f64,
    steps: usize,
    flops: u64,
    /// Their least memory traffic: divided by the time, the bandwidth they reach at the least.
    min_bytes: u64,
}

impl KindTotal {
    fn tflops(&self) -> Option<f64> {
        (self.flops > 0 && self.ms > 0.0).then(|| self.flops as f64 / (self.ms * 1e-3) * 1e-12)
    }

    fn gbps(&self) -> Option<f64> {
        (self.min_bytes > 0 && self.ms > 0.0).then(|| self.min_bytes as f64 / (self.ms * 1e-3) * 1e-9)
    }
}

impl Row {
    /// Median, min and max milliseconds per tile.
    fn per_tile(&self, batch: usize) -> (f64, f64, f64) {
        per_tile(&self.times_ms, batch)
    }
}

/// Median, min and max of `times_ms` (per call of `batch` tiles), per tile.
fn per_tile(times_ms: &[f64], batch: usize) -> (f64, f64, f64) {
    let mut t = times_ms.to_vec();
    t.sort_by(f64::total_cmp);
    let b = batch as f64;
    (median(&t) / b, t[0] / b, t[t.len() - 1] / b)
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

pub fn bench(a: BenchArgs) -> Result<ExitCode> {
    if a.iters == 0 || a.batch == 0 {
        bail!("--iters and --batch must be at least 1");
    }
    if a.plan_memory {
        return plan_memory(&a);
    }
    let device = Device::parse(&a.device)?;
    if let Some(shape) = a.tomogram {
        return bench_tomogram(&a, device, shape);
    }
    let started = Instant::now();
    let mut cold_start_s: Option<f64> = None;
    // The first engine opened the device: its kernel load is the one in the cold start.
    let mut kernel_load: Option<KernelLoad> = None;
    // Weights files load first (a bad one fails before any timing; their loading is part of the
    // cold start); seed architectures get random weights as they are taken, and the time that
    // takes (about a second per model on one core) is left out of the cold start, which is a
    // user's: process start to the first outputs, weights read from a file.
    enum Source {
        Seed(Arch),
        File(Box<Weights>),
    }
    let models: Vec<(String, Source)> = if a.weights.is_empty() {
        let archs = match a.arch.as_str() {
            "all" => vec![Arch::Segresnetv2, Arch::Dynunet],
            one => vec![Arch::parse(one)?],
        };
        archs.into_iter().map(|arch| (arch.name().to_string(), Source::Seed(arch))).collect()
    } else {
        a.weights
            .iter()
            .map(|p| Ok((p.display().to_string(), Source::File(Box::new(Weights::load(p)?)))))
            .collect::<Result<_>>()?
    };
    let tile = a.tile;
    let mut rows = Vec::new();
    let mut random_weights_s = 0.0;
    for (name, source) in models {
        let (w, generated_s) = match source {
            Source::Seed(arch) => {
                let t = Instant::now();
                let w = Weights::random(&ModelSpec::seed(arch), 1);
                let s = t.elapsed().as_secs_f64();
                random_weights_s += s;
                (w, Some(s))
            }
            Source::File(w) => (*w, None),
        };
        let (name, w) = (&name, &w);
        let graph = Graph::build(&w.spec)?;
        graph
            .check_tile(tile)
            .map_err(|e| anyhow::anyhow!("{name}: {e:#}"))?;
        let gflop = graph.flops(tile) as f64 * 1e-9;
        let mut input = vec![0.0f32; a.batch * w.spec.in_channels * tile.iter().product::<usize>()];
        SplitMix64::new(2).fill_uniform(&mut input, -1.0, 1.0);
        // Cold start: engine creation (kernel load/compile, weight upload) and the first call.
        let t0 = Instant::now();
        // With FASTDET_CONV=measure this includes timing the convolution paths (unless remembered).
        let (mut e, conv_choice) = engine::open_for(device, w, a.batch, tile)?;
        let open_s = t0.elapsed().as_secs_f64();
        kernel_load = kernel_load.or_else(|| e.as_cuda().map(|c| c.gpu_arc().kernel_load));
        let t1 = Instant::now();
        e.forward(&input, a.batch, tile, false)?;
        let first_s = t1.elapsed().as_secs_f64();
        // Cold start: from the command's start (weights loaded or generated) to the first outputs.
        cold_start_s.get_or_insert(started.elapsed().as_secs_f64() - random_weights_s);
        for _ in 1..a.warmup {
            e.forward(&input, a.batch, tile, false)?;
        }
        let mut times_ms = Vec::with_capacity(a.iters);
        for _ in 0..a.iters {
            let t = Instant::now();
            let out = e.forward(&input, a.batch, tile, false)?;
            times_ms.push(t.elapsed().as_secs_f64() * 1e3);
            if !out.scores.iter().all(|v| v.is_finite()) {
                bail!("{name}: non-finite scores on {}", e.name());
            }
        }
        // The same walks on a device-resident input, outputs left there: the walk as `run`
        // makes it when blending on the device, and what PyTorch's timings compare with.
        let device_times_ms = match e.as_cuda() {
            Some(c) => Some(fastdet::engine::cuda::choose::device_walk_times(c, w, a.batch, tile, fastdet::engine::cuda::choose::Measure { warmup: a.warmup, reps: a.iters })?),
            None => None,
        };
        // The profile is a diagnosis: its failure is reported, and the timings still count.
        let profile = match e.as_cuda() {
            Some(c) if a.profile => match fastdet::engine::cuda::choose::profile_device_walk(c, w, a.batch, tile, 3) {
                Ok(p) => Some(p),
                Err(err) => {
                    fastdet::errln!("warning: {name}: --profile failed: {err:#}");
                    None
                }
            },
            _ => None,
        };
        if a.profile && e.as_cuda().is_none() {
            fastdet::errln!("{name}: --profile: {} is not a CUDA engine; no profile", e.name());
        }
        rows.push(Row {
            name: name.clone(),
            engine: e.name(),
            gflop,
            open_s,
            first_s,
            times_ms,
            device_times_ms,
            random_weights_s: generated_s,
            profile,
            device_mib: e.device_memory_peak().map(|b| b as f64 / 1048576.0),
            card_in_use_mib: e.as_cuda().and_then(|c| c.gpu_arc().card_memory_in_use()).map(|b| b as f64 / 1048576.0),
            notes: e
                .as_cuda()
                .map(|c| {
                    let (graphs, replays, eager) = c.graph_counts();
                    let mut n = c.notes();
                    n.push(format!("walks: {replays} from a CUDA graph ({graphs} held), {eager} eager (warm-up included)"));
                    n
                })
                .unwrap_or_default(),
            conv_choice,
            conv_algorithms: e.as_cuda().map(|c| c.conv_algorithms()).unwrap_or_default(),
        });
        for n in &rows[rows.len() - 1].notes {
            fastdet::errln!("{name}: {n}");
        }
    }

    let threads = rayon::current_num_threads();
    if a.json {
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let (med, min, max) = r.per_tile(a.batch);
                let device = r.device_times_ms.as_deref().map(|t| per_tile(t, a.batch));
                serde_json::json!({
                    "model": r.name, "engine": r.engine, "gflop_per_tile": r.gflop,
                    "ms_per_tile": med, "ms_per_tile_min": min, "ms_per_tile_max": max,
                    "gflops": r.gflop / (med * 1e-3), "open_s": r.open_s, "first_call_s": r.first_s,
                    "times_ms": r.times_ms,
                    "ms_per_tile_device": device.map(|d| d.0), "ms_per_tile_device_min": device.map(|d| d.1), "ms_per_tile_device_max": device.map(|d| d.2),
                    "gflops_device": device.map(|d| r.gflop / (d.0 * 1e-3)), "device_times_ms": r.device_times_ms,
                    "random_weights_s": r.random_weights_s,
                    "profile": r.profile.as_ref().map(|steps| serde_json::json!({
                        "steps": steps.iter().map(|s| serde_json::json!({
                            "ops": [s.first, s.first + s.used], "label": s.label, "kind": s.kind, "ms": s.ms, "gflop": s.flops as f64 * 1e-9,
                            "min_gbytes": s.min_bytes as f64 * 1e-9,
                        })).collect::<Vec<_>>(),
                        "by_kind": profile_by_kind(steps).iter().map(|k| serde_json::json!({
                            "kind": k.kind, "ms": k.ms, "steps": k.steps, "gflop": k.flops as f64 * 1e-9, "tflops": k.tflops(),
                            "min_gbytes": k.min_bytes as f64 * 1e-9, "gbps": k.gbps(),
                        })).collect::<Vec<_>>(),
                        "sum_ms": steps.iter().map(|s| s.ms).sum::<f64>(),
                    })),
                    "device_memory_peak_mib": r.device_mib, "card_memory_in_use_mib": r.card_in_use_mib, "notes": r.notes,
                    "conv_algorithms": r.conv_algorithms.iter().map(|(op, t, algo)| serde_json::json!({"op": op, "tile": t, "algorithm": algo})).collect::<Vec<_>>(),
                    "conv_choice": r.conv_choice.as_ref().map(|c| serde_json::json!({
                        "label": c.label, "remembered": c.remembered, "batch": c.batch,
                        "ms_per_walk": c.times.iter().map(|(l, t)| (l.clone(), t.as_ref().ok().copied().into())).collect::<serde_json::Map<String, serde_json::Value>>(),
                    })),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "device": device.to_string(), "tile": tile, "batch": a.batch, "iters": a.iters,
            "warmup": a.warmup, "cpu_threads": threads, "fastdet_version": env!("CARGO_PKG_VERSION"), "fastdet_commit": fastdet::COMMIT,
            "models": items,
            "cold_start_s": cold_start_s, "random_weights_s": random_weights_s, "kernel_load": kernel_load.map(kernel_load_json),
        });
        fastdet::outln!("{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        fastdet::outln!(
            "tile {}x{}x{}, batch {}, {} timed call(s) after {} warm-up; {} CPU thread(s)",
            tile[0], tile[1], tile[2], a.batch, a.iters, a.warmup, threads
        )?;
        if let Some(k) = kernel_load {
            fastdet::outln!("kernels: {k} (part of the cold start, {:.2} s to the first outputs)", cold_start_s.unwrap_or(f64::NAN))?;
        }
        fastdet::outln!(
            "{:<14} {:>10} {:>10} {:>10} {:>9} {:>8} {:>9}  engine",
            "model", "ms/tile", "min", "max", "GFLOP/s", "open s", "1st s"
        )?;
        for r in &rows {
            let (med, min, max) = r.per_tile(a.batch);
            let mem = memory_note(r.device_mib, r.card_in_use_mib);
            fastdet::outln!(
                "{:<14} {:>10.1} {:>10.1} {:>10.1} {:>9.1} {:>8.2} {:>9.2}  {}{mem}",
                r.name,
                med,
                min,
                max,
                r.gflop / (med * 1e-3),
                r.open_s,
                r.first_s,
                r.engine
            )?;
            if let Some(t) = &r.device_times_ms {
                let (med, min, max) = per_tile(t, a.batch);
                fastdet::outln!(
                    "{:<14} {:>10.1} {:>10.1} {:>10.1} {:>9.1}  the same walks on a device-resident input, outputs left on the device",
                    "", med, min, max, r.gflop / (med * 1e-3)
                )?;
            }
            if let Some(steps) = &r.profile {
                let sum: f64 = steps.iter().map(|s| s.ms).sum();
                fastdet::outln!("  profile of one walk of {} tile(s), {} steps, {sum:.2} ms in all (each step between timing events, no graph):", a.batch, steps.len())?;
                for k in profile_by_kind(steps) {
                    let flops = k.tflops().map(|r| format!("{r:>7.1} TFLOP/s")).unwrap_or_else(|| " ".repeat(15));
                    let bytes = k.gbps().map(|r| format!("  {r:>7.0} GB/s at least")).unwrap_or_default();
                    fastdet::outln!("    {:<40} {:>9.3} ms {:>5.1}%  {:>3} step(s)  {flops}{bytes}", k.kind, k.ms, 100.0 * k.ms / sum.max(f64::MIN_POSITIVE), k.steps)?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// ", peak device memory P MiB (card: U MiB in use)": fastdet's buffers at their peak, and the
/// whole card's memory in use while the engines were open (context and libraries included).
fn memory_note(peak_mib: Option<f64>, card_mib: Option<f64>) -> String {
    let card = card_mib.map(|m| format!(" (card: {m:.0} MiB in use)")).unwrap_or_default();
    peak_mib.map(|m| format!(", peak device memory {m:.0} MiB{card}")).unwrap_or_default()
}

fn kernel_load_json(k: KernelLoad) -> serde_json::Value {
    serde_json::json!({"files": k.files, "compiled": k.compiled, "compile_s": k.compile_s, "load_s": k.load_s})
}

/// `--models S,D`: S SegResNetV2 then D DynUNet at the seed widths, random weights (seeds 1, 2,
/// ...), each with its graph, checked against `tile`; made one at a time, as they are taken.
fn seed_ensemble(models: [usize; 2], tile: [usize; 3]) -> Result<impl Iterator<Item = Result<(Weights, Graph)>>> {
    let [n_seg, n_dyn] = models;
    if n_seg + n_dyn == 0 {
        bail!("--models needs at least one model");
    }
    let archs = std::iter::repeat_n(Arch::Segresnetv2, n_seg).chain(std::iter::repeat_n(Arch::Dynunet, n_dyn));
    Ok(archs.enumerate().map(move |(i, arch)| {
        let spec = ModelSpec::seed(arch);
        let graph = Graph::build(&spec)?;
        graph.check_tile(tile)?;
        Ok((Weights::random(&spec, 1 + i as u64), graph))
    }))
}

/// `--plan-memory`: the device memory of one worker's ensemble, from the allocator.
fn plan_memory(a: &BenchArgs) -> Result<ExitCode> {
    use fastdet::engine::cuda::{memory_plan, ConvBackend};
    let [n_seg, n_dyn] = a.models;
    let weights: Vec<Weights> = seed_ensemble(a.models, a.tile)?.map(|m| m.map(|(w, _)| w)).collect::<Result<_>>()?;
    let refs: Vec<&Weights> = weights.iter().collect();
    // The tomogram's buffers count only where it is blended on the device.
    let tomogram = a.tomogram.filter(|_| !a.host_blend);
    let p = memory_plan(&refs, ConvBackend::TensorCore, a.batch, a.tile, tomogram)?;
    let mib = |b: usize| b as f64 / 1048576.0;
    let tile = format!("{}x{}x{}", a.tile[0], a.tile[1], a.tile[2]);
    if a.json {
        let doc = serde_json::json!({
            "models": {"segresnetv2": n_seg, "dynunet": n_dyn}, "tile": a.tile, "batch": a.batch,
            "backend": "tensor-core", "arena_bytes": p.arena, "weights_bytes": p.weights, "outputs_bytes": p.outputs,
            "held_bytes": p.held, "peak_bytes": p.peak, "tomogram": tomogram, "tomogram_bytes": p.tomogram, "next_volume_bytes": p.next_volume,
        });
        fastdet::outln!("{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        fastdet::outln!("device memory of one worker: {n_seg} SegResNetV2 + {n_dyn} DynUNet (seed widths), batch {}, tile {tile}, tensor-core path", a.batch)?;
        fastdet::outln!("  activation arena (shared)  {:8.1} MiB", mib(p.arena))?;
        fastdet::outln!("  weights                    {:8.1} MiB", mib(p.weights.iter().sum()))?;
        fastdet::outln!("  outputs                    {:8.1} MiB", mib(p.outputs.iter().sum()))?;
        if let Some(shape) = tomogram {
            fastdet::outln!("  tomogram {:>17} {:8.1} MiB (volume, blend accumulators, the batch's tiles and sums)", format!("{}x{}x{}", shape[0], shape[1], shape[2]), mib(p.tomogram))?;
            if p.next_volume > 0 {
                fastdet::outln!("  next volume (copied ahead) {:8.1} MiB (FASTDET_OVERLAP_UPLOAD=0: none)", mib(p.next_volume))?;
            }
        }
        fastdet::outln!("  held after the walks       {:8.1} MiB ({:.2} GiB)", mib(p.held), p.held as f64 / (1u64 << 30) as f64)?;
        fastdet::outln!("  peak                       {:8.1} MiB ({:.2} GiB)", mib(p.peak), p.peak as f64 / (1u64 << 30) as f64)?;
        fastdet::outln!("fastdet's buffers, from the allocator (walked on an emulator that runs no kernel); cuDNN's workspace and")?;
        if tomogram.is_some() {
            fastdet::outln!("the CUDA context come on top.")?;
        } else {
            fastdet::outln!("the CUDA context come on top, and with --tomogram SHAPE (blending on the device) the tomogram's buffers.")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The pipeline per tomogram: an ensemble at the seed widths (all weights resident), a random
/// volume, `predict_and_detect` (tiling, ensemble, blending, detection), as `fastdet run` does
/// after reading: the volume normalised beforehand, and on the device path (unless
/// `FASTDET_OVERLAP_UPLOAD=0`) the next iteration's copy issued from another thread while this
/// one is computed, as `run`'s reader thread does.
fn bench_tomogram(a: &BenchArgs, device: Device, shape: [usize; 3]) -> Result<ExitCode> {
    use fastdet::engine::cuda::side_upload::{overlap_enabled, SideUploader};
    use fastdet::pipeline::runner::{predict_and_detect, Ensemble, Prepared, Settings, Timing};
    let started = Instant::now();
    let [n_seg, n_dyn] = a.models;
    let mut engines = Vec::new();
    let mut flops_per_tile = 0u64;
    let mut kernel_load: Option<KernelLoad> = None;
    // Generating the random weights (about a second per model on one core) is left out of the
    // open and cold-start times: a user's weights come from files.
    let mut random_weights_s = 0.0;
    let mut models = seed_ensemble(a.models, a.window)?;
    loop {
        let t = Instant::now();
        let Some(model) = models.next() else { break };
        random_weights_s += t.elapsed().as_secs_f64();
        let (w, graph) = model?;
        flops_per_tile += graph.flops(a.window);
        let (mut e, choice) = engine::open_for(device, &w, a.batch, a.window)?;
        if let Some(c) = choice {
            fastdet::errln!("{}: convolutions {}", w.name, c.log_line());
        }
        kernel_load = kernel_load.or_else(|| e.as_cuda().map(|c| c.gpu_arc().kernel_load));
        engines.push(e);
    }
    let spec = ModelSpec::seed(Arch::Segresnetv2);
    let mut ens = Ensemble { engines, num_classes: spec.num_classes, stride: spec.stride };
    let s = Settings { window: a.window, tiles: a.tiles, batch: a.batch, device_blend: !a.host_blend, ..Settings::default() };
    let open_s = started.elapsed().as_secs_f64() - random_weights_s;
    let tiles = a.tiles.iter().product::<usize>() as u64;
    let flops = flops_per_tile * tiles;
    let mut volume = vec![0.0f32; shape.iter().product()];
    SplitMix64::new(5).fill_uniform(&mut volume, -1.0, 1.0);
    fastdet::pipeline::tiling::normalize_unit_range(&mut volume);
    let mut uploader = match ens.volume_device() {
        Some(gpu) if !a.host_blend && overlap_enabled() => Some(SideUploader::new(gpu)?),
        _ => None,
    };
    let upload_ahead = |up: &mut SideUploader| up.upload_or_defer(&volume, "bench");
    // The first volume goes up before the clock starts, as `run`'s first one is read before it.
    let mut next = uploader.as_mut().map(upload_ahead).transpose()?.flatten();
    let total = a.warmup + a.iters;
    let mut runs: Vec<(f64, Timing, usize)> = Vec::new();
    let mut cold_start_s = None;
    for i in 0..total {
        let mut vol = volume.clone();
        let mut timing = Timing::default();
        let t = Instant::now();
        let mut first_tiles = |done: usize, _total: usize| {
            if done > 0 && cold_start_s.is_none() {
                cold_start_s = Some(started.elapsed().as_secs_f64() - random_weights_s);
            }
        };
        let dets = std::thread::scope(|scope| -> Result<_> {
            let ahead = uploader.as_mut().filter(|_| i + 1 < total).map(|up| scope.spawn(|| upload_ahead(up)));
            let prepared = Prepared { normalized: true, upload: next.take() };
            let r = predict_and_detect(&mut ens, &mut vol, shape, &s, &mut first_tiles, &mut timing, false, prepared);
            next = ahead.map(|h| h.join().map_err(|_| anyhow::anyhow!("the uploading thread panicked"))?).transpose()?.flatten();
            Ok(r?.0)
        })?;
        if i >= a.warmup {
            runs.push((t.elapsed().as_secs_f64(), timing, dets.len()));
        }
    }
    let overlapped = runs.iter().any(|r| r.1.upload_overlapped);
    let device_peak = ens.engines.first().and_then(|e| e.device_memory_peak()).map(|b| b as f64 / 1048576.0);
    let card_in_use = ens.cuda_device().and_then(|g| g.card_memory_in_use()).map(|b| b as f64 / 1048576.0);
    let blended_on_device = !a.host_blend && ens.cuda_device().is_some();
    let mut secs: Vec<f64> = runs.iter().map(|r| r.0).collect();
    secs.sort_by(f64::total_cmp);
    let med = median(&secs);
    let mean = |f: fn(&Timing) -> f64| runs.iter().map(|r| f(&r.1)).sum::<f64>() / runs.len() as f64;
    let (upload, infer, blend, detect) = (mean(|t| t.upload), mean(|t| t.infer), mean(|t| t.blend), mean(|t| t.detect));
    if a.json {
        let doc = serde_json::json!({
            "device": device.to_string(), "tomogram": shape, "window": a.window, "tiles": a.tiles,
            "models": {"segresnetv2": n_seg, "dynunet": n_dyn}, "batch": a.batch,
            "device_blend": blended_on_device,
            "iters": a.iters, "warmup": a.warmup, "cpu_threads": rayon::current_num_threads(),
            "fastdet_version": env!("CARGO_PKG_VERSION"), "fastdet_commit": fastdet::COMMIT,
            "s_per_tomogram": med, "s_min": secs[0], "s_max": secs[secs.len() - 1], "times_s": secs,
            "upload_s": upload, "upload_overlapped": overlapped, "infer_s": infer, "blend_s": blend, "detect_s": detect,
            "flops_per_tomogram": flops, "tflops": flops as f64 * 1e-12 / med,
            "open_s": open_s, "cold_start_s": cold_start_s, "random_weights_s": random_weights_s, "kernel_load": kernel_load.map(kernel_load_json), "device_memory_peak_mib": device_peak,
            "card_memory_in_use_mib": card_in_use, "detections": runs.last().map(|r| r.2),
        });
        fastdet::outln!("{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        fastdet::outln!(
            "tomogram {}x{}x{}, window {}x{}x{}, tiles {}x{}x{}, {} SegResNetV2 + {} DynUNet (seed widths), batch {}{}, {} timed after {} warm-up",
            shape[0], shape[1], shape[2], a.window[0], a.window[1], a.window[2], a.tiles[0], a.tiles[1], a.tiles[2], n_seg, n_dyn, a.batch,
            if blended_on_device { ", blending on the device" } else { "" },
            a.iters, a.warmup
        )?;
        fastdet::outln!(
            "{med:.3} s per tomogram (min {:.3}, max {:.3}): upload {upload:.3} s{}, infer {infer:.3} s, blend {blend:.3} s, detect {detect:.3} s; {:.1} TFLOP per tomogram = {:.2} TFLOP/s",
            secs[0],
            secs[secs.len() - 1],
            if overlapped { " (copied ahead)" } else { "" },
            flops as f64 * 1e-12,
            flops as f64 * 1e-12 / med
        )?;
        let mem = memory_note(device_peak, card_in_use);
        let kernels = kernel_load.map(|k| format!(" (kernels: {k})")).unwrap_or_default();
        fastdet::outln!("engines opened in {open_s:.2} s{kernels}, first tile done {:.2} s after start{mem}", cold_start_s.unwrap_or(f64::NAN))?;
    }
    Ok(ExitCode::SUCCESS)
}
