//! OME-Zarr reading: bundled fixture vs. values read by zarr-python, round trips written with
//! `zarrs` (v2/v3, several compressors, dtypes and non-dividing chunk shapes), and error messages.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fastdet::io::dataset::{shard, Layout};
use fastdet::io::zarr::{count_nonfinite, read_zarr_volume, Volume};
use zarrs::array::{Array, ArrayBuilder, ArrayMetadata, ArrayMetadataV2, Element};
use zarrs::filesystem::FilesystemStore;

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dataset")
}

fn synth1() -> PathBuf {
    fixture_root().join("test/static/ExperimentRuns/TS_synth_1/VoxelSpacing10.000/denoised.zarr")
}

fn at(v: &Volume, z: usize, y: usize, x: usize) -> f32 {
    v.data[(z * v.shape[1] + y) * v.shape[2] + x]
}

// Reference numbers obtained with zarr-python 3.1.6 + numcodecs (throwaway venv):
//   a = zarr.open(".../TS_synth_1/VoxelSpacing10.000/denoised.zarr/0", mode="r")[:]
//   a.shape, a.astype(np.float64).sum(), np.abs(a.astype(np.float64)).sum(), float(a[idx])
//   b = zarr.open(".../denoised.zarr/2", mode="r")[:]; b.astype(np.float64).sum(), float(b[10,20,30])
const REF_SUM: f64 = 3.45060073805359;
const REF_ABS_SUM: f64 = 5.25920706981503;
const REF_VOXELS: [((usize, usize, usize), f64); 7] = [
    ((0, 0, 0), 6.383208528859541e-06),
    ((79, 159, 159), -1.1773133337555919e-05),
    ((40, 80, 80), -1.99277951651311e-06),
    ((63, 63, 63), -9.713930921861902e-07),
    ((64, 64, 64), -7.381770501524443e-07),
    ((12, 100, 150), 4.73820273327874e-06),
    ((70, 130, 5), 2.2846882075100439e-07),
];
const REF_L2_SUM: f64 = 0.05391563653;
const REF_L2_VOXEL: f64 = 1.3456618717100355e-06;

#[test]
fn fixture_matches_zarr_python() {
    let v = read_zarr_volume(&synth1(), "0").unwrap();
    assert_eq!(v.shape, [80, 160, 160]);
    assert_eq!(v.data.len(), 80 * 160 * 160);
    let vs = v.voxel_size.expect("voxel size from .zattrs");
    assert!((vs - 10.012).abs() < 1e-9, "voxel size {vs}");
    for ((z, y, x), want) in REF_VOXELS {
        // f32 values printed by python as f64: exact equality after rounding back to f32
        assert_eq!(at(&v, z, y, x), want as f32, "voxel ({z},{y},{x})");
        assert_eq!(v.get(z, y, x), want as f32);
    }
    let sum: f64 = v.data.iter().map(|&x| x as f64).sum();
    let abs_sum: f64 = v.data.iter().map(|&x| (x as f64).abs()).sum();
    assert!((sum - REF_SUM).abs() < 1e-9, "sum {sum} vs {REF_SUM}");
    assert!(
        (abs_sum - REF_ABS_SUM).abs() < 1e-9,
        "abs sum {abs_sum} vs {REF_ABS_SUM}"
    );
    assert_eq!(count_nonfinite(&v.data), 0);

    // empty level means "0"
    let v0 = read_zarr_volume(&synth1(), "").unwrap();
    assert_eq!(v0.data, v.data);
    // the array directory itself: same data, voxel size from the parent group (no level can be
    // chosen in it: tests/bad_inputs.rs)
    let va = read_zarr_volume(&synth1().join("0"), "0").unwrap();
    assert_eq!(va.data, v.data);
    assert_eq!(va.voxel_size, v.voxel_size);
}

#[test]
fn fixture_binned_level() {
    let v = read_zarr_volume(&synth1(), "2").unwrap();
    assert_eq!(v.shape, [20, 40, 40]);
    let vs = v.voxel_size.unwrap();
    assert!((vs - 40.048).abs() < 1e-9, "{vs}");
    assert_eq!(at(&v, 10, 20, 30), REF_L2_VOXEL as f32);
    let sum: f64 = v.data.iter().map(|&x| x as f64).sum();
    assert!((sum - REF_L2_SUM).abs() < 1e-9, "{sum}");
    let v1 = read_zarr_volume(&synth1(), "1").unwrap();
    assert_eq!(v1.shape, [40, 80, 80]);
    assert!((v1.voxel_size.unwrap() - 20.024).abs() < 1e-9);
    // a level that does not exist: error names the group and the level
    let e = read_zarr_volume(&synth1(), "5").unwrap_err().to_string();
    assert!(e.contains("denoised.zarr") && e.contains("'5'"), "{e}");
}

#[test]
fn fixture_dataset_layout() {
    let root = fixture_root();
    let runs = Layout::split(&root, "test").discover_runs().unwrap();
    assert_eq!(
        runs,
        vec!["TS_synth_1".to_string(), "TS_synth_2".to_string()]
    );
    assert_eq!(
        Layout::split(&root, "test").tomogram_path("TS_synth_1", "denoised").unwrap(),
        synth1()
    );
    assert_eq!(shard(&runs, 1, 2), vec!["TS_synth_2".to_string()]);
    let e = Layout::split(&root, "train").discover_runs().unwrap_err().to_string();
    assert!(e.contains("train") && e.contains("ExperimentRuns"), "{e}");
    let v2 = read_zarr_volume(
        &Layout::split(&root, "test").tomogram_path("TS_synth_2", "denoised").unwrap(),
        "0",
    )
    .unwrap();
    assert_eq!(v2.shape, [80, 160, 160]);
}

// ---------------------------------------------------------------------------------------------
// Round trips written with zarrs

const SHAPE: [u64; 3] = [11, 20, 9];

fn store(dir: &Path) -> Arc<FilesystemStore> {
    std::fs::create_dir_all(dir).unwrap();
    Arc::new(FilesystemStore::new(dir).unwrap())
}

/// Write a zarr v2 array at `dir` with the given `.zarray` fields using zarrs.
fn write_v2<T: Element>(
    dir: &Path,
    dtype: &str,
    fill: serde_json::Value,
    chunks: [u64; 3],
    compressor: serde_json::Value,
    data: &[T],
    shape: &[u64],
) {
    write_v2_nd(dir, dtype, fill, &chunks[..shape.len()], compressor, data, shape)
}

/// `write_v2` of any rank.
fn write_v2_nd<T: Element>(dir: &Path, dtype: &str, fill: serde_json::Value, chunks: &[u64], compressor: serde_json::Value, data: &[T], shape: &[u64]) {
    let meta = serde_json::json!({
        "zarr_format": 2,
        "shape": shape,
        "chunks": chunks,
        "dtype": dtype,
        "fill_value": fill,
        "order": "C",
        "filters": null,
        "dimension_separator": ".",
        "compressor": compressor,
    });
    let meta: ArrayMetadataV2 = serde_json::from_value(meta).unwrap();
    let array = Array::new_with_metadata(store(dir), "/", ArrayMetadata::V2(meta)).unwrap();
    array.store_metadata().unwrap();
    array.store_array_subset(&array.subset_all(), data).unwrap();
    assert!(dir.join(".zarray").is_file());
}

fn pattern(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37) % 101) as f32 * 0.25 - 12.0)
        .collect()
}

fn blosc_lz4() -> serde_json::Value {
    serde_json::json!({"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0})
}

#[test]
fn roundtrip_v2_f32_compressors() {
    let tmp = tempfile::tempdir().unwrap();
    let n = SHAPE.iter().product::<u64>() as usize;
    let data = pattern(n);
    let compressors = [
        ("blosc_lz4", blosc_lz4()),
        (
            "blosc_zstd",
            serde_json::json!({"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2, "blocksize": 0}),
        ),
        ("zlib", serde_json::json!({"id": "zlib", "level": 6})),
        ("gzip", serde_json::json!({"id": "gzip", "level": 5})),
        ("none", serde_json::Value::Null),
    ];
    for (name, comp) in compressors {
        for chunks in [[7, 13, 5], [4, 4, 4], [11, 20, 9], [16, 32, 16]] {
            let dir = tmp
                .path()
                .join(format!("{name}_{}x{}x{}", chunks[0], chunks[1], chunks[2]));
            write_v2(
                &dir,
                "<f4",
                serde_json::json!(0.0),
                chunks,
                comp.clone(),
                &data,
                &SHAPE,
            );
            let v = read_zarr_volume(&dir, "0").unwrap();
            assert_eq!(v.shape, [11, 20, 9], "{name} {chunks:?}");
            assert_eq!(v.data, data, "{name} {chunks:?}");
            assert_eq!(v.voxel_size, None);
        }
    }
}

#[test]
fn roundtrip_v2_dtypes() {
    let tmp = tempfile::tempdir().unwrap();
    let n = SHAPE.iter().product::<u64>() as usize;
    let chunks = [7, 13, 5];

    let f16: Vec<half::f16> = pattern(n).into_iter().map(half::f16::from_f32).collect();
    let d = tmp.path().join("f16");
    write_v2(
        &d,
        "<f2",
        serde_json::json!(0.0),
        chunks,
        blosc_lz4(),
        &f16,
        &SHAPE,
    );
    let v = read_zarr_volume(&d, "0").unwrap();
    assert_eq!(v.data, f16.iter().map(|x| x.to_f32()).collect::<Vec<_>>());

    let i16s: Vec<i16> = (0..n)
        .map(|i| (i as i64 * 97 % 65_536 - 32_768) as i16)
        .collect();
    let d = tmp.path().join("i16");
    write_v2(
        &d,
        "<i2",
        serde_json::json!(0),
        chunks,
        serde_json::json!({"id": "zlib", "level": 1}),
        &i16s,
        &SHAPE,
    );
    let v = read_zarr_volume(&d, "0").unwrap();
    assert_eq!(v.data, i16s.iter().map(|&x| x as f32).collect::<Vec<_>>());
    assert!(v.data.iter().any(|&x| x < 0.0));

    let u8s: Vec<u8> = (0..n).map(|i| (i * 31 % 256) as u8).collect();
    let d = tmp.path().join("u8");
    write_v2(
        &d,
        "|u1",
        serde_json::json!(0),
        chunks,
        serde_json::Value::Null,
        &u8s,
        &SHAPE,
    );
    let v = read_zarr_volume(&d, "0").unwrap();
    assert_eq!(v.data, u8s.iter().map(|&x| x as f32).collect::<Vec<_>>());

    let f64s: Vec<f64> = pattern(n).into_iter().map(|x| x as f64 / 3.0).collect();
    let d = tmp.path().join("f64");
    write_v2(
        &d,
        "<f8",
        serde_json::json!(0.0),
        chunks,
        blosc_lz4(),
        &f64s,
        &SHAPE,
    );
    let v = read_zarr_volume(&d, "0").unwrap();
    assert_eq!(v.data, f64s.iter().map(|&x| x as f32).collect::<Vec<_>>());

    // unsupported dtype: clear error naming the path
    let u64s: Vec<u64> = (0..n as u64).collect();
    let d = tmp.path().join("u64");
    write_v2(
        &d,
        "<u8",
        serde_json::json!(0),
        chunks,
        serde_json::Value::Null,
        &u64s,
        &SHAPE,
    );
    let e = read_zarr_volume(&d, "0").unwrap_err().to_string();
    assert!(
        e.contains(&d.display().to_string()) && e.contains("unsupported data type"),
        "{e}"
    );
}

#[test]
fn roundtrip_v3_and_ome_group() {
    use zarrs::array::codec::{GzipCodec, ZstdCodec};
    use zarrs::array::data_type;
    let tmp = tempfile::tempdir().unwrap();
    let n = SHAPE.iter().product::<u64>() as usize;
    let data = pattern(n);

    // plain v3 arrays, f32 with zstd / gzip / no compression, non-dividing chunks
    for (name, codecs) in [
        (
            "zstd",
            vec![Arc::new(ZstdCodec::new(3, false))
                as Arc<dyn zarrs::array::codec::api::BytesToBytesCodecTraits>],
        ),
        ("gzip", vec![Arc::new(GzipCodec::new(5).unwrap()) as _]),
        ("raw", vec![]),
    ] {
        let dir = tmp.path().join(format!("v3_{name}"));
        let array = ArrayBuilder::new(SHAPE.to_vec(), vec![7, 13, 5], data_type::float32(), 0.0f32)
            .bytes_to_bytes_codecs(codecs)
            .build(store(&dir), "/")
            .unwrap();
        array.store_metadata().unwrap();
        array
            .store_array_subset(&array.subset_all(), &data)
            .unwrap();
        assert!(dir.join("zarr.json").is_file());
        let v = read_zarr_volume(&dir, "0").unwrap();
        assert_eq!(v.shape, [11, 20, 9]);
        assert_eq!(v.data, data, "{name}");
    }

    // v3 OME-Zarr (0.5-style) group with an int16 level "0" and an uint8 level "1"
    let root = tmp.path().join("ome_v3.zarr");
    let st = store(&root);
    let attrs = serde_json::json!({"ome": {"version": "0.5", "multiscales": [{
    "axes": [{"name": "z"}, {"name": "y"}, {"name": "x"}],
    "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [7.5, 7.5, 7.5]}]},
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [15.0, 15.0, 15.0]}]}
    ]}]}});
    zarrs::group::GroupBuilder::new()
        .attributes(attrs.as_object().unwrap().clone())
        .build(st.clone(), "/")
        .unwrap()
        .store_metadata()
        .unwrap();
    let i16s: Vec<i16> = (0..n).map(|i| (i as i32 * 13 - 500) as i16).collect();
    let a0 = ArrayBuilder::new(SHAPE.to_vec(), vec![7, 13, 5], data_type::int16(), 0i16)
        .build(st.clone(), "/0")
        .unwrap();
    a0.store_metadata().unwrap();
    a0.store_array_subset(&a0.subset_all(), &i16s).unwrap();
    let u8s: Vec<u8> = (0..60u32).map(|i| (i * 4) as u8).collect();
    let a1 = ArrayBuilder::new(vec![3, 5, 4], vec![2, 2, 3], data_type::uint8(), 0u8)
        .build(st.clone(), "/1")
        .unwrap();
    a1.store_metadata().unwrap();
    a1.store_array_subset(&a1.subset_all(), &u8s).unwrap();

    let v = read_zarr_volume(&root, "0").unwrap();
    assert_eq!(v.data, i16s.iter().map(|&x| x as f32).collect::<Vec<_>>());
    assert_eq!(v.voxel_size, Some(7.5));
    let v = read_zarr_volume(&root, "1").unwrap();
    assert_eq!(v.shape, [3, 5, 4]);
    assert_eq!(v.data, u8s.iter().map(|&x| x as f32).collect::<Vec<_>>());
    assert_eq!(v.voxel_size, Some(15.0));
}

#[test]
fn v2_ome_group_voxel_size() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("g.zarr");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join(".zgroup"), r#"{"zarr_format": 2}"#).unwrap();
    std::fs::write(
        root.join(".zattrs"),
        r#"{"multiscales": [{"version": "0.4", "datasets": [{"path": "0",
            "coordinateTransformations": [{"type": "scale", "scale": [10.012, 10.012, 10.012]}]}]}]}"#,
    )
    .unwrap();
    let n = SHAPE.iter().product::<u64>() as usize;
    let data = pattern(n);
    write_v2(
        &root.join("0"),
        "<f4",
        serde_json::json!(0.0),
        [7, 13, 5],
        blosc_lz4(),
        &data,
        &SHAPE,
    );
    let v = read_zarr_volume(&root, "0").unwrap();
    assert_eq!(v.data, data);
    assert_eq!(v.voxel_size, Some(10.012));
}

/// `data` (C order, shape `[z, y, x]`) stored with its axes reversed: `[x, y, z]`.
fn reversed_axes(data: &[f32], [d, h, w]: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                out[(x * h + y) * d + z] = data[(z * h + y) * w + x];
            }
        }
    }
    out
}

/// Axes stored x, y, z (named by the OME axes, or by the array's dimension names) come back as
/// z, y, x; nanometre scales become Å; voxels that are not cubes are noted; level numbers index
/// the multiscale datasets whatever their arrays are called.
#[test]
fn stored_axis_order_units_and_level_names() {
    let tmp = tempfile::tempdir().unwrap();
    let n = SHAPE.iter().product::<u64>() as usize;
    let data = pattern(n);
    let zyx = [SHAPE[0] as usize, SHAPE[1] as usize, SHAPE[2] as usize];
    let xyz_data = reversed_axes(&data, zyx);
    let xyz_shape = [SHAPE[2], SHAPE[1], SHAPE[0]];

    let root = tmp.path().join("xyz.ome.zarr");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join(".zgroup"), r#"{"zarr_format": 2}"#).unwrap();
    let unit = |u: &str| format!(r#"{{"multiscales": [{{"version": "0.4", "axes": [{{"name": "x", "type": "space", "unit": "{u}"}}, {{"name": "y", "type": "space", "unit": "{u}"}}, {{"name": "z", "type": "space", "unit": "{u}"}}], "datasets": [{{"path": "s0", "coordinateTransformations": [{{"type": "scale", "scale": [1.0012, 1.0012, 2.0024]}}]}}]}}]}}"#);
    std::fs::write(root.join(".zattrs"), unit("nanometer")).unwrap();
    write_v2(&root.join("s0"), "<f4", serde_json::json!(0.0), [4, 7, 5], blosc_lz4(), &xyz_data, &xyz_shape);
    let v = read_zarr_volume(&root, "0").unwrap();
    assert_eq!(v.shape, zyx);
    assert_eq!(v.data, data);
    assert!((v.voxel_size.unwrap() - 10.012).abs() < 1e-9, "{:?}", v.voxel_size);
    assert!(v.notes.iter().any(|n| n.contains("OME axes [\"x\", \"y\", \"z\"]: read as z, y, x")), "{:?}", v.notes);
    assert!(v.notes.iter().any(|n| n.contains("voxel size differs between axes (z 20.024 Å, y 10.012 Å, x 10.012 Å)")), "{:?}", v.notes);
    let e = format!("{:#}", read_zarr_volume(&root, "1").unwrap_err());
    assert!(e.contains("no array '1'") && e.contains("s0"), "{e}");

    // A zarr v3 f32 array whose own metadata names its dimensions.
    let named_v3 = |name: &str, shape: [u64; 3], names: [&str; 3], values: &[f32]| -> PathBuf {
        let dir = tmp.path().join(name);
        let mut b = ArrayBuilder::new(shape.to_vec(), vec![4, 7, 5], zarrs::array::data_type::float32(), 0.0f32);
        b.dimension_names(Some(names));
        let array = b.build(store(&dir), "/").unwrap();
        array.store_metadata().unwrap();
        array.store_array_subset(&array.subset_all(), values).unwrap();
        dir
    };
    // zarr v3 dimension names, on the array itself.
    let v = read_zarr_volume(&named_v3("v3_xyz.zarr", xyz_shape, ["x", "y", "z"], &xyz_data), "0").unwrap();
    assert_eq!((v.shape, &v.data), (zyx, &data));
    assert!(v.notes.iter().any(|n| n.contains("dimension names")), "{:?}", v.notes);

    // Names that are not the three axes are read as stored, and said.
    let v = read_zarr_volume(&named_v3("v3_cyx.zarr", SHAPE, ["c", "y", "x"], &data), "0").unwrap();
    assert_eq!((v.shape, &v.data), (zyx, &data));
    assert!(v.notes.iter().any(|n| n.contains("are not z, y and x: read as z, y, x")), "{:?}", v.notes);
}

/// Arrays with time and channel axes of length 1 (as OME-Zarr writers of 5-D t,c,z,y,x arrays
/// leave them) are read as their three space axes; the time axis's unit is not a length to check.
#[test]
fn singleton_time_and_channel_axes_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let n = SHAPE.iter().product::<u64>() as usize;
    let data = pattern(n);
    let zyx = [SHAPE[0] as usize, SHAPE[1] as usize, SHAPE[2] as usize];
    let root = tmp.path().join("tczyx.ome.zarr");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join(".zgroup"), r#"{"zarr_format": 2}"#).unwrap();
    std::fs::write(
        root.join(".zattrs"),
        r#"{"multiscales": [{"version": "0.4", "axes": [{"name": "t", "type": "time", "unit": "second"}, {"name": "c", "type": "channel"},
            {"name": "z", "type": "space", "unit": "nanometer"}, {"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0012, 1.0012, 1.0012]}]}]}]}"#,
    )
    .unwrap();
    let shape5 = [1, 1, SHAPE[0], SHAPE[1], SHAPE[2]];
    write_v2_nd(&root.join("0"), "<f4", serde_json::json!(0.0), &[1, 1, 4, 7, 5], blosc_lz4(), &data, &shape5);
    let v = read_zarr_volume(&root, "0").unwrap();
    assert_eq!((v.shape, &v.data), (zyx, &data));
    assert!((v.voxel_size.unwrap() - 10.012).abs() < 1e-9, "{:?}", v.voxel_size);
    assert_eq!(v.notes.len(), 1, "{:?}", v.notes);
    assert!(v.notes[0].starts_with(&format!("a 5-D array of shape {shape5:?}: its axes \"t\", \"c\" of length 1 dropped")), "{:?}", v.notes);

    // Without names, leading axes of length 1; any other length is refused.
    let bare = tmp.path().join("bare4d");
    write_v2_nd(&bare, "<f4", serde_json::json!(0.0), &[1, 4, 7, 5], serde_json::Value::Null, &data, &[1, SHAPE[0], SHAPE[1], SHAPE[2]]);
    let v = read_zarr_volume(&bare, "0").unwrap();
    assert_eq!((v.shape, &v.data), (zyx, &data));
    let two = tmp.path().join("two4d");
    let doubled: Vec<f32> = data.iter().chain(&data).copied().collect();
    write_v2_nd(&two, "<f4", serde_json::json!(0.0), &[1, 4, 7, 5], serde_json::Value::Null, &doubled, &[2, SHAPE[0], SHAPE[1], SHAPE[2]]);
    let e = err_of(&two, "0");
    assert!(e.contains("expected a 3-D (z, y, x) array (or one whose other axes have length 1), found rank 4"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Errors

fn err_of(path: &Path, level: &str) -> String {
    format!("{:#}", read_zarr_volume(path, level).unwrap_err())
}

#[test]
fn error_missing_path() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("nope.zarr");
    let e = err_of(&p, "0");
    assert!(
        e.contains(&p.display().to_string()) && e.contains("no such file"),
        "{e}"
    );
}

#[test]
fn error_missing_zarray() {
    let tmp = tempfile::tempdir().unwrap();
    let n = SHAPE.iter().product::<u64>() as usize;
    let root = tmp.path().join("g.zarr");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join(".zgroup"), r#"{"zarr_format": 2}"#).unwrap();
    let arr = root.join("0");
    write_v2(
        &arr,
        "<f4",
        serde_json::json!(0.0),
        [7, 13, 5],
        blosc_lz4(),
        &pattern(n),
        &SHAPE,
    );
    std::fs::remove_file(arr.join(".zarray")).unwrap();
    // via the group
    let e = err_of(&root, "0");
    assert!(
        e.contains(&arr.display().to_string()) && e.contains(".zarray"),
        "{e}"
    );
    // the array dir directly
    let e = err_of(&arr, "0");
    assert!(
        e.contains(&arr.display().to_string()) && e.contains(".zarray"),
        "{e}"
    );
}

#[test]
fn error_corrupt_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let n = SHAPE.iter().product::<u64>() as usize;
    for (name, comp) in [
        ("blosc", blosc_lz4()),
        ("zlib", serde_json::json!({"id": "zlib", "level": 6})),
        ("none", serde_json::Value::Null),
    ] {
        let arr = tmp.path().join(name);
        write_v2(
            &arr,
            "<f4",
            serde_json::json!(0.0),
            [7, 13, 5],
            comp,
            &pattern(n),
            &SHAPE,
        );
        let chunk = arr.join("1.0.1");
        assert!(chunk.is_file());
        std::fs::write(
            &chunk,
            b"this is not a compressed chunk, just garbage bytes",
        )
        .unwrap();
        let e = err_of(&arr, "0");
        assert!(e.contains(&arr.display().to_string()), "{e}");
        assert!(e.contains("1.0.1") && e.contains("corrupt"), "{name}: {e}");
    }
}

#[test]
fn error_rank2() {
    let tmp = tempfile::tempdir().unwrap();
    let arr = tmp.path().join("flat");
    let data: Vec<f32> = (0..6 * 4).map(|i| i as f32).collect();
    write_v2(
        &arr,
        "<f4",
        serde_json::json!(0.0),
        [3, 3, 0],
        serde_json::Value::Null,
        &data,
        &[6, 4],
    );
    let e = err_of(&arr, "0");
    assert!(
        e.contains(&arr.display().to_string()) && e.contains("rank 2"),
        "{e}"
    );
}

#[test]
fn error_not_zarr() {
    let tmp = tempfile::tempdir().unwrap();
    let e = err_of(tmp.path(), "0");
    assert!(
        e.contains(&tmp.path().display().to_string()) && e.contains("not a zarr"),
        "{e}"
    );
}
