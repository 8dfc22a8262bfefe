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
    /// Score only these runs (comma-separated), e.g. the runs of one shard; by default every run
    /// with ground truth is scored, and one without picks counts all its particles as missed
    #[arg(long, value_delimiter = ',')]
    pub runs: Vec<String>,
}

pub fn score(a: ScoreArgs) -> Result<ExitCode> {
    if !(a.beta.is_finite() && a.beta > 0.0) {
        bail!("--beta {}: must be a positive number", a.beta);
    }
    let runs_dir = copick::truth_runs_dir(&a.truth, &a.split);
    if !runs_dir.is_dir() {
        // Name the splits that do hold ground truth (synth and the sample write `test`).
        let splits: Vec<String> = std::fs::read_dir(&a.truth)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|s| copick::truth_runs_dir(&a.truth, s).is_dir())
            .collect();
        if !splits.is_empty() {
            bail!(
                "{}: no ground truth for split {:?}; {} has it for {}: give --split",
                runs_dir.display(),
                a.split,
                a.truth.display(),
                splits.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let mut truth = copick::read_truth(&a.truth, &a.split)?;
    let mut sub = csv::read_submission(&a.submission)?;
    if !a.runs.is_empty() {
        let chosen: std::collections::BTreeSet<&str> = a.runs.iter().map(|r| r.trim()).collect();
        // A name the split does not have (a typo) would silently score fewer runs.
        let split_runs: std::collections::BTreeSet<String> =
            std::fs::read_dir(&runs_dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        if let Some(r) = chosen.iter().find(|r| !split_runs.contains(**r)) {
            bail!("--runs: run {r:?} is not in {}", runs_dir.display());
        }
        truth.retain(|p| chosen.contains(p.run.as_str()));
        sub.retain(|p| chosen.contains(p.run.as_str()));
        if truth.is_empty() {
            bail!("--runs: none of {} has ground truth under {}", a.runs.join(", "), runs_dir.display());
        }
    }
    // Runs with particles but no picks: every particle counts as missed. Said, since it is the
    // usual result of scoring one shard's (or one run's) CSV against the whole split.
    let submitted: std::collections::BTreeSet<&str> = sub.iter().map(|p| p.run.as_str()).collect();
    let missing: std::collections::BTreeSet<&str> = truth.iter().map(|p| p.run.as_str()).filter(|r| !submitted.contains(r)).collect();
    if !missing.is_empty() {
        fastdet::errln!(
            "warning: {}: {} run(s) with ground truth have no picks, and all their particles count as missed: {} (--runs scores a subset)",
            a.submission.display(),
            missing.len(),
            first_few(&missing)
        );
    }
    // Runs of the split (annotated or not; read_truth has listed the folder already).
    let known: std::collections::BTreeSet<String> =
        std::fs::read_dir(&runs_dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let unknown: std::collections::BTreeSet<&str> = sub.iter().map(|p| p.run.as_str()).filter(|r| !known.contains(*r)).collect();
    if !unknown.is_empty() {
        fastdet::errln!(
            "warning: {}: {} run(s) have no ground truth under {} split {:?} and are not scored: {}",
            a.submission.display(),
            unknown.len(),
            a.truth.display(),
            a.split,
            first_few(&unknown)
        );
    }
    let s = metric::score(&truth, &sub, a.beta);
    if a.json {
        fastdet::outln!("{}", serde_json::to_string_pretty(&s)?)?;
    } else {
        fastdet::outln!("{}", metric::format_table(&s))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The first five run names, and "..." when there are more.
fn first_few(runs: &std::collections::BTreeSet<&str>) -> String {
    let list: Vec<&str> = runs.iter().copied().take(5).collect();
    format!("{}{}", list.join(", "), if runs.len() > 5 { ", ..." } else { "" })
}
