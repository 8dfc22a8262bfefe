//! The bad-input matrix through `fastdet run` / `score`: each case gives a clear message naming the
//! file, a non-zero exit where the whole job cannot go on, no partial output, and other runs finish.

use fastdet::io::mrc::write_mrc_f32;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn synth1() -> fastdet::io::zarr::Volume {
    let z = root().join("tests/fixtures/dataset/test/static/ExperimentRuns/TS_synth_1/VoxelSpacing10.000/denoised.zarr");
    fastdet::io::zarr::read_zarr_volume(&z, "0").unwrap()
}

/// Each voxel of `v` repeated 2x2x2: the same tomogram in voxels of half the size.
fn repeated_2x(v: &fastdet::io::zarr::Volume) -> (Vec<f32>, [usize; 3]) {
    let [d, h, w] = v.shape;
    let data = (0..8 * d * h * w)
        .map(|i| {
            let (z, y, x) = (i / (4 * h * w), i / (2 * w) % (2 * h), i % (2 * w));
            v.data[((z / 2) * h + y / 2) * w + x / 2]
        })
        .collect();
    (data, [2 * d, 2 * h, 2 * w])
}

/// `run` on MRC files with the small demo model and a 64x96x96 window.
fn run_mrc(files: &[&Path], out: &Path, extra: &[&str]) -> Output {
    common::fastdet_on_cpu()
        .arg("run")
        .arg("--mrc")
        .args(files)
        .arg("--weights")
        .arg(root().join("weights/demo_segresnetv2.safetensors"))
        .arg(root().join("weights/demo_dynunet.safetensors"))
        .args(["--window", "64,96,96", "--tiles", "1,1,1", "--with-score", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn csv_rows(p: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(p).unwrap().lines().skip(1).map(|l| l.split(',').map(String::from).collect()).collect()
}

#[test]
fn nonfinite_voxels_are_refused_or_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let v = synth1();
    let mut data = v.data.clone();
    data[5] = f32::NAN;
    data[77] = f32::INFINITY;
    let bad = tmp.path().join("TS_bad.mrc");
    write_mrc_f32(&bad, v.shape, &data, 10.012).unwrap();
    let good = tmp.path().join("TS_good.mrc");
    write_mrc_f32(&good, v.shape, &v.data, 10.012).unwrap();
    let out = tmp.path().join("sub.csv");
    let o = run_mrc(&[&bad, &good], &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("TS_bad.mrc") && e.contains("2 of") && e.contains("--allow-nonfinite"), "{e}");
    let rows = csv_rows(&out);
    assert!(!rows.is_empty() && rows.iter().all(|r| r[1] == "TS_good"));

    let o = run_mrc(&[&bad, &good], &out, &["--allow-nonfinite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = csv_rows(&out);
    let (b, g): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r[1] == "TS_bad");
    // Two replaced voxels in a noisy volume change nothing the detector sees.
    assert_eq!(b.len(), g.len());
}

#[test]
fn constant_volume_gives_no_picks_and_no_error() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("flat.mrc");
    write_mrc_f32(&f, [64, 96, 96], &vec![3.5f32; 64 * 96 * 96], 10.012).unwrap();
    let out = tmp.path().join("sub.csv");
    let o = run_mrc(&[&f], &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("flat.mrc: every voxel is 3.5: no contrast"), "{}", stderr(&o));
    let rows = csv_rows(&out);
    // A flat input has no particle; whatever the biases give is the same everywhere (no peaks above
    // the seed thresholds is expected for the demo models).
    assert!(rows.len() <= 6, "{rows:?}");
}

/// A volume smaller than the window on every axis is zero-padded after normalisation (the seed's
/// semantics): its maps equal those of the same content normalised and padded by hand to the window,
/// cropped back to the volume.
#[test]
fn volume_smaller_than_the_window_is_padded() {
    let tmp = tempfile::tempdir().unwrap();
    let v = synth1();
    let (cd, ch, cw) = (56, 88, 88);
    let origin = [8usize, 72, 16];
    let mut crop = Vec::with_capacity(cd * ch * cw);
    for z in 0..cd {
        for y in 0..ch {
            let row = ((z + origin[0]) * v.shape[1] + y + origin[1]) * v.shape[2] + origin[2];
            crop.extend_from_slice(&v.data[row..row + cw]);
        }
    }
    let small = tmp.path().join("small.mrc");
    write_mrc_f32(&small, [cd, ch, cw], &crop, 10.012).unwrap();
    // By hand: normalise to [0, 1] (so min 0 and max 1 survive a second normalisation), pad with 0.
    let (lo, hi) = crop.iter().fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x as f64), h.max(x as f64)));
    let (wd, wh, ww) = (64, 96, 96);
    let mut padded = vec![0.0f32; wd * wh * ww];
    for z in 0..cd {
        for y in 0..ch {
            for x in 0..cw {
                padded[(z * wh + y) * ww + x] = ((crop[(z * ch + y) * cw + x] as f64 - lo) / (hi - lo)) as f32;
            }
        }
    }
    let big = tmp.path().join("big.mrc");
    write_mrc_f32(&big, [wd, wh, ww], &padded, 10.012).unwrap();
    let maps = tmp.path().join("maps");
    std::fs::create_dir(&maps).unwrap();
    let out = tmp.path().join("sub.csv");
    let o = run_mrc(&[&small, &big], &out, &["--save-maps", maps.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The maps say what they hold.
    let bytes = std::fs::read(maps.join("small.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["fastdet.run"], "small");
    assert_eq!(meta["fastdet.volume_shape"], format!("[{cd},{ch},{cw}]"));
    assert!(meta["fastdet.classes"].starts_with("[\"apo-ferritin\""), "{meta:?}");
    assert!(meta["fastdet.layout"].contains("axes x, y, z"), "{meta:?}");
    for name in ["scores", "offsets"] {
        let (ss, s) = fastdet::io::tensors::read_f32(&maps.join("small.safetensors"), name).unwrap();
        let (bs, b) = fastdet::io::tensors::read_f32(&maps.join("big.safetensors"), name).unwrap();
        assert_eq!(ss[1..], [cd / 2, ch / 2, cw / 2]);
        assert_eq!(bs[1..], [wd / 2, wh / 2, ww / 2]);
        let mut max = 0.0f32;
        for c in 0..ss[0] {
            for z in 0..cd / 2 {
                for y in 0..ch / 2 {
                    for x in 0..cw / 2 {
                        let a = s[((c * cd / 2 + z) * ch / 2 + y) * cw / 2 + x];
                        let b = b[((c * wd / 2 + z) * wh / 2 + y) * ww / 2 + x];
                        max = max.max((a - b).abs());
                    }
                }
            }
        }
        // Only the f32 rounding of the second normalisation differs.
        assert!(max < 1e-4, "{name}: max |diff| {max}");
    }
}

#[test]
fn other_voxel_size_warns_and_uses_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let v = synth1();
    let f = tmp.path().join("TS_synth_1.mrc");
    write_mrc_f32(&f, v.shape, &v.data, 5.0).unwrap();
    let a = tmp.path().join("a.csv");
    let o = run_mrc(&[&f], &a, &[]);
    assert!(o.status.success());
    let e = stderr(&o);
    assert!(e.contains("warning") && e.contains("TS_synth_1.mrc") && e.contains("voxel size is 5") && e.contains("give --voxel-size file (or 5) for coordinates in its own Å; its particles look 2.00x their size to the models, made for 10.012 Å: add --resample to bring it to theirs"), "{e}");
    let b = tmp.path().join("b.csv");
    assert!(run_mrc(&[&f], &b, &["--voxel-size", "20.024"]).status.success());
    let (pa, pb) = (fastdet::io::csv::read_submission(&a).unwrap(), fastdet::io::csv::read_submission(&b).unwrap());
    assert!(!pa.is_empty());
    // Same voxels, twice the Å per voxel. (The NMS radius in voxels halves, so counts may differ.)
    let top_a = &pa[0];
    let top_b = pb.iter().find(|p| p.class == top_a.class).unwrap();
    assert!((top_b.x - 2.0 * top_a.x).abs() < 0.05, "{top_a:?} {top_b:?}");
}

/// A tomogram of 5.006 Å voxels (each 10.012 Å voxel of the sample repeated 2x2x2) brought back to
/// the models' 10.012 Å by `--voxel-size file --resample`: the picks of the original, in the
/// same Å, and STAR coordinates in the fine tomogram's voxels.
#[test]
fn resample_brings_a_finer_tomogram_to_the_models() {
    let tmp = tempfile::tempdir().unwrap();
    let v = synth1();
    let coarse = tmp.path().join("TS_coarse.mrc");
    write_mrc_f32(&coarse, v.shape, &v.data, 10.012).unwrap();
    let (fine_data, fine_shape) = repeated_2x(&v);
    let fine = tmp.path().join("TS_fine.mrc");
    write_mrc_f32(&fine, fine_shape, &fine_data, 5.006).unwrap();
    drop(fine_data);

    let a = tmp.path().join("a.csv");
    assert!(run_mrc(&[&coarse], &a, &[]).status.success());
    let b = tmp.path().join("b.csv");
    let star = tmp.path().join("star");
    let o = run_mrc(&[&fine], &b, &["--voxel-size", "file", "--resample", "--star-out", star.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("TS_fine: resampled from 5.006 Å to 10.012 Å voxels, 160x320x320 to 80x160x160"), "{e}");
    let (pa, pb) = (fastdet::io::csv::read_submission(&a).unwrap(), fastdet::io::csv::read_submission(&b).unwrap());
    assert!(pa.len() >= 5, "{pa:?}");
    // The resampled volume is the original smoothed a little (taps 1/8, 3/4, 1/8 per axis):
    // every confident pick is found again within one voxel, and the counts stay close.
    let near = |p: &fastdet::particles::Pick, q: &fastdet::particles::Pick| p.class == q.class && ((p.x - q.x).powi(2) + (p.y - q.y).powi(2) + (p.z - q.z).powi(2)).sqrt() <= 10.012;
    let confident: Vec<_> = pa.iter().filter(|p| p.score >= 0.5).collect();
    assert!(!confident.is_empty());
    for p in &confident {
        assert!(pb.iter().any(|q| near(p, q)), "{p:?} not found again in {pb:?}");
    }
    assert!(pb.len().abs_diff(pa.len()) * 5 <= pa.len(), "{} vs {} picks", pb.len(), pa.len());
    // STAR: the fine tomogram's voxels (Å / 5.006), its centre at half its 320 voxels.
    let rows = fastdet::io::star::read_star_coordinates(&star.join("TS_fine.star")).unwrap();
    assert_eq!(rows.len(), pb.len());
    for (row, p) in rows.iter().zip(&pb) {
        assert!((row.2 - p.x / 5.006).abs() < 1e-3 && (row.4 - p.z / 5.006).abs() < 1e-3, "{row:?} {p:?}");
    }
    let text = std::fs::read_to_string(star.join("TS_fine.star")).unwrap();
    let first = text.lines().find(|l| l.starts_with("TS_fine ")).unwrap();
    let cols: Vec<f64> = first.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
    assert!((cols[3] - (cols[0] - 160.0) * 5.006).abs() < 0.01, "{first}");
    // Resumed with its STAR file gone: written again from the stored picks and their record of
    // the fine tomogram's voxel size and shape, the same bytes.
    std::fs::remove_file(star.join("TS_fine.star")).unwrap();
    let o = run_mrc(&[&fine], &b, &["--voxel-size", "file", "--resample", "--star-out", star.to_str().unwrap(), "--resume"]);
    let e = stderr(&o);
    assert!(o.status.success() && e.contains("(resumed;") && !e.contains("resampled from"), "{e}");
    assert_eq!(std::fs::read_to_string(star.join("TS_fine.star")).unwrap(), text);

    // Without --resample: the file's Å, and a warning that says what --resample would do.
    let c = tmp.path().join("c.csv");
    let o = run_mrc(&[&fine], &c, &["--voxel-size", "file"]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("voxel size 5.006 Å (the file's): its particles look 2.00x their size to the models, made for 10.012 Å; --resample brings it to theirs"), "{e}");
    // Models made for 5.006 Å see it as it is: the same picks, nothing resampled or warned.
    let m = tmp.path().join("m.csv");
    let o = run_mrc(&[&fine], &m, &["--voxel-size", "file", "--resample", "--model-voxel-size", "5.006"]);
    let e = stderr(&o);
    assert!(o.status.success() && !e.contains("resampled") && !e.contains("look"), "{e}");
    assert_eq!(std::fs::read(&m).unwrap(), std::fs::read(&c).unwrap());
    // Models made for 20.024 Å: the sample halved.
    let o = run_mrc(&[&coarse], &tmp.path().join("h.csv"), &["--voxel-size", "file", "--resample", "--model-voxel-size", "20.024"]);
    assert!(o.status.success() && stderr(&o).contains("TS_coarse: resampled from 10.012 Å to 20.024 Å voxels, 80x160x160 to 40x80x80"), "{}", stderr(&o));
    // A flag that disagrees with the file under --resample: what --voxel-size file would do.
    let o = run_mrc(&[&fine], &tmp.path().join("g.csv"), &["--resample", "--voxel-size", "7"]);
    let e = stderr(&o);
    assert!(o.status.success() && e.contains("give --voxel-size file (or 5.006) for coordinates in its own Å, and for --resample to bring it from 5.006 Å to the models' 10.012 Å"), "{e}");
    assert!(e.contains("resampled from 7 Å to 10.012 Å voxels"), "{e}");
    // ... and of a file at the models' voxel size, that --resample would leave it as it is; the
    // flag's own 7 Å is what the models see resampled.
    let o = run_mrc(&[&coarse], &tmp.path().join("g.csv"), &["--resample", "--voxel-size", "7"]);
    let e = stderr(&o);
    assert!(o.status.success() && e.contains("give --voxel-size file (or 10.012) for coordinates in its own Å, which --resample would read as it is (within 1% of the models' 10.012 Å)"), "{e}");
    // Without --resample: the flag's size is far from the models', and that is said too.
    let o = run_mrc(&[&coarse], &tmp.path().join("g.csv"), &["--voxel-size", "5"]);
    let e = stderr(&o);
    assert!(o.status.success() && e.contains("voxel size 5 Å (--voxel-size): its particles look 2.00x their size to the models"), "{e}");
    // --resample with a --voxel-size equal to the models' has nothing to do, and says so.
    let o = run_mrc(&[&coarse], &tmp.path().join("d.csv"), &["--resample"]);
    assert!(o.status.success() && stderr(&o).contains("so no tomogram is resampled; --voxel-size file takes each file's own"), "{}", stderr(&o));
    // A file that records no voxel size fails under --voxel-size file; the other runs go on.
    let unknown = tmp.path().join("TS_unknown.mrc");
    write_mrc_f32(&unknown, v.shape, &v.data, 0.0).unwrap();
    // So does one whose voxel size would make it hundreds of times larger (Å taken for nm).
    let nm = tmp.path().join("TS_nm.mrc");
    write_mrc_f32(&nm, v.shape, &v.data, 1001.2).unwrap();
    let f = tmp.path().join("f.csv");
    // And one that would shrink to nothing (a header's unset 1 Å).
    let unset = tmp.path().join("TS_unset.mrc");
    write_mrc_f32(&unset, v.shape, &v.data, 1.0).unwrap();
    let o = run_mrc(&[&unknown, &nm, &unset, &coarse], &f, &["--voxel-size", "file", "--resample"]);
    let e = stderr(&o);
    // 2: some runs failed, the others were written.
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("TS_unknown.mrc: the file records no voxel size, which --voxel-size file needs: give its size in Å instead"), "{e}");
    assert!(e.contains("TS_nm.mrc: resampling it from 1001.2 Å (the file's) to 10.012 Å voxels would make more than 1073741824 voxels: is that voxel size right?"), "{e}");
    assert!(e.contains("TS_unset.mrc: resampling it from 1 Å (the file's) to 10.012 Å voxels would make it 8x16x16 voxels, too small to find particles in: is that voxel size right? (1 Å is what a header that was never set holds)"), "{e}");
    let pf = fastdet::io::csv::read_submission(&f).unwrap();
    assert!(!pf.is_empty() && pf.iter().all(|p| p.run == "TS_coarse"), "{pf:?}");
    assert_eq!(pf.len(), pa.len());
}

/// `--level auto` reads, per tomogram, the multiscale level nearest the models' voxel size: of a
/// pyramid at 5.006, 10.012 and 20.024 Å, level 1, as `--level 1` reads it (nothing resampled).
#[test]
fn level_auto_reads_the_level_nearest_the_models() {
    let tmp = tempfile::tempdir().unwrap();
    let v = synth1();
    let (fine, fine_shape) = repeated_2x(&v);
    let store = tmp.path().join("TS_pyramid.zarr");
    fastdet::synth::write_ome_zarr(&store, &fine, fine_shape).unwrap();
    let zattrs = store.join(".zattrs");
    let mut attrs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&zattrs).unwrap()).unwrap();
    for (i, ds) in attrs["multiscales"][0]["datasets"].as_array_mut().unwrap().iter_mut().enumerate() {
        let s = 5.006 * f64::from(1u32 << i);
        ds["coordinateTransformations"][0]["scale"] = serde_json::json!([s, s, s]);
    }
    std::fs::write(&zattrs, attrs.to_string()).unwrap();
    let run = |out: &Path, extra: &[&str]| {
        common::fastdet_on_cpu()
            .args(["run", "--zarr"])
            .arg(&store)
            .arg("--weights")
            .arg(root().join("weights/demo_segresnetv2.safetensors"))
            .args(["--window", "64,96,96", "--tiles", "1,1,1", "--with-score", "--out"])
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let (a, b) = (tmp.path().join("a.csv"), tmp.path().join("b.csv"));
    let o = run(&a, &["--level", "1", "--voxel-size", "file"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&b, &["--level", "auto", "--voxel-size", "file", "--resample"]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("TS_pyramid: level 1 (10.012 Å) of 0 (5.006 Å), 1 (10.012 Å), 2 (20.024 Å), the nearest the models' 10.012 Å") && !e.contains("resampled"), "{e}");
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(!fastdet::io::csv::read_submission(&a).unwrap().is_empty());
    // The models' voxel size chooses the level, so a job resumed with another is refused.
    let o = run(&b, &["--level", "auto", "--voxel-size", "file", "--resample", "--resume", "--model-voxel-size", "20.024"]);
    assert!(!o.status.success() && stderr(&o).contains("(changed: model_voxel_size)"), "{}", stderr(&o));
    // Only `auto` itself is the choice: `Auto` is taken for a typo, not an array's name.
    let o = run(&tmp.path().join("c.csv"), &["--level", "Auto", "--voxel-size", "file"]);
    assert!(!o.status.success() && stderr(&o).contains("--level \"Auto\": did you mean auto"), "{}", stderr(&o));
    // The level is chosen by the file's voxel sizes, so a number is refused with it.
    let o = run(&tmp.path().join("c.csv"), &["--level", "auto"]);
    assert!(!o.status.success() && stderr(&o).contains("--level auto chooses each tomogram's level by the voxel sizes in its metadata: give --voxel-size file too"), "{}", stderr(&o));
}

/// A tomogram written with inverted contrast (particles bright): `--invert` gives the picks of the
/// original, byte for byte; without it the models see bright particles and find others.
#[test]
fn inverted_contrast_is_negated_before_scaling() {
    let tmp = tempfile::tempdir().unwrap();
    let v = synth1();
    let (plain, inverted) = (tmp.path().join("plain"), tmp.path().join("inverted"));
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::create_dir_all(&inverted).unwrap();
    write_mrc_f32(&plain.join("TS.mrc"), v.shape, &v.data, 10.012).unwrap();
    let negated: Vec<f32> = v.data.iter().map(|x| -x).collect();
    write_mrc_f32(&inverted.join("TS.mrc"), v.shape, &negated, 10.012).unwrap();
    let (a, b, c) = (tmp.path().join("a.csv"), tmp.path().join("b.csv"), tmp.path().join("c.csv"));
    assert!(run_mrc(&[&plain.join("TS.mrc")], &a, &[]).status.success());
    let o = run_mrc(&[&inverted.join("TS.mrc")], &b, &["--invert"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(fastdet::io::csv::read_submission(&a).unwrap().len() >= 5);
    assert!(run_mrc(&[&inverted.join("TS.mrc")], &c, &[]).status.success());
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
}

/// A copy of a weights file with `edit` applied to each tensor's bytes, and `extra` added.
fn rewritten(bytes: &[u8], mut edit: impl FnMut(&str, &mut Vec<u8>), extra: Option<&str>) -> Vec<u8> {
    use safetensors::{tensor::TensorView, SafeTensors};
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let mut d = v.data().to_vec();
            edit(&n, &mut d);
            (n, v.dtype(), v.shape().to_vec(), d)
        })
        .collect();
    assert!(owned.iter().any(|t| t.0 == "head2.cls_head.bias"), "the edited tensor exists");
    if let Some(name) = extra {
        owned.push((name.to_string(), safetensors::Dtype::F16, vec![2], vec![0; 4]));
    }
    let views: Vec<(String, TensorView)> = owned.iter().map(|(n, t, s, d)| (n.clone(), TensorView::new(*t, s.clone(), d).unwrap())).collect();
    safetensors::serialize(views, header.metadata().clone()).unwrap()
}

#[test]
fn broken_weights_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let good = root().join("weights/demo_segresnetv2.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    let f = synth1();
    let mrc = tmp.path().join("TS.mrc");
    write_mrc_f32(&mrc, f.shape, &f.data, 10.012).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated.safetensors", bytes[..bytes.len() / 2].to_vec(), "cannot load weights"),
        ("text.safetensors", b"hello, I am not weights".to_vec(), "not a safetensors file"),
        ("future.safetensors", {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let h = std::str::from_utf8(&bytes[8..8 + n]).unwrap().replace("\"fastdet.format_version\":\"1\"", "\"fastdet.format_version\":\"9\"");
            assert_eq!(h.len(), n);
            [&bytes[..8], h.as_bytes(), &bytes[8 + n..]].concat()
        }, "format version 9"),
        ("model.ckpt", std::fs::read(root().join("tests/fixtures/golden/segresnetv2_w8.ckpt")).unwrap(), "a PyTorch checkpoint, not fastdet weights: convert it first"),
        ("nan.safetensors", rewritten(&bytes, |name, data| {
            if name == "head2.cls_head.bias" {
                data[0..2].copy_from_slice(&half::f16::NAN.to_le_bytes());
            }
        }, None), "tensor head2.cls_head.bias has 1 NaN or infinite values"),
        ("extra.safetensors", rewritten(&bytes, |_, _| {}, Some("encoder.extra.weight")), "1 tensor(s) that the metadata's architecture does not use, e.g. encoder.extra.weight"),
    ];
    for (name, content, want) in cases {
        let w = tmp.path().join(name);
        std::fs::write(&w, content).unwrap();
        let out = tmp.path().join("sub.csv");
        let o = common::fastdet_on_cpu()
            .args(["run", "--mrc"])
            .arg(&mrc)
            .arg("--weights")
            .arg(&w)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        assert!(!out.exists());
    }
}

#[test]
fn malformed_truth_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let picks = tmp.path().join("train/overlay/ExperimentRuns/TS_1/Picks");
    std::fs::create_dir_all(&picks).unwrap();
    std::fs::write(picks.join("ribosome.json"), "{\"pickable_object_name\": \"ribosome\", \"points\": [").unwrap();
    let sub = tmp.path().join("sub.csv");
    std::fs::write(&sub, "id,experiment,particle_type,x,y,z\n0,TS_1,ribosome,1,2,3\n").unwrap();
    let o = common::fastdet_on_cpu().args(["score", "--truth"]).arg(tmp.path()).arg(&sub).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ribosome.json"), "{}", stderr(&o));
    std::fs::write(picks.join("ribosome.json"), "{\"pickable_object_name\": \"ribosomes\", \"points\": []}").unwrap();
    let o = common::fastdet_on_cpu().args(["score", "--truth"]).arg(tmp.path()).arg(&sub).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ribosomes"), "{}", stderr(&o));
    // Empty points are fine: a run without particles. Its one pick is not scored (as in the
    // Kaggle metric, which scores the runs of the truth's points), and that is said.
    std::fs::write(picks.join("ribosome.json"), "{\"pickable_object_name\": \"ribosome\", \"points\": []}").unwrap();
    let o = common::fastdet_on_cpu().args(["score", "--json", "--truth"]).arg(tmp.path()).arg(&sub).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["fbeta"].as_f64(), Some(0.0));
    assert_eq!(s["per_class"][2]["fp"].as_u64(), Some(0));
    assert!(stderr(&o).contains("1 run(s) have no annotated particle") && stderr(&o).contains("are not scored (their picks count neither way): TS_1"), "{}", stderr(&o));
    // Picks of a run the split does not have are named, not silently ignored.
    std::fs::write(&sub, "id,experiment,particle_type,x,y,z\n0,TS_1,ribosome,1,2,3\n1,TS_9,ribosome,1,2,3\n").unwrap();
    let o = common::fastdet_on_cpu().args(["score", "--truth"]).arg(tmp.path()).arg(&sub).output().unwrap();
    assert!(o.status.success() && stderr(&o).contains("1 run(s) have no ground truth") && stderr(&o).contains("TS_9"), "{}", stderr(&o));

    // A run with particles and no picks (one shard scored against the split) is named; --runs
    // scores the subset.
    let p2 = tmp.path().join("train/overlay/ExperimentRuns/TS_2/Picks");
    std::fs::create_dir_all(&p2).unwrap();
    std::fs::write(picks.join("ribosome.json"), "{\"pickable_object_name\": \"ribosome\", \"points\": [{\"location\": {\"x\": 1, \"y\": 2, \"z\": 3}}]}").unwrap();
    std::fs::write(p2.join("ribosome.json"), "{\"pickable_object_name\": \"ribosome\", \"points\": [{\"location\": {\"x\": 1, \"y\": 2, \"z\": 3}}]}").unwrap();
    std::fs::write(&sub, "id,experiment,particle_type,x,y,z\n0,TS_1,ribosome,1,2,3\n").unwrap();
    let score = |extra: &[&str]| common::fastdet_on_cpu().args(["score", "--json", "--truth"]).arg(tmp.path()).arg(&sub).args(extra).output().unwrap();
    let o = score(&[]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(stderr(&o).contains("1 run(s) with ground truth have no picks") && stderr(&o).contains("TS_2"), "{}", stderr(&o));
    let ribosome = |s: &serde_json::Value| (s["per_class"][2]["tp"].as_u64(), s["per_class"][2]["fn"].as_u64());
    assert_eq!(ribosome(&s), (Some(1), Some(1)));
    let o = score(&["--runs", "TS_1"]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!stderr(&o).contains("have no picks"), "{}", stderr(&o));
    assert_eq!(ribosome(&s), (Some(1), Some(0)));
    assert!(stderr(&score(&["--runs", "TS_1,TS_7"])).contains("--runs: run \"TS_7\" is not in"));
    let o = score(&["--runs", "TS_2, TS_1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Rows of other particle types are not scored, as in the Kaggle metric, and are named.
    std::fs::write(&sub, "id,experiment,particle_type,x,y,z\n0,TS_1,ribosome,1,2,3\n1,TS_1,membrane,1,2,3\n").unwrap();
    let o = score(&["--runs", "TS_1"]);
    assert!(o.status.success() && stderr(&o).contains("not counted: 1 \"membrane\""), "{}", stderr(&o));
    assert_eq!(ribosome(&serde_json::from_slice(&o.stdout).unwrap()), (Some(1), Some(0)));
    // A split without ground truth, where another has it: the error names that one.
    let o = common::fastdet_on_cpu().args(["score", "--split", "test", "--truth"]).arg(tmp.path()).arg(&sub).output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("no ground truth for split \"test\"") && stderr(&o).contains("\"train\": give --split"), "{}", stderr(&o));
    // The split folder given as the dataset root (`ROOT/train` for `ROOT`): the error says what to give.
    let split_dir = tmp.path().join("train");
    let hint = format!("{} is itself a split folder (it holds static/ or overlay/ExperimentRuns): give its parent {} as the dataset root and --split train", split_dir.display(), tmp.path().display());
    let o = common::fastdet_on_cpu().args(["score", "--split", "train", "--truth"]).arg(&split_dir).arg(&sub).output().unwrap();
    assert!(o.status.code() == Some(1) && stderr(&o).contains(&hint), "{}", stderr(&o));
    let data = root().join("tests/fixtures/dataset");
    let o = common::fastdet_on_cpu().args(["run", "--weights"]).arg(root().join("weights/demo_dynunet.safetensors")).arg("--data").arg(data.join("test")).arg("--out").arg(tmp.path().join("x.csv")).output().unwrap();
    let hint = format!("{} is itself a split folder (it holds static/ or overlay/ExperimentRuns): give its parent {} as the dataset root and --split test", data.join("test").display(), data.display());
    assert!(o.status.code() == Some(1) && stderr(&o).contains("runs directory not found") && stderr(&o).contains(&hint), "{}", stderr(&o));
    // From inside the split folder (`--data .`) too.
    let o = common::fastdet_on_cpu().current_dir(data.join("test")).args(["run", "--data", ".", "--weights"]).arg(root().join("weights/demo_dynunet.safetensors")).arg("--out").arg(tmp.path().join("x.csv")).output().unwrap();
    assert!(o.status.code() == Some(1) && stderr(&o).contains(&hint), "{}", stderr(&o));
}

/// A full disk: the write fails with the file named and nothing partial is left. Needs a small
/// tmpfs (root); skipped with a printed reason where it cannot be mounted.
#[test]
fn full_disk_leaves_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount").args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"]).arg(&mnt).output();
    if !matches!(&ok, Ok(o) if o.status.success()) {
        println!("SKIP full_disk_leaves_no_partial_output: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    // Fill the disk but a few hundred bytes.
    let mut filler = vec![0u8; 16 * 1024];
    loop {
        if std::fs::write(mnt.join("filler"), &filler).is_ok() || filler.len() < 256 {
            break;
        }
        filler.truncate(filler.len() - 256);
    }
    let v = synth1();
    let mrc = tmp.path().join("TS_synth_1.mrc");
    write_mrc_f32(&mrc, v.shape, &v.data, 10.012).unwrap();
    let out = mnt.join("sub.csv");
    let o = run_mrc(&[&mrc], &out, &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(mnt.to_str().unwrap()), "{e}");
    assert!(!out.exists());
    let leftovers: Vec<String> = walk(&mnt).into_iter().filter(|n| n.ends_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(d: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        if e.path().is_dir() {
            v.extend(walk(&e.path()));
        } else {
            v.push(e.path().to_string_lossy().to_string());
        }
    }
    v
}

/// Settings that would fail or mislead on every run are refused before any tomogram is read,
/// naming the option (or the weights file), with no output written.
#[test]
fn settings_wrong_for_every_run_are_refused_before_reading() {
    let tmp = tempfile::tempdir().unwrap();
    // Never read: its absence would be a per-run failure, after the checks.
    let never = tmp.path().join("TS_never.mrc");
    let out = tmp.path().join("sub.csv");
    let cases: &[(&[&str], &str)] = &[
        (&["--thresholds", "0.1,0.2,1.5,0.3,0.3,0.5"], "ribosome = 1.5 is not a probability"),
        (&["--voxel-size", "NaN"], "--voxel-size NaN"),
        (&["--blend-sigma", "0"], "--blend-sigma 0"),
        (&["--top-k", "0"], "--top-k 0"),
        (&["--batch", "0"], "--batch must be at least 1"),
        (&["--iou", "2"], "--iou 2"),
        (&["--tta", "rot90", "--window", "64,64,96"], "rot90 needs a square yx window"),
        (&["--window", "48,96,96"], "demo_dynunet.safetensors: cannot take --window 48,96,96"),
    ];
    for (args, want) in cases {
        let mut c = common::fastdet_on_cpu();
        c.arg("run").arg("--mrc").arg(&never).arg("--weights");
        c.arg(root().join("weights/demo_segresnetv2.safetensors")).arg(root().join("weights/demo_dynunet.safetensors"));
        if !args.contains(&"--window") {
            c.args(["--window", "64,96,96"]);
        }
        let o = c.args(["--tiles", "1,1,1", "--out"]).arg(&out).args(*args).output().unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(e.contains(want) && !e.contains("TS_never"), "{args:?}: {e}");
        assert!(!out.exists() && !tmp.path().join("sub.csv.runs").exists(), "{args:?}: something was written");
    }
    // An output path that is a folder.
    let o = run_mrc(&[&never], tmp.path(), &[]);
    assert!(!o.status.success() && stderr(&o).contains("is a directory"), "{}", stderr(&o));
    // A copick folder that cannot be made (under a file).
    let file = tmp.path().join("a_file");
    std::fs::write(&file, b"").unwrap();
    let o = run_mrc(&[&never], &out, &["--copick-out", file.join("cp").to_str().unwrap()]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("--copick-out") && e.contains("cannot create") && !e.contains("TS_never"), "{e}");
    assert!(!out.exists());
    // copick ids that would make file names copick cannot read back.
    // And the annotators' own id: predictions under it would become the truth.
    let o = run_mrc(&[&never], &out, &["--copick-out", tmp.path().join("cp").to_str().unwrap(), "--user-id", "curation"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("--user-id curation: that is the annotators' user") && !tmp.path().join("cp").exists(), "{e}");
    for id in ["../../evil", "a_b", "a b"] {
        let o = run_mrc(&[&never], &out, &["--copick-out", tmp.path().join("cp").to_str().unwrap(), "--user-id", id]);
        let e = stderr(&o);
        assert!(!o.status.success() && e.contains("--user-id") && !e.contains("TS_never"), "{id}: {e}");
        assert!(!out.exists());
    }
}

/// When every run fails there is no output file (a header-only CSV would pass for a run that
/// found nothing); an all-NaN volume is a failure even with --allow-nonfinite.
#[test]
fn no_output_when_every_run_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let nan = tmp.path().join("TS_nan.mrc");
    write_mrc_f32(&nan, [8, 8, 8], &[f32::NAN; 512], 10.012).unwrap();
    let junk = tmp.path().join("TS_junk.mrc");
    std::fs::write(&junk, b"not an mrc file").unwrap();
    let out = tmp.path().join("sub.csv");
    let (cp, maps) = (tmp.path().join("cp"), tmp.path().join("maps"));
    let o = run_mrc(&[&nan, &junk], &out, &["--allow-nonfinite", "--copick-out", cp.to_str().unwrap(), "--save-maps", maps.to_str().unwrap()]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("TS_nan.mrc: every voxel is NaN or infinite") && e.contains("TS_junk.mrc") && e.contains("every run failed"), "{e}");
    assert!(!out.exists());
    // Nor the runs folder or the output folders this job made.
    assert!(!tmp.path().join("sub.csv.runs").exists() && !cp.exists() && !maps.exists(), "{:?}", walk(tmp.path()));
}

/// An output that would replace an input, or land inside a tomogram's store, is refused before
/// any work, and the input is left as it was.
#[test]
fn outputs_over_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("w.safetensors");
    std::fs::copy(root().join("weights/demo_dynunet.safetensors"), &weights).unwrap();
    let before = std::fs::read(&weights).unwrap();
    let store = tmp.path().join("TS_synth_1.zarr");
    common::copy_dir(&root().join("tests/fixtures/dataset/test/static/ExperimentRuns/TS_synth_1/VoxelSpacing10.000/denoised.zarr"), &store);
    let run = |out: &Path| {
        common::fastdet_on_cpu()
            .args(["run", "--zarr"])
            .arg(&store)
            .arg("--weights")
            .arg(&weights)
            .args(["--window", "64,96,96", "--tiles", "1,1,1", "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let o = run(&weights);
    assert!(!o.status.success() && stderr(&o).contains("w.safetensors: is also an input"), "{}", stderr(&o));
    // Through a folder's other name too.
    let o = run(&tmp.path().join("..").join(tmp.path().file_name().unwrap()).join("w.safetensors"));
    assert!(!o.status.success() && stderr(&o).contains("is also an input"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    let inside = store.join("0/picks.csv");
    let o = run(&inside);
    assert!(!o.status.success() && stderr(&o).contains("lies inside the input"), "{}", stderr(&o));
    assert!(!inside.exists() && !store.join("0/picks.csv.runs").exists());
    // A run's extra outputs too: maps written as the weights file (a run named like it), a
    // picture or copick files inside the store.
    let named_like = tmp.path().join("w.mrc");
    let v = synth1();
    write_mrc_f32(&named_like, v.shape, &v.data, 10.012).unwrap();
    let out = tmp.path().join("sub.csv");
    let o = common::fastdet_on_cpu()
        .args(["run", "--mrc"])
        .arg(&named_like)
        .arg("--weights")
        .arg(&weights)
        .args(["--window", "64,96,96", "--tiles", "1,1,1", "--out"])
        .arg(&out)
        .arg("--save-maps")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("w.safetensors: is also an input"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    for flag in ["--qc", "--star-out", "--save-maps", "--copick-out"] {
        let mut c = common::fastdet_on_cpu();
        c.args(["run", "--zarr"]).arg(&store).arg("--weights").arg(&weights).args(["--window", "64,96,96", "--tiles", "1,1,1", "--out"]).arg(&out);
        let o = c.arg(flag).arg(store.join("0")).output().unwrap();
        assert!(!o.status.success() && stderr(&o).contains("lies inside the input"), "{flag}: {}", stderr(&o));
    }
    assert!(!out.exists());
    // Nor may a run's STAR file be the CSV (one of the two would be lost), by any name.
    let star_named = tmp.path().join("TS_synth_1.star");
    for star_dir in [tmp.path().to_path_buf(), tmp.path().join("..").join(tmp.path().file_name().unwrap())] {
        let mut c = common::fastdet_on_cpu();
        c.args(["run", "--zarr"]).arg(&store).arg("--weights").arg(&weights).args(["--window", "64,96,96", "--tiles", "1,1,1", "--out"]).arg(&star_named);
        let o = c.arg("--star-out").arg(&star_dir).output().unwrap();
        assert!(o.status.code() == Some(1) && stderr(&o).contains("run TS_synth_1's file would be written over the --out file"), "{}", stderr(&o));
        assert!(!star_named.exists());
    }
    // merge -o onto one of its shards.
    let shard = tmp.path().join("a.csv");
    std::fs::write(&shard, "id,experiment,particle_type,x,y,z\n0,TS_1,ribosome,1,2,3\n").unwrap();
    let shard2 = tmp.path().join("b.csv");
    std::fs::write(&shard2, "id,experiment,particle_type,x,y,z\n0,TS_2,ribosome,1,2,3\n").unwrap();
    let shard_bytes = std::fs::read(&shard).unwrap();
    let o = common::fastdet_on_cpu().arg("merge").arg(&shard2).arg(&shard).arg("-o").arg(&shard).output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("a.csv: is also an input"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&shard).unwrap(), shard_bytes);
}

/// A file-size limit, a full standard output, a stop signal and an unknown kernel choice: an
/// error naming the problem, no panic, no temporary or half-made output left.
#[test]
fn write_limits_and_stops_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_fastdet");
    // `ulimit -f 100` (51 KB in sh): the 9 MB maps file cannot be written, the process lives
    // to say so, and removes its temporary.
    let v = synth1();
    let mrc = tmp.path().join("TS_a.mrc");
    write_mrc_f32(&mrc, v.shape, &v.data, 10.012).unwrap();
    let maps = tmp.path().join("maps");
    let out = tmp.path().join("sub.csv");
    let limits = Command::new("sh").arg("-c").arg("ulimit -f 100").status().is_ok_and(|s| s.success());
    let o = Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 100 && exec \"$@\"")
        .arg("sh")
        .arg(exe)
        .args(["run", "--mrc"])
        .arg(&mrc)
        .arg("--weights")
        .arg(root().join("weights/demo_dynunet.safetensors"))
        .args(["--window", "64,96,96", "--tiles", "1,1,1", "--save-maps"])
        .arg(&maps)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let e = stderr(&o);
    if limits {
        // The job's one run failed: nothing written, exit status 1.
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains("maps/TS_a.safetensors: cannot write: File too large"), "{e}");
        assert!(!out.exists() && !maps.exists(), "{:?}", walk(tmp.path()));
        assert!(walk(tmp.path()).iter().all(|f| !f.ends_with(".tmp")), "{:?}", walk(tmp.path()));
    } else {
        println!("SKIP (part of write_limits_and_stops_leave_nothing_behind): sh cannot set `ulimit -f 100` here");
    }

    // Standard output that cannot be written.
    let Ok(dev_full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        println!("SKIP (rest of write_limits_and_stops_leave_nothing_behind): no /dev/full");
        return;
    };
    let o = Command::new(exe)
        .args(["score", "--truth"])
        .arg(root().join("tests/fixtures/dataset"))
        .args(["--split", "test"])
        .arg(root().join("tests/fixtures/pipeline/expected_submission.csv"))
        .stdout(dev_full.try_clone().unwrap())
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("cannot write to standard output") && !e.contains("panicked"), "{e}");
    for args in [&["--help"][..], &["--version"], &["run", "--help"]] {
        let o = Command::new(exe).args(args).stdout(dev_full.try_clone().unwrap()).output().unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(e.contains("cannot write to standard output"), "{args:?}: {e}");
    }
    // A log that cannot be written does not stop the work: the picks are written all the same.
    let mrc = tmp.path().join("TS_log.mrc");
    let v = synth1();
    write_mrc_f32(&mrc, v.shape, &v.data, 10.012).unwrap();
    let out = tmp.path().join("logless.csv");
    let o = Command::new(exe)
        .arg("run")
        .arg("--mrc")
        .arg(&mrc)
        .arg("--weights")
        .arg(root().join("weights/demo_segresnetv2.safetensors"))
        .args(["--window", "64,96,96", "--tiles", "1,1,1", "--out"])
        .arg(&out)
        .stderr(dev_full.try_clone().unwrap())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(csv_rows(&out).len() > 1);
    // Usage errors keep their message and exit with 1, not with the 2 of a job whose output
    // was written but some runs failed.
    for args in [&["run", "--no-such-flag"][..], &["run", "--window", "64,96"], &["merge", "--shard"], &[]] {
        let o = Command::new(exe).args(args).output().unwrap();
        assert!(o.status.code() == Some(1) && stderr(&o).contains("--help"), "{args:?}: {}", stderr(&o));
    }
    assert!(stderr(&Command::new(exe).args(["run", "--no-such-flag"]).output().unwrap()).contains("--no-such-flag"));
    let o = Command::new(exe).args(["run", "--help"]).output().unwrap();
    assert!(o.status.code() == Some(0) && String::from_utf8_lossy(&o.stdout).contains("--weights"));

    // SIGTERM while synth writes: neither the dataset nor its hidden unfinished copy is left.
    let data = tmp.path().join("syn");
    let mut child = Command::new(exe).arg("synth").arg(&data).args(["--runs", "40", "--shape", "64,128,128"]).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !std::fs::read_dir(tmp.path()).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".partial")) {
        assert!(t0.elapsed().as_secs() < 60, "synth made no folder");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill with a child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "synth did not end by the signal: {status:?}");
    let left: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.contains("syn")).collect();
    assert!(left.is_empty(), "{left:?} left after {status:?}");

    // Started with SIGHUP ignored (nohup): a hang-up does not stop it.
    let data = tmp.path().join("kept");
    let mut child = Command::new("sh").arg("-c").arg("trap '' HUP; exec \"$@\"").arg("sh").arg(exe).arg("synth").arg(&data).args(["--runs", "12", "--shape", "64,128,128"]).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !std::fs::read_dir(tmp.path()).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with(".kept.")) {
        assert!(t0.elapsed().as_secs() < 60, "synth made no folder");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: kill with a child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(data.join("test/static/ExperimentRuns/TS_synth_12").is_dir());

    // A kernel set fastdet does not know.
    let o = Command::new(exe).env("FASTDET_CPU_KERNEL", "avx-512").args(["selftest", "--device", "cpu", "--quick"]).output().unwrap();
    assert!(o.status.code() == Some(1) && stderr(&o).contains("FASTDET_CPU_KERNEL=avx-512: expected"), "{}", stderr(&o));
}

/// An output whose temporary name is too long, and extra-output paths that are files, are
/// refused before the work with the path named.
#[test]
fn unwritable_output_names_are_refused_before_the_work() {
    let tmp = tempfile::tempdir().unwrap();
    let never = tmp.path().join("TS_never.mrc");
    let long = tmp.path().join(format!("{}.csv", "y".repeat(246)));
    let o = run_mrc(&[&never], &long, &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("cannot write there") && e.contains("File name too long") && !e.contains("TS_never"), "{e}");
    let file = tmp.path().join("a_file");
    std::fs::write(&file, b"").unwrap();
    for flag in ["--save-maps", "--star-out", "--qc", "--copick-out"] {
        let o = run_mrc(&[&never], &tmp.path().join("sub.csv"), &[flag, file.to_str().unwrap()]);
        let e = stderr(&o);
        assert!(o.status.code() == Some(1) && e.contains(&format!("{flag} {}: is not a directory", file.display())) && !e.contains("TS_never"), "{flag}: {e}");
    }
    // A run's own file whose place is a pipe.
    let star = tmp.path().join("star");
    std::fs::create_dir_all(&star).unwrap();
    let fifo = std::ffi::CString::new(star.join("TS_never.star").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let o = run_mrc(&[&never], &tmp.path().join("sub.csv"), &["--star-out", star.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(o.status.code() == Some(1) && e.contains("TS_never.star: is not a plain file"), "{e}");
    assert!(!tmp.path().join("sub.csv.runs").exists());
}

/// Options that cannot apply to the inputs given are refused rather than ignored: `--runs`
/// with `--mrc`, a folder given to `--mrc`, and a level chosen in a plain zarr array.
#[test]
fn options_that_do_not_apply_to_the_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sub.csv");
    let f = tmp.path().join("TS_a.mrc");
    let o = run_mrc(&[&f], &out, &["--runs", "TS_a"]);
    assert!(!o.status.success() && stderr(&o).contains("--runs"), "{}", stderr(&o));
    let o = run_mrc(&[&f], &out, &["--level", "1"]);
    assert!(!o.status.success() && stderr(&o).contains("--level 1: MRC files hold one level"), "{}", stderr(&o));
    let o = run_mrc(&[tmp.path()], &out, &[]);
    assert!(!o.status.success() && stderr(&o).contains("a directory; --mrc takes MRC files"), "{}", stderr(&o));
    assert!(!out.exists());
    // A file without an MRC extension is still read as the MRC it was given as.
    let dat = tmp.path().join("TS_b.dat");
    std::fs::write(&dat, b"not a volume").unwrap();
    let o = run_mrc(&[&dat], &out, &[]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("TS_b.dat") && !e.contains("zarr"), "{e}");
    let array = root().join("tests/fixtures/dataset/test/static/ExperimentRuns/TS_synth_1/VoxelSpacing10.000/denoised.zarr/0");
    let e = fastdet::io::zarr::read_zarr_volume(&array, "1").unwrap_err();
    assert!(format!("{e:#}").contains("a zarr array, not a multiscale group: level \"1\""), "{e:#}");
    assert!(fastdet::io::zarr::read_zarr_volume(&array, "0").is_ok());
}

/// A run whose name a CSV cannot hold fails alone, before it is read; a run that fails while its
/// outputs are written leaves none of them; the other runs finish.
#[test]
fn one_bad_run_name_or_output_fails_that_run_only() {
    let tmp = tempfile::tempdir().unwrap();
    let f = synth1();
    let good = tmp.path().join("TS_good.mrc");
    write_mrc_f32(&good, f.shape, &f.data, 10.012).unwrap();
    let comma = tmp.path().join("TS_a,b.mrc");
    std::fs::copy(&good, &comma).unwrap();
    let other = tmp.path().join("TS_other.mrc");
    std::fs::copy(&good, &other).unwrap();
    // A name a STAR file cannot hold fails before inference when STAR files are asked for.
    let spaced = tmp.path().join("TS sp.mrc");
    std::fs::copy(&good, &spaced).unwrap();
    // TS_other's STAR file cannot be written (its place is a link into a folder that is not
    // there; a folder or a device in its place is refused before the work).
    let star = tmp.path().join("star");
    std::fs::create_dir_all(&star).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("gone/TS_other.star"), star.join("TS_other.star")).unwrap();
    let maps = tmp.path().join("maps");
    let out = tmp.path().join("sub.csv");
    let o = run_mrc(&[&good, &comma, &other, &spaced], &out, &["--star-out", star.to_str().unwrap(), "--save-maps", maps.to_str().unwrap()]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("3 run(s) failed") && e.contains("run name \"TS_a,b\" cannot be written to a CSV field"), "{e}");
    assert!(e.contains("TS sp: FAILED: run name \"TS sp\" cannot be written as a STAR value: it contains whitespace"), "{e}");
    // Refused before it was read and computed: no picks line, no STAR path in the error.
    assert!(!e.lines().any(|l| l.contains("TS sp: ") && l.contains("picks; read")) && !e.contains("TS sp.star") && !maps.join("TS sp.safetensors").exists(), "{e}");
    assert!(e.contains("TS_other.mrc: cannot write its outputs"), "{e}");
    let runs: std::collections::BTreeSet<String> = csv_rows(&out).into_iter().map(|r| r[1].clone()).collect();
    assert_eq!(runs.into_iter().collect::<Vec<_>>(), ["TS_good"]);
    assert!(maps.join("TS_good.safetensors").exists() && star.join("TS_good.star").exists());
    assert!(!maps.join("TS_other.safetensors").exists(), "the failed run's maps were left behind");
    assert!(!maps.join("TS_a,b.safetensors").exists());
}

/// What a reader could read but found odd is warned about with the file's name: bytes after an
/// MRC's data, chunks absent from a zarr store; a zarr axis of length 0 is an error.
#[test]
fn odd_but_readable_volumes_are_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let f = synth1();
    let mrc = tmp.path().join("TS_long.mrc");
    write_mrc_f32(&mrc, f.shape, &f.data, 10.012).unwrap();
    let mut bytes = std::fs::read(&mrc).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&mrc, bytes).unwrap();
    let out = tmp.path().join("sub.csv");
    let o = run_mrc(&[&mrc], &out, &[]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("warning: ") && e.contains("TS_long.mrc") && e.contains("4096 bytes after the 160 x 160 x 80 voxels of mode 2"), "{e}");
    assert!(!e.contains("value range"), "{e}");
    // One extreme voxel that sets the min-max scaling is named (the sample tomogram is not).
    let mut hot = f.data.clone();
    hot[(40 * 160 + 10) * 160 + 20] = 1e30;
    let hot_mrc = tmp.path().join("TS_hot.mrc");
    write_mrc_f32(&hot_mrc, f.shape, &hot, 10.012).unwrap();
    let o = run_mrc(&[&hot_mrc], &tmp.path().join("hot.csv"), &[]);
    let e = stderr(&o);
    assert!(o.status.success() && e.contains("TS_hot.mrc: 98% of its voxels lie in under 0.01% of its value range, set by 1 extreme voxel(s) (the highest 1e30 at z,y,x 40,10,20"), "{e}");

    let src = root().join("tests/fixtures/dataset/test/static/ExperimentRuns/TS_synth_1/VoxelSpacing10.000/denoised.zarr");
    let zarr = tmp.path().join("TS_gap.zarr");
    common::copy_dir(&src, &zarr);
    std::fs::remove_file(zarr.join("0/0.1.1")).unwrap();
    let v = fastdet::io::zarr::read_zarr_volume(&zarr, "0").unwrap();
    assert_eq!(v.notes.len(), 1, "{:?}", v.notes);
    assert!(v.notes[0].starts_with("1 of its 18 chunks are absent") && v.notes[0].contains("read as the fill value 0 "), "{:?}", v.notes);
    assert!(fastdet::io::zarr::read_zarr_volume(&src, "0").unwrap().notes.is_empty());
    // The value read is the one named: NaN here, and 0 where the metadata gives none (null).
    let meta = zarr.join("0/.zarray");
    let with_fill = |fill: &str| {
        let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
        m["fill_value"] = serde_json::from_str(fill).unwrap();
        std::fs::write(&meta, m.to_string()).unwrap();
        let v = fastdet::io::zarr::read_zarr_volume(&zarr, "0").unwrap();
        (v.notes[0].clone(), v.data.iter().filter(|x| x.is_nan()).count(), v.data.iter().filter(|x| **x == 0.0).count())
    };
    let (note, nans, _) = with_fill("\"NaN\"");
    assert!(note.contains("read as the fill value NaN ") && nans == 64 * 64 * 64, "{note} ({nans} NaN)");
    let (note, nans, zeros) = with_fill("null");
    assert!(note.contains("read as 0 (its fill_value is null") && nans == 0 && zeros >= 64 * 64 * 64, "{note} ({zeros} zeros)");

    let meta = zarr.join("0/.zarray");
    let text = std::fs::read_to_string(&meta).unwrap().replacen("80,", "0,", 1);
    std::fs::write(&meta, text).unwrap();
    let e = fastdet::io::zarr::read_zarr_volume(&zarr, "0").unwrap_err();
    assert!(format!("{e:#}").contains("has a zero-length axis"), "{e:#}");
}
