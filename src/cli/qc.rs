use anyhow::Result;
use clap::Args;
use std::process::ExitCode;

#[derive(Args)]
pub struct QcArgs {}

pub fn qc(_a: QcArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
