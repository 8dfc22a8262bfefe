//! The CPU engine against PyTorch + MONAI float64 goldens (made with fp16-rounded weights), and the
//! converter against every fixture checkpoint.

use fastdet::checkpoint::read_checkpoint;
use fastdet::convert::{convert, ConvertOptions};
use fastdet::engine::{cpu::CpuEngine, TileEngine};
use fastdet::io::tensors::read_f32;
use fastdet::weights::Weights;
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

fn manifest() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(golden_dir().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn convert_to(dir: &Path, input: &Path) -> Weights {
    let out = dir.join(format!("{}.safetensors", input.file_stem().unwrap().to_string_lossy()));
    convert(&[input.to_path_buf()], &out, &ConvertOptions::default()).unwrap();
    Weights::load(&out).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn cpu_engine_matches_goldens() {
    let tmp = tempfile::tempdir().unwrap();
    for case in manifest() {
        let name = case["name"].as_str().unwrap();
        let w = convert_to(tmp.path(), &golden_dir().join(case["checkpoint"].as_str().unwrap()));
        let g = golden_dir().join(case["golden"].as_str().unwrap());
        let (shape, input) = read_f32(&g, "input").unwrap();
        let expect_shape: Vec<usize> = case["input_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(shape, expect_shape);
        let mut e = CpuEngine::new(&w).unwrap();
        let out = e.forward(&input, shape[0], [shape[2], shape[3], shape[4]], true).unwrap();
        let (_, scores) = read_f32(&g, "scores_f16w").unwrap();
        let (_, offsets) = read_f32(&g, "offsets_f16w").unwrap();
        let (_, fm2) = read_f32(&g, "fm2").unwrap();
        let ds = max_abs_diff(&out.scores, &scores);
        let dof = max_abs_diff(&out.offsets, &offsets);
        println!("{name}: fp16 weights: max|Δ| scores {ds:.2e} offsets {dof:.2e}");
        assert!(ds <= 1e-4, "{name}: scores max |Δ| {ds}");
        assert!(dof <= 2e-4, "{name}: offsets max |Δ| {dof}");

        // `fm2`, `scores` and `offsets` of the golden also exist for the unrounded fp32 weights:
        // run the engine on the checkpoint's own f32 values.
        let ckpt = read_checkpoint(&golden_dir().join(case["checkpoint"].as_str().unwrap())).unwrap();
        let pruned = fastdet::convert::prune(&ckpt, None).unwrap();
        let params = pruned.tensors.into_iter().map(|p| (p.name, p.data)).collect();
        let mut e32 = CpuEngine::from_f32_params(&pruned.spec, params, name).unwrap();
        let out32 = e32.forward(&input, shape[0], [shape[2], shape[3], shape[4]], true).unwrap();
        let (_, scores32) = read_f32(&g, "scores").unwrap();
        let (_, offsets32) = read_f32(&g, "offsets").unwrap();
        let dfm = max_abs_diff(out32.fm2.as_ref().unwrap(), &fm2);
        let ds32 = max_abs_diff(&out32.scores, &scores32);
        let do32 = max_abs_diff(&out32.offsets, &offsets32);
        println!("{name}: fp32 weights: max|Δ| scores {ds32:.2e} offsets {do32:.2e} fm2 {dfm:.2e}");
        assert!(dfm <= 2e-4, "{name}: fm2 max |Δ| {dfm}");
        assert!(ds32 <= 1e-4, "{name}: fp32 scores max |Δ| {ds32}");
        assert!(do32 <= 2e-4, "{name}: fp32 offsets max |Δ| {do32}");
    }
}
