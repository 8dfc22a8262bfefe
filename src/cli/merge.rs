use anyhow::Result;
use clap::Args;
use std::process::ExitCode;

#[derive(Args)]
pub struct MergeArgs {}

pub fn merge(_a: MergeArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
