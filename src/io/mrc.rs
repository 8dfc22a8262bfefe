//! MRC2014 tomogram reader and `f32` writer (`.mrc`, `.rec`, `.map`).
//!
//! [`read_mrc`] returns the same [`Volume`] as the OME-Zarr reader: `shape = [z, y, x]`, C order,
//! `f32`, whatever the stored mode (0 int8, 1 int16, 2 float32, 6 uint16, 12 float16). With the
//! standard axis order (`mapc, mapr, maps = 1, 2, 3`, also assumed when those words are not a
//! permutation of 1..3) the file order *is* `[z, y, x]` C order; other permutations are
//! transposed into it.
//!
//! Byte order comes from the machine stamp (byte 212: `44 44`/`44 41` little, `11 11` big). When
//! the stamp is missing or garbage — or contradicts a header that only makes sense the other way
//! round — the order is the one under which mode, dimensions and file size are plausible.
//!
//! Mode 0 is *signed* int8 as MRC2014 prescribes, except in files carrying IMOD's stamp
//! (`imodStamp` = 1146047817 at byte 152) without its "bytes are signed" flag (bit 0 of
//! `imodFlags` at byte 156): IMOD wrote unsigned bytes in that case.
//!
//! The voxel size (Å) is `cella.x / mx`, `None` when either is zero, negative or not finite.
//! Every error names the file.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::io::zarr::Volume;

/// Size of the fixed MRC header, in bytes.
pub const HEADER_BYTES: usize = 1024;
/// `imodStamp` value marking a header written by IMOD.
const IMOD_STAMP: i32 = 1_146_047_817;
/// Largest dimension considered plausible when guessing the byte order.
const MAX_PLAUSIBLE_DIM: i64 = 1 << 20;
/// Modes this reader converts, with their names (for error messages).
const SUPPORTED: &str = "0 (int8), 1 (int16), 2 (float32), 6 (uint16), 12 (float16)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endian {
    Little,
    Big,
}

/// Header words read under one byte order.
struct Header<'a> {
    bytes: &'a [u8],
    endian: Endian,
}

impl Header<'_> {
    fn word(&self, index: usize) -> [u8; 4] {
        self.bytes[4 * index..4 * index + 4].try_into().unwrap()
    }
    fn i32(&self, index: usize) -> i32 {
        match self.endian {
            Endian::Little => i32::from_le_bytes(self.word(index)),
            Endian::Big => i32::from_be_bytes(self.word(index)),
        }
    }
    fn f32(&self, index: usize) -> f32 {
        match self.endian {
            Endian::Little => f32::from_le_bytes(self.word(index)),
            Endian::Big => f32::from_be_bytes(self.word(index)),
        }
    }
    fn dims(&self) -> [i64; 3] {
        [self.i32(0) as i64, self.i32(1) as i64, self.i32(2) as i64]
    }
    fn mode(&self) -> i32 {
        self.i32(3)
    }
    fn nsymbt(&self) -> i64 {
        self.i32(23) as i64
    }

    /// How sensible the header is under this byte order, compared lexicographically:
    /// (mode is an MRC mode, dims in 1..=2^20, extended header fits, data fits in the file).
    fn plausibility(&self, file_len: u64) -> (bool, bool, bool, bool) {
        let mode_known = matches!(self.mode(), 0 | 1 | 2 | 3 | 4 | 6 | 12 | 101);
        let dims = self.dims();
        let dims_ok = dims.iter().all(|&n| (1..=MAX_PLAUSIBLE_DIM).contains(&n));
        let nsymbt = self.nsymbt();
        let ext_ok = nsymbt >= 0 && HEADER_BYTES as u64 + nsymbt as u64 <= file_len;
        let data_ok = ext_ok
            && dims_ok
            && mode_size(self.mode()).is_some_and(|size| {
                let need = dims.iter().product::<i64>() as u64 * size as u64;
                HEADER_BYTES as u64 + nsymbt as u64 + need <= file_len
            });
        (mode_known, dims_ok, ext_ok, data_ok)
    }
}

/// Bytes per voxel of a supported mode.
fn mode_size(mode: i32) -> Option<usize> {
    match mode {
        0 => Some(1),
        1 | 6 | 12 => Some(2),
        2 => Some(4),
        _ => None,
    }
}

fn mode_name(mode: i32) -> &'static str {
    match mode {
        0 => "int8",
        1 => "int16",
        2 => "float32",
        3 => "complex int16",
        4 => "complex float32",
        6 => "uint16",
        12 => "float16",
        101 => "4-bit packed",
        _ => "not an MRC mode",
    }
}

fn stamp_endian(stamp: &[u8]) -> Option<Endian> {
    match (stamp[0], stamp[1]) {
        (0x44, 0x44) | (0x44, 0x41) => Some(Endian::Little),
        (0x11, 0x11) => Some(Endian::Big),
        _ => None,
    }
}

/// Reads an MRC2014 file (modes 0, 1, 2, 6, 12) as an `f32` volume `[z, y, x]`.
pub fn read_mrc(path: &Path) -> Result<Volume> {
    let name = path.display();
    let mut file = std::fs::File::open(path).with_context(|| format!("{name}: cannot open MRC file"))?;
    let file_len = file.metadata().with_context(|| format!("{name}: cannot stat MRC file"))?.len();
    let mut magic = [0u8; 6];
    let got = file.read(&mut magic).with_context(|| format!("{name}: cannot read MRC header"))?;
    if let Some(what) = packed_kind(&magic[..got]) {
        bail!("{name}: {what}, not an MRC file or a zarr store: unpack it first");
    }
    file.seek(SeekFrom::Start(0)).with_context(|| format!("{name}: cannot read MRC header"))?;
    if file_len < HEADER_BYTES as u64 {
        bail!("{name}: not an MRC file: {file_len} bytes, shorter than the {HEADER_BYTES}-byte MRC header");
    }
    let mut bytes = vec![0u8; HEADER_BYTES];
    file.read_exact(&mut bytes).with_context(|| format!("{name}: cannot read MRC header"))?;
    let has_signature = &bytes[208..211] == b"MAP";

    // Byte order: the machine stamp unless the header only makes sense the other way round;
    // without a usable stamp, the more plausible reading (little-endian on a tie).
    let little = Header { bytes: &bytes, endian: Endian::Little };
    let big = Header { bytes: &bytes, endian: Endian::Big };
    let (pl, pb) = (little.plausibility(file_len), big.plausibility(file_len));
    let endian = match stamp_endian(&bytes[212..216]) {
        Some(Endian::Little) if pb > pl => Endian::Big,
        Some(Endian::Big) if pl > pb => Endian::Little,
        Some(e) => e,
        None if pb > pl => Endian::Big,
        None => Endian::Little,
    };
    let h = Header { bytes: &bytes, endian };
    let (mode_known, dims_ok, _, _) = h.plausibility(file_len);
    if !has_signature && !mode_known && !dims_ok {
        let [nx, ny, nz] = h.dims();
        bail!(
            "{name}: not an MRC file: no \"MAP \" signature at byte 208, and the header \
             (nx, ny, nz = {nx}, {ny}, {nz}; mode {}) makes no sense in either byte order",
            h.mode()
        );
    }

    let mode = h.mode();
    let [nx, ny, nz] = h.dims();
    if nx <= 0 || ny <= 0 || nz <= 0 {
        bail!("{name}: invalid MRC dimensions nx, ny, nz = {nx}, {ny}, {nz} (each must be at least 1)");
    }
    let size = match mode_size(mode) {
        Some(s) => s,
        None => bail!(
            "{name}: unsupported MRC mode {mode} ({}); supported modes: {SUPPORTED}",
            mode_name(mode)
        ),
    };
    let nsymbt = h.nsymbt();
    if nsymbt < 0 {
        bail!("{name}: invalid MRC header: negative extended header size nsymbt = {nsymbt}");
    }
    let offset = HEADER_BYTES as u64 + nsymbt as u64;
    let dims = [nx as usize, ny as usize, nz as usize];
    let numel = dims
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n))
        .with_context(|| format!("{name}: MRC dimensions {nx} x {ny} x {nz} overflow"))?;
    let need = (numel as u64)
        .checked_mul(size as u64)
        .with_context(|| format!("{name}: MRC dimensions {nx} x {ny} x {nz} overflow"))?;
    if file_len < offset.saturating_add(need) {
        bail!(
            "{name}: truncated MRC file: {nx} x {ny} x {nz} voxels of mode {mode} ({}) need {need} data \
             bytes after the {offset}-byte header (1024 + {nsymbt} extended), but the file has only {} \
             (file size {file_len} bytes)",
            mode_name(mode),
            file_len.saturating_sub(offset)
        );
    }

    let signed_bytes = !(h.i32(38) == IMOD_STAMP && h.i32(39) & 1 == 0);
    file.seek(SeekFrom::Start(offset)).with_context(|| format!("{name}: cannot seek to MRC data"))?;
    let file_data = read_data(&mut file, numel, mode, endian, signed_bytes)
        .with_context(|| format!("{name}: cannot read MRC data ({need} bytes at offset {offset})"))?;

    // Axis order: columns/rows/sections hold axes mapc/mapr/maps (1 = X, 2 = Y, 3 = Z).
    let map = [h.i32(16), h.i32(17), h.i32(18)];
    let mut sorted = map;
    sorted.sort_unstable();
    let (shape, data) = if sorted == [1, 2, 3] && map != [1, 2, 3] {
        transpose_to_zyx(&file_data, dims, map)
    } else {
        ([dims[2], dims[1], dims[0]], file_data)
    };
    let mut notes = Vec::new();
    // All zeros: an old or minimal writer that left them unset.
    if sorted != [1, 2, 3] && map != [0, 0, 0] {
        notes.push(format!("axis order mapc, mapr, maps = {}, {}, {} is not an order of 1, 2, 3; read as x, y, z", map[0], map[1], map[2]));
    }
    let extra = file_len - offset - need;
    if extra > 0 {
        notes.push(format!(
            "{extra} bytes after the {nx} x {ny} x {nz} voxels of mode {mode} ({}) that the header does not account for: are its mode and dimensions right?",
            mode_name(mode)
        ));
    }

    // Voxel size per axis x, y, z: cella over the sampling mx, my, mz, in f32 as the header
    // holds it, then the f32's shortest decimal (5.006, not 5.006000137329102).
    let size = |k: usize| {
        let (cella, m) = (h.f32(10 + k), h.i32(7 + k));
        let v = cella / m as f32;
        (m > 0 && cella.is_finite() && cella > 0.0 && v > 0.0).then(|| v.to_string().parse::<f64>().unwrap_or(v as f64))
    };
    let voxel_size = size(0);
    if let (Some(x), Some(y), Some(z)) = (size(0), size(1), size(2)) {
        if crate::io::zarr::anisotropic(&[z, y, x]) {
            notes.push(crate::io::zarr::anisotropy_note(&[z, y, x]));
        }
    }
    // A stack of volumes (space group 401, mz sections each) is read as one tall volume.
    let (ispg, mz) = (h.i32(22), h.i32(9));
    if ispg == 401 && mz > 0 && (mz as i64) < nz {
        notes.push(format!("a stack of {} volumes of {mz} sections (space group 401), read as one volume of {nz} sections", (nz + mz as i64 - 1) / mz as i64));
    }
    Ok(Volume { shape, data, voxel_size, notes })
}

/// What a file starting with `magic` is, when it is packed rather than an MRC file: a zip archive
/// (a zipped zarr store) or a compressed file (`.mrc.gz`, ...).
fn packed_kind(magic: &[u8]) -> Option<&'static str> {
    const KINDS: [(&[u8], &str); 5] = [
        (b"PK\x03\x04", "a zip archive (zarr stores and MRC files are read unpacked)"),
        (b"\x1f\x8b", "gzip-compressed"),
        (b"BZh", "bzip2-compressed"),
        (b"\xfd7zXZ\x00", "xz-compressed"),
        (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    ];
    KINDS.iter().find(|(m, _)| magic.starts_with(m)).map(|(_, k)| *k)
}

/// Reads `numel` voxels of `mode` and converts them to `f32`.
fn read_data(file: &mut std::fs::File, numel: usize, mode: i32, endian: Endian, signed_bytes: bool) -> Result<Vec<f32>> {
    if mode == 2 {
        // Straight into the output buffer, then fix the byte order in place.
        let mut out = vec![0f32; numel];
        file.read_exact(bytemuck::cast_slice_mut(&mut out))?;
        let native = if cfg!(target_endian = "little") { Endian::Little } else { Endian::Big };
        if endian != native {
            out.par_iter_mut().for_each(|v| *v = f32::from_bits(v.to_bits().swap_bytes()));
        }
        return Ok(out);
    }
    let size = mode_size(mode).expect("checked by the caller");
    let mut raw = vec![0u8; numel * size];
    file.read_exact(&mut raw)?;
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; numel];
    let two = |b: &[u8]| -> [u8; 2] {
        match endian {
            Endian::Little => [b[0], b[1]],
            Endian::Big => [b[1], b[0]],
        }
    };
    match mode {
        0 if signed_bytes => out.par_iter_mut().zip(raw.par_iter()).for_each(|(o, &b)| *o = b as i8 as f32),
        0 => out.par_iter_mut().zip(raw.par_iter()).for_each(|(o, &b)| *o = b as f32),
        1 => out.par_chunks_mut(CHUNK).zip(raw.par_chunks(CHUNK * 2)).for_each(|(o, r)| {
            for (v, b) in o.iter_mut().zip(r.chunks_exact(2)) {
                *v = i16::from_le_bytes(two(b)) as f32;
            }
        }),
        6 => out.par_chunks_mut(CHUNK).zip(raw.par_chunks(CHUNK * 2)).for_each(|(o, r)| {
            for (v, b) in o.iter_mut().zip(r.chunks_exact(2)) {
                *v = u16::from_le_bytes(two(b)) as f32;
            }
        }),
        12 => out.par_chunks_mut(CHUNK).zip(raw.par_chunks(CHUNK * 2)).for_each(|(o, r)| {
            for (v, b) in o.iter_mut().zip(r.chunks_exact(2)) {
                *v = half::f16::from_le_bytes(two(b)).to_f32();
            }
        }),
        _ => unreachable!("mode {mode} has a size but no converter"),
    }
    Ok(out)
}

/// Reorders data stored as columns/rows/sections along axes `map` (1 = X, 2 = Y, 3 = Z) into
/// `[z, y, x]` C order. `dims` are the file's (columns, rows, sections) counts.
fn transpose_to_zyx(src: &[f32], dims: [usize; 3], map: [i32; 3]) -> ([usize; 3], Vec<f32>) {
    // Axis (0 = X, 1 = Y, 2 = Z) of each file dimension, and the size of each axis.
    let axis = map.map(|m| (m - 1) as usize);
    let mut size = [0usize; 3];
    for f in 0..3 {
        size[axis[f]] = dims[f];
    }
    // Output stride of each axis in [z, y, x] C order, then of each file dimension.
    let axis_stride = [1, size[0], size[0] * size[1]];
    let stride = axis.map(|a| axis_stride[a]);
    let mut out = vec![0f32; src.len()];
    let mut i = 0;
    for s in 0..dims[2] {
        for r in 0..dims[1] {
            let base = s * stride[2] + r * stride[1];
            for c in 0..dims[0] {
                out[base + c * stride[0]] = src[i];
                i += 1;
            }
        }
    }
    ([size[2], size[1], size[0]], out)
}

/// Writes `data` (`shape = [z, y, x]`, C order) as a little-endian MRC2014 float32 (mode 2) file,
/// atomically.
///
/// The header carries the `"MAP "` signature, the little-endian machine stamp, `mx, my, mz = nx,
/// ny, nz`, `cella = n * voxel_size` (so [`read_mrc`] gives back `voxel_size`; 0 means unknown),
/// axis order 1, 2, 3, space group 1, `nversion` 20140, and min / max / mean / rms over the finite
/// values. Errors if `data.len()` does not match `shape`, a dimension is 0 or above `i32::MAX`, or
/// `voxel_size` is negative or not finite.
pub fn write_mrc_f32(path: &Path, shape: [usize; 3], data: &[f32], voxel_size: f64) -> Result<()> {
    let name = path.display();
    let [nz, ny, nx] = shape;
    if shape.iter().any(|&n| n == 0 || n > i32::MAX as usize) {
        bail!("{name}: cannot write MRC of shape {shape:?} (each dimension must be in 1..=2^31-1)");
    }
    let numel = shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n));
    if numel != Some(data.len()) {
        bail!("{name}: MRC shape {shape:?} needs {:?} values, got {}", numel, data.len());
    }
    if !voxel_size.is_finite() || voxel_size < 0.0 {
        bail!("{name}: invalid voxel size {voxel_size} Å for MRC (must be finite and >= 0)");
    }

    let (mut min, mut max, mut sum, mut sum2, mut count) = (f64::INFINITY, f64::NEG_INFINITY, 0f64, 0f64, 0usize);
    for &v in data.iter().filter(|v| v.is_finite()) {
        let v = v as f64;
        min = min.min(v);
        max = max.max(v);
        sum += v;
        sum2 += v * v;
        count += 1;
    }
    let (min, max, mean, rms) = if count == 0 {
        // MRC2014: dmax < dmin means "not well determined"; same for rms < 0.
        (0.0, -1.0, -2.0, -1.0)
    } else {
        let mean = sum / count as f64;
        (min, max, mean, (sum2 / count as f64 - mean * mean).max(0.0).sqrt())
    };

    let mut h = vec![0u8; HEADER_BYTES];
    let put_i32 = |h: &mut [u8], word: usize, v: i32| h[4 * word..4 * word + 4].copy_from_slice(&v.to_le_bytes());
    for (w, v) in [(0, nx), (1, ny), (2, nz), (7, nx), (8, ny), (9, nz)] {
        put_i32(&mut h, w, v as i32);
    }
    put_i32(&mut h, 3, 2); // mode: float32
    put_i32(&mut h, 16, 1); // mapc, mapr, maps
    put_i32(&mut h, 17, 2);
    put_i32(&mut h, 18, 3);
    put_i32(&mut h, 22, 1); // ispg: a single volume
    put_i32(&mut h, 27, 20140); // nversion
    put_i32(&mut h, 55, 1); // nlabl
    let put_f32 = |h: &mut [u8], word: usize, v: f64| h[4 * word..4 * word + 4].copy_from_slice(&(v as f32).to_le_bytes());
    for (w, n) in [(10, nx), (11, ny), (12, nz)] {
        put_f32(&mut h, w, n as f64 * voxel_size);
    }
    for w in 13..16 {
        put_f32(&mut h, w, 90.0); // cellb
    }
    put_f32(&mut h, 19, min);
    put_f32(&mut h, 20, max);
    put_f32(&mut h, 21, mean);
    put_f32(&mut h, 54, rms);
    h[208..212].copy_from_slice(b"MAP ");
    h[212..216].copy_from_slice(&[0x44, 0x44, 0x00, 0x00]);
    let label = b"fastdet: float32 volume";
    h[224..224 + label.len()].copy_from_slice(label);
    for b in &mut h[224 + label.len()..304] {
        *b = b' ';
    }

    crate::util::write_atomic(path, |f| {
        (|| -> std::io::Result<()> {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            w.write_all(&h)?;
            if cfg!(target_endian = "little") {
                w.write_all(bytemuck::cast_slice(data))?;
            } else {
                for chunk in data.chunks(1 << 16) {
                    let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
                    w.write_all(&bytes)?;
                }
            }
            w.flush()
        })()
        .with_context(|| format!("{name}: cannot write MRC file"))
    })
}
