//! Reads the parameters of a trained model from a PyTorch Lightning `.ckpt`, a bare
//! `torch.save(state_dict)` `.pt`/`.pth`, or a `.safetensors` file, as named f32 tensors.

use crate::pickle::{self, StorageDtype, TensorRef, Value};
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// A named parameter, converted to f32 (exactly: every fp16/bf16 value is an f32).
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Param {
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// The parameters of one checkpoint in file order, plus which names share one storage view
/// (DynUNet saves each tensor under two names).
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub params: Vec<Param>,
    index: HashMap<String, usize>,
}

impl Checkpoint {
    pub fn new(params: Vec<Param>) -> Self {
        let index = params.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        Self { params, index }
    }
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.params[i])
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }
}

/// Reads a checkpoint, choosing the format from the file's first bytes (never from its name).
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let result = if bytes.starts_with(b"PK") {
        read_torch_zip(&bytes)
    } else if looks_like_safetensors(&bytes) {
        read_safetensors(&bytes)
    } else if bytes.first() == Some(&0x80) {
        Err(anyhow::anyhow!("legacy (non-zip) torch.save format; re-save it with a current PyTorch"))
    } else {
        Err(anyhow::anyhow!("not a PyTorch checkpoint (zip) nor a safetensors file"))
    };
    result.with_context(|| format!("{}: cannot load checkpoint", path.display()))
}

fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.len() >= 9 && {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        n > 0 && n < (100 << 20) && bytes[8] == b'{'
    }
}

fn read_safetensors(bytes: &[u8]) -> Result<Checkpoint> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| anyhow::anyhow!("invalid safetensors: {e}"))?;
    let mut names: Vec<(usize, String)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (view.data().as_ptr() as usize, name))
        .collect();
    names.sort(); // file order
    let mut params = Vec::new();
    for (_, name) in names {
        let view = st.tensor(&name).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            safetensors::Dtype::F16 => raw.chunks_exact(2).map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect(),
            safetensors::Dtype::BF16 => {
                raw.chunks_exact(2).map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect()
            }
            other => bail!("tensor {name}: dtype {other:?} is not f32, f16 or bf16"),
        };
        params.push(Param { name, shape: view.shape().to_vec(), data });
    }
    Ok(Checkpoint::new(params))
}

/// Reads a `torch.save` zip archive: `{prefix}/data.pkl` plus `{prefix}/data/{key}` storages.
fn read_torch_zip(bytes: &[u8]) -> Result<Checkpoint> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).context("corrupt or truncated zip archive")?;
    let mut pkl_name = None;
    for i in 0..zip.len() {
        let f = zip.by_index_raw(i).context("corrupt zip entry")?;
        let name = f.name().to_string();
        if f.enclosed_name().is_none() || name.split(['/', '\\']).any(|c| c == "..") {
            bail!("zip entry {name:?} escapes the archive (path traversal); refusing to read it");
        }
        if name == "data.pkl" || name.ends_with("/data.pkl") {
            if pkl_name.is_some() {
                bail!("zip holds more than one data.pkl");
            }
            pkl_name = Some(name);
        }
    }
    let pkl_name = pkl_name.context("zip archive holds no data.pkl (not a torch.save file)")?;
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap().to_string();
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        f.read_to_string(&mut s).context("cannot read byteorder entry")?;
        if s.trim() != "little" {
            bail!("checkpoint byte order is {:?}; only little-endian is supported", s.trim());
        }
    }
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?.read_to_end(&mut pkl).with_context(|| format!("cannot read {pkl_name}"))?;
    let root = pickle::unpickle(&pkl).with_context(|| format!("cannot interpret {pkl_name}"))?;

    let state = state_dict_of(&root)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut params = Vec::new();
    for (name, t) in state {
        if !storages.contains_key(&t.storage_key) {
            let entry = format!("{prefix}data/{}", t.storage_key);
            let mut f = zip
                .by_name(&entry)
                .with_context(|| format!("tensor {name}: storage {entry:?} is missing from the archive"))?;
            // Only the bytes the pickle declares for the storage: an entry that inflates to far
            // more than that (a decompression bomb, or a damaged archive) is not read past them.
            let declared = (t.storage_numel as u64).saturating_mul(t.dtype.size() as u64);
            let mut buf = Vec::new();
            (&mut f).take(declared).read_to_end(&mut buf).with_context(|| format!("tensor {name}: cannot read storage {entry:?}"))?;
            storages.insert(t.storage_key.clone(), buf);
        }
        let data = materialize(&name, &t, &storages[&t.storage_key])?;
        params.push(Param { name, shape: t.shape.clone(), data });
    }
    Ok(Checkpoint::new(params))
}

/// Finds the model's tensors: Lightning's `state_dict` (keys prefixed `model.`, stripped here) or a
/// bare state dict. Everything else a checkpoint holds (optimizer, callbacks, ...) is ignored.
fn state_dict_of(root: &Value) -> Result<Vec<(String, TensorRef)>> {
    let (dict, strip) = match root.get("state_dict") {
        Some(sd) => (sd, true),
        None => (root.clone(), false),
    };
    let items = dict.dict_items().context("checkpoint holds neither a state_dict nor a dict of tensors")?;
    let mut out = Vec::new();
    for (k, v) in items {
        let Some(name) = k.as_str() else { continue };
        let Value::Tensor(t) = v else { continue };
        let name = if strip { name.strip_prefix("model.").unwrap_or(name) } else { name };
        out.push((name.to_string(), t.as_ref().clone()));
    }
    // An EMA copy kept beside Lightning's state_dict (`convert --ema` chooses it by its prefix).
    for key in ["ema_state_dict", "state_dict_ema"] {
        if let Some(items) = root.get(key).and_then(|d| d.dict_items()) {
            for (k, v) in items {
                if let (Some(name), Value::Tensor(t)) = (k.as_str(), v) {
                    out.push((format!("{key}.{name}"), t.as_ref().clone()));
                }
            }
        }
    }
    if out.is_empty() {
        bail!("checkpoint holds no tensors in its state dict");
    }
    Ok(out)
}

/// Copies a (possibly strided) view out of its storage as f32.
fn materialize(name: &str, t: &TensorRef, storage: &[u8]) -> Result<Vec<f32>> {
    let es = t.dtype.size();
    let have = storage.len() / es;
    if have < t.storage_numel {
        bail!(
            "tensor {name}: storage {} holds {have} elements but the checkpoint says {}",
            t.storage_key,
            t.storage_numel
        );
    }
    let numel = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let numel = numel.with_context(|| format!("tensor {name}: shape {:?} has too many elements", t.shape))?;
    if numel > 0 {
        // Index of the last element the view reads (None: past any storage).
        let last = t.shape.iter().zip(&t.stride).try_fold(t.offset, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?));
        if last.is_none_or(|last| last >= have) {
            bail!(
                "tensor {name}: shape {:?} with stride {:?} at offset {} reads past the {have} elements of storage {}",
                t.shape,
                t.stride,
                t.offset,
                t.storage_key
            );
        }
        // Only overlapping (e.g. broadcast, stride-0) views have more elements than their storage;
        // materialising one could ask for any amount of memory from a few bytes of checkpoint.
        if numel > have {
            bail!(
                "tensor {name}: shape {:?} has {numel} elements but storage {} holds only {have} (overlapping views are not supported)",
                t.shape,
                t.storage_key
            );
        }
    }
    let read = |i: usize| -> f32 {
        let b = &storage[i * es..(i + 1) * es];
        match t.dtype {
            StorageDtype::F32 => f32::from_le_bytes(b.try_into().unwrap()),
            StorageDtype::F64 => f64::from_le_bytes(b.try_into().unwrap()) as f32,
            StorageDtype::F16 => f16::from_le_bytes(b.try_into().unwrap()).to_f32(),
            StorageDtype::BF16 => bf16::from_le_bytes(b.try_into().unwrap()).to_f32(),
            StorageDtype::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f32,
            StorageDtype::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f32,
            StorageDtype::I16 => i16::from_le_bytes(b.try_into().unwrap()) as f32,
            StorageDtype::I8 => b[0] as i8 as f32,
            StorageDtype::U8 | StorageDtype::Bool => b[0] as f32,
        }
    };
    let mut out = Vec::with_capacity(numel);
    let mut idx = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let off = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(read(off));
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(out)
}
