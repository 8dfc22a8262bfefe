use anyhow::Result;
use clap::Args;
use std::process::ExitCode;

#[derive(Args)]
pub struct SelftestArgs {
    /// Device to test against the CPU reference (cuda:N)
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
}

pub fn selftest(a: SelftestArgs) -> Result<ExitCode> {
    let dev = fastdet::engine::Device::parse(&a.device)?;
    anyhow::bail!("no CUDA engine in this build to test on {dev}; the CPU engine is checked by `cargo test`")
}
