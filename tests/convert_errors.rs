//! `fastdet convert` on broken and on good inputs, through the real binary.
//!
//! Every broken input is crafted at test time from the fixture checkpoints in
//! `tests/fixtures/golden/`. For each one the command must exit with status 1 (an error, not a
//! panic or a usage error), print a message that names the input and the problem, and leave
//! nothing behind: neither the output file nor a temporary file in the output's directory.

use fastdet::checkpoint::read_checkpoint;
use half::f16;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

// ---------------------------------------------------------------------------------------------
// Fixtures and running the binary
// ---------------------------------------------------------------------------------------------

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden").join(name)
}

fn manifest() -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(golden("manifest.json")).unwrap()).unwrap()
}

/// Runs `fastdet ARGS...`.
fn fastdet<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_fastdet")).args(args).output().expect("cannot run fastdet")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// A scratch directory with `in/` for crafted inputs and an empty `out/` for the output.
struct Scratch {
    _dir: tempfile::TempDir,
    input_dir: PathBuf,
    out_dir: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let input_dir = dir.path().join("in");
        let out_dir = dir.path().join("out");
        std::fs::create_dir(&input_dir).unwrap();
        std::fs::create_dir(&out_dir).unwrap();
        Scratch { _dir: dir, input_dir, out_dir }
    }
    fn input(&self, name: &str) -> PathBuf {
        self.input_dir.join(name)
    }
    fn out(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }
    fn out_dir_entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

/// Runs `fastdet convert INPUTS... -o OUT EXTRA...` and expects a clean failure: exit status 1,
/// an `error:` line on stderr holding every string of `needles`, no panic, no output file, and no
/// temporary file left in OUT's directory. Returns stderr.
fn expect_failure(s: &Scratch, inputs: &[&Path], extra: &[&str], needles: &[&str]) -> String {
    let out = s.out("weights.safetensors");
    let mut args: Vec<String> = vec!["convert".into()];
    args.extend(inputs.iter().map(|p| path_str(p).to_string()));
    args.extend(["-o".to_string(), path_str(&out).to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let o = fastdet(&args);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "fastdet {args:?} should fail with status 1\nstdout:\n{}\nstderr:\n{stderr}", text(&o.stdout));
    assert!(stderr.starts_with("error: "), "stderr should be an error message:\n{stderr}");
    assert!(!stderr.contains("panicked"), "fastdet panicked:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr should mention {n:?}:\n{stderr}");
    }
    assert!(!out.exists(), "{} was written despite the error", out.display());
    assert!(s.out_dir_entries().is_empty(), "files left in the output directory: {:?}", s.out_dir_entries());
    stderr
}

/// Runs `fastdet convert INPUTS... -o OUT EXTRA...`, expects success, returns stdout.
fn convert_ok(inputs: &[&Path], out: &Path, extra: &[&str]) -> String {
    let mut args: Vec<String> = vec!["convert".into()];
    args.extend(inputs.iter().map(|p| path_str(p).to_string()));
    args.extend(["-o".to_string(), path_str(out).to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let o = fastdet(&args);
    assert!(o.status.success(), "fastdet {args:?} failed\nstdout:\n{}\nstderr:\n{}", text(&o.stdout), text(&o.stderr));
    assert!(out.is_file());
    text(&o.stdout)
}

// ---------------------------------------------------------------------------------------------
// Crafting zips (torch.save archives)
// ---------------------------------------------------------------------------------------------

/// Every entry of a zip archive, in archive order, as (name, uncompressed bytes).
fn zip_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).unwrap();
            (f.name().to_string(), buf)
        })
        .collect()
}

/// Writes `entries` as an uncompressed (Stored) zip, as `torch.save` does.
fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        w.start_file(name.as_str(), opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap();
}

/// Writes a copy of the fixture `fixture` at `dst` after `edit` has changed its entries.
fn rewrite_zip(fixture: &str, dst: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<u8>)>)) {
    let mut entries = zip_entries(&golden(fixture));
    edit(&mut entries);
    write_zip(dst, &entries);
}

// ---------------------------------------------------------------------------------------------
// Crafting and reading safetensors
// ---------------------------------------------------------------------------------------------

/// One tensor of a safetensors file, raw.
#[derive(Debug, Clone, PartialEq)]
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// All tensors of a safetensors file by name (metadata ignored).
fn read_st(path: &Path) -> BTreeMap<String, RawTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| (name, RawTensor { dtype: v.dtype(), shape: v.shape().to_vec(), bytes: v.data().to_vec() }))
        .collect()
}

fn write_st(path: &Path, tensors: &BTreeMap<String, RawTensor>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap()))
        .collect();
    std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

fn f16_bits(t: &RawTensor) -> Vec<u16> {
    assert_eq!(t.dtype, Dtype::F16);
    t.bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// `fastdet inspect PATH --json`.
fn inspect_json(path: &Path) -> serde_json::Value {
    let o = fastdet(["inspect", path_str(path), "--json"]);
    assert!(o.status.success(), "inspect failed: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

const W8: &str = "segresnetv2_w8";

// ---------------------------------------------------------------------------------------------
// Broken inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_checkpoint() {
    let s = Scratch::new();
    let input = s.input("truncated.ckpt");
    let bytes = std::fs::read(golden("segresnetv2_w8.ckpt")).unwrap();
    std::fs::write(&input, &bytes[..bytes.len() / 2]).unwrap();
    expect_failure(&s, &[&input], &[], &[path_str(&input), "cannot load checkpoint", "corrupt or truncated zip archive"]);
}

#[test]
fn zip_without_data_pkl() {
    let s = Scratch::new();
    let input = s.input("no_pickle.ckpt");
    rewrite_zip("segresnetv2_w8.ckpt", &input, |e| e.retain(|(n, _)| !n.ends_with("data.pkl")));
    expect_failure(&s, &[&input], &[], &[path_str(&input), "holds no data.pkl"]);
}

#[test]
fn pickle_references_a_missing_storage() {
    let s = Scratch::new();
    let input = s.input("missing_storage.ckpt");
    let entry = format!("{W8}/data/0");
    rewrite_zip("segresnetv2_w8.ckpt", &input, |e| e.retain(|(n, _)| *n != entry));
    // Storage 0 is the first tensor's, backbone.convInit.conv.weight.
    expect_failure(
        &s,
        &[&input],
        &[],
        &[path_str(&input), "backbone.convInit.conv.weight", &format!("{entry:?}"), "missing from the archive"],
    );
}

#[test]
fn storage_smaller_than_its_tensor() {
    let s = Scratch::new();
    let input = s.input("short_storage.ckpt");
    let entry = format!("{W8}/data/0");
    rewrite_zip("segresnetv2_w8.ckpt", &input, |e| {
        let (_, data) = e.iter_mut().find(|(n, _)| *n == entry).unwrap();
        data.truncate(8);
    });
    // backbone.convInit.conv.weight is 8x1x3x3x3 = 216 f32; 8 bytes hold 2.
    expect_failure(
        &s,
        &[&input],
        &[],
        &[path_str(&input), "backbone.convInit.conv.weight", "holds 2 elements", "says 216"],
    );
}

#[test]
fn zip_entry_with_path_traversal() {
    for evil in ["../evil.txt", "segresnetv2_w8/../../evil"] {
        let s = Scratch::new();
        let input = s.input("traversal.ckpt");
        rewrite_zip("segresnetv2_w8.ckpt", &input, |e| e.push((evil.to_string(), b"pwned".to_vec())));
        expect_failure(&s, &[&input], &[], &[path_str(&input), &format!("{evil:?}"), "path traversal"]);
        assert!(!s.input_dir.parent().unwrap().join("evil.txt").exists());
        assert!(!s.input_dir.join("evil.txt").exists());
    }
}

#[test]
fn unknown_architecture() {
    let s = Scratch::new();
    let input = s.input("renamed.safetensors");
    let renamed: BTreeMap<String, RawTensor> =
        read_st(&golden("segresnetv2_w8.safetensors")).into_iter().map(|(n, t)| (format!("foo.{n}"), t)).collect();
    write_st(&input, &renamed);
    expect_failure(&s, &[&input], &[], &[path_str(&input), "unknown architecture", "foo.", "--arch"]);
}

/// A missing tensor is named: one the pruned graph reads, and a SegResNet encoder block (found
/// by counting blocks, so named, not only counted).
#[test]
fn missing_tensor_is_named() {
    for (name, needles) in [
        ("head2.cls_head.bias", &["missing 1 tensor(s)", "head2.cls_head.bias"][..]),
        ("backbone.down_layers.0.1.conv1.conv.weight", &["missing tensor backbone.down_layers.0.1.conv1.conv.weight"][..]),
    ] {
        let s = Scratch::new();
        let input = s.input("missing_one.safetensors");
        let mut t = read_st(&golden("segresnetv2_w8.safetensors"));
        assert!(t.remove(name).is_some());
        write_st(&input, &t);
        expect_failure(&s, &[&input], &[], &[&[path_str(&input)][..], needles].concat());
    }
}

#[test]
fn fp16_overflow_names_the_tensor() {
    let s = Scratch::new();
    let input = s.input("overflow.safetensors");
    let mut t = read_st(&golden("segresnetv2_w8.safetensors"));
    let w = t.get_mut("backbone.convInit.conv.weight").unwrap();
    assert_eq!(w.dtype, Dtype::F32);
    w.bytes[4..8].copy_from_slice(&1e6f32.to_le_bytes()); // flat index 1
    write_st(&input, &t);
    expect_failure(
        &s,
        &[&input],
        &[],
        &[path_str(&input), "backbone.convInit.conv.weight", "flat index 1", "overflows fp16"],
    );
}

#[test]
fn output_directory_does_not_exist() {
    let s = Scratch::new();
    let missing_dir = s.out_dir.join("no/such/dir");
    let out = missing_dir.join("weights.safetensors");
    let input = golden("segresnetv2_w8.ckpt");
    let o = fastdet(["convert", path_str(&input), "-o", path_str(&out)]);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: ") && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(path_str(&out)), "{stderr}");
    assert!(stderr.contains(&format!("output directory {} does not exist", missing_dir.display())), "{stderr}");
    assert!(!missing_dir.exists(), "the output directory was created");
    assert!(s.out_dir_entries().is_empty(), "{:?}", s.out_dir_entries());
}

#[test]
fn neither_zip_nor_safetensors() {
    let s = Scratch::new();
    let input = s.input("notes.ckpt");
    std::fs::write(&input, "these are not the weights you are looking for\n".repeat(100)).unwrap();
    expect_failure(&s, &[&input], &[], &[path_str(&input), "not a PyTorch checkpoint (zip) nor a safetensors file"]);
}

#[test]
fn forced_dynunet_on_a_segresnet_checkpoint() {
    let s = Scratch::new();
    let input = golden("segresnetv2_w8.ckpt");
    expect_failure(
        &s,
        &[&input],
        &["--arch", "dynunet"],
        &[path_str(&input), "missing", "dynunet", "backbone.input_block.conv1.conv.weight"],
    );
}

#[test]
fn several_inputs_without_average() {
    let s = Scratch::new();
    let a = golden("segresnetv2_w8.ckpt");
    let b = golden("segresnetv2_w8.safetensors");
    expect_failure(&s, &[&a, &b], &[], &["2 inputs given", "--average"]);
}

#[test]
fn average_of_different_widths() {
    let s = Scratch::new();
    let w8 = golden("segresnetv2_w8.ckpt");
    let w16 = golden("segresnetv2_w16.ckpt");
    expect_failure(
        &s,
        &[&w8, &w16],
        &["--average"],
        &[path_str(&w16), path_str(&w8), "cannot average", "init_filters 16", "init_filters 8"],
    );
}

// ---------------------------------------------------------------------------------------------
// Good inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn ckpt_state_dict_and_safetensors_convert_identically() {
    let s = Scratch::new();
    let mut converted = Vec::new();
    for input in ["segresnetv2_w8.ckpt", "segresnetv2_w8.state_dict.pt", "segresnetv2_w8.safetensors"] {
        let out = s.out(&format!("{input}.safetensors"));
        convert_ok(&[&golden(input)], &out, &[]);
        converted.push((input, read_st(&out)));
    }
    let (first_name, first) = &converted[0];
    assert!(!first.is_empty());
    assert!(first.values().all(|t| t.dtype == Dtype::F16));
    for (name, tensors) in &converted[1..] {
        assert_eq!(
            first.keys().collect::<Vec<_>>(),
            tensors.keys().collect::<Vec<_>>(),
            "{first_name} and {name} give different tensor names"
        );
        for (n, t) in first {
            assert!(tensors[n] == *t, "tensor {n} differs between {first_name} and {name}");
        }
    }
}

#[test]
fn converted_tensors_are_the_fp16_rounding_of_the_checkpoint() {
    let s = Scratch::new();
    for input in ["segresnetv2_w8.ckpt", "segresnetv2_w16.ckpt", "dynunet_w8.ckpt"] {
        let out = s.out(&format!("{input}.safetensors"));
        convert_ok(&[&golden(input)], &out, &[]);
        let ckpt = read_checkpoint(&golden(input)).unwrap();
        let converted = read_st(&out);
        assert!(!converted.is_empty());
        for (name, t) in &converted {
            // DynUNet outputs canonical names (backbone.input_block.* ...), which the checkpoint
            // also holds next to its backbone.skip_layers.* aliases.
            let p = ckpt.get(name).unwrap_or_else(|| panic!("{input}: output tensor {name} is not in the checkpoint"));
            assert_eq!(t.shape, p.shape, "{input}: {name}");
            let want: Vec<u16> = p.data.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
            assert!(f16_bits(t) == want, "{input}: {name} is not the fp16 rounding of the checkpoint");
        }
        if input.starts_with("dynunet") {
            assert!(converted.keys().any(|n| n.starts_with("backbone.input_block.")));
            assert!(!converted.keys().any(|n| n.starts_with("backbone.skip_layers.")));
        }
    }

    // Spot check against values read outside Rust. The first storage of the w8 checkpoint is
    // backbone.convInit.conv.weight; its first three f32 and their fp16 bits were printed with
    //   python3 -c "import zipfile, struct
    //   d = zipfile.ZipFile('tests/fixtures/golden/segresnetv2_w8.ckpt').read('segresnetv2_w8/data/0')
    //   x = struct.unpack('<3f', d[:12]); print(x)
    //   print([hex(struct.unpack('<H', struct.pack('<e', v))[0]) for v in x])"
    // -> (0.11897949129343033, 0.10071789473295212, 0.4304496645927429)
    // -> ['0x2f9d', '0x2e72', '0x36e3']
    let ckpt = read_checkpoint(&golden("segresnetv2_w8.ckpt")).unwrap();
    let w = ckpt.get("backbone.convInit.conv.weight").unwrap();
    assert_eq!(w.shape, [8, 1, 3, 3, 3]);
    assert_eq!(w.data[..3], [0.118_979_49_f32, 0.100_717_895, 0.430_449_66]);
    let converted = read_st(&s.out("segresnetv2_w8.ckpt.safetensors"));
    assert_eq!(f16_bits(&converted["backbone.convInit.conv.weight"])[..3], [0x2f9d, 0x2e72, 0x36e3]);
}

#[test]
fn inspect_reports_the_manifest_widths() {
    let s = Scratch::new();
    for case in manifest() {
        let name = case["name"].as_str().unwrap();
        let arch = case["arch"].as_str().unwrap();
        let ctor = &case["ctor"];
        let out = s.out(&format!("{name}.safetensors"));
        convert_ok(&[&golden(case["checkpoint"].as_str().unwrap())], &out, &[]);
        let j = inspect_json(&out);
        let w = &j["widths"];
        assert_eq!(j["arch"], arch, "{name}");
        assert_eq!(j["num_classes"], 6, "{name}");
        assert_eq!(w["cls_width"], ctor["mid"], "{name}: cls_width");
        assert_eq!(w["offset_width"], ctor["omid"], "{name}: offset_width");
        match arch {
            "segresnetv2" => {
                assert_eq!(w["init_filters"], ctor["init_filters"], "{name}: init_filters");
                assert!(w.get("filters").is_none(), "{name}: {w}");
            }
            "dynunet" => {
                assert_eq!(w["filters"], ctor["filters"], "{name}: filters");
                assert_eq!(w["deep_supervision_width"], ctor["out_channels"], "{name}: deep_supervision_width");
                assert!(w.get("init_filters").is_none(), "{name}: {w}");
            }
            other => panic!("{name}: unexpected arch {other}"),
        }
        let numel: usize = read_st(&out).values().map(|t| t.shape.iter().product::<usize>()).sum();
        assert_eq!(j["params"], numel, "{name}: params");
    }
}

#[test]
fn average_is_the_mean_and_one_model_twice_is_refused() {
    let s = Scratch::new();
    let input = golden("segresnetv2_w8.safetensors");
    let once = s.out("once.safetensors");
    let avg = s.out("avg.safetensors");
    convert_ok(&[&input], &once, &[]);
    // Another checkpoint of the same widths: every float value 1 higher. The mean is the first's
    // values plus 0.5, to fp16 rounding.
    let shifted_dir = tempfile::tempdir().unwrap();
    let shifted = shifted_dir.path().join("shifted.safetensors");
    let mut tensors = read_st(&input);
    for t in tensors.values_mut().filter(|t| t.dtype == Dtype::F32) {
        t.bytes = t.bytes.chunks_exact(4).flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) + 1.0).to_le_bytes()).collect();
    }
    write_st(&shifted, &tensors);
    let stdout = convert_ok(&[&input, &shifted], &avg, &["--average"]);
    assert!(stdout.contains("averaged 2 checkpoints"), "{stdout}");
    let (a, o) = (read_st(&avg), read_st(&once));
    assert_eq!(a.keys().collect::<Vec<_>>(), o.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        for (x, y) in f16_bits(t).into_iter().zip(f16_bits(&o[name])) {
            let (x, y) = (half::f16::from_bits(x).to_f32(), half::f16::from_bits(y).to_f32());
            // Both sides rounded to fp16 once: within two half-ulps of |y + 0.5|.
            assert!((x - (y + 0.5)).abs() <= (y.abs() + 0.5) * 2.0f32.powi(-10) + 1e-7, "{name}: {x} vs {y} + 0.5");
        }
    }
    // One model twice would weigh double: the same path, a copy, or its state dict beside the
    // Lightning checkpoint are refused.
    let ckpt = golden("segresnetv2_w8.ckpt");
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("copy.ckpt");
    std::fs::copy(&ckpt, &copy).unwrap();
    for (other, says) in [(ckpt.clone(), "given twice (as input 1 and 2)"), (copy, "holds the same weights as"), (golden("segresnetv2_w8.state_dict.pt"), "holds the same weights as")] {
        let fresh = Scratch::new();
        expect_failure(&fresh, &[&ckpt, &other], &["--average"], &[says]);
    }
}

#[test]
fn convert_reports_the_dropped_parameters() {
    let s = Scratch::new();
    for input in ["segresnetv2_w8.ckpt", "segresnetv2_w16.ckpt"] {
        let out = s.out(&format!("{input}.safetensors"));
        let stdout = convert_ok(&[&golden(input)], &out, &[]);
        let total: usize = read_checkpoint(&golden(input)).unwrap().params.iter().map(|p| p.numel()).sum();
        let kept: usize = read_st(&out).values().map(|t| t.shape.iter().product::<usize>()).sum();
        assert!(kept < total, "{input}: nothing was pruned");
        let expect = format!("dropped {} parameters", total - kept);
        assert!(stdout.contains(&expect), "{input}: stdout should say {expect:?}:\n{stdout}");
        assert!(stdout.contains(&format!("kept {} tensors ({kept} parameters", read_st(&out).len())), "{stdout}");
        assert!(stdout.contains(&format!("wrote {}", out.display())), "{stdout}");
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces, EMA copies, reproducible output
// ---------------------------------------------------------------------------------------------

/// The fixture's tensors under `prefix`, plus (when given) a second copy under `other`.
fn prefixed(prefix: &str, other: Option<(&str, bool)>) -> BTreeMap<String, RawTensor> {
    let base = read_st(&golden("segresnetv2_w8.safetensors"));
    let mut out: BTreeMap<String, RawTensor> = base.iter().map(|(n, t)| (format!("{prefix}{n}"), t.clone())).collect();
    if let Some((p, zeroed)) = other {
        for (n, t) in &base {
            let mut t = t.clone();
            if zeroed {
                t.bytes.iter_mut().for_each(|b| *b = 0);
            }
            out.insert(format!("{p}{n}"), t);
        }
    }
    out
}

/// Wrapper prefixes (`module.`, `model.`) are stripped: the same weights as the plain names.
/// A checkpoint holding an EMA copy beside zeroed trained weights converts the trained ones by
/// default with two warnings (the EMA copy exists; the tensors are all zeros), and the EMA copy
/// with --ema. The output is byte-for-byte the same at every conversion, and never written over
/// an input.
#[test]
fn wrapper_prefixes_ema_copies_and_reproducible_bytes() {
    let s = Scratch::new();
    let plain = s.out("plain.safetensors");
    convert_ok(&[&golden("segresnetv2_w8.safetensors")], &plain, &["--name", "w8"]);
    let want = read_st(&plain);
    let again = s.out("again.safetensors");
    convert_ok(&[&golden("segresnetv2_w8.safetensors")], &again, &["--name", "w8"]);
    assert_eq!(std::fs::read(&plain).unwrap(), std::fs::read(&again).unwrap(), "two conversions, different bytes");

    for prefix in ["module.", "model.", "model.module."] {
        let input = s.input(&format!("{prefix}safetensors"));
        write_st(&input, &prefixed(prefix, None));
        let out = s.out(&format!("{prefix}out.safetensors"));
        convert_ok(&[&input], &out, &[]);
        assert_eq!(read_st(&out), want, "{prefix}");
    }

    let input = s.input("ema.safetensors");
    write_st(&input, &prefixed("model_ema.module.", Some(("", true))));
    let out = s.out("trained.safetensors");
    let o = fastdet(["convert", path_str(&input), "-o", path_str(&out)]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("also holds EMA weights (model_ema.module.backbone.*)") && err.contains("--ema") && err.contains("are all zeros"), "{err}");
    let out = s.out("ema_out.safetensors");
    convert_ok(&[&input], &out, &["--ema"]);
    assert_eq!(read_st(&out), want);

    // An `ema.` prefix sorts before `head2.`: the heads must still come from the chosen set.
    let input2 = s.input("ema2.safetensors");
    write_st(&input2, &prefixed("ema.", Some(("", true))));
    let out = s.out("ema2_out.safetensors");
    convert_ok(&[&input2], &out, &["--ema"]);
    assert_eq!(read_st(&out), want);

    // DynUNet (whose aliased tensors are merged by name): the EMA copy alone, heads included.
    let ckpt = read_checkpoint(&golden("dynunet_w8.ckpt")).unwrap();
    let f32_tensor = |data: &[f32], shape: &[usize]| RawTensor { dtype: Dtype::F32, shape: shape.to_vec(), bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let mut both = BTreeMap::new();
    for p in &ckpt.params {
        both.insert(format!("model_ema.module.{}", p.name), f32_tensor(&p.data, &p.shape));
        both.insert(p.name.clone(), f32_tensor(&vec![0.0; p.data.len()], &p.shape));
    }
    let dyn_input = s.input("dyn_ema.safetensors");
    write_st(&dyn_input, &both);
    let (dyn_want, dyn_got) = (s.out("dyn_plain.safetensors"), s.out("dyn_ema.safetensors"));
    convert_ok(&[&golden("dynunet_w8.ckpt")], &dyn_want, &[]);
    convert_ok(&[&dyn_input], &dyn_got, &["--ema"]);
    assert_eq!(read_st(&dyn_got), read_st(&dyn_want));

    // Onto its own input: refused, the input left as it was.
    let before = std::fs::read(&input).unwrap();
    let o = fastdet(["convert", path_str(&input), "-o", path_str(&input)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("is also an input"), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

/// A head of three classes is not given the CZII names: class0..class2, said when converting;
/// `inspect` takes the weights, `run` refuses them.
#[test]
fn other_class_counts_are_not_given_czii_names() {
    let s = Scratch::new();
    let input = s.input("three.safetensors");
    let mut t = read_st(&golden("segresnetv2_w8.safetensors"));
    for (name, keep) in [("head2.cls_head.weight", 3 * 16 * 4), ("head2.cls_head.bias", 3 * 4)] {
        let w = t.get_mut(name).unwrap();
        w.bytes.truncate(keep);
        w.shape[0] = 3;
    }
    write_st(&input, &t);
    let out = s.out("three.fastdet.safetensors");
    let o = fastdet(["convert", path_str(&input), "-o", path_str(&out)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("the head predicts 3 classes, not the six CZII particles: named class0..class2"), "{}", text(&o.stderr));
    let j = inspect_json(&out);
    assert_eq!((j["num_classes"].as_u64(), j["classes"].clone()), (Some(3), serde_json::json!(["class0", "class1", "class2"])));
    // forward gives three score maps.
    let (tile, maps) = (s.input("tile.safetensors"), s.out("maps.safetensors"));
    fastdet::io::tensors::write_f32(&tile, &[("input", vec![1, 1, 16, 16, 16], &[0.5f32; 16 * 16 * 16][..])], None).unwrap();
    let o = fastdet(["forward", "--weights", path_str(&out), "--input", path_str(&tile), "--output", path_str(&maps)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (shape, scores) = fastdet::io::tensors::read_f32(&maps, "scores").unwrap();
    assert_eq!(shape, vec![1, 3, 8, 8, 8]);
    assert!(scores.iter().all(|v| (0.0..=1.0).contains(v)));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("tests/fixtures/dataset");
    let o = fastdet(["run", "--data", path_str(&data), "--weights", path_str(&out), "--out", path_str(&s.out("picks.csv"))]);
    assert!(!o.status.success() && text(&o.stderr).contains("are not the six CZII classes this pipeline scores"), "{}", text(&o.stderr));
    assert!(!s.out("picks.csv").exists());
}
