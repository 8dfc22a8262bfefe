//! Small helpers shared by the writers.
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The folder `path` is written in, when it exists (`.` for a bare file name).
fn output_dir(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        anyhow::bail!("{}: output directory {} does not exist", path.display(), dir.display());
    }
    Ok(dir)
}

/// Refuses an output file that `write_atomic` could not write, before the work that makes it.
pub fn check_output_file(path: &Path) -> Result<()> {
    output_dir(path)?;
    if path.is_dir() {
        anyhow::bail!("{}: is a directory; give a file name", path.display());
    }
    Ok(())
}

/// Writes a file atomically: the bytes go to a temporary file beside `path`, which is then renamed,
/// so a reader never sees a partial file and a failure leaves nothing behind.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    let dir = output_dir(path)?;
    let name = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        write(&mut f).with_context(|| format!("{}: cannot write", path.display()))?;
        f.sync_all().with_context(|| format!("{}: cannot flush", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The same safetensors file with its header's keys in sorted order. The safetensors crate writes
/// the metadata map in hash order, so the same tensors and metadata gave different bytes at each
/// run (no checksum pinning, no byte comparison of outputs); offsets are relative to the data, so
/// only the header changes.
pub fn sorted_safetensors_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    use serde_json::Value;
    fn sorted(v: Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: std::collections::BTreeMap<String, Value> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(b.into_iter().collect())
            }
            Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
            x => x,
        }
    }
    let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize).context("safetensors bytes shorter than their header length")?;
    let header_end = 8usize.checked_add(n).filter(|&e| e <= bytes.len()).context("safetensors header past the end")?;
    let header: Value = serde_json::from_slice(&bytes[8..header_end]).context("safetensors header is not JSON")?;
    let mut text = serde_json::to_string(&sorted(header))?;
    // The data stays 8-byte aligned, as the crate pads it.
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - header_end);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[header_end..]);
    Ok(out)
}

/// A tiny deterministic generator for random test data and weights (no cryptographic use).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn fill_uniform(&mut self, v: &mut [f32], lo: f32, hi: f32) {
        for x in v {
            *x = lo + (hi - lo) * self.uniform() as f32;
        }
    }
}
