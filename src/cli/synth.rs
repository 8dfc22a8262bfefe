use anyhow::Result;
use clap::Args;
use std::process::ExitCode;

#[derive(Args)]
pub struct SynthArgs {}

pub fn synth(_a: SynthArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
