//! Synthetic tomograms with the six CZII particle kinds, written in the Kaggle competition layout
//! (OME-Zarr v2 + copick picks JSON).
//!
//! A port of `reference/synth.py`, the generator of the bundled fixture dataset and of the data the
//! demo models were trained on. Per run:
//! - each particle kind has its own shape (hollow shell, dim blob, four lobes, two subunits,
//!   elongated dimer, thick shell), randomly rotated, rendered as a binary mask and blurred
//!   (Gaussian σ 0.8 voxel);
//! - particles are placed one at a time in a shuffled order at uniform centres at least 0.6 radius
//!   from every border, retried up to 200 times until no earlier particle is closer than the sum of
//!   the radii + 1 voxel (a particle that never fits is skipped, as in synth.py);
//! - background `blur(N(0,1), 6) * 4`, white noise `N(0, noise)`, a final blur σ 0.7, and the
//!   density is flipped and scaled like cryo-ET data: `v = -v * 1e-5 + 2e-6` (particles are darker
//!   than the background).
//!
//! Gaussian blurs follow `scipy.ndimage.gaussian_filter` (truncate 4, `reflect` borders). The random
//! numbers come from [`SplitMix64`], not numpy, so a seed gives other tomograms than synth.py's, drawn
//! from the same distribution; everything is deterministic per seed (also across thread counts).
//!
//! Written per run: `{root}/{split}/static/ExperimentRuns/{run}/VoxelSpacing10.000/denoised.zarr`
//! (arrays `0`, `1`, `2`: full resolution, 2x and 4x mean-binned; f32, chunks 64³, blosc-zstd level 5
//! with byte shuffle) and `{root}/{split}/overlay/ExperimentRuns/{run}/Picks/{particle}.json`
//! (ground truth, Å, one file per class even when it holds no points).

use crate::particles::{ANGSTROM_PER_VOXEL, CLASSES};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zarrs::array::{Array, ArrayMetadata, ArrayMetadataV2, ArraySubset};
use zarrs::filesystem::FilesystemStore;

use crate::util::SplitMix64;

/// Particles per class (in [`CLASSES`] order) of the bundled fixture's 80x160x160 tomograms.
pub const FIXTURE_COUNTS: [usize; 6] = [10, 5, 4, 5, 3, 4];
/// Shape (z, y, x) of the bundled fixture's tomograms.
pub const FIXTURE_SHAPE: [usize; 3] = [80, 160, 160];
/// White-noise level measured on the bundled fixture (its background variance and voxel-to-voxel
/// correlation fit `noise` ≈ 0.8 with everything else as in synth.py, whose own default is 0.35).
pub const FIXTURE_NOISE: f32 = 0.8;
/// Chunk edge of the written zarr arrays (clipped to the array shape).
pub const CHUNK: usize = 64;
/// Name of the voxel-spacing directory of the competition layout.
pub const VOXEL_SPACING_DIR: &str = "VoxelSpacing10.000";
/// Placement attempts per particle before it is skipped (synth.py: 200).
const ATTEMPTS: usize = 200;

/// What to synthesise.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Number of runs, named `TS_synth_1..=runs`.
    pub runs: usize,
    /// Tomogram shape z, y, x in voxels (10.012 Å each).
    pub shape: [usize; 3],
    /// Master seed; every run derives its own from it.
    pub seed: u64,
    /// Split directory under the root (`test`, `train`, ...).
    pub split: String,
    /// Standard deviation of the white noise added before the last blur (synth.py: 0.35), in units
    /// of the particle density (a solid particle is 1, beta-amylase 0.6).
    pub noise: f32,
    /// Particles requested per class, in [`CLASSES`] order (placement may skip some in a crowded
    /// volume).
    pub particles_per_class: [usize; 6],
}

impl Default for SynthConfig {
    /// Two 80x160x160 runs like the bundled fixture, seed 0, split `test`, noise 0.8 (as the fixture).
    fn default() -> Self {
        Self {
            runs: 2,
            shape: FIXTURE_SHAPE,
            seed: 0,
            split: "test".to_string(),
            noise: FIXTURE_NOISE,
            particles_per_class: FIXTURE_COUNTS,
        }
    }
}

/// The fixture's particle counts scaled to a volume of `shape` (same particle density, rounded, at
/// least one particle per class).
pub fn counts_for_shape(shape: [usize; 3]) -> [usize; 6] {
    let ratio = shape.iter().product::<usize>() as f64 / FIXTURE_SHAPE.iter().product::<usize>() as f64;
    FIXTURE_COUNTS.map(|c| ((c as f64 * ratio).round() as usize).max(1))
}

/// One synthetic tomogram and its ground truth.
#[derive(Debug, Clone)]
pub struct Tomogram {
    pub shape: [usize; 3],
    /// C order, x fastest.
    pub data: Vec<f32>,
    /// Per class (in [`CLASSES`] order): particle centres (x, y, z) in Å.
    pub picks: Vec<Vec<[f64; 3]>>,
}

/// Name of run `i` (1-based).
pub fn run_name(i: usize) -> String {
    format!("TS_synth_{i}")
}

/// Seed of run `i` (1-based) derived from the master seed.
pub fn run_seed(seed: u64, i: usize) -> u64 {
    SplitMix64::new(seed ^ (i as u64).wrapping_mul(0xd6e8_feb8_6659_fd93)).next_u64()
}

// ---------------------------------------------------------------------------------------------
// Gaussian blur (scipy.ndimage.gaussian_filter, truncate = 4, mode = "reflect")

fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let w: Vec<f64> = (-radius..=radius).map(|x| (-0.5 * (x * x) as f64 / (sigma * sigma)).exp()).collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|v| (v / s) as f32).collect()
}

/// scipy's `reflect` (half-sample symmetric: `d c b a | a b c d | d c b a`), any offset.
fn reflect(i: i64, n: usize) -> usize {
    let n = n as i64;
    let p = 2 * n;
    let m = i.rem_euclid(p);
    (if m >= n { p - 1 - m } else { m }) as usize
}

/// Index tables `idx[o][k]` = source index of output `o`, tap `k` along an axis of length `n`.
fn tap_indices(n: usize, radius: usize) -> Vec<usize> {
    let taps = 2 * radius + 1;
    let mut t = Vec::with_capacity(n * taps);
    for o in 0..n as i64 {
        for k in 0..taps as i64 {
            t.push(reflect(o + k - radius as i64, n));
        }
    }
    t
}

/// Separable 3-D Gaussian blur in place (axes z, y, x in turn).
pub fn gaussian_blur(data: &mut [f32], shape: [usize; 3], sigma: f64) {
    let [d, h, w] = shape;
    assert_eq!(data.len(), d * h * w);
    if data.is_empty() {
        return;
    }
    let k = gaussian_kernel(sigma);
    let taps = k.len();
    let radius = taps / 2;
    let plane = h * w;
    // z: output plane z = sum_k k * input plane reflect(z + k - r)
    {
        let idx = tap_indices(d, radius);
        let src = data.to_vec();
        data.par_chunks_mut(plane).enumerate().for_each(|(z, out)| {
            out.fill(0.0);
            for (t, &wk) in k.iter().enumerate() {
                let s = &src[idx[z * taps + t] * plane..][..plane];
                out.iter_mut().zip(s).for_each(|(o, &v)| *o += wk * v);
            }
        });
    }
    // y: within each plane, output row y = sum_k k * row reflect(y + k - r)
    {
        let idx = tap_indices(h, radius);
        data.par_chunks_mut(plane).for_each(|p| {
            let src = p.to_vec();
            for y in 0..h {
                let out = &mut p[y * w..][..w];
                out.fill(0.0);
                for (t, &wk) in k.iter().enumerate() {
                    let s = &src[idx[y * taps + t] * w..][..w];
                    out.iter_mut().zip(s).for_each(|(o, &v)| *o += wk * v);
                }
            }
        });
    }
    // x: along each row
    {
        let idx = tap_indices(w, radius);
        data.par_chunks_mut(w).for_each(|row| {
            let src = row.to_vec();
            for (x, o) in row.iter_mut().enumerate() {
                let ii = &idx[x * taps..][..taps];
                *o = k.iter().zip(ii).map(|(&wk, &i)| wk * src[i]).sum();
            }
        });
    }
}

/// A field of independent normal values (mean 0, std `scale`); z-planes are drawn from their own
/// generators so the field is the same whatever the thread count.
fn normal_field(shape: [usize; 3], seed: u64, scale: f32) -> Vec<f32> {
    let plane = shape[1] * shape[2];
    let mut v = vec![0.0f32; shape.iter().product()];
    if plane == 0 {
        return v;
    }
    v.par_chunks_mut(plane).enumerate().for_each(|(z, p)| {
        let mut rng = SplitMix64::new(run_seed(seed, z + 1));
        for x in p {
            *x = rng.normal() as f32 * scale;
        }
    });
    v
}

// ---------------------------------------------------------------------------------------------
// Particles

/// Rotation matrix of a random unit quaternion (synth.py's formula).
fn random_rotation(rng: &mut SplitMix64) -> [[f64; 3]; 3] {
    let mut q = [rng.normal(), rng.normal(), rng.normal(), rng.normal()];
    let norm = q.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-300);
    q.iter_mut().for_each(|v| *v /= norm);
    let [a, b, c, d] = q;
    [
        [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
        [2.0 * (b * c + a * d), a * a - b * b + c * c - d * d, 2.0 * (c * d - a * b)],
        [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ]
}

/// Patch edge for a particle of radius `r` voxels (odd): `ceil(r) * 2 + 5`.
fn patch_size(r: f64) -> usize {
    r.ceil() as usize * 2 + 5
}

/// Density patch `n³` (n = [`patch_size`]) of class `class` with radius `r` voxels, centred on the
/// patch centre, randomly rotated, blurred with σ 0.8.
pub fn render_particle(class: usize, r: f64, rng: &mut SplitMix64) -> Vec<f32> {
    let n = patch_size(r);
    let c = n as f64 / 2.0;
    let rot = random_rotation(rng);
    let mut v = vec![0.0f32; n * n * n];
    let ball = |x: f64, y: f64, z: f64, rad: f64| (x * x + y * y + z * z).sqrt() < rad;
    for iz in 0..n {
        let z = iz as f64 + 0.5 - c;
        for iy in 0..n {
            let y = iy as f64 + 0.5 - c;
            for ix in 0..n {
                let x = ix as f64 + 0.5 - c;
                let px = rot[0][0] * x + rot[0][1] * y + rot[0][2] * z;
                let py = rot[1][0] * x + rot[1][1] * y + rot[1][2] * z;
                let pz = rot[2][0] * x + rot[2][1] * y + rot[2][2] * z;
                let rr = (px * px + py * py + pz * pz).sqrt();
                let val = match CLASSES[class].name {
                    // small hollow shell
                    "apo-ferritin" => f32::from(rr < r && rr > r - 2.2),
                    // small dim solid blob
                    "beta-amylase" => 0.6 * f32::from(rr < r),
                    // four lobes in a plane
                    "beta-galactosidase" => {
                        let mut s = 0.0f32;
                        for (sx, sy) in [(1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)] {
                            s += f32::from(ball(px - sx * r * 0.45, py - sy * r * 0.45, pz, r * 0.5));
                        }
                        s.min(1.0)
                    }
                    // large + small subunit
                    "ribosome" => {
                        f32::from(ball(px, py, pz + r * 0.2, r * 0.8) || ball(px, py, pz - r * 0.55, r * 0.5))
                    }
                    // elongated dimer
                    "thyroglobulin" => f32::from(ball(px, py / 0.45, pz / 0.45, r)),
                    // large thick shell
                    "virus-like-particle" => f32::from(rr < r && rr > r - 3.0),
                    other => unreachable!("no shape for {other}"),
                };
                v[(iz * n + iy) * n + ix] = val;
            }
        }
    }
    gaussian_blur(&mut v, [n, n, n], 0.8);
    v
}

/// One tomogram of `shape` with `counts[c]` particles of class c requested, from `seed`.
pub fn make_tomogram(shape: [usize; 3], counts: &[usize; 6], seed: u64, noise: f32) -> Tomogram {
    let mut rng = SplitMix64::new(seed);
    let [d, h, w] = shape;
    let mut vol = vec![0.0f32; d * h * w];
    let mut placed: Vec<([f64; 3], f64)> = Vec::new(); // (centre z, y, x in voxels, radius voxels)
    let mut picks = vec![Vec::new(); CLASSES.len()];
    let mut order: Vec<usize> = counts.iter().enumerate().flat_map(|(c, &k)| std::iter::repeat_n(c, k)).collect();
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    // a centre range [r*0.6, L - r*0.6]; an axis too short for it puts centres in the middle
    let uniform = |rng: &mut SplitMix64, lo: f64, hi: f64| {
        if hi > lo {
            lo + (hi - lo) * rng.uniform()
        } else {
            (lo + hi) / 2.0
        }
    };
    for class in order {
        let r = CLASSES[class].radius_a / ANGSTROM_PER_VOXEL;
        let n = patch_size(r);
        let half = n as f64 / 2.0;
        let mut found = None;
        for _ in 0..ATTEMPTS {
            let cz = uniform(&mut rng, r * 0.6, d as f64 - r * 0.6);
            let cy = uniform(&mut rng, r * 0.6, h as f64 - r * 0.6);
            let cx = uniform(&mut rng, r * 0.6, w as f64 - r * 0.6);
            // integer placement of the (odd) patch: its centre lands on the centre of voxel floor(c)
            let o = [cz, cy, cx].map(|c| (c - half + 0.5).floor() as i64);
            let t = o.map(|o| o as f64 + half);
            // synth.py tests the continuous centres; testing the rendered centres keeps the picks
            // themselves at least r + r' + 1 voxels apart
            let clear = placed.iter().all(|(p, rr)| {
                let dd = (t[0] - p[0]).powi(2) + (t[1] - p[1]).powi(2) + (t[2] - p[2]).powi(2);
                dd > (r + rr + 1.0).powi(2)
            });
            if clear {
                found = Some((o, t));
                break;
            }
        }
        let Some((o, t)) = found else { continue };
        placed.push((t, r));
        let patch = render_particle(class, r, &mut rng);
        let clip = |o: i64, len: usize| ((o.max(0)) as usize, ((o + n as i64).min(len as i64)).max(0) as usize);
        let (z0, z1) = clip(o[0], d);
        let (y0, y1) = clip(o[1], h);
        let (x0, x1) = clip(o[2], w);
        for z in z0..z1 {
            let pz = (z as i64 - o[0]) as usize;
            for y in y0..y1 {
                let py = (y as i64 - o[1]) as usize;
                let row = &mut vol[(z * h + y) * w..][x0..x1];
                let src = &patch[(pz * n + py) * n + (x0 as i64 - o[2]) as usize..][..x1 - x0];
                row.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
            }
        }
        picks[class].push([t[2] * ANGSTROM_PER_VOXEL, t[1] * ANGSTROM_PER_VOXEL, t[0] * ANGSTROM_PER_VOXEL]);
    }
    let bg_seed = rng.next_u64();
    let noise_seed = rng.next_u64();
    let mut bg = normal_field(shape, bg_seed, 1.0);
    gaussian_blur(&mut bg, shape, 6.0);
    let white = normal_field(shape, noise_seed, noise);
    vol.par_iter_mut().zip(bg.par_iter().zip(white.par_iter())).for_each(|(v, (&b, &n))| *v += b * 4.0 + n);
    drop((bg, white));
    gaussian_blur(&mut vol, shape, 0.7);
    // cryo-ET densities are dark on a bright background
    vol.par_iter_mut().for_each(|v| *v = -*v * 1e-5 + 2e-6);
    Tomogram { shape, data: vol, picks }
}

// ---------------------------------------------------------------------------------------------
// Writers

/// 2x mean binning (odd trailing slices dropped, like synth.py).
pub fn bin2(data: &[f32], shape: [usize; 3]) -> (Vec<f32>, [usize; 3]) {
    let [d, h, w] = shape;
    let s = [d / 2, h / 2, w / 2];
    let mut out = vec![0.0f32; s.iter().product()];
    if out.is_empty() {
        return (out, s);
    }
    out.par_chunks_mut(s[1] * s[2]).enumerate().for_each(|(z, p)| {
        for y in 0..s[1] {
            for x in 0..s[2] {
                let mut acc = 0.0f64;
                for dz in 0..2 {
                    for dy in 0..2 {
                        let row = ((2 * z + dz) * h + 2 * y + dy) * w + 2 * x;
                        acc += data[row] as f64 + data[row + 1] as f64;
                    }
                }
                p[y * s[2] + x] = (acc / 8.0) as f32;
            }
        }
    });
    (out, s)
}

#[derive(Serialize)]
struct Blosc {
    id: &'static str,
    cname: &'static str,
    clevel: u32,
    shuffle: u32,
    blocksize: u32,
}

/// Zarr v2 `.zarray`, fields in zarr-python's order.
#[derive(Serialize)]
struct ZArray {
    shape: [usize; 3],
    chunks: [usize; 3],
    dtype: &'static str,
    fill_value: f64,
    order: &'static str,
    filters: Option<()>,
    dimension_separator: &'static str,
    compressor: Blosc,
    zarr_format: u32,
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    std::fs::write(path, bytes).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes `data` as OME-Zarr v2 multiscale group `path` with levels 0, 1, 2 (full, 2x, 4x
/// mean-binned), f32, chunks 64³ (clipped to the shape), blosc zstd 5 + shuffle.
pub fn write_ome_zarr(path: &Path, data: &[f32], shape: [usize; 3]) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("{}: cannot create", path.display()))?;
    write_json(&path.join(".zgroup"), &serde_json::json!({ "zarr_format": 2 }))?;
    let store = Arc::new(FilesystemStore::new(path).with_context(|| format!("{}: cannot open store", path.display()))?);
    let mut level: (Vec<f32>, [usize; 3]) = (data.to_vec(), shape);
    let mut datasets = Vec::new();
    for i in 0..3 {
        let (ref v, s) = level;
        let chunks = s.map(|x| x.clamp(1, CHUNK));
        // .zarray in zarr-python's key order (zarrs would add a "node_type" key)
        let zarray = ZArray {
            shape: s,
            chunks,
            dtype: "<f4",
            fill_value: 0.0,
            order: "C",
            filters: None,
            dimension_separator: ".",
            compressor: Blosc { id: "blosc", cname: "zstd", clevel: 5, shuffle: 1, blocksize: 0 },
            zarr_format: 2,
        };
        let meta: ArrayMetadataV2 = serde_json::from_value(serde_json::to_value(&zarray)?).context("zarr v2 metadata")?;
        let name = format!("/{i}");
        let array = Array::new_with_metadata(store.clone(), &name, ArrayMetadata::V2(meta))
            .with_context(|| format!("{}: cannot create array {i}", path.display()))?;
        let dir = path.join(i.to_string());
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        write_json(&dir.join(".zarray"), &zarray)?;
        if !v.is_empty() {
            let subset = ArraySubset::new_with_shape(s.iter().map(|&x| x as u64).collect());
            array
                .store_array_subset(&subset, v.as_slice())
                .with_context(|| format!("{}: cannot write array {i}", path.display()))?;
        }
        let sc = ANGSTROM_PER_VOXEL * f64::from(1u32 << i);
        datasets.push(serde_json::json!({
            "path": i.to_string(),
            "coordinateTransformations": [{ "scale": [sc, sc, sc], "type": "scale" }]
        }));
        if i < 2 {
            level = bin2(v, s);
        }
    }
    let axes: Vec<_> =
        ["z", "y", "x"].iter().map(|n| serde_json::json!({ "name": n, "type": "space", "unit": "angstrom" })).collect();
    write_json(
        &path.join(".zattrs"),
        &serde_json::json!({ "multiscales": [{
            "axes": axes, "datasets": datasets, "metadata": {}, "name": "/", "version": "0.4"
        }]}),
    )
}

#[derive(Serialize)]
struct Location {
    x: f64,
    y: f64,
    z: f64,
}

#[derive(Serialize)]
struct TruthPoint {
    location: Location,
    transformation_: [[f64; 4]; 4],
    instance_id: u32,
}

#[derive(Serialize)]
struct TruthFile<'a> {
    pickable_object_name: &'a str,
    user_id: &'a str,
    session_id: &'a str,
    run_name: &'a str,
    voxel_spacing: Option<f64>,
    unit: &'a str,
    trust_orientation: bool,
    points: Vec<TruthPoint>,
}

const IDENTITY: [[f64; 4]; 4] =
    [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]];

/// Writes ground truth `{run_dir}/Picks/{particle}.json` for every class (user `curation`, session
/// `0`, Å), like synth.py's `write_picks`.
pub fn write_truth(run_dir: &Path, run: &str, picks: &[Vec<[f64; 3]>]) -> Result<()> {
    let dir = run_dir.join("Picks");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (class, pts) in CLASSES.iter().zip(picks) {
        let doc = TruthFile {
            pickable_object_name: class.name,
            user_id: "curation",
            session_id: "0",
            run_name: run,
            voxel_spacing: None,
            unit: "angstrom",
            trust_orientation: true,
            points: pts
                .iter()
                .map(|&[x, y, z]| TruthPoint { location: Location { x, y, z }, transformation_: IDENTITY, instance_id: 0 })
                .collect(),
        };
        write_json(&dir.join(format!("{}.json", class.name)), &doc)?;
    }
    Ok(())
}

/// `{root}/{split}/static/ExperimentRuns/{run}/VoxelSpacing10.000/denoised.zarr`
pub fn tomogram_path(root: &Path, split: &str, run: &str) -> PathBuf {
    root.join(split).join("static").join("ExperimentRuns").join(run).join(VOXEL_SPACING_DIR).join("denoised.zarr")
}

/// `{root}/{split}/overlay/ExperimentRuns/{run}`
pub fn truth_run_dir(root: &Path, split: &str, run: &str) -> PathBuf {
    crate::io::dataset::Layout::split(root, split).overlay_runs.join(run)
}

/// What `write_dataset` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The runs' names, in order.
    pub runs: Vec<String>,
    /// Particles placed per class (in [`CLASSES`] order) over all runs: fewer than requested
    /// when a volume has no room for them.
    pub placed: [usize; 6],
}

/// Synthesises `cfg.runs` tomograms `TS_synth_1..=N` under `root` in the competition layout (see
/// the module docs) and returns the run names. Refuses to write into a run that already exists.
pub fn write_dataset(root: &Path, cfg: &SynthConfig) -> Result<Written> {
    if cfg.shape.contains(&0) {
        bail!("shape {:?}: every axis must be at least 1 voxel", cfg.shape);
    }
    if !cfg.noise.is_finite() || cfg.noise < 0.0 {
        bail!("noise {}: must be a finite number >= 0", cfg.noise);
    }
    if cfg.split.is_empty() || cfg.split.contains(['/', '\\']) || cfg.split == ".." || cfg.split == "." {
        bail!("split {:?}: must be a plain directory name", cfg.split);
    }
    check_memory(cfg.shape)?;
    let names: Vec<String> = (1..=cfg.runs).map(run_name).collect();
    let run_dirs = |run: &str| [crate::io::dataset::runs_dir(root, &cfg.split).join(run), truth_run_dir(root, &cfg.split, run)];
    for run in &names {
        for p in run_dirs(run) {
            if p.exists() {
                bail!("{}: already exists; refusing to overwrite", p.display());
            }
        }
    }
    let mut placed = [0usize; 6];
    for (i, run) in names.iter().enumerate() {
        let t = make_tomogram(cfg.shape, &cfg.particles_per_class, run_seed(cfg.seed, i + 1), cfg.noise);
        placed.iter_mut().zip(&t.picks).for_each(|(n, p)| *n += p.len());
        let written = write_ome_zarr(&tomogram_path(root, &cfg.split, run), &t.data, t.shape)
            .and_then(|()| write_truth(&truth_run_dir(root, &cfg.split, run), run, &t.picks));
        if let Err(e) = written {
            // No half-written dataset (a full disk): the runs written here are removed again.
            for r in &names[..=i] {
                for p in run_dirs(r) {
                    let _ = std::fs::remove_dir_all(p);
                }
            }
            return Err(e.context(format!("{}: the {} run(s) written so far were removed", root.display(), i)));
        }
    }
    Ok(Written { runs: names, placed })
}

/// Volumes `make_tomogram` holds at once, as f32 (the volume, the blurred copy, the noise pass).
const SYNTH_VOLUMES_HELD: usize = 4;

/// A clear error, before allocating, for a shape whose volumes cannot fit in memory (an
/// allocation failure aborts the process instead of returning an error).
fn check_memory(shape: [usize; 3]) -> Result<()> {
    let voxels = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).unwrap_or(usize::MAX);
    let need = voxels.saturating_mul(4 * SYNTH_VOLUMES_HELD);
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    if voxels > i32::MAX as usize {
        bail!("shape {shape:?}: {voxels} voxels, more than one volume may hold (2^31 - 1)");
    }
    if let Some(avail) = available_memory() {
        if need > avail {
            bail!("shape {shape:?}: making it needs about {:.1} GiB of memory, {:.1} GiB is available", gib(need), gib(avail));
        }
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo (Linux), in bytes.
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_matches_scipy() {
        // scipy reflect on [0, 1, 2]: ... 1 2 | 2 1 0 | 0 1 2 | 2 1 0 | 0 ...
        let got: Vec<usize> = (-4..7).map(|i| reflect(i, 3)).collect();
        assert_eq!(got, vec![2, 2, 1, 0, 0, 1, 2, 2, 1, 0, 0]);
    }

    #[test]
    fn blur_keeps_constant_and_mass() {
        let shape = [5, 7, 9];
        let mut v = vec![3.0f32; 5 * 7 * 9];
        gaussian_blur(&mut v, shape, 6.0);
        assert!(v.iter().all(|x| (x - 3.0).abs() < 1e-5));
        let k = gaussian_kernel(0.8);
        assert_eq!(k.len(), 7); // radius int(4 * 0.8 + 0.5) = 3
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
