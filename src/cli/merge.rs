use anyhow::{bail, Context, Result};
use clap::Args;
use fastdet::io::csv;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Rows are ordered by run name (each run's rows keep their order) and renumbered, so merging the\n\
outputs of `run --shard K/N` for K = 0..N-1 gives the same file as one unsharded run.\n\
copick outputs of shards that wrote to separate folders are joined with --copick DIR... --copick-out DIR\n\
(shards may also all write into one --copick-out folder: one file per run and particle).\n\
Example:\n  fastdet merge shards/sub_*.csv -o submission.csv --copick shards/copick_* --copick-out copick")]
pub struct MergeArgs {
    /// Shard CSVs (Kaggle layout, with or without a score column)
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Merged CSV
    #[arg(short, long)]
    pub out: PathBuf,
    /// copick output folders of the shards (each holding ExperimentRuns/{run}/Picks/*.json)
    #[arg(long, num_args = 1.., requires = "copick_out")]
    pub copick: Vec<PathBuf>,
    /// Folder receiving every shard's copick picks
    #[arg(long)]
    pub copick_out: Option<PathBuf>,
}

/// Copies every `ExperimentRuns/{run}/Picks/*.json` of `src` under `dst`; a file that exists with
/// other content is a conflict between shards.
fn merge_copick(src: &Path, dst: &Path) -> Result<usize> {
    let runs = src.join("ExperimentRuns");
    let entries = std::fs::read_dir(&runs).with_context(|| format!("{}: not a copick output folder", runs.display()))?;
    let mut n = 0;
    for run in entries {
        let run = run?.path();
        let picks = run.join("Picks");
        let Ok(files) = std::fs::read_dir(&picks) else { continue };
        let to = dst.join("ExperimentRuns").join(run.file_name().unwrap()).join("Picks");
        std::fs::create_dir_all(&to).with_context(|| format!("{}: cannot create", to.display()))?;
        for f in files {
            let f = f?.path();
            if f.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = std::fs::read(&f).with_context(|| format!("{}: cannot read", f.display()))?;
            let target = to.join(f.file_name().unwrap());
            if let Ok(existing) = std::fs::read(&target) {
                if existing != bytes {
                    bail!("{}: conflicts with {} (two shards wrote the same run and particle)", f.display(), target.display());
                }
                continue;
            }
            fastdet::util::write_atomic(&target, |out| {
                use std::io::Write;
                Ok(out.write_all(&bytes)?)
            })?;
            n += 1;
        }
    }
    Ok(n)
}

fn has_score(p: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
    Ok(text.lines().next().is_some_and(|h| h.split(',').any(|c| c.trim() == "score")))
}

pub fn merge(a: MergeArgs) -> Result<ExitCode> {
    let mut picks = Vec::new();
    let mut with_score = true;
    for p in &a.inputs {
        with_score &= has_score(p)?;
        let rows = csv::read_submission(p)?;
        if let (Some(r), Some(_)) = (rows.first(), picks.iter().find(|q: &&fastdet::particles::Pick| q.run == rows[0].run)) {
            bail!("{}: run {} also appears in an earlier input; shards must not overlap", p.display(), r.run);
        }
        picks.extend(rows);
    }
    picks.sort_by(|x, y| x.run.cmp(&y.run)); // stable: keeps each run's order
    csv::write_submission(&a.out, &picks, with_score)?;
    println!("merged {} picks from {} file(s) into {}", picks.len(), a.inputs.len(), a.out.display());
    if let Some(dst) = &a.copick_out {
        let mut files = 0;
        for src in &a.copick {
            files += merge_copick(src, dst)?;
        }
        println!("copied {files} copick picks file(s) from {} folder(s) into {}", a.copick.len(), dst.display());
    }
    Ok(ExitCode::SUCCESS)
}
