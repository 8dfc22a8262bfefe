use anyhow::Result;
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
    let truth = copick::read_truth(&a.truth, &a.split)?;
    let sub = csv::read_submission(&a.submission)?;
    let s = metric::score(&truth, &sub, a.beta);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("{}", metric::format_table(&s));
    }
    Ok(ExitCode::SUCCESS)
}
