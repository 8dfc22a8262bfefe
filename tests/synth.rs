//! `fastdet::synth` and `fastdet synth`: the port of `reference/synth.py`.

use fastdet::io::copick::read_truth;
use fastdet::io::dataset::Layout;
use fastdet::io::zarr::read_zarr_volume;
use fastdet::particles::{Pick, ANGSTROM_PER_VOXEL, CLASSES};
use fastdet::synth::{tomogram_path, write_dataset, SynthConfig, FIXTURE_COUNTS, FIXTURE_NOISE, FIXTURE_SHAPE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn fastdet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fastdet"))
}

/// Every file under `dir` (relative path → bytes).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(p.strip_prefix(base).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn small(seed: u64) -> SynthConfig {
    SynthConfig { runs: 2, shape: [48, 72, 88], seed, particles_per_class: [3, 2, 1, 2, 1, 2], ..SynthConfig::default() }
}

#[test]
fn same_seed_gives_identical_bytes() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert_eq!(write_dataset(a.path(), &small(5)).unwrap().runs, vec!["TS_synth_1", "TS_synth_2"]);
    write_dataset(b.path(), &small(5)).unwrap();
    write_dataset(c.path(), &small(6)).unwrap();
    let (ta, tb, tc) = (tree(a.path()), tree(b.path()), tree(c.path()));
    // 2 runs x (group .zgroup/.zattrs + 3 x .zarray + chunks, 6 picks files)
    assert!(ta.len() > 2 * (2 + 3 + 6), "{:?}", ta.keys().collect::<Vec<_>>());
    assert!(ta.keys().any(|k| k.ends_with("denoised.zarr/0/0.1.0")));
    assert!(ta.keys().any(|k| k.ends_with("Picks/ribosome.json")));
    assert!(ta == tb, "same seed, different bytes");
    assert_eq!(ta.keys().collect::<Vec<_>>(), tc.keys().collect::<Vec<_>>());
    let chunk = |t: &BTreeMap<PathBuf, Vec<u8>>| {
        t.iter().find(|(k, _)| k.ends_with("TS_synth_1/VoxelSpacing10.000/denoised.zarr/0/0.0.0")).unwrap().1.clone()
    };
    assert_ne!(chunk(&ta), chunk(&tc), "another seed, same tomogram");
    // the two runs of one dataset differ too
    let run2 = ta.iter().find(|(k, _)| k.ends_with("TS_synth_2/VoxelSpacing10.000/denoised.zarr/0/0.0.0")).unwrap().1;
    assert_ne!(&chunk(&ta), run2);
    // an existing run is not overwritten
    let e = write_dataset(a.path(), &small(5)).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn volume_reads_back_with_levels_and_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SynthConfig { runs: 1, ..small(1) };
    write_dataset(tmp.path(), &cfg).unwrap();
    let z = tomogram_path(tmp.path(), "test", "TS_synth_1");
    let v0 = read_zarr_volume(&z, "0").unwrap();
    assert_eq!(v0.shape, [48, 72, 88]);
    assert!((v0.voxel_size.unwrap() - 10.012).abs() < 1e-9, "{:?}", v0.voxel_size);
    assert!(v0.data.iter().all(|v| v.is_finite()));
    let (lo, hi) = v0.data.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(lo < hi, "constant volume");
    let v1 = read_zarr_volume(&z, "1").unwrap();
    let v2 = read_zarr_volume(&z, "2").unwrap();
    assert_eq!(v1.shape, [24, 36, 44]);
    assert_eq!(v2.shape, [12, 18, 22]);
    assert!((v1.voxel_size.unwrap() - 20.024).abs() < 1e-9);
    assert!((v2.voxel_size.unwrap() - 40.048).abs() < 1e-9);
    // level 1 is the 2x2x2 mean of level 0, level 2 that of level 1
    for (fine, coarse) in [(&v0, &v1), (&v1, &v2)] {
        for &(z, y, x) in &[(0, 0, 0), (3, 7, 11), (coarse.shape[0] - 1, coarse.shape[1] - 1, coarse.shape[2] - 1)] {
            let mut m = 0.0f64;
            for (dz, dy, dx) in (0..8).map(|k| (k >> 2, (k >> 1) & 1, k & 1)) {
                m += fine.get(2 * z + dz, 2 * y + dy, 2 * x + dx) as f64 / 8.0;
            }
            let got = coarse.get(z, y, x) as f64;
            assert!((got - m).abs() <= 1e-6 * m.abs() + 1e-12, "({z},{y},{x}): {got} vs {m}");
        }
    }
    // the metadata is the fixture's (chunks 64³ clipped to the shape, blosc zstd 5 + shuffle)
    let zarray: serde_json::Value = serde_json::from_slice(&std::fs::read(z.join("0/.zarray")).unwrap()).unwrap();
    let fixture = root().join("tests/fixtures/dataset/test/static/ExperimentRuns/TS_synth_1/VoxelSpacing10.000/denoised.zarr");
    let want: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture.join("0/.zarray")).unwrap()).unwrap();
    assert_eq!(zarray["compressor"], want["compressor"]);
    assert_eq!(zarray["chunks"], serde_json::json!([48, 64, 64]));
    for key in ["dtype", "fill_value", "order", "filters", "dimension_separator", "zarr_format"] {
        assert_eq!(zarray[key], want[key], "{key}");
    }
    let attrs: serde_json::Value = serde_json::from_slice(&std::fs::read(z.join(".zattrs")).unwrap()).unwrap();
    let want: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture.join(".zattrs")).unwrap()).unwrap();
    assert_eq!(attrs, want);
    assert_eq!(std::fs::read(z.join(".zgroup")).unwrap(), std::fs::read(fixture.join(".zgroup")).unwrap());
}

fn radius_a(p: &Pick) -> f64 {
    CLASSES[p.class].radius_a
}

#[test]
fn picks_are_inside_in_angstrom_and_do_not_overlap() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SynthConfig { runs: 3, seed: 42, ..SynthConfig::default() };
    write_dataset(tmp.path(), &cfg).unwrap();
    let truth = read_truth(&Layout::split(tmp.path(), "test")).unwrap();
    let [d, h, w] = cfg.shape;
    for run in ["TS_synth_1", "TS_synth_2", "TS_synth_3"] {
        let picks: Vec<&Pick> = truth.iter().filter(|p| p.run == run).collect();
        // the fixture's density: every requested particle fits
        for (c, &n) in FIXTURE_COUNTS.iter().enumerate() {
            assert_eq!(picks.iter().filter(|p| p.class == c).count(), n, "{run} {}", CLASSES[c].name);
        }
        for p in &picks {
            assert_eq!(p.score, 1.0);
            // Å: voxel centre (i + 0.5) x 10.012, at least 0.6 radius from every border
            let r = radius_a(p);
            for (v, len) in [(p.x, w), (p.y, h), (p.z, d)] {
                let len_a = len as f64 * ANGSTROM_PER_VOXEL;
                assert!(v >= 0.6 * r - 0.5 * ANGSTROM_PER_VOXEL && v <= len_a - 0.6 * r + 0.5 * ANGSTROM_PER_VOXEL, "{p:?}");
                let frac = (v / ANGSTROM_PER_VOXEL).fract();
                assert!((frac - 0.5).abs() < 1e-6, "not a voxel centre: {p:?}");
            }
        }
        for (i, a) in picks.iter().enumerate() {
            for b in &picks[i + 1..] {
                let dist = ((a.x - b.x).powi(2) + (a.y - b.y).powi(2) + (a.z - b.z).powi(2)).sqrt();
                assert!(dist > radius_a(a) + radius_a(b), "overlap: {a:?} {b:?} at {dist} Å");
            }
        }
    }
    // the picks JSON is the fixture's format
    let mine: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("test/overlay/ExperimentRuns/TS_synth_1/Picks/ribosome.json")).unwrap(),
    )
    .unwrap();
    let want: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/dataset/test/overlay/ExperimentRuns/TS_synth_1/Picks/ribosome.json")).unwrap(),
    )
    .unwrap();
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&mine), keys(&want));
    assert_eq!(keys(&mine["points"][0]), keys(&want["points"][0]));
    for k in ["pickable_object_name", "user_id", "session_id", "run_name", "voxel_spacing", "unit", "trust_orientation"] {
        assert_eq!(mine[k], want[k], "{k}");
    }
    let matrix = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap())).collect()
    };
    assert_eq!(matrix(&mine["points"][0]["transformation_"]), matrix(&want["points"][0]["transformation_"]));
    assert_eq!(mine["points"][0]["instance_id"], want["points"][0]["instance_id"]);
}

/// Value at the voxel holding a point given in Å, offset by `dz, dy, dx` voxels.
fn at(v: &fastdet::io::zarr::Volume, p: &Pick, off: [i64; 3]) -> f32 {
    let i = |a: f64, o: i64| ((a / ANGSTROM_PER_VOXEL).floor() as i64 + o) as usize;
    v.get(i(p.z, off[0]), i(p.y, off[1]), i(p.x, off[2]))
}

/// synth.py's particles are dense (positive density) and the volume is flipped (`-v * 1e-5 + 2e-6`):
/// particles are darker than the background. Solid kinds are dark at their centre, the shells on
/// their rim; the hollow centres of the shells and of beta-galactosidase's lobes are not.
#[test]
fn particles_are_darker_than_background() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SynthConfig { runs: 2, seed: 3, noise: 0.35, ..SynthConfig::default() };
    write_dataset(tmp.path(), &cfg).unwrap();
    let truth = read_truth(&Layout::split(tmp.path(), "test")).unwrap();
    for run in ["TS_synth_1", "TS_synth_2"] {
        let v = read_zarr_volume(&tomogram_path(tmp.path(), "test", run), "0").unwrap();
        let picks: Vec<&Pick> = truth.iter().filter(|p| p.run == run).collect();
        // background: voxels farther than 1.2 radius + 2 voxels from every particle
        let [d, h, w] = v.shape;
        let (mut sum, mut sq, mut n) = (0.0f64, 0.0f64, 0usize);
        for z in 0..d {
            for y in 0..h {
                for x in 0..w {
                    let c = [x, y, z].map(|i| (i as f64 + 0.5) * ANGSTROM_PER_VOXEL);
                    let free = picks.iter().all(|p| {
                        let dd = (p.x - c[0]).powi(2) + (p.y - c[1]).powi(2) + (p.z - c[2]).powi(2);
                        dd.sqrt() > 1.2 * radius_a(p) + 2.0 * ANGSTROM_PER_VOXEL
                    });
                    if free {
                        let val = v.get(z, y, x) as f64;
                        sum += val;
                        sq += val * val;
                        n += 1;
                    }
                }
            }
        }
        assert!(n > 10_000, "{n}");
        let bg = sum / n as f64;
        let bg_std = (sq / n as f64 - bg * bg).sqrt();
        assert!((bg - 2e-6).abs() < 1e-6, "background mean {bg}");
        for p in &picks {
            let name = CLASSES[p.class].name;
            let value = match name {
                "ribosome" | "thyroglobulin" | "beta-amylase" => at(&v, p, [0, 0, 0]),
                // shells: 5 (ferritin, shell 3.8..6.0 voxels) or 12 voxels (VLP, 10.5..13.5) out
                "apo-ferritin" => (at(&v, p, [5, 0, 0]) + at(&v, p, [-5, 0, 0]) + at(&v, p, [0, 5, 0]) + at(&v, p, [0, -5, 0])) / 4.0,
                "virus-like-particle" => {
                    let side = |o: [i64; 3]| {
                        let q = [p.z, p.y, p.x].map(|a| (a / ANGSTROM_PER_VOXEL).floor() as i64);
                        (0..3).all(|k| q[k] + o[k] >= 0 && ((q[k] + o[k]) as usize) < v.shape[k])
                    };
                    let offs = [[12, 0, 0], [-12, 0, 0], [0, 12, 0], [0, -12, 0], [0, 0, 12], [0, 0, -12]];
                    let vals: Vec<f32> = offs.iter().filter(|o| side(**o)).map(|o| at(&v, p, *o)).collect();
                    vals.iter().sum::<f32>() / vals.len() as f32
                }
                _ => continue, // beta-galactosidase: four lobes around an empty centre
            } as f64;
            assert!(value < bg - 2.0 * bg_std, "{run} {name} at {p:?}: {value} not darker than background {bg} ± {bg_std}");
        }
    }
}

/// Mean, and background covariance along x at lags 0, 1 and 10 voxels (voxels farther than
/// 1.2 radius + 2 voxels from every particle), in units of 1e-12 (density² x 100).
fn background_stats(v: &fastdet::io::zarr::Volume, picks: &[&Pick]) -> (f64, [f64; 3]) {
    let [d, h, w] = v.shape;
    let mut mask = vec![false; d * h * w];
    let (mut sum, mut n) = (0.0f64, 0usize);
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                let c = [x, y, z].map(|i| (i as f64 + 0.5) * ANGSTROM_PER_VOXEL);
                let free = picks.iter().all(|p| {
                    let dd = (p.x - c[0]).powi(2) + (p.y - c[1]).powi(2) + (p.z - c[2]).powi(2);
                    dd.sqrt() > 1.2 * radius_a(p) + 2.0 * ANGSTROM_PER_VOXEL
                });
                mask[(z * h + y) * w + x] = free;
                if free {
                    sum += v.get(z, y, x) as f64;
                    n += 1;
                }
            }
        }
    }
    let m = sum / n as f64;
    let mut cov = [(0.0f64, 0usize); 3];
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                if !mask[(z * h + y) * w + x] {
                    continue;
                }
                for (k, l) in [0usize, 1, 10].into_iter().enumerate() {
                    if x + l < w && mask[(z * h + y) * w + x + l] {
                        cov[k].0 += (v.get(z, y, x) as f64 - m) * (v.get(z, y, x + l) as f64 - m) * 1e12;
                        cov[k].1 += 1;
                    }
                }
            }
        }
    }
    (m, cov.map(|(s, n)| s / n as f64))
}

/// Our tomograms have the fixture's (synth.py's) statistics: background level, the white noise's
/// strength and blur (lags 0 and 1) and the smooth background field (lag 10). The fixture measures
/// as noise ≈ 0.8 (FIXTURE_NOISE), not synth.py's default 0.35: with 0.35 only the white-noise part
/// is smaller.
#[test]
fn statistics_match_the_synth_py_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SynthConfig { seed: 9, noise: FIXTURE_NOISE, ..SynthConfig::default() };
    write_dataset(tmp.path(), &cfg).unwrap();
    let quiet = tempfile::tempdir().unwrap();
    write_dataset(quiet.path(), &SynthConfig { seed: 9, noise: 0.35, ..SynthConfig::default() }).unwrap();
    let fixture_root = root().join("tests/fixtures/dataset");
    let (ft, mt, qt) =
        (read_truth(&Layout::split(&fixture_root, "test")).unwrap(), read_truth(&Layout::split(tmp.path(), "test")).unwrap(), read_truth(&Layout::split(quiet.path(), "test")).unwrap());
    let of = |t: &[Pick], run: &str| -> Vec<Pick> { t.iter().filter(|p| p.run == run).cloned().collect() };
    for run in ["TS_synth_1", "TS_synth_2"] {
        let stats = |base: &Path, t: &[Pick]| {
            let v = read_zarr_volume(&tomogram_path(base, "test", run), "0").unwrap();
            assert_eq!(v.shape, FIXTURE_SHAPE);
            let p = of(t, run);
            background_stats(&v, &p.iter().collect::<Vec<_>>())
        };
        let (fm, fc) = stats(&fixture_root, &ft);
        let (mm, mc) = stats(tmp.path(), &mt);
        let (qm, qc) = stats(quiet.path(), &qt);
        eprintln!("{run}: background mean, cov lag 0/1/10: fixture {fm:.3e} {fc:.3?}; noise 0.8 {mm:.3e} {mc:.3?}; noise 0.35 {qm:.3e} {qc:.3?}");
        for m in [mm, qm] {
            assert!((m - fm).abs() < 2e-7, "background mean {m} vs fixture {fm}");
        }
        assert!((mc[0] / fc[0] - 1.0).abs() < 0.1, "variance {} vs fixture {}", mc[0], fc[0]);
        assert!((mc[1] / mc[0] - fc[1] / fc[0]).abs() < 0.03, "lag-1 correlation {mc:?} vs fixture {fc:?}");
        // the smooth field (blur 6, x4) and the noise: lag 10 is all field
        for c in [mc, qc] {
            assert!((c[2] / fc[2] - 1.0).abs() < 0.35, "lag-10 covariance {} vs fixture {}", c[2], fc[2]);
        }
        // white noise part of the variance scales with noise²
        let white = |c: [f64; 3]| c[0] - c[2] * 2.0;
        let ratio = white(qc) / white(fc);
        let want = (0.35f64 / FIXTURE_NOISE as f64).powi(2);
        assert!((ratio / want - 1.0).abs() < 0.15, "noise 0.35 white variance ratio {ratio} vs {want}");
    }
}

#[test]
fn cli_refuses_non_empty_out_and_documents_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let o = fastdet().arg("synth").arg(&out).args(["--runs", "1", "--shape", "16,32,32"]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refusing to overwrite") && err.contains("ds"), "{err}");
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

    // an empty directory or a new path is fine
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for dir in [empty, tmp.path().join("new")] {
        let o = fastdet()
            .arg("synth")
            .arg(&dir)
            .args(["--runs", "1", "--shape", "32,48,48", "--seed", "4", "--split", "train", "--counts", "1,1,0,1,0,1"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let truth = read_truth(&Layout::split(&dir, "train")).unwrap();
        assert_eq!(truth.len(), 4, "{truth:?}");
        let v = read_zarr_volume(&tomogram_path(&dir, "train", "TS_synth_1"), "0").unwrap();
        assert_eq!(v.shape, [32, 48, 48]);
        // Nothing but the dataset: no hidden unfinished copy, inside or beside.
        let names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["train"]);
    }
    // A link (here one to nothing) is refused before anything is made.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &link).unwrap();
    let o = fastdet().arg("synth").arg(&link).args(["--runs", "1", "--shape", "16,32,32"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("is a symbolic link"), "{}", String::from_utf8_lossy(&o.stderr));
    // The empty folder given stays the same folder (its permissions, a mount point).
    use std::os::unix::fs::PermissionsExt;
    let kept = tmp.path().join("kept");
    std::fs::create_dir(&kept).unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o2750)).unwrap();
    assert!(fastdet().arg("synth").arg(&kept).args(["--runs", "1", "--shape", "16,32,32"]).status().unwrap().success());
    assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o7777, 0o2750);
    let partial: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.contains("partial")).collect();
    assert!(partial.is_empty(), "{partial:?}");

    let o = fastdet().args(["synth", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    for needle in ["[default: 2]", "[default: 80,160,160]", "[default: 0]", "[default: test]", "[default: 0.8]", "voxels", "Å", "Example:", "fastdet synth "] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
    let o = fastdet().args(["synth"]).arg(tmp.path().join("bad")).args(["--shape", "1,2"]).output().unwrap();
    assert!(!o.status.success());
}

/// The demo models were trained on synth.py tomograms: on ours they must score as on the fixture.
#[test]
fn demo_models_find_synthesized_particles() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let st = fastdet().arg("synth").arg(&data).args(["--runs", "2", "--shape", "80,160,160", "--seed", "2024"]).status().unwrap();
    assert!(st.success());
    let sub = tmp.path().join("sub.csv");
    let st = fastdet()
        .args(["run", "--data"])
        .arg(&data)
        .arg("--weights")
        .arg(root().join("weights/demo_segresnetv2.safetensors"))
        .arg(root().join("weights/demo_dynunet.safetensors"))
        .args(["--window", "64,96,96", "--tiles", "2,3,3", "--out"])
        .arg(&sub)
        .status()
        .unwrap();
    assert!(st.success());
    let o = fastdet().args(["score", "--json", "--split", "test", "--truth"]).arg(&data).arg(&sub).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fbeta = s["fbeta"].as_f64().unwrap();
    eprintln!("F-beta on synthesized data: {fbeta}");
    assert!(fbeta > 0.9, "F-beta {fbeta}: {s}");
}

/// A dataset that cannot be written whole leaves nothing of itself behind (here the truth folder
/// is blocked by a file, after the first tomogram was written); a shape no volume can hold is an
/// error before anything is allocated or written; `fastdet synth` reports how many particles it
/// could place when the volume has no room for the requested ones.
#[test]
fn a_failed_dataset_leaves_nothing_and_placements_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("test")).unwrap();
    std::fs::write(tmp.path().join("test/overlay"), b"in the way").unwrap();
    let e = write_dataset(tmp.path(), &small(5)).unwrap_err();
    assert!(format!("{e:#}").contains("removed"), "{e:#}");
    assert!(!tmp.path().join("test/static/ExperimentRuns/TS_synth_1").exists());

    let huge = SynthConfig { shape: [2000, 2000, 2000], ..small(1) };
    let e = write_dataset(tmp.path(), &huge).unwrap_err();
    assert!(format!("{e:#}").contains("8000000000 voxels"), "{e:#}");

    let out = tmp.path().join("crowded");
    let o = fastdet().arg("synth").arg(&out).args(["--runs", "1", "--shape", "32,64,64", "--counts", "500,0,0,0,0,0"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let placed = read_truth(&Layout::split(&out, "test")).unwrap().len();
    assert!(placed < 500);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("apo-ferritin {placed}/500")) && err.contains(&format!("{placed} of 500 placed")), "{err}");
}
