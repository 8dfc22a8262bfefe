//! Run configuration files, MRC input, STAR and QC outputs through `fastdet run`.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn fastdet() -> Command {
    common::fastdet_on_cpu()
}

fn stdout_of(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The `split` of a printed configuration.
fn t_split(text: &str) -> Option<String> {
    let t: toml::Table = text.parse().unwrap();
    t.get("split").and_then(|v| v.as_str()).map(str::to_string)
}

#[test]
fn config_file_values_and_flag_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        "data = \"data\"\nweights = [\"w/a.safetensors\", \"w/b.safetensors\"]\nwindow = [64, 96, 96]\ntiles = [2, 3, 3]\n\
         with_score = true\ndevice_blend = false\n[thresholds]\nribosome = 0.3\n",
    )
    .unwrap();
    let text = stdout_of(fastdet().args(["run", "--print-config", "--tiles", "1,1,1", "--config"]).arg(&cfg));
    let t: toml::Table = text.parse().unwrap();
    // Relative paths are relative to the config file; the flag beats the file; other values are seed defaults.
    assert_eq!(t["data"].as_str().unwrap(), tmp.path().join("data").to_str().unwrap());
    assert_eq!(t["weights"].as_array().unwrap().len(), 2);
    assert_eq!(t["tiles"].as_array().unwrap().iter().map(|v| v.as_integer().unwrap()).collect::<Vec<_>>(), vec![1, 1, 1]);
    assert_eq!(t["window"].as_array().unwrap()[1].as_integer(), Some(96));
    assert_eq!(t["thresholds"]["ribosome"].as_float(), Some(0.3));
    assert_eq!(t["thresholds"]["apo-ferritin"].as_float(), Some(0.255));
    assert_eq!(t["iou"].as_float(), Some(0.85));
    assert_eq!(t["with_score"].as_bool(), Some(true));
    assert_eq!(t["device_blend"].as_bool(), Some(false), "the file turns the default off");

    // `-o` is --out, and beats the file's `out` as --out does.
    let with_out = tmp.path().join("with_out.toml");
    std::fs::write(&with_out, "data = \"data\"\nout = \"from_file.csv\"\n").unwrap();
    for args in [&["-o", "cli.csv"][..], &["-ocli.csv"], &["--out", "cli.csv"]] {
        let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config"]).args(args).arg("--config").arg(&with_out)).parse().unwrap();
        assert!(t["out"].as_str().unwrap().ends_with("/cli.csv"), "{args:?}: {t:?}");
    }
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&with_out)).parse().unwrap();
    assert_eq!(t["out"].as_str().unwrap(), tmp.path().join("from_file.csv").to_str().unwrap());

    // An error about a value the file gave says it came from the file.
    let bad = tmp.path().join("bad.toml");
    for (text, flag) in [("[thresholds]\nribosome = 1.5\n", "`thresholds`"), ("tta = \"rot\"\n", "`tta`"), ("window = [64, 96]\n", "`window`")] {
        std::fs::write(&bad, text).unwrap();
        let o = fastdet().args(["run", "--print-config", "--config"]).arg(&bad).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.code() == Some(1) && err.contains(&format!("note: the value of {flag} came from the config file {}", bad.display())), "{text}: {err}");
    }
    // Not for an option given on the command line.
    std::fs::write(&bad, "data = \"data\"\n").unwrap();
    let o = fastdet().args(["run", "--print-config", "--tta", "rot", "--config"]).arg(&bad).output().unwrap();
    assert!(o.status.code() == Some(1) && !String::from_utf8_lossy(&o.stderr).contains("came from the config file"), "{}", String::from_utf8_lossy(&o.stderr));

    // The printed configuration reads back to itself.
    let again = tmp.path().join("again.toml");
    std::fs::write(&again, &text).unwrap();
    let text2 = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&again));
    assert_eq!(text, text2);

    // Unknown keys and classes are errors naming the file.
    std::fs::write(&cfg, "windwo = [1,2,3]\n").unwrap();
    let o = fastdet().args(["run", "--print-config", "--config"]).arg(&cfg).output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("run.toml") && e.contains("windwo"), "{e}");
    std::fs::write(&cfg, "[thresholds]\nribosom = 0.1\n").unwrap();
    let o = fastdet().args(["run", "--print-config", "--config"]).arg(&cfg).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown class \"ribosom\""));

    // Values of the wrong kind are errors naming the file and the key.
    for (text, key) in [("batch = -1\n", "`batch` must be a whole number"), ("resume = 1\n", "`resume` must be true or false"), ("runs = 5\n", "`runs` must be a list of strings"), ("window = [1.5, 2, 3]\n", "`window` must be a list of three")] {
        std::fs::write(&cfg, text).unwrap();
        let o = fastdet().args(["run", "--print-config", "--config"]).arg(&cfg).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("run.toml") && e.contains(key), "{text}: {e}");
    }
    // Ids written as numbers are ids; a negative threshold is named as such, not taken for a flag.
    std::fs::write(&cfg, "session_id = 7\n").unwrap();
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&cfg)).parse().unwrap();
    assert_eq!(t["session_id"].as_str(), Some("7"));
    std::fs::write(&cfg, "[thresholds]\nribosome = -0.5\n").unwrap();
    let o = fastdet().args(["run", "--print-config", "--config"]).arg(&cfg).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("ribosome = -0.5 is not a probability"), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(&cfg, "device = \"cpu\"\ngpus = [0]\n").unwrap();
    let o = fastdet().args(["run", "--print-config", "--config"]).arg(&cfg).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("run.toml: give one of device, gpus and devices"));
    // The tomograms' voxel size from their files, resampled to the models' (here 7.84 Å): kept
    // and read back; any other word is an error naming the key.
    std::fs::write(&cfg, "voxel_size = \"file\"\nresample = true\nmodel_voxel_size = 7.84\ninvert = true\n").unwrap();
    let text = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&cfg));
    let t: toml::Table = text.parse().unwrap();
    assert_eq!((t["voxel_size"].as_str(), t["resample"].as_bool(), t["model_voxel_size"].as_float()), (Some("file"), Some(true), Some(7.84)), "{text}");
    assert_eq!(t["invert"].as_bool(), Some(true));
    // --no-KEY turns a file's true off; with KEY itself it is a contradiction.
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--no-invert", "--no-resample", "--config"]).arg(&cfg)).parse().unwrap();
    assert_eq!((t["invert"].as_bool(), t["resample"].as_bool(), t["voxel_size"].as_str()), (Some(false), Some(false), Some("file")));
    let o = fastdet().args(["run", "--print-config", "--no-invert", "--invert", "--config"]).arg(&cfg).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--invert and --no-invert contradict each other"), "{}", String::from_utf8_lossy(&o.stderr));
    // Tomograms named one by one: no competition split in the printed configuration, and it
    // reads back to itself.
    std::fs::write(&cfg, "zarr = [\"a.zarr\", \"b.zarr\"]\n").unwrap();
    let text = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&cfg));
    let t: toml::Table = text.parse().unwrap();
    assert!(t.get("split").is_none() && t["zarr"].as_array().map(|a| a.len()) == Some(2), "{text}");
    std::fs::write(&again, &text).unwrap();
    assert_eq!(stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&again)), text);
    // With the data root the split is kept.
    assert_eq!(t_split(&stdout_of(fastdet().args(["run", "--print-config", "--data", "d", "--split", "test"]))), Some("test".to_string()));
    std::fs::write(&again, "host_blend = true\n").unwrap();
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--no-host-blend", "--config"]).arg(&again)).parse().unwrap();
    assert_eq!(t["device_blend"].as_bool(), Some(true));
    // An empty list of another input gives no flag, and leaves the file's split to its data.
    std::fs::write(&cfg, "data = \"d\"\nsplit = \"train\"\nzarr = []\n").unwrap();
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&cfg)).parse().unwrap();
    assert_eq!((t["split"].as_str(), t.get("zarr")), (Some("train"), None));
    std::fs::write(&again, &text).unwrap();
    assert_eq!(stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&again)), text);
    std::fs::write(&cfg, "voxel_size = \"fine\"\n").unwrap();
    let o = fastdet().args(["run", "--print-config", "--config"]).arg(&cfg).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("`voxel_size` must be a number or \"file\""), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A printed configuration written anywhere reads back to the same paths (they are absolute),
/// names no `device` when `--gpus` chose the devices, and a device flag on the command line
/// replaces the file's device choice whatever its key.
#[test]
fn printed_config_reads_back_from_another_folder_and_devices_are_one_choice() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    let text = stdout_of(fastdet().current_dir(tmp.path()).args(["run", "--print-config", "--data", "d", "--weights", "w.safetensors", "--gpus", "0,1", "--out", "o.csv"]));
    let t: toml::Table = text.parse().unwrap();
    assert!(!t.contains_key("device"), "{text}");
    assert_eq!(t["data"].as_str().unwrap(), tmp.path().join("d").to_str().unwrap());
    let cfg = tmp.path().join("sub/run.toml");
    std::fs::write(&cfg, &text).unwrap();
    let back: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&cfg)).parse().unwrap();
    for key in ["data", "weights", "out", "gpus"] {
        assert_eq!(back[key], t[key], "{key}");
    }
    let cpu: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--device", "cpu", "--config"]).arg(&cfg)).parse().unwrap();
    assert_eq!(cpu["device"].as_str(), Some("cpu"));
    assert!(!cpu.contains_key("gpus"));
}

/// Blending on the device is the default; `--host-blend` (or `device_blend = false` /
/// `host_blend = true` in a file) turns it off, the command line wins, and the two flags conflict.
#[test]
fn device_blend_is_the_default_and_host_blend_turns_it_off() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    let blend = |file: Option<&str>, args: &[&str]| -> Option<bool> {
        let mut c = fastdet();
        c.args(["run", "--print-config"]).args(args);
        if let Some(text) = file {
            std::fs::write(&cfg, text).unwrap();
            c.arg("--config").arg(&cfg);
        }
        let t: toml::Table = stdout_of(&mut c).parse().unwrap();
        t["device_blend"].as_bool()
    };
    assert_eq!(blend(None, &[]), Some(true));
    assert_eq!(blend(None, &["--host-blend"]), Some(false));
    assert_eq!(blend(None, &["--device-blend"]), Some(true));
    assert_eq!(blend(Some("host_blend = true\n"), &[]), Some(false));
    assert_eq!(blend(Some("host_blend = false\n"), &[]), Some(true));
    assert_eq!(blend(Some("device_blend = true\n"), &[]), Some(true));
    assert_eq!(blend(Some("device_blend = false\n"), &["--device-blend"]), Some(true));
    assert_eq!(blend(Some("device_blend = true\n"), &["--host-blend"]), Some(false));
    assert_eq!(blend(Some("device_blend = false\nhost_blend = true\n"), &[]), Some(false));
    std::fs::write(&cfg, "device_blend = true\nhost_blend = true\n").unwrap();
    let o = fastdet().args(["run", "--print-config", "--config"]).arg(&cfg).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("run.toml: device_blend and host_blend contradict"));
    let o = fastdet().args(["run", "--print-config", "--host-blend", "--device-blend"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// An MRC copy of a tomogram gives the same picks as the zarr; STAR and QC files come out per run.
/// (The MRC run asks for --host-blend, which on a CPU worker changes nothing: same picks.)
#[test]
fn mrc_input_star_and_qc_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let zarr = root().join("tests/fixtures/dataset/test/static/ExperimentRuns/TS_synth_1/VoxelSpacing10.000/denoised.zarr");
    let vol = fastdet::io::zarr::read_zarr_volume(&zarr, "0").unwrap();
    let mrc = tmp.path().join("TS_synth_1.mrc");
    fastdet::io::mrc::write_mrc_f32(&mrc, vol.shape, &vol.data, 10.012).unwrap();
    let weights = root().join("weights/demo_segresnetv2.safetensors");
    let common = ["--window", "64,96,96", "--tiles", "1,2,2", "--with-score"];
    let a = tmp.path().join("zarr.csv");
    let b = tmp.path().join("mrc.csv");
    assert!(fastdet().args(["run", "--zarr"]).arg(&zarr).arg("--weights").arg(&weights).args(common).arg("--out").arg(&a).status().unwrap().success());
    let (star, qc) = (tmp.path().join("star"), tmp.path().join("qc"));
    let st = fastdet()
        .args(["run", "--mrc"])
        .arg(&mrc)
        .arg("--weights")
        .arg(&weights)
        .args(common)
        .arg("--out")
        .arg(&b)
        .arg("--star-out")
        .arg(&star)
        .arg("--qc")
        .arg(&qc)
        .arg("--host-blend")
        .status()
        .unwrap();
    assert!(st.success());
    let rows = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p).unwrap().lines().skip(1).map(|l| l.split(',').skip(1).collect::<Vec<_>>().join(",")).collect()
    };
    let zr = rows(&a);
    // The zarr run is named after its file stem ("denoised"); compare everything but the run column.
    let strip = |v: Vec<String>| -> Vec<String> { v.into_iter().map(|l| l.split_once(',').unwrap().1.to_string()).collect() };
    assert!(!zr.is_empty());
    assert_eq!(strip(zr.clone()), strip(rows(&b)));
    let s = fastdet::io::star::read_star_coordinates(&star.join("TS_synth_1.star")).unwrap();
    assert_eq!(s.len(), zr.len());
    // STAR pixel coordinates are the CSV's Å divided by the voxel size.
    let first: Vec<f64> = zr[0].split(',').skip(3).map(|v| v.parse().unwrap()).collect();
    assert!((s[0].2 - first[0] / 10.012).abs() < 1e-2, "{:?} vs {:?}", s[0], first);
    let png = std::fs::read(qc.join("TS_synth_1.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // `qc` reads the same inputs as `run`: the MRC file, or the zarr store (its run named from
    // the competition layout around it), each drawing every pick of the run.
    let picks = rows(&b).len();
    for (flag, input, dir) in [("--mrc", &mrc, "qc_mrc"), ("--zarr", &zarr, "qc_zarr")] {
        let o = fastdet().arg("qc").arg(flag).arg(input).arg("--picks").arg(&b).arg("-o").arg(tmp.path().join(dir)).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && text.starts_with(&format!("TS_synth_1: {picks} picks -> ")), "{flag}: {text}{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(&std::fs::read(tmp.path().join(dir).join("TS_synth_1.png")).unwrap()[1..4], b"PNG");
    }
    let o = fastdet().arg("qc").arg("--mrc").arg(&mrc).arg("--picks").arg(&b).args(["--truth", "-o"]).arg(tmp.path().join("qc_truth")).output().unwrap();
    assert!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("--truth draws a dataset's ground truth"));
    let o = fastdet().arg("qc").arg("--mrc").arg(&mrc).arg("--picks").arg(&b).args(["--runs", "TS_other", "-o"]).arg(tmp.path().join("qc_other")).output().unwrap();
    assert!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("run \"TS_other\" is not in the --mrc files given"));
    let o = fastdet().arg("qc").arg("--mrc").arg(&mrc).arg(tmp.path()).arg("--picks").arg(&b).arg("-o").arg(tmp.path().join("qc_dir")).output().unwrap();
    assert!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("a directory; --mrc takes MRC files"));
    let again = tmp.path().join("star").join("TS_synth_1.mrc");
    std::fs::copy(&mrc, &again).unwrap();
    let o = fastdet().arg("qc").arg("--mrc").arg(&mrc).arg(&again).arg("--picks").arg(&b).arg("-o").arg(tmp.path().join("qc_two")).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && e.contains("two --mrc inputs share the run name TS_synth_1: ") && e.contains("star/TS_synth_1.mrc"), "{e}");
}

/// A printed threshold reads back to the same f32 (a tuned threshold is a candidate's exact score,
/// and rounding it drops that candidate).
#[test]
fn printed_thresholds_read_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let next = |v: f32| f32::from_bits(v.to_bits() + 1);
    let th = [0.736_672_6_f32, next(0.3), next(0.16), 0.205, next(next(0.5)), 0.5];
    let arg = th.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",");
    let text = stdout_of(fastdet().args(["run", "--print-config", "--thresholds", &arg]));
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, &text).unwrap();
    let back: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&cfg)).parse().unwrap();
    let names = ["apo-ferritin", "beta-galactosidase", "ribosome", "thyroglobulin", "virus-like-particle", "beta-amylase"];
    for (name, v) in names.iter().zip(th) {
        assert_eq!(back["thresholds"][name].as_float().unwrap() as f32, v, "{name}");
    }
    // Short values stay short.
    assert!(text.contains("thyroglobulin = 0.205\n"), "{text}");
    // `resume` is printed; an input on the command line replaces the file's (and its runs).
    std::fs::write(&cfg, "data = \"d\"\nruns = [\"TS_1\"]\nresume = true\n").unwrap();
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&cfg)).parse().unwrap();
    assert_eq!(t["resume"].as_bool(), Some(true));
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--mrc", "a.mrc", "--config"]).arg(&cfg)).parse().unwrap();
    assert!(!t.contains_key("data") && !t.contains_key("runs") && t["mrc"].as_array().unwrap().len() == 1, "{t:?}");
    // Empty lists give no flag, whatever the key.
    std::fs::write(&cfg, "runs = []\ngpus = []\nweights = []\n").unwrap();
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&cfg)).parse().unwrap();
    assert_eq!(t["device"].as_str(), Some("auto"), "the default: the GPUs there are, else the CPU");
}

/// A copick project named by its configuration file: `run` finds the runs of its static root, the
/// picks go into its overlay (`--copick-out`), and `score` and `qc` take the annotators'
/// picks as the truth, beside fastdet's own. The picks are those of `--data` on the same files.
#[test]
fn copick_project_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = root().join("tests/fixtures/dataset/test");
    let overlay = tmp.path().join("overlay");
    common::copy_dir(&fixture.join("overlay"), &overlay);
    let cfg = tmp.path().join("copick.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"name": "sample", "config_type": "filesystem", "overlay_root": "local://{}", "static_root": "local://{}", "overlay_fs_args": {{"auto_mkdir": true}}, "pickable_objects": []}}"#,
            overlay.display(),
            fixture.join("static").display()
        ),
    )
    .unwrap();
    let weights = root().join("weights/demo_dynunet.safetensors");
    let common = ["--window", "64,96,96", "--tiles", "2,2,2", "--with-score"];
    let (by_data, by_config) = (tmp.path().join("data.csv"), tmp.path().join("config.csv"));
    let st = fastdet().args(["run", "--data"]).arg(root().join("tests/fixtures/dataset")).args(["--split", "test", "--weights"]).arg(&weights).args(common).arg("--out").arg(&by_data).status().unwrap();
    assert!(st.success());
    let o = fastdet().args(["run", "--copick-config"]).arg(&cfg).arg("--weights").arg(&weights).args(common).arg("--out").arg(&by_config).arg("--copick-out").arg(&overlay).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&by_config).unwrap();
    assert_eq!(text, std::fs::read_to_string(&by_data).unwrap());
    assert!(text.contains(",TS_synth_1,") && text.contains(",TS_synth_2,"), "{text}");
    assert!(overlay.join("ExperimentRuns/TS_synth_2/Picks/fastdet_0_ribosome.json").is_file());

    // The truth is the annotators' files, not fastdet's beside them: the same score as --truth.
    let total = |args: &[&std::ffi::OsStr]| -> String {
        let out = stdout_of(fastdet().arg("score").args(args).arg(&by_config));
        out.lines().find(|l| l.starts_with("total")).unwrap().to_string()
    };
    let with_config = total(&["--copick-config".as_ref(), cfg.as_os_str()]);
    assert_eq!(with_config, total(&["--truth".as_ref(), root().join("tests/fixtures/dataset").as_os_str(), "--split".as_ref(), "test".as_ref()]));
    let f: f64 = with_config.split_whitespace().last().unwrap().parse().unwrap();
    assert!(f > 0.5, "{with_config}");
    // A run it does not have is named with the project and both its roots.
    let o = fastdet().args(["score", "--runs", "TS_nope", "--copick-config"]).arg(&cfg).arg(&by_config).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("run \"TS_nope\" is not in copick project") && e.contains("overlay/ExperimentRuns and ") && e.contains("static/ExperimentRuns)"), "{e}");

    // qc draws the truth from the project too.
    let qc = tmp.path().join("qc");
    let o = fastdet().args(["qc", "--copick-config"]).arg(&cfg).arg("--picks").arg(&by_config).arg("--out").arg(&qc).args(["--truth", "--runs", "TS_synth_1"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = String::from_utf8_lossy(&o.stdout);
    assert!(line.contains("TS_synth_1:") && line.contains("truth"), "{line}");

    // The configuration file takes the key; its split would mean nothing and is refused.
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--copick-config"]).arg(&cfg)).parse().unwrap();
    assert_eq!(t["copick_config"].as_str(), Some(cfg.to_str().unwrap()));
    assert!(!t.contains_key("split") && t["tomogram"].as_str() == Some("denoised"));
    let o = fastdet().args(["run", "--print-config", "--split", "train", "--copick-config"]).arg(&cfg).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
    // A file's data and split give way to a project on the command line.
    let toml_file = tmp.path().join("run.toml");
    std::fs::write(&toml_file, "data = \"d\"\nsplit = \"train\"\n").unwrap();
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&toml_file).arg("--copick-config").arg(&cfg)).parse().unwrap();
    assert!(!t.contains_key("data") && !t.contains_key("split") && t.contains_key("copick_config"), "{t}");
    // So does a split the file keeps beside its own project.
    std::fs::write(&toml_file, format!("copick_config = {:?}\nsplit = \"train\"\n", cfg.to_str().unwrap())).unwrap();
    let t: toml::Table = stdout_of(fastdet().args(["run", "--print-config", "--config"]).arg(&toml_file)).parse().unwrap();
    assert!(!t.contains_key("split") && t["copick_config"].as_str() == Some(cfg.to_str().unwrap()), "{t}");

    // Storage fastdet does not read is named.
    std::fs::write(&cfg, r#"{"overlay_root": "s3://bucket/overlay"}"#).unwrap();
    let o = fastdet().args(["score", "--copick-config"]).arg(&cfg).arg(&by_config).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("copick.json") && e.contains("local paths only"), "{e}");
}
