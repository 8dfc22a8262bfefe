//! OME-Zarr tomogram reader (zarr v2 and v3, via `zarrs`).
//!
//! [`read_zarr_volume`] accepts either an OME-Zarr group (e.g. `.../denoised.zarr`, then the array
//! named by `level` is read, `"0"` = full resolution) or the path of an array itself. The array must
//! be 3-D `(z, y, x)`; it is returned as C-order `f32` whatever its stored numeric type (f32, f16,
//! f64, int8/16/32, uint8/16). The voxel size (Å) is taken from the OME `multiscales` metadata of the
//! enclosing group when present.
//!
//! Every error message names the offending path and says what is wrong. Non-finite values are
//! *not* checked here; see [`count_nonfinite`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use rayon::prelude::*;
use serde_json::{Map, Value};
use zarrs::array::data_type::{
    Float16DataType, Float32DataType, Float64DataType, Int16DataType, Int32DataType, Int8DataType,
    UInt16DataType, UInt8DataType,
};
use zarrs::array::{Array, ArrayError, ElementOwned};
use zarrs::filesystem::FilesystemStore;

/// Name of the full-resolution array inside an OME-Zarr multiscale group.
pub const DEFAULT_LEVEL: &str = "0";

/// A 3-D volume, `shape = [z, y, x]`, `data` in C order (x fastest).
#[derive(Clone, PartialEq)]
pub struct Volume {
    pub shape: [usize; 3],
    pub data: Vec<f32>,
    /// Voxel size in the units of the OME metadata (Å for CZII data); `None` if not recorded.
    pub voxel_size: Option<f64>,
    /// What the reader found odd but could read (absent chunks, bytes after the data), for the
    /// caller to warn about.
    pub notes: Vec<String>,
}

/// Summarised (the data can be hundreds of MB).
impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("shape", &self.shape)
            .field("data", &format_args!("[{} f32 values]", self.data.len()))
            .field("voxel_size", &self.voxel_size)
            .finish()
    }
}

impl Volume {
    /// Number of voxels.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Value at `(z, y, x)` (panics when out of bounds).
    pub fn get(&self, z: usize, y: usize, x: usize) -> f32 {
        let [d, h, w] = self.shape;
        assert!(
            z < d && y < h && x < w,
            "index ({z}, {y}, {x}) out of bounds for {:?}",
            self.shape
        );
        self.data[(z * h + y) * w + x]
    }
}

/// Number of NaN / ±inf values in `data`.
pub fn count_nonfinite(data: &[f32]) -> usize {
    data.par_chunks(1 << 16)
        .map(|c| c.iter().filter(|v| !v.is_finite()).count())
        .sum()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    Array,
    Group,
    /// A directory without any zarr metadata.
    Plain,
}

fn node_kind(dir: &Path) -> Result<NodeKind> {
    if dir.join(".zarray").is_file() {
        return Ok(NodeKind::Array);
    }
    let v3 = dir.join("zarr.json");
    if v3.is_file() {
        let meta = read_json(&v3)?;
        return match meta.get("node_type").and_then(Value::as_str) {
            Some("array") => Ok(NodeKind::Array),
            Some("group") => Ok(NodeKind::Group),
            other => bail!(
                "{}: invalid zarr v3 metadata: node_type is {:?}, expected \"array\" or \"group\"",
                v3.display(),
                other
            ),
        };
    }
    if dir.join(".zgroup").is_file() {
        return Ok(NodeKind::Group);
    }
    Ok(NodeKind::Plain)
}

fn read_json(file: &Path) -> Result<Value> {
    let bytes =
        std::fs::read(file).map_err(|e| anyhow!("{}: cannot read file: {e}", file.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| anyhow!("{}: invalid JSON: {e}", file.display()))
}

/// Attributes of the zarr node at `dir` (v3 `zarr.json` "attributes" or v2 `.zattrs`).
fn node_attributes(dir: &Path) -> Result<Option<Map<String, Value>>> {
    let v3 = dir.join("zarr.json");
    if v3.is_file() {
        let meta = read_json(&v3)?;
        return Ok(meta.get("attributes").and_then(Value::as_object).cloned());
    }
    let v2 = dir.join(".zattrs");
    if v2.is_file() {
        return Ok(read_json(&v2)?.as_object().cloned());
    }
    Ok(None)
}

fn scale_of(transforms: Option<&Value>) -> Option<Vec<f64>> {
    transforms?
        .as_array()?
        .iter()
        .find(|t| t.get("type").and_then(Value::as_str) == Some("scale"))?
        .get("scale")?
        .as_array()?
        .iter()
        .map(Value::as_f64)
        .collect()
}

/// Voxel size of dataset `dataset_path` from OME-NGFF `multiscales` attributes (v0.4 top-level or
/// v0.5 under `"ome"`). Returns the scale of the last (x) axis, times any multiscale-level scale.
fn ome_voxel_size(attrs: &Map<String, Value>, dataset_path: &str) -> Option<f64> {
    let multiscales = attrs
        .get("multiscales")
        .or_else(|| attrs.get("ome").and_then(|o| o.get("multiscales")))?
        .as_array()?;
    let want = dataset_path.trim_matches('/');
    for ms in multiscales {
        let Some(datasets) = ms.get("datasets").and_then(Value::as_array) else {
            continue;
        };
        let Some(ds) = datasets.iter().find(|d| {
            d.get("path")
                .and_then(Value::as_str)
                .map(|p| p.trim_matches('/'))
                == Some(want)
        }) else {
            continue;
        };
        let scale = scale_of(ds.get("coordinateTransformations"))?;
        let mut v = *scale.last()?;
        if let Some(global) = scale_of(ms.get("coordinateTransformations")) {
            v *= global.last().copied().unwrap_or(1.0);
        }
        return (v.is_finite() && v > 0.0).then_some(v);
    }
    None
}

/// Sub-directories of `dir` that are zarr arrays (for error messages).
fn list_arrays(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| matches!(node_kind(&e.path()), Ok(NodeKind::Array)))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// Read a 3-D zarr array as `f32`.
///
/// `path` is an OME-Zarr group (the array `{path}/{level}` is read; an empty `level` means `"0"`)
/// or a zarr array directory (then `level` must be `"0"` or empty: no other level is in it). Zarr v2 and v3, any regular chunking,
/// blosc/zlib/gzip/zstd/no compression. The voxel size comes from the group's OME `multiscales`
/// metadata for the matching dataset path, `None` if absent.
pub fn read_zarr_volume(path: &Path, level: &str) -> Result<Volume> {
    let level = if level.trim_matches('/').is_empty() {
        DEFAULT_LEVEL
    } else {
        level.trim_matches('/')
    };
    if !path.exists() {
        bail!(
            "{}: no such file or directory (expected an OME-Zarr group or zarr array)",
            path.display()
        );
    }
    if !path.is_dir() {
        bail!(
            "{}: not a directory (expected an OME-Zarr group or zarr array)",
            path.display()
        );
    }

    // Locate the array and (for the voxel size) its parent group + dataset name.
    let (array_dir, group_dir, dataset): (PathBuf, Option<PathBuf>, String) = match node_kind(path)?
    {
        NodeKind::Array => {
            if level != DEFAULT_LEVEL {
                bail!("{}: a zarr array, not a multiscale group: level {level:?} cannot be chosen in it", path.display());
            }
            let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            let name = abs
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_owned();
            (
                path.to_path_buf(),
                abs.parent().map(Path::to_path_buf),
                name,
            )
        }
        kind => {
            let array_dir = path.join(level);
            if !array_dir.is_dir() {
                if kind == NodeKind::Plain {
                    bail!(
                        "{}: not a zarr array or group (missing .zarray, .zgroup and zarr.json)",
                        path.display()
                    );
                }
                bail!(
                    "{}: group has no array '{level}' ({} does not exist; arrays present: {:?})",
                    path.display(),
                    array_dir.display(),
                    list_arrays(path)
                );
            }
            if node_kind(&array_dir)? != NodeKind::Array {
                bail!(
                    "{}: not a zarr array (missing .zarray / zarr.json) in {}",
                    array_dir.display(),
                    path.display()
                );
            }
            (array_dir, Some(path.to_path_buf()), level.to_owned())
        }
    };

    let store = FilesystemStore::new(&array_dir)
        .map_err(|e| anyhow!("{}: cannot open zarr store: {e}", array_dir.display()))?;
    let array = Array::open(Arc::new(store), "/")
        .map_err(|e| anyhow!("{}: cannot open zarr array: {e}", array_dir.display()))?;

    let shape_u64 = array.shape().to_vec();
    if shape_u64.len() != 3 {
        bail!(
            "{}: expected a 3-D (z, y, x) array, found rank {} with shape {:?}",
            array_dir.display(),
            shape_u64.len(),
            shape_u64
        );
    }
    if shape_u64.contains(&0) {
        bail!("{}: shape {:?} has a zero-length axis: no voxels to read", array_dir.display(), shape_u64);
    }
    let chunk_files = check_size(&array, &array_dir)?;
    let shape = [
        shape_u64[0] as usize,
        shape_u64[1] as usize,
        shape_u64[2] as usize,
    ];

    let dt = array.data_type();
    let data: Vec<f32> = if dt.is::<Float32DataType>() {
        retrieve::<f32>(&array, &array_dir)?
    } else if dt.is::<Float16DataType>() {
        convert(
            retrieve::<half::f16>(&array, &array_dir)?,
            half::f16::to_f32,
        )
    } else if dt.is::<Float64DataType>() {
        convert(retrieve::<f64>(&array, &array_dir)?, |v| v as f32)
    } else if dt.is::<Int8DataType>() {
        convert(retrieve::<i8>(&array, &array_dir)?, f32::from)
    } else if dt.is::<Int16DataType>() {
        convert(retrieve::<i16>(&array, &array_dir)?, f32::from)
    } else if dt.is::<Int32DataType>() {
        convert(retrieve::<i32>(&array, &array_dir)?, |v| v as f32)
    } else if dt.is::<UInt8DataType>() {
        convert(retrieve::<u8>(&array, &array_dir)?, f32::from)
    } else if dt.is::<UInt16DataType>() {
        convert(retrieve::<u16>(&array, &array_dir)?, f32::from)
    } else {
        bail!(
            "{}: unsupported data type {dt} (supported: float32, float16, float64, int8, int16, \
             int32, uint8, uint16)",
            array_dir.display()
        );
    };
    let expected = shape.iter().product::<usize>();
    if data.len() != expected {
        bail!(
            "{}: decoded {} values but shape {:?} needs {expected}",
            array_dir.display(),
            data.len(),
            shape
        );
    }

    let voxel_size = match &group_dir {
        Some(g) => node_attributes(g)?.and_then(|a| ome_voxel_size(&a, &dataset)),
        None => None,
    };
    let mut notes = Vec::new();
    if let Some((present, total)) = absent_chunks(&array, chunk_files) {
        notes.push(format!(
            "{} of its {total} chunks are absent from {} and read as the fill value (a broken copy? \
             some writers leave out chunks equal to the fill value)",
            total - present,
            array_dir.display()
        ));
    }
    Ok(Volume { shape, data, voxel_size, notes })
}

/// `(present, total)` chunk files when fewer are stored than the chunk grid has (shards count
/// as chunks of the outer grid).
fn absent_chunks(array: &Array<FilesystemStore>, present: u64) -> Option<(u64, u64)> {
    let total = array.chunk_grid_shape().iter().product::<u64>();
    (present < total).then_some((present, total))
}

/// Voxels any array may have, however little data its directory stores (chunks missing from the
/// store read as the fill value): 2^26, 256 MiB as f32.
const MIN_VOXEL_BUDGET: u64 = 1 << 26;
/// Voxels allowed per byte stored beyond that: 256, i.e. 1 KiB of f32 per byte (zlib's best ratio).
const VOXELS_PER_STORED_BYTE: u64 = 256;
/// Chunks a read may visit beyond the files present (each missing one is a failed lookup).
const MISSING_CHUNK_BUDGET: u64 = 1 << 16;

/// Refuses arrays whose metadata declares far more voxels, or chunks, than the files of the
/// array directory can back: a few bytes of `.zarray` could otherwise make the read overflow,
/// allocate any amount of memory, or visit billions of absent chunks. Returns how many of the
/// files are chunks: every file that is not metadata (one walk of the store serves both).
fn check_size(array: &Array<FilesystemStore>, dir: &Path) -> Result<u64> {
    let product = |v: &[u64]| v.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    let (mut files, mut bytes, mut chunk_files) = (0u64, 0u64, 0u64);
    crate::util::walk_files(dir, 8, |p, m| {
        files += 1;
        bytes = bytes.saturating_add(m.len());
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if ![".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json"].contains(&name) {
            chunk_files += 1;
        }
    });
    let voxel_budget = MIN_VOXEL_BUDGET.max(bytes.saturating_mul(VOXELS_PER_STORED_BYTE));
    match product(array.shape()) {
        Some(n) if n <= voxel_budget => {}
        n => bail!(
            "{}: shape {:?} ({} voxels) is far larger than the {bytes} bytes stored in {files} files \
             can hold (at most {voxel_budget} voxels); corrupt metadata or missing chunks",
            dir.display(),
            array.shape(),
            n.map_or("too many".to_string(), |n| n.to_string())
        ),
    }
    let chunk_budget = files.saturating_add(MISSING_CHUNK_BUDGET);
    match product(array.chunk_grid_shape()) {
        Some(n) if n <= chunk_budget => Ok(chunk_files),
        n => bail!(
            "{}: a grid of {} chunks ({:?}) for {files} files stored; corrupt metadata or missing chunks",
            dir.display(),
            n.map_or("too many".to_string(), |n| n.to_string()),
            array.chunk_grid_shape()
        ),
    }
}

fn convert<T: Copy + Send + Sync>(v: Vec<T>, f: impl Fn(T) -> f32 + Send + Sync) -> Vec<f32> {
    v.par_iter().map(|&x| f(x)).collect()
}

fn retrieve<T: ElementOwned>(array: &Array<FilesystemStore>, dir: &Path) -> Result<Vec<T>> {
    match array.retrieve_array_subset::<Vec<T>>(&array.subset_all()) {
        Ok(v) => Ok(v),
        Err(e) => Err(locate_bad_chunk::<T>(array, dir, e)),
    }
}

/// After a whole-array read failed, find the first chunk that fails on its own, so the error
/// can name the chunk file.
fn locate_bad_chunk<T: ElementOwned>(
    array: &Array<FilesystemStore>,
    dir: &Path,
    err: ArrayError,
) -> anyhow::Error {
    let grid = array.chunk_grid_shape().to_vec();
    if grid.len() == 3 {
        for i in 0..grid[0] {
            for j in 0..grid[1] {
                for k in 0..grid[2] {
                    let idx = [i, j, k];
                    if let Err(e) = array.retrieve_chunk::<Vec<T>>(&idx) {
                        let key = array.chunk_key(&idx);
                        return anyhow!(
                            "{}: corrupt or unreadable chunk {} (chunk index {:?}): {e}",
                            dir.display(),
                            dir.join(key.as_str()).display(),
                            idx
                        );
                    }
                }
            }
        }
    }
    anyhow!("{}: failed to read array data: {err}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonfinite_count() {
        let v = [1.0, f32::NAN, f32::INFINITY, -f32::INFINITY, 0.0, -2.5];
        assert_eq!(count_nonfinite(&v), 3);
        assert_eq!(count_nonfinite(&[]), 0);
    }

    #[test]
    fn ome_scale_lookup() {
        let attrs: Value = serde_json::json!({
            "multiscales": [{
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [10.0, 10.0, 10.012]}]},
                    {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [20.0, 20.0, 20.024]}]}
                ]
            }]
        });
        let a = attrs.as_object().unwrap();
        assert_eq!(ome_voxel_size(a, "0"), Some(10.012));
        assert_eq!(ome_voxel_size(a, "1"), Some(20.024));
        assert_eq!(ome_voxel_size(a, "2"), None);
        let v05: Value = serde_json::json!({"ome": attrs});
        assert_eq!(ome_voxel_size(v05.as_object().unwrap(), "1"), Some(20.024));
        assert_eq!(ome_voxel_size(&Map::new(), "0"), None);
    }
}
