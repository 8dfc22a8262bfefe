//! Regression tests for crashes found by the fuzz targets in `tools/fuzz/` (run with
//! `tools/fuzz.sh`). Each input here once made a parser panic, overflow, allocate without bound or
//! blow the stack; each must now come back as a clean `Err`. Plain tests: no fuzzing dependencies.

#[path = "common/torch_pickle.rs"]
mod torch_pickle;
use torch_pickle::tensor_pickle;
use std::io::Write;
use std::path::{Path, PathBuf};

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("a clean error"))
}

// ---------------------------------------------------------------------------------------------
// Building blocks: pickles and torch.save-style zips written by hand.

/// A `torch.save` zip: `archive/data.pkl` plus storage `archive/data/0`.
fn torch_zip(pkl: &[u8], storage: &[u8]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in [("archive/data.pkl", pkl), ("archive/byteorder", b"little".as_slice()), ("archive/data/0", storage)] {
        zip.start_file(name, opts).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn read_ckpt(bytes: &[u8]) -> anyhow::Result<fastdet::checkpoint::Checkpoint> {
    let tmp = tempfile::tempdir().unwrap();
    fastdet::checkpoint::read_checkpoint(&write_tmp(tmp.path(), "c.pt", bytes))
}

#[test]
fn helpers_build_a_loadable_checkpoint() {
    // The hand-built zip is right: a 2x2 transposed view of 4 f32s loads.
    let storage: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let c = read_ckpt(&torch_zip(&tensor_pickle(4, 0, &[2, 2], &[1, 2]), &storage)).unwrap();
    let w = c.get("w").unwrap();
    assert_eq!((w.shape.as_slice(), w.data.as_slice()), ([2usize, 2].as_slice(), [1.0f32, 3.0, 2.0, 4.0].as_slice()));
}

// ---------------------------------------------------------------------------------------------
// safetensors_header: an inconsistent fastdet.spec made ModelSpec::required_tensors panic.

/// A safetensors file with fastdet metadata and no tensors.
fn weights_file(spec_json: &str) -> Vec<u8> {
    let meta = serde_json::json!({
        "__metadata__": {
            "fastdet.format_version": fastdet::convert::FORMAT_VERSION,
            "fastdet.spec": spec_json,
            "fastdet.classes": "[\"apo-ferritin\"]",
        }
    });
    let mut h = serde_json::to_vec(&meta).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h);
    b
}

fn load_weights(spec_json: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    err_text(fastdet::weights::Weights::load(&write_tmp(tmp.path(), "w.safetensors", &weights_file(spec_json))))
}

#[test]
fn weights_spec_without_encoder_levels_is_an_error() {
    // Crash: `levels - 2 - j` underflowed (fuzzer renamed "blocks_down", so it defaulted to []).
    let e = load_weights(
        r#"{"arch":"segresnetv2","in_channels":1,"init_filters":1,"blocks_up":[1],"norm_groups":1,
            "head_in":2,"cls_width":1,"offset_width":1,"num_classes":1,"stride":2}"#,
    );
    assert!(e.contains("fastdet.spec is inconsistent"), "{e}");
}

#[test]
fn weights_spec_inconsistencies_are_errors() {
    let seg = |extra: &str| {
        format!(
            r#"{{"arch":"segresnetv2","in_channels":1,"head_in":2,"cls_width":1,"offset_width":1,"num_classes":1,"stride":2,{extra}}}"#
        )
    };
    let dyn_ = |extra: &str| {
        format!(r#"{{"arch":"dynunet","in_channels":1,"head_in":1,"cls_width":1,"offset_width":1,"num_classes":1,"stride":2,{extra}}}"#)
    };
    for spec in [
        // init_filters missing: `unwrap()` on None.
        seg(r#""blocks_down":[1,1,1],"blocks_up":[1]"#),
        // `f << i` with i >= 64.
        seg(&format!(r#""init_filters":1,"blocks_down":[{}],"blocks_up":[{}]"#, ["0"; 70].join(","), ["0"; 68].join(","))),
        // A block count that would make required_tensors loop (and allocate) for ever.
        seg(r#""init_filters":1,"blocks_down":[1,1,18446744073709551615],"blocks_up":[1]"#),
        // A width no file of this size can hold; `2 * c` overflowed.
        seg(r#""init_filters":9223372036854775807,"blocks_down":[1,1,1],"blocks_up":[1]"#),
        // DynUNet: `f[0]`, `n - 2` on too few levels; missing deep-supervision width.
        dyn_(r#""filters":[],"deep_supervision_width":1"#),
        dyn_(r#""filters":[1],"deep_supervision_width":1"#),
        dyn_(r#""filters":[1,1,1]"#),
    ] {
        let e = load_weights(&spec);
        assert!(e.contains("fastdet.spec is inconsistent"), "{spec}: {e}");
    }
}

#[test]
fn shipped_weights_still_load() {
    for name in ["demo_segresnetv2", "demo_dynunet"] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights").join(format!("{name}.safetensors"));
        let w = fastdet::weights::Weights::load(&p).unwrap();
        assert_eq!(w.tensors.len(), w.spec.required_tensors().len());
    }
}

// ---------------------------------------------------------------------------------------------
// checkpoint_zip: tensor views whose shape, stride or offset the storage cannot back.

fn ckpt_view_error(numel: i64, offset: i64, shape: &[i64], stride: &[i64]) -> String {
    let storage: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    err_text(read_ckpt(&torch_zip(&tensor_pickle(numel, offset, shape, stride), &storage)))
}

#[test]
fn ckpt_shape_product_overflow_is_an_error() {
    // Crash: `shape.iter().product()` overflowed.
    let e = ckpt_view_error(4, 0, &[1 << 62, 8], &[0, 0]);
    assert!(e.contains("tensor w"), "{e}");
}

#[test]
fn ckpt_stride_and_offset_overflow_are_errors() {
    // Crash: `(n - 1) * s` and `offset + ...` overflowed.
    for (offset, shape, stride) in [
        (0, vec![4], vec![i64::MAX]),
        (i64::MAX, vec![2, 2], vec![i64::MAX, i64::MAX]),
        (0, vec![3, 3, 3], vec![i64::MAX, i64::MAX, i64::MAX]),
    ] {
        let e = ckpt_view_error(4, offset, &shape, &stride);
        assert!(e.contains("tensor w"), "{e}");
    }
}

#[test]
fn ckpt_broadcast_view_cannot_allocate_without_bound() {
    // Crash (abort: memory allocation failed): shape [2^40] with stride 0 over a 1-element storage
    // passed the bounds check and asked for 4 TiB.
    let e = ckpt_view_error(4, 0, &[1 << 40], &[0]);
    assert!(e.contains("tensor w"), "{e}");
    let e = ckpt_view_error(4, 0, &[1 << 20, 1 << 20], &[0, 1]);
    assert!(e.contains("tensor w"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// pickle: nesting deep enough to overflow the stack when the value tree is dropped.

#[test]
fn deeply_nested_pickle_is_an_error_not_a_stack_overflow() {
    // `)` then TUPLE1 200 000 times: a tuple nested 200 000 deep.
    let mut p = vec![0x80, 2, b')'];
    p.extend(std::iter::repeat_n(0x85, 200_000));
    p.push(b'.');
    let e = err_text(fastdet::pickle::unpickle(&p));
    assert!(e.contains("nest"), "{e}");
    // Lists appended into lists: `]` 100 000 times, then APPEND 99 999 times.
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', 100_000));
    p.extend(std::iter::repeat_n(b'a', 99_999));
    p.push(b'.');
    let e = err_text(fastdet::pickle::unpickle(&p));
    assert!(e.contains("nest"), "{e}");
}

#[test]
fn nesting_up_to_the_limit_and_cycles_still_unpickle() {
    use fastdet::pickle::{unpickle, Value, MAX_NESTING};
    // Exactly MAX_NESTING tuples deep: accepted, and dropped without trouble.
    let mut p = vec![0x80, 2, b')'];
    p.extend(std::iter::repeat_n(0x85, MAX_NESTING - 1));
    p.push(b'.');
    assert!(matches!(unpickle(&p).unwrap(), Value::Tuple(_)));
    p.insert(3, 0x85);
    assert!(err_text(unpickle(&p)).contains("nest"));
    // A list holding itself (l = []; l.append(l)) and a dict shared twice.
    let v = unpickle(b"\x80\x02]q\x00h\x00a.").unwrap();
    let Value::List(l) = &v else { panic!("{v:?}") };
    assert!(matches!(&l.borrow()[0], Value::List(inner) if std::rc::Rc::ptr_eq(inner, l)));
    let v = unpickle(b"\x80\x02}q\x00h\x00\x86.").unwrap();
    assert!(matches!(&v, Value::Tuple(t) if t.len() == 2));
}

// ---------------------------------------------------------------------------------------------
// zarr_metadata: a `.zarray` next to one small valid chunk, as the fuzz harness lays it out.

fn zarr_with_zarray(zarray: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let arr = tmp.path().join("0");
    std::fs::create_dir_all(&arr).unwrap();
    std::fs::write(arr.join(".zarray"), zarray).unwrap();
    let chunk: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    std::fs::write(arr.join("0.0.0"), chunk).unwrap();
    err_text(fastdet::io::zarr::read_zarr_volume(&arr, "0"))
}

fn zarray(shape: &str, chunks: &str) -> String {
    format!(
        r#"{{"zarr_format":2,"shape":{shape},"chunks":{chunks},"dtype":"<f4","fill_value":0.0,"order":"C",
            "filters":null,"compressor":null,"dimension_separator":"."}}"#
    )
}

#[test]
fn zarr_shape_product_overflow_is_an_error() {
    // Crash: zarrs' element count `shape.iter().product()` overflowed (panic in debug builds).
    let e = zarr_with_zarray(&zarray("[100000000, 100000000, 100000000]", "[2, 2, 2]"));
    assert!(e.contains("voxels"), "{e}");
}

#[test]
fn zarr_shape_without_data_cannot_allocate_without_bound() {
    // Crash (abort: memory allocation failed): 2^50 voxels of fill value from one 32-byte chunk.
    let e = zarr_with_zarray(&zarray("[1048576, 1048576, 1024]", "[2, 2, 2]"));
    assert!(e.contains("voxels"), "{e}");
    // Hang: 2^30 one-voxel chunks, all but one missing, visited one by one.
    let e = zarr_with_zarray(&zarray("[1024, 1024, 1024]", "[1, 1, 1]"));
    assert!(e.contains("voxels") || e.contains("chunks"), "{e}");
    let e = zarr_with_zarray(&zarray("[256, 256, 256]", "[1, 1, 1]"));
    assert!(e.contains("chunks"), "{e}");
}

#[test]
fn pickle_copies_of_a_long_string_are_bounded() {
    // OOM: one 1 MiB BINBYTES, then DUP (or memo PUT under fresh keys) 100 000 times: every copy is
    // a full copy, 100 GiB from a 1.2 MB pickle.
    let mut p = vec![0x80, 2, b'B'];
    p.extend((1u32 << 20).to_le_bytes());
    p.extend(std::iter::repeat_n(b'x', 1 << 20));
    let mut dup = p.clone();
    dup.extend(std::iter::repeat_n(b'2', 100_000));
    dup.push(b'.');
    let e = err_text(fastdet::pickle::unpickle(&dup));
    assert!(e.contains("copies strings"), "{e}");
    let mut put = p;
    for k in 0..100_000u32 {
        put.push(b'r');
        put.extend(k.to_le_bytes());
    }
    put.push(b'.');
    let e = err_text(fastdet::pickle::unpickle(&put));
    assert!(e.contains("copies strings"), "{e}");
}
