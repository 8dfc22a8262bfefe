//! End to end on the bundled sample: the demo ensemble against the reference pipeline's output.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::copy_dir;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn fastdet() -> Command {
    common::fastdet_on_cpu()
}

fn demo_weights() -> Vec<String> {
    ["weights/demo_segresnetv2.safetensors", "weights/demo_dynunet.safetensors"]
        .iter()
        .map(|w| root().join(w).to_string_lossy().to_string())
        .collect()
}

fn triple(v: &serde_json::Value) -> String {
    v.as_array().unwrap().iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

struct Row {
    run: String,
    class: String,
    score: f64,
    xyz: [f64; 3],
}

fn read_rows(p: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(p).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let (r, c, s, x, y, z) = (col("experiment"), col("particle_type"), col("score"), col("x"), col("y"), col("z"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Row {
                run: f[r].into(),
                class: f[c].into(),
                score: f[s].parse().unwrap(),
                xyz: [f[x].parse().unwrap(), f[y].parse().unwrap(), f[z].parse().unwrap()],
            }
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The reference pipeline's settings, detections, maps and F-beta, reproduced.
#[test]
fn demo_ensemble_reproduces_reference_pipeline() {
    let fx = root().join("tests/fixtures/pipeline");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fx.join("pipeline.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sub.csv");
    let maps = tmp.path().join("maps");
    std::fs::create_dir(&maps).unwrap();
    let thresholds: Vec<String> = cfg["thresholds"].as_array().unwrap().iter().map(|t| t.to_string()).collect();
    let st = fastdet()
        .args(["run", "--data"])
        .arg(root().join("tests/fixtures/dataset"))
        .arg("--weights")
        .args(demo_weights())
        .args(["--window", &triple(&cfg["window"]), "--tiles", &triple(&cfg["tiles"])])
        .args(["--thresholds", &thresholds.join(",")])
        .args(["--iou", &cfg["iou_threshold"].to_string(), "--blend-sigma", &cfg["tile_weight_sigma"].to_string()])
        .arg("--with-score")
        .arg("--out")
        .arg(&out)
        .arg("--save-maps")
        .arg(&maps)
        .status()
        .unwrap();
    assert!(st.success());

    // Every expected detection found (same run and class, within 0.5 voxel, |Δscore| ≤ 1e-3), nothing extra.
    let want = read_rows(&fx.join("expected_submission.csv"));
    let got = read_rows(&out);
    assert_eq!(want.len(), cfg["detections"].as_u64().unwrap() as usize);
    assert_eq!(got.len(), want.len(), "detection count");
    let mut used = vec![false; got.len()];
    for w in &want {
        let hit = got.iter().enumerate().find(|(i, g)| {
            !used[*i]
                && g.run == w.run
                && g.class == w.class
                && (0..3).map(|k| (g.xyz[k] - w.xyz[k]).powi(2)).sum::<f64>().sqrt() <= 0.5 * 10.012
                && (g.score - w.score).abs() <= 1e-3
        });
        let (i, _) = hit.unwrap_or_else(|| panic!("missing {} {} {:?} {}", w.run, w.class, w.xyz, w.score));
        used[i] = true;
    }

    // Blended maps of the first run.
    let exp = fx.join("expected_maps_TS_synth_1.safetensors");
    for name in ["scores", "offsets"] {
        let (shape, e) = fastdet::io::tensors::read_f32(&exp, name).unwrap();
        let (gshape, g) = fastdet::io::tensors::read_f32(&maps.join("TS_synth_1.safetensors"), name).unwrap();
        assert_eq!(shape, gshape);
        let d = max_abs_diff(&g, &e);
        assert!(d <= 1e-4, "{name}: max |Δ| {d}");
    }

    // The score of this submission is the reference's.
    let o = fastdet()
        .args(["score", "--split", "test", "--json", "--truth"])
        .arg(root().join("tests/fixtures/dataset"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success());
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = s["fbeta"].as_f64().unwrap();
    assert!((f - cfg["fbeta"].as_f64().unwrap()).abs() <= 1e-6, "fbeta {f}");
    assert_eq!(s["per_class"].as_array().unwrap().len(), 6);
}

/// A corrupt tomogram is reported and skipped; the other run still lands in the CSV; exit code 2.
#[test]
fn a_corrupt_run_does_not_stop_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    copy_dir(&root().join("tests/fixtures/dataset"), &data);
    let chunk = data.join("test/static/ExperimentRuns/TS_synth_2/VoxelSpacing10.000/denoised.zarr/0/0.1.1");
    std::fs::write(&chunk, b"not a blosc chunk").unwrap();
    let out = tmp.path().join("sub.csv");
    let o = fastdet()
        .args(["run", "--data"])
        .arg(&data)
        .args(["--weights", &demo_weights()[0], "--window", "64,96,96", "--tiles", "1,1,1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("TS_synth_2") && err.contains("0.1.1"), "{err}");
    let rows = read_rows_plain(&out);
    assert!(!rows.is_empty() && rows.iter().all(|r| r == "TS_synth_1"), "{rows:?}");
    // No temporary files left beside the output: the data, the CSV and its per-run results.
    let mut names: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names, ["data", "sub.csv", "sub.csv.runs"]);
    let mut parts: Vec<String> = std::fs::read_dir(tmp.path().join("sub.csv.runs")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    parts.sort();
    assert_eq!(parts, [".lock", "TS_synth_1.csv", "TS_synth_1.source", "out.json", "settings.json"], "only the finished run is kept (its picks and its record)");
    // The record names the failed run, and merge says the file lacks it (exit status 2).
    let o = fastdet().arg("merge").arg(&out).arg("-o").arg(tmp.path().join("merged.csv")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(2) && err.contains("sub.csv lacks the runs its job failed on: TS_synth_2"), "{err}");
}

fn read_rows_plain(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p).unwrap().lines().skip(1).map(|l| l.split(',').nth(1).unwrap().to_string()).collect()
}

/// Output into a directory that does not exist: clear error before any work, nothing written.
#[test]
fn missing_output_directory_is_refused() {
    let o = fastdet()
        .args(["run", "--data"])
        .arg(root().join("tests/fixtures/dataset"))
        .args(["--weights", &demo_weights()[0], "--out", "/nonexistent/dir/sub.csv"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/dir") && err.contains("does not exist"), "{err}");
}

/// `tune` finds thresholds at least as good as the seed's on the same inference.
#[test]
fn tune_never_does_worse_than_the_seed_thresholds() {
    let common = |cmd: &mut Command| {
        cmd.arg("--data")
            .arg(root().join("tests/fixtures/dataset"))
            .args(["--split", "test", "--weights", &demo_weights()[0], "--window", "64,96,96", "--tiles", "1,2,2"]);
    };
    let mut c = fastdet();
    c.arg("tune");
    common(&mut c);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let line = text.lines().find(|l| l.starts_with("--thresholds ")).expect("thresholds line");
    let tuned_total: f64 = text.lines().find(|l| l.starts_with("total")).unwrap().split_whitespace().last().unwrap().parse().unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("seed.csv");
    let mut c = fastdet();
    c.arg("run");
    common(&mut c);
    assert!(c.arg("--out").arg(&out).status().unwrap().success());
    let o = fastdet().args(["score", "--split", "test", "--json", "--truth"]).arg(root().join("tests/fixtures/dataset")).arg(&out).output().unwrap();
    let seed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let seed_total = seed["fbeta"].as_f64().unwrap();
    assert!(tuned_total + 1e-6 >= seed_total, "tuned {tuned_total} < seed {seed_total}; {line}");
    assert_eq!(line.trim_start_matches("--thresholds ").split(',').count(), 6);
}

/// `tune --picks FILE` tunes on a `run --with-score` file's picks instead of inferring: made at
/// tune's own floor (0.05 for every class), it finds the thresholds and score that inferring
/// finds (to the 6 decimals the file keeps of each score). Without the file's record, no class
/// is tuned below its lowest score in the file; a file without scores is refused.
#[test]
fn tune_on_a_scored_file_finds_what_inferring_finds() {
    let data = root().join("tests/fixtures/dataset");
    let common = ["--split", "test", "--window", "64,96,96", "--tiles", "1,2,2"];
    let thresholds_and_total = |o: &std::process::Output| -> (Vec<f32>, f64) {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let line = text.lines().find(|l| l.starts_with("--thresholds ")).expect("thresholds line");
        let t = line.trim_start_matches("--thresholds ").split(',').map(|v| v.parse().unwrap()).collect();
        let total = text.lines().find(|l| l.starts_with("total")).unwrap().split_whitespace().last().unwrap().parse().unwrap();
        (t, total)
    };
    let inferred = thresholds_and_total(&fastdet().arg("tune").arg("--data").arg(&data).args(common).args(["--weights", &demo_weights()[0]]).output().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let low = tmp.path().join("low.csv");
    let o = fastdet()
        .arg("run")
        .arg("--data")
        .arg(&data)
        .args(common)
        .args(["--weights", &demo_weights()[0], "--thresholds", "0.05,0.05,0.05,0.05,0.05,0.05", "--with-score", "--out"])
        .arg(&low)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = fastdet().arg("tune").arg("--data").arg(&data).args(["--split", "test", "--picks"]).arg(&low).output().unwrap();
    let from_file = thresholds_and_total(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("from the thresholds its job kept them at (its record)"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!((from_file.1 - inferred.1).abs() < 1e-9, "{from_file:?} vs {inferred:?}");
    for (a, b) in from_file.0.iter().zip(&inferred.0) {
        assert!((a - b).abs() <= 2e-6, "{from_file:?} vs {inferred:?}");
    }
    // --min-threshold above the job's thresholds: no threshold below it, as when inferring.
    let o = fastdet().arg("tune").arg("--data").arg(&data).args(["--split", "test", "--min-threshold", "0.5", "--picks"]).arg(&low).output().unwrap();
    let (t, _) = thresholds_and_total(&o);
    assert!(t.iter().all(|t| *t >= 0.5), "{t:?}");
    // A file edited after its job wrote it: its record is not used (warned), the floors are the
    // lowest scores it holds.
    let text = std::fs::read_to_string(&low).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| l.starts_with("id,") || l.split(',').nth(3).unwrap().parse::<f32>().unwrap() >= 0.3).collect();
    std::fs::write(&low, kept.join("\n") + "\n").unwrap();
    let o = fastdet().arg("tune").arg("--data").arg(&data).args(["--split", "test", "--picks"]).arg(&low).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("the record beside it (its .runs folder) is not of this file"), "{}", String::from_utf8_lossy(&o.stderr));
    let (t, _) = thresholds_and_total(&o);
    assert!(t.iter().all(|t| *t >= 0.3), "{t:?}");
    std::fs::write(&low, &text).unwrap();
    // A job over one of the runs: tuned on that run only (the other's particles were never
    // looked for), and said so.
    let one = tmp.path().join("one.csv");
    let o = fastdet().arg("run").arg("--data").arg(&data).args(common).args(["--runs", "TS_synth_1", "--weights", &demo_weights()[0], "--with-score", "--out"]).arg(&one).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = fastdet().arg("tune").arg("--data").arg(&data).args(["--split", "test", "--picks"]).arg(&one).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let in_one = fastdet::io::copick::read_truth(&fastdet::io::dataset::Layout::split(&data, "test")).unwrap().iter().filter(|p| p.run == "TS_synth_1").count();
    assert!(o.status.success() && err.contains(&format!("tuning on 1 run(s), {in_one} annotated particle(s)")) && err.contains("not tuned on 1 run(s) with ground truth, as its job did not compute them: TS_synth_2"), "{err}");
    // Without the record: never below a class's lowest score in the file.
    let bare = tmp.path().join("bare.csv");
    std::fs::copy(&low, &bare).unwrap();
    let o = fastdet().arg("tune").arg("--data").arg(&data).args(["--split", "test", "--picks"]).arg(&bare).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("note: no record of the thresholds"), "{}", String::from_utf8_lossy(&o.stderr));
    let (t, _) = thresholds_and_total(&o);
    let picks = fastdet::io::csv::read_submission(&bare).unwrap();
    for (c, t) in t.iter().enumerate() {
        if let Some(lowest) = picks.iter().filter(|p| p.class == c).map(|p| p.score).reduce(f32::min) {
            // At most half a rounding step of the file's 6 decimals under it (so that the pick
            // whose true score the rounding raised is still kept).
            assert!(*t >= lowest - 1e-6 && *t != lowest, "class {c}: {t} vs {lowest}");
        }
    }
    // --runs as score takes it; a file without scores, or given with weights, is refused.
    let o = fastdet().arg("tune").arg("--data").arg(&data).args(["--split", "test", "--runs", "TS_synth_1", "--picks"]).arg(&low).output().unwrap();
    let in_run = fastdet::io::copick::read_truth(&fastdet::io::dataset::Layout::split(&data, "test")).unwrap().iter().filter(|p| p.run == "TS_synth_1").count();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stderr).contains(&format!("tuning on 1 run(s), {in_run} annotated particle(s)")), "{}", String::from_utf8_lossy(&o.stderr));
    let plain = tmp.path().join("plain.csv");
    std::fs::write(&plain, "id,experiment,particle_type,x,y,z\n0,TS_synth_1,ribosome,1,2,3\n").unwrap();
    let o = fastdet().arg("tune").arg("--data").arg(&data).args(["--split", "test", "--picks"]).arg(&plain).output().unwrap();
    assert!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("has no score column"), "{}", String::from_utf8_lossy(&o.stderr));
    // Options of the inference it does not run are refused, not ignored.
    for extra in [&["--weights", &demo_weights()[0]][..], &["--iou", "0.5"], &["--window", "64,96,96"], &["--device", "cpu"]] {
        let o = fastdet().arg("tune").arg("--data").arg(&data).args(extra).arg("--picks").arg(&low).output().unwrap();
        assert!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("cannot be used with"), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    // A file none of whose runs has ground truth, and an empty run name, are refused.
    let other = tmp.path().join("other.csv");
    std::fs::write(&other, text.replace("TS_synth_", "TS_other_")).unwrap();
    let o = fastdet().arg("tune").arg("--data").arg(&data).args(["--split", "test", "--picks"]).arg(&other).output().unwrap();
    assert!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("none of its runs has ground truth"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = fastdet().arg("tune").arg("--data").arg(&data).args(["--split", "test", "--runs", ",", "--picks"]).arg(&low).output().unwrap();
    assert!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("--runs: run \"\" is not in"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `tune --runs R` tunes on R's annotations only: the other runs' particles, never looked for,
/// are not counted as missed. (Spaces around a name are not part of it, as for `score --runs`.)
#[test]
fn tune_scores_only_the_runs_it_inferred() {
    let data = root().join("tests/fixtures/dataset");
    let truth = fastdet::io::copick::read_truth(&fastdet::io::dataset::Layout::split(&data, "test")).unwrap();
    let in_run = truth.iter().filter(|p| p.run == "TS_synth_1").count();
    assert!(in_run > 0 && in_run < truth.len());
    let o = fastdet()
        .arg("tune")
        .arg("--data")
        .arg(&data)
        .args(["--split", "test", "--runs", " TS_synth_1 ", "--weights", &demo_weights()[0], "--window", "64,96,96", "--tiles", "1,2,2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("tuning on 1 run(s), {in_run} annotated particle(s)")), "{err}");
}

/// Volumes shorter than the window (60 slices, window 64). Zero padding (the seed's) is darker
/// than any voxel and costs the demo ensemble most of its picks: warned about, with a window that
/// fits. `--pad mean` fills the window with the volume's mean instead: the score comes back, the
/// maps and picks keep the tomogram's extent, and the runs folder records the choice.
#[test]
fn mean_padding_for_volumes_shorter_than_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("short");
    let o = fastdet().arg("synth").arg(&data).args(["--runs", "2", "--shape", "60,96,96", "--seed", "3", "--noise", "1.2"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = |pad: &str, out: &Path, tiles: &str, extra: &[&str]| {
        let o = fastdet()
            .arg("run")
            .arg("--data")
            .arg(&data)
            .arg("--weights")
            .args(demo_weights())
            .args(["--window", "64,96,96", "--tiles", tiles, "--pad", pad])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        let o = fastdet().args(["score", "--split", "test", "--json", "--truth"]).arg(&data).arg(out).output().unwrap();
        let score: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (score["fbeta"].as_f64().unwrap(), err)
    };
    let (zero, err) = run("zero", &tmp.path().join("zero.csv"), "1,1,1", &[]);
    assert!(err.contains("along z (4 voxels of padding)") && err.contains("a window that fits: --window 32,96,96 --tiles 2,1,1 (or --pad mean)"), "{err}");
    let maps = tmp.path().join("maps");
    let mean_out = tmp.path().join("mean.csv");
    let (mean, err) = run("mean", &mean_out, "1,1,1", &["--save-maps", maps.to_str().unwrap()]);
    assert!(!err.contains("padding"), "{err}");
    assert!(mean > 0.95 && mean > zero + 0.3, "--pad mean {mean}, zero {zero}");
    for (name, channels) in [("scores", 6), ("offsets", 3)] {
        let (shape, values) = fastdet::io::tensors::read_f32(&maps.join("TS_synth_1.safetensors"), name).unwrap();
        assert_eq!(shape, [channels, 30, 48, 48], "{name}");
        assert_eq!(values.len(), channels * 30 * 48 * 48);
    }
    let picks = fastdet::io::csv::read_submission(&mean_out).unwrap();
    assert!(!picks.is_empty() && picks.iter().all(|p| p.z < 60.0 * 10.012), "a pick in the padding");
    // A padded axis is as long as the window: one tile along it, however many are asked for.
    let thrice = tmp.path().join("thrice.csv");
    let (again, err) = run("mean", &thrice, "3,2,1", &[]);
    assert!(err.contains("TS_synth_1: ") && err.matches("(2 tiles)").count() == 2, "{err}");
    assert_eq!(again, mean);
    let settings = std::fs::read_to_string(tmp.path().join("mean.csv.runs/settings.json")).unwrap();
    assert!(settings.contains("\"pad\": \"mean\""), "{settings}");
    assert!(!std::fs::read_to_string(tmp.path().join("zero.csv.runs/settings.json")).unwrap().contains("pad"));
}
