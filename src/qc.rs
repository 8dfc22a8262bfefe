//! Quality-control pictures: a tomogram as a row of z-slabs with the picks drawn on top.
//!
//! [`render_qc`] writes one RGB8 PNG. The volume is cut into `slabs` equal z ranges; each slab is
//! shown as its mean projection along z, contrast-stretched to its own 1st–99th percentile
//! ([`contrast_stretch`]), and the slabs are laid out left to right. Every pick whose centre z falls
//! in a slab is drawn there as a ring of the particle's radius in the class colour
//! ([`CLASS_COLORS`]). With ground truth, a second row shows the same slabs with the truth picks.
//! Each slab carries a header (`picks z 0-19`), and a legend below names the classes with their
//! colours and counts (`picks/truth`). Text uses a built-in 5x7 bitmap font, so nothing beyond the
//! `png` encoder is needed.
//!
//! Geometry: picks are in Å; voxel coordinate = Å / voxel size (the volume's own voxel size, or
//! [`ANGSTROM_PER_VOXEL`] when the zarr does not record one), voxel index `i` is centred on
//! coordinate `i` (as the detector writes picks), and pixel `(x, y)` of a slab is voxel `(x, y)`,
//! enlarged by an integer factor so that a slab is at least [`QcOptions::min_slab_px`] wide.

use std::io::Write;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::io::zarr::Volume;
use crate::particles::{Pick, ANGSTROM_PER_VOXEL, CLASSES};

/// Ring colour of each class, in [`CLASSES`] order. None is grey, so a ring never matches an image
/// pixel.
pub const CLASS_COLORS: [[u8; 3]; 6] = [
    [230, 25, 75],   // apo-ferritin: red
    [60, 200, 75],   // beta-galactosidase: green
    [40, 220, 240],  // ribosome: cyan
    [255, 225, 25],  // thyroglobulin: yellow
    [240, 50, 230],  // virus-like-particle: magenta
    [245, 130, 48],  // beta-amylase: orange
];

/// Background of margins, gaps and legend.
pub const BACKGROUND: [u8; 3] = [24, 24, 24];
/// Colour of the text.
pub const TEXT_COLOR: [u8; 3] = [235, 235, 235];
/// Outer margin, in pixels.
pub const MARGIN: usize = 8;
/// Gap between two slabs and between two rows, in pixels.
pub const GAP: usize = 8;
/// Each font pixel is drawn as a `FONT_SCALE`x`FONT_SCALE` block.
pub const FONT_SCALE: usize = 2;
/// Height of one text line in pixels (7 font rows).
pub const LINE_H: usize = 7 * FONT_SCALE;
/// Horizontal advance of one character in pixels (5 columns + 1 blank).
pub const CHAR_W: usize = 6 * FONT_SCALE;
/// Space between a text line and what it labels.
const TEXT_PAD: usize = 4;

/// Rendering options; `QcOptions::default()` is what [`render_qc`] uses.
#[derive(Debug, Clone)]
pub struct QcOptions {
    /// Number of z-slabs (clamped to the volume depth). Default 4.
    pub slabs: usize,
    /// Smallest on-screen width of one slab in pixels; small volumes are enlarged by the smallest
    /// integer factor that reaches it. Default 256.
    pub min_slab_px: usize,
    /// Optional title line at the top (e.g. the run name).
    pub title: Option<String>,
    /// Å per voxel of the volume drawn, as the picks were made with; `None`: the volume's own
    /// (see [`voxel_size_of`]).
    pub voxel_size: Option<f64>,
}

impl Default for QcOptions {
    fn default() -> Self {
        Self { slabs: 4, min_slab_px: 256, title: None, voxel_size: None }
    }
}

/// What was drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QcSummary {
    pub width: usize,
    pub height: usize,
    /// Picks whose centre z fell in a slab (the rest lie outside the volume's z range).
    pub picks_drawn: usize,
    pub truth_drawn: usize,
}

/// Pixel geometry of a QC picture.
#[derive(Debug, Clone, PartialEq)]
pub struct QcLayout {
    /// Image size in pixels.
    pub width: usize,
    pub height: usize,
    /// Enlargement factor (screen pixels per voxel).
    pub scale: usize,
    /// Size of one slab on screen: volume `x` / `y` extent × `scale`.
    pub tile_w: usize,
    pub tile_h: usize,
    /// z range (voxel indices) of each slab.
    pub slabs: Vec<Range<usize>>,
    /// Number of rows of slabs (1, or 2 with ground truth).
    pub rows: usize,
    /// Top edge of the legend.
    pub legend_y: usize,
    /// Legend entries per line.
    pub legend_cols: usize,
    /// Width of one legend entry.
    pub legend_entry_w: usize,
    title_h: usize,
}

/// Width of the longest legend label: class name, a space and `dddd/dddd`.
fn legend_label_chars() -> usize {
    CLASSES.iter().map(|c| c.name.len()).max().unwrap_or(0) + 1 + 9
}

impl QcLayout {
    /// Layout for a volume of `shape = [z, y, x]`.
    pub fn new(shape: [usize; 3], opts: &QcOptions, with_truth: bool) -> Result<Self> {
        let [d, h, w] = shape;
        if d == 0 || h == 0 || w == 0 {
            bail!("cannot draw an empty volume of shape {shape:?}");
        }
        if opts.slabs == 0 {
            bail!("the number of slabs must be at least 1");
        }
        let slabs = slab_ranges(d, opts.slabs);
        let scale = opts.min_slab_px.div_ceil(w).max(1);
        let (tile_w, tile_h) = (w * scale, h * scale);
        let rows = if with_truth { 2 } else { 1 };
        let title_h = if opts.title.is_some() { LINE_H + GAP } else { 0 };
        let grid_w = slabs.len() * tile_w + (slabs.len() - 1) * GAP;
        let legend_entry_w = LINE_H + CHAR_W + legend_label_chars() * CHAR_W + 2 * CHAR_W;
        let title_w = opts.title.as_ref().map_or(0, |t| t.chars().count() * CHAR_W);
        let inner_w = grid_w.max(legend_entry_w).max(title_w);
        let legend_cols = (inner_w / legend_entry_w).clamp(1, CLASSES.len());
        let legend_lines = CLASSES.len().div_ceil(legend_cols);
        let row_h = LINE_H + TEXT_PAD + tile_h;
        let legend_y = MARGIN + title_h + rows * row_h + (rows - 1) * GAP + GAP;
        let height = legend_y + legend_lines * LINE_H + (legend_lines - 1) * TEXT_PAD + MARGIN;
        Ok(Self {
            width: inner_w + 2 * MARGIN,
            height,
            scale,
            tile_w,
            tile_h,
            slabs,
            rows,
            legend_y,
            legend_cols,
            legend_entry_w,
            title_h,
        })
    }

    /// Top-left pixel of slab `slab` in row `row` (0 = picks, 1 = truth).
    pub fn tile_origin(&self, row: usize, slab: usize) -> (usize, usize) {
        let x = MARGIN + slab * (self.tile_w + GAP);
        let y = MARGIN + self.title_h + row * (LINE_H + TEXT_PAD + self.tile_h + GAP) + LINE_H + TEXT_PAD;
        (x, y)
    }
}

/// Splits `0..depth` into `min(slabs, depth)` contiguous, near-equal ranges (`slabs >= 1`).
pub fn slab_ranges(depth: usize, slabs: usize) -> Vec<Range<usize>> {
    let n = slabs.clamp(1, depth.max(1));
    (0..n).map(|k| k * depth / n..(k + 1) * depth / n).collect()
}

/// Voxel size used to turn Å into voxels: the volume's own, or [`ANGSTROM_PER_VOXEL`].
pub fn voxel_size_of(volume: &Volume) -> f64 {
    match volume.voxel_size {
        Some(v) if v.is_finite() && v > 0.0 => v,
        _ => ANGSTROM_PER_VOXEL,
    }
}

/// Centre of a pick in slab-pixel coordinates: pixel `(c, r)` covers `[c, c+1) x [r, r+1)` of
/// the returned space, so `floor` gives the pixel that contains the centre. Voxel `i` spans the
/// coordinates `[i, i+1)` (Å `[i, i+1) * voxel_size`, its centre at `i + 0.5`, as in the picks),
/// and pixels `i*scale .. (i+1)*scale`.
pub fn pick_to_pixel(p: &Pick, voxel_size: f64, scale: usize) -> (f64, f64) {
    let s = scale as f64;
    (p.x / voxel_size * s, p.y / voxel_size * s)
}

/// Index of the slab whose z range holds the pick's centre voxel (`floor(z / voxel_size)`), or
/// `None` when it lies outside the volume.
pub fn pick_slab(p: &Pick, voxel_size: f64, slabs: &[Range<usize>]) -> Option<usize> {
    let z = (p.z / voxel_size).floor();
    if !(z >= 0.0) {
        return None;
    }
    let z = z as usize;
    slabs.iter().position(|r| r.contains(&z))
}

/// Particle radius of a pick's class in screen pixels.
pub fn radius_px(class: usize, voxel_size: f64, scale: usize) -> f64 {
    CLASSES[class].radius_a / voxel_size * scale as f64
}

/// Maps values to grey levels: the 1st percentile to 0, the 99th to 255, linear between, clipped.
/// Non-finite values are ignored for the percentiles and drawn black. When the percentiles
/// coincide (a constant image), every finite value becomes mid-grey 128 instead of dividing by zero.
pub fn contrast_stretch(values: &[f32]) -> Vec<u8> {
    let mut sorted: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return vec![0; values.len()];
    }
    sorted.sort_unstable_by(f32::total_cmp);
    let lo = percentile(&sorted, 0.01);
    let hi = percentile(&sorted, 0.99);
    let span = hi - lo;
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                0
            } else if !(span > 0.0) {
                128
            } else {
                (((v as f64 - lo) / span).clamp(0.0, 1.0) * 255.0).round() as u8
            }
        })
        .collect()
}

/// Linear-interpolated quantile `q` of sorted finite values (numpy's default method).
fn percentile(sorted: &[f32], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let i = pos.floor() as usize;
    let j = (i + 1).min(sorted.len() - 1);
    let t = pos - i as f64;
    sorted[i] as f64 * (1.0 - t) + sorted[j] as f64 * t
}

/// Mean over `z` of the voxels `z in zr` (non-finite voxels skipped; NaN where none is finite).
pub fn mean_projection(volume: &Volume, zr: Range<usize>) -> Vec<f32> {
    let [_, h, w] = volume.shape;
    let plane = h * w;
    let mut sum = vec![0.0f64; plane];
    let mut count = vec![0u32; plane];
    for z in zr {
        let slice = &volume.data[z * plane..(z + 1) * plane];
        for ((s, c), &v) in sum.iter_mut().zip(count.iter_mut()).zip(slice) {
            if v.is_finite() {
                *s += v as f64;
                *c += 1;
            }
        }
    }
    sum.iter().zip(&count).map(|(&s, &c)| if c == 0 { f32::NAN } else { (s / c as f64) as f32 }).collect()
}

/// An RGB8 canvas.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize, bg: [u8; 3]) -> Self {
        let mut px = Vec::with_capacity(w * h * 3);
        for _ in 0..w * h {
            px.extend_from_slice(&bg);
        }
        Self { w, h, px }
    }

    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.w && y < self.h {
            let i = (y * self.w + x) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn fill_rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    /// Draws `text` with its top-left corner at `(x, y)`, clipped at `max_x`.
    fn text(&mut self, x: usize, y: usize, text: &str, c: [u8; 3], max_x: usize) {
        for (k, ch) in text.chars().enumerate() {
            let x0 = x + k * CHAR_W;
            if x0 + 5 * FONT_SCALE > max_x {
                break;
            }
            let rows = glyph(ch);
            for (r, row) in rows.iter().enumerate() {
                for (col, b) in row.bytes().enumerate() {
                    if b == b'#' {
                        self.fill_rect(x0 + col * FONT_SCALE, y + r * FONT_SCALE, FONT_SCALE, FONT_SCALE, c);
                    }
                }
            }
        }
    }

    /// Draws a ring of radius `r` around `(cx, cy)` (pixel space as [`pick_to_pixel`]), clipped to
    /// the rectangle `clip = (x, y, w, h)`, which also offsets the centre.
    fn ring(&mut self, cx: f64, cy: f64, r: f64, half_width: f64, c: [u8; 3], clip: (usize, usize, usize, usize)) {
        let (ox, oy, cw, ch) = clip;
        let reach = r + half_width + 1.0;
        let x0 = (cx - reach).floor().max(0.0) as usize;
        let y0 = (cy - reach).floor().max(0.0) as usize;
        let x1 = ((cx + reach).ceil().max(0.0) as usize).min(cw);
        let y1 = ((cy + reach).ceil().max(0.0) as usize).min(ch);
        for y in y0..y1 {
            for x in x0..x1 {
                let d = ((x as f64 + 0.5 - cx).powi(2) + (y as f64 + 0.5 - cy).powi(2)).sqrt();
                if (d - r).abs() <= half_width {
                    self.set(ox + x, oy + y, c);
                }
            }
        }
    }
}

/// Half the ring thickness in screen pixels: 0.75 px at 1x, growing with the enlargement.
pub fn ring_half_width(scale: usize) -> f64 {
    0.75 * (scale as f64 / 2.0).max(1.0)
}

/// Renders the QC picture with [`QcOptions::default`] (4 slabs) and writes it atomically to `out_png`.
pub fn render_qc(volume: &Volume, picks: &[Pick], truth: Option<&[Pick]>, out_png: &Path) -> Result<()> {
    render_qc_with(volume, picks, truth, out_png, &QcOptions::default()).map(|_| ())
}

/// [`render_qc`] with explicit options; returns the image size and how many picks were drawn.
pub fn render_qc_with(
    volume: &Volume,
    picks: &[Pick],
    truth: Option<&[Pick]>,
    out_png: &Path,
    opts: &QcOptions,
) -> Result<QcSummary> {
    let (rgb, summary) = render_rgb(volume, picks, truth, opts)?;
    write_png(out_png, summary.width, summary.height, &rgb)?;
    Ok(summary)
}

/// Renders into an RGB8 buffer (row-major, 3 bytes a pixel) without writing anything.
pub fn render_rgb(volume: &Volume, picks: &[Pick], truth: Option<&[Pick]>, opts: &QcOptions) -> Result<(Vec<u8>, QcSummary)> {
    let [d, h, w] = volume.shape;
    if volume.data.len() != d * h * w {
        bail!("volume of shape {:?} holds {} values, expected {}", volume.shape, volume.data.len(), d * h * w);
    }
    for (what, set) in [("pick", Some(picks)), ("truth pick", truth)] {
        if let Some(bad) = set.and_then(|s| s.iter().find(|p| p.class >= CLASSES.len())) {
            bail!("{what} of run {:?} has class index {} (only {} classes)", bad.run, bad.class, CLASSES.len());
        }
    }
    let lay = QcLayout::new(volume.shape, opts, truth.is_some())?;
    let vs = match opts.voxel_size {
        Some(v) if v.is_finite() && v > 0.0 => v,
        Some(v) => bail!("voxel size {v} Å: must be a positive number"),
        None => voxel_size_of(volume),
    };
    let s = lay.scale;
    let mut cv = Canvas::new(lay.width, lay.height, BACKGROUND);
    let max_x = lay.width - MARGIN;

    if let Some(t) = &opts.title {
        cv.text(MARGIN, MARGIN, t, TEXT_COLOR, max_x);
    }

    // Grey slabs, identical in both rows.
    let greys: Vec<Vec<u8>> = lay.slabs.iter().map(|zr| contrast_stretch(&mean_projection(volume, zr.clone()))).collect();
    let rows: Vec<(&str, &[Pick])> = match truth {
        Some(t) => vec![("picks", picks), ("truth", t)],
        None => vec![("picks", picks)],
    };
    let mut drawn = [0usize; 2];
    for (row, (name, set)) in rows.iter().enumerate() {
        for (k, zr) in lay.slabs.iter().enumerate() {
            let (ox, oy) = lay.tile_origin(row, k);
            let label = format!("{name} z {}-{}", zr.start, zr.end - 1);
            cv.text(ox, oy - LINE_H - TEXT_PAD, &label, TEXT_COLOR, (ox + lay.tile_w).min(max_x));
            let g = &greys[k];
            for y in 0..lay.tile_h {
                let src = &g[(y / s) * w..(y / s + 1) * w];
                let dst = ((oy + y) * lay.width + ox) * 3;
                for x in 0..lay.tile_w {
                    let v = src[x / s];
                    cv.px[dst + 3 * x..dst + 3 * x + 3].copy_from_slice(&[v, v, v]);
                }
            }
        }
        for p in set.iter() {
            let Some(k) = pick_slab(p, vs, &lay.slabs) else { continue };
            drawn[row] += 1;
            let (ox, oy) = lay.tile_origin(row, k);
            let (cx, cy) = pick_to_pixel(p, vs, s);
            cv.ring(cx, cy, radius_px(p.class, vs, s), ring_half_width(s), CLASS_COLORS[p.class], (ox, oy, lay.tile_w, lay.tile_h));
        }
    }

    // Legend: swatch, class name, count (picks, or picks/truth).
    for (ci, class) in CLASSES.iter().enumerate() {
        let (col, line) = (ci % lay.legend_cols, ci / lay.legend_cols);
        let x = MARGIN + col * lay.legend_entry_w;
        let y = lay.legend_y + line * (LINE_H + TEXT_PAD);
        cv.fill_rect(x, y, LINE_H, LINE_H, CLASS_COLORS[ci]);
        let n = picks.iter().filter(|p| p.class == ci).count();
        let label = match truth {
            Some(t) => format!("{} {n}/{}", class.name, t.iter().filter(|p| p.class == ci).count()),
            None => format!("{} {n}", class.name),
        };
        cv.text(x + LINE_H + CHAR_W, y, &label, TEXT_COLOR, max_x);
    }

    let summary = QcSummary { width: lay.width, height: lay.height, picks_drawn: drawn[0], truth_drawn: drawn[1] };
    Ok((cv.px, summary))
}

/// Encodes RGB8 pixels as PNG, written atomically.
fn write_png(path: &Path, w: usize, h: usize, rgb: &[u8]) -> Result<()> {
    let (w32, h32) = (u32::try_from(w)?, u32::try_from(h)?);
    crate::util::write_atomic(path, |f| {
        let mut buf = std::io::BufWriter::new(f);
        {
            let mut enc = png::Encoder::new(&mut buf, w32, h32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            // write_atomic names the file around these.
            let mut wr = enc.write_header().context("PNG header")?;
            wr.write_image_data(rgb).context("PNG data")?;
            wr.finish().context("PNG end")?;
        }
        Ok(buf.flush()?)
    })
}

/// 5x7 glyph of `c` (rows top to bottom, `#` = ink); characters without a glyph are drawn as `?`
/// (run names are case-sensitive: both cases have their own).
fn glyph(c: char) -> [&'static str; 7] {
    FONT.iter().find(|(g, _)| *g == c).map(|(_, rows)| *rows).unwrap_or(UNKNOWN)
}

const UNKNOWN: [&str; 7] = [".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."];

#[rustfmt::skip]
const FONT: &[(char, [&str; 7])] = &[
    (' ', [".....", ".....", ".....", ".....", ".....", ".....", "....."]),
    ('a', [".....", ".....", ".###.", "....#", ".####", "#...#", ".####"]),
    ('b', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."]),
    ('c', [".....", ".....", ".###.", "#....", "#....", "#...#", ".###."]),
    ('d', ["....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"]),
    ('e', [".....", ".....", ".###.", "#...#", "#####", "#....", ".###."]),
    ('f', ["..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."]),
    ('g', [".....", ".####", "#...#", "#...#", ".####", "....#", ".###."]),
    ('h', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('i', ["..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."]),
    ('j', ["...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##.."]),
    ('k', ["#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."]),
    ('l', [".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('m', [".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"]),
    ('n', [".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('o', [".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."]),
    ('p', [".....", ".....", "####.", "#...#", "####.", "#....", "#...."]),
    ('q', [".....", ".....", ".##.#", "#..##", ".####", "....#", "....#"]),
    ('r', [".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."]),
    ('s', [".....", ".....", ".###.", "#....", ".###.", "....#", "####."]),
    ('t', [".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."]),
    ('u', [".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"]),
    ('v', [".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('w', [".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."]),
    ('x', [".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"]),
    ('y', [".....", ".....", "#...#", "#...#", ".####", "....#", ".###."]),
    ('z', [".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"]),
    ('0', [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."]),
    ('1', ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('2', [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"]),
    ('3', ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."]),
    ('4', ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."]),
    ('5', ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."]),
    ('6', ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."]),
    ('7', ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."]),
    ('8', [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."]),
    ('9', [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."]),
    ('-', [".....", ".....", ".....", "#####", ".....", ".....", "....."]),
    ('_', [".....", ".....", ".....", ".....", ".....", ".....", "#####"]),
    ('/', [".....", "....#", "...#.", "..#..", ".#...", "#....", "....."]),
    ('.', [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."]),
    (':', [".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."]),
    ('A', [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]),
    ('B', ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."]),
    ('C', [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."]),
    ('D', ["###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."]),
    ('E', ["#####", "#....", "#....", "####.", "#....", "#....", "#####"]),
    ('F', ["#####", "#....", "#....", "####.", "#....", "#....", "#...."]),
    ('G', [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"]),
    ('H', ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]),
    ('I', [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('J', ["..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."]),
    ('K', ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"]),
    ('L', ["#....", "#....", "#....", "#....", "#....", "#....", "#####"]),
    ('M', ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"]),
    ('N', ["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"]),
    ('O', [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."]),
    ('P', ["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."]),
    ('Q', [".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"]),
    ('R', ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"]),
    ('S', [".####", "#....", "#....", ".###.", "....#", "....#", "####."]),
    ('T', ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."]),
    ('U', ["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."]),
    ('V', ["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('W', ["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."]),
    ('X', ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"]),
    ('Y', ["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."]),
    ('Z', ["#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"]),
    ('(', ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."]),
    (')', [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."]),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn font_is_well_formed() {
        for (c, rows) in FONT.iter().chain(std::iter::once(&('?', UNKNOWN))) {
            for r in rows {
                assert_eq!(r.len(), 5, "glyph {c:?} row {r:?}");
                assert!(r.bytes().all(|b| b == b'#' || b == b'.'), "glyph {c:?} row {r:?}");
            }
        }
        // every character of the class names and slab headers has its own glyph
        let needed: String = CLASSES.iter().map(|c| c.name).collect::<String>()
            + "picks truth z 0123456789-/()_.:abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        for ch in needed.chars() {
            assert!(FONT.iter().any(|(g, _)| *g == ch), "no glyph for {ch:?}");
        }
        let mut seen: Vec<char> = FONT.iter().map(|(g, _)| *g).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), FONT.len(), "duplicate glyph");
    }

    #[test]
    fn slabs_partition_depth() {
        assert_eq!(slab_ranges(16, 4), vec![0..4, 4..8, 8..12, 12..16]);
        assert_eq!(slab_ranges(10, 3), vec![0..3, 3..6, 6..10]);
        assert_eq!(slab_ranges(2, 4), vec![0..1, 1..2]);
        assert_eq!(slab_ranges(5, 1), vec![0..5]);
    }

    #[test]
    fn percentile_matches_numpy() {
        let v: Vec<f32> = (0..101).map(|i| i as f32).collect();
        assert!((percentile(&v, 0.01) - 1.0).abs() < 1e-9);
        assert!((percentile(&v, 0.99) - 99.0).abs() < 1e-9);
        assert_eq!(percentile(&[3.0], 0.5), 3.0);
    }

    #[test]
    fn stretch_handles_constant_nan_and_ramp() {
        assert_eq!(contrast_stretch(&[2.5; 10]), vec![128; 10]);
        assert_eq!(contrast_stretch(&[f32::NAN, 1.0, 1.0]), vec![0, 128, 128]);
        assert_eq!(contrast_stretch(&[f32::NAN; 3]), vec![0; 3]);
        let ramp: Vec<f32> = (0..101).map(|i| i as f32).collect();
        let g = contrast_stretch(&ramp);
        assert_eq!((g[0], g[1], g[50], g[99], g[100]), (0, 0, 128, 255, 255));
    }
}
