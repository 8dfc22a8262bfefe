use anyhow::{bail, Result};
use clap::Args;
use fastdet::engine::{self, Device};
use fastdet::io::tensors;
use fastdet::weights::Weights;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Reads tensor `input` [N,1,D,H,W] f32; writes `scores` [N,C,D/2,H/2,W/2], `offsets` [N,3,...] (voxels; x,y,z) and, with --features, `fm2`.\nExample:\n  fastdet forward --weights weights/demo_dynunet.safetensors --input tile.safetensors --output out.safetensors")]
pub struct ForwardArgs {
    /// fastdet weights (from `fastdet convert`)
    #[arg(long)]
    pub weights: PathBuf,
    /// safetensors file holding tensor `input`, f32 [N,1,D,H,W]
    #[arg(long)]
    pub input: PathBuf,
    /// safetensors file to write (`scores`, `offsets`, and `fm2` with --features)
    #[arg(long)]
    pub output: PathBuf,
    /// cpu or cuda:N (emu:N: the CUDA engine on a host emulator of its kernels, no GPU; slow,
    /// for testing)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write the head's input feature map `fm2`
    #[arg(long)]
    pub features: bool,
}

pub fn forward(a: ForwardArgs) -> Result<ExitCode> {
    // Neither input may be replaced by the output, and it must be writable, before the work.
    fastdet::util::check_not_an_input(&a.output, &[a.weights.as_path(), a.input.as_path()])?;
    fastdet::util::check_output_file(&a.output)?;
    let w = Weights::load(&a.weights)?;
    let (shape, data) = tensors::read_f32(&a.input, "input")?;
    if shape.len() != 5 || shape[1] != w.spec.in_channels {
        bail!("{}: tensor input has shape {shape:?}; expected [N,{},D,H,W]", a.input.display(), w.spec.in_channels);
    }
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        bail!("{}: {bad} of {} input values are NaN or infinite", a.input.display(), data.len());
    }
    let (n, tile) = (shape[0], [shape[2], shape[3], shape[4]]);
    let mut e = engine::open(Device::parse(&a.device)?, &w)?;
    let t0 = std::time::Instant::now();
    let out = e.forward(&data, n, tile, a.features).map_err(|err| anyhow::anyhow!("{}: {err:#}", a.input.display()))?;
    let dt = t0.elapsed().as_secs_f64();
    let half = [tile[0] / 2, tile[1] / 2, tile[2] / 2];
    let sh = |c: usize| vec![n, c, half[0], half[1], half[2]];
    let mut list: Vec<(&str, Vec<usize>, &[f32])> =
        vec![("scores", sh(w.spec.num_classes), &out.scores), ("offsets", sh(3), &out.offsets)];
    if let Some(f) = &out.fm2 {
        list.push(("fm2", sh(w.spec.head_in), f));
    }
    tensors::write_f32(&a.output, &list, None)?;
    fastdet::outln!("{} tile(s) of {}x{}x{} on {} in {dt:.3} s; wrote {}", n, tile[0], tile[1], tile[2], e.name(), a.output.display())?;
    Ok(ExitCode::SUCCESS)
}
