use anyhow::{bail, Context, Result};
use clap::Args;
use fastdet::io::csv;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Rows are ordered by run name (each run's rows keep their order) and renumbered, so merging the\n\
outputs of `run --shard K/N` for K = 0..N-1 gives the same file as one unsharded run.\n\
copick outputs need no merging: give every shard the same --copick-out directory (one file per run and particle).\n\
Example:\n  fastdet merge shards/sub_*.csv -o submission.csv")]
pub struct MergeArgs {
    /// Shard CSVs (Kaggle layout, with or without a score column)
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Merged CSV
    #[arg(short, long)]
    pub out: PathBuf,
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
    Ok(ExitCode::SUCCESS)
}
