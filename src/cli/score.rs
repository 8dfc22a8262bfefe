use anyhow::{bail, Result};
use clap::Args;
use fastdet::io::{copick, csv};
use fastdet::metric;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Match radius: 0.5 x particle radius (Å); beta 4; class weights 1,2,1,2,1,0.\nExample:\n  fastdet score --truth tests/fixtures/dataset --split test sub.csv")]
pub struct ScoreArgs {
    /// Submission CSV (id,experiment,particle_type,[score,]x,y,z in Å)
    pub submission: PathBuf,
    /// Dataset root with copick picks under {split}/overlay/ExperimentRuns/{run}/Picks/
    #[arg(long)]
    pub truth: PathBuf,
    /// Split holding the ground truth (the competition's labels are under train)
    #[arg(long, default_value = "train")]
    pub split: String,
    /// F-beta's beta
    #[arg(long, default_value_t = 4.0)]
    pub beta: f64,
    /// Print one JSON object (keys fbeta, per_class)
    #[arg(long)]
    pub json: bool,
}

pub fn score(a: ScoreArgs) -> Result<ExitCode> {
    if !(a.beta.is_finite() && a.beta > 0.0) {
        bail!("--beta {}: must be a positive number", a.beta);
    }
    let truth = copick::read_truth(&a.truth, &a.split)?;
    let sub = csv::read_submission(&a.submission)?;
    // Runs of the split (annotated or not; read_truth has listed the folder already).
    let runs_dir = copick::truth_runs_dir(&a.truth, &a.split);
    let known: std::collections::BTreeSet<String> =
        std::fs::read_dir(&runs_dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let unknown: std::collections::BTreeSet<&str> = sub.iter().map(|p| p.run.as_str()).filter(|r| !known.contains(*r)).collect();
    if !unknown.is_empty() {
        let list: Vec<&str> = unknown.iter().copied().take(5).collect();
        eprintln!(
            "warning: {}: {} run(s) have no ground truth under {} split {:?} and are not scored: {}{}",
            a.submission.display(),
            unknown.len(),
            a.truth.display(),
            a.split,
            list.join(", "),
            if unknown.len() > 5 { ", ..." } else { "" }
        );
    }
    let s = metric::score(&truth, &sub, a.beta);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("{}", metric::format_table(&s));
    }
    Ok(ExitCode::SUCCESS)
}
