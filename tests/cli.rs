//! The command line: help, forward, batching, single-zarr input and copick output.

use fastdet::engine::{cpu::CpuEngine, TileEngine};
use fastdet::io::tensors::{read_f32, write_f32};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn fastdet() -> Command {
    common::fastdet_on_cpu()
}

#[test]
fn help_lists_every_subcommand() {
    let o = fastdet().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    for cmd in ["convert", "inspect", "forward", "run", "score", "tune", "selftest", "bench"] {
        assert!(text.lines().any(|l| l.trim_start().starts_with(cmd)), "{cmd} missing from:\n{text}");
    }
}

/// Output into a pipe whose reader has gone (`fastdet inspect --graph | head -1`) ends the
/// process quietly, as for other command-line tools: no panic, no exit status 101.
#[cfg(unix)]
#[test]
fn a_closed_pipe_is_not_a_panic() {
    let mut child = fastdet()
        .args(["inspect", "--graph"])
        .arg(root().join("weights/demo_dynunet.safetensors"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && o.status.code() != Some(101), "{:?}: {err}", o.status);
}

/// `--version` names the commit the binary was built from (its logs travel without the checkout):
/// the checkout's HEAD when built in one, with "-dirty" when what is compiled in differed from it
/// at the build (which the tree, edited since, no longer tells).
#[test]
fn version_names_the_commit() {
    let o = fastdet().arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("fastdet {} (commit {})\n", env!("CARGO_PKG_VERSION"), fastdet::COMMIT));
    match Command::new("git").arg("-C").arg(root()).args(["rev-parse", "--short=7", "HEAD"]).output() {
        Ok(h) if h.status.success() => {
            let head = String::from_utf8_lossy(&h.stdout).trim().to_string();
            assert!(fastdet::COMMIT == head || fastdet::COMMIT == format!("{head}-dirty"), "{} is not HEAD {head}", fastdet::COMMIT);
        }
        _ => println!("SKIP version_names_the_commit's HEAD check: not a git checkout"),
    }
}

/// `bench --json` times the seed architectures: one entry per model, FLOPs equal to `inspect`'s for
/// that tile, positive times; a weights file is timed too; `--tomogram` times the pipeline; a tile
/// the network cannot take is refused.
#[test]
fn bench_reports_time_and_flops_per_tile() {
    let o = fastdet().args(["bench", "--device", "cpu", "--tile", "32,32,32", "--iters", "2", "--warmup", "0", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let models = j["models"].as_array().unwrap();
    assert_eq!(models.iter().map(|m| m["model"].as_str().unwrap()).collect::<Vec<_>>(), ["segresnetv2", "dynunet"]);
    for m in models {
        assert_eq!(m["times_ms"].as_array().unwrap().len(), 2);
        assert!(m["ms_per_tile"].as_f64().unwrap() > 0.0);
        assert!(m["ms_per_tile_min"].as_f64().unwrap() <= m["ms_per_tile"].as_f64().unwrap());
    }
    assert_eq!(j["tile"], serde_json::json!([32, 32, 32]));
    // `inspect --arch` shows the same seed networks without a file: the bench's FLOPs, and the
    // parameters of the weights the bench made for them.
    for (m, arch) in models.iter().zip([fastdet::model::spec::Arch::Segresnetv2, fastdet::model::spec::Arch::Dynunet]) {
        let name = m["model"].as_str().unwrap();
        let o = fastdet().args(["inspect", "--json", "--tile", "32,32,32", "--arch", name]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!((info["flops"].as_f64().unwrap() * 1e-9 - m["gflop_per_tile"].as_f64().unwrap()).abs() < 1e-9, "{name}: {info}");
        let params = fastdet::weights::Weights::random(&fastdet::model::spec::ModelSpec::seed(arch), 1).param_count();
        assert_eq!(info["params"].as_u64().unwrap() as usize, params, "{name}");
        assert_eq!((info["name"].as_str().unwrap(), info["classes"].as_array().unwrap().len()), (format!("seed-{name}").as_str(), 6));
    }

    let w = root().join("weights/demo_dynunet.safetensors");
    let info = fastdet().args(["inspect", "--json", "--tile", "32,32,32"]).arg(&w).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let o = fastdet().args(["bench", "--tile", "32,32,32", "--iters", "1", "--json", "--weights"]).arg(&w).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let gflop = j["models"][0]["gflop_per_tile"].as_f64().unwrap();
    let want = info["flops"].as_f64().unwrap() * 1e-9;
    assert!((gflop - want).abs() <= 1e-3 * want, "{gflop} vs inspect {want}");
    // A profiled walk of the CUDA engine (emulated) fuses SegResNetV2's upsample and skip add
    // into one step and the head's last norms into the 1x1x1 convs' loads: its steps' least
    // traffic is below inspect's op-by-op figure, but not by half.
    let seg = root().join("weights/demo_segresnetv2.safetensors");
    let o = fastdet().args(["inspect", "--json", "--tile", "32,32,32"]).arg(&seg).output().unwrap();
    let op_by_op = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["min_traffic_bytes_op_by_op"].as_f64().unwrap() * 1e-9;
    let o = fastdet().args(["bench", "--device", "emu", "--tile", "32,32,32", "--iters", "1", "--warmup", "0", "--profile", "--json", "--weights"]).arg(&seg).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let steps: f64 = j["models"][0]["profile"]["steps"].as_array().unwrap().iter().map(|s| s["min_gbytes"].as_f64().unwrap()).sum();
    assert!(steps < 0.99 * op_by_op && steps > 0.5 * op_by_op, "profile steps {steps} GB vs op by op {op_by_op} GB");

    // Per tomogram: the pipeline's FLOPs are tiles x the per-tile FLOPs of the ensemble.
    let o = fastdet()
        .args(["bench", "--tomogram", "32,48,48", "--window", "32,32,32", "--tiles", "1,2,2", "--models", "1,0", "--iters", "1", "--warmup", "0", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let per_tile = fastdet().args(["bench", "--arch", "segresnetv2", "--tile", "32,32,32", "--iters", "1", "--warmup", "0", "--json"]).output().unwrap();
    let per_tile: serde_json::Value = serde_json::from_slice(&per_tile.stdout).unwrap();
    let want = 4.0 * per_tile["models"][0]["gflop_per_tile"].as_f64().unwrap() * 1e9;
    assert!((t["flops_per_tomogram"].as_f64().unwrap() - want).abs() <= 1e-6 * want);
    let total = t["s_per_tomogram"].as_f64().unwrap();
    assert!(total > 0.0 && t["infer_s"].as_f64().unwrap() <= total);
    assert!(t["detections"].is_u64() && t["cold_start_s"].as_f64().unwrap() > 0.0);
    // Random weights are generated outside the open and cold-start times (a user's come from files).
    assert!(t["random_weights_s"].as_f64().unwrap() > 0.0 && t["open_s"].as_f64().unwrap() >= 0.0);
    assert!(per_tile["random_weights_s"].as_f64().unwrap() > 0.0 && per_tile["cold_start_s"].as_f64().unwrap() > 0.0);

    let o = fastdet().args(["bench", "--arch", "segresnetv2", "--tile", "12,32,24", "--iters", "1"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiple of 8"));

    // Options that would be ignored are refused: weights with the seed ensemble's options, an
    // ensemble or window without --tomogram / --plan-memory.
    for args in [&["--weights", "w.safetensors", "--tomogram", "32,64,64"][..], &["--weights", "w.safetensors", "--arch", "dynunet"], &["--models", "1,1"], &["--window", "32,32,32"]] {
        let o = fastdet().arg("bench").args(args).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && (e.contains("cannot be used with") || e.contains("required arguments were not provided")), "{args:?}: {e}");
    }
}

/// `bench --plan-memory` needs no GPU: one worker's ensemble shares one activation arena, so two
/// models hold their weights and outputs twice but the arena once; a larger batch takes a larger
/// arena.
#[test]
fn bench_plans_device_memory_without_a_gpu() {
    let plan_env = |models: &str, batch: &str, extra: &[&str], env: &[(&str, &str)]| -> serde_json::Value {
        let o = fastdet().envs(env.iter().copied()).args(["bench", "--plan-memory", "--tile", "32,64,64", "--models", models, "--batch", batch, "--json"]).args(extra).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let plan_with = |models: &str, batch: &str, extra: &[&str]| plan_env(models, batch, extra, &[]);
    let plan = |models: &str, batch: &str| plan_with(models, batch, &[]);
    let one = plan("1,0", "1");
    let two = plan("2,0", "1");
    let sum = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).sum::<u64>();
    let arena = one["arena_bytes"].as_u64().unwrap();
    assert!(arena > 0);
    assert_eq!(two["arena_bytes"].as_u64().unwrap(), arena, "the second model shares the arena");
    assert_eq!(two["held_bytes"].as_u64().unwrap(), arena + sum(&two["weights_bytes"]) + sum(&two["outputs_bytes"]));
    assert_eq!(sum(&two["weights_bytes"]), 2 * sum(&one["weights_bytes"]));
    let batch2 = plan("1,0", "2");
    assert!(batch2["arena_bytes"].as_u64().unwrap() > arena);
    assert_eq!(sum(&batch2["outputs_bytes"]), 2 * sum(&one["outputs_bytes"]));
    // A tomogram blended on the device adds its buffers (at least its f32 volume) to what is
    // held; blended on the host it adds nothing.
    assert_eq!(one["tomogram_bytes"], 0);
    let tomo = plan_with("1,0", "1", &["--tomogram", "40,100,90"]);
    let t = tomo["tomogram_bytes"].as_u64().unwrap();
    assert!(t >= 40 * 100 * 90 * 4, "{tomo}");
    // The next tomogram's volume (fp16) is on the device too while this one is computed, unless
    // volumes go up only in their turn.
    assert_eq!(tomo["next_volume_bytes"], 40 * 100 * 90 * 2);
    assert_eq!(tomo["held_bytes"].as_u64().unwrap(), one["held_bytes"].as_u64().unwrap() + t + 40 * 100 * 90 * 2);
    let in_turn = plan_env("1,0", "1", &["--tomogram", "40,100,90"], &[("FASTDET_OVERLAP_UPLOAD", "0")]);
    assert_eq!((in_turn["next_volume_bytes"].as_u64(), in_turn["tomogram_bytes"].as_u64()), (Some(0), Some(t)));
    let host = plan_with("1,0", "1", &["--tomogram", "40,100,90", "--host-blend"]);
    assert_eq!((host["tomogram_bytes"].as_u64(), host["next_volume_bytes"].as_u64()), (Some(0), Some(0)));
}

/// `selftest --device cpu` checks the SIMD kernels and the networks on them and says so in JSON.
#[test]
fn cpu_selftest_passes_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let j = tmp.path().join("cpu.json");
    let o = fastdet().args(["selftest", "--device", "cpu", "--quick", "--json"]).arg(&j).output().unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("selftest PASSED"));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    assert_eq!(r["passed"], true);
    let rows = r["rows"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["section"] == "network" && r["status"] == "PASS") || rows.iter().any(|r| r["section"] == "network" && r["status"] == "SKIP"));
    assert!(rows.iter().filter(|r| r["section"] == "conv" && r["status"] == "PASS").count() >= 10);

    // Its sections can be left out, and they are: no conv rows with --no-kernels, none at all
    // with --no-networks too.
    let o = fastdet().args(["selftest", "--device", "cpu", "--quick", "--no-kernels", "--json"]).arg(&j).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    let rows = r["rows"].as_array().unwrap();
    assert!(!rows.is_empty() && rows.iter().all(|r| r["section"] == "network"), "{rows:?}");
    // Everything left out: nothing checked is not a pass (exit status 2, as without a GPU).
    let o = fastdet().args(["selftest", "--device", "cpu", "--no-kernels", "--no-networks", "--no-pipeline", "--json"]).arg(&j).output().unwrap();
    assert!(o.status.code() == Some(2) && String::from_utf8_lossy(&o.stdout).contains("nothing was tested"), "{}", String::from_utf8_lossy(&o.stdout));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    assert_eq!(r["rows"].as_array().unwrap().len(), 0);
    // A tile the networks cannot take, and a report that could not be written, are refused
    // before any check runs.
    let o = fastdet().args(["selftest", "--device", "cpu", "--tile", "0,0,0"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--tile"));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("PASS"));
    let o = fastdet().args(["selftest", "--device", "cpu", "--json", "/nonexistent/dir/x.json"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("/nonexistent/dir"));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("PASS"));
}

/// `forward` on the w8 golden's input reproduces the golden scores; a tile the network cannot take
/// is refused with the rule it breaks.
#[test]
fn forward_matches_golden_and_refuses_bad_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("w8.safetensors");
    assert!(fastdet().arg("convert").arg(root().join("tests/fixtures/golden/segresnetv2_w8.ckpt")).arg("-o").arg(&w).status().unwrap().success());
    let golden = root().join("tests/fixtures/golden/segresnetv2_w8.golden.safetensors");
    let out = tmp.path().join("out.safetensors");
    let st = fastdet().args(["forward", "--features", "--weights"]).arg(&w).arg("--input").arg(&golden).arg("--output").arg(&out).status().unwrap();
    assert!(st.success());
    let (shape, got) = read_f32(&out, "scores").unwrap();
    let (_, want) = read_f32(&golden, "scores_f16w").unwrap();
    assert_eq!(shape, vec![1, 6, 8, 16, 12]);
    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(d <= 1e-4, "{d}");
    assert_eq!(read_f32(&out, "fm2").unwrap().0, vec![1, 16, 8, 16, 12]);

    // The CUDA engine (here on its host emulator: fp16 activations) gives the golden scores to
    // the self-test's fp16 tolerances for whole networks (max |Δ| 5e-2, ‖Δ‖/‖ref‖ 2e-2), through
    // the same command; not bit-equal, so it did run in fp16.
    let out_emu = tmp.path().join("out-emu.safetensors");
    let o = fastdet().args(["forward", "--device", "emu", "--weights"]).arg(&w).arg("--input").arg(&golden).arg("--output").arg(&out_emu).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (shape_emu, got_emu) = read_f32(&out_emu, "scores").unwrap();
    assert_eq!(shape_emu, shape);
    let d = got_emu.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let rel = norm(&mut got_emu.iter().zip(&want).map(|(a, b)| a - b)) / norm(&mut want.iter().copied());
    assert!(d > 0.0 && d <= 5e-2 && rel <= 2e-2, "fp16 engine vs f32 golden: max |Δ| {d}, ‖Δ‖/‖ref‖ {rel}");

    let bad = tmp.path().join("bad.safetensors");
    let data = vec![0.5f32; 12 * 32 * 24];
    write_f32(&bad, &[("input", vec![1, 1, 12, 32, 24], &data)], None).unwrap();
    let o = fastdet().args(["forward", "--weights"]).arg(&w).arg("--input").arg(&bad).arg("--output").arg(tmp.path().join("o2.safetensors")).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("multiple of 8"), "{err}");
    assert!(!tmp.path().join("o2.safetensors").exists());

    // Non-finite input values are named, not passed through as NaN maps.
    let mut data = vec![0.5f32; 16 * 32 * 24];
    data[7] = f32::NAN;
    write_f32(&bad, &[("input", vec![1, 1, 16, 32, 24], &data)], None).unwrap();
    let o = fastdet().args(["forward", "--weights"]).arg(&w).arg("--input").arg(&bad).arg("--output").arg(tmp.path().join("o2.safetensors")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bad.safetensors: 1 of 12288 input values are NaN or infinite"), "{err}");
    assert!(!tmp.path().join("o2.safetensors").exists());
    // The output may replace neither the weights nor the input (a copy of the fixture here).
    let input = tmp.path().join("input.safetensors");
    std::fs::copy(&golden, &input).unwrap();
    let (w_before, in_before) = (std::fs::read(&w).unwrap(), std::fs::read(&input).unwrap());
    for over in [&w, &input] {
        let o = fastdet().args(["forward", "--weights"]).arg(&w).arg("--input").arg(&input).arg("--output").arg(over).output().unwrap();
        assert!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("is also an input"), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(std::fs::read(&w).unwrap() == w_before && std::fs::read(&input).unwrap() == in_before);

    // inspect refuses a tile the network cannot take rather than counting its FLOPs.
    let o = fastdet().args(["inspect", "--tile", "0,0,0"]).arg(&w).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--tile"));
    // --json --graph carries the op list, one line an op; --json alone does not.
    let j = |extra: &[&str]| -> serde_json::Value { serde_json::from_slice(&fastdet().args(["inspect", "--json"]).args(extra).arg(&w).output().unwrap().stdout).unwrap() };
    let with = j(&["--graph"]);
    let lines = with["graph"].as_array().unwrap();
    assert!(lines.len() >= with["ops"].as_u64().unwrap() as usize && lines.iter().any(|l| l.as_str().unwrap().contains("conv3x3x3")), "{with}");
    assert!(j(&[])["graph"].is_null());
}

/// A batch of tiles in one call equals the tiles one at a time.
#[test]
fn batched_forward_equals_single_tiles() {
    let w = fastdet::weights::Weights::load(&root().join("weights/demo_dynunet.safetensors")).unwrap();
    let mut e = CpuEngine::new(&w).unwrap();
    let tile = [32, 32, 64];
    let n: usize = tile.iter().product();
    let mut input = vec![0.0f32; 2 * n];
    fastdet::util::SplitMix64::new(7).fill_uniform(&mut input, 0.0, 1.0);
    let both = e.forward(&input, 2, tile, false).unwrap();
    let a = e.forward(&input[..n], 1, tile, false).unwrap();
    let b = e.forward(&input[n..], 1, tile, false).unwrap();
    let single: Vec<f32> = a.scores.iter().chain(&b.scores).copied().collect();
    assert_eq!(both.scores, single);
    let single: Vec<f32> = a.offsets.iter().chain(&b.offsets).copied().collect();
    assert_eq!(both.offsets, single);
}

/// `--zarr` on one tomogram gives that run's picks of a dataset run; copick JSON carries them.
#[test]
fn single_zarr_input_and_copick_output() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = root().join("weights/demo_segresnetv2.safetensors");
    let common = ["--window", "64,96,96", "--tiles", "1,2,2", "--with-score"];
    let a = tmp.path().join("a.csv");
    let st = fastdet()
        .args(["run", "--runs", "TS_synth_1", "--data"])
        .arg(root().join("tests/fixtures/dataset"))
        .arg("--weights")
        .arg(&weights)
        .args(common)
        .arg("--out")
        .arg(&a)
        .arg("--copick-out")
        .arg(tmp.path().join("copick"))
        .status()
        .unwrap();
    assert!(st.success());
    let zarr = root().join("tests/fixtures/dataset/test/static/ExperimentRuns/TS_synth_1/VoxelSpacing10.000/denoised.zarr");
    let b = tmp.path().join("b.csv");
    // Into the same copick folder: the same picks, so nothing is said to be replaced.
    let o = fastdet().args(["run", "--zarr"]).arg(&zarr).arg("--weights").arg(&weights).args(common).arg("--out").arg(&b).arg("--copick-out").arg(tmp.path().join("copick")).output().unwrap();
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("replaced"), "{}", String::from_utf8_lossy(&o.stderr));
    // Whole rows: in the competition layout the run is named after its folder, as with --data.
    let rows = |p: &Path| -> Vec<String> { std::fs::read_to_string(p).unwrap().lines().skip(1).map(String::from).collect() };
    let (ra, rb) = (rows(&a), rows(&b));
    assert!(!ra.is_empty());
    assert_eq!(ra, rb);
    let picks = fastdet::io::copick::read_run_picks(&tmp.path().join("copick/ExperimentRuns/TS_synth_1/Picks"), "TS_synth_1").unwrap();
    assert_eq!(picks.len(), ra.len());
    // Its level-0 array given directly: the same picks, the run named after the group.
    let c = tmp.path().join("c.csv");
    let st = fastdet().args(["run", "--zarr"]).arg(zarr.join("0")).arg("--weights").arg(&weights).args(common).arg("--out").arg(&c).status().unwrap();
    assert!(st.success());
    assert_eq!(rows(&c), rb);
    // Given as `.` from inside the store: named the same.
    let st = fastdet().current_dir(&zarr).args(["run", "--zarr", ".", "--weights"]).arg(&weights).args(common).arg("--out").arg(&c).status().unwrap();
    assert!(st.success());
    assert_eq!(rows(&c), rb);
    // Elsewhere the run is named after the store (`tomo.ome.zarr` too: OME-NGFF's naming).
    let elsewhere = tmp.path().join("tomo.ome.zarr");
    common::copy_dir(&zarr, &elsewhere);
    let d = tmp.path().join("d.csv");
    let st = fastdet().args(["run", "--zarr"]).arg(elsewhere.join("0")).arg("--weights").arg(&weights).args(common).arg("--out").arg(&d).status().unwrap();
    assert!(st.success());
    let named_tomo: Vec<String> = rb.iter().map(|l| l.replace(",TS_synth_1,", ",tomo,")).collect();
    assert_eq!(rows(&d), named_tomo);
    // Other picks into the same copick folder replace the earlier job's files, and that is said.
    let o = fastdet().args(["run", "--zarr"]).arg(&zarr).arg("--weights").arg(&weights).args(common).args(["--thresholds", "0.9,0.9,0.9,0.9,0.9,0.9", "--out"]).arg(&d).arg("--copick-out").arg(tmp.path().join("copick")).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && e.contains("note: replaced ") && e.contains("copick picks file(s) of user fastdet session 0 in"), "{e}");
    // Levels named `s0`, `s1`... (as some writers name them) too.
    std::fs::rename(elsewhere.join("0"), elsewhere.join("s0")).unwrap();
    let st = fastdet().args(["run", "--zarr"]).arg(elsewhere.join("s0")).arg("--weights").arg(&weights).args(common).arg("--out").arg(&d).status().unwrap();
    assert!(st.success());
    assert_eq!(rows(&d), named_tomo);
}

/// Ensemble members must agree on their classes.
#[test]
fn ensemble_of_mismatched_models_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A copy of the demo weights whose metadata claims other classes.
    let src = root().join("weights/demo_segresnetv2.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().replace("apo-ferritin", "apo-ferritiN");
    assert_eq!(header.len(), n);
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    let other = tmp.path().join("other.safetensors");
    std::fs::write(&other, out).unwrap();
    let run = |weights: &[&Path]| {
        fastdet()
            .args(["run", "--data"])
            .arg(root().join("tests/fixtures/dataset"))
            .arg("--weights")
            .args(weights)
            .arg("--out")
            .arg(tmp.path().join("s.csv"))
            .output()
            .unwrap()
    };
    let o = run(&[&src, &other]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("other.safetensors") && err.contains("does not fit the ensemble"), "{err}");
    // Refused from the headers, before the job starts.
    assert!(!err.contains("model(s) on"), "{err}");
    assert!(!tmp.path().join("s.csv").exists());
    // Alone, the renamed classes are not the pipeline's.
    let o = run(&[&other]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("other.safetensors") && err.contains("not the six CZII classes"), "{err}");
    assert!(!err.contains("model(s) on"), "{err}");
    assert!(!tmp.path().join("s.csv").exists());
    // One model twice (by one name, through a link, as a copy) would weigh double: refused.
    let dynunet = root().join("weights/demo_dynunet.safetensors");
    let link = tmp.path().join("link.safetensors");
    std::os::unix::fs::symlink(&dynunet, &link).unwrap();
    let copy = tmp.path().join("copy.safetensors");
    std::fs::copy(&dynunet, &copy).unwrap();
    // One checkpoint converted twice under other names: other bytes, the same tensors.
    let renamed = tmp.path().join("renamed.safetensors");
    let o = fastdet().args(["convert", "--name", "fold1"]).arg(root().join("tests/fixtures/golden/segresnetv2_w8.ckpt")).arg("-o").arg(&renamed).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fold0 = tmp.path().join("fold0.safetensors");
    let o = fastdet().args(["convert", "--name", "fold0"]).arg(root().join("tests/fixtures/golden/segresnetv2_w8.ckpt")).arg("-o").arg(&fold0).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(std::fs::read(&renamed).unwrap(), std::fs::read(&fold0).unwrap());
    let o = run(&[&fold0, &renamed]);
    assert!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("renamed.safetensors: the same tensors as"), "{}", String::from_utf8_lossy(&o.stderr));
    for (twice, says) in [(&dynunet, "given twice to --weights (as model 2 and 3)"), (&link, "given twice to --weights (as model 2 and 3)"), (&copy, "the same tensors as")] {
        let o = run(&[&src, &dynunet, twice]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.code() == Some(1) && err.contains(says) && err.contains("weigh it double") && !err.contains("model(s) on"), "{err}");
        assert!(!tmp.path().join("s.csv").exists());
    }
}

/// `--tomogram` reads another tomogram type of the competition layout; a type the runs lack is
/// an error naming the ones they have.
#[test]
fn tomogram_type_is_chosen_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::copy_dir(&root().join("tests/fixtures/dataset"), &data);
    let weights = root().join("weights/demo_segresnetv2.safetensors");
    let run = |extra: &[&str], out: &Path| {
        fastdet()
            .args(["run", "--runs", "TS_synth_1", "--window", "64,96,96", "--tiles", "1,2,2", "--data"])
            .arg(&data)
            .arg("--weights")
            .arg(&weights)
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let a = tmp.path().join("a.csv");
    assert!(run(&[], &a).status.success());
    let spacing = data.join("test/static/ExperimentRuns/TS_synth_1/VoxelSpacing10.000");
    std::fs::rename(spacing.join("denoised.zarr"), spacing.join("wbp.zarr")).unwrap();
    let b = tmp.path().join("b.csv");
    let o = run(&[], &b);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("it has: wbp; choose one with --tomogram"), "{e}");
    let o = run(&["--tomogram", "wbp"], &b);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // The printed configuration names it, and reads back.
    let text = String::from_utf8(run(&["--tomogram", "wbp", "--print-config"], &b).stdout).unwrap();
    assert!(text.contains("tomogram = \"wbp\""), "{text}");
}

/// `score --per-run`: each run of the sample scored on its own, as `--runs RUN` scores it when
/// the run has every weighted class, and the table beside the whole's.
#[test]
fn score_per_run_matches_runs_scored_alone() {
    let score = |extra: &[&str]| {
        let o = fastdet()
            .args(["score", "--split", "test", "--truth"])
            .arg(root().join("tests/fixtures/dataset"))
            .arg(root().join("tests/fixtures/pipeline/expected_submission.csv"))
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(&score(&["--json", "--per-run"])).unwrap();
    let rows = v["per_run"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["run"].as_str().unwrap()).collect::<Vec<_>>(), ["TS_synth_1", "TS_synth_2"]);
    let total = |k: &str| v["per_class"].as_array().unwrap().iter().map(|c| c[k].as_i64().unwrap()).sum::<i64>();
    for k in ["tp", "fp", "fn"] {
        assert_eq!(rows.iter().map(|r| r[k].as_i64().unwrap()).sum::<i64>(), total(k), "{k}");
    }
    for r in rows {
        let run = r["run"].as_str().unwrap();
        let alone: serde_json::Value = serde_json::from_str(&score(&["--json", "--runs", run])).unwrap();
        // Every weighted class is annotated in each run of the sample: the same F-beta.
        assert!(alone["per_class"].as_array().unwrap().iter().all(|c| c["weight"].as_f64() == Some(0.0) || c["tp"].as_u64().unwrap() + c["fn"].as_u64().unwrap() > 0));
        assert!((r["fbeta"].as_f64().unwrap() - alone["fbeta"].as_f64().unwrap()).abs() < 1e-12, "{run}");
    }
    assert!(v["per_run"].is_array() && serde_json::from_str::<serde_json::Value>(&score(&["--json"])).unwrap().get("per_run").is_none());
    let text = score(&["--per-run"]);
    assert!(text.contains("total (weighted)") && text.lines().any(|l| l.starts_with("run ") && l.contains("particles") && l.ends_with("F-beta")), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("TS_synth_")).count(), 2, "{text}");
}

/// Several `--zarr` stores in one job: the picks `--data` gives for the same runs, in run order
/// whatever the order given; two stores of one run name are refused; `--shard` takes its share.
#[test]
fn several_zarr_stores_are_one_job() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = root().join("weights/demo_segresnetv2.safetensors");
    let common = ["--window", "64,96,96", "--tiles", "1,2,2", "--with-score"];
    let data = root().join("tests/fixtures/dataset");
    let a = tmp.path().join("a.csv");
    let st = fastdet().args(["run", "--data"]).arg(&data).arg("--weights").arg(&weights).args(common).arg("--out").arg(&a).status().unwrap();
    assert!(st.success());
    let store = |run: &str| data.join(format!("test/static/ExperimentRuns/{run}/VoxelSpacing10.000/denoised.zarr"));
    let b = tmp.path().join("b.csv");
    let o = fastdet().args(["run", "--zarr"]).arg(store("TS_synth_2")).arg(store("TS_synth_1")).arg("--weights").arg(&weights).args(common).arg("--out").arg(&b).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("2 run(s)"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // Resumed with the stores in the other order: the same job.
    let o = fastdet().args(["run", "--resume", "--zarr"]).arg(store("TS_synth_1")).arg(store("TS_synth_2")).arg("--weights").arg(&weights).args(common).arg("--out").arg(&b).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && e.matches("(resumed)").count() == 2, "{e}");
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // The level-0 array of a store beside the store itself: one run name twice.
    let o = fastdet().args(["run", "--zarr"]).arg(store("TS_synth_1")).arg(store("TS_synth_1").join("0")).arg("--weights").arg(&weights).args(common).arg("--out").arg(tmp.path().join("c.csv")).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("two --zarr inputs share the run name TS_synth_1"), "{e}");
    // Shard 1/2: the second run only.
    let d = tmp.path().join("d.csv");
    let st = fastdet().args(["run", "--shard", "1/2", "--zarr"]).arg(store("TS_synth_1")).arg(store("TS_synth_2")).arg("--weights").arg(&weights).args(common).arg("--out").arg(&d).status().unwrap();
    assert!(st.success());
    let runs: std::collections::BTreeSet<String> = std::fs::read_to_string(&d).unwrap().lines().skip(1).map(|l| l.split(',').nth(1).unwrap().to_string()).collect();
    assert_eq!(runs.into_iter().collect::<Vec<_>>(), ["TS_synth_2"]);
    // In a config file: a list, printed back as one.
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, format!("zarr = [{:?}, {:?}]\n", store("TS_synth_1"), store("TS_synth_2"))).unwrap();
    let o = fastdet().args(["run", "--print-config", "--config"]).arg(&cfg).output().unwrap();
    let t: toml::Table = String::from_utf8_lossy(&o.stdout).parse().unwrap();
    assert_eq!(t["zarr"].as_array().map(|a| a.len()), Some(2), "{t:?}");
}

/// A stand-in CUDA driver (`libcuda.so.1`) built from C source with `cc`, first on the library
/// path: how `--device auto` is tested on machines without a GPU. None (and a visible SKIP) when
/// there is no C compiler.
fn stand_in_driver(dir: &Path, source: &str) -> Option<String> {
    std::fs::create_dir_all(dir).unwrap();
    let c = dir.join("libcuda.c");
    std::fs::write(&c, source).unwrap();
    match Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(dir.join("libcuda.so.1")).arg(&c).status() {
        // Under both names the loader tries, so that a real driver elsewhere is not found first.
        Ok(st) if st.success() && std::fs::copy(dir.join("libcuda.so.1"), dir.join("libcuda.so")).is_ok() => Some(std::env::join_paths(std::iter::once(dir.to_path_buf()).chain(std::env::var_os("LD_LIBRARY_PATH").iter().flat_map(std::env::split_paths))).unwrap().into_string().unwrap()),
        _ => {
            println!("SKIP --device auto with a stand-in driver: no C compiler (cc)");
            None
        }
    }
}

/// `--device auto`, the default: the CPU when the driver sees no GPU (the picks of `--device
/// cpu`, and the reason said), every GPU it sees when it does; GPUs that then cannot work are an
/// error that names `--device cpu`.
#[cfg(target_os = "linux")]
#[test]
fn device_auto_takes_the_gpus_the_driver_sees_else_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |lib_path: Option<&str>, device: Option<&str>, out: &Path| {
        let mut c = fastdet();
        c.args(["run", "--data"]).arg(root().join("tests/fixtures/dataset")).args(["--split", "test", "--runs", "TS_synth_1", "--weights"]);
        c.arg(root().join("weights/demo_dynunet.safetensors")).args(["--window", "64,96,96", "--tiles", "2,3,3", "--with-score", "--out"]).arg(out);
        if let Some(d) = device {
            c.args(["--device", d]);
        }
        if let Some(p) = lib_path {
            c.env("LD_LIBRARY_PATH", p);
        }
        // As users run it: RUST_BACKTRACE would print the panics the CUDA layer catches.
        c.env_remove("RUST_BACKTRACE").output().unwrap()
    };
    let on_cpu = tmp.path().join("cpu.csv");
    assert!(run(None, Some("cpu"), &on_cpu).status.success());

    // A driver that finds no device: the CPU, saying why.
    let errors = "static const char *m = \"no CUDA-capable device is detected\";\n\
        int cuGetErrorString(int e, const char **s) { *s = m; return 0; }\n\
        int cuGetErrorName(int e, const char **s) { *s = \"CUDA_ERROR_NO_DEVICE\"; return 0; }\n";
    let Some(path) = stand_in_driver(&tmp.path().join("no_device"), &format!("{errors}int cuInit(unsigned f) {{ return 100; }}\n")) else { return };
    let auto = tmp.path().join("auto.csv");
    let o = run(Some(&path), None, &auto);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("model(s) on cpu (auto: no GPU: cuInit failed: ") && err.contains("CUDA_ERROR_NO_DEVICE"), "{err}");
    assert!(!err.contains("panicked") && !err.contains("--device cpu"), "{err}");
    assert_eq!(std::fs::read_to_string(&auto).unwrap(), std::fs::read_to_string(&on_cpu).unwrap());

    // A driver that sees two GPUs: both taken, one worker each; NVRTC decides whether they can be
    // used, and these stand-ins cannot open a context, so the job fails naming --device cpu.
    let two = "#include <string.h>\nint cuInit(unsigned f) { return 0; }\n\
        int cuDeviceGetCount(int *n) { *n = 2; return 0; }\nint cuDeviceGet(int *d, int i) { *d = i; return 0; }\n\
        int cuDeviceGetName(char *s, int n, int d) { strncpy(s, \"Stand-in GPU\", n); return 0; }\n\
        int cuDeviceGetAttribute(int *v, int a, int d) { *v = 8; return 0; }\n\
        int cuDeviceTotalMem_v2(unsigned long *b, int d) { *b = 1ul << 34; return 0; }\n\
        int cuDriverGetVersion(int *v) { *v = 13000; return 0; }\n";
    let path = stand_in_driver(&tmp.path().join("two"), &format!("{errors}{two}")).unwrap();
    let o = run(Some(&path), None, &tmp.path().join("two.csv"));
    let err = String::from_utf8_lossy(&o.stderr);
    if fastdet::engine::cuda::nvrtc::nvrtc_available() {
        assert!(err.contains("model(s) on cuda:0,cuda:1 (auto: 2 GPU(s), the first a Stand-in GPU)"), "{err}");
        // One run: one worker on cuda:0, cuda:1 standing by; both fail to open a context.
        assert!(err.contains("1 run(s) to compute: worker(s) on cuda:0; cuda:1 stand by") && err.contains("its 1 remaining run(s) go to cuda:1"), "{err}");
        assert!(err.contains("the GPU(s) --device auto chose could not work; --device cpu runs on the CPU"), "{err}");
        assert!(!err.contains("panicked"), "a panic caught in the CUDA layer is an error, not a crash report: {err}");
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(!tmp.path().join("two.csv").exists());
    } else {
        assert!(err.contains("model(s) on cpu (auto: 2 GPU(s), the first a Stand-in GPU, but no NVRTC to compile their kernels"), "{err}");
        assert!(o.status.success(), "{err}");
    }
}
