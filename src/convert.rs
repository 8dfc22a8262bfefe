//! Checkpoint → fastdet weights: architecture detection, width inference, pruning of the tensors the
//! inference graph never reads, DynUNet alias merging, fp16 cast, checkpoint averaging.

use crate::checkpoint::{read_checkpoint, Checkpoint, Param};
use crate::model::spec::{detect_arch, infer_spec, Arch, ModelSpec};
use crate::particles::CLASSES;
use anyhow::{bail, Context, Result};
use half::f16;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Version of the weights layout this build writes and reads.
pub const FORMAT_VERSION: &str = "1";

#[derive(Debug, Default, Clone)]
pub struct ConvertOptions {
    /// Overrides detection from tensor names.
    pub arch: Option<Arch>,
    /// A name stored in the metadata (default: the first input's file stem).
    pub name: Option<String>,
    /// Average several checkpoints of one architecture into one weights file.
    pub average: bool,
    /// Take the EMA copy of the weights when a checkpoint holds one beside the trained weights.
    pub ema: bool,
}

#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub spec: ModelSpec,
    pub kept_tensors: usize,
    pub kept_params: usize,
    /// Parameters of tensors the inference graph never reads.
    pub dropped_params: usize,
    pub dropped_tensors: Vec<String>,
    /// DynUNet tensors stored twice under two names, merged into one.
    pub merged_aliases: usize,
    /// What the user should know: which of several weight sets was taken, all-zero tensors.
    pub warnings: Vec<String>,
}

/// Takes the model's tensors out of a checkpoint's namespace: the names are found by their
/// `backbone.` part, and what comes before it, made of wrappers' names, is a prefix to strip
/// (`model.` of a bare `pl_module.state_dict()`, `module.` of DataParallel, `_orig_mod.` of
/// torch.compile). A
/// checkpoint with two sets, one of them an EMA copy (`model_ema.module.`, `ema_state_dict.`),
/// gives the trained set, or the EMA set with `ema`, and says so; other ambiguities are errors.
pub fn model_namespace(ckpt: Checkpoint, ema: bool, warnings: &mut Vec<String>) -> Result<Checkpoint> {
    // Only wrappers' prefixes: a tensor under any other name (`teacher.backbone.*`) is not taken
    // for the model's.
    const WRAPPERS: &[&str] = &["model", "module", "_orig_mod", "net", "network", "model_ema", "ema_model", "ema", "ema_state_dict", "state_dict_ema"];
    let prefix_of = |n: &str| -> Option<String> {
        let i = n.match_indices("backbone.").map(|(i, _)| i).find(|&i| i == 0 || n.as_bytes()[i - 1] == b'.')?;
        let p = &n[..i];
        p.split_terminator('.').all(|seg| WRAPPERS.contains(&seg)).then(|| p.to_string())
    };
    let mut prefixes: Vec<String> = ckpt.names().filter_map(prefix_of).collect();
    prefixes.sort();
    prefixes.dedup();
    let is_ema = |p: &str| p.to_ascii_lowercase().contains("ema");
    let chosen = match prefixes.len() {
        0 => return Ok(ckpt), // no backbone: detection reports it
        1 => {
            if ema && !is_ema(&prefixes[0]) {
                bail!("--ema: the checkpoint holds one set of weights ({}backbone.*), not an EMA copy", prefixes[0]);
            }
            prefixes[0].clone()
        }
        _ => {
            let (emas, plain): (Vec<&String>, Vec<&String>) = prefixes.iter().partition(|p| is_ema(p));
            let shown = |v: &[String]| v.iter().map(|p| format!("{p}backbone.*")).collect::<Vec<_>>().join(", ");
            match (ema, emas.as_slice(), plain.as_slice()) {
                (false, [e], [p]) => {
                    warnings.push(format!("the checkpoint also holds EMA weights ({e}backbone.*); converted {p}backbone.*, pass --ema for the EMA copy"));
                    (*p).clone()
                }
                (true, [e], _) => {
                    warnings.push(format!("converted the EMA weights {e}backbone.*"));
                    (*e).clone()
                }
                _ => bail!("the checkpoint holds several sets of model weights ({}); convert a checkpoint with one", shown(&prefixes)),
            }
        }
    };
    // The chosen set's tensors (its heads too, which have no `backbone.` to be recognised by)
    // lose their prefix; the other sets' are left out, all of them.
    let others: Vec<&String> = prefixes.iter().filter(|p| **p != chosen && !p.is_empty()).collect();
    let params = ckpt
        .params
        .into_iter()
        .filter_map(|mut p| {
            if chosen.is_empty() {
                return (!others.iter().any(|o| p.name.starts_with(o.as_str()))).then_some(p);
            }
            let rest = p.name.strip_prefix(&chosen)?.to_string();
            p.name = rest;
            Some(p)
        })
        .collect();
    Ok(Checkpoint::new(params))
}

/// A checkpoint reduced to the tensors the pruned graph reads, in f32, with its spec.
pub struct Pruned {
    pub spec: ModelSpec,
    pub tensors: Vec<Param>,
    pub dropped_params: usize,
    pub dropped_tensors: Vec<String>,
    pub merged_aliases: usize,
}

/// Maps a DynUNet `backbone.skip_layers.(next_layer.)*X` alias to its canonical name.
/// `depth_of_bottleneck` is the number of `next_layer.` hops that reach the bottleneck.
fn dynunet_canonical(name: &str, depth_of_bottleneck: usize) -> Option<String> {
    let mut rest = name.strip_prefix("backbone.skip_layers.")?;
    let mut k = 0;
    while let Some(r) = rest.strip_prefix("next_layer.") {
        rest = r;
        k += 1;
    }
    if k == depth_of_bottleneck {
        return Some(format!("backbone.bottleneck.{rest}"));
    }
    let n = depth_of_bottleneck + 1; // levels
    if let Some(r) = rest.strip_prefix("downsample.") {
        return Some(if k == 0 { format!("backbone.input_block.{r}") } else { format!("backbone.downsamples.{}.{r}", k - 1) });
    }
    if let Some(r) = rest.strip_prefix("upsample.") {
        return Some(format!("backbone.upsamples.{}.{r}", n - 2 - k));
    }
    if let Some(r) = rest.strip_prefix("super_head.") {
        return Some(format!("backbone.deep_supervision_heads.{}.{r}", k.checked_sub(1)?));
    }
    None
}

/// Merges DynUNet's aliased copies: keeps one name per tensor and fails if two copies differ.
fn merge_dynunet_aliases(ckpt: &Checkpoint) -> Result<(Vec<Param>, usize)> {
    // The bottleneck is the deepest skip-layer path whose remainder is a conv block itself.
    let depth = ckpt
        .names()
        .filter_map(|n| n.strip_prefix("backbone.skip_layers."))
        .filter_map(|r| {
            let hops = r.matches("next_layer.").count();
            let tail = r.rsplit("next_layer.").next().unwrap_or(r);
            (tail.starts_with("conv1.") || tail.starts_with("conv2.")).then_some(hops)
        })
        .max();
    let mut out: Vec<Param> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut merged = 0;
    for p in &ckpt.params {
        let canonical = match depth {
            Some(d) if p.name.starts_with("backbone.skip_layers.") => {
                dynunet_canonical(&p.name, d).with_context(|| format!("unrecognised DynUNet tensor name {}", p.name))?
            }
            _ => p.name.clone(),
        };
        if let Some(&i) = index.get(&canonical) {
            let first = &out[i];
            if first.shape != p.shape || first.data != p.data {
                bail!("tensors {} and {} are two copies of one DynUNet parameter but differ", first.name, p.name);
            }
            merged += 1;
            out[i].name = canonical;
        } else {
            index.insert(canonical.clone(), out.len());
            out.push(Param { name: canonical, shape: p.shape.clone(), data: p.data.clone() });
        }
    }
    Ok((out, merged))
}

/// Reduces a checkpoint to what the inference graph reads.
pub fn prune(ckpt: &Checkpoint, arch_override: Option<Arch>) -> Result<Pruned> {
    let detected = detect_arch(ckpt.names());
    let arch = match (arch_override, detected) {
        (Some(a), _) => a,
        (None, Some(a)) => a,
        (None, None) => {
            let sample: Vec<&str> = ckpt.names().take(4).collect();
            bail!(
                "unknown architecture: no SegResNet (backbone.convInit.*) or DynUNet (backbone.input_block.*) tensors; \
                 first names are {sample:?}; pass --arch if the names are right"
            );
        }
    };
    let (params, merged_aliases) = match arch {
        Arch::Dynunet => merge_dynunet_aliases(ckpt)?,
        Arch::Segresnetv2 => (ckpt.params.clone(), 0),
    };
    let by_name: HashMap<&str, &Param> = params.iter().map(|p| (p.name.as_str(), p)).collect();
    let spec = infer_spec(arch, &|n| by_name.get(n).map(|p| p.shape.clone()))?;
    let required = spec.required_tensors();
    let mut missing = Vec::new();
    let mut tensors = Vec::new();
    for (name, shape) in &required {
        match by_name.get(name.as_str()) {
            None => missing.push(name.clone()),
            Some(p) if &p.shape != shape => {
                bail!("tensor {name} has shape {:?}, but the {} widths need {shape:?}", p.shape, arch.name())
            }
            Some(p) => tensors.push((*p).clone()),
        }
    }
    if !missing.is_empty() {
        bail!("{} checkpoint is missing {} tensor(s): {}", arch.name(), missing.len(), missing.join(", "));
    }
    let keep: std::collections::HashSet<&str> = required.iter().map(|(n, _)| n.as_str()).collect();
    let dropped: Vec<&Param> = params.iter().filter(|p| !keep.contains(p.name.as_str())).collect();
    Ok(Pruned {
        spec,
        tensors,
        dropped_params: dropped.iter().map(|p| p.numel()).sum(),
        dropped_tensors: dropped.iter().map(|p| p.name.clone()).collect(),
        merged_aliases,
    })
}

/// Casts to fp16; a value that is not finite or overflows fp16 is an error naming the tensor.
pub fn to_f16(p: &Param) -> Result<Vec<f16>> {
    p.data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if !v.is_finite() {
                bail!("tensor {} holds a non-finite value ({v}) at flat index {i}", p.name);
            }
            let h = f16::from_f32(v);
            if !h.is_finite() {
                bail!("tensor {} value {v} at flat index {i} overflows fp16 (max 65504)", p.name);
            }
            Ok(h)
        })
        .collect()
}

fn sha256_hex(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// Reads, prunes, (averages) and writes fastdet fp16 weights.
pub fn convert(inputs: &[PathBuf], out: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    if inputs.is_empty() {
        bail!("no input checkpoint given");
    }
    if inputs.len() > 1 && !opts.average {
        bail!("{} inputs given: pass --average to average them into one weights file", inputs.len());
    }
    // Not into a folder that is missing or is the output's name: found before the reading.
    crate::util::check_output_file(out)?;
    // Never over an input: a failed conversion would leave neither.
    if let Ok(o) = out.canonicalize() {
        if let Some(i) = inputs.iter().find(|i| i.canonicalize().is_ok_and(|c| c == o)) {
            bail!("{}: is also an input; write the weights to another file", i.display());
        }
    }
    let mut pruned: Vec<Pruned> = Vec::new();
    let mut warnings = Vec::new();
    for input in inputs {
        let ckpt = read_checkpoint(input)?;
        let mut notes = Vec::new();
        let ckpt = model_namespace(ckpt, opts.ema, &mut notes).with_context(|| format!("{}: cannot convert", input.display()))?;
        warnings.extend(notes.into_iter().map(|n| format!("{}: {n}", input.display())));
        let p = prune(&ckpt, opts.arch).with_context(|| format!("{}: cannot convert", input.display()))?;
        if let Some(first) = pruned.first() {
            if first.spec != p.spec {
                bail!(
                    "{}: cannot average: its widths ({}) differ from {} ({})",
                    input.display(),
                    p.spec.widths_summary(),
                    inputs[0].display(),
                    first.spec.widths_summary()
                );
            }
        }
        // One model under two names or formats (a .ckpt and its state dict) would weigh double.
        let same = |q: &Pruned| q.tensors.len() == p.tensors.len() && q.tensors.iter().zip(&p.tensors).all(|(a, b)| a.name == b.name && a.shape == b.shape && a.data == b.data);
        if let Some(j) = pruned.iter().position(same) {
            let this = &inputs[pruned.len()];
            bail!("{}: holds the same weights as {}; averaging them would weigh that model double", this.display(), inputs[j].display());
        }
        pruned.push(p);
    }
    let first = &pruned[0];
    let mut tensors: Vec<Param> = first.tensors.clone();
    if pruned.len() > 1 {
        // Mean in f64 for every element, in input order.
        for (ti, t) in tensors.iter_mut().enumerate() {
            for (ei, v) in t.data.iter_mut().enumerate() {
                let s: f64 = pruned.iter().map(|p| p.tensors[ti].data[ei] as f64).sum();
                *v = (s / pruned.len() as f64) as f32;
            }
        }
    }
    let zeros = tensors.iter().filter(|t| t.data.iter().all(|&v| v == 0.0)).count();
    if zeros * 2 > tensors.len() {
        warnings.push(format!("{zeros} of the {} tensors kept are all zeros: untrained weights, or not the set that was trained?", tensors.len()));
    }
    let halves: Vec<Vec<f16>> = tensors.iter().map(to_f16).collect::<Result<_>>().with_context(|| match inputs {
        [one] => format!("{}: cannot convert", one.display()),
        _ => format!(
            "cannot convert the average of {}",
            inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    })?;

    let mut sources = Vec::new();
    for input in inputs {
        sources.push(serde_json::json!({
            "file": input.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
            "sha256": sha256_hex(input)?,
        }));
    }
    let spec = first.spec.clone();
    let name = opts.name.clone().unwrap_or_else(|| {
        inputs[0].file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| spec.arch.name().to_string())
    });
    // The CZII six by name; another head is not given their names (a three-class model is not
    // apo-ferritin, beta-galactosidase and ribosome), and `run` refuses it.
    let classes: Vec<String> = if spec.num_classes == CLASSES.len() {
        CLASSES.iter().map(|c| c.name.to_string()).collect()
    } else {
        warnings.push(format!(
            "the head predicts {} classes, not the six CZII particles: named class0..class{} in the weights; `inspect` and `forward` take them, `run` refuses them",
            spec.num_classes,
            spec.num_classes.saturating_sub(1)
        ));
        (0..spec.num_classes).map(|c| format!("class{c}")).collect()
    };
    let mut meta: HashMap<String, String> = HashMap::new();
    meta.insert("fastdet.format_version".into(), FORMAT_VERSION.into());
    meta.insert("fastdet.version".into(), env!("CARGO_PKG_VERSION").into());
    meta.insert("fastdet.name".into(), name);
    meta.insert("fastdet.arch".into(), spec.arch.name().into());
    meta.insert("fastdet.spec".into(), serde_json::to_string(&spec)?);
    meta.insert("fastdet.num_classes".into(), spec.num_classes.to_string());
    meta.insert("fastdet.classes".into(), serde_json::to_string(&classes)?);
    meta.insert("fastdet.stride".into(), spec.stride.to_string());
    meta.insert("fastdet.sources".into(), serde_json::to_string(&sources)?);
    meta.insert("fastdet.averaged".into(), inputs.len().to_string());

    let views: BTreeMap<String, safetensors::tensor::TensorView> = tensors
        .iter()
        .zip(&halves)
        .map(|(t, h)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, t.shape.clone(), bytemuck::cast_slice(h))
                .map_err(|e| anyhow::anyhow!("tensor {}: {e}", t.name))?;
            Ok((t.name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| anyhow::anyhow!("cannot serialise weights: {e}"))?;
    let bytes = crate::util::sorted_safetensors_header(bytes)?;
    crate::util::write_atomic(out, |f| {
        use std::io::Write;
        Ok(f.write_all(&bytes)?)
    })?;
    Ok(ConvertReport {
        kept_tensors: tensors.len(),
        kept_params: tensors.iter().map(|t| t.numel()).sum(),
        dropped_params: first.dropped_params,
        dropped_tensors: first.dropped_tensors.clone(),
        merged_aliases: first.merged_aliases,
        spec,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynunet_aliases_map_to_canonical_names() {
        let d = 5; // six levels
        let c = |s: &str| dynunet_canonical(s, d).unwrap();
        assert_eq!(c("backbone.skip_layers.downsample.conv1.conv.weight"), "backbone.input_block.conv1.conv.weight");
        assert_eq!(
            c("backbone.skip_layers.next_layer.next_layer.downsample.conv2.conv.weight"),
            "backbone.downsamples.1.conv2.conv.weight"
        );
        assert_eq!(
            c("backbone.skip_layers.next_layer.next_layer.next_layer.next_layer.next_layer.conv1.conv.weight"),
            "backbone.bottleneck.conv1.conv.weight"
        );
        assert_eq!(
            c("backbone.skip_layers.next_layer.next_layer.next_layer.next_layer.upsample.transp_conv.conv.weight"),
            "backbone.upsamples.0.transp_conv.conv.weight"
        );
        assert_eq!(c("backbone.skip_layers.upsample.conv_block.conv1.conv.weight"), "backbone.upsamples.4.conv_block.conv1.conv.weight");
        assert_eq!(
            c("backbone.skip_layers.next_layer.super_head.conv.conv.bias"),
            "backbone.deep_supervision_heads.0.conv.conv.bias"
        );
    }

    #[test]
    fn fp16_overflow_and_nan_name_the_tensor() {
        let p = Param { name: "head2.cls_head.bias".into(), shape: vec![2], data: vec![1.0, 70000.0] };
        let e = to_f16(&p).unwrap_err().to_string();
        assert!(e.contains("head2.cls_head.bias") && e.contains("overflows"), "{e}");
        let p = Param { name: "x".into(), shape: vec![1], data: vec![f32::NAN] };
        assert!(to_f16(&p).unwrap_err().to_string().contains("non-finite"));
        let p = Param { name: "x".into(), shape: vec![2], data: vec![65504.0, -0.1] };
        assert_eq!(to_f16(&p).unwrap()[1], f16::from_f32(-0.1));
    }
}
