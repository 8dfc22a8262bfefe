use super::run::parse_triple;
use anyhow::{bail, Context, Result};
use clap::Args;
use fastdet::particles::CLASSES;
use fastdet::synth::{self, SynthConfig};
use std::path::PathBuf;
use std::process::ExitCode;

fn parse_counts(s: &str) -> Result<[usize; 6], String> {
    let v: Vec<usize> =
        s.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|e| format!("{s:?}: {e}"))?;
    let n = v.len();
    v.try_into().map_err(|_| format!("{s:?}: got {n} values, expected 6 (one per class, in class order)"))
}

#[derive(Args)]
#[command(after_help = "Particles (class order, radius Å): apo-ferritin 60 (hollow shell), beta-galactosidase 90 (four lobes), \
ribosome 150 (two subunits),\nthyroglobulin 130 (elongated), virus-like-particle 135 (thick shell), beta-amylase 65 (dim blob); \
voxel 10.012 Å.\nParticles are darker than the background (v = -density * 1e-5 + 2e-6). Ground-truth picks are in Å.\n\
Writes {OUT}/{split}/static/ExperimentRuns/TS_synth_N/VoxelSpacing10.000/denoised.zarr (OME-Zarr v2, levels 0,1,2,\n\
f32, chunks of up to 64³, blosc zstd) and {OUT}/{split}/overlay/ExperimentRuns/TS_synth_N/Picks/{particle}.json.\n\
Example:\n  fastdet synth /tmp/synth --runs 2 --shape 80,160,160 --seed 7\n  \
fastdet run --data /tmp/synth --weights weights/demo_segresnetv2.safetensors weights/demo_dynunet.safetensors \\\n      \
--window 64,96,96 --tiles 2,3,3 --out sub.csv && fastdet score --truth /tmp/synth --split test sub.csv")]
pub struct SynthArgs {
    /// Output dataset root (must not exist or be empty)
    pub out: PathBuf,
    /// Number of tomograms (runs TS_synth_1..N)
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// Tomogram shape z,y,x in voxels (10.012 Å each)
    #[arg(long, default_value = "80,160,160", value_parser = parse_triple)]
    pub shape: [usize; 3],
    /// Random seed (same seed, same bytes)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Split directory under OUT
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Std of the white noise added before the final blur, in particle-density units (a solid particle
    /// is 1); the bundled sample was made with 0.8 (the reference generator defaults to 0.35)
    #[arg(long, default_value_t = 0.8)]
    pub noise: f32,
    /// Particles per class in class order [default: 10,5,4,5,3,4 per 80x160x160 voxels, scaled to --shape]
    #[arg(long, value_parser = parse_counts)]
    pub counts: Option<[usize; 6]>,
}

pub fn synth(a: SynthArgs) -> Result<ExitCode> {
    if a.out.is_symlink() {
        bail!("{}: is a symbolic link; give the folder itself", a.out.display());
    }
    if a.out.exists() && !a.out.is_dir() {
        bail!("{}: is a file; give a new or empty directory", a.out.display());
    }
    if a.out.exists() {
        let non_empty = std::fs::read_dir(&a.out).with_context(|| format!("{}: cannot list", a.out.display()))?.next().is_some();
        if non_empty {
            bail!("{}: exists and is not an empty directory; refusing to overwrite", a.out.display());
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let cfg = SynthConfig {
        runs: a.runs,
        shape: a.shape,
        seed: a.seed,
        split: a.split,
        noise: a.noise,
        particles_per_class: a.counts.unwrap_or_else(|| synth::counts_for_shape(a.shape)),
    };
    // Written under a hidden name and moved into place at the end: an interrupted synth leaves
    // no dataset that looks complete. A new OUT is built beside it and renamed; an existing empty
    // OUT (its permissions, a mount point) stays, built in a hidden folder inside it whose
    // contents are moved up.
    let exists = a.out.is_dir();
    let staging = if exists {
        a.out.join(format!(".partial.{}", std::process::id()))
    } else {
        fastdet::util::hidden_sibling(&a.out, "partial")?
    };
    std::fs::create_dir_all(&staging).with_context(|| format!("{}: cannot create", staging.display()))?;
    let cleanup = fastdet::util::RemoveOnStop::new(&staging);
    // Moved into place with stop signals held off: whole, or removed.
    let finished = synth::write_dataset(&staging, &cfg).and_then(|w| cleanup.commit(|| {
        if exists {
            for entry in std::fs::read_dir(&staging).with_context(|| format!("{}: cannot list", staging.display()))? {
                let from = entry?.path();
                let to = a.out.join(from.file_name().expect("a listed entry"));
                std::fs::rename(&from, &to).with_context(|| format!("{}: cannot move {} into place", to.display(), from.display()))?;
            }
            std::fs::remove_dir(&staging).with_context(|| format!("{}: cannot remove", staging.display()))?;
        } else {
            std::fs::rename(&staging, &a.out).with_context(|| format!("{}: cannot rename {} into place", a.out.display(), staging.display()))?;
        }
        Ok(w)
    }));
    let written = match finished {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    // What was placed: a volume too small for the requested particles holds fewer.
    let runs = written.runs.len();
    let requested: usize = cfg.particles_per_class.iter().sum::<usize>() * runs;
    let placed: usize = written.placed.iter().sum();
    let counts: Vec<String> = CLASSES
        .iter()
        .zip(written.placed.iter().zip(cfg.particles_per_class))
        .map(|(class, (got, n))| format!("{} {got}/{}", class.name, n * runs))
        .collect();
    fastdet::errln!(
        "wrote {runs} run(s) of {:?} voxels under {} (split {}; particles placed/requested over all runs: {})",
        cfg.shape,
        a.out.display(),
        cfg.split,
        counts.join(", ")
    );
    if placed < requested {
        fastdet::errln!("warning: the volume has no room for every requested particle: {placed} of {requested} placed");
    }
    Ok(ExitCode::SUCCESS)
}
