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

/// Calls `f` with every file under `dir` (its path and metadata), in name order, following
/// symlinks (git-annex / DataLad datasets link every chunk) at most `max_depth` folders deep.
/// A folder reached twice (a link loop, or two links to one folder) is walked once.
pub fn walk_files(dir: &Path, max_depth: u32, mut f: impl FnMut(&Path, &std::fs::Metadata)) {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path, depth: u32, max_depth: u32, seen: &mut std::collections::HashSet<(u64, u64)>, f: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
        let Ok(m) = std::fs::metadata(dir) else { return };
        if !seen.insert((m.dev(), m.ino())) {
            return;
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => {
                    if depth < max_depth {
                        walk(&p, depth + 1, max_depth, seen, f)
                    }
                }
                Ok(m) => f(&p, &m),
                Err(_) => {}
            }
        }
    }
    walk(dir, 0, max_depth, &mut std::collections::HashSet::new(), &mut f);
}

/// What identifies a tomogram's bytes without reading them: the size and modification time of
/// its file, or of every file of its store (a re-exported tomogram at the same path differs).
pub fn source_stamp(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let mut h = Sha256::new();
    let mut add = |p: &Path, m: &std::fs::Metadata| {
        let rel = p.strip_prefix(path).unwrap_or(p);
        h.update(format!("{}\0{}\0{}.{}\n", rel.display(), m.len(), m.mtime(), m.mtime_nsec()));
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => walk_files(path, 8, &mut add),
        Ok(m) => add(path, &m),
        Err(_) => return String::new(),
    }
    format!("{:x}", h.finalize())
}

#[cfg(test)]
mod walk_tests {
    use super::*;

    #[test]
    fn link_loops_are_walked_once_and_stamps_change_with_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("store");
        std::fs::create_dir_all(d.join("0")).unwrap();
        std::fs::write(d.join("0/a"), b"12").unwrap();
        std::fs::write(d.join(".zarray"), b"{}").unwrap();
        for k in 0..6 {
            std::os::unix::fs::symlink(".", d.join(format!("loop{k}"))).unwrap();
        }
        let mut files = Vec::new();
        walk_files(&d, 8, |p, _| files.push(p.strip_prefix(&d).unwrap().to_path_buf()));
        assert_eq!(files, [PathBuf::from(".zarray"), PathBuf::from("0/a")]);
        let before = source_stamp(&d);
        assert_eq!(before, source_stamp(&d));
        std::fs::write(d.join("0/a"), b"123").unwrap();
        assert_ne!(before, source_stamp(&d));
        let f = d.join("0/a");
        assert_ne!(source_stamp(&f), "");
        assert_eq!(source_stamp(&tmp.path().join("missing")), "");
    }
}
