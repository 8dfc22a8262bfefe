use anyhow::{bail, Context, Result};
use clap::Args;
use fastdet::engine::{self, Device};
use fastdet::io::{copick, csv, dataset, tensors, zarr};
use fastdet::metric;
use fastdet::particles::{Pick, CLASSES};
use fastdet::pipeline::detect::to_picks_scaled;
use fastdet::engine::cuda::kernel_check::{self, CheckKernels};
use fastdet::engine::cuda::{PendingVolume, SideUploader};
use fastdet::pipeline::runner::{predict_and_detect, Ensemble, Prepared, Settings, Timing, Tta};
use fastdet::pipeline::rescale::{self, needs_resampling};
use fastdet::pipeline::tiling::normalize_unit_range;
use fastdet::weights::Weights;
use fastdet::model::spec::ModelSpec;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

pub fn parse_triple(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> =
        s.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|e| format!("{s:?}: {e}"))?;
    v.try_into().map_err(|_| format!("{s:?}: expected three comma-separated integers z,y,x"))
}

fn check_thresholds(v: &[f32]) -> Result<()> {
    if v.len() != CLASSES.len() {
        bail!("--thresholds: got {} values, expected {} in class order ({})", v.len(), CLASSES.len(), class_list());
    }
    if let Some((c, t)) = CLASSES.iter().zip(v).find(|(_, t)| !(0.0..=1.0).contains(*t)) {
        bail!("--thresholds: {} = {t} is not a probability between 0 and 1", c.name);
    }
    Ok(())
}

/// Where the tomograms' voxel size comes from: a number of Å, or each file's own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VoxelSize {
    Angstrom(f64),
    File,
}

impl std::fmt::Display for VoxelSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VoxelSize::Angstrom(v) => write!(f, "{v}"),
            VoxelSize::File => write!(f, "file"),
        }
    }
}

/// `--voxel-size`: `file` or a number (checked for sign in [`settings`], which names the flag).
pub fn parse_voxel_size(s: &str) -> Result<VoxelSize, String> {
    if s == "file" {
        return Ok(VoxelSize::File);
    }
    s.parse().map(VoxelSize::Angstrom).map_err(|_| format!("expected a number of Å or `file`, got {s:?}"))
}

/// `--voxel-size file`: the voxel size `vol`'s file records, or an error naming `path`.
pub fn file_voxel_size(vol: &zarr::Volume, path: &Path) -> Result<f64> {
    vol.voxel_size.with_context(|| format!("{}: the file records no voxel size, which --voxel-size file needs: give its size in Å instead", path.display()))
}

fn class_list() -> String {
    CLASSES.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

/// Inputs, models and detection settings shared by `run` and `tune`.
#[derive(Args, Clone)]
pub struct InferArgs {
    /// Dataset root in the competition layout ({split}/static/ExperimentRuns/{run}/VoxelSpacing10.000/denoised.zarr)
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Split under --data
    #[arg(long, default_value = "test")]
    pub split: String,
    /// A copick project's configuration file (JSON) instead of --data: the runs of its static_root
    /// (and overlay_root), read as copick does; local paths only
    #[arg(long, value_name = "FILE", conflicts_with_all = ["data", "zarr", "mrc", "split"])]
    pub copick_config: Option<PathBuf>,
    /// Tomogram type read under --data or --copick-config: {run}/VoxelSpacing*/{NAME}.zarr (the
    /// competition has denoised, wbp, ctfdeconvolved and isonetcorrected)
    #[arg(long, value_name = "NAME", default_value = fastdet::io::dataset::DEFAULT_TOMOGRAM, conflicts_with_all = ["zarr", "mrc"])]
    pub tomogram: String,
    /// Only these runs (comma-separated names) of --data or --copick-config
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["zarr", "mrc"])]
    pub runs: Vec<String>,
    /// OME-Zarr groups or zarr arrays instead of --data (each run is named after the file stem, or after the run folder in the competition layout: {run}/VoxelSpacing*/denoised.zarr)
    #[arg(long, num_args = 1.., conflicts_with_all = ["data", "mrc"])]
    pub zarr: Vec<PathBuf>,
    /// MRC2014 tomograms (.mrc/.rec) instead of --data (each run is named after its file stem)
    #[arg(long, num_args = 1.., conflicts_with = "data")]
    pub mrc: Vec<PathBuf>,
    /// Multiscale level to read. Coordinates and particle radii still use --voxel-size: give the
    /// level's own with it (e.g. --level 1 --voxel-size 20.024 for the competition's second
    /// level, or --voxel-size file to take it from the metadata; --resample to bring it to the
    /// models' voxel size). auto: per tomogram, the level whose voxel size is nearest the models'
    /// (needs --voxel-size file), and in a copick project of several VoxelSpacing folders, the
    /// folder nearest them
    #[arg(long, default_value = "0")]
    pub level: String,
    /// fastdet weights files (any number, mixed architectures): one ensemble
    #[arg(long, num_args = 1..)]
    pub weights: Vec<PathBuf>,
    /// auto, cpu or cuda:N. auto: every GPU the CUDA driver sees (CUDA_VISIBLE_DEVICES limits
    /// them), one worker each, else the CPU, saying why (emu:N: the CUDA engine on a host
    /// emulator of its kernels, no GPU; slow, for testing)
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// One worker per listed GPU in this process (e.g. 0,1; 0,0 runs two workers on one card);
    /// worker k takes runs[k::n]; the output is the same as with one device
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    pub gpus: Vec<usize>,
    /// Several workers on the listed devices (e.g. cpu,cpu or cuda:0,cuda:1), like --gpus
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["device", "gpus"])]
    pub devices: Vec<String>,
    /// Sliding window z,y,x in voxels
    #[arg(long, default_value = "192,128,128", value_parser = parse_triple)]
    pub window: [usize; 3],
    /// Tiles per axis z,y,x (starts spread like numpy.linspace)
    #[arg(long, default_value = "1,9,9", value_parser = parse_triple)]
    pub tiles: [usize; 3],
    /// Greedy NMS keypoint-similarity threshold
    #[arg(long, default_value_t = 0.85)]
    pub iou: f64,
    /// Candidates per class kept before the greedy NMS
    #[arg(long, default_value_t = 16536)]
    pub top_k: usize,
    /// Tile blending weight sigma (stride-2 grid cells)
    #[arg(long, default_value_t = 15.0)]
    pub blend_sigma: f64,
    /// Test-time augmentation: none, flip (z/y/x flips) or rot90 (four yx rotations)
    #[arg(long, default_value = "none")]
    pub tta: String,
    /// Tiles per engine call
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Cut the tiles, average the ensemble and blend them on the CPU. By default a CUDA worker
    /// does all of that on its GPU, and finds the peak candidates there too: the volume goes up
    /// once per tomogram, and only the candidates come back (the maps too with --save-maps); the
    /// greedy NMS stays on the CPU. Both give the same picks
    #[arg(long)]
    pub host_blend: bool,
    /// The default on CUDA workers (see --host-blend); accepted for older scripts
    #[arg(long, hide = true, conflicts_with = "host_blend")]
    pub device_blend: bool,
    /// Process only runs[K::N] of the sorted run list (cluster job arrays), as K/N with K counted from 0 (0/2 takes the 1st, 3rd, 5th... run, 1/2 the others)
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
    /// The tomograms' voxel size in Å, which converts picks to Å and particle radii to voxels;
    /// `file`: each file's own (MRC header, OME-Zarr scale; a file that records none fails). A
    /// number wins over the files' own sizes, which then only warn
    #[arg(long, value_name = "Å|file", default_value_t = VoxelSize::Angstrom(fastdet::particles::ANGSTROM_PER_VOXEL), value_parser = parse_voxel_size)]
    pub voxel_size: VoxelSize,
    /// Resample each tomogram whose voxel size (--voxel-size) differs from the models' by more
    /// than 1% to theirs before inference (linear, antialiased when shrinking); picks stay in the
    /// tomogram's Å, STAR files in its voxels; saved maps and QC images are of the resampled grid
    #[arg(long)]
    pub resample: bool,
    /// The voxel size in Å the models were trained at, which --resample brings tomograms to (and
    /// --level auto reads the nearest level to)
    #[arg(long, value_name = "Å", default_value_t = fastdet::particles::ANGSTROM_PER_VOXEL)]
    pub model_voxel_size: f64,
    /// Replace NaN/Inf voxels by the mean of the finite ones instead of refusing the tomogram
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// The tomograms' contrast is inverted (particles brighter than the background, as some
    /// pipelines write them): negate them before the [0, 1] scaling, so that the models see
    /// particles dark, as they were trained
    #[arg(long)]
    pub invert: bool,
    /// What fills a window that runs past a volume shorter than it: zero (the seed's: the darkest
    /// value after the [0, 1] scaling) or the volume's mean (for models not trained with zero
    /// padding; peaks are looked for in the tomogram's own extent, as with zero)
    #[arg(long, default_value = "zero", value_parser = ["zero", "mean"])]
    pub pad: String,
}

impl InferArgs {
    /// The project `--data` or `--copick-config` names, if either does.
    pub fn layout(&self) -> Result<Option<dataset::Layout>> {
        dataset::Layout::from_flags(self.data.as_deref(), &self.split, self.copick_config.as_deref())
    }

    /// The devices to run workers on.
    fn devices(&self) -> Result<Vec<Device>> {
        if !self.gpus.is_empty() {
            return Ok(self.gpus.iter().map(|&g| Device::Cuda(g)).collect());
        }
        if !self.devices.is_empty() {
            return self.devices.iter().map(|d| Device::parse(d)).collect();
        }
        if self.uses_auto() {
            return Ok(fastdet::engine::auto_devices().0.clone());
        }
        Ok(vec![Device::parse(&self.device)?])
    }

    /// Whether `--device auto` chooses the devices (no `--gpus` or `--devices` given).
    fn uses_auto(&self) -> bool {
        self.gpus.is_empty() && self.devices.is_empty() && self.device == "auto"
    }
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (k, n) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected K/N, e.g. 0/4"))?;
    let k: usize = k.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    let n: usize = n.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n == 0 || k >= n {
        return Err(format!("{s:?}: need 0 <= K < N"));
    }
    Ok((k, n))
}

#[derive(Args)]
#[command(after_help = "Coordinates in the CSV are in Å (voxel coordinate x the tomogram's voxel size, --voxel-size: 10.012 by default).\nOn a GPU, FASTDET_CONV=measure times cuDNN and our tensor-core kernels on each network at this\n--batch and --window once per card and keeps the fastest (remembered beside the compiled kernels).\n\
The first run on a card checks our kernels there against the CPU engine and remembers the pass\n\
(FASTDET_CHECK_KERNELS=always|never: check at every run, or not at all).\n\
--no-allow-nonfinite, --no-with-score, --no-resume, --no-resample, --no-invert (and --device-blend for\n\
device_blend = false) turn off what a --config file turns on.\nExample:\n  fastdet run --data tests/fixtures/dataset --weights weights/demo_segresnetv2.safetensors weights/demo_dynunet.safetensors \\\n      --window 64,96,96 --tiles 2,3,3 --out sub.csv")]
pub struct RunArgs {
    #[command(flatten)]
    pub infer: InferArgs,
    /// Read options from a TOML file (keys are the long option names, with _ or -; device_blend =
    /// false is --host-blend; [thresholds] per class name; relative paths are relative to the
    /// file); command-line flags override it
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (TOML, seed defaults filled in) and exit
    #[arg(long)]
    pub print_config: bool,
    /// Kaggle CSV output (id,experiment,particle_type,x,y,z; Å)
    #[arg(short, long)]
    pub out: Option<PathBuf>,
    /// Per-class score thresholds in class order (apo-ferritin, beta-galactosidase, ribosome, thyroglobulin, virus-like-particle, beta-amylase)
    #[arg(long, value_delimiter = ',', default_value = "0.255,0.235,0.16,0.205,0.225,0.5")]
    pub thresholds: Vec<f32>,
    /// Add a score column to the CSV
    #[arg(long)]
    pub with_score: bool,
    /// Also write copick picks JSON under DIR/ExperimentRuns/{run}/Picks/
    #[arg(long)]
    pub copick_out: Option<PathBuf>,
    /// copick user id in the picks' file names and JSON (not curation: the ground truth's)
    #[arg(long, default_value = "fastdet")]
    pub user_id: String,
    /// copick session id in the picks' file names and JSON
    #[arg(long, default_value = "0")]
    pub session_id: String,
    /// Write each run's blended scores/offsets maps as DIR/{run}.safetensors (f32; their layout,
    /// class order, stride and voxel size are in the file's metadata)
    #[arg(long)]
    pub save_maps: Option<PathBuf>,
    /// Skip runs whose result already exists in OUT.runs/ (from an interrupted run with the same settings, and the same tomogram files)
    #[arg(long)]
    pub resume: bool,
    /// Also write one RELION 5 STAR file per run as DIR/{run}.star (coordinates in the tomogram's
    /// own voxels, of --voxel-size Å, even with --resample, and in Å from its centre; _rlnClassNumber 1-6 in the CSV's class
    /// order: apo-ferritin, beta-galactosidase, ribosome, thyroglobulin, virus-like-particle,
    /// beta-amylase)
    #[arg(long)]
    pub star_out: Option<PathBuf>,
    /// Also draw a quality-control PNG per run as DIR/{run}.png (z-slabs with the picks)
    #[arg(long)]
    pub qc: Option<PathBuf>,
}

#[derive(Args)]
#[command(after_help = "Each class's threshold keeps the candidates that give the best F-beta on these runs, and lies halfway between the lowest score it keeps and the next lower candidate's (so it does not sit on one candidate's score); a class whose candidates are all false positives keeps none of them (halfway between the top score and 1); a class without annotated particles keeps 0.5.\nExample:\n  fastdet tune --data tests/fixtures/dataset --split test --weights weights/*.safetensors --window 64,96,96 --tiles 2,3,3")]
pub struct TuneArgs {
    #[command(flatten)]
    pub infer: InferArgs,
    /// Lowest threshold considered (candidates below it are never kept)
    #[arg(long, default_value_t = 0.05)]
    pub min_threshold: f32,
    /// F-beta's beta
    #[arg(long, default_value_t = 4.0)]
    pub beta: f64,
    /// Tune on the picks of a `run --with-score` CSV instead of running the models (a job over
    /// the labelled runs, or shards merged). It holds only the candidates its job kept: each
    /// class's threshold is looked for at or above the one the job used (from its OUT.runs
    /// record; the lowest score of the class when there is none), so run it with low
    /// --thresholds. The runs are those its job computed (or else those with picks in it)
    #[arg(long, value_name = "FILE.csv", conflicts_with_all = [
        "weights", "shard", "tta", "zarr", "mrc", "level", "device", "gpus", "devices", "window", "tiles", "iou", "top_k",
        "blend_sigma", "batch", "host_blend", "device_blend", "voxel_size", "resample", "model_voxel_size",
        "allow_nonfinite", "invert", "pad", "tomogram",
    ])]
    pub picks: Option<PathBuf>,
}

struct Job {
    run: String,
    path: PathBuf,
    /// Why the run's tomogram could not be found (the run fails alone, with this error).
    not_found: Option<String>,
    /// Given to --mrc: read as MRC whatever its name, and named as such when it is missing.
    mrc: bool,
}

/// A file's run name: its stem ("run" when it has none).
fn stem_run_name(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "run".into())
}

/// A `--zarr` input's run name, and the absolute path it is read from.
fn zarr_run(z: &Path) -> (String, PathBuf) {
    // Named from the absolute path (`--zarr .` inside the store names it too).
    let z = &std::path::absolute(z).map(|p| p.components().collect::<PathBuf>()).unwrap_or_else(|_| z.to_path_buf());
    // An array given inside its multiscale group (`tomo.zarr/0`, `tomo.zarr/s1`) is named
    // after the group.
    let level_dir = z.file_name().and_then(|n| n.to_str()).map(|n| n.strip_prefix('s').unwrap_or(n)).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let group = match z.parent().filter(|p| level_dir && !p.as_os_str().is_empty()) {
        Some(group) => group,
        None => z.as_path(),
    };
    // In the competition layout (`{run}/VoxelSpacing*/denoised.zarr`) the run is the folder
    // above the voxel spacing, as `--data` names it.
    let spacing = group.parent().filter(|d| d.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("VoxelSpacing")));
    let named = match spacing.and_then(|d| d.parent()).filter(|r| r.file_name().is_some()) {
        Some(run_dir) => run_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        // `tomo.ome.zarr` (the OME-NGFF naming) is run `tomo`.
        None => {
            let s = stem_run_name(group);
            s.strip_suffix(".ome").filter(|r| !r.is_empty()).map(str::to_owned).unwrap_or(s)
        }
    };
    (named, z.clone())
}

/// Tomograms given one by one (`--zarr` stores, else `--mrc` files) as (run, path, read as MRC),
/// in run-name order (as `--data`'s runs), each name once: what `run` and `qc` read.
pub(crate) fn file_runs(zarr: &[PathBuf], mrc: &[PathBuf]) -> Result<Vec<(String, PathBuf, bool)>> {
    let (flag, mut runs): (&str, Vec<(String, PathBuf, bool)>) = if !zarr.is_empty() {
        let runs = zarr.iter().map(|z| {
            let (run, path) = zarr_run(z);
            (run, path, false)
        });
        ("--zarr", runs.collect())
    } else {
        if let Some(d) = mrc.iter().find(|p| p.is_dir()) {
            bail!("--mrc {}: a directory; --mrc takes MRC files (--zarr reads a zarr)", d.display());
        }
        ("--mrc", mrc.iter().map(|p| (stem_run_name(p), p.clone(), true)).collect())
    };
    runs.sort_by(|x, y| x.0.cmp(&y.0));
    if let Some(w) = runs.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("two {flag} inputs share the run name {}: {} and {}", w[0].0, w[0].1.display(), w[1].1.display());
    }
    Ok(runs)
}

fn jobs(a: &InferArgs) -> Result<Vec<Job>> {
    if !a.zarr.is_empty() || !a.mrc.is_empty() {
        if a.zarr.is_empty() && a.level != "0" && a.level != "auto" {
            bail!("--level {}: MRC files hold one level; --level chooses among a zarr's", a.level);
        }
        // Files given one by one, then sharded.
        let mut jobs: Vec<Job> = file_runs(&a.zarr, &a.mrc)?.into_iter().map(|(run, path, mrc)| Job { run, path, not_found: None, mrc }).collect();
        if let Some((k, n)) = a.shard {
            jobs = jobs.into_iter().enumerate().filter(|(i, _)| i % n == k).map(|(_, j)| j).collect();
        }
        return Ok(jobs);
    }
    let layout = a.layout()?.context("give --data ROOT, --copick-config FILE, --zarr PATH or --mrc FILE...")?;
    let mut runs = layout.discover_runs()?;
    if !a.runs.is_empty() {
        // "TS_1, TS_2" as score takes it: spaces around the names are not part of them.
        let chosen: Vec<&str> = a.runs.iter().map(|r| r.trim()).collect();
        for r in &chosen {
            if !runs.iter().any(|x| x == r) {
                bail!("run {r:?} is not in {}", layout.describe());
            }
        }
        runs.retain(|r| chosen.contains(&r.as_str()));
    }
    if runs.is_empty() {
        bail!("no runs found under {}", layout.describe());
    }
    if let Some((k, n)) = a.shard {
        runs = dataset::shard(&runs, k, n);
    }
    Ok(runs
        .into_iter()
        .map(|run| {
            // --level auto: of several voxel spacings, the one nearest the models'.
            let near = (a.level == "auto").then_some(a.model_voxel_size);
            match layout.tomogram_path_near(&run, &a.tomogram, near) {
                Ok(path) => Job { run, path, not_found: None, mrc: false },
                Err(e) => Job { path: layout.default_tomogram_path(&run, &a.tomogram), run, not_found: Some(format!("{e:#}")), mrc: false },
            }
        })
        .collect())
}

/// The ensemble of `--weights` on `device`, and the measured convolution choices with
/// `FASTDET_CONV=measure` (one line per distinct choice: how many models, and the choice).
fn load_ensemble(a: &InferArgs, device: Device) -> Result<(Ensemble, Vec<String>)> {
    let mut engines = Vec::new();
    let mut choices: Vec<(String, usize)> = Vec::new();
    let mut first: Option<Weights> = None;
    // The ensemble's classes, strides and window were checked by `preflight`.
    for p in &a.weights {
        let w = Weights::load(p)?;
        let (e, choice) = engine::open_for(device, &w, a.batch, a.window).with_context(|| format!("{}: cannot open on {device}", p.display()))?;
        engines.push(e);
        if let Some(c) = choice {
            let line = c.log_line();
            match choices.iter_mut().find(|(l, _)| *l == line) {
                Some((_, k)) => *k += 1,
                None => choices.push((line, 1)),
            }
        }
        if first.is_none() {
            first = Some(w);
        }
    }
    let f = first.context("no --weights given")?;
    let choices = choices.into_iter().map(|(line, k)| format!("convolutions of {k} model(s): {line}")).collect();
    Ok((Ensemble { engines, num_classes: f.spec.num_classes, stride: f.spec.stride }, choices))
}

fn settings(a: &InferArgs, thresholds: Vec<f32>) -> Result<Settings> {
    if a.tiles.contains(&0) || a.window.contains(&0) {
        bail!("--window and --tiles must be positive");
    }
    // Each of these would give no picks, or picks at meaningless places, on every run.
    if !(a.iou > 0.0 && a.iou <= 1.0) {
        bail!("--iou {}: the keypoint-similarity threshold must be in (0, 1]", a.iou);
    }
    if a.top_k == 0 {
        bail!("--top-k 0 keeps no candidate");
    }
    if !(a.blend_sigma.is_finite() && a.blend_sigma > 0.0) {
        bail!("--blend-sigma {}: must be a positive number of stride-2 cells", a.blend_sigma);
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if let VoxelSize::Angstrom(v) = a.voxel_size {
        if !(v.is_finite() && v > 0.0) {
            bail!("--voxel-size {v}: must be a positive number of Å, or file");
        }
    }
    if !(a.model_voxel_size.is_finite() && a.model_voxel_size > 0.0) {
        bail!("--model-voxel-size {}: must be a positive number of Å", a.model_voxel_size);
    }
    if a.level != "auto" && a.level.trim().eq_ignore_ascii_case("auto") {
        bail!("--level {:?}: did you mean auto (lower case; other names are the store's arrays)?", a.level);
    }
    if a.level == "auto" && a.voxel_size != VoxelSize::File {
        bail!("--level auto chooses each tomogram's level by the voxel sizes in its metadata: give --voxel-size file too");
    }
    if let (true, VoxelSize::Angstrom(v)) = (a.resample, a.voxel_size) {
        if !needs_resampling(v, a.model_voxel_size) {
            fastdet::errln!(
                "warning: --resample: --voxel-size {v} is within 1% of the models' {} Å, so no tomogram is resampled; --voxel-size file takes each file's own",
                a.model_voxel_size
            );
        }
    }
    let tta = Tta::parse(&a.tta)?;
    if tta == Tta::Rot90 && a.window[1] != a.window[2] {
        bail!("--tta rot90 needs a square yx window, got --window {},{},{}", a.window[0], a.window[1], a.window[2]);
    }
    Ok(Settings {
        window: a.window,
        tiles: a.tiles,
        thresholds,
        iou_threshold: a.iou,
        pre_nms_top_k: a.top_k,
        blend_sigma: a.blend_sigma,
        tta,
        batch: a.batch,
        // Each run's grid in its turn (`Frame`); this one only until then.
        voxel_size: match a.voxel_size {
            VoxelSize::Angstrom(v) if !(a.resample && needs_resampling(v, a.model_voxel_size)) => v,
            _ => a.model_voxel_size,
        },
        device_blend: !a.host_blend,
    })
}

fn is_mrc(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(), Some("mrc" | "rec" | "map" | "mrcs"))
}

pub(crate) fn read_volume(path: &Path, level: &str, mrc: bool) -> Result<zarr::Volume> {
    // A zarr store is a folder: anything else is taken for an MRC (whose reader names what is
    // wrong), and so is whatever was given to --mrc.
    if mrc || is_mrc(path) || (path.exists() && !path.is_dir()) {
        fastdet::io::mrc::read_mrc(path)
    } else {
        zarr::read_zarr_volume(path, level)
    }
}

/// `--level auto`: the level of the run's OME-Zarr group whose voxel size is nearest the models'
/// (level 0 for an MRC file, a lone array, or a group without scales).
fn auto_level(job: &Job, models: f64) -> Result<String> {
    if job.mrc || is_mrc(&job.path) || !job.path.is_dir() {
        return Ok("0".into());
    }
    let levels = zarr::level_voxel_sizes(&job.path)?;
    let Some((chosen, size)) = zarr::nearest_level(&levels, models) else {
        return Ok("0".into());
    };
    if levels.len() > 1 {
        let all: Vec<String> = levels.iter().map(|(p, v)| format!("{p} ({v} Å)")).collect();
        fastdet::errln!("  {}: level {chosen} ({size} Å) of {}, the nearest the models' {models} Å", job.run, all.join(", "));
    }
    Ok(chosen.clone())
}

/// Optional per-run outputs besides the picks.
#[derive(Default, Clone, Copy)]
struct Extras<'a> {
    save_maps: Option<&'a Path>,
    star_out: Option<&'a Path>,
    qc: Option<&'a Path>,
}

impl Extras<'_> {
    /// `run`'s maps, STAR file and QC image, those asked for.
    fn files(&self, run: &str) -> [Option<PathBuf>; 3] {
        [(self.save_maps, "safetensors"), (self.star_out, "star"), (self.qc, "png")].map(|(dir, ext)| dir.map(|d| d.join(format!("{run}.{ext}"))))
    }

    /// A run whose name a requested file cannot hold fails before it is read, not after inference.
    fn check_run_name(&self, run: &str) -> Result<()> {
        if self.star_out.is_some() {
            fastdet::io::star::check_run_name(run)?;
        }
        Ok(())
    }

    fn check_dirs(&self) -> Result<()> {
        for (flag, d) in [("--save-maps", self.save_maps), ("--star-out", self.star_out), ("--qc", self.qc)] {
            if let Some(d) = d {
                writable_dir(flag, d)?;
            }
        }
        Ok(())
    }
}

/// Creates `dir` when missing and checks that files can be written there (before the inference).
fn writable_dir(flag: &str, dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("{flag} {}: is not a directory", dir.display());
    }
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).with_context(|| format!("{flag} {}: cannot create the directory", dir.display()))?;
    }
    let probe = dir.join(format!(".fastdet-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("{flag} {}: cannot write into the directory", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The checks of a job's inputs and models that need no tomogram: before anything is written.
fn preflight(a: &InferArgs) -> Result<Vec<Job>> {
    let jobs = jobs(a)?;
    if a.weights.is_empty() {
        bail!("give --weights FILE... (fastdet weights, see `fastdet convert`; `tune --picks FILE` tunes on a scored CSV instead)");
    }
    check_models(a)?;
    Ok(jobs)
}

/// Refuses a model given twice, by two names or as two copies of one file: the ensemble's mean
/// would weigh it double (a glob and an explicit path make that easy).
fn same_weights_twice(weights: &[PathBuf]) -> Result<()> {
    if let Some((j, i)) = super::merge::given_twice(weights) {
        bail!("{}: given twice to --weights (as model {} and {}); the ensemble would weigh it double", weights[i].display(), j + 1, i + 1);
    }
    // Copies, and one checkpoint converted twice (other names or metadata): the same tensors.
    // Only files whose tensor data have one size are read and compared.
    let sizes: Vec<Option<u64>> = weights.iter().map(|p| Weights::tensor_data_len(p).ok()).collect();
    let mut digests: Vec<Option<String>> = vec![None; weights.len()];
    for i in 0..weights.len() {
        for j in 0..i {
            if sizes[i].is_none() || sizes[i] != sizes[j] {
                continue;
            }
            for k in [i, j] {
                if digests[k].is_none() {
                    digests[k] = Some(Weights::tensors_sha256(&weights[k])?);
                }
            }
            if digests[i] == digests[j] {
                bail!(
                    "{}: the same tensors as {} (models {} and {} of --weights are one model); the ensemble would weigh it double",
                    weights[i].display(),
                    weights[j].display(),
                    j + 1,
                    i + 1
                );
            }
        }
    }
    Ok(())
}

/// The models form one ensemble for this pipeline (the six CZII classes, one stride) and each
/// takes the window: the checks a run would otherwise fail on every tomogram, made from the
/// weights' headers before any tomogram is read.
fn check_models(a: &InferArgs) -> Result<()> {
    let mut first: Option<(&Path, ModelSpec, Vec<String>)> = None;
    for p in &a.weights {
        let (spec, classes) = Weights::read_spec(p)?;
        fastdet::model::graph::Graph::build(&spec)
            .and_then(|g| g.check_tile(a.window))
            .with_context(|| format!("{}: cannot take --window {},{},{}", p.display(), a.window[0], a.window[1], a.window[2]))?;
        match &first {
            Some((f, fspec, fclasses)) => {
                if *fclasses != classes || fspec.stride != spec.stride {
                    bail!(
                        "{} does not fit the ensemble: classes {:?} stride {} vs {} with classes {:?} stride {}",
                        p.display(),
                        classes,
                        spec.stride,
                        f.display(),
                        fclasses,
                        fspec.stride
                    );
                }
            }
            None => {
                if classes.len() != CLASSES.len() || classes.iter().zip(CLASSES.iter()).any(|(a, b)| *a != b.name) {
                    bail!("{}: classes {:?} are not the six CZII classes this pipeline scores", p.display(), classes);
                }
                first = Some((p, spec, classes));
            }
        }
    }
    // After the checks above, which name what is wrong with one file more exactly.
    same_weights_twice(&a.weights)?;
    if let Some((_, spec, _)) = &first {
        if let Some(w) = fastdet::pipeline::blend::vanishing_weight_warning(a.window.map(|x| x / spec.stride.max(1)), a.blend_sigma) {
            fastdet::errln!("warning: {w}");
        }
    }
    Ok(())
}

/// How one run's voxels relate to Å.
#[derive(Debug, Clone, Copy)]
struct Frame {
    /// The tomogram's voxel size (Å) and shape as read: STAR files are in its voxels.
    voxel_size: f64,
    shape: [usize; 3],
    /// The voxel size of the grid the models see: theirs when the tomogram was resampled, else
    /// the tomogram's. Picks are its voxel coordinates times this.
    grid_voxel_size: f64,
}

/// A tomogram the reader thread has read, checked and normalised, and whose copy to the device it
/// has issued when the worker's ensemble takes the volume there (`upload`).
struct Loaded {
    /// Normalised, and with `--pad mean` padded to the window where it is shorter.
    vol: zarr::Volume,
    /// The shape the models see: the tomogram's own, or the resampled one.
    shape: [usize; 3],
    frame: Frame,
    read_s: f64,
    upload: Option<PendingVolume>,
    /// The tomogram's files as they were read ([`fastdet::util::source_stamp`]); empty when they
    /// changed while being read.
    stamp: String,
}

/// `load`, the normalisation, and the copy to the device through `uploader` when there is one; a
/// copy that fails here is only reported (the volume then goes up when its turn comes).
fn prepare(job: &Job, a: &InferArgs, s: &Settings, uploader: Option<&mut SideUploader>) -> Result<Loaded> {
    // A name the CSV cannot hold fails this run before it is read, not the job at the end.
    csv::check_run_name(&job.run)?;
    if let Some(e) = &job.not_found {
        bail!("{e}");
    }
    let t = Instant::now();
    let before = fastdet::util::source_stamp(&job.path);
    let (mut vol, frame, _) = load(job, a, s)?;
    // Files that changed during the read (a copy still going on) get no stamp: a resumed job
    // computes the run again rather than trust picks of a half-written tomogram.
    let stamp = if fastdet::util::source_stamp(&job.path) == before { before } else { String::new() };
    if a.invert {
        vol.data.iter_mut().for_each(|v| *v = -*v);
    }
    normalize_unit_range(&mut vol.data);
    let shape = vol.shape;
    let longer = std::array::from_fn(|i| shape[i].max(s.window[i]));
    if a.pad == "mean" && longer != shape {
        let mean = vol.data.iter().map(|&v| v as f64).sum::<f64>() / vol.data.len().max(1) as f64;
        vol.data = fastdet::pipeline::tiling::pad_volume(&vol.data, shape, longer, mean as f32);
        vol.shape = longer;
    }
    let read_s = t.elapsed().as_secs_f64();
    let upload = uploader.and_then(|u| {
        u.upload_or_defer(&vol.data, &job.run).unwrap_or_else(|e| {
            fastdet::errln!("  warning: {}: the early copy to the device failed ({e:#}); the volume goes up when its turn comes", job.run);
            None
        })
    });
    Ok(Loaded { vol, shape, frame, read_s, upload, stamp })
}

/// Reads one tomogram, checks it and, with `--resample`, brings it to the models' voxel size
/// (runs on the reader thread, ahead of inference).
fn load(job: &Job, a: &InferArgs, s: &Settings) -> Result<(zarr::Volume, Frame, f64)> {
    let t = Instant::now();
    let level = if a.level == "auto" { auto_level(job, a.model_voxel_size)? } else { a.level.clone() };
    let mut vol = read_volume(&job.path, &level, job.mrc)?;
    let bad = zarr::count_nonfinite(&vol.data);
    if bad > 0 {
        if !a.allow_nonfinite {
            // What the reader noted (absent chunks read as a NaN fill value) may be why.
            let noted = vol.notes.iter().map(|n| format!("; {n}")).collect::<String>();
            bail!(
                "{}: {bad} of {} voxels are NaN or infinite (pass --allow-nonfinite to replace them by the volume mean){noted}",
                job.path.display(),
                vol.data.len()
            );
        }
        let (sum, n) = vol.data.iter().filter(|v| v.is_finite()).fold((0.0f64, 0usize), |(s, n), &v| (s + v as f64, n + 1));
        if n == 0 {
            bail!("{}: every voxel is NaN or infinite: nothing to replace them by, nothing to detect", job.path.display());
        }
        let mean = (sum / n as f64) as f32;
        vol.data.iter_mut().filter(|v| !v.is_finite()).for_each(|v| *v = mean);
        fastdet::errln!("  {}: replaced {bad} non-finite voxels by the mean {mean}", job.run);
    }
    // On the volume as read (before any resampling): the voxel named is the file's.
    if let Some(w) = range_warning(&vol.data, vol.shape) {
        let at_level = if level != "0" { format!(" (level {level})") } else { String::new() };
        fastdet::errln!("  warning: {}{at_level}: {w}", job.path.display());
    }
    let models = a.model_voxel_size;
    let (voxel_size, source) = match a.voxel_size {
        VoxelSize::Angstrom(v) => {
            if let Some(w) = vol.voxel_size_warning(v, Some((models, a.resample))) {
                fastdet::errln!("  warning: {}: {w}", job.path.display());
            }
            (v, "--voxel-size")
        }
        VoxelSize::File => (
            file_voxel_size(&vol, &job.path)?,
            "the file's",
        ),
    };
    let frame = Frame { voxel_size, shape: vol.shape, grid_voxel_size: voxel_size };
    let frame = if needs_resampling(voxel_size, models) && a.resample {
        // A voxel size in the wrong unit, or a binned size on an unbinned tomogram, would ask
        // for many times the memory: refused, naming the file.
        let shape = rescale::checked_resampled_shape(vol.shape, voxel_size, models).with_context(|| {
            format!(
                "{}: resampling it from {voxel_size} Å ({source}) to {models} Å voxels would make more than {} voxels: is that voxel size right?",
                job.path.display(),
                rescale::MAX_RESAMPLED_VOXELS
            )
        })?;
        let dims = |s: [usize; 3]| s.map(|n| n.to_string()).join("x");
        // Too small to hold a ribosome (150 Å): a header's unset 1 Å, or Å taken for nm.
        if shape.iter().any(|&n| n < rescale::MIN_RESAMPLED_AXIS) {
            bail!(
                "{}: resampling it from {voxel_size} Å ({source}) to {models} Å voxels would make it {} voxels, too small to find particles in: is that voxel size right?{}",
                job.path.display(),
                dims(shape),
                if voxel_size == 1.0 { " (1 Å is what a header that was never set holds)" } else { "" }
            );
        }
        fastdet::errln!("  {}: resampled from {voxel_size} Å to {models} Å voxels, {} to {}", job.run, dims(vol.shape), dims(shape));
        let (data, shape) = rescale::resample(std::mem::take(&mut vol.data), vol.shape, voxel_size, models);
        (vol.data, vol.shape, vol.voxel_size) = (data, shape, Some(models));
        Frame { grid_voxel_size: models, ..frame }
    } else {
        // Said once: a file's own size other than the flag's, and far from the models', was
        // warned about above with what the models would make of it.
        let warned = matches!(a.voxel_size, VoxelSize::Angstrom(v) if vol.voxel_size.is_some_and(|f| (f - v).abs() > 1e-3 && needs_resampling(f, models)));
        if needs_resampling(voxel_size, models) && !warned {
            fastdet::errln!(
                "  warning: {}: voxel size {voxel_size} Å ({source}): its particles look {:.2}x their size to the models, made for {models} Å; --resample brings it to theirs",
                job.path.display(),
                models / voxel_size
            );
        }
        frame
    };
    // The models' window multiple, read from the weights' headers only when a warning needs it.
    let multiple = || a.weights.iter().filter_map(|p| Weights::read_spec(p).ok()).map(|(spec, _)| spec.size_multiple()).max();
    for line in vol.notes.iter().cloned().chain(coverage_warnings(vol.shape, s.window, s.tiles, a.pad == "zero", s.tta == Tta::Rot90, multiple)) {
        fastdet::errln!("  warning: {}: {line}", job.path.display());
    }
    if let Some(&first) = vol.data.first() {
        if vol.data.iter().all(|&v| v == first) {
            fastdet::errln!("  warning: {}: every voxel is {first}: no contrast, any pick is meaningless", job.path.display());
        }
    }
    Ok((vol, frame, t.elapsed().as_secs_f64()))
}

/// The share of the value range that the middle 98 % of the voxels (1st to 99th percentile) must
/// fill, below which [`range_warning`] speaks. Gaussian noise fills about 40 % of its range, a
/// tomogram with gold beads still well over 10 %; under 2 %, the min-max scaling has squeezed the
/// content into a sliver of [0, 1].
const RANGE_SHARE: f64 = 0.02;

/// When a few extreme voxels set the [0, 1] scaling (a hot pixel, a value of 1e30 in a damaged
/// file) and the models see the rest nearly flat. Names the extreme voxels (z, y, x) so they can
/// be found. The percentiles come from at most about a million voxels taken at a fixed stride.
fn range_warning(data: &[f32], shape: [usize; 3]) -> Option<String> {
    let n = data.len();
    if n < 2 {
        return None;
    }
    let (mut lo, mut hi) = ((f32::INFINITY, 0usize), (f32::NEG_INFINITY, 0usize));
    for (i, &v) in data.iter().enumerate() {
        if v < lo.0 {
            lo = (v, i);
        }
        if v > hi.0 {
            hi = (v, i);
        }
    }
    let range = hi.0 as f64 - lo.0 as f64;
    if !(range.is_finite() && range > 0.0) {
        return None;
    }
    let mut sample: Vec<f32> = data.iter().step_by((n >> 20).max(1)).copied().filter(|v| v.is_finite()).collect();
    let m = sample.len();
    let at_rank = |s: &mut Vec<f32>, q: f64| *s.select_nth_unstable_by(((m - 1) as f64 * q).round() as usize, f32::total_cmp).1 as f64;
    let (p01, p99) = (at_rank(&mut sample, 0.01), at_rank(&mut sample, 0.99));
    let share = (p99 - p01) / range;
    // (Most voxels of one value, a masked or padded volume, is not this: the rest spans the range.)
    if share >= RANGE_SHARE || p99 == p01 {
        return None;
    }
    // Those farther out than ten times the middle's spread: repairing one of several only shows
    // the next.
    let reach = 10.0 * (p99 - p01);
    let extreme = data.iter().filter(|&&v| (v as f64) < p01 - reach || (v as f64) > p99 + reach).count();
    let at = |i: usize| format!("z,y,x {},{},{}", i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2]);
    // 1e30, not thirty-one digits.
    let value = |v: f32| if v != 0.0 && !(1e-3..1e6).contains(&v.abs()) { format!("{v:e}") } else { format!("{v}") };
    // The side that lies farther from the middle voxels is the one to blame.
    let (worst, other) = if hi.0 as f64 - p99 >= p01 - lo.0 as f64 { (("highest", hi), ("lowest", lo)) } else { (("lowest", lo), ("highest", hi)) };
    let share = if share < 1e-4 { "under 0.01%".to_string() } else { format!("{:.2}%", 100.0 * share) };
    Some(format!(
        "98% of its voxels lie in {share} of its value range, set by {extreme} extreme voxel(s) (the {} {} at {}, the {} {} at {}): the [0, 1] scaling by min and max leaves the rest nearly flat to the models; clip or repair them",
        worst.0,
        value(worst.1 .0),
        at(worst.1 .1),
        other.0,
        value(other.1 .0),
        at(other.1 .1)
    ))
}

/// What a user should hear about how the window and tiles meet a volume of `shape`: axes shorter
/// than the window (the zero padding is darker than any voxel after the [0, 1] normalisation, and
/// enters the normalisation layers of every tile: with models not trained on it, detections fail
/// throughout the volume; not said up to the seed's own 8 slices in 192), in one warning with a
/// window the models take (`multiple`) that fits them all (square in yx for `--tta rot90`); an
/// axis the tiles leave gaps on (voxels no tile sees); tiles that repeat one start.
fn coverage_warnings(
    shape: [usize; 3],
    window: [usize; 3],
    tiles: [usize; 3],
    zero_pad: bool,
    square_yx: bool,
    multiple: impl Fn() -> Option<usize>,
) -> Vec<String> {
    let mut out = Vec::new();
    let names = ["z", "y", "x"];
    let list = |v: [usize; 3]| v.map(|x| x.to_string()).join(",");
    let short: Vec<usize> = (0..3).filter(|&i| zero_pad && window[i].saturating_sub(shape[i]) * 24 > window[i]).collect();
    if !short.is_empty() {
        let advice = match multiple() {
            Some(m) if short.iter().all(|&i| shape[i] >= m) => {
                let mut win = window;
                for &i in &short {
                    win[i] = shape[i] / m * m;
                }
                if square_yx && win[1] != win[2] {
                    let v = win[1].min(win[2]);
                    (win[1], win[2]) = (v, v);
                }
                let mut til = tiles;
                for i in 0..3 {
                    let cover = shape[i].div_ceil(win[i]);
                    if short.contains(&i) {
                        til[i] = cover;
                    } else if win[i] != window[i] {
                        til[i] = til[i].max(cover);
                    }
                }
                format!("; a window that fits: --window {} --tiles {} (or --pad mean)", list(win), list(til))
            }
            Some(m) => format!("; the models take windows in multiples of {m}, longer than the volume there: --pad mean fills the window with the volume's mean"),
            None => "; --pad mean fills the window with the volume's mean".to_string(),
        };
        let axes: Vec<String> = short.iter().map(|&i| format!("{} ({} voxels of padding)", names[i], window[i] - shape[i])).collect();
        out.push(format!(
            "the window ({}) is longer than the volume ({}) along {}: zero padding, darker than any voxel, enters every tile's normalisation and can hide particles throughout the volume (the seed's models were trained with 8 in 192){advice}",
            list(window),
            list(shape),
            axes.join(" and ")
        ));
    }
    for (axis, name) in names.iter().enumerate() {
        let (n, w, t) = (shape[axis], window[axis], tiles[axis]);
        if w <= n && w * t < n {
            out.push(format!("{t} tile(s) of {w} along {name} cover {} of its {n} voxels: raise --tiles or --window", w * t));
        }
        // Starts spread as numpy.linspace: a window as long as the axis gives the same tile t
        // times (a longer one gives one tile: nothing repeats).
        let all = fastdet::pipeline::tiling::tile_starts(n, w, t);
        let mut starts = all.clone();
        starts.dedup();
        if starts.len() < all.len() {
            out.push(format!(
                "{} tiles along {name} have only {} distinct start(s) (window {w}, axis {n}), each computed again: --tiles {} along {name} blends the same tiles {:.1}x faster",
                all.len(),
                starts.len(),
                starts.len(),
                all.len() as f64 / starts.len() as f64
            ));
        }
    }
    out
}

/// Infers and detects one loaded run; returns its picks.
fn process(job: &Job, loaded: Loaded, ens: &mut Ensemble, s: &Settings, extras: Extras) -> Result<(Vec<Pick>, Timing)> {
    let Loaded { mut vol, shape, frame, read_s, upload, .. } = loaded;
    // Radii to voxels (the NMS) in the grid the models see.
    let s = &Settings { voxel_size: frame.grid_voxel_size, ..s.clone() };
    let mut timing = Timing { read: read_s, ..Timing::default() };
    let tty = std::io::stderr().is_terminal();
    let t_infer = Instant::now();
    let mut tiles = 0;
    let mut progress = |done: usize, total: usize| {
        tiles = total;
        if tty {
            let rate = done as f64 / t_infer.elapsed().as_secs_f64().max(1e-9);
            let width = 30;
            let filled = done * width / total.max(1);
            fastdet::errprint!("\r  {} [{}{}] {done}/{total} tiles, {rate:.2} tiles/s ", job.run, "#".repeat(filled), "-".repeat(width - filled));
            if done == total {
                fastdet::errln!();
            }
        }
    };
    // The maps are read back from the device only for --save-maps (detection runs on the device).
    let prepared = Prepared { normalized: true, upload };
    let (dets, maps) = if vol.shape != shape {
        // Padded (--pad mean): a padded axis is as long as the window, and one tile covers it
        // however many are asked for (the unpadded axis, shorter than the window, has one start).
        let mut s_here = s.clone();
        for (tiles, (n, padded_n)) in s_here.tiles.iter_mut().zip(shape.iter().zip(vol.shape)) {
            if *n < padded_n {
                *tiles = 1;
            }
        }
        // Peaks are found on the maps of the tomogram's own extent: the grid a zero-padded run sees.
        let maps = fastdet::pipeline::runner::predict_prepared_maps(ens, &mut vol.data, vol.shape, &s_here, &mut progress, &mut timing, prepared)
            .with_context(|| format!("{}: inference failed", job.path.display()))?
            .cropped(shape.map(|n| n / ens.stride));
        let t = Instant::now();
        let dets = fastdet::pipeline::runner::detect_maps(&maps, s, ens.stride);
        timing.detect += t.elapsed().as_secs_f64();
        vol.data = fastdet::pipeline::tiling::crop_volume(&vol.data, vol.shape, shape);
        vol.shape = shape;
        (dets, extras.save_maps.is_some().then_some(maps))
    } else {
        predict_and_detect(ens, &mut vol.data, vol.shape, s, &mut progress, &mut timing, extras.save_maps.is_some(), prepared)
            .with_context(|| format!("{}: inference failed", job.path.display()))?
    };
    timing.tiles = tiles;
    // The run's side outputs, removed again when a later one fails: a failed run leaves none.
    let mut written: Vec<PathBuf> = Vec::new();
    let [maps_file, star_file, qc_file] = extras.files(&job.run);
    let outputs = (|| -> Result<Vec<Pick>> {
        if let (Some(path), Some(maps)) = (maps_file, &maps) {
            let d = maps.dims;
            // What a reader needs to use the maps without this program's source at hand.
            let classes: Vec<&str> = CLASSES.iter().take(maps.num_classes).map(|c| c.name).collect();
            let meta: std::collections::HashMap<String, String> = [
                ("fastdet.run", job.run.clone()),
                ("fastdet.layout", format!("scores [class, z, y, x] on the stride-{} grid, sigmoid; offsets [axis, z, y, x], axes x, y, z, in voxels from the cell centre (i + 0.5) * stride", ens.stride)),
                ("fastdet.classes", serde_json::to_string(&classes)?),
                ("fastdet.stride", ens.stride.to_string()),
                ("fastdet.volume_shape", serde_json::to_string(&vol.shape)?),
                ("fastdet.voxel_size_angstrom", s.voxel_size.to_string()),
                ("fastdet.version", fastdet::VERSION.to_string()),
            ]
            .into_iter()
            .chain((frame.voxel_size != frame.grid_voxel_size).then(|| {
                ("fastdet.resampled_from", serde_json::json!({ "voxel_size_angstrom": frame.voxel_size, "volume_shape": frame.shape }).to_string())
            }))
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            tensors::write_f32(
                &path,
                &[("scores", vec![maps.num_classes, d[0], d[1], d[2]], &maps.scores), ("offsets", vec![3, d[0], d[1], d[2]], &maps.offsets)],
                Some(meta),
            )?;
            written.push(path);
        }
        drop(maps);
        let picks = to_picks_scaled(&job.run, &dets, frame.grid_voxel_size);
        if let Some(path) = star_file {
            fastdet::io::star::write_run_star(&path, &job.run, &picks, frame.voxel_size, frame.shape)?;
            written.push(path);
        }
        if let Some(path) = qc_file {
            // Rings at the voxels the picks were made from (--voxel-size, not the file's own; the
            // resampled grid's with --resample).
            let opts = fastdet::qc::QcOptions { voxel_size: Some(frame.grid_voxel_size), ..Default::default() };
            fastdet::qc::render_qc_with(&vol, &picks, None, &path, &opts)?;
            written.push(path);
        }
        Ok(picks)
    })();
    match outputs {
        Ok(picks) => Ok((picks, timing)),
        Err(e) => {
            for p in &written {
                let _ = std::fs::remove_file(p);
            }
            Err(e.context(format!("{}: cannot write its outputs", job.path.display())))
        }
    }
}

/// Where finished runs are kept: each run's picks are written atomically to `parts/{run}.csv` as soon
/// as the run is done, beside a record of the settings, the tomogram and the picks' bytes, so an
/// interrupted job can `--resume`. The folder is locked while the job lives: two jobs writing one
/// output (another's settings, or the same job started twice) would mix their runs.
struct Parts {
    dir: PathBuf,
    settings_sha: String,
    /// On a resume whose only change is the precision: the digest of the record the finished
    /// runs were stored under (runs stored by an older fastdet on a GPU were digested with it).
    earlier_sha: Option<String>,
    /// The file OUT is written to (through a link, its target).
    target: PathBuf,
    _lock: Option<std::fs::File>,
}

/// Feeds a file's bytes to `h`, read in pieces (a weights file may be large).
fn hash_file_into(h: &mut sha2::Sha256, path: &Path) -> Result<()> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

/// Takes `dir/.lock` (held until the file is dropped, released by the system if the process dies),
/// or says which process holds it.
fn lock_parts(dir: &Path, out: &Path) -> Result<Option<std::fs::File>> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(".lock");
    // A job that ends removes the folder, lock file included: a lock taken on a file that is no
    // longer the folder's is taken again on the new one.
    for _ in 0..10 {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut f = match std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("{}: cannot create", path.display())),
        };
        match f.try_lock() {
            Ok(()) => {
                let same = match (f.metadata(), std::fs::metadata(&path)) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                    _ => false,
                };
                if !same {
                    continue;
                }
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                let _ = f.set_len(0).and_then(|()| write!(f, "process {} on {}", std::process::id(), host.trim()));
                return Ok(Some(f));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = if holder.trim().is_empty() { "another fastdet".to_string() } else { format!("another fastdet ({})", holder.trim()) };
                bail!(
                    "{}: {holder} is writing this output (it holds {}); wait for it to end, or give another --out",
                    out.display(),
                    path.display()
                )
            }
            Err(std::fs::TryLockError::Error(e)) => {
                // Some network file systems have no locks: run on, without the guard.
                fastdet::errln!("warning: {}: cannot lock ({e}); make sure no other job writes {}", path.display(), out.display());
                return Ok(None);
            }
        }
    }
    bail!("{}: the lock file keeps being replaced; is another job starting and ending on {}?", path.display(), out.display())
}

/// The keys whose values differ between two jobs' `settings.json`, in order.
pub(crate) fn changed_settings<'a>(a: &'a serde_json::Map<String, serde_json::Value>, b: &'a serde_json::Map<String, serde_json::Value>) -> Vec<&'a str> {
    let keys: std::collections::BTreeSet<&str> = a.keys().chain(b.keys()).map(String::as_str).filter(|k| a.get(*k) != b.get(*k)).collect();
    keys.into_iter().collect()
}

/// How many runs' picks the runs folder holds (`{run}.csv`); None when it cannot be listed.
fn stored_runs(dir: &Path) -> Option<usize> {
    Some(std::fs::read_dir(dir).ok()?.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "csv")).count())
}

/// The precisions a settings record names: its `precision` list, or f32 (the CPU) without one.
fn precisions_of(record: &serde_json::Map<String, serde_json::Value>) -> std::collections::BTreeSet<String> {
    match record.get("precision").and_then(|p| p.as_array()) {
        Some(list) => list.iter().filter_map(|p| p.as_str().map(String::from)).collect(),
        None => ["f32".to_string()].into(),
    }
}

/// "f32 on the CPU", "fp16 on a GPU", "f32 on the CPU and fp16 on a GPU".
fn precision_words(set: &std::collections::BTreeSet<String>) -> String {
    let word = |p: &str| match p {
        "f32" => "f32 on the CPU".to_string(),
        "fp16" => "fp16 on a GPU".to_string(),
        other => other.to_string(),
    };
    set.iter().map(|p| word(p)).collect::<Vec<_>>().join(" and ")
}

/// In `OUT.runs`: `{"shard": [k, n], "job_runs": [...]}` for an OUT written by a job run with
/// `--shard k/n`, `job_runs` being the sorted runs the whole job shares out.
pub(crate) const SHARD_FILE: &str = "shard.json";

/// In `OUT.runs`: `{"sha256": ...}` of the OUT the job wrote, written with OUT and removed when a
/// job starts: an OUT beside a record without it (or with another checksum) is not the output of
/// the job the record describes (that job failed or was stopped, or OUT was changed since).
pub(crate) const OUTPUT_FILE: &str = "out.json";

/// What the record beside a file says of it ([`output_record`]).
pub(crate) enum OutputRecord {
    /// No record: not written by `fastdet run` (a merged or hand-made file), or moved.
    None,
    /// The record describes another file: its job failed or was stopped (the file is an
    /// earlier job's), an older fastdet wrote it, or it was changed since.
    Stale { changed: bool },
    /// The file its job wrote: the job's settings, the runs it holds and those that failed.
    Valid { settings: serde_json::Map<String, serde_json::Value>, runs: Option<Vec<String>>, failed: Vec<String> },
}

/// The record `run` left beside `out` ([`OUTPUT_FILE`], settings.json), judged against the
/// file's `bytes` (read once by the caller, so that the check and what is used are one version).
pub(crate) fn output_record(out: &Path, bytes: &[u8]) -> OutputRecord {
    let Ok(dir) = runs_folder(out) else { return OutputRecord::None };
    let Some(settings) = std::fs::read_to_string(dir.join("settings.json")).ok().and_then(|t| serde_json::from_str(&t).ok()) else {
        return OutputRecord::None;
    };
    let Some(rec) = std::fs::read_to_string(dir.join(OUTPUT_FILE)).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) else {
        return OutputRecord::Stale { changed: false };
    };
    if rec.get("sha256").and_then(|v| v.as_str()) != Some(sha256_hex(bytes).as_str()) {
        return OutputRecord::Stale { changed: true };
    }
    let list = |k: &str| rec.get(k).and_then(|v| serde_json::from_value::<Vec<String>>(v.clone()).ok());
    OutputRecord::Valid { settings, runs: list("runs"), failed: list("failed").unwrap_or_default() }
}

/// Which shard of which job an OUT is.
pub(crate) struct ShardRecord {
    pub k: usize,
    pub n: usize,
    /// The runs of the whole job, before sharding (absent in files of an older fastdet).
    pub job_runs: Option<Vec<String>>,
}

/// The `--shard` the job that wrote `out` was run with, if any.
pub(crate) fn shard_of(out: &Path) -> Option<ShardRecord> {
    let text = std::fs::read_to_string(runs_folder(out).ok()?.join(SHARD_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let shard = v.get("shard")?;
    let (k, n) = (shard.get(0)?.as_u64()?, shard.get(1)?.as_u64()?);
    let job_runs = v.get("job_runs").and_then(|r| serde_json::from_value(r.clone()).ok());
    Some(ShardRecord { k: k as usize, n: n as usize, job_runs })
}

/// `OUT.runs`, where a job writing `out` keeps its finished runs and `settings.json`: beside the
/// file the output is written to, so a link to OUT and OUT share one folder.
pub(crate) fn runs_folder(out: &Path) -> Result<PathBuf> {
    let target = fastdet::util::write_target(out);
    let mut name = target.file_name().context("output has no file name")?.to_os_string();
    name.push(".runs");
    Ok(target.with_file_name(name))
}

impl Parts {
    fn new(out: &Path, fp: &Fingerprint, resume: bool) -> Result<Self> {
        let fingerprint = fp.record.as_str();
        let target = fastdet::util::write_target(out);
        let dir = runs_folder(out)?;
        if dir.exists() && !dir.is_dir() {
            bail!("{}: is not a directory (fastdet keeps the finished runs of {} there); remove it", dir.display(), out.display());
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let lock = lock_parts(&dir, out)?;
        // Under the lock no other job writes the runs folder or OUT: temporaries there are left
        // by a job that was killed outright. (Without a lock they may be a live job's.)
        let stale = if lock.is_some() {
            fastdet::util::remove_stale_temporaries(&dir, None) + fastdet::util::remove_stale_temporaries(&fastdet::util::folder_of(&target), target.file_name())
        } else {
            0
        };
        if stale > 0 {
            fastdet::errln!("removed {stale} temporary file(s) left by a job on {} that was killed", out.display());
        }
        // OUT's record describes the OUT an earlier job wrote, under the settings.json it sits
        // beside: it goes before this job may change that file (the job writes its own with OUT).
        let output_file = dir.join(OUTPUT_FILE);
        match std::fs::remove_file(&output_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("{}: cannot remove", output_file.display())),
            _ => {}
        }
        let fp_path = dir.join("settings.json");
        let settings_sha = sha256_hex(fp.digest_text.as_bytes());
        let mut earlier_sha = None;
        if resume && fp_path.exists() {
            let old = std::fs::read_to_string(&fp_path).with_context(|| format!("{}: cannot read", fp_path.display()))?;
            let keys = |t: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(t).ok();
            let Some(o) = keys(&old) else {
                bail!("--resume: {} cannot be read (damaged); remove {} or run without --resume", fp_path.display(), dir.display());
            };
            let new = keys(fingerprint);
            let changed = new.as_ref().map(|n| changed_settings(&o, n)).unwrap_or_default();
            if changed.is_empty() || changed == ["precision"] {
                earlier_sha = Some(sha256_hex(old.as_bytes()));
            }
            if changed == ["precision"] {
                // The runs finished on the other kind of device are kept; the record says that
                // OUT may hold both precisions (merge compares it).
                let stored = stored_runs(&dir).unwrap_or(0);
                let (was, now) = (precisions_of(&o), new.as_ref().map(precisions_of).unwrap_or_default());
                let mut record = new.unwrap_or_default();
                if stored > 0 {
                    fastdet::errln!(
                        "--resume: {stored} finished run(s) in {} were computed in {}; this job computes in {}: they are kept (the picks of the two differ by rounding)",
                        dir.display(),
                        precision_words(&was),
                        precision_words(&now)
                    );
                    let all: std::collections::BTreeSet<String> = was.union(&now).cloned().collect();
                    record.insert("precision".into(), serde_json::json!(all));
                }
                let text = serde_json::to_string_pretty(&record)?;
                fastdet::util::write_atomic(&fp_path, |f| Ok(f.write_all(text.as_bytes())?))?;
            } else if old != fingerprint {
                // Name what changed where both parse.
                let changed = if new.is_some() { format!(" (changed: {})", changed.join(", ")) } else { String::new() };
                bail!(
                    "--resume: {} was made with other inputs, weights or settings{changed} (or by an older fastdet); remove {} or run without --resume",
                    fp_path.display(),
                    dir.display()
                );
            }
        } else {
            if resume {
                fastdet::errln!("--resume: {} holds no finished runs; computing every run", dir.display());
            }
            // Everything but the lock, which the job holds.
            for entry in std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))? {
                let p = entry.with_context(|| format!("{}: cannot list", dir.display()))?.path();
                if p.file_name().is_some_and(|n| n == ".lock") {
                    continue;
                }
                fastdet::util::remove_path(&p).with_context(|| format!("{}: cannot clear", p.display()))?;
            }
            fastdet::util::write_atomic(&fp_path, |f| Ok(f.write_all(fingerprint.as_bytes())?))?;
        }
        Ok(Parts { dir, settings_sha, earlier_sha, target, _lock: lock })
    }
    /// Removes the folder when it holds no run's picks (every run of the job failed), while the
    /// lock is held: a job that takes the old lock file after it is gone sees it replaced. Kept
    /// while an earlier job's OUT is there: its record (settings, no [`OUTPUT_FILE`]) says that
    /// OUT is not this job's output, which `merge` checks.
    fn discard_if_empty(self) {
        // (A folder that cannot be listed is kept.)
        let holds_picks = stored_runs(&self.dir).is_none_or(|n| n > 0);
        if !holds_picks && !self.target.exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
    fn path(&self, run: &str) -> PathBuf {
        self.dir.join(format!("{run}.csv"))
    }
    /// Where the record of how the run's picks were made is kept: the settings, the tomogram's
    /// [`fastdet::util::source_stamp`] and shape, and the picks file's bytes.
    fn record_path(&self, run: &str) -> PathBuf {
        self.dir.join(format!("{run}.source"))
    }
    /// The run's record, when there is one that parses.
    fn record(&self, run: &str) -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(self.record_path(run)).ok()?).ok()
    }
    /// The picks stored for `job`, when they are intact, made with these settings, and its
    /// tomogram has not changed since; with the tomogram's shape (z, y, x voxels) and voxel size
    /// (Å) when recorded (older records have no voxel size).
    fn load(&self, job: &Job) -> Option<(Vec<Pick>, Option<[usize; 3]>, Option<f64>)> {
        let p = self.path(&job.run);
        let bytes = std::fs::read(&p).ok()?;
        let record = self.record(&job.run);
        let field = |k: &str| record.as_ref().and_then(|r| r.get(k)).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let why = if record.is_none() {
            Some("no record of how its picks were made (an older fastdet stored them)".to_string())
        } else if field("settings_sha256") != self.settings_sha && Some(field("settings_sha256")) != self.earlier_sha {
            Some("its picks were stored by a job with other settings".to_string())
        } else if field("source").is_empty() {
            Some("its tomogram changed while it was read".to_string())
        } else if field("source") != fastdet::util::source_stamp(&job.path) {
            Some(format!("{} changed since its picks were stored", job.path.display()))
        } else if field("picks_sha256") != sha256_hex(&bytes) {
            Some(format!("{} is not the file that was stored (damaged or cut short)", p.display()))
        } else {
            None
        };
        if let Some(why) = why {
            fastdet::errln!("  {}: {why}; computing them again", job.run);
            return None;
        }
        let shape = record.as_ref().and_then(|r| serde_json::from_value(r.get("shape")?.clone()).ok());
        let voxel_size = record.as_ref().and_then(|r| r.get("voxel_size")?.as_f64());
        Some((csv::read_submission(&p).ok()?, shape, voxel_size))
    }
    /// The record (the tomogram's stamp as it was read, empty when it changed during the read),
    /// then the picks: a picks file exists only beside the record it matches, whenever the job is
    /// killed.
    fn store(&self, job: &Job, picks: &[Pick], stamp: &str, frame: Frame) -> Result<()> {
        let (path, record_path) = (self.path(&job.run), self.record_path(&job.run));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&record_path);
        let text = csv::submission_exact_text(&path, picks)?;
        let record = serde_json::json!({
            "source": stamp,
            "settings_sha256": self.settings_sha,
            "picks_sha256": sha256_hex(text.as_bytes()),
            "shape": frame.shape,
            "voxel_size": frame.voxel_size,
        });
        fastdet::util::write_atomic(&record_path, |f| Ok(f.write_all(serde_json::to_string_pretty(&record)?.as_bytes())?))?;
        fastdet::util::write_atomic(&path, |f| Ok(f.write_all(text.as_bytes())?))
    }
}

/// What makes two runs' results interchangeable: where the tomograms come from, settings and
/// the weights' bytes. (Not `--runs` or `--shard`: a resumed job may take more or fewer runs.)
/// The job's settings record (settings.json) and the text its stored runs' digest is taken of:
/// the same record without the precision, so that runs computed on the other kind of device
/// (fp16 on a GPU, f32 on the CPU: picks that differ by rounding) are resumed, not computed again.
/// For the CPU the two are the same text, as before.
struct Fingerprint {
    record: String,
    digest_text: String,
}

fn fingerprint(a: &InferArgs, s: &Settings) -> Result<Fingerprint> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for w in &a.weights {
        hash_file_into(&mut h, w)?;
    }
    let full = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf()).display().to_string();
    let inputs = match (&a.data, a.zarr.as_slice(), &a.copick_config) {
        (Some(root), _, _) => serde_json::json!({ "data": full(root), "split": a.split, "tomogram": a.tomogram }),
        // One store as before (a job of an older fastdet resumes), several as a list.
        (None, [z], _) => serde_json::json!({ "zarr": full(z) }),
        // Sorted: the order they are given in does not change the job.
        (None, [_, _, ..], _) => serde_json::json!({ "zarr": a.zarr.iter().map(|z| full(z)).collect::<std::collections::BTreeSet<_>>() }),
        (None, [], Some(c)) => serde_json::json!({ "copick_config": full(c), "tomogram": a.tomogram }),
        (None, [], None) => serde_json::json!({ "mrc": a.mrc.iter().map(|m| full(m)).collect::<Vec<_>>() }),
    };
    let mut fp = serde_json::json!({
        "inputs": inputs,
        "weights_sha256": format!("{:x}", h.finalize()),
        "level": a.level,
        "window": s.window, "tiles": s.tiles, "thresholds": s.thresholds, "iou": s.iou_threshold,
        "top_k": s.pre_nms_top_k, "blend_sigma": s.blend_sigma, "tta": format!("{:?}", s.tta),
        "voxel_size": match a.voxel_size { VoxelSize::Angstrom(v) => serde_json::json!(v), VoxelSize::File => serde_json::json!("file") },
        "allow_nonfinite": a.allow_nonfinite,
    });
    // Only when asked for: jobs stored before the option existed resume as they were. (The
    // models' voxel size changes nothing without it.)
    // (Keys named after the options, as messages list the keys that changed.)
    if a.resample {
        fp["resample"] = serde_json::json!(true);
    }
    // It matters to --resample, and to --level auto, which reads the level (and folder) nearest it.
    if a.resample || a.level == "auto" {
        fp["model_voxel_size"] = serde_json::json!(a.model_voxel_size);
    }
    if a.invert {
        fp["invert"] = serde_json::json!(true);
    }
    // Only when not the default: jobs stored before the option existed resume as they were.
    if a.pad != "zero" {
        fp["pad"] = serde_json::json!(a.pad);
    }
    // The CUDA engine computes in fp16, the CPU engine in f32: their picks differ a little, which
    // merge notes and a resume on the other kind says. Absent for the CPU, as before.
    let digest_text = serde_json::to_string_pretty(&fp)?;
    let precisions: std::collections::BTreeSet<&str> = a.devices()?.iter().map(|d| if d.is_cuda_engine() { "fp16" } else { "f32" }).collect();
    if precisions.iter().any(|p| *p != "f32") {
        fp["precision"] = serde_json::json!(precisions);
    }
    Ok(Fingerprint { record: serde_json::to_string_pretty(&fp)?, digest_text })
}

/// One run's outcome, kept until every worker is done so the output follows the run order.
type Outcome = Result<(Vec<Pick>, Timing)>;

/// One worker: its own engines on `device`, its own reader thread (the channel holds at most one
/// decoded volume, so memory stays bounded however many runs there are), its share of the runs.
fn worker(
    device: Device,
    label: &str,
    todo: &[(usize, &Job)],
    a: &InferArgs,
    s: &Settings,
    extras: Extras,
    parts: Option<&Parts>,
) -> Result<Vec<(usize, Outcome)>> {
    // Our kernels checked on this device before it is trusted with the runs (kernel_check.rs).
    let policy = CheckKernels::from_env(matches!(device, Device::Emu(_)))?;
    let (checked, device_handle) = kernel_check::ensure_checked(device, policy, &kernel_check::default_store())?;
    if let Some(line) = checked {
        fastdet::errln!("  {label}{line}");
    }
    let (mut ens, choices) = load_ensemble(a, device)?;
    drop(device_handle);
    for c in choices {
        fastdet::errln!("  {label}{c} (FASTDET_CONV=measure on {device})");
    }
    if s.device_blend && device.is_cuda_engine() && ens.cuda_device().is_none() {
        fastdet::errln!("  {label}the models on {device} are not on one CUDA device; blending on the host");
    }
    // The reader copies each volume to the device as soon as it is read, on a side stream, so
    // the copy runs while the worker computes the previous one.
    let mut uploader = match ens.volume_device() {
        Some(gpu) if s.device_blend && fastdet::engine::cuda::side_upload::overlap_enabled() => match SideUploader::new(gpu) {
            Ok(u) => Some(u),
            Err(e) => {
                fastdet::errln!("  warning: {label}no side stream on {device} ({e:#}); each volume goes up when its turn comes");
                None
            }
        },
        _ => None,
    };
    // At most one decoded volume waits in the channel; with early copies none does (the reader
    // blocks holding it), so that no more than two volumes are on the device at once.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Loaded>>(if uploader.is_some() { 0 } else { 1 });
    let mut out = Vec::with_capacity(todo.len());
    std::thread::scope(|scope| -> Result<()> {
        // Owned here so that an early return drops it and unblocks the reader before the join.
        let rx = rx;
        scope.spawn(move || {
            for (_, job) in todo {
                let loaded = extras.check_run_name(&job.run).and_then(|()| prepare(job, a, s, uploader.as_mut()));
                if tx.send(loaded).is_err() {
                    break;
                }
            }
        });
        for &(i, job) in todo {
            let loaded = rx.recv().context("reader thread stopped")?;
            let (stamp, frame) = loaded.as_ref().map(|l| (l.stamp.clone(), Some(l.frame))).unwrap_or_default();
            let result = loaded.and_then(|loaded| process(job, loaded, &mut ens, s, extras));
            match &result {
                Ok((p, t)) => {
                    let upload = match (t.upload > 0.0, t.upload_overlapped) {
                        (true, true) => format!(", upload {:.2} s (copied ahead)", t.upload),
                        (true, false) => format!(", upload {:.2} s", t.upload),
                        (false, _) => String::new(),
                    };
                    fastdet::errln!(
                        "  {label}{}: {} picks; read {:.2} s{upload}, infer {:.2} s ({} tiles), blend {:.2} s, detect {:.2} s",
                        job.run,
                        p.len(),
                        t.read,
                        t.infer,
                        t.tiles,
                        t.blend,
                        t.detect
                    );
                    if let (Some(parts), Some(frame)) = (parts, frame) {
                        parts.store(job, p, &stamp, frame)?;
                    }
                }
                Err(e) => fastdet::errln!("  {label}{}: FAILED: {e:#}", job.run),
            }
            out.push((i, result));
        }
        Ok(())
    })?;
    // How the CUDA engines' batches ran (a GPU log shows whether graphs were replayed).
    let (mut graphs, mut replays, mut eager) = (0, 0, 0);
    for e in ens.engines.iter_mut() {
        if let Some(c) = e.as_cuda() {
            let (g, r, w) = c.graph_counts();
            (graphs, replays, eager) = (graphs + g, replays + r, eager + w);
        }
    }
    if replays + eager > 0 {
        fastdet::errln!("  {label}CUDA graphs on {device}: {replays} batch(es) replayed from {graphs} graph(s), {eager} run eagerly (the first of each shape, per model)");
    }
    // Engines on one device share its memory: the first one's peak covers them all.
    if let Some(peak) = ens.engines.first().and_then(|e| e.device_memory_peak()) {
        fastdet::errln!("  {label}peak device memory on {device}: {:.0} MiB (fastdet buffers; cuDNN and the driver add their own)", peak as f64 / 1048576.0);
    }
    Ok(out)
}

/// Runs every job (as `preflight` gave them), reporting (and skipping) the ones that fail. With
/// several devices, worker k takes runs[k::n] of the runs still to do; the output is in run
/// order, as with one device.
fn infer_all(a: &InferArgs, jobs: &[Job], s: &Settings, extras: Extras, parts: Option<&Parts>) -> Result<(Vec<Pick>, Vec<(String, String)>)> {
    extras.check_dirs()?;
    let devices = a.devices()?;
    // What `auto` found, or why it runs on the CPU.
    let auto = if a.uses_auto() { format!(" (auto: {})", fastdet::engine::auto_devices().1) } else { String::new() };
    fastdet::errln!(
        "{} run(s), {} model(s) on {}{auto}, window {}, tiles {}, tta {}",
        jobs.len(),
        a.weights.len(),
        devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","),
        s.window.map(|v| v.to_string()).join(","),
        s.tiles.map(|v| v.to_string()).join(","),
        s.tta.name()
    );
    // Finished runs of an interrupted job are taken as they are. A STAR file that is missing or
    // is not what the stored picks give (damaged, edited) is written again from them and the
    // tomogram's shape in their record; missing maps or a QC image need the run computed again.
    let mut results: Vec<Option<Outcome>> = jobs
        .iter()
        .map(|j| {
            let [maps, star, qc] = extras.files(&j.run);
            let missing = [maps, qc].into_iter().flatten().find(|p| !p.exists());
            if let (Some(m), Some(p)) = (&missing, parts) {
                if p.path(&j.run).exists() {
                    fastdet::errln!("  {}: {} is not there; computing the run again", j.run, m.display());
                }
            }
            let (done, shape, voxel_size) = parts.filter(|_| missing.is_none()).and_then(|p| p.load(j))?;
            let Some(star) = star else {
                fastdet::errln!("  {}: {} picks (resumed)", j.run, done.len());
                return Some(Ok((done, Timing::default())));
            };
            // The tomogram's shape and voxel size recorded with the picks (a record without them,
            // from an older fastdet: the tomogram's shape and --voxel-size, a number then).
            let frame = match (shape, voxel_size, a.voxel_size) {
                (Some(shape), Some(v), _) | (Some(shape), None, VoxelSize::Angstrom(v)) => Ok((shape, v)),
                _ => load(j, a, s).map(|(_, f, _)| (f.shape, f.voxel_size)),
            };
            let old = std::fs::read(&star).ok();
            // None: the file there is the one the picks give; Some(replaced): written.
            let written = frame.and_then(|(shape, v)| fastdet::io::star::run_star_text(&star, &j.run, &done, v, shape)).and_then(|t| {
                if old.as_deref() == Some(t.as_bytes()) {
                    return Ok(None);
                }
                fastdet::util::write_atomic(&star, |f| Ok(f.write_all(t.as_bytes())?)).map(|()| Some(old.is_some()))
            });
            match written {
                Ok(None) => fastdet::errln!("  {}: {} picks (resumed)", j.run, done.len()),
                Ok(Some(replaced)) => {
                    let why = if replaced { "differed from what they give (damaged, edited, or written by an older fastdet); written again" } else { "written from them" };
                    fastdet::errln!("  {}: {} picks (resumed; {} {why})", j.run, done.len(), star.display());
                }
                Err(e) => {
                    fastdet::errln!("  {}: {} could not be written from the stored picks ({e:#}); computing the run again", j.run, star.display());
                    return None;
                }
            }
            Some(Ok((done, Timing::default())))
        })
        .collect();
    let todo: Vec<(usize, &Job)> = jobs.iter().enumerate().filter(|(i, _)| results[*i].is_none()).collect();
    // No more workers than runs to do (none when every run was resumed): a device without a run
    // would check its kernels and load every model for nothing (auto takes every GPU there is).
    // The devices left out stand by: the runs of workers that fail go to one of them when no
    // started worker finished.
    let (devices, spare) = devices.split_at(devices.len().min(todo.len()));
    let n = devices.len();
    if n > 0 && !spare.is_empty() {
        let list = |d: &[Device]| d.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        fastdet::errln!("  {} run(s) to compute: worker(s) on {}; {} stand by", todo.len(), list(devices), list(spare));
    }
    let shares: Vec<Vec<(usize, &Job)>> = (0..n).map(|k| todo.iter().skip(k).step_by(n).copied().collect()).collect();
    let label = |dev: Device| if n > 1 { format!("[{dev}] ") } else { String::new() };
    let outcomes: Vec<Result<Vec<(usize, Outcome)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .zip(&shares)
            .map(|(&dev, share)| {
                let label = label(dev);
                scope.spawn(move || worker(dev, &label, share, a, s, extras, parts))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))).collect()
    });
    let mut healthy = Vec::new();
    let mut broken = Vec::new();
    for ((o, &dev), share) in outcomes.into_iter().zip(devices).zip(&shares) {
        match o {
            Ok(done) => {
                for (i, r) in done {
                    results[i] = Some(r);
                }
                healthy.push(dev);
            }
            Err(e) => broken.push((dev, e, share)),
        }
    }
    // One device that cannot work (no driver, a kernel check failed, the reader stopped) does not
    // stop the others: its runs go to a device whose worker finished (else to one that stood by),
    // one after the other. Only when every worker failed and none stood by is the job an error.
    // `auto` chose GPUs that then could not work: say how to run without them.
    let auto_chose_gpus = a.uses_auto() && devices.iter().any(|d| matches!(d, Device::Cuda(_)));
    const AUTO_HINT: &str = "the GPU(s) --device auto chose could not work; --device cpu runs on the CPU";
    let Some(&to) = healthy.first().or(spare.first()) else {
        if let Some((_, e, _)) = broken.into_iter().next() {
            return Err(if auto_chose_gpus { e.context(AUTO_HINT) } else { e });
        }
        return Ok(collect(jobs, results));
    };
    for (dev, e, share) in broken {
        // Runs it finished before it failed are in the parts directory.
        let mut left = Vec::new();
        for &(i, job) in share {
            match parts.and_then(|p| p.load(job)) {
                Some((done, ..)) => results[i] = Some(Ok((done, Timing::default()))),
                None => left.push((i, job)),
            }
        }
        fastdet::errln!("warning: {dev} failed: {e:#}; its {} remaining run(s) go to {to}", left.len());
        match worker(to, &label(to), &left, a, s, extras, parts) {
            Ok(done) => {
                for (i, r) in done {
                    results[i] = Some(r);
                }
            }
            Err(e2) => {
                let hint = if auto_chose_gpus { format!("; {AUTO_HINT}") } else { String::new() };
                for &(i, _) in &left {
                    results[i] = Some(Err(anyhow::anyhow!("{dev} failed ({e:#}), then {to} failed ({e2:#}){hint}")));
                }
            }
        }
    }
    Ok(collect(jobs, results))
}

/// The picks of the runs that finished, in run order, and the runs that failed with why.
fn collect(jobs: &[Job], results: Vec<Option<Outcome>>) -> (Vec<Pick>, Vec<(String, String)>) {
    let mut picks = Vec::new();
    let mut failed = Vec::new();
    for (job, r) in jobs.iter().zip(results) {
        match r.expect("every run has an outcome") {
            Ok((p, _)) => picks.extend(p),
            Err(e) => failed.push((job.run.clone(), format!("{e:#}"))),
        }
    }
    if let Some(mib) = peak_rss_mib() {
        fastdet::errln!("peak memory {mib:.0} MiB");
    }
    (picks, failed)
}

fn report_failures(failed: &[(String, String)]) -> ExitCode {
    if failed.is_empty() {
        return ExitCode::SUCCESS;
    }
    fastdet::errln!("{} run(s) failed:", failed.len());
    for (r, e) in failed {
        fastdet::errln!("  {r}: {e}");
    }
    ExitCode::from(2)
}

pub fn run(a: RunArgs) -> Result<ExitCode> {
    check_thresholds(&a.thresholds)?;
    let s = settings(&a.infer, a.thresholds.clone())?;
    if a.print_config {
        fastdet::util::out_text(&effective_config(&a, &s))?;
        return Ok(ExitCode::SUCCESS);
    }
    let out = a.out.as_deref().context("give --out FILE.csv (or `out` in the config file)")?;
    let jobs = preflight(&a.infer)?;
    // A shard's record names the runs of the whole job, so that merge can say which are missing.
    let job_runs: Vec<String> = match a.infer.shard {
        Some(_) => self::jobs(&InferArgs { shard: None, ..a.infer.clone() })?.into_iter().map(|j| j.run).collect(),
        None => Vec::new(),
    };
    let mut inputs: Vec<&Path> = a.infer.weights.iter().map(PathBuf::as_path).collect();
    inputs.extend(jobs.iter().map(|j| j.path.as_path()));
    fastdet::util::check_not_an_input(out, &inputs)?;
    // Fail on an unwritable output before spending minutes on inference.
    fastdet::util::check_output_file(out)?;
    let extras = Extras { save_maps: a.save_maps.as_deref(), star_out: a.star_out.as_deref(), qc: a.qc.as_deref() };
    // Nor may a run's maps, STAR file, picture or copick files replace an input or land in one,
    // or be a device or a pipe.
    for job in &jobs {
        for file in extras.files(&job.run).into_iter().flatten() {
            fastdet::util::check_not_an_input(&file, &inputs)?;
            fastdet::util::check_replaceable(&file)?;
            // Nor the CSV: one of the two would be lost.
            if fastdet::util::same_written_file(&file, out) {
                bail!("{}: run {}'s file would be written over the --out file {}; give --out another name or folder", file.display(), job.run, out.display());
            }
        }
    }
    if let Some(dir) = &a.copick_out {
        fastdet::util::check_not_an_input(&dir.join("ExperimentRuns"), &inputs)?;
    }
    // Folders this job makes, removed again (when empty) if every run fails.
    let made: Vec<&Path> = [a.copick_out.as_deref(), extras.save_maps, extras.star_out, extras.qc].into_iter().flatten().filter(|d| !d.exists()).collect();
    if let Some(dir) = &a.copick_out {
        copick::check_id("--user-id", &a.user_id)?;
        copick::check_id("--session-id", &a.session_id)?;
        if a.user_id == "curation" {
            bail!("--user-id curation: that is the annotators' user, whose picks are a copick project's ground truth; predictions written under it would replace or join the truth (score, tune and qc would read them as such). Choose another id");
        }
        writable_dir("--copick-out", dir)?;
    }
    extras.check_dirs()?;
    // A stop leaves those that are still empty no more than a failure does.
    let _made_on_stop: Vec<_> = made.iter().map(|d| fastdet::util::RemoveOnStop::empty_folder(d)).collect();
    let remove_made = || {
        for d in &made {
            let _ = std::fs::remove_dir(d);
        }
    };
    let parts = match fingerprint(&a.infer, &s).and_then(|f| Parts::new(out, &f, a.resume)) {
        Ok(p) => p,
        Err(e) => {
            remove_made();
            return Err(e);
        }
    };
    // Which shard of its job OUT is, so that merge can name a shard left out: written with OUT,
    // and until then no claim about the OUT an earlier job may have left.
    let shard_file = parts.dir.join(SHARD_FILE);
    let _ = std::fs::remove_file(&shard_file);
    // (Its OUT record went in Parts::new.)
    let output_file = parts.dir.join(OUTPUT_FILE);
    let discard = |parts: Parts| {
        parts.discard_if_empty();
        remove_made();
    };
    let (picks, failed) = match infer_all(&a.infer, &jobs, &s, extras, Some(&parts)) {
        Ok(r) => r,
        Err(e) => {
            discard(parts);
            return Err(e);
        }
    };
    if !failed.is_empty() && failed.len() == jobs.len() {
        // A header-only file would pass for a run that found nothing.
        fastdet::errln!("every run failed: {} not written", out.display());
        discard(parts);
        // Nothing written: a failure (1), not the partial result of exit status 2.
        report_failures(&failed);
        return Ok(ExitCode::FAILURE);
    }
    // The copick files of every run and the CSV, written as one: a failure or a stop leaves
    // none of them (the finished runs stay in OUT.runs for --resume).
    let mut files = Vec::new();
    if let Some(dir) = &a.copick_out {
        for job in jobs.iter().filter(|j| !failed.iter().any(|(r, _)| *r == j.run)) {
            files.extend(copick::run_picks_files(dir, &job.run, &picks, &a.user_id, &a.session_id)?);
        }
    }
    // copick files of the same user and session already there with other picks (an earlier
    // job's) are replaced: said, as a shared overlay may hold another person's run under the
    // default ids.
    let replaced = files.iter().filter(|(p, bytes)| std::fs::read(p).is_ok_and(|old| old != *bytes)).count();
    if let Some((k, n)) = a.infer.shard {
        files.push((shard_file, serde_json::json!({ "shard": [k, n], "job_runs": job_runs }).to_string().into_bytes()));
    }
    let text = csv::submission_text(out, &picks, a.with_score)?;
    // The runs whose picks the file holds, and those that failed (not in it).
    let done: Vec<&str> = jobs.iter().map(|j| j.run.as_str()).filter(|r| !failed.iter().any(|(f, _)| f == r)).collect();
    let failed_runs: Vec<&str> = failed.iter().map(|(r, _)| r.as_str()).collect();
    let record = serde_json::json!({ "sha256": sha256_hex(text.as_bytes()), "runs": done, "failed": failed_runs });
    files.push((output_file, record.to_string().into_bytes()));
    files.push((out.to_path_buf(), text.into_bytes()));
    fastdet::util::write_files_atomic(&files)?;
    if let (Some(dir), true) = (&a.copick_out, replaced > 0) {
        fastdet::errln!("note: replaced {replaced} copick picks file(s) of user {} session {} in {}", a.user_id, a.session_id, dir.display());
    }
    // The job is done: a full standard output does not make it a failure.
    let _ = fastdet::util::out_line(format_args!("wrote {} picks to {}", picks.len(), out.display()));
    Ok(report_failures(&failed))
}

pub fn tune(a: TuneArgs) -> Result<ExitCode> {
    let layout = a.infer.layout()?.context("tune needs --data ROOT with ground truth under {split}/overlay, or --copick-config FILE")?;
    if !(0.0..1.0).contains(&a.min_threshold) {
        bail!("--min-threshold {}: must be in [0, 1)", a.min_threshold);
    }
    if !(a.beta.is_finite() && a.beta > 0.0) {
        bail!("--beta {}: must be a positive number", a.beta);
    }
    if let Some(hint) = layout.split_folder_hint().filter(|_| !layout.overlay_runs.is_dir()) {
        bail!("{}: no ground truth there; {hint}", layout.overlay_runs.display());
    }
    let truth = copick::read_truth_to_score(&layout)?;
    if let Some(file) = &a.picks {
        return tune_on_file(&a, file, truth, &layout);
    }
    let s = settings(&a.infer, vec![a.min_threshold; CLASSES.len()])?;
    let jobs = preflight(&a.infer)?;
    let (cands, failed) = infer_all(&a.infer, &jobs, &s, Extras::default(), None)?;
    // Scored on the runs inferred here (`--runs`, `--shard`, less any that failed): the truth of
    // the others would count as missed particles and pull the thresholds down.
    let inferred: std::collections::HashSet<String> = jobs.into_iter().map(|j| j.run).filter(|r| !failed.iter().any(|(f, _)| f == r)).collect();
    let truth: Vec<Pick> = truth.into_iter().filter(|p| inferred.contains(&p.run)).collect();
    if inferred.is_empty() {
        bail!("no run was inferred: nothing to tune on");
    }
    fastdet::errln!("tuning on {} run(s), {} annotated particle(s)", inferred.len(), truth.len());
    let (thresholds, score) = metric::tune_thresholds(&truth, &cands, a.beta, a.min_threshold);
    fastdet::outln!("{}", metric::format_table(&score))?;
    let t: Vec<String> = thresholds.iter().map(|t| format!("{t}")).collect();
    fastdet::outln!("--thresholds {}", t.join(","))?;
    Ok(report_failures(&failed))
}

/// `tune --picks FILE`: the candidates are the file's scored picks. Tuned on the runs its job
/// computed (its record), or else those with picks in the file; `--runs` chooses among them. The
/// floors are the thresholds the job kept its picks at (from a record that matches the file),
/// else each class's lowest score; `--min-threshold` raises them, and candidates under a floor
/// are not looked at, as a tune that infers never sees them.
fn tune_on_file(a: &TuneArgs, file: &Path, truth: Vec<Pick>, layout: &dataset::Layout) -> Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("{}: cannot read submission", file.display()))?;
    let text = std::str::from_utf8(&bytes).with_context(|| format!("{}: not UTF-8 text", file.display()))?;
    if !super::merge::has_score(text) {
        bail!("{}: has no score column; tune needs each pick's score (`fastdet run --with-score` writes it)", file.display());
    }
    let (cands, others) = csv::parse_submission_of_known_types(text, &file.display().to_string())?;
    if let Some(w) = csv::other_types_warning(file, &others) {
        fastdet::errln!("warning: {w}");
    }
    let with_truth: std::collections::BTreeSet<String> = copick::truth_runs(layout)?.into_iter().collect();
    let (recorded, computed): (Option<Vec<f32>>, Option<Vec<String>>) = match output_record(file, &bytes) {
        OutputRecord::Valid { settings, runs, .. } => {
            let t = settings.get("thresholds").and_then(|v| serde_json::from_value::<Vec<f32>>(v.clone()).ok()).filter(|t| t.len() == CLASSES.len());
            (t, runs)
        }
        OutputRecord::Stale { .. } => {
            fastdet::errln!("warning: {}: the record beside it (its .runs folder) is not of this file (a later job on it failed, or the file was changed): not used", file.display());
            (None, None)
        }
        OutputRecord::None => (None, None),
    };
    // The runs the file speaks for: a run with no pick in it is one its job found nothing in
    // only when the record says the job computed it.
    let in_file: std::collections::BTreeSet<String> = match &computed {
        Some(r) => r.iter().cloned().collect(),
        None => cands.iter().map(|p| p.run.clone()).collect(),
    };
    let elsewhere: Vec<&String> = in_file.iter().filter(|r| !with_truth.contains(*r)).collect();
    if !elsewhere.is_empty() {
        fastdet::errln!("note: {} run(s) of {} have no ground truth and are left out: {}", elsewhere.len(), file.display(), super::score::first_few(elsewhere.iter().map(|r| r.as_str())));
    }
    let runs: std::collections::BTreeSet<String> = if a.infer.runs.is_empty() {
        let unseen: Vec<&String> = with_truth.iter().filter(|r| !in_file.contains(*r)).collect();
        if !unseen.is_empty() {
            let why = if computed.is_some() { "its job did not compute them" } else { "it has no pick of them (give --runs to count a run without picks as one where nothing was found)" };
            fastdet::errln!("note: not tuned on {} run(s) with ground truth, as {why}: {}", unseen.len(), super::score::first_few(unseen.iter().map(|r| r.as_str())));
        }
        with_truth.intersection(&in_file).cloned().collect()
    } else {
        let mut chosen = std::collections::BTreeSet::new();
        for r in &a.infer.runs {
            let r = r.trim();
            if r.is_empty() || !with_truth.contains(r) {
                bail!("--runs: run {r:?} is not in {}", layout.truth_folders());
            }
            chosen.insert(r.to_string());
        }
        chosen
    };
    if runs.is_empty() {
        bail!("{}: none of its runs has ground truth in {}: nothing to tune on", file.display(), layout.truth_folders());
    }
    let floors: [f32; CLASSES.len()] = std::array::from_fn(|c| match &recorded {
        Some(t) => t[c].max(a.min_threshold),
        // (A class without picks is not tuned: it keeps the default, as in a tune that infers.)
        // A hair under the lowest score: the file rounds scores to 6 decimals, and a threshold on
        // the rounded value could drop that pick (its true score up to 5e-7 lower).
        None => match cands.iter().filter(|p| p.class == c && runs.contains(&p.run)).map(|p| p.score).reduce(f32::min) {
            Some(lowest) => (lowest - 1e-6).max(a.min_threshold),
            None => a.min_threshold,
        },
    });
    // Scores are written to 6 decimals: one kept at its threshold may read back a hair under it.
    let cands: Vec<Pick> = cands.into_iter().filter(|p| runs.contains(&p.run) && p.score as f64 >= floors[p.class] as f64 - 5e-7).collect();
    let truth: Vec<Pick> = truth.into_iter().filter(|p| runs.contains(&p.run)).collect();
    match &recorded {
        Some(_) => fastdet::errln!("candidates from the thresholds its job kept them at (its record) or --min-threshold, whichever is higher"),
        None => fastdet::errln!("note: no record of the thresholds {} was made with: no class is tuned below its lowest score in it", file.display()),
    }
    fastdet::errln!("tuning on {} run(s), {} annotated particle(s), {} scored pick(s)", runs.len(), truth.len(), cands.len());
    let (thresholds, score) = metric::tune_thresholds_above(&truth, &cands, a.beta, &floors);
    fastdet::outln!("{}", metric::format_table(&score))?;
    let t: Vec<String> = thresholds.iter().map(|t| format!("{t}")).collect();
    fastdet::outln!("--thresholds {}", t.join(","))?;
    Ok(ExitCode::SUCCESS)
}

/// The configuration `run` would use, as a TOML file `--config` reads back.
fn effective_config(a: &RunArgs, s: &Settings) -> String {
    use toml::Value;
    // Absolute: a config file's relative paths are read relative to the file, wherever it goes.
    let path = |p: &Path| Value::String(std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).to_string_lossy().to_string());
    let mut t = toml::Table::new();
    let i = &a.infer;
    if let Some(d) = &i.data {
        t.insert("data".into(), path(d));
    }
    if let Some(c) = &i.copick_config {
        t.insert("copick_config".into(), path(c));
    } else if i.zarr.is_empty() && i.mrc.is_empty() {
        // The competition layout's split: nothing to say for tomograms named one by one.
        t.insert("split".into(), Value::String(i.split.clone()));
    }
    if i.data.is_some() || i.copick_config.is_some() {
        t.insert("tomogram".into(), Value::String(i.tomogram.clone()));
    }
    if !i.runs.is_empty() {
        t.insert("runs".into(), Value::Array(i.runs.iter().map(|r| Value::String(r.clone())).collect()));
    }
    match i.zarr.as_slice() {
        [] => {}
        [z] => {
            t.insert("zarr".into(), path(z));
        }
        many => {
            t.insert("zarr".into(), Value::Array(many.iter().map(|p| path(p)).collect()));
        }
    }
    if !i.mrc.is_empty() {
        t.insert("mrc".into(), Value::Array(i.mrc.iter().map(|p| path(p)).collect()));
    }
    t.insert("level".into(), Value::String(i.level.clone()));
    t.insert("weights".into(), Value::Array(i.weights.iter().map(|p| path(p)).collect()));
    if i.gpus.is_empty() && i.devices.is_empty() {
        t.insert("device".into(), Value::String(i.device.clone()));
    }
    if !i.gpus.is_empty() {
        t.insert("gpus".into(), Value::Array(i.gpus.iter().map(|&g| Value::Integer(g as i64)).collect()));
    }
    if !i.devices.is_empty() {
        t.insert("devices".into(), Value::Array(i.devices.iter().map(|d| Value::String(d.clone())).collect()));
    }
    let arr = |v: [usize; 3]| Value::Array(v.iter().map(|&x| Value::Integer(x as i64)).collect());
    t.insert("window".into(), arr(s.window));
    t.insert("tiles".into(), arr(s.tiles));
    t.insert("iou".into(), Value::Float(s.iou_threshold));
    t.insert("top_k".into(), Value::Integer(s.pre_nms_top_k as i64));
    t.insert("blend_sigma".into(), Value::Float(s.blend_sigma));
    t.insert("tta".into(), Value::String(i.tta.clone()));
    t.insert("batch".into(), Value::Integer(s.batch as i64));
    t.insert("device_blend".into(), Value::Boolean(s.device_blend));
    if let Some((k, n)) = i.shard {
        t.insert("shard".into(), Value::String(format!("{k}/{n}")));
    }
    t.insert(
        "voxel_size".into(),
        match i.voxel_size {
            VoxelSize::Angstrom(v) => Value::Float(v),
            VoxelSize::File => Value::String("file".into()),
        },
    );
    t.insert("resample".into(), Value::Boolean(i.resample));
    t.insert("model_voxel_size".into(), Value::Float(i.model_voxel_size));
    t.insert("allow_nonfinite".into(), Value::Boolean(i.allow_nonfinite));
    t.insert("invert".into(), Value::Boolean(i.invert));
    t.insert("pad".into(), Value::String(i.pad.clone()));
    if let Some(o) = &a.out {
        t.insert("out".into(), path(o));
    }
    t.insert("resume".into(), Value::Boolean(a.resume));
    t.insert("with_score".into(), Value::Boolean(a.with_score));
    for (k, v) in [("copick_out", &a.copick_out), ("save_maps", &a.save_maps), ("star_out", &a.star_out), ("qc", &a.qc)] {
        if let Some(v) = v {
            t.insert(k.into(), path(v));
        }
    }
    t.insert("user_id".into(), Value::String(a.user_id.clone()));
    t.insert("session_id".into(), Value::String(a.session_id.clone()));
    let mut th = toml::Table::new();
    for (c, v) in CLASSES.iter().zip(&s.thresholds) {
        // A value that reads back to the same f32: a tuned threshold is a candidate's exact score,
        // and `>=` keeps that candidate. The f32's shortest form where it survives the f64 on the
        // way, else the f32's exact value.
        let short: f64 = v.to_string().parse().unwrap_or(f64::NAN);
        th.insert(c.name.into(), Value::Float(if short as f32 == *v { short } else { *v as f64 }));
    }
    t.insert("thresholds".into(), Value::Table(th));
    format!("# fastdet {} run configuration (window and tiles in voxels, blend_sigma in stride-2 cells, voxel sizes in Å)\n{}", env!("CARGO_PKG_VERSION"), toml::to_string(&t).unwrap_or_default())
}

/// Peak resident memory of this process (Linux), for the summary line.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::{coverage_warnings, range_warning};

    fn shape_rot90() -> [usize; 3] {
        [184, 100, 630]
    }

    fn coverage_warnings_t(shape: [usize; 3], window: [usize; 3], tiles: [usize; 3], m: impl Fn() -> Option<usize>) -> Vec<String> {
        coverage_warnings(shape, window, tiles, true, false, m)
    }

    #[test]
    fn range_warning_names_the_voxel_that_sets_the_scaling() {
        // Noise spread evenly over [-1, 1] (about 7 σ wide): nothing to say.
        let shape = [4, 8, 16];
        let mut v: Vec<f32> = (0..512).map(|i| ((i * 37 % 512) as f32 / 255.5) - 1.0).collect();
        assert_eq!(range_warning(&v, shape), None);
        // One voxel far out (z 2, y 3, x 5) sets the range; the other side is named too.
        v[2 * 128 + 3 * 16 + 5] = 1e30;
        let w = range_warning(&v, shape).unwrap();
        assert!(w.contains("in under 0.01% of its value range, set by 1 extreme voxel(s) (the highest 1e30 at z,y,x 2,3,5") && w.contains("the lowest -1 at"), "{w}");
        // On the low side the same (the farther side is named first); a modest outlier is fine.
        v[2 * 128 + 3 * 16 + 5] = -3000.0;
        let w = range_warning(&v, shape).unwrap();
        assert!(w.starts_with("98% of its voxels lie in 0.07% of its value range, set by 1 extreme voxel(s) (the lowest -3000 at z,y,x 2,3,5, the highest 1 at"), "{w}");
        // Several are counted.
        let mut hot = v.clone();
        hot[0] = -2900.0;
        hot[511] = 5000.0;
        let w = range_warning(&hot, shape).unwrap();
        assert!(w.contains("set by 3 extreme voxel(s) (the highest 5000 at z,y,x 3,7,15, the lowest -3000 at z,y,x 2,3,5)"), "{w}");
        v[2 * 128 + 3 * 16 + 5] = 20.0;
        assert_eq!(range_warning(&v, shape), None);
        assert_eq!(range_warning(&[1.0], [1, 1, 1]), None);
        assert_eq!(range_warning(&[2.0; 8], [2, 2, 2]), None);
        // A masked volume (almost all one value, the content in a few voxels) is not this.
        let mut masked = vec![0.0f32; 512];
        masked[100] = 3.0;
        masked[200] = -1.0;
        assert_eq!(range_warning(&masked, shape), None);
    }

    #[test]
    fn coverage_warnings_name_gaps_and_heavy_padding_only() {
        // The seed on a competition tomogram: 8 slices of padding, 9 tiles of 128 over 630.
        let m32 = || Some(32);
        assert!(coverage_warnings_t([184, 630, 630], [192, 128, 128], [1, 9, 9], m32).is_empty());
        // A window longer than the axis: one tile is computed however many are asked for.
        assert!(coverage_warnings_t([184, 630, 630], [192, 128, 128], [2, 9, 9], m32).is_empty());
        let w = coverage_warnings_t([96, 160, 160], [128, 64, 96], [1, 2, 2], m32);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("the window (128,64,96) is longer than the volume (96,160,160) along z (32 voxels of padding): zero padding"), "{w:?}");
        assert!(w[0].ends_with("a window that fits: --window 96,64,96 --tiles 1,2,2 (or --pad mean)"), "{w:?}");
        assert!(w[1].contains("2 tile(s) of 64 along y cover 128 of its 160"), "{w:?}");
        // Past the seed's 8 in 192: 4 in 64 is said, with windows that overlap to cover 60.
        let w = coverage_warnings_t([60, 96, 96], [64, 96, 96], [1, 1, 1], m32);
        assert!(w.len() == 1 && w[0].contains("along z (4 voxels of padding)") && w[0].ends_with("--window 32,96,96 --tiles 2,1,1 (or --pad mean)"), "{w:?}");
        let w = coverage_warnings_t([100, 96, 96], [192, 96, 96], [1, 1, 1], m32);
        assert!(w[0].ends_with("--window 96,96,96 --tiles 2,1,1 (or --pad mean)"), "{w:?}");
        assert!(coverage_warnings_t([62, 96, 96], [64, 96, 96], [1, 1, 1], m32).is_empty());
        let w = coverage_warnings_t([20, 96, 96], [32, 96, 96], [1, 1, 1], m32);
        assert!(w[0].contains("the models take windows in multiples of 32, longer than the volume there: --pad mean"), "{w:?}");
        // Two short axes: one warning, one window that fits both.
        let w = coverage_warnings_t([60, 60, 96], [64, 64, 96], [1, 1, 1], m32);
        assert!(w.len() == 1 && w[0].contains("along z (4 voxels of padding) and y (4 voxels of padding)"), "{w:?}");
        assert!(w[0].ends_with("--window 32,32,96 --tiles 2,2,1 (or --pad mean)"), "{w:?}");
        // --tta rot90 needs y = x: the window that fits stays square, x tiled to cover its axis.
        let w = coverage_warnings(shape_rot90(), [192, 128, 128], [1, 9, 9], true, true, m32);
        assert!(w.len() == 1 && w[0].ends_with("--window 192,96,96 --tiles 1,2,9 (or --pad mean)"), "{w:?}");
        let w = coverage_warnings(shape_rot90(), [192, 128, 128], [1, 2, 2], true, true, m32);
        assert!(w[0].ends_with("--window 192,96,96 --tiles 1,2,7 (or --pad mean)"), "{w:?}");
        // --pad mean: no zero padding to warn about.
        assert!(coverage_warnings([60, 60, 96], [64, 64, 96], [1, 1, 1], false, false, m32).is_empty());
        // A window as long as the axis: every tile along it is the same tile.
        let w = coverage_warnings_t([64, 128, 160], [64, 128, 128], [2, 3, 3], m32);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("2 tiles along z have only 1 distinct start(s)"), "{w:?}");
        let w: Vec<String> = w.into_iter().skip(1).collect();
        assert!(w[0].contains("3 tiles along y have only 1 distinct start(s)") && w[0].contains("--tiles 1 along y") && w[0].contains("3.0x faster"), "{w:?}");
    }
}
