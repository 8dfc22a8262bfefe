use anyhow::{Context, Result};
use clap::Args;
use fastdet::engine::cuda::gpu::Gpu;
use fastdet::engine::cuda::kernel_check;
use fastdet::engine::cuda::selftest::{self, Options, Row, Status, Target};
use fastdet::engine::Device;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::run::parse_triple;

#[derive(Args)]
#[command(after_help = "Compares every CUDA kernel with its CPU twin on fresh random data, then both networks (seed widths,\n\
random weights) and a whole synthetic tomogram (2-model ensemble) against the CPU engine; prints a table\n\
and exits 1 on any failure, 2 when there is no usable GPU (no CUDA driver, no device).\n\
--device emu runs everything on a slow host emulator of the kernels (to test the self-test itself);\n\
--device emu-kernels runs the kernels' own CUDA source compiled for the host with the C++ compiler ($CXX or c++):\n\
every kernel against its CPU twin without a GPU (add --no-networks --no-pipeline: every thread runs on the CPU,\n\
so the seed networks would take hours).\n\
--device cpu checks the CPU engine's SIMD conv kernels (every instruction set the CPU has) against the direct\n\
formula, and both seed networks on them against the portable path.\n\
Examples:\n  fastdet selftest --device cuda:0 --quick\n  fastdet selftest --device cuda:0 --json selftest.json")]
pub struct SelftestArgs {
    /// Device to test against the CPU reference: cuda:N (or emu, emu-kernels); cpu checks the CPU engine's SIMD
    /// kernels against the direct formula and the portable path
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Networks on a 64x64x64 tile instead of 192x128x128 (--device cpu: 32x32x32 instead of
    /// 64x64x64); no whole-tomogram check
    #[arg(long)]
    pub quick: bool,
    /// Also write the report as JSON
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Directory for compiled kernels, for cuda:N (the emulators' host-built kernels use
    /// $FASTDET_KERNEL_CACHE) [default: $FASTDET_KERNEL_CACHE or ~/.cache/fastdet/kernels]
    #[arg(long)]
    pub kernel_cache: Option<PathBuf>,
    /// Models for the whole-tomogram check [default: weights/demo_segresnetv2.safetensors and
    /// weights/demo_dynunet.safetensors when found, else random weights of their widths]
    #[arg(long, num_args = 1..)]
    pub weights: Vec<PathBuf>,
    /// Seed of the random inputs, weights and synthetic tomogram
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Network tile z,y,x, a multiple of 32 [default: 64,64,64 with --quick, else 192,128,128;
    /// --device cpu: 32,32,32 with --quick, else 64,64,64]
    #[arg(long, value_parser = parse_triple)]
    pub tile: Option<[usize; 3]>,
    /// Synthetic tomogram z,y,x of the whole-tomogram check
    #[arg(long, default_value = "184,630,630", value_parser = parse_triple)]
    pub shape: [usize; 3],
    /// Skip the per-kernel checks
    #[arg(long)]
    pub no_kernels: bool,
    /// Skip the whole-network checks
    #[arg(long)]
    pub no_networks: bool,
    /// Skip the whole-tomogram check
    #[arg(long)]
    pub no_pipeline: bool,
}

/// A network tile both seed architectures take.
fn checks_tile(t: [usize; 3]) -> Result<()> {
    use fastdet::model::{graph::Graph, spec::{Arch, ModelSpec}};
    for arch in [Arch::Segresnetv2, Arch::Dynunet] {
        Graph::build(&ModelSpec::seed(arch))?.check_tile(t).context("--tile")?;
    }
    Ok(())
}

fn write_json(path: &Path, text: &str) -> Result<()> {
    fastdet::util::write_atomic(path, |f| Ok(f.write_all(text.as_bytes())?)).with_context(|| format!("writing {}", path.display()))
}

pub fn selftest(a: SelftestArgs) -> Result<ExitCode> {
    // The report's file can be written: checked before the tests, which may take minutes.
    if let Some(p) = &a.json {
        fastdet::util::check_output_file(p)?;
    }
    if let Some(t) = a.tile {
        checks_tile(t)?;
    }
    let target = if a.device == "emu" {
        Target::Emulator
    } else if a.device == "emu-kernels" {
        Target::HostKernels
    } else {
        match Device::parse(&a.device)? {
            Device::Cuda(i) => Target::Cuda(i),
            Device::Emu(_) => Target::Emulator,
            Device::Cpu => return cpu_selftest(&a),
        }
    };
    let device = match selftest::check_target(target) {
        Ok(d) => d,
        Err(e) => {
            fastdet::errln!("selftest: {e:#}");
            fastdet::errln!("selftest: nothing was tested (no usable GPU); exit status 2");
            if let Some(p) = &a.json {
                let j = serde_json::json!({"device": a.device, "no_device": true, "error": format!("{e:#}"), "passed": false, "rows": []});
                write_json(p, &serde_json::to_string_pretty(&j)?)?;
            }
            return Ok(ExitCode::from(2));
        }
    };
    let mut o = Options::new(target);
    o.quick = a.quick;
    o.kernel_cache = a.kernel_cache.clone();
    o.seed = a.seed;
    o.kernels = !a.no_kernels;
    o.networks = !a.no_networks;
    o.pipeline = !a.no_pipeline;
    o.network_tile = a.tile;
    o.pipeline_weights = a.weights.clone();
    o.pipeline_shape = a.shape;
    fastdet::outln!("fastdet {} selftest on {device}{}", fastdet::VERSION, if a.quick { " (quick)" } else { "" })?;
    fastdet::outln!("{}", Row::header())?;
    let t0 = std::time::Instant::now();
    let mut print_row = |row: &Row| {
        // A failed write shows in the summary's print below.
        let _ = fastdet::outln!("{}", row.line());
        let _ = std::io::stdout().flush();
    };
    // On a GPU the handle stays open past the report: a pass of every kernel check is remembered
    // for it, so that runs on this device need not check again (kernel_check.rs).
    let (report, gpu) = match target {
        Target::Cuda(i) => match Gpu::open(i, a.kernel_cache.clone()) {
            Ok(gpu) => (selftest::run_on(gpu.clone(), &o, &mut print_row), Some(gpu)),
            Err(e) => (Err(e), None),
        },
        _ => (selftest::run(&o, &mut print_row), None),
    };
    if let (Ok(r), Some(gpu)) = (&report, &gpu) {
        let verdict = kernel_check::verdict(r);
        if let Err(e) = kernel_check::record(&kernel_check::check_key(gpu), &verdict, &kernel_check::default_store()) {
            fastdet::errln!("warning: the kernel checks' outcome is not remembered for `fastdet run`: {e:#}");
        }
    }
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            fastdet::errln!("selftest: could not start on {device}: {e:#}");
            if let Some(p) = &a.json {
                let j = serde_json::json!({"device": device, "no_device": false, "error": format!("{e:#}"), "passed": false, "rows": []});
                write_json(p, &serde_json::to_string_pretty(&j)?)?;
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    report_end(&report, t0, a.json.as_deref())
}

/// `--device cpu`: the CPU engine's SIMD kernels against their twins.
fn cpu_selftest(a: &SelftestArgs) -> Result<ExitCode> {
    use fastdet::engine::cpu::selftest::CpuChecks;
    if !a.weights.is_empty() || a.kernel_cache.is_some() {
        anyhow::bail!("--weights and --kernel-cache are for the GPU checks; --device cpu has no whole-tomogram check and no compiled kernels");
    }
    let mut checks = CpuChecks::all(a.seed, a.quick);
    checks.kernels = !a.no_kernels;
    if a.no_networks {
        checks.networks = None;
    } else if let Some(t) = a.tile {
        checks.networks = Some(t);
    }
    fastdet::outln!("fastdet {} selftest on cpu{}", fastdet::VERSION, if a.quick { " (quick)" } else { "" })?;
    fastdet::outln!("{}", Row::header())?;
    let t0 = std::time::Instant::now();
    let report = fastdet::engine::cpu::selftest::run(checks, &mut |row| {
        // A failed write shows in the summary's print below.
        let _ = fastdet::outln!("{}", row.line());
        let _ = std::io::stdout().flush();
    })?;
    report_end(&report, t0, a.json.as_deref())
}

/// The end of a report: notes, timings, the summary line, the failures again, the JSON file; the
/// exit status.
fn report_end(report: &selftest::Report, t0: std::time::Instant, json: Option<&Path>) -> Result<ExitCode> {
    fastdet::outln!()?;
    for n in &report.notes {
        fastdet::outln!("note: {n}")?;
    }
    for (what, s) in &report.timings {
        fastdet::outln!("time: {what}: {s:.3} s")?;
    }
    let count = |st: Status| report.rows.iter().filter(|r| r.status == st).count();
    let (pass, fail, skip) = (count(Status::Pass), count(Status::Fail), count(Status::Skip));
    fastdet::outln!(
        "selftest {}: {pass} passed, {fail} failed, {skip} skipped in {:.1} s on {}",
        if report.passed { "PASSED" } else { "FAILED" },
        t0.elapsed().as_secs_f64(),
        report.device
    )?;
    if fail > 0 {
        fastdet::outln!("failures:")?;
        for r in report.rows.iter().filter(|r| r.status == Status::Fail) {
            fastdet::outln!("  {}", r.line())?;
        }
    }
    if let Some(p) = json {
        // The report, and the build it comes from (its logs travel without the checkout).
        let mut doc = serde_json::to_value(report)?;
        if let Some(m) = doc.as_object_mut() {
            m.insert("fastdet_version".into(), env!("CARGO_PKG_VERSION").into());
            m.insert("fastdet_commit".into(), fastdet::COMMIT.into());
        }
        write_json(p, &serde_json::to_string_pretty(&doc)?)?;
        fastdet::outln!("wrote {}", p.display())?;
    }
    // Nothing run is nothing checked (every part turned off): not a pass.
    if pass + fail == 0 {
        fastdet::outln!("nothing was tested (every part turned off, or skipped): exit status 2")?;
        return Ok(ExitCode::from(2));
    }
    Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
