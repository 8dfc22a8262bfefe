//! MRC reader/writer and RELION STAR writer/reader.
//!
//! The MRC files are built byte by byte here (not with `write_mrc_f32`) so the reader is checked
//! against the MRC2014 layout independently of our own writer.

use std::path::{Path, PathBuf};

use fastdet::io::mrc::{read_mrc, write_mrc_f32};
use fastdet::io::star::{read_star_coordinates, write_run_star};
use fastdet::particles::Pick;

// ---------------------------------------------------------------------------------------------
// Hand-built MRC files
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum E {
    Le,
    Be,
}

const STAMP_LE: [u8; 4] = [0x44, 0x44, 0x00, 0x00];
const STAMP_LE_ALT: [u8; 4] = [0x44, 0x41, 0x00, 0x00];
const STAMP_BE: [u8; 4] = [0x11, 0x11, 0x00, 0x00];

#[derive(Debug, Clone)]
struct Hdr {
    e: E,
    /// nx, ny, nz (columns, rows, sections).
    dims: [i32; 3],
    mode: i32,
    mxyz: [i32; 3],
    cella: [f32; 3],
    /// mapc, mapr, maps.
    map: [i32; 3],
    nsymbt: i32,
    stamp: [u8; 4],
    signature: bool,
    /// (imodStamp, imodFlags) at bytes 152 / 156.
    imod: Option<(i32, i32)>,
}

impl Hdr {
    fn new(e: E, dims: [i32; 3], mode: i32) -> Self {
        Hdr {
            e,
            dims,
            mode,
            mxyz: dims,
            cella: [dims[0] as f32 * 10.012, dims[1] as f32 * 10.012, dims[2] as f32 * 10.012],
            map: [1, 2, 3],
            nsymbt: 0,
            stamp: if e == E::Le { STAMP_LE } else { STAMP_BE },
            signature: true,
            imod: None,
        }
    }

    fn i32b(&self, v: i32) -> [u8; 4] {
        match self.e {
            E::Le => v.to_le_bytes(),
            E::Be => v.to_be_bytes(),
        }
    }
    fn f32b(&self, v: f32) -> [u8; 4] {
        match self.e {
            E::Le => v.to_le_bytes(),
            E::Be => v.to_be_bytes(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut h = vec![0u8; 1024];
        let mut put = |off: usize, b: [u8; 4]| h[off..off + 4].copy_from_slice(&b);
        put(0, self.i32b(self.dims[0]));
        put(4, self.i32b(self.dims[1]));
        put(8, self.i32b(self.dims[2]));
        put(12, self.i32b(self.mode));
        // nxstart.. stay 0
        put(28, self.i32b(self.mxyz[0]));
        put(32, self.i32b(self.mxyz[1]));
        put(36, self.i32b(self.mxyz[2]));
        put(40, self.f32b(self.cella[0]));
        put(44, self.f32b(self.cella[1]));
        put(48, self.f32b(self.cella[2]));
        for off in [52, 56, 60] {
            put(off, self.f32b(90.0));
        }
        put(64, self.i32b(self.map[0]));
        put(68, self.i32b(self.map[1]));
        put(72, self.i32b(self.map[2]));
        put(76, self.f32b(-1.0));
        put(80, self.f32b(1.0));
        put(84, self.f32b(0.0));
        put(88, self.i32b(1));
        put(92, self.i32b(self.nsymbt));
        put(108, self.i32b(20140));
        if let Some((stamp, flags)) = self.imod {
            put(152, self.i32b(stamp));
            put(156, self.i32b(flags));
        }
        if self.signature {
            put(208, *b"MAP ");
        }
        put(212, self.stamp);
        put(220, self.i32b(1));
        h[224..232].copy_from_slice(b"testfile");
        h
    }
}

/// Test values for a mode, `n` of them, all exactly representable in that mode.
fn values(mode: i32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match mode {
            0 => ((i * 37 + 5) % 256) as f32 - 128.0,
            1 => ((i * 2731 + 7) % 65536) as f32 - 32768.0,
            2 => (i as f32 - 7.5) * 0.37 + if i == 3 { 1e30 } else { 0.0 },
            6 => ((i * 2731 + 7) % 65536) as f32,
            12 => {
                if i == 1 {
                    65504.0
                } else {
                    (i as f32 - 12.0) * 0.25
                }
            }
            _ => 0.0,
        })
        .collect()
}

fn encode(e: E, mode: i32, vals: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in vals {
        match (mode, e) {
            (0, _) => out.push(v as i8 as u8),
            (1, E::Le) => out.extend((v as i16).to_le_bytes()),
            (1, E::Be) => out.extend((v as i16).to_be_bytes()),
            (2, E::Le) => out.extend(v.to_le_bytes()),
            (2, E::Be) => out.extend(v.to_be_bytes()),
            (6, E::Le) => out.extend((v as u16).to_le_bytes()),
            (6, E::Be) => out.extend((v as u16).to_be_bytes()),
            (12, E::Le) => out.extend(half::f16::from_f32(v).to_le_bytes()),
            (12, E::Be) => out.extend(half::f16::from_f32(v).to_be_bytes()),
            _ => panic!("no encoder for mode {mode}"),
        }
    }
    out
}

fn write_file(dir: &Path, name: &str, header: &Hdr, ext: &[u8], data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = header.bytes();
    bytes.extend_from_slice(ext);
    bytes.extend_from_slice(data);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn assert_close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol, "{what}: {a} vs {b}");
}

const MODES: [i32; 5] = [0, 1, 2, 6, 12];

#[test]
fn all_modes_both_endiannesses_with_stamp() {
    let dir = tempfile::tempdir().unwrap();
    for e in [E::Le, E::Be] {
        for mode in MODES {
            let h = Hdr::new(e, [3, 2, 4], mode);
            let vals = values(mode, 24);
            let path = write_file(dir.path(), &format!("m{mode}_{e:?}.mrc"), &h, &[], &encode(e, mode, &vals));
            let v = read_mrc(&path).unwrap_or_else(|err| panic!("{e:?} mode {mode}: {err:#}"));
            assert_eq!(v.shape, [4, 2, 3], "{e:?} mode {mode}");
            assert_eq!(v.data, vals, "{e:?} mode {mode}");
            assert_close(v.voxel_size.unwrap(), 10.012, 1e-5, "voxel size");
            // x fastest: file index 1 is (z 0, y 0, x 1); index 3 is (0, 1, 0); index 6 is (1, 0, 0).
            assert_eq!(v.get(0, 0, 1), vals[1]);
            assert_eq!(v.get(0, 1, 0), vals[3]);
            assert_eq!(v.get(1, 0, 0), vals[6]);
        }
    }
}

#[test]
fn signed_int8_spot_values() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hdr::new(E::Le, [4, 1, 1], 0);
    let path = write_file(dir.path(), "i8.mrc", &h, &[], &[0x80, 0xff, 0x00, 0x7f]);
    assert_eq!(read_mrc(&path).unwrap().data, vec![-128.0, -1.0, 0.0, 127.0]);
}

#[test]
fn imod_unsigned_byte_flag() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Hdr::new(E::Le, [3, 1, 1], 0);
    // IMOD stamp without the "signed" flag: bytes are unsigned.
    h.imod = Some((1_146_047_817, 0));
    let path = write_file(dir.path(), "u8.mrc", &h, &[], &[200, 0, 255]);
    assert_eq!(read_mrc(&path).unwrap().data, vec![200.0, 0.0, 255.0]);
    // With the flag set (bit 0): signed.
    h.imod = Some((1_146_047_817, 1));
    let path = write_file(dir.path(), "s8.mrc", &h, &[], &[200, 0, 255]);
    assert_eq!(read_mrc(&path).unwrap().data, vec![-56.0, 0.0, -1.0]);
}

#[test]
fn endianness_detected_without_stamp() {
    let dir = tempfile::tempdir().unwrap();
    let stamps: [(&str, Option<[u8; 4]>); 4] = [
        ("zero", Some([0; 4])),
        ("garbage", Some([0x12, 0x34, 0x56, 0x78])),
        // Stamp that contradicts the header: the header wins.
        ("wrong", None),
        ("alt", Some(STAMP_LE_ALT)),
    ];
    for e in [E::Le, E::Be] {
        for mode in MODES {
            for (label, stamp) in stamps {
                let mut h = Hdr::new(e, [3, 2, 4], mode);
                match stamp {
                    Some(s) if label == "alt" => {
                        if e == E::Be {
                            continue; // 44 41 is a little-endian stamp
                        }
                        h.stamp = s;
                    }
                    Some(s) => h.stamp = s,
                    None => h.stamp = if e == E::Le { STAMP_BE } else { STAMP_LE },
                }
                // Old files lack the signature; that must not matter.
                h.signature = label != "zero";
                let vals = values(mode, 24);
                let path = write_file(dir.path(), "nostamp.mrc", &h, &[], &encode(e, mode, &vals));
                let v = read_mrc(&path).unwrap_or_else(|err| panic!("{e:?} mode {mode} {label}: {err:#}"));
                assert_eq!(v.shape, [4, 2, 3], "{e:?} mode {mode} {label}");
                assert_eq!(v.data, vals, "{e:?} mode {mode} {label}");
                assert_close(v.voxel_size.unwrap(), 10.012, 1e-5, "voxel size");
            }
        }
    }
}

#[test]
fn extended_header_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    for e in [E::Le, E::Be] {
        for mode in [2, 1] {
            let mut h = Hdr::new(e, [5, 3, 2], mode);
            h.nsymbt = 4 * 131; // not a multiple of the voxel size of most modes either
            let ext: Vec<u8> = (0..h.nsymbt as usize).map(|i| (i * 7 + 3) as u8).collect();
            let vals = values(mode, 30);
            let path = write_file(dir.path(), "ext.mrc", &h, &ext, &encode(e, mode, &vals));
            let v = read_mrc(&path).unwrap();
            assert_eq!(v.shape, [2, 3, 5]);
            assert_eq!(v.data, vals, "{e:?} mode {mode}");
        }
    }
}

#[test]
fn voxel_size_none_when_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let vals = values(2, 8);
    let mut h = Hdr::new(E::Le, [2, 2, 2], 2);
    h.mxyz = [0, 0, 0];
    let path = write_file(dir.path(), "mx0.mrc", &h, &[], &encode(E::Le, 2, &vals));
    assert_eq!(read_mrc(&path).unwrap().voxel_size, None);
    let mut h = Hdr::new(E::Be, [2, 2, 2], 2);
    h.cella = [0.0; 3];
    let path = write_file(dir.path(), "cella0.mrc", &h, &[], &encode(E::Be, 2, &vals));
    assert_eq!(read_mrc(&path).unwrap().voxel_size, None);
    // mx differing from nx (e.g. a sub-volume): the voxel size is cella.x / mx.
    let mut h = Hdr::new(E::Le, [2, 2, 2], 2);
    h.mxyz = [100, 100, 100];
    h.cella = [1234.0, 1234.0, 1234.0];
    let path = write_file(dir.path(), "mx100.mrc", &h, &[], &encode(E::Le, 2, &vals));
    assert_close(read_mrc(&path).unwrap().voxel_size.unwrap(), 12.34, 1e-5, "cella/mx");
}

#[test]
fn non_standard_axis_order_is_transposed() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [3usize, 2, 4]; // columns, rows, sections
    for map in [[2, 1, 3], [3, 1, 2], [1, 3, 2], [3, 2, 1]] {
        let mut h = Hdr::new(E::Le, dims.map(|d| d as i32), 2);
        h.map = map;
        let vals = values(2, 24);
        let path = write_file(dir.path(), "axes.mrc", &h, &[], &encode(E::Le, 2, &vals));
        let v = read_mrc(&path).unwrap();
        let mut size = [0usize; 3]; // x, y, z
        for f in 0..3 {
            size[map[f] as usize - 1] = dims[f];
        }
        assert_eq!(v.shape, [size[2], size[1], size[0]], "map {map:?}");
        let mut i = 0;
        for s in 0..dims[2] {
            for r in 0..dims[1] {
                for c in 0..dims[0] {
                    let mut xyz = [0usize; 3];
                    xyz[map[0] as usize - 1] = c;
                    xyz[map[1] as usize - 1] = r;
                    xyz[map[2] as usize - 1] = s;
                    assert_eq!(v.get(xyz[2], xyz[1], xyz[0]), vals[i], "map {map:?} at c{c} r{r} s{s}");
                    i += 1;
                }
            }
        }
    }
}

#[test]
fn truncated_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    for e in [E::Le, E::Be] {
        for mode in MODES {
            let h = Hdr::new(e, [3, 2, 4], mode);
            let mut data = encode(e, mode, &values(mode, 24));
            data.pop();
            let path = write_file(dir.path(), "cut.mrc", &h, &[], &data);
            let err = format!("{:#}", read_mrc(&path).unwrap_err());
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains("truncated"), "{err}");
        }
    }
    // Truncated inside the extended header.
    let mut h = Hdr::new(E::Le, [2, 2, 2], 2);
    h.nsymbt = 4000;
    let path = write_file(dir.path(), "cut_ext.mrc", &h, &[0; 100], &[]);
    let err = format!("{:#}", read_mrc(&path).unwrap_err());
    assert!(err.contains("cut_ext.mrc") && err.contains("truncated"), "{err}");
}

#[test]
fn complex_and_unknown_modes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for e in [E::Le, E::Be] {
        for (mode, bytes) in [(3, 4), (4, 8), (101, 1)] {
            let h = Hdr::new(e, [2, 2, 2], mode);
            let path = write_file(dir.path(), &format!("mode{mode}.mrc"), &h, &[], &vec![0u8; 8 * bytes]);
            let err = format!("{:#}", read_mrc(&path).unwrap_err());
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(&format!("mode {mode}")), "{err}");
            assert!(err.contains("supported") && err.contains("12 (float16)") && err.contains("0 (int8)"), "{err}");
        }
    }
    let h = Hdr::new(E::Le, [2, 2, 2], 7);
    let path = write_file(dir.path(), "mode7.mrc", &h, &[], &[0u8; 64]);
    let err = format!("{:#}", read_mrc(&path).unwrap_err());
    assert!(err.contains("mode7.mrc") && err.contains("mode 7"), "{err}");
}

#[test]
fn nonsense_dimensions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for dims in [[0, 2, 2], [2, -3, 2], [2, 2, 0]] {
        let h = Hdr::new(E::Le, dims, 2);
        let path = write_file(dir.path(), "dims.mrc", &h, &[], &[0u8; 64]);
        let err = format!("{:#}", read_mrc(&path).unwrap_err());
        assert!(err.contains("dims.mrc") && err.contains("dimensions"), "{dims:?}: {err}");
    }
}

/// Voxels that are not cubes, and a stack of volumes, are read with a note saying so.
#[test]
fn anisotropic_voxels_and_volume_stacks_are_noted() {
    let dir = tempfile::tempdir().unwrap();
    let vals = values(2, 8);
    let mut h = Hdr::new(E::Le, [2, 2, 2], 2);
    h.cella = [20.024, 20.024, 40.048];
    let v = read_mrc(&write_file(dir.path(), "aniso.mrc", &h, &[], &encode(E::Le, 2, &vals))).unwrap();
    assert_close(v.voxel_size.unwrap(), 10.012, 1e-5, "x size");
    assert!(v.notes.iter().any(|n| n.contains("voxel size differs between axes (z 20.024") && n.contains("x 10.012")), "{:?}", v.notes);
    let h = Hdr::new(E::Le, [2, 2, 2], 2);
    assert!(read_mrc(&write_file(dir.path(), "cubic.mrc", &h, &[], &encode(E::Le, 2, &vals))).unwrap().notes.is_empty());
    // Space group 401 with 1 section per volume: a stack of 2.
    let mut h = Hdr::new(E::Le, [2, 2, 2], 2);
    h.mxyz = [2, 2, 1];
    h.cella = [20.024, 20.024, 10.012];
    let mut bytes = h.bytes();
    bytes[88..92].copy_from_slice(&401i32.to_le_bytes());
    bytes.extend(encode(E::Le, 2, &vals));
    let stack = dir.path().join("stack.mrcs");
    std::fs::write(&stack, bytes).unwrap();
    let v = read_mrc(&stack).unwrap();
    assert!(v.notes.iter().any(|n| n.contains("a stack of 2 volumes of 1 sections")), "{:?}", v.notes);
}

/// Packed files are named as such, not read as a garbled MRC header.
#[test]
fn packed_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, says) in [
        ("t.mrc.gz", &b"\x1f\x8b\x08\x00rest"[..], "gzip-compressed"),
        ("t.zarr.zip", &b"PK\x03\x04rest of a zip"[..], "a zip archive"),
        ("t.mrc.bz2", &b"BZh91AY&SY"[..], "bzip2-compressed"),
        ("t.mrc.zst", &b"\x28\xb5\x2f\xfd\x00"[..], "zstd-compressed"),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = format!("{:#}", read_mrc(&p).unwrap_err());
        assert!(e.contains(name) && e.contains(says) && e.contains("unpack it first"), "{e}");
    }
}

#[test]
fn not_an_mrc_file() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.mrc");
    std::fs::write(&short, [0u8; 100]).unwrap();
    let err = format!("{:#}", read_mrc(&short).unwrap_err());
    assert!(err.contains("short.mrc") && err.contains("not an MRC"), "{err}");

    let text = dir.path().join("notes.mrc");
    std::fs::write(&text, "This is a text file, not a map. ".repeat(64)).unwrap();
    let err = format!("{:#}", read_mrc(&text).unwrap_err());
    assert!(err.contains("notes.mrc") && err.contains("not an MRC"), "{err}");

    let missing = dir.path().join("missing.mrc");
    let err = format!("{:#}", read_mrc(&missing).unwrap_err());
    assert!(err.contains("missing.mrc"), "{err}");
}

#[test]
fn write_mrc_f32_round_trip_and_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.mrc");
    let shape = [4usize, 3, 5];
    let mut rng = fastdet::util::SplitMix64::new(7);
    let mut data = vec![0f32; 60];
    rng.fill_uniform(&mut data, -3.0, 5.0);
    data[0] = -4.0;
    data[1] = 6.0;
    write_mrc_f32(&path, shape, &data, 10.012).unwrap();

    let v = read_mrc(&path).unwrap();
    assert_eq!(v.shape, shape);
    assert_eq!(v.data, data);
    assert_close(v.voxel_size.unwrap(), 10.012, 1e-5, "voxel size");

    let b = std::fs::read(&path).unwrap();
    assert_eq!(b.len(), 1024 + 60 * 4);
    let i = |off: usize| i32::from_le_bytes(b[off..off + 4].try_into().unwrap());
    let f = |off: usize| f32::from_le_bytes(b[off..off + 4].try_into().unwrap());
    assert_eq!([i(0), i(4), i(8)], [5, 3, 4], "nx ny nz");
    assert_eq!(i(12), 2, "mode");
    assert_eq!([i(28), i(32), i(36)], [5, 3, 4], "mx my mz");
    assert_close(f(40) as f64, 5.0 * 10.012, 1e-4, "cella x");
    assert_close(f(44) as f64, 3.0 * 10.012, 1e-4, "cella y");
    assert_close(f(48) as f64, 4.0 * 10.012, 1e-4, "cella z");
    assert_eq!([f(52), f(56), f(60)], [90.0; 3], "cellb");
    assert_eq!([i(64), i(68), i(72)], [1, 2, 3], "mapc mapr maps");
    assert_eq!(f(76), -4.0, "amin");
    assert_eq!(f(80), 6.0, "amax");
    let mean = data.iter().map(|&v| v as f64).sum::<f64>() / 60.0;
    assert_close(f(84) as f64, mean, 1e-5, "amean");
    assert_eq!(i(92), 0, "nsymbt");
    assert_eq!(&b[208..212], b"MAP ");
    assert_eq!(&b[212..214], &[0x44, 0x44]);
    // Only the file itself in the directory: no temporary left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // Bad input is refused and leaves nothing.
    let bad = dir.path().join("bad.mrc");
    let err = format!("{:#}", write_mrc_f32(&bad, shape, &data[..59], 10.0).unwrap_err());
    assert!(err.contains("bad.mrc"), "{err}");
    assert!(write_mrc_f32(&bad, [0, 3, 5], &[], 10.0).is_err());
    assert!(write_mrc_f32(&bad, shape, &data, f64::NAN).is_err());
    assert!(!bad.exists());

    // Voxel size 0 reads back as unknown.
    write_mrc_f32(&path, shape, &data, 0.0).unwrap();
    assert_eq!(read_mrc(&path).unwrap().voxel_size, None);
}

// ---------------------------------------------------------------------------------------------
// STAR
// ---------------------------------------------------------------------------------------------

fn pick(run: &str, class: usize, score: f32, x: f64, y: f64, z: f64) -> Pick {
    Pick { run: run.into(), class, score, x, y, z }
}

/// Data rows of a STAR file written by `write_run_star` (lines after the column names).
fn data_rows(text: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = text.lines().collect();
    let last_col = lines.iter().rposition(|l| l.starts_with("_rln")).unwrap();
    lines[last_col + 1..]
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[test]
fn star_two_runs_pixels_centred_classes_header() {
    let dir = tempfile::tempdir().unwrap();
    let px = 10.012;
    // Volume z = 10, y = 20, x = 30 voxels: centre at x 15, y 10, z 5 voxels
    // = 150.18, 100.12, 50.06 Å.
    let shape = [10usize, 20, 30];
    let picks = vec![
        pick("TS_5_4", 0, 0.9, 150.18, 0.0, 100.12),
        pick("TS_6_4", 2, 0.5, 10.0, 20.0, 30.0),
        pick("TS_5_4", 5, 0.25, 300.36, 200.24, 0.0),
        pick("TS_5_4", 3, 0.125, 1001.2, 50.06, 50.06),
        pick("TS_6_4", 4, 0.75, 40.0, 50.0, 60.0),
    ];
    let a = dir.path().join("TS_5_4.star");
    let b = dir.path().join("TS_6_4.star");
    write_run_star(&a, "TS_5_4", &picks, px, shape).unwrap();
    write_run_star(&b, "TS_6_4", &picks, px, shape).unwrap();

    // Read back: only the requested run, in input order, pixels = Å / pixel size, 1-based classes.
    let ra = read_star_coordinates(&a).unwrap();
    assert_eq!(ra.len(), 3);
    let expect_a = [
        (1usize, 15.0, 0.0, 10.0, 0.9f32),
        (6, 30.0, 20.0, 0.0, 0.25),
        (4, 100.0, 5.0, 5.0, 0.125),
    ];
    for (got, want) in ra.iter().zip(expect_a) {
        assert_eq!(got.0, "TS_5_4");
        assert_eq!(got.1, want.0);
        assert_close(got.2, want.1, 1e-6, "x px");
        assert_close(got.3, want.2, 1e-6, "y px");
        assert_close(got.4, want.3, 1e-6, "z px");
        assert_close(got.5 as f64, want.4 as f64, 1e-6, "fom");
    }
    let rb = read_star_coordinates(&b).unwrap();
    assert_eq!(rb.len(), 2);
    assert!(rb.iter().all(|r| r.0 == "TS_6_4"));
    assert_eq!(rb.iter().map(|r| r.1).collect::<Vec<_>>(), vec![3, 5]);
    assert_close(rb[0].2, 10.0 / px, 1e-6, "x px");
    assert_close(rb[1].4, 60.0 / px, 1e-6, "z px");

    // Header lines.
    let text = std::fs::read_to_string(&a).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "# version 50001");
    // The class numbers are named, in the CSV's class order.
    let legend = "# _rlnClassNumber 1 apo-ferritin, 2 beta-galactosidase, 3 ribosome, 4 thyroglobulin, 5 virus-like-particle, 6 beta-amylase";
    assert!(lines.contains(&legend), "{text}");
    // The grid the coordinates are in.
    assert!(lines.contains(&"# _rlnCoordinateX/Y/Z: voxels of 10.012 Å of a 30 x 20 x 10 (x, y, z) tomogram; _rlnCentered*Angst: Å from its centre"), "{text}");
    let block = lines.iter().position(|l| *l == "data_particles").expect("data_particles block");
    assert_eq!(lines.iter().filter(|l| l.starts_with("data_")).count(), 1, "one data block");
    let lp = block + lines[block..].iter().position(|l| *l == "loop_").expect("loop_");
    let columns = [
        "_rlnTomoName #1",
        "_rlnCoordinateX #2",
        "_rlnCoordinateY #3",
        "_rlnCoordinateZ #4",
        "_rlnCenteredCoordinateXAngst #5",
        "_rlnCenteredCoordinateYAngst #6",
        "_rlnCenteredCoordinateZAngst #7",
        "_rlnClassNumber #8",
        "_rlnAutopickFigureOfMerit #9",
    ];
    assert_eq!(&lines[lp + 1..lp + 10], &columns);

    // Centred Å values, by hand: coordinate − (size / 2) · pixel size.
    let rows = data_rows(&text);
    assert_eq!(rows.len(), 3);
    let centred = [
        [0.0, -100.12, 50.06],          // (150.18 − 150.18, 0 − 100.12, 100.12 − 50.06)
        [150.18, 100.12, -50.06],       // (300.36 − 150.18, 200.24 − 100.12, 0 − 50.06)
        [851.02, -50.06, 0.0],          // (1001.2 − 150.18, 50.06 − 100.12, 50.06 − 50.06)
    ];
    for (row, want) in rows.iter().zip(centred) {
        assert_eq!(row.len(), 9);
        for k in 0..3 {
            let got: f64 = row[4 + k].parse().unwrap();
            assert_close(got, want[k], 1e-6, &format!("centred {k}"));
        }
    }
    assert_eq!(rows[0][7], "1");
    assert_eq!(rows[1][7], "6");
    // Only the star files in the directory (atomic writes leave no temporaries).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn star_run_without_picks_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.star");
    let picks = vec![pick("TS_5_4", 0, 0.9, 1.0, 2.0, 3.0)];
    write_run_star(&path, "TS_99", &picks, 10.0, [10, 20, 30]).unwrap();
    assert!(read_star_coordinates(&path).unwrap().is_empty());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("data_particles") && text.contains("_rlnAutopickFigureOfMerit #9"));

    let bad = dir.path().join("bad.star");
    let e = format!("{:#}", write_run_star(&bad, "TS_5_4", &[pick("TS_5_4", 6, 1.0, 0.0, 0.0, 0.0)], 10.0, [1, 1, 1]).unwrap_err());
    assert!(e.contains("bad.star") && e.contains("class"), "{e}");
    let e = format!("{:#}", write_run_star(&bad, "TS 5", &[], 10.0, [1, 1, 1]).unwrap_err());
    assert!(e.contains("bad.star") && e.contains("whitespace"), "{e}");
    assert!(write_run_star(&bad, "TS_5_4", &picks, 0.0, [1, 1, 1]).is_err());
    assert!(write_run_star(&bad, "TS_5_4", &[pick("TS_5_4", 0, 1.0, f64::NAN, 0.0, 0.0)], 10.0, [1, 1, 1]).is_err());
    // A class out of range in another run does not matter.
    write_run_star(&bad, "TS_5_4", &[pick("other", 9, 1.0, 0.0, 0.0, 0.0)], 10.0, [1, 1, 1]).unwrap();
}

#[test]
fn star_reader_finds_columns_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relion.star");
    let text = "\n# version 50001\n\ndata_general\n\n_rlnTomoSubTomosAre2DStacks 0\n\n\
        data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnTomoName #2\n_rlnCoordinateX #3\n_rlnCoordinateY #4\n\
        _rlnCoordinateZ #5\n_rlnClassNumber #6\n_rlnAutopickFigureOfMerit #7\n1 decoy 9 9 9 9 9\n\n\
        data_particles\n\nloop_ \n_rlnAutopickFigureOfMerit #1 \n_rlnCoordinateZ #2 \n_rlnTomoName #3 \n\
        _rlnAngleRot #4 \n_rlnCoordinateY #5 \n_rlnCoordinateX #6 \n_rlnClassNumber #7 \n\
        0.5 3.0 TS_1 10.0 2.0 1.0 2\n  0.25   6.5  'TS_2'  0 5.5 4.5 1  \n\n";
    std::fs::write(&path, text).unwrap();
    let r = read_star_coordinates(&path).unwrap();
    assert_eq!(
        r,
        vec![
            ("TS_1".to_string(), 2, 1.0, 2.0, 3.0, 0.5f32),
            ("TS_2".to_string(), 1, 4.5, 5.5, 6.5, 0.25f32),
        ]
    );

    std::fs::write(&path, "data_particles\nloop_\n_rlnTomoName #1\n_rlnCoordinateX #2\nTS_1 1.0\n").unwrap();
    let e = format!("{:#}", read_star_coordinates(&path).unwrap_err());
    assert!(e.contains("relion.star") && e.contains("_rlnClassNumber"), "{e}");

    std::fs::write(&path, format!("{}TS_1 1.0 2.0\n", &text[..text.rfind("0.5 3.0").unwrap()])).unwrap();
    let e = format!("{:#}", read_star_coordinates(&path).unwrap_err());
    assert!(e.contains("relion.star:") && e.contains("3 values"), "{e}");
}
