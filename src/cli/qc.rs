//! `fastdet qc`: one quality-control PNG per run (z-slabs with the picks, optionally the truth).
use anyhow::{bail, Context, Result};
use clap::Args;
use fastdet::io::{copick, csv, dataset, zarr};
use fastdet::qc::{self, QcOptions};
use super::run::{file_voxel_size, parse_voxel_size, VoxelSize};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Each run's tomogram (full resolution) is cut into --slabs equal z ranges, each shown as its mean \
projection, contrast-stretched to its 1st-99th percentile; every pick is drawn as a ring of its particle radius \
(Å / --voxel-size) in its class colour on the slab that holds its centre z. \
Small tomograms are enlarged by an integer factor so a slab is at least 256 px wide.\n\
Examples:\n  fastdet qc --data tests/fixtures/dataset --split test --picks sub.csv --out qc --truth\n  fastdet qc --mrc tomos/*.mrc --picks sub.csv --out qc")]
pub struct QcArgs {
    /// Dataset root (copick layout: {split}/static/ExperimentRuns/{run}/VoxelSpacing*/denoised.zarr)
    #[arg(long, required_unless_present_any = ["copick_config", "zarr", "mrc"])]
    pub data: Option<PathBuf>,
    /// Tomograms as zarr stores instead of --data, each run named as `run --zarr` names it
    #[arg(long, value_name = "PATH", num_args = 1.., conflicts_with_all = ["data", "copick_config", "mrc"])]
    pub zarr: Vec<PathBuf>,
    /// Tomograms as MRC files instead of --data, each run named after its file (`TS_5.mrc` is TS_5),
    /// as `run --mrc` names it
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["data", "copick_config"])]
    pub mrc: Vec<PathBuf>,
    /// Split under the dataset root
    #[arg(long, default_value = "test")]
    pub split: String,
    /// A copick project's configuration file (JSON) instead of --data (local paths only)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["data", "split"])]
    pub copick_config: Option<PathBuf>,
    /// Tomogram type drawn: {run}/VoxelSpacing*/{NAME}.zarr
    #[arg(long, value_name = "NAME", default_value = fastdet::io::dataset::DEFAULT_TOMOGRAM)]
    pub tomogram: String,
    /// Submission CSV to draw (id,experiment,particle_type,[score,]x,y,z; coordinates in Å)
    #[arg(long)]
    pub picks: PathBuf,
    /// Output directory (created if missing); writes {run}.png for each run
    #[arg(short, long)]
    pub out: PathBuf,
    /// Add a second row with the ground truth from {data}/{split}/overlay/ExperimentRuns/{run}/Picks
    /// (or the copick project's picks)
    #[arg(long)]
    pub truth: bool,
    /// Comma-separated runs to draw [default: every run of the split]
    #[arg(long, value_delimiter = ',')]
    pub runs: Option<Vec<String>>,
    /// Voxel size in Å of the full-resolution tomogram, as `run` took it (Å coordinates are
    /// turned back into its voxels; the file's own size only warns), or `file`: each file's own
    #[arg(long, value_name = "Å|file", default_value_t = VoxelSize::Angstrom(fastdet::particles::ANGSTROM_PER_VOXEL), value_parser = parse_voxel_size)]
    pub voxel_size: VoxelSize,
    /// Number of z-slabs per row (at most the tomogram depth in voxels)
    #[arg(long, default_value_t = 4)]
    pub slabs: usize,
}

pub fn qc(a: QcArgs) -> Result<ExitCode> {
    if a.slabs == 0 {
        bail!("--slabs must be at least 1");
    }
    if let VoxelSize::Angstrom(v) = a.voxel_size {
        if !(v.is_finite() && v > 0.0) {
            bail!("--voxel-size {v}: must be a positive number of Å, or file");
        }
    }
    // The tomograms: a dataset's (and its truth), or files given one by one, each a run.
    let files: Vec<(String, PathBuf, bool)> = if a.zarr.is_empty() && a.mrc.is_empty() { Vec::new() } else { super::run::file_runs(&a.zarr, &a.mrc)? };
    let layout = if files.is_empty() {
        Some(dataset::Layout::from_flags(a.data.as_deref(), &a.split, a.copick_config.as_deref())?.context("give --data ROOT, --copick-config FILE, --zarr PATH... or --mrc FILE...")?)
    } else {
        if a.truth {
            bail!("--truth draws a dataset's ground truth: give --data ROOT or --copick-config FILE, not --zarr or --mrc");
        }
        None
    };
    let source = match &layout {
        Some(l) => l.describe(),
        None => format!("the {} given", if a.zarr.is_empty() { "--mrc files" } else { "--zarr stores" }),
    };
    let known: Vec<String> = match &layout {
        Some(l) => l.discover_runs()?,
        None => files.iter().map(|(r, _, _)| r.clone()).collect(),
    };
    let runs: Vec<String> = match &a.runs {
        Some(r) => {
            // A misspelt run is refused before any picture, as `run` and `score` refuse it.
            let chosen: Vec<String> = r.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            if let Some(r) = chosen.iter().find(|r| !known.contains(r)) {
                bail!("run {r:?} is not in {source}");
            }
            chosen
        }
        None => known,
    };
    if runs.is_empty() {
        bail!("no runs to draw under {source}");
    }
    let (picks, others) = csv::read_submission_of_known_types(&a.picks)?;
    if let Some(w) = csv::other_types_warning(&a.picks, &others) {
        fastdet::errln!("warning: {w}");
    }
    let truth = match (&layout, a.truth) {
        (Some(l), true) => Some(copick::read_truth(l)?),
        _ => None,
    };
    let wanted: BTreeSet<&str> = runs.iter().map(String::as_str).collect();
    let elsewhere: BTreeSet<&str> = picks.iter().map(|p| p.run.as_str()).filter(|r| !wanted.contains(r)).collect();
    if !elsewhere.is_empty() && a.runs.is_none() {
        fastdet::errln!("warning: {} has picks of runs not in {source}: {}", a.picks.display(), super::score::first_few(elsewhere.iter().copied()));
    }
    if a.out.exists() && !a.out.is_dir() {
        bail!("--out {}: is not a directory", a.out.display());
    }
    let made = !a.out.exists();
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}: cannot create output directory", a.out.display()))?;

    // One run's picture; a run that fails (an unreadable tomogram) does not stop the others.
    let draw = |run: &String| -> Result<String> {
        if run.contains(['/', '\\']) || run == "." || run == ".." {
            bail!("run name {run:?} cannot be used as a file name");
        }
        let (path, volume) = match &layout {
            Some(l) => {
                let path = l.tomogram_path(run, &a.tomogram)?;
                let v = zarr::read_zarr_volume(&path, zarr::DEFAULT_LEVEL)?;
                (path, v)
            }
            None => {
                let (_, path, mrc) = files.iter().find(|(r, _, _)| r == run).context("internal error: a run without its file")?;
                (path.clone(), super::run::read_volume(path, zarr::DEFAULT_LEVEL, *mrc)?)
            }
        };
        // What the reader noted (absent chunks, axes, units) bears on the picture as on a run.
        for n in &volume.notes {
            fastdet::errln!("  warning: {}: {n}", path.display());
        }
        let run_picks: Vec<_> = picks.iter().filter(|p| &p.run == run).cloned().collect();
        let run_truth: Option<Vec<_>> =
            truth.as_ref().map(|t| t.iter().filter(|p| &p.run == run).cloned().collect());
        let out = a.out.join(format!("{run}.png"));
        // The legend's counts read "picks/truth" when the truth is drawn.
        let title = if run_truth.is_some() { format!("{run}   (legend: picks/truth)") } else { run.clone() };
        let voxel_size = match a.voxel_size {
            VoxelSize::Angstrom(v) => {
                if let Some(w) = volume.voxel_size_warning(v, None) {
                    fastdet::errln!("  warning: {}: {w}", path.display());
                }
                v
            }
            VoxelSize::File => file_voxel_size(&volume, &path)?,
        };
        let opts = QcOptions { slabs: a.slabs, title: Some(title), voxel_size: Some(voxel_size), ..QcOptions::default() };
        let s = qc::render_qc_with(&volume, &run_picks, run_truth.as_deref(), &out, &opts)?;
        // Centres outside the volume on any axis (voxel i spans i ± 0.5): many of them usually
        // mean another voxel size than the picks were made at.
        let outside = |ps: &[fastdet::particles::Pick]| {
            ps.iter()
                .filter(|p| [p.z, p.y, p.x].iter().zip(volume.shape).any(|(&c, n)| !(c / voxel_size >= -0.5 && c / voxel_size < n as f64 - 0.5)))
                .count()
        };
        let mut line = format!("{run}: {} picks", run_picks.len());
        let (off, undrawn) = (outside(&run_picks), run_picks.len() - s.picks_drawn);
        if off > 0 {
            line += &format!(" ({off} outside the tomogram, {undrawn} of them not drawn: is --voxel-size {voxel_size} Å what the picks were made at?)");
        }
        if let Some(t) = &run_truth {
            line += &format!(", {} truth", t.len());
            let off = outside(t);
            if off > 0 {
                line += &format!(" ({off} outside, {} not drawn)", t.len() - s.truth_drawn);
            }
        }
        Ok(format!("{line} -> {} ({}x{} px)", out.display(), s.width, s.height))
    };
    let mut failed = Vec::new();
    for run in &runs {
        match draw(run) {
            Ok(line) => fastdet::outln!("{line}")?,
            Err(e) => {
                fastdet::errln!("  {run}: FAILED: {e:#}");
                failed.push((run, e));
            }
        }
    }
    if failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    if made && failed.len() == runs.len() {
        // Nothing drawn: the folder this call made goes again.
        let _ = std::fs::remove_dir(&a.out);
    }
    fastdet::errln!("{} of {} run(s) failed:", failed.len(), runs.len());
    for (run, e) in &failed {
        fastdet::errln!("  {run}: {e:#}");
    }
    // 2: some pictures were drawn; 1: none was.
    Ok(if failed.len() == runs.len() { ExitCode::FAILURE } else { ExitCode::from(2) })
}
