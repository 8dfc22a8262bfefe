//! Loading fastdet weights files (fp16 safetensors with architecture metadata).

use crate::convert::FORMAT_VERSION;
use crate::model::spec::{Arch, ModelSpec};
use anyhow::{bail, Context, Result};
use half::f16;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One loaded model: its spec and its tensors as fp16 (as stored) .
#[derive(Debug)]
pub struct Weights {
    pub path: PathBuf,
    pub name: String,
    pub spec: ModelSpec,
    pub classes: Vec<String>,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f16>)>,
    pub metadata: HashMap<String, String>,
}

/// Rejects a spec that [`ModelSpec::required_tensors`] cannot expand (it would index out of bounds,
/// underflow `levels - 2`, overflow `f << i`, or loop over absurd block counts): the per-arch fields
/// must be there with the level structure `convert` writes, no width may exceed the file's size,
/// and the spec may not need more tensors than the file holds.
fn check_spec(spec: &ModelSpec, file_len: usize, n_tensors: usize) -> Result<()> {
    let bad = |what: String| anyhow::anyhow!("metadata fastdet.spec is inconsistent: {what}");
    let mut widths = vec![spec.in_channels, spec.head_in, spec.cls_width, spec.offset_width, spec.num_classes];
    // How many tensors required_tensors lists (the head has 12); None on overflow.
    let needed: Option<usize> = match spec.arch {
        Arch::Segresnetv2 => {
            let f = spec.init_filters.ok_or_else(|| bad("segresnetv2 without init_filters".into()))?;
            let levels = spec.blocks_down.len();
            if levels < 3 || spec.blocks_up.len() != levels - 2 {
                return Err(bad(format!(
                    "{levels} encoder and {} decoder levels (need at least 3, and 2 fewer decoder levels)",
                    spec.blocks_up.len()
                )));
            }
            for i in 0..levels {
                // Level i has f << i channels.
                let c = u32::try_from(i).ok().and_then(|i| 1usize.checked_shl(i)).and_then(|p| p.checked_mul(f));
                widths.push(c.ok_or_else(|| bad(format!("init_filters {f} << {i} overflows")))?);
            }
            // convInit + one downsampling conv per level after the first + one upsampling conv per
            // decoder level + 6 per residual block + the head.
            let blocks = spec.blocks_down.iter().chain(&spec.blocks_up).try_fold(0usize, |n, &b| n.checked_add(b));
            blocks.and_then(|b| b.checked_mul(6)).and_then(|b| b.checked_add(levels + spec.blocks_up.len() + 12))
        }
        Arch::Dynunet => {
            if spec.filters.len() < 3 {
                return Err(bad(format!("dynunet with {} levels (need at least 3)", spec.filters.len())));
            }
            let w = spec.deep_supervision_width.ok_or_else(|| bad("dynunet without deep_supervision_width".into()))?;
            widths.push(w);
            widths.extend(&spec.filters);
            spec.filters.len().checked_mul(5).and_then(|n| n.checked_add(8))
        }
    };
    if let Some(w) = widths.iter().find(|&&w| w > file_len) {
        return Err(bad(format!("width {w} is larger than the whole file ({file_len} bytes)")));
    }
    match needed {
        Some(n) if n <= n_tensors => Ok(()),
        _ => Err(bad(format!("it needs more tensors than the {n_tensors} the file holds"))),
    }
}

impl Weights {
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_inner(path).with_context(|| format!("{}: cannot load weights", path.display()))
    }

    /// The architecture and class names from a weights file's header, without reading its tensors
    /// (checks before a job starts).
    pub fn read_spec(path: &Path) -> Result<(ModelSpec, Vec<String>)> {
        let read = || -> Result<_> {
            let map = Self::map(path)?;
            let (spec, classes, _) = Self::header(path, &map)?;
            Ok((spec, classes))
        };
        read().with_context(|| format!("{}: cannot load weights", path.display()))
    }

    /// Bytes of tensor data in a weights file (all but its header): two files of one model have
    /// the same, whatever their metadata.
    pub fn tensor_data_len(path: &Path) -> Result<u64> {
        let map = Self::map(path).with_context(|| path.display().to_string())?;
        let (n, _) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| anyhow::anyhow!("{}: not a safetensors file ({e})", path.display()))?;
        Ok((map.len() - 8 - n) as u64)
    }

    /// SHA-256 of a weights file's tensors (names, types, shapes and bytes, in name order), not of
    /// its metadata: one checkpoint converted twice under other names gives the same.
    pub fn tensors_sha256(path: &Path) -> Result<String> {
        use sha2::Digest;
        let map = Self::map(path).with_context(|| path.display().to_string())?;
        let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| anyhow::anyhow!("{}: not a safetensors file ({e})", path.display()))?;
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut h = sha2::Sha256::new();
        for (name, view) in &tensors {
            h.update(format!("{name} {:?} {:?}\n", view.dtype(), view.shape()).as_bytes());
            h.update(view.data());
        }
        Ok(format!("{:x}", h.finalize()))
    }

    fn map(path: &Path) -> Result<memmap2::Mmap> {
        let file = std::fs::File::open(path).context("cannot open")?;
        // SAFETY: the map is read-only and dropped before return; a concurrent writer could change
        // the bytes, which safetensors' bounds checks turn into an error, not UB in our code.
        unsafe { memmap2::Mmap::map(&file) }.context("cannot map")
    }

    /// The spec, class names and metadata of the header, checked against each other.
    fn header(path: &Path, map: &[u8]) -> Result<(ModelSpec, Vec<String>, HashMap<String, String>)> {
        if map.starts_with(b"PK") {
            bail!("a PyTorch checkpoint, not fastdet weights: convert it first (`fastdet convert {} -o WEIGHTS.safetensors`)", path.display());
        }
        let (_, header) = safetensors::SafeTensors::read_metadata(map)
            .map_err(|e| anyhow::anyhow!("not a safetensors file ({e}); fastdet weights come from `fastdet convert`"))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            metadata.get(k).cloned().with_context(|| {
                format!("metadata key {k:?} is missing: not a fastdet weights file (convert the checkpoint with `fastdet convert`)")
            })
        };
        let version = get("fastdet.format_version")?;
        if version != FORMAT_VERSION {
            bail!(
                "weights format version {version} (written by fastdet {}) is not supported by this fastdet {} (format {FORMAT_VERSION}); re-convert the checkpoint",
                metadata.get("fastdet.version").map(String::as_str).unwrap_or("?"),
                env!("CARGO_PKG_VERSION")
            );
        }
        let spec: ModelSpec = serde_json::from_str(&get("fastdet.spec")?).context("metadata fastdet.spec is not a valid spec")?;
        let classes: Vec<String> =
            serde_json::from_str(&get("fastdet.classes")?).context("metadata fastdet.classes is not a list of names")?;
        if classes.len() != spec.num_classes {
            bail!("metadata lists {} class names but the model has {} classes", classes.len(), spec.num_classes);
        }
        let infos = header.tensors();
        check_spec(&spec, map.len(), infos.len())?;
        // The tensors the spec needs, as the header lists them (names, shapes, dtypes: no data
        // is read, so `read_spec` refuses these before a job starts).
        let required = spec.required_tensors();
        for (name, shape) in &required {
            let info = infos.get(name).with_context(|| format!("tensor {name} is missing"))?;
            if info.shape != *shape {
                bail!("tensor {name} has shape {:?}, the spec needs {shape:?}", info.shape);
            }
            if info.dtype != safetensors::Dtype::F16 {
                bail!("tensor {name} is {:?}, fastdet weights are f16", info.dtype);
            }
        }
        // A tensor the spec does not use means the spec and the tensors disagree (convert writes
        // exactly the spec's tensors): the network run would not be the one trained.
        if infos.len() > required.len() {
            let needed: std::collections::HashSet<&str> = required.iter().map(|(n, _)| n.as_str()).collect();
            let mut unused: Vec<&str> = infos.keys().map(String::as_str).filter(|n| !needed.contains(n)).collect();
            unused.sort();
            bail!(
                "{} tensor(s) that the metadata's architecture does not use, e.g. {}: the spec does not describe these weights",
                unused.len(),
                unused.first().copied().unwrap_or("?")
            );
        }
        Ok((spec, classes, metadata))
    }

    fn load_inner(path: &Path) -> Result<Self> {
        let map = Self::map(path)?;
        let (spec, classes, metadata) = Self::header(path, &map)?;
        let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| anyhow::anyhow!("corrupt safetensors: {e}"))?;
        let mut tensors = HashMap::new();
        for (name, shape) in spec.required_tensors() {
            // Names, shapes and dtypes were checked against the header.
            let view = st.tensor(&name).map_err(|_| anyhow::anyhow!("tensor {name} is missing"))?;
            let data: Vec<f16> = view.data().chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect();
            // `convert` refuses these; a damaged or hand-made file would give NaN maps, no picks
            // or NaN coordinates on every tomogram.
            let bad = data.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                bail!("tensor {name} has {bad} NaN or infinite values (damaged weights; convert the checkpoint again)");
            }
            tensors.insert(name, (shape, data));
        }
        Ok(Weights {
            path: path.to_path_buf(),
            name: metadata.get("fastdet.name").cloned().unwrap_or_default(),
            spec,
            classes,
            tensors,
            metadata,
        })
    }

    /// A tensor widened to f32 (exact).
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let (_, d) = self.tensors.get(name).with_context(|| format!("tensor {name} is missing"))?;
        Ok(d.iter().map(|h| h.to_f32()).collect())
    }

    pub fn param_count(&self) -> usize {
        self.tensors.values().map(|(_, d)| d.len()).sum()
    }

    /// Random weights for a spec (benchmarks, self-tests): He-normal-ish convs, norm scales near 1.
    pub fn random(spec: &ModelSpec, seed: u64) -> Self {
        let mut rng = crate::util::SplitMix64::new(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in spec.required_tensors() {
            let n: usize = shape.iter().product();
            let data: Vec<f16> = if shape.len() >= 2 {
                let fan_in: usize = shape[1..].iter().product();
                let std = (2.0 / fan_in as f64).sqrt();
                (0..n).map(|_| f16::from_f64(rng.normal() * std)).collect()
            } else if name.ends_with("weight") {
                (0..n).map(|_| f16::from_f64(1.0 + 0.2 * rng.normal())).collect()
            } else {
                (0..n).map(|_| f16::from_f64(0.1 * rng.normal())).collect()
            };
            tensors.insert(name, (shape, data));
        }
        Weights {
            path: PathBuf::from("<random>"),
            name: format!("random-{}", spec.arch.name()),
            spec: spec.clone(),
            classes: crate::particles::CLASSES.iter().take(spec.num_classes).map(|c| c.name.to_string()).collect(),
            tensors,
            metadata: HashMap::new(),
        }
    }
}
