use anyhow::Result;
use clap::Args;
use std::process::ExitCode;
#[derive(Args)]
pub struct ScoreArgs {}
pub fn score(_a: ScoreArgs) -> Result<ExitCode> { todo!() }
