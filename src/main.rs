//! The `fastdet` command line.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "fastdet", version = fastdet::VERSION, about = "Find protein complexes in cryo-ET tomograms with SegResNet / DynUNet point detectors")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Convert PyTorch checkpoints (.ckpt/.pt/.safetensors) into fastdet fp16 weights
    Convert(cli::convert::ConvertArgs),
    /// Show a weights file: architecture, widths, classes, parameters, FLOPs, memory and least traffic per tile
    Inspect(cli::convert::InspectArgs),
    /// Run one model on input tiles from a safetensors file (debugging, cross-checks)
    Forward(cli::forward::ForwardArgs),
    /// Detect particles in tomograms and write picks (Kaggle CSV, copick JSON)
    Run(cli::run::RunArgs),
    /// Score a submission CSV against copick ground truth (Kaggle CZII F-beta)
    Score(cli::score::ScoreArgs),
    /// Pick the per-class thresholds that maximise F-beta on a labelled split (inferring once, or from a scored CSV)
    Tune(cli::run::TuneArgs),
    /// Check every engine op against the CPU reference on random data
    Selftest(cli::selftest::SelftestArgs),
    /// Join the CSV outputs of several shards into one submission
    Merge(cli::merge::MergeArgs),
    /// Write synthetic tomograms with the six particle kinds in the competition layout
    Synth(cli::synth::SynthArgs),
    /// Draw quality-control pictures: z-slabs with picks (and ground truth) as circles
    Qc(cli::qc::QcArgs),
    /// Time one model's forward pass per tile on a device (ms/tile, GFLOP/s, cold start)
    Bench(cli::bench::BenchArgs),
}

fn main() -> ExitCode {
    // `fastdet score --json | head`: a closed pipe ends the process quietly, as it does other
    // command-line tools, instead of a panic in println!.
    #[cfg(unix)]
    // SAFETY: sets signal dispositions at start, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // A file-size limit (`ulimit -f`, passed on by batch schedulers) would kill the process
        // mid-write with no message and leave its temporary file; ignored, the write fails with
        // EFBIG and the writer reports the file and removes the temporary.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    #[cfg(unix)]
    fastdet::util::handle_stop_signals();
    let argv = match cli::config::expand(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            fastdet::errln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version text go to standard output: a failed write there (`> /dev/full`)
            // is a failure too; a reader that stopped early (`| head`) is not. (A usage error
            // goes to standard error and exits 1 whether or not it could be written.)
            let printed = e.print().and_then(|()| std::io::Write::flush(&mut std::io::stdout()));
            if let Some(n) = e.use_stderr().then(|| cli::config::file_note(&e.to_string())).flatten() {
                fastdet::errln!("{n}");
            }
            if let Err(w) = printed {
                if !e.use_stderr() && w.kind() != std::io::ErrorKind::BrokenPipe {
                    fastdet::errln!("error: cannot write to standard output: {w}");
                    return ExitCode::FAILURE;
                }
            }
            // 2 means "output written, some runs failed" (run) or "not one job's whole output"
            // (merge): a usage error, which writes nothing, is a plain failure, so that a
            // script taking 2 for a partial result does not go on after a mistyped option.
            return if e.exit_code() == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE };
        }
    };
    if let Err(e) = fastdet::engine::cpu::simd::check_env() {
        fastdet::errln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Convert(a) => cli::convert::convert(a),
        Command::Bench(a) => cli::bench::bench(a),
        Command::Inspect(a) => cli::convert::inspect(a),
        Command::Forward(a) => cli::forward::forward(a),
        Command::Run(a) => cli::run::run(a),
        Command::Score(a) => cli::score::score(a),
        Command::Tune(a) => cli::run::tune(a),
        Command::Selftest(a) => cli::selftest::selftest(a),
        Command::Merge(a) => cli::merge::merge(a),
        Command::Synth(a) => cli::synth::synth(a),
        Command::Qc(a) => cli::qc::qc(a),
    };
    #[cfg(unix)]
    fastdet::util::wait_if_stopping();
    match result {
        Ok(code) => code,
        Err(e) => {
            fastdet::errln!("error: {e:#}");
            if let Some(n) = cli::config::file_note(&format!("{e:#}")) {
                fastdet::errln!("{n}");
            }
            ExitCode::FAILURE
        }
    }
}
