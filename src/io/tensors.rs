//! Named f32 tensors in safetensors files (engine inputs/outputs, blended maps).

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Reads one f32 (or f16) tensor by name: returns (shape, data).
pub fn read_f32(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    let view = st.tensor(name).map_err(|_| anyhow::anyhow!("{}: no tensor named {name:?}", path.display()))?;
    let data: Vec<f32> = match view.dtype() {
        safetensors::Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        safetensors::Dtype::F16 => view.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => bail!("{}: tensor {name} is {other:?}; f32 or f16 expected", path.display()),
    };
    Ok((view.shape().to_vec(), data))
}

/// Writes f32 tensors atomically.
pub fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let mut views = BTreeMap::new();
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            bail!("tensor {name}: shape {shape:?} does not match {} values", data.len());
        }
        let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
            .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
        views.insert(name.to_string(), v);
    }
    let bytes = safetensors::tensor::serialize(views, metadata).map_err(|e| anyhow::anyhow!("cannot serialise: {e}"))?;
    let bytes = crate::util::sorted_safetensors_header(bytes)?;
    crate::util::write_atomic(path, |f| {
        use std::io::Write;
        Ok(f.write_all(&bytes)?)
    })
}
