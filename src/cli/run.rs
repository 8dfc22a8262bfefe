use anyhow::Result;
use clap::Args;
use std::process::ExitCode;
#[derive(Args)]
pub struct RunArgs {}
#[derive(Args)]
pub struct TuneArgs {}
pub fn run(_a: RunArgs) -> Result<ExitCode> { todo!() }
pub fn tune(_a: TuneArgs) -> Result<ExitCode> { todo!() }
pub fn parse_triple(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> = s.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|e| format!("{s:?}: {e}"))?;
    v.try_into().map_err(|_| format!("{s:?}: expected three comma-separated integers z,y,x"))
}
