//! Scale-out and robustness: shards merged equal one run; a killed run resumes to the same output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::copy_dir;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn fastdet() -> Command {
    common::fastdet_on_cpu()
}

/// A cheap run: one small model, four tiles per tomogram.
fn cheap_run(data: &Path, out: &Path) -> Command {
    let mut c = fastdet();
    c.args(["run", "--data"])
        .arg(data)
        .arg("--weights")
        .arg(root().join("weights/demo_segresnetv2.safetensors"))
        .args(["--window", "64,96,96", "--tiles", "1,2,2", "--with-score", "--out"])
        .arg(out);
    c
}

fn sorted_lines_without_id(p: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_to_string(p).unwrap().lines().skip(1).map(|l| l.split_once(',').unwrap().1.to_string()).collect();
    v.sort();
    v
}

#[test]
fn shards_merged_equal_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("tests/fixtures/dataset");
    let whole = tmp.path().join("whole.csv");
    assert!(cheap_run(&data, &whole).status().unwrap().success());
    let mut shards = Vec::new();
    for k in 0..2 {
        let p = tmp.path().join(format!("shard{k}.csv"));
        assert!(cheap_run(&data, &p).args(["--shard", &format!("{k}/2")]).status().unwrap().success());
        let runs: Vec<String> = std::fs::read_to_string(&p).unwrap().lines().skip(1).map(|l| l.split(',').nth(1).unwrap().to_string()).collect();
        assert!(!runs.is_empty());
        assert!(runs.iter().all(|r| *r == format!("TS_synth_{}", k + 1)), "shard {k}: {runs:?}");
        shards.push(p);
    }
    assert!(tmp.path().join("shard0.csv.runs/shard.json").is_file());
    // One shard alone: the other is named as missing.
    let o = fastdet().arg("merge").arg(&shards[0]).arg("-o").arg(tmp.path().join("half.csv")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    // Written, with exit status 2 (as a run whose some runs failed): the job's output is not whole.
    assert!(o.status.code() == Some(2) && err.contains("run with --shard K/2, and none is shard 1/2 (TS_synth_2): the merged file lacks 1 of the job's 2 run(s)"), "{err}");
    assert!(tmp.path().join("half.csv").is_file());
    // More shards than runs: a shard without runs is not missing.
    let thirds: Vec<PathBuf> = (0..2).map(|k| tmp.path().join(format!("third{k}.csv"))).collect();
    for (k, p) in thirds.iter().enumerate() {
        assert!(cheap_run(&data, p).args(["--shard", &format!("{k}/3")]).status().unwrap().success());
    }
    let o = fastdet().arg("merge").args(&thirds).arg("-o").arg(tmp.path().join("thirds.csv")).output().unwrap();
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("warning"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = fastdet().arg("merge").arg(&thirds[1]).arg("-o").arg(tmp.path().join("third.csv")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("none is shard 0/3 (TS_synth_1): the merged file lacks 1 of the job's 2 run(s)") && !err.contains("2/3"), "{err}");
    // The other shard's runs redone without --shard: that input may hold them, nothing is said.
    let redo = tmp.path().join("redo.csv");
    assert!(cheap_run(&data, &redo).args(["--split", "test", "--runs", "TS_synth_2"]).status().unwrap().success());
    let o = fastdet().arg("merge").arg(&shards[0]).arg(&redo).arg("-o").arg(tmp.path().join("redone.csv")).output().unwrap();
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("warning"), "{}", String::from_utf8_lossy(&o.stderr));
    let merged = tmp.path().join("merged.csv");
    // Shards in reverse order: merge sorts by run. Their copick folders are joined too.
    let copick: Vec<PathBuf> = (0..2).map(|k| tmp.path().join(format!("shard{k}.csv.copick"))).collect();
    for (k, dir) in copick.iter().enumerate() {
        let picks = fastdet::io::csv::read_submission(&shards[k]).unwrap();
        let run = format!("TS_synth_{}", k + 1);
        fastdet::io::copick::write_run_picks(dir, &run, &picks, "fastdet", "0").unwrap();
    }
    let st = fastdet()
        .arg("merge")
        .arg(&shards[1])
        .arg(&shards[0])
        .arg("-o")
        .arg(&merged)
        .arg("--copick")
        .args(&copick)
        .arg("--copick-out")
        .arg(tmp.path().join("copick"))
        .output()
        .unwrap();
    assert!(st.status.success() && !String::from_utf8_lossy(&st.stderr).contains("warning"), "{}", String::from_utf8_lossy(&st.stderr));
    for run in ["TS_synth_1", "TS_synth_2"] {
        let p = fastdet::io::copick::read_run_picks(&tmp.path().join(format!("copick/ExperimentRuns/{run}/Picks")), run).unwrap();
        assert!(!p.is_empty());
    }
    assert_eq!(std::fs::read(&merged).unwrap(), std::fs::read(&whole).unwrap(), "merged file differs from the unsharded run");
    assert_eq!(sorted_lines_without_id(&merged), sorted_lines_without_id(&whole));
    // A copick folder holding other picks for a run (an earlier merge) is named as such.
    let picks_dir = tmp.path().join("copick/ExperimentRuns/TS_synth_1/Picks");
    let first = std::fs::read_dir(&picks_dir).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&first, b"[]").unwrap();
    let o = fastdet().arg("merge").arg(&shards[1]).arg(&shards[0]).arg("-o").arg(tmp.path().join("again.csv")).arg("--copick").args(&copick).arg("--copick-out").arg(tmp.path().join("copick")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("already holds other picks") && err.contains("earlier merge"), "{err}");
    assert!(!tmp.path().join("again.csv").exists());
    // A shard run with other settings is merged with a warning naming what differs.
    let odd = tmp.path().join("odd.csv");
    assert!(cheap_run(&data, &odd).args(["--shard", "1/2", "--iou", "0.5"]).status().unwrap().success());
    let o = fastdet().arg("merge").arg(&shards[0]).arg(&odd).arg("-o").arg(tmp.path().join("odd_merged.csv")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    // Written, but with exit status 2: the file is not one job's output.
    assert!(o.status.code() == Some(2) && err.contains("odd.csv was made with other weights or settings than") && err.contains("(differ: iou)"), "{err}");
    assert!(tmp.path().join("odd_merged.csv").exists());
    // Most shards agree: the odd one is named, whatever its place.
    let none = tmp.path().join("none.csv");
    assert!(cheap_run(&data, &none).args(["--shard", "2/3"]).status().unwrap().success());
    let o = fastdet().arg("merge").arg(&odd).arg(&none).arg(&shards[0]).arg("-o").arg(tmp.path().join("odd_first.csv")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.matches("warning").count() == 1 && err.contains("odd.csv was made with other weights or settings than"), "{err}");
    // One shard given twice is refused.
    let o = fastdet().arg("merge").arg(&shards[0]).arg(&shards[0]).arg("-o").arg(tmp.path().join("x.csv")).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("given twice"));
    // An unsharded job over a shard's output: it is no shard any more.
    assert!(cheap_run(&data, &shards[0]).status().unwrap().success());
    assert!(!tmp.path().join("shard0.csv.runs/shard.json").exists());
    let o = fastdet().arg("merge").arg(&shards[0]).arg("-o").arg(tmp.path().join("all.csv")).output().unwrap();
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("warning"), "{}", String::from_utf8_lossy(&o.stderr));
    // Shard 0 again, for what follows.
    assert!(cheap_run(&data, &shards[0]).args(["--shard", "0/2"]).status().unwrap().success());
    // Shards computed on a GPU and on the CPU (fp16, f32) are one job: a note, not a warning.
    let settings = tmp.path().join("shard1.csv.runs/settings.json");
    let plain = std::fs::read_to_string(&settings).unwrap();
    let mut fp16: serde_json::Value = serde_json::from_str(&plain).unwrap();
    fp16["precision"] = serde_json::json!(["fp16"]);
    std::fs::write(&settings, fp16.to_string()).unwrap();
    let o = fastdet().arg("merge").arg(&shards[0]).arg(&shards[1]).arg("-o").arg(tmp.path().join("mixed.csv")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("note: ") && err.contains("shard1.csv was computed on another kind of device") && !err.contains("warning"), "{err}");
    std::fs::write(&settings, plain).unwrap();
    // A file changed after its job wrote it is named.
    let bytes = std::fs::read(&shards[1]).unwrap();
    std::fs::write(&shards[1], [&bytes[..], b"99,TS_synth_2,ribosome,1.0,1,2,3\n"].concat()).unwrap();
    let o = fastdet().arg("merge").arg(&shards[0]).arg(&shards[1]).arg("-o").arg(tmp.path().join("edited.csv")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(2) && err.contains("shard1.csv is not the file its job wrote"), "{err}");
    std::fs::write(&shards[1], &bytes).unwrap();
    // A new job on a shard's output whose every run fails (no such tomogram) writes nothing and
    // leaves the earlier job's file, which merge then names as no output of the job recorded
    // beside it (exit status 2): it cannot pass for this job's shard.
    let o = cheap_run(&data, &shards[1]).args(["--shard", "1/2", "--tomogram", "wbp"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && err.contains("every run failed"), "{err}");
    assert_eq!(std::fs::read(&shards[1]).unwrap(), bytes);
    let o = fastdet().arg("merge").arg(&shards[0]).arg(&shards[1]).arg("-o").arg(tmp.path().join("stale.csv")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(2) && err.contains("shard1.csv is not the output of the job recorded in") && err.contains("failed or was stopped"), "{err}");
    // The shard run again: merged without a word.
    assert!(cheap_run(&data, &shards[1]).args(["--shard", "1/2"]).status().unwrap().success());
    let again_ok = tmp.path().join("again_ok.csv");
    let o = fastdet().arg("merge").arg(&shards[0]).arg(&shards[1]).arg("-o").arg(&again_ok).output().unwrap();
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("warning"), "{}", String::from_utf8_lossy(&o.stderr));
    // The merged file of one whole job carries that job's record: tune --picks reads its
    // thresholds and runs, and a later merge takes it as one job's output.
    assert!(tmp.path().join("again_ok.csv.runs/out.json").is_file());
    let o = fastdet().args(["tune", "--split", "test", "--data"]).arg(&data).arg("--picks").arg(&again_ok).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("from the thresholds its job kept them at (its record)") && err.contains("tuning on 2 run(s)"), "{err}");
    let o = fastdet().arg("merge").arg(&again_ok).arg("-o").arg(tmp.path().join("re_merged.csv")).output().unwrap();
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("warning"), "{}", String::from_utf8_lossy(&o.stderr));
    // Shards of different settings: no record (and an earlier merge's record there goes).
    let o = fastdet().arg("merge").arg(&shards[0]).arg(&odd).arg("-o").arg(&again_ok).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(!tmp.path().join("again_ok.csv.runs").exists());
}

/// `merge` on hand-written shards: an empty shard (header only, as `--shard K/N` writes when it
/// gets no run or no pick) anywhere in the list is fine; a run in two shards is refused even when
/// it is not a shard's first run, naming both files, and nothing is written; copick folders are
/// checked before the CSV is written, and `--copick-out` needs `--copick`.
#[test]
fn merge_skips_empty_shards_and_refuses_any_overlap() {
    let tmp = tempfile::tempdir().unwrap();
    let header = "id,experiment,particle_type,x,y,z\n";
    let write = |name: &str, rows: &[&str]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, format!("{header}{}", rows.iter().map(|r| format!("{r}\n")).collect::<String>())).unwrap();
        p
    };
    let a = write("a.csv", &["0,TS_1,ribosome,10,20,30", "1,TS_2,ribosome,1,2,3"]);
    let empty = write("empty.csv", &[]);
    let b = write("b.csv", &["0,TS_3,apo-ferritin,4,5,6", "1,TS_2,beta-amylase,7,8,9"]);
    let c = write("c.csv", &["0,TS_3,virus-like-particle,4,5,6"]);
    let out = tmp.path().join("m.csv");

    let o = fastdet().arg("merge").arg(&a).arg(&empty).arg(&c).arg("-o").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let merged = std::fs::read_to_string(&out).unwrap();
    assert_eq!(merged.lines().count(), 4, "{merged}");
    assert!(merged.contains("TS_3,virus-like-particle"), "{merged}");

    let out2 = tmp.path().join("m2.csv");
    let o = fastdet().arg("merge").arg(&a).arg(&b).arg("-o").arg(&out2).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("run TS_2 also appears in") && err.contains("a.csv") && err.contains("b.csv"), "{err}");
    assert!(!out2.exists());

    // A copick folder that does not exist: an error before the CSV is written.
    let o = fastdet().arg("merge").arg(&a).arg("-o").arg(&out2).arg("--copick").arg(tmp.path().join("nope")).arg("--copick-out").arg(tmp.path().join("cp")).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a copick output folder"));
    assert!(!out2.exists() && !tmp.path().join("cp").exists());
    let o = fastdet().arg("merge").arg(&a).arg("-o").arg(&out2).arg("--copick-out").arg(tmp.path().join("cp")).output().unwrap();
    assert!(!o.status.success() && !out2.exists());
}

#[test]
fn bad_shard_spec_is_refused() {
    let o = fastdet().args(["run", "--shard", "2/2", "--data", ".", "--out", "x.csv"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("0 <= K < N"));
}

#[test]
fn killed_run_resumes_to_the_same_output() {
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("tests/fixtures/dataset");
    let reference = tmp.path().join("reference.csv");
    assert!(cheap_run(&data, &reference).arg("--copick-out").arg(tmp.path().join("cp_ref")).status().unwrap().success());

    let out = tmp.path().join("sub.csv");
    let part1 = tmp.path().join("sub.csv.runs/TS_synth_1.csv");
    let mut child = cheap_run(&data, &out).spawn().unwrap();
    let t0 = Instant::now();
    while !part1.exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "first run never finished");
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SIGKILL: no chance to clean up or finish the CSV.
    let _ = child.kill();
    let _ = child.wait();
    let was_complete = out.exists();
    assert!(part1.exists());

    let o = cheap_run(&data, &out).arg("--resume").arg("--copick-out").arg(tmp.path().join("cp")).output().unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("TS_synth_1") && err.contains("(resumed)"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&reference).unwrap(), "resumed output differs (first attempt had finished: {was_complete})");
    // The resumed run's picks come back exactly, full-precision copick coordinates included.
    let picks = |dir: &str| {
        let d = tmp.path().join(dir).join("ExperimentRuns/TS_synth_1/Picks");
        let mut files: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(!files.is_empty());
        files.iter().map(|f| std::fs::read(f).unwrap()).collect::<Vec<_>>()
    };
    assert!(picks("cp") == picks("cp_ref"), "the resumed run's copick picks differ from a fresh run's");

    // Other settings with --resume: refused rather than mixing results.
    let o = cheap_run(&data, &out).args(["--resume", "--iou", "0.5"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("other inputs, weights or settings (changed: iou)"), "{}", String::from_utf8_lossy(&o.stderr));
    // (The other kind of device alone is not refused: resume_on_the_other_kind_of_device_keeps_the_finished_runs.)
    // So are other tomograms under the same run names (a copy of the dataset elsewhere).
    let copy = tmp.path().join("copy");
    copy_dir(&data, &copy);
    let o = cheap_run(&copy, &out).arg("--resume").output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("(changed: inputs)"));

    // A tomogram re-exported at the same path since its picks were stored is computed again:
    // run 2's volume replaced by run 1's gives run 1's picks under run 2's name.
    let o = cheap_run(&copy, &out).output().unwrap();
    assert!(o.status.success());
    let tomo = |r: &str| copy.join(format!("test/static/ExperimentRuns/{r}/VoxelSpacing10.000/denoised.zarr"));
    std::fs::remove_dir_all(tomo("TS_synth_2")).unwrap();
    copy_dir(&tomo("TS_synth_1"), &tomo("TS_synth_2"));
    let o = cheap_run(&copy, &out).arg("--resume").output().unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("TS_synth_1: ") && err.contains("(resumed)"), "{err}");
    assert!(err.contains("TS_synth_2: ") && err.contains("changed since its picks were stored"), "{err}");
    let rows = |r: &str| -> Vec<String> {
        std::fs::read_to_string(&out).unwrap().lines().filter_map(|l| l.split_once(',')).map(|(_, rest)| rest.to_string()).filter(|l| l.starts_with(r)).map(|l| l.replacen(r, "", 1)).collect()
    };
    assert!(!rows("TS_synth_1,").is_empty());
    assert_eq!(rows("TS_synth_1,"), rows("TS_synth_2,"));
}

/// Two workers in one process (worker k takes runs[k::2]) write the same file as one worker.
#[test]
fn two_workers_write_the_same_output_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("tests/fixtures/dataset");
    let one = tmp.path().join("one.csv");
    assert!(cheap_run(&data, &one).status().unwrap().success());
    let two = tmp.path().join("two.csv");
    let o = cheap_run(&data, &two).args(["--devices", "cpu,cpu"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("[cpu] TS_synth_1") && err.contains("[cpu] TS_synth_2"), "{err}");
    assert_eq!(std::fs::read(&two).unwrap(), std::fs::read(&one).unwrap());
}

/// Without a CUDA engine (or driver) asking for GPUs is a clear error, not a panic.
#[test]
fn gpus_without_cuda_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = cheap_run(&root().join("tests/fixtures/dataset"), &tmp.path().join("x.csv")).args(["--gpus", "0,1"]).output().unwrap();
    if o.status.success() {
        println!("SKIP gpus_without_cuda_is_a_clear_error: a CUDA device is present");
        return;
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cuda") || err.contains("CUDA"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!tmp.path().join("x.csv").exists());
}

/// The SLURM array script numbers shards from 0 whatever the array's first index, and refuses an
/// array with gaps (its missing tasks' shards would never be processed). A stand-in `fastdet`
/// prints the arguments it gets.
#[cfg(unix)]
#[test]
fn slurm_array_tasks_map_to_shards_from_zero() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("fastdet");
    std::fs::write(&fake, "#!/bin/bash\necho \"$@\"\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let task = |id: &str, count: &str, min: &str, max: &str| {
        Command::new("bash")
            .arg(root().join("tools/slurm/fastdet_array.sbatch"))
            .args(["/data", "test"])
            .arg(tmp.path().join("out"))
            .env("FASTDET", &fake)
            .envs([("SLURM_ARRAY_TASK_ID", id), ("SLURM_ARRAY_TASK_COUNT", count), ("SLURM_ARRAY_TASK_MIN", min), ("SLURM_ARRAY_TASK_MAX", max)])
            .output()
            .unwrap()
    };
    let o = task("3", "8", "1", "8");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let args = String::from_utf8_lossy(&o.stdout);
    assert!(args.contains("--shard 2/8") && args.contains("shard_2.csv"), "{args}");
    let o = task("0", "8", "0", "7");
    assert!(String::from_utf8_lossy(&o.stdout).contains("--shard 0/8") && !String::from_utf8_lossy(&o.stdout).contains("--thresholds"));
    // THRESHOLDS reaches the run as one --thresholds value.
    let o = Command::new("bash")
        .arg(root().join("tools/slurm/fastdet_array.sbatch"))
        .args(["/data", "test"])
        .arg(tmp.path().join("out"))
        .env("FASTDET", &fake)
        .env("THRESHOLDS", "0.05,0.05,0.05,0.05,0.05,0.05")
        .envs([("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "2"), ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_MAX", "1")])
        .output()
        .unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--with-score --thresholds 0.05,0.05,0.05,0.05,0.05,0.05 --out"), "{}", String::from_utf8_lossy(&o.stdout));
    let o = task("2", "3", "0", "4");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("one contiguous range"));
    // The device: the CPU unless SLURM gave the task GPUs (then every one of them), or DEVICE.
    let device = |env: &[(&str, &str)]| {
        let o = Command::new("bash")
            .arg(root().join("tools/slurm/fastdet_array.sbatch"))
            .args(["/data", "test"])
            .arg(tmp.path().join("out"))
            .env("FASTDET", &fake)
            .env_remove("SLURM_JOB_GPUS")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env_remove("DEVICE")
            .envs([("SLURM_ARRAY_TASK_ID", "0"), ("SLURM_ARRAY_TASK_COUNT", "1"), ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_MAX", "0")])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let args = String::from_utf8_lossy(&o.stdout).to_string();
        args.split_once("--device ").map(|(_, r)| r.split_whitespace().next().unwrap().to_string()).unwrap_or(args)
    };
    assert_eq!(device(&[]), "cpu");
    assert_eq!(device(&[("SLURM_JOB_GPUS", "0,1")]), "auto");
    assert_eq!(device(&[("CUDA_VISIBLE_DEVICES", "2")]), "auto");
    assert_eq!(device(&[("DEVICE", "cuda:1"), ("SLURM_JOB_GPUS", "0")]), "cuda:1");
}

/// The score column survives `merge` when a shard starts with a blank line; a shard without
/// scores drops the column with a note.
#[test]
fn merge_keeps_scores_after_a_leading_blank_line() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.csv");
    std::fs::write(&a, "\n\nid,experiment,particle_type,score,x,y,z\n0,TS_1,ribosome,0.5,10,20,30\n").unwrap();
    let b = tmp.path().join("b.csv");
    std::fs::write(&b, "id,experiment,particle_type,score,x,y,z\n0,TS_2,ribosome,0.25,1,2,3\n").unwrap();
    let out = tmp.path().join("m.csv");
    let o = fastdet().arg("merge").arg(&a).arg(&b).arg("-o").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text, "id,experiment,particle_type,score,x,y,z\n0,TS_1,ribosome,0.500000,10.000,20.000,30.000\n1,TS_2,ribosome,0.250000,1.000,2.000,3.000\n");
    let c = tmp.path().join("c.csv");
    std::fs::write(&c, "id,experiment,particle_type,x,y,z\n0,TS_3,ribosome,1,2,3\n").unwrap();
    let o = fastdet().arg("merge").arg(&a).arg(&c).arg("-o").arg(&out).output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("c.csv has no score column"));
    assert!(std::fs::read_to_string(&out).unwrap().starts_with("id,experiment,particle_type,x,y,z\n"));
}

/// A resumed run whose STAR file is asked for and missing gets it written from its stored picks
/// (the same bytes as a fresh run's); one whose maps are missing is computed again.
#[test]
fn resume_writes_missing_star_files_and_computes_missing_maps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("tests/fixtures/dataset");
    let star_ref = tmp.path().join("star_ref");
    assert!(cheap_run(&data, &tmp.path().join("ref.csv")).arg("--star-out").arg(&star_ref).status().unwrap().success());
    let out = tmp.path().join("sub.csv");
    assert!(cheap_run(&data, &out).status().unwrap().success());
    // The record of a run holds what the STAR file needs besides the picks: the tomogram's shape.
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("sub.csv.runs/TS_synth_1.source")).unwrap()).unwrap();
    assert_eq!(record["shape"], serde_json::json!([80, 160, 160]), "{record}");
    let star = tmp.path().join("star");
    let o = cheap_run(&data, &out).arg("--resume").arg("--star-out").arg(&star).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("computing") && err.matches("(resumed; ").count() == 2 && err.contains("TS_synth_1.star written from them"), "{err}");
    for r in ["TS_synth_1.star", "TS_synth_2.star"] {
        assert_eq!(std::fs::read(star.join(r)).unwrap(), std::fs::read(star_ref.join(r)).unwrap(), "{r}");
    }
    // A STAR file cut short is written again; an intact one is left as it is.
    let text = std::fs::read_to_string(star.join("TS_synth_2.star")).unwrap();
    std::fs::write(star.join("TS_synth_2.star"), &text[..text.len() / 2]).unwrap();
    let o = cheap_run(&data, &out).arg("--resume").arg("--star-out").arg(&star).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("TS_synth_2.star differed from what they give (damaged, edited, or written by an older fastdet); written again") && err.contains("TS_synth_1: ") && err.matches("(resumed)").count() == 1, "{err}");
    assert_eq!(std::fs::read(star.join("TS_synth_2.star")).unwrap(), std::fs::read(star_ref.join("TS_synth_2.star")).unwrap());
    let maps = tmp.path().join("maps");
    let o = cheap_run(&data, &out).arg("--resume").arg("--star-out").arg(&star).arg("--save-maps").arg(&maps).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("(resumed") && err.contains("TS_synth_1.safetensors is not there; computing the run again"), "{err}");
    assert!(maps.join("TS_synth_1.safetensors").exists() && maps.join("TS_synth_2.safetensors").exists());
    // With them there, the runs are resumed.
    let o = cheap_run(&data, &out).arg("--resume").arg("--star-out").arg(&star).arg("--save-maps").arg(&maps).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stderr).matches("(resumed)").count(), 2);
}

/// `--resume` takes a stored run only when its file is the one stored (not cut short at a line
/// break, which still parses) and was made with this job's settings; both others are computed
/// again, and the output equals an uninterrupted run's.
#[test]
fn resume_recomputes_damaged_or_foreign_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("tests/fixtures/dataset");
    let out = tmp.path().join("sub.csv");
    assert!(cheap_run(&data, &out).status().unwrap().success());
    let reference = std::fs::read(&out).unwrap();
    let parts = tmp.path().join("sub.csv.runs");
    // Run 1's file without its last row.
    let p1 = parts.join("TS_synth_1.csv");
    let text = std::fs::read_to_string(&p1).unwrap();
    let cut = text.trim_end().rfind('\n').unwrap() + 1;
    std::fs::write(&p1, &text[..cut]).unwrap();
    // Run 2's file and record from a job with another IoU, copied in.
    let other = tmp.path().join("other.csv");
    assert!(cheap_run(&data, &other).args(["--iou", "0.05"]).status().unwrap().success());
    for f in ["TS_synth_2.csv", "TS_synth_2.source"] {
        std::fs::copy(tmp.path().join("other.csv.runs").join(f), parts.join(f)).unwrap();
    }
    // Temporaries of a job killed outright (kill -9): removed under the lock; another output's kept.
    let stale = [parts.join(".TS_synth_1.csv.4000000.tmp"), parts.join(".TS_synth_2.source.4000001.tmp"), tmp.path().join(".sub.csv.4000000.tmp")];
    let others = tmp.path().join(".other.csv.4000000.tmp");
    for p in stale.iter().chain([&others]) {
        std::fs::write(p, "half").unwrap();
    }
    let o = cheap_run(&data, &out).arg("--resume").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("removed 3 temporary file(s) left by a job on"), "{err}");
    assert!(stale.iter().all(|p| !p.exists()) && others.exists());
    assert!(err.contains("TS_synth_1: ") && err.contains("TS_synth_1.csv is not the file that was stored"), "{err}");
    assert!(err.contains("TS_synth_2: its picks were stored by a job with other settings"), "{err}");
    assert!(!err.contains("(resumed)"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), reference);
}

/// A second job writing the same output is refused while the first holds its runs folder,
/// naming the holder; the lock goes with the process that held it.
#[test]
fn a_second_job_on_the_same_output_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("tests/fixtures/dataset");
    let out = tmp.path().join("sub.csv");
    let parts = tmp.path().join("sub.csv.runs");
    std::fs::create_dir_all(&parts).unwrap();
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(parts.join(".lock")).unwrap();
    lock.lock().unwrap();
    std::fs::write(parts.join(".lock"), "process 4242 on node7").unwrap();
    for resume in [false, true] {
        let mut c = cheap_run(&data, &out);
        if resume {
            c.arg("--resume");
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("another fastdet (process 4242 on node7) is writing this output") && err.contains(".lock"), "{err}");
        assert!(!out.exists());
    }
    // Under another name (a link to the output): the same folder, the same lock.
    let link = tmp.path().join("link.csv");
    std::os::unix::fs::symlink("sub.csv", &link).unwrap();
    let o = cheap_run(&data, &link).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("is writing this output"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!tmp.path().join("link.csv.runs").exists());
    drop(lock);
    let o = cheap_run(&data, &out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// copick files are written for every run at once, before the CSV: a failure on one run's
/// folder leaves no copick file of any run and no CSV; the finished runs stay for --resume.
#[test]
fn copick_output_is_all_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("tests/fixtures/dataset");
    let out = tmp.path().join("sub.csv");
    let cp = tmp.path().join("cp");
    // Run 2's Picks folder cannot be made: a file is in its place.
    std::fs::create_dir_all(cp.join("ExperimentRuns/TS_synth_2")).unwrap();
    std::fs::write(cp.join("ExperimentRuns/TS_synth_2/Picks"), b"").unwrap();
    let o = cheap_run(&data, &out).arg("--copick-out").arg(&cp).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("TS_synth_2/Picks") && err.contains("cannot create the directory"), "{err}");
    assert!(!out.exists());
    let mut left = Vec::new();
    let mut stack = vec![cp.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                left.push(e.path().strip_prefix(&cp).unwrap().display().to_string());
            }
        }
    }
    assert_eq!(left, ["ExperimentRuns/TS_synth_2/Picks"], "copick files or temporaries were left");
    assert!(!cp.join("ExperimentRuns/TS_synth_1").exists(), "run 1's folders were left");
    // Fixed, the job resumes its two finished runs and writes both.
    std::fs::remove_file(cp.join("ExperimentRuns/TS_synth_2/Picks")).unwrap();
    let o = cheap_run(&data, &out).arg("--copick-out").arg(&cp).arg("--resume").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.matches("(resumed)").count() == 2, "{err}");
    assert_eq!(std::fs::read_dir(cp.join("ExperimentRuns/TS_synth_1/Picks")).unwrap().count(), 6);
    assert!(out.exists());
}

/// A job stopped by SIGTERM after its first run: the runs folder and that run's STAR file stay
/// (for --resume), the copick folder it made and has not yet written to goes, and no CSV is left.
#[test]
fn a_stopped_job_keeps_finished_runs_and_removes_its_empty_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    assert!(fastdet().arg("synth").arg(&data).args(["--runs", "6", "--shape", "64,128,128"]).output().unwrap().status.success());
    let (out, copick, star) = (tmp.path().join("sub.csv"), tmp.path().join("cp"), tmp.path().join("star"));
    let job = |c: &mut Command| {
        c.args(["--split", "test", "--copick-out"]).arg(&copick).arg("--star-out").arg(&star);
    };
    let mut c = cheap_run(&data, &out);
    job(&mut c);
    let mut child = c.stderr(std::process::Stdio::null()).spawn().unwrap();
    let first = tmp.path().join("sub.csv.runs/TS_synth_1.csv");
    let t0 = Instant::now();
    while !first.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no run finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill with a child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    assert!(!copick.exists() && !out.exists(), "{:?}", std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect::<Vec<_>>());
    assert!(star.join("TS_synth_1.star").exists() && first.exists());
    // Resumed, the job ends with every output.
    let mut c = cheap_run(&data, &out);
    job(&mut c);
    let o = c.arg("--resume").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("TS_synth_1: ") && err.contains("(resumed)"), "{err}");
    assert!(out.exists() && copick.join("ExperimentRuns/TS_synth_6/Picks").is_dir() && star.join("TS_synth_6.star").exists());
}

/// `--resume` on the other kind of device (the CPU's f32 after a GPU's fp16, or back): the runs
/// already stored are kept, with a note, and the rest computed there; the record then names both
/// precisions. Runs an older fastdet stored on a GPU (digested with the precision) are kept too.
#[test]
fn resume_on_the_other_kind_of_device_keeps_the_finished_runs() {
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("tests/fixtures/dataset");
    let out = tmp.path().join("sub.csv");
    assert!(cheap_run(&data, &out).args(["--device", "cpu"]).status().unwrap().success());
    let parts = tmp.path().join("sub.csv.runs");
    std::fs::remove_file(parts.join("TS_synth_2.csv")).unwrap();
    // On the CUDA engine (its emulator here): run 1 kept from the CPU, run 2 computed in fp16.
    let o = cheap_run(&data, &out).args(["--resume", "--device", "emu"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("--resume: 1 finished run(s) in ") && err.contains(" were computed in f32 on the CPU; this job computes in fp16 on a GPU: they are kept"), "{err}");
    assert_eq!(err.matches("(resumed)").count(), 1, "only run 1 is resumed: {err}");
    let settings = std::fs::read_to_string(parts.join("settings.json")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&settings).unwrap();
    assert_eq!(record["precision"], serde_json::json!(["f32", "fp16"]), "{settings}");
    // And back on the CPU: both stored runs kept.
    let o = cheap_run(&data, &out).args(["--resume", "--device", "cpu"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("2 finished run(s) in ") && err.contains(" were computed in f32 on the CPU and fp16 on a GPU; this job computes in f32 on the CPU"), "{err}");
    assert_eq!(err.matches("(resumed)").count(), 2, "{err}");
    // A run stored by an older fastdet on a GPU: its record's digest is that of the whole
    // settings record, precision included.
    let settings = std::fs::read_to_string(parts.join("settings.json")).unwrap();
    let source = parts.join("TS_synth_2.source");
    let mut rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&source).unwrap()).unwrap();
    rec["settings_sha256"] = serde_json::json!(format!("{:x}", sha2::Sha256::digest(settings.as_bytes())));
    std::fs::write(&source, serde_json::to_string_pretty(&rec).unwrap()).unwrap();
    let o = cheap_run(&data, &out).args(["--resume", "--device", "emu"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.matches("(resumed)").count() == 2, "{err}");
    // Another setting still refuses the resume.
    let o = cheap_run(&data, &out).args(["--resume", "--device", "cpu", "--iou", "0.5"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("changed: iou, precision"), "{err}");
}
