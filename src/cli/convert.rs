use anyhow::{bail, Result};
use clap::Args;
use fastdet::convert::{convert as do_convert, ConvertOptions};
use fastdet::model::graph::Graph;
use fastdet::model::spec::{Arch, ModelSpec};
use fastdet::particles::CLASSES;
use fastdet::weights::Weights;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Example:\n  fastdet convert runs/segresnet/best.ckpt -o weights/segresnet.safetensors\n  fastdet convert fold*.ckpt --average -o weights/segresnet_avg.safetensors")]
pub struct ConvertArgs {
    /// Lightning .ckpt, torch.save .pt/.pth, or .safetensors (f32/f16/bf16) files
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output weights file (.safetensors, fp16)
    #[arg(short, long)]
    pub out: PathBuf,
    /// Architecture (default: detected from tensor names)
    #[arg(long, value_parser = ["segresnetv2", "dynunet"])]
    pub arch: Option<String>,
    /// Name stored in the metadata (default: first input's file stem)
    #[arg(long)]
    pub name: Option<String>,
    /// Average several checkpoints of one architecture (element-wise mean) into one file
    #[arg(long)]
    pub average: bool,
    /// Convert the EMA copy of the weights (e.g. model_ema.module.*) of a checkpoint that holds
    /// one beside the trained weights (by default the trained weights, with a warning)
    #[arg(long)]
    pub ema: bool,
}

pub fn convert(a: ConvertArgs) -> Result<ExitCode> {
    if let Some((j, i)) = super::merge::given_twice(&a.inputs) {
        bail!("{}: given twice (as input {} and {}); averaging it would weigh it double", a.inputs[i].display(), j + 1, i + 1);
    }
    let opts = ConvertOptions { arch: a.arch.as_deref().map(Arch::parse).transpose()?, name: a.name, average: a.average, ema: a.ema };
    let r = do_convert(&a.inputs, &a.out, &opts)?;
    for w in &r.warnings {
        fastdet::errln!("warning: {w}");
    }
    fastdet::outln!("{}: {}", r.spec.arch.name(), r.spec.widths_summary())?;
    fastdet::outln!(
        "kept {} tensors ({} parameters, fp16); dropped {} parameters in {} tensors the inference graph never reads{}",
        r.kept_tensors,
        r.kept_params,
        r.dropped_params,
        r.dropped_tensors.len(),
        if r.merged_aliases > 0 { format!("; merged {} aliased DynUNet tensors", r.merged_aliases) } else { String::new() }
    )?;
    if a.inputs.len() > 1 {
        fastdet::outln!("averaged {} checkpoints", a.inputs.len())?;
    }
    fastdet::outln!("wrote {}", a.out.display())?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
#[command(after_help = "Examples:\n  fastdet inspect weights/demo_segresnetv2.safetensors --graph --tile 192,128,128\n  fastdet inspect --arch dynunet")]
pub struct InspectArgs {
    /// fastdet weights file (.safetensors written by `fastdet convert`)
    #[arg(required_unless_present = "arch")]
    pub weights: Option<PathBuf>,
    /// Instead of a file: the seed configuration's network of this architecture, at its widths
    #[arg(long, value_parser = ["segresnetv2", "dynunet"], conflicts_with = "weights")]
    pub arch: Option<String>,
    /// Emit one JSON object
    #[arg(long)]
    pub json: bool,
    /// Print the op list with shapes
    #[arg(long)]
    pub graph: bool,
    /// Tile size z,y,x in voxels for FLOPs, memory and the op list
    #[arg(long, default_value = "192,128,128", value_parser = super::run::parse_triple)]
    pub tile: [usize; 3],
}

/// What `inspect` shows of a network: from a weights file or the seed's spec.
struct Inspected {
    name: String,
    spec: ModelSpec,
    classes: Vec<String>,
    params: usize,
    /// The converter's record of the checkpoints (JSON), for a file that has one.
    sources: Option<String>,
}

pub fn inspect(a: InspectArgs) -> Result<ExitCode> {
    // A file's weights, or the seed's spec alone (its parameters counted from the tensors it needs).
    let (what, w) = match (&a.weights, &a.arch) {
        (Some(p), _) => {
            let w = Weights::load(p)?;
            (p.display().to_string(), Inspected { params: w.param_count(), sources: w.metadata.get("fastdet.sources").cloned(), name: w.name, spec: w.spec, classes: w.classes })
        }
        (None, Some(arch)) => {
            let spec = ModelSpec::seed(Arch::parse(arch)?);
            let params = spec.required_tensors().iter().map(|(_, shape)| shape.iter().product::<usize>()).sum();
            let classes = CLASSES.iter().take(spec.num_classes).map(|c| c.name.to_string()).collect();
            (format!("the seed's {arch}"), Inspected { name: format!("seed-{arch}"), spec, classes, params, sources: None })
        }
        (None, None) => bail!("inspect needs a weights file or --arch"),
    };
    let g = Graph::build(&w.spec)?;
    g.check_tile(a.tile).map_err(|e| e.context("--tile"))?;
    let flops = g.flops(a.tile);
    let peak = g.peak_activation_bytes(a.tile, 4);
    let peak16 = g.peak_activation_bytes(a.tile, 2);
    let traffic = g.min_bytes_op_by_op(a.tile, 1);
    if a.json {
        let widths = serde_json::to_value(&w.spec)?;
        let j = serde_json::json!({
            "arch": w.spec.arch.name(),
            "name": w.name,
            "num_classes": w.spec.num_classes,
            "classes": w.classes,
            "stride": w.spec.stride,
            "params": w.params,
            "widths": widths,
            "tile": a.tile,
            "flops": flops,
            "activation_peak_bytes_f32": peak,
            "activation_peak_bytes_f16": peak16,
            "min_traffic_bytes_op_by_op": traffic,
            "ops": g.ops.len(),
            // With --graph, the op list as the text form prints it, one line an op.
            "graph": a.graph.then(|| g.describe(a.tile).lines().map(str::to_owned).collect::<Vec<_>>()),
            "sources": w.sources.as_deref().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
        });
        fastdet::outln!("{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        fastdet::outln!("{what}  ({})", w.name)?;
        fastdet::outln!("arch      {}", w.spec.arch.name())?;
        fastdet::outln!("widths    {}", w.spec.widths_summary())?;
        fastdet::outln!("classes   {}", w.classes.join(", "))?;
        fastdet::outln!("params    {} (fp16, {:.1} MiB)", w.params, w.params as f64 * 2.0 / 1048576.0)?;
        fastdet::outln!("tile      {}x{}x{}", a.tile[0], a.tile[1], a.tile[2])?;
        fastdet::outln!("FLOPs     {:.2} GFLOP per tile (convolutions, 2 per multiply-add)", flops as f64 / 1e9)?;
        fastdet::outln!(
            "memory    peak activations {:.1} MiB f32 ({:.1} MiB f16) per tile, buffers reused after last use",
            peak as f64 / 1048576.0,
            peak16 as f64 / 1048576.0
        )?;
        fastdet::outln!(
            "traffic   at least {:.2} GB per tile op by op (each op reads its inputs and writes its output once: activations fp16, maps f32; weights once)",
            traffic as f64 * 1e-9
        )?;
        if a.graph {
            fastdet::outln!("\n{}", g.describe(a.tile))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
