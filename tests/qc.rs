//! QC pictures: pick geometry, layout, contrast stretch and the `fastdet qc` command.

use fastdet::io::zarr::Volume;
use fastdet::particles::{Pick, CLASSES};
use fastdet::qc::{
    pick_to_pixel, radius_px, render_qc, render_qc_with, ring_half_width, QcLayout, QcOptions, CLASS_COLORS, GAP,
    MARGIN,
};
use std::path::{Path, PathBuf};

mod common;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Decodes an RGB8 PNG into (width, height, pixels).
fn decode(path: &Path) -> (usize, usize, Vec<u8>) {
    let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

fn px(img: &(usize, usize, Vec<u8>), x: usize, y: usize) -> [u8; 3] {
    let i = (y * img.0 + x) * 3;
    [img.2[i], img.2[i + 1], img.2[i + 2]]
}

/// A [16, 40, 50] volume with a gentle ramp, voxel size 10 Å.
fn small_volume() -> Volume {
    let shape = [16, 40, 50];
    let data = (0..shape.iter().product::<usize>()).map(|i| (i % 50) as f32 + (i / 50 % 40) as f32 * 0.5).collect();
    Volume { shape, data, voxel_size: Some(10.0), notes: Vec::new() }
}

fn pick(class: usize, vx: f64, vy: f64, vz: f64, vs: f64) -> Pick {
    Pick { run: "r".into(), class, score: 1.0, x: vx * vs, y: vy * vs, z: vz * vs }
}

#[test]
fn pick_to_pixel_centres_voxels() {
    // The centre of voxel (x 25, y 20) is at coordinate 25.5, 20.5 (voxel i spans [i, i+1)): the
    // middle of its pixels.
    let p = pick(0, 25.5, 20.5, 2.5, 10.0);
    assert_eq!(pick_to_pixel(&p, 10.0, 1), (25.5, 20.5));
    assert_eq!(pick_to_pixel(&p, 10.0, 6), (153.0, 123.0));
    // A voxel's lower edge is its pixels' lower edge.
    assert_eq!(pick_to_pixel(&pick(0, 25.0, 20.0, 2.0, 10.0), 10.0, 6), (150.0, 120.0));
    // 60 Å apo-ferritin at 10 Å/voxel, enlarged 6x: 36 px
    assert_eq!(radius_px(0, 10.0, 6), 36.0);
}

/// One apo-ferritin pick at the centre of voxel (x 25, y 20, z 2): its ring is drawn in red at ≈ the radius
/// around the centre pixel of slab 0, the centre stays grey, and nothing red appears elsewhere.
#[test]
fn known_pick_lands_on_expected_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("one.png");
    let vol = small_volume();
    let p = pick(0, 25.5, 20.5, 2.5, 10.0);
    render_qc(&vol, std::slice::from_ref(&p), None, &out).unwrap();
    let img = decode(&out);

    let opts = QcOptions::default();
    let lay = QcLayout::new(vol.shape, &opts, false).unwrap();
    assert_eq!(lay.scale, 6); // ceil(256 / 50)
    let (ox, oy) = lay.tile_origin(0, 0);
    let (cx, cy) = pick_to_pixel(&p, 10.0, lay.scale);
    let r = radius_px(0, 10.0, lay.scale);
    let red = CLASS_COLORS[0];

    // centre pixel: grey image, not the ring colour
    let c = px(&img, ox + cx as usize, oy + cy as usize);
    assert_ne!(c, red);
    assert!(c[0] == c[1] && c[1] == c[2], "centre {c:?} is not grey");
    // the four compass points at distance r are red
    for (dx, dy) in [(r, 0.0), (-r, 0.0), (0.0, r), (0.0, -r)] {
        let (x, y) = ((cx + dx).floor() as usize, (cy + dy).floor() as usize);
        assert_eq!(px(&img, ox + x, oy + y), red, "ring missing at ({dx}, {dy})");
    }
    // every red pixel lies in slab 0 of row 0 at ≈ r from the centre
    let hw = ring_half_width(lay.scale);
    let mut n = 0;
    for y in 0..img.1 {
        for x in 0..img.0 {
            if px(&img, x, y) == red && y < lay.legend_y {
                assert!(x >= ox && x < ox + lay.tile_w && y >= oy && y < oy + lay.tile_h, "red outside slab 0 at ({x}, {y})");
                let d = ((x - ox) as f64 + 0.5 - cx).hypot((y - oy) as f64 + 0.5 - cy);
                assert!((d - r).abs() <= hw + 1e-9, "red at distance {d}, radius {r}");
                n += 1;
            }
        }
    }
    // a ring of circumference 2πr and thickness 2·hw
    let area = 2.0 * std::f64::consts::PI * r * 2.0 * hw;
    assert!((n as f64 - area).abs() < 0.2 * area, "{n} red pixels, expected ≈ {area}");
}

/// The slab is the one holding the voxel of the pick's z (floor: voxel i spans [i, i+1)), and
/// the voxel size given (the one the picks were made with) beats the volume's own.
#[test]
fn slab_and_voxel_size_follow_the_picks_coordinates() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vs.png");
    let vol = small_volume(); // 10 Å per voxel in its metadata, 16 deep: slabs of 4
    let vs = 20.0;
    let p = pick(2, 25.5, 20.5, 11.9, vs);
    let opts = QcOptions { voxel_size: Some(vs), ..QcOptions::default() };
    let s = render_qc_with(&vol, std::slice::from_ref(&p), None, &out, &opts).unwrap();
    assert_eq!(s.picks_drawn, 1);
    let img = decode(&out);
    let lay = QcLayout::new(vol.shape, &opts, false).unwrap();
    let (cx, cy) = pick_to_pixel(&p, vs, lay.scale);
    assert_eq!((cx, cy), (25.5 * lay.scale as f64, 20.5 * lay.scale as f64));
    let r = radius_px(2, vs, lay.scale);
    for k in 0..4 {
        let (ox, oy) = lay.tile_origin(0, k);
        let got = px(&img, ox + (cx + r).floor() as usize, oy + cy as usize);
        assert_eq!(got == CLASS_COLORS[2], k == 2, "slab {k}: {got:?}");
    }
    // With the volume's own 10 Å, the same Å lie outside the volume's 16 slices.
    assert_eq!(render_qc_with(&vol, &[p], None, &out, &QcOptions::default()).unwrap().picks_drawn, 0);
}

/// A pick goes to the slab that holds its centre z; one beyond the volume is not drawn.
#[test]
fn picks_go_to_their_slab() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("slab.png");
    let vol = small_volume();
    let vs = 10.0;
    let picks = [pick(2, 25.0, 20.0, 13.0, vs), pick(2, 25.0, 20.0, 40.0, vs)];
    let s = render_qc_with(&vol, &picks, None, &out, &QcOptions::default()).unwrap();
    assert_eq!(s.picks_drawn, 1);
    let img = decode(&out);
    let lay = QcLayout::new(vol.shape, &QcOptions::default(), false).unwrap();
    let (cx, cy) = pick_to_pixel(&picks[0], vs, lay.scale);
    let r = radius_px(2, vs, lay.scale);
    for k in 0..4 {
        let (ox, oy) = lay.tile_origin(0, k);
        let got = px(&img, ox + (cx + r).floor() as usize, oy + cy as usize);
        assert_eq!(got == CLASS_COLORS[2], k == 3, "slab {k}: {got:?}");
    }
}

/// Image size follows the layout: margins, slabs side by side with gaps, a header line above each
/// row, the legend below; ground truth adds one row of the same height.
#[test]
fn dimensions_follow_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = small_volume();
    let pk = [pick(1, 10.0, 10.0, 5.0, 10.0)];
    for slabs in [1, 3, 4] {
        let opts = QcOptions { slabs, ..QcOptions::default() };
        let one = QcLayout::new(vol.shape, &opts, false).unwrap();
        let two = QcLayout::new(vol.shape, &opts, true).unwrap();
        assert_eq!((one.tile_w, one.tile_h), (50 * 6, 40 * 6));
        assert_eq!(one.slabs.len(), slabs);
        let grid_w = slabs * one.tile_w + (slabs - 1) * GAP;
        assert!(one.width >= grid_w + 2 * MARGIN);
        if slabs > 1 {
            // legend fits inside the slab grid
            assert_eq!(one.width, grid_w + 2 * MARGIN);
        }
        assert_eq!(one.width, two.width);
        let (_, oy0) = two.tile_origin(0, 0);
        let (_, oy1) = two.tile_origin(1, 0);
        assert_eq!(two.height - one.height, oy1 - oy0);
        assert_eq!(oy1 - oy0, one.tile_h + GAP + fastdet::qc::LINE_H + 4);
        // tiles do not overlap and stay inside the image
        let (x_last, _) = two.tile_origin(1, slabs - 1);
        assert!(x_last + two.tile_w <= two.width - MARGIN);
        assert!(oy1 + two.tile_h < two.legend_y);
        assert!(two.legend_y < two.height);

        let a = tmp.path().join(format!("a{slabs}.png"));
        let b = tmp.path().join(format!("b{slabs}.png"));
        render_qc_with(&vol, &pk, None, &a, &opts).unwrap();
        render_qc_with(&vol, &pk, Some(&pk), &b, &opts).unwrap();
        let (wa, ha, _) = decode(&a);
        let (wb, hb, _) = decode(&b);
        assert_eq!((wa, ha), (one.width, one.height));
        assert_eq!((wb, hb), (two.width, two.height));
    }
    // large volumes are not enlarged; more slabs than z planes are clamped
    let big = QcLayout::new([3, 300, 400], &QcOptions::default(), false).unwrap();
    assert_eq!((big.scale, big.tile_w, big.slabs.len()), (1, 400, 3));
    assert!(QcLayout::new([0, 4, 4], &QcOptions::default(), false).is_err());
    assert!(QcLayout::new([4, 4, 4], &QcOptions { slabs: 0, ..QcOptions::default() }, false).is_err());
}

/// A constant volume renders (no division by zero) as uniform mid-grey slabs.
#[test]
fn constant_volume_is_mid_grey() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("const.png");
    let vol = Volume { shape: [8, 20, 30], data: vec![3.25; 8 * 20 * 30], voxel_size: None, notes: Vec::new() };
    render_qc(&vol, &[], None, &out).unwrap();
    let img = decode(&out);
    let lay = QcLayout::new(vol.shape, &QcOptions::default(), false).unwrap();
    for k in 0..4 {
        let (ox, oy) = lay.tile_origin(0, k);
        for y in (oy..oy + lay.tile_h).step_by(7) {
            for x in (ox..ox + lay.tile_w).step_by(7) {
                assert_eq!(px(&img, x, y), [128, 128, 128]);
            }
        }
    }
    // no stray temporary file beside the output
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("const.png")]);
}

#[test]
fn bad_class_index_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bad.png");
    let mut p = pick(0, 1.0, 1.0, 1.0, 10.0);
    p.class = CLASSES.len();
    let e = render_qc(&small_volume(), &[p], None, &out).unwrap_err().to_string();
    assert!(e.contains("class index"), "{e}");
    assert!(!out.exists());
}

/// `fastdet qc --truth` on the fixture dataset writes one picture per run with two rows of slabs.
#[test]
fn cli_writes_one_png_per_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qc");
    let o = common::fastdet_on_cpu()
        .args(["qc", "--split", "test", "--truth", "--data"])
        .arg(root().join("tests/fixtures/dataset"))
        .arg("--picks")
        .arg(root().join("tests/fixtures/pipeline/expected_submission.csv"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let mut names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["TS_synth_1.png", "TS_synth_2.png"]);
    // fixture tomograms are [80, 160, 160]: enlarged 2x, 4 slabs, two rows
    let lay = QcLayout::new(
        [80, 160, 160],
        &QcOptions { title: Some("TS_synth_1".into()), ..QcOptions::default() },
        true,
    )
    .unwrap();
    for n in &names {
        let img = decode(&out.join(n));
        assert_eq!((img.0, img.1), (lay.width, lay.height), "{n}");
        // some rings in both rows
        for row in 0..2 {
            let mut colored = 0;
            for k in 0..4 {
                let (ox, oy) = lay.tile_origin(row, k);
                for y in oy..oy + lay.tile_h {
                    for x in ox..ox + lay.tile_w {
                        if CLASS_COLORS.contains(&px(&img, x, y)) {
                            colored += 1;
                        }
                    }
                }
            }
            assert!(colored > 100, "{n} row {row}: {colored} ring pixels");
        }
        assert!(stdout.contains(&n.replace(".png", ":")), "{stdout}");
    }
    // --voxel-size file: a copy whose metadata says 5.006 Å is drawn as --voxel-size 5.006 draws
    // it, not as the default 10.012 Å.
    let data = tmp.path().join("data");
    common::copy_dir(&root().join("tests/fixtures/dataset"), &data);
    for run in ["TS_synth_1", "TS_synth_2"] {
        let z = data.join(format!("test/static/ExperimentRuns/{run}/VoxelSpacing10.000/denoised.zarr/.zattrs"));
        let mut attrs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&z).unwrap()).unwrap();
        attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = serde_json::json!([5.006, 5.006, 5.006]);
        std::fs::write(&z, attrs.to_string()).unwrap();
    }
    let draw = |dir: &str, vs: &str| {
        let o = common::fastdet_on_cpu()
            .args(["qc", "--split", "test", "--truth", "--voxel-size", vs, "--data"])
            .arg(&data)
            .arg("--picks")
            .arg(root().join("tests/fixtures/pipeline/expected_submission.csv"))
            .arg("--out")
            .arg(tmp.path().join(dir))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        names.iter().map(|n| std::fs::read(tmp.path().join(dir).join(n)).unwrap()).collect::<Vec<_>>()
    };
    let (from_file, given) = (draw("qc_file", "file"), draw("qc_given", "5.006"));
    assert!(from_file == given);
    assert!(names.iter().zip(&from_file).all(|(n, png)| *png != std::fs::read(out.join(n)).unwrap()));

    // --runs limits the output; --help names defaults, units and an example
    let out2 = tmp.path().join("one");
    let st = common::fastdet_on_cpu()
        .args(["qc", "--runs", "TS_synth_2", "--slabs", "2", "--data"])
        .arg(root().join("tests/fixtures/dataset"))
        .arg("--picks")
        .arg(root().join("tests/fixtures/pipeline/expected_submission.csv"))
        .arg("--out")
        .arg(&out2)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert!(out2.join("TS_synth_2.png").is_file() && !out2.join("TS_synth_1.png").exists());
    // Picks read at another voxel size than they were made at land outside the tomogram: said,
    // with how many (at the right size, none is).
    let qc_vs = |vs: &str, dir: &str| {
        let o = common::fastdet_on_cpu()
            .args(["qc", "--runs", "TS_synth_1", "--voxel-size", vs, "--data"])
            .arg(root().join("tests/fixtures/dataset"))
            .arg("--picks")
            .arg(root().join("tests/fixtures/pipeline/expected_submission.csv"))
            .arg("-o")
            .arg(tmp.path().join(dir))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let right = qc_vs("10.012", "vs_right");
    assert!(!right.contains("outside"), "{right}");
    let wrong = qc_vs("5", "vs_wrong");
    let off: usize = wrong.split(" outside the tomogram").next().unwrap().rsplit('(').next().unwrap().parse().unwrap();
    assert!(off > 0 && wrong.contains("is --voxel-size 5 Å what the picks were made at?"), "{wrong}");
    // A run the dataset does not have is refused before any picture (as by `run`); picks of runs
    // the dataset lacks are named in a warning, and `-o` is --out.
    let other = tmp.path().join("other.csv");
    std::fs::write(&other, "id,experiment,particle_type,x,y,z\n0,TS_elsewhere,ribosome,1,2,3\n1,TS_synth_1,ribosome,100,100,100\n").unwrap();
    let qc = |runs: Option<&str>, out: &std::path::Path| {
        let mut c = common::fastdet_on_cpu();
        c.arg("qc").arg("--data").arg(root().join("tests/fixtures/dataset")).arg("--picks").arg(&other).arg("-o").arg(out);
        if let Some(r) = runs {
            c.args(["--runs", r]);
        }
        c.output().unwrap()
    };
    let o = qc(Some("TS_synth_1,TS_synth_9"), &tmp.path().join("nine"));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && e.contains("run \"TS_synth_9\" is not in") && !tmp.path().join("nine").exists(), "{e}");
    let o = qc(None, &tmp.path().join("all"));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && e.contains("other.csv has picks of runs not in") && e.contains(": TS_elsewhere\n") && !e.contains('{'), "{e}");
    assert!(tmp.path().join("all/TS_synth_1.png").is_file());
    // A run whose tomogram cannot be read fails alone: the other is drawn, the exit status is 2.
    let data = tmp.path().join("data");
    common::copy_dir(&root().join("tests/fixtures/dataset"), &data);
    std::fs::write(data.join("test/static/ExperimentRuns/TS_synth_1/VoxelSpacing10.000/denoised.zarr/.zattrs"), b"garbage").unwrap();
    std::fs::remove_file(data.join("test/static/ExperimentRuns/TS_synth_2/VoxelSpacing10.000/denoised.zarr/0/0.1.1")).unwrap();
    let out3 = tmp.path().join("bad");
    let o = common::fastdet_on_cpu()
        .args(["qc", "--data"])
        .arg(&data)
        .arg("--picks")
        .arg(root().join("tests/fixtures/pipeline/expected_submission.csv"))
        .arg("--out")
        .arg(&out3)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("1 of 2 run(s) failed") && e.contains("TS_synth_1: ") && e.contains(".zattrs"), "{e}");
    // What the reader noted of the other is said, as by run.
    assert!(e.contains("TS_synth_2/VoxelSpacing10.000/denoised.zarr: 1 of its") && e.contains("chunks are absent"), "{e}");
    assert!(out3.join("TS_synth_2.png").is_file() && !out3.join("TS_synth_1.png").exists());
    // Every run failing: no folder left either.
    let out4 = tmp.path().join("none");
    let o = common::fastdet_on_cpu()
        .args(["qc", "--runs", "TS_synth_1", "--data"])
        .arg(&data)
        .arg("--picks")
        .arg(root().join("tests/fixtures/pipeline/expected_submission.csv"))
        .arg("--out")
        .arg(&out4)
        .output()
        .unwrap();
    // Nothing drawn: a failure (1), not the partial result of status 2.
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out4.exists());
    let h = common::fastdet_on_cpu().args(["qc", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&h.stdout);
    for needle in ["[default: test]", "[default: 4]", "Å", "Example", "fastdet qc"] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
}


/// Titles keep their case (run names are case-sensitive): "TS_1" and "ts_1" are drawn apart,
/// and the title row is all the two pictures differ in.
#[test]
fn titles_keep_upper_case() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = small_volume();
    let draw = |title: &str| {
        let out = tmp.path().join(format!("{title}.png"));
        render_qc_with(&vol, &[], None, &out, &QcOptions { title: Some(title.into()), ..QcOptions::default() }).unwrap();
        decode(&out)
    };
    let (upper, lower) = (draw("TS_1"), draw("ts_1"));
    assert_eq!((upper.0, upper.1), (lower.0, lower.1));
    let rows_differing: Vec<usize> = (0..upper.1).filter(|&y| (0..upper.0).any(|x| px(&upper, x, y) != px(&lower, x, y))).collect();
    assert!(!rows_differing.is_empty(), "upper and lower case drawn alike");
    assert!(rows_differing.iter().all(|y| (MARGIN..MARGIN + 7 * fastdet::qc::FONT_SCALE).contains(y)), "{rows_differing:?}");
}
