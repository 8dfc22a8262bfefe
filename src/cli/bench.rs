//! `fastdet bench`: time one model's forward pass per tile on a device, the same way for the CPU
//! engine and CUDA, so runs on different machines and commits compare directly.
use anyhow::{bail, Result};
use clap::Args;
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
    after_help = "Without --weights, each --arch runs at the seed's widths with random weights. A timed call is one\n`forward` as the pipeline makes it: input upload, network, outputs back in host memory.\n'open s' is the engine's creation (weights, kernels), '1st s' the first call.\nExamples:\n  fastdet bench --device cpu --tile 64,64,64\n  fastdet bench --device cuda:0 --arch segresnetv2 --batch 2 --json"
)]
pub struct BenchArgs {
    /// cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Architectures at the seed widths (random weights): segresnetv2, dynunet or all
    #[arg(long, default_value = "all", value_parser = ["segresnetv2", "dynunet", "all"])]
    pub arch: String,
    /// Time these weights files instead of the seed architectures
    #[arg(long, num_args = 1..)]
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
}

struct Row {
    name: String,
    engine: String,
    gflop: f64,
    open_s: f64,
    first_s: f64,
    times_ms: Vec<f64>,
    /// Peak device memory of the engine's buffers (accelerators only).
    device_mib: Option<f64>,
}

impl Row {
    /// Median, min and max milliseconds per tile.
    fn per_tile(&self, batch: usize) -> (f64, f64, f64) {
        let mut t = self.times_ms.clone();
        t.sort_by(f64::total_cmp);
        let b = batch as f64;
        (median(&t) / b, t[0] / b, t[t.len() - 1] / b)
    }
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
    let started = Instant::now();
    let mut cold_start_s: Option<f64> = None;
    let device = Device::parse(&a.device)?;
    let models: Vec<(String, Weights)> = if a.weights.is_empty() {
        let archs = match a.arch.as_str() {
            "all" => vec![Arch::Segresnetv2, Arch::Dynunet],
            one => vec![Arch::parse(one)?],
        };
        archs
            .into_iter()
            .map(|arch| {
                (
                    arch.name().to_string(),
                    Weights::random(&ModelSpec::seed(arch), 1),
                )
            })
            .collect()
    } else {
        a.weights
            .iter()
            .map(|p| Ok((p.display().to_string(), Weights::load(p)?)))
            .collect::<Result<_>>()?
    };
    let tile = a.tile;
    let mut rows = Vec::new();
    for (name, w) in &models {
        let graph = Graph::build(&w.spec)?;
        graph
            .check_tile(tile)
            .map_err(|e| anyhow::anyhow!("{name}: {e:#}"))?;
        let gflop = graph.flops(tile) as f64 * 1e-9;
        let mut input = vec![0.0f32; a.batch * w.spec.in_channels * tile.iter().product::<usize>()];
        SplitMix64::new(2).fill_uniform(&mut input, -1.0, 1.0);
        // Cold start: engine creation (kernel load/compile, weight upload) and the first call.
        let t0 = Instant::now();
        let mut e = engine::open(device, w)?;
        let open_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        e.forward(&input, a.batch, tile, false)?;
        let first_s = t1.elapsed().as_secs_f64();
        // Cold start: from the command's start (weights loaded or generated) to the first outputs.
        cold_start_s.get_or_insert(started.elapsed().as_secs_f64());
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
        rows.push(Row {
            name: name.clone(),
            engine: e.name(),
            gflop,
            open_s,
            first_s,
            times_ms,
            device_mib: e.device_memory_peak().map(|b| b as f64 / 1048576.0),
        });
    }

    let threads = rayon::current_num_threads();
    if a.json {
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let (med, min, max) = r.per_tile(a.batch);
                serde_json::json!({
                    "model": r.name, "engine": r.engine, "gflop_per_tile": r.gflop,
                    "ms_per_tile": med, "ms_per_tile_min": min, "ms_per_tile_max": max,
                    "gflops": r.gflop / (med * 1e-3), "open_s": r.open_s, "first_call_s": r.first_s,
                    "times_ms": r.times_ms, "device_memory_peak_mib": r.device_mib,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "device": device.to_string(), "tile": tile, "batch": a.batch, "iters": a.iters,
            "warmup": a.warmup, "cpu_threads": threads, "fastdet_version": env!("CARGO_PKG_VERSION"),
            "models": items,
            "cold_start_s": cold_start_s,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "tile {}x{}x{}, batch {}, {} timed call(s) after {} warm-up; {} CPU thread(s)",
            tile[0], tile[1], tile[2], a.batch, a.iters, a.warmup, threads
        );
        println!(
            "{:<14} {:>10} {:>10} {:>10} {:>9} {:>8} {:>9}  engine",
            "model", "ms/tile", "min", "max", "GFLOP/s", "open s", "1st s"
        );
        for r in &rows {
            let (med, min, max) = r.per_tile(a.batch);
            let mem = r.device_mib.map(|m| format!(", peak device memory {m:.0} MiB")).unwrap_or_default();
            println!(
                "{:<14} {:>10.1} {:>10.1} {:>10.1} {:>9.1} {:>8.2} {:>9.2}  {}{mem}",
                r.name,
                med,
                min,
                max,
                r.gflop / (med * 1e-3),
                r.open_s,
                r.first_s,
                r.engine
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
