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
use zarrs::array::{Array, ArrayError, ArrayMetadata, ElementOwned};
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

    /// What to say when the file's own voxel size is not `used` (the `--voxel-size` coordinates
    /// and radii are computed with); `models`: the models' voxel size and whether `--resample` was
    /// given, when models are run on it (not in `qc`).
    pub fn voxel_size_warning(&self, used: f64, models: Option<(f64, bool)>) -> Option<String> {
        let vs = self.voxel_size.filter(|vs| (vs - used).abs() > 1e-3)?;
        let scale = match models {
            Some((m, true)) if crate::pipeline::rescale::needs_resampling(vs, m) => format!(", and for --resample to bring it from {vs} Å to the models' {m} Å"),
            Some((m, true)) => format!(", which --resample would read as it is (within 1% of the models' {m} Å)"),
            Some((m, false)) if crate::pipeline::rescale::needs_resampling(vs, m) => {
                format!("; its particles look {:.2}x their size to the models, made for {m} Å: add --resample to bring it to theirs", m / vs)
            }
            _ => String::new(),
        };
        Some(format!(
            "voxel size is {vs} Å in the file's metadata; coordinates are converted with {used} Å (--voxel-size). If the file is right, give --voxel-size file (or {vs}) for coordinates in its own Å{scale}"
        ))
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

/// The OME-NGFF `multiscales` list (v0.4 top-level or v0.5 under `"ome"`).
fn multiscales(attrs: &Map<String, Value>) -> Option<&Vec<Value>> {
    attrs.get("multiscales").or_else(|| attrs.get("ome").and_then(|o| o.get("multiscales")))?.as_array()
}

/// Å per unit of an OME-NGFF axis `unit` (`None`: not a length unit we know).
fn angstrom_per(unit: &str) -> Option<f64> {
    Some(match unit {
        "angstrom" => 1.0,
        "nanometer" => 10.0,
        "micrometer" => 1e4,
        "millimeter" => 1e7,
        "centimeter" => 1e8,
        "meter" => 1e10,
        "picometer" => 1e-2,
        _ => return None,
    })
}

/// What the OME metadata says of one dataset, axes in the array's stored order.
#[derive(Debug, Clone, PartialEq)]
struct OmeDataset {
    /// Axis names (`axes`: v0.4+ objects or v0.3 strings), when given for every axis.
    axes: Option<Vec<String>>,
    /// Size of a voxel along each axis in Å (scale x any multiscale-wide scale x unit), when
    /// the dataset has a scale for every axis.
    voxel_size: Option<Vec<f64>>,
    /// Axis units that are not lengths we know (taken as Å).
    unknown_units: Vec<String>,
}

/// The OME metadata of dataset `dataset_path`, `None` when no multiscale lists it.
fn ome_dataset(attrs: &Map<String, Value>, dataset_path: &str) -> Option<OmeDataset> {
    let want = dataset_path.trim_matches('/');
    for ms in multiscales(attrs)? {
        let Some(datasets) = ms.get("datasets").and_then(Value::as_array) else {
            continue;
        };
        let Some(ds) = datasets.iter().find(|d| d.get("path").and_then(Value::as_str).map(|p| p.trim_matches('/')) == Some(want)) else {
            continue;
        };
        let axes_meta: Vec<&Value> = ms.get("axes").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
        let name_of = |a: &Value| a.as_str().or_else(|| a.get("name").and_then(Value::as_str)).map(str::to_owned);
        let axes: Option<Vec<String>> = (!axes_meta.is_empty()).then(|| axes_meta.iter().map(|a| name_of(a)).collect()).flatten();
        let mut unknown_units = Vec::new();
        // Units of the space axes only (a time or channel axis has its own, or none).
        let space = |a: &Value| {
            a.get("type").and_then(Value::as_str) == Some("space") || name_of(a).is_some_and(|n| space_axis_name(&n))
        };
        let unit_of = |a: &Value| a.get("unit").and_then(Value::as_str).map(str::to_owned);
        // A space axis without a unit has the others' (when they agree): a writer naming it for
        // x and y only does not mean Å along z.
        let mut units: Vec<String> = axes_meta.iter().filter(|a| space(a)).filter_map(|a| unit_of(a)).collect();
        units.dedup();
        let shared_unit = (units.len() == 1).then(|| units[0].clone());
        let unit_factor = |k: usize, unknown: &mut Vec<String>| -> f64 {
            let axis = axes_meta.get(k);
            if axis.is_some_and(|a| !space(a)) {
                return 1.0;
            }
            match axis.and_then(|a| unit_of(a)).or_else(|| shared_unit.clone()).as_deref() {
                None => 1.0,
                Some(u) => angstrom_per(u).unwrap_or_else(|| {
                    unknown.push(u.to_string());
                    1.0
                }),
            }
        };
        let voxel_size = scale_of(ds.get("coordinateTransformations")).and_then(|scale| {
            let global = scale_of(ms.get("coordinateTransformations"));
            let sizes: Vec<f64> = scale
                .iter()
                .enumerate()
                .map(|(k, v)| v * global.as_ref().and_then(|g| g.get(k)).copied().unwrap_or(1.0) * unit_factor(k, &mut unknown_units))
                .collect();
            sizes.iter().all(|v| v.is_finite() && *v > 0.0).then_some(sizes)
        });
        return Some(OmeDataset { axes, voxel_size, unknown_units });
    }
    None
}

/// The levels of the OME-Zarr group `path` with their voxel sizes (Å along x, as
/// [`Volume::voxel_size`]: the axis named x, else the last), in the order of its first
/// multiscale; the levels without a scale, or whose path is empty or leaves the store, are left
/// out. Empty for a lone array or a group without OME metadata.
pub fn level_voxel_sizes(path: &Path) -> Result<Vec<(String, f64)>> {
    if !path.is_dir() || node_kind(path)? == NodeKind::Array {
        return Ok(Vec::new());
    }
    let Some(attrs) = node_attributes(path)? else {
        return Ok(Vec::new());
    };
    let paths: Vec<String> = multiscales(&attrs)
        .and_then(|m| m.first())
        .and_then(|m| m.get("datasets"))
        .and_then(Value::as_array)
        .map(|d| d.iter().filter_map(|d| d.get("path").and_then(Value::as_str)).map(|p| p.trim_matches('/').to_owned()).collect())
        .unwrap_or_default();
    Ok(paths
        .into_iter()
        // As a level number's lookup does: no path out of the store.
        .filter(|p| !p.is_empty() && !p.contains(".."))
        .filter_map(|p| {
            let ds = ome_dataset(&attrs, &p)?;
            let sizes = ds.voxel_size?;
            // x by name, as the reader takes it, else the last stored axis.
            let x = ds.axes.as_ref().and_then(|a| a.iter().position(|n| n.eq_ignore_ascii_case("x"))).unwrap_or(sizes.len().saturating_sub(1));
            Some((p, *sizes.get(x)?))
        })
        .collect())
}

/// Of `levels` ([`level_voxel_sizes`]), the one nearest `target` Å by ratio (the finer of two
/// as near).
pub fn nearest_level(levels: &[(String, f64)], target: f64) -> Option<&(String, f64)> {
    nearest_by_ratio(levels, |l| l.1, target)
}

/// Of `items`, the one whose voxel size (`size`, Å) is nearest `target` by ratio: the finer of
/// two as near, the first of equal sizes.
pub fn nearest_by_ratio<T>(items: &[T], size: impl Fn(&T) -> f64, target: f64) -> Option<&T> {
    let distance = |v: f64| (v / target).ln().abs();
    items.iter().fold(None, |best: Option<&T>, c| match best {
        Some(b) if distance(size(b)) < distance(size(c)) - 1e-9 || ((distance(size(b)) - distance(size(c))).abs() <= 1e-9 && size(b) <= size(c)) => Some(b),
        _ => Some(c),
    })
}

/// Axis names of the array at `array_dir` from its own metadata: zarr v3 `dimension_names`, or
/// the `_ARRAY_DIMENSIONS` attribute xarray writes in zarr v2.
fn array_axis_names(array_dir: &Path) -> Result<Option<Vec<String>>> {
    let names = |v: Option<&Value>| -> Option<Vec<String>> { v?.as_array()?.iter().map(|n| n.as_str().map(str::to_owned)).collect() };
    let v3 = array_dir.join("zarr.json");
    if v3.is_file() {
        return Ok(names(read_json(&v3)?.get("dimension_names")));
    }
    Ok(node_attributes(array_dir)?.and_then(|a| names(a.get("_ARRAY_DIMENSIONS"))))
}

/// For each of z, y, x, the stored axis that holds it, when `names` are x, y and z in some order
/// other than z, y, x (any case).
fn zyx_order(names: &[String]) -> Option<[usize; 3]> {
    let lower: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    let find = |a: &str| lower.iter().position(|n| n == a);
    let order = [find("z")?, find("y")?, find("x")?];
    (names.len() == 3 && order != [0, 1, 2]).then_some(order)
}

/// `data` stored with shape `stored` reordered so that output axis k is stored axis `order[k]`:
/// C order `[z, y, x]`.
fn permute_axes(data: &[f32], stored: [usize; 3], order: [usize; 3]) -> ([usize; 3], Vec<f32>) {
    let shape = order.map(|k| stored[k]);
    let stored_stride = [stored[1] * stored[2], stored[2], 1];
    let stride = order.map(|k| stored_stride[k]);
    let mut out = Vec::with_capacity(data.len());
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            let base = z * stride[0] + y * stride[1];
            out.extend((0..shape[2]).map(|x| data[base + x * stride[2]]));
        }
    }
    (shape, out)
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
            // A level number is also the index of a dataset in the OME multiscales, whose arrays
            // may have other names (`s0`, `s1`...).
            let named = (!path.join(level).is_dir())
                .then(|| level.parse::<usize>().ok())
                .flatten()
                .and_then(|i| {
                    let attrs = node_attributes(path).ok()??;
                    let ds = multiscales(&attrs)?.first()?.get("datasets")?.as_array()?.get(i)?.get("path")?.as_str()?.trim_matches('/').to_owned();
                    (!ds.is_empty() && !ds.contains("..")).then_some(ds)
                });
            let level = named.as_deref().unwrap_or(level);
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

    let ome = match &group_dir {
        Some(g) => node_attributes(g)?.and_then(|a| ome_dataset(&a, &dataset)),
        None => None,
    };
    let mut notes = Vec::new();
    // The axes' names: the group's OME axes, else the array's own dimension names.
    let (names, from) = match ome.as_ref().and_then(|o| o.axes.clone()) {
        Some(n) => (Some(n), "OME axes"),
        None => (array_axis_names(&array_dir)?, "dimension names"),
    };
    let (shape_u64, names, all_sizes) = match squeeze_to_3d(array.shape(), names.clone(), ome.as_ref().and_then(|o| o.voxel_size.clone())) {
        Some((squeezed, note)) => {
            notes.extend(note);
            squeezed
        }
        None => bail!(
            "{}: expected a 3-D (z, y, x) array (or one whose other axes have length 1), found rank {} with shape {:?}{}",
            array_dir.display(),
            array.shape().len(),
            array.shape(),
            names_text(&names)
        ),
    };
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

    // Axes stored in another order than z, y, x.
    let mut sizes = all_sizes.clone().filter(|v| v.len() == 3);
    let (shape, data) = match names.as_deref().and_then(zyx_order) {
        Some(order) => {
            notes.push(format!("{from} {:?}: read as z, y, x", names.as_deref().unwrap_or_default()));
            sizes = sizes.map(|v| order.iter().map(|&k| v[k]).collect());
            permute_axes(&data, shape, order)
        }
        None => {
            if let Some(n) = names.as_deref().filter(|n| n.len() == 3 && n.iter().map(|x| x.to_ascii_lowercase()).collect::<Vec<_>>() != ["z", "y", "x"]) {
                notes.push(format!("{from} {n:?} are not z, y and x: read as z, y, x"));
            }
            (shape, data)
        }
    };
    if let Some(units) = ome.as_ref().map(|o| &o.unknown_units).filter(|u| !u.is_empty()) {
        notes.push(format!("OME axis units {units:?} are not lengths fastdet knows: the scale is taken as Å"));
    }
    if let Some(v) = sizes.as_ref().filter(|v| anisotropic(v)) {
        notes.push(anisotropy_note(v));
    }
    // The x size, or the last scale entry of metadata that does not give all three.
    let voxel_size = sizes.as_ref().map(|v| v[2]).or_else(|| all_sizes.as_ref().and_then(|v| v.last().copied()));
    if let Some((present, total)) = absent_chunks(&array, chunk_files) {
        notes.push(format!(
            "{} of its {total} chunks are absent from {} and read as {} (a broken copy? \
             some writers leave out chunks equal to the fill value)",
            total - present,
            array_dir.display(),
            fill_value_text(&array)
        ));
    }
    Ok(Volume { shape, data, voxel_size, notes })
}

/// `shape` without its axes of length 1 that are not space axes (OME's t and c; the leading
/// ones when the axes have no names), with the names and sizes of the three left, and a note
/// saying what was dropped; `None` when that does not leave three axes.
#[allow(clippy::type_complexity)]
fn squeeze_to_3d(shape: &[u64], names: Option<Vec<String>>, sizes: Option<Vec<f64>>) -> Option<((Vec<u64>, Option<Vec<String>>, Option<Vec<f64>>), Option<String>)> {
    let rank = shape.len();
    if rank == 3 {
        return Some(((shape.to_vec(), names, sizes), None));
    }
    let named = names.as_ref().filter(|n| n.len() == rank);
    let keep: Vec<usize> = match named {
        Some(n) => (0..rank).filter(|&k| space_axis_name(&n[k])).collect(),
        None => (rank.saturating_sub(3)..rank).collect(),
    };
    if keep.len() != 3 || (0..rank).any(|k| !keep.contains(&k) && shape[k] != 1) {
        return None;
    }
    fn pick<T: Clone>(v: &[T], keep: &[usize]) -> Vec<T> {
        keep.iter().map(|&k| v[k].clone()).collect()
    }
    let dropped: Vec<String> = (0..rank).filter(|k| !keep.contains(k)).map(|k| named.map(|n| format!("{:?}", n[k])).unwrap_or_else(|| format!("{k}"))).collect();
    let note = format!("a {rank}-D array of shape {shape:?}: its axes {} of length 1 dropped, read as 3-D", dropped.join(", "));
    let sizes = sizes.filter(|v| v.len() == rank).map(|v| pick(&v, &keep));
    Some(((pick(shape, &keep), named.map(|n| pick(n, &keep)), sizes), Some(note)))
}

/// Whether an axis named `name` is x, y or z (any case).
fn space_axis_name(name: &str) -> bool {
    matches!(name.to_ascii_lowercase().as_str(), "x" | "y" | "z")
}

/// ` (axes [...])` when the axes are named, for messages.
fn names_text(names: &Option<Vec<String>>) -> String {
    names.as_ref().map(|n| format!(" (axes {n:?})")).unwrap_or_default()
}

/// Whether voxel sizes (Å, z, y, x) differ by more than 0.1%.
pub fn anisotropic(sizes: &[f64]) -> bool {
    let (lo, hi) = sizes.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    hi > lo * 1.001
}

/// The note for a volume whose voxels are not cubes: coordinates take one size for every axis.
pub fn anisotropy_note(sizes: &[f64]) -> String {
    format!(
        "voxel size differs between axes (z {} Å, y {} Å, x {} Å): fastdet takes one size (--voxel-size) for all three, so the Å coordinates along the others are off by their ratio; resample to cubic voxels",
        sizes[0], sizes[1], sizes[2]
    )
}

/// What absent chunks read as: "the fill value V", or "0" where a zarr v2 array's
/// `fill_value` is null (no fill value: zarr-python leaves such voxels undefined, zarrs reads 0).
fn fill_value_text(array: &Array<FilesystemStore>) -> String {
    let v2_null = matches!(array.metadata(), ArrayMetadata::V2(m) if m.fill_value.is_null());
    let bytes = array.fill_value().as_ne_bytes();
    let dt = array.data_type();
    let value = |n: usize| bytes.get(..n).map(|b| b.to_vec());
    let v: Option<f64> = if dt.is::<Float32DataType>() {
        value(4).map(|b| f32::from_ne_bytes(b.try_into().unwrap()) as f64)
    } else if dt.is::<Float64DataType>() {
        value(8).map(|b| f64::from_ne_bytes(b.try_into().unwrap()))
    } else if dt.is::<Float16DataType>() {
        value(2).map(|b| half::f16::from_ne_bytes(b.try_into().unwrap()).to_f64())
    } else if dt.is::<Int8DataType>() {
        value(1).map(|b| i8::from_ne_bytes(b.try_into().unwrap()) as f64)
    } else if dt.is::<Int16DataType>() {
        value(2).map(|b| i16::from_ne_bytes(b.try_into().unwrap()) as f64)
    } else if dt.is::<Int32DataType>() {
        value(4).map(|b| i32::from_ne_bytes(b.try_into().unwrap()) as f64)
    } else if dt.is::<UInt8DataType>() {
        value(1).map(|b| b[0] as f64)
    } else if dt.is::<UInt16DataType>() {
        value(2).map(|b| u16::from_ne_bytes(b.try_into().unwrap()) as f64)
    } else {
        None
    };
    match (v2_null, v) {
        (true, _) => "0 (its fill_value is null: no fill value; other readers may give anything there)".to_string(),
        (false, Some(v)) => format!("the fill value {v}"),
        (false, None) => "the fill value".to_string(),
    }
}

/// `(present, total)` chunk files when fewer are stored than the chunk grid has (shards count
/// as chunks of the outer grid).
fn absent_chunks(array: &Array<FilesystemStore>, present: u64) -> Option<(u64, u64)> {
    let total = array.chunk_grid_shape().iter().product::<u64>();
    (present < total).then_some((present, total))
}

/// Voxels any array may have, however little data its directory stores (chunks missing from the
/// store read as the fill value): 2^28, 1 GiB as f32, room for a sparse store of a whole
/// 184x630x630 tomogram (73 million voxels) several times over.
const MIN_VOXEL_BUDGET: u64 = 1 << 28;
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
    fn axes_units_and_anisotropy() {
        let attrs: Value = serde_json::json!({
            "multiscales": [{
                "axes": [{"name": "x", "type": "space", "unit": "nanometer"}, {"name": "y", "type": "space", "unit": "nanometer"}, {"name": "z", "type": "space", "unit": "furlong"}],
                "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 2.0]}]}],
                "coordinateTransformations": [{"type": "scale", "scale": [1.0012, 1.0012, 1.0]}]
            }]
        });
        let d = ome_dataset(attrs.as_object().unwrap(), "0").unwrap();
        assert_eq!(d.axes, Some(vec!["x".to_string(), "y".into(), "z".into()]));
        assert_eq!(d.voxel_size, Some(vec![10.012, 10.012, 2.0]));
        assert_eq!(d.unknown_units, vec!["furlong".to_string()]);
        assert_eq!(zyx_order(d.axes.as_ref().unwrap()), Some([2, 1, 0]));
        assert_eq!(zyx_order(&["Z".into(), "Y".into(), "X".into()]), None);
        assert_eq!(zyx_order(&["c".into(), "y".into(), "x".into()]), None);
        assert_eq!(zyx_order(&["y".into(), "z".into(), "x".into()]), Some([1, 0, 2]));
        assert!(anisotropic(&[20.024, 10.012, 10.012]) && !anisotropic(&[10.012, 10.012, 10.0121]));
        // v0.3 axes are strings.
        // An axis without a unit has the others'.
        let partial: Value = serde_json::json!({"multiscales": [{
            "axes": [{"name": "z", "type": "space"}, {"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]});
        assert_eq!(ome_dataset(partial.as_object().unwrap(), "0").unwrap().voxel_size, Some(vec![10.0, 10.0, 10.0]));
        let v03: Value = serde_json::json!({"multiscales": [{"axes": ["z", "y", "x"], "datasets": [{"path": "0"}]}]});
        let d = ome_dataset(v03.as_object().unwrap(), "0").unwrap();
        assert_eq!((d.axes.unwrap().len(), d.voxel_size), (3, None));
        // Every stored order comes back as z, y, x.
        let stored = [2, 3, 4];
        let zyx: Vec<f32> = (0..24).map(|i| i as f32).collect();
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1], [1, 2, 0], [2, 0, 1]] {
            // Store the z,y,x volume with axes permuted: stored axis order[k] is output axis k.
            let mut inv = [0usize; 3];
            for (k, &o) in order.iter().enumerate() {
                inv[o] = k;
            }
            let sshape = inv.map(|k| stored[k]);
            let (back_shape, back) = permute_axes(&permute_axes(&zyx, stored, inv).1, sshape, order);
            assert_eq!((back_shape, &back), (stored, &zyx), "{order:?}");
        }
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
        assert_eq!(ome_dataset(a, "0").and_then(|d| d.voxel_size).map(|v| v[2]), Some(10.012));
        assert_eq!(ome_dataset(a, "1").and_then(|d| d.voxel_size).map(|v| v[2]), Some(20.024));
        assert_eq!(ome_dataset(a, "2").map(|d| d.voxel_size), None);
        let v05: Value = serde_json::json!({"ome": attrs});
        assert_eq!(ome_dataset(v05.as_object().unwrap(), "1").and_then(|d| d.voxel_size).map(|v| v[2]), Some(20.024));
        assert_eq!(ome_dataset(&Map::new(), "0"), None);
    }

    #[test]
    fn the_nearest_level_by_ratio() {
        let levels: Vec<(String, f64)> = [("0", 4.99), ("1", 9.98), ("2", 19.96)].map(|(p, v)| (p.to_string(), v)).into();
        assert_eq!(nearest_level(&levels, 10.012).map(|l| l.0.as_str()), Some("1"));
        assert_eq!(nearest_level(&levels, 3.0).map(|l| l.0.as_str()), Some("0"));
        assert_eq!(nearest_level(&levels, 1000.0).map(|l| l.0.as_str()), Some("2"));
        // 7.057 Å is as near 4.99 as 9.98 by ratio (√(4.99 · 9.98)): the finer.
        assert_eq!(nearest_level(&levels, (4.99f64 * 9.98).sqrt()).map(|l| l.0.as_str()), Some("0"));
        assert_eq!(nearest_level(&[], 10.0), None);
    }

    #[test]
    fn level_sizes_along_x_and_inside_the_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".zgroup"), r#"{"zarr_format": 2}"#).unwrap();
        let scale = |s: [f64; 3]| serde_json::json!([{"type": "scale", "scale": s}]);
        let attrs = serde_json::json!({"multiscales": [{
            "axes": [{"name": "x", "type": "space"}, {"name": "y", "type": "space"}, {"name": "z", "type": "space"}],
            "datasets": [
                {"path": "0", "coordinateTransformations": scale([5.0, 6.0, 7.0])},
                {"path": "../outside", "coordinateTransformations": scale([9.0, 9.0, 9.0])},
                {"path": "", "coordinateTransformations": scale([9.0, 9.0, 9.0])},
                {"path": "1", "coordinateTransformations": scale([10.0, 12.0, 14.0])},
                {"path": "2"}
            ]
        }]});
        std::fs::write(dir.path().join(".zattrs"), attrs.to_string()).unwrap();
        assert_eq!(level_voxel_sizes(dir.path()).unwrap(), vec![("0".to_string(), 5.0), ("1".to_string(), 10.0)]);
        assert!(level_voxel_sizes(&dir.path().join("missing")).unwrap().is_empty());
    }
}
