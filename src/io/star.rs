//! RELION 5 tomography particle STAR files: one file per run (tomogram).
//!
//! [`write_run_star`] writes a single `data_particles` loop with, per pick of the run:
//!
//! | column | value |
//! |---|---|
//! | `_rlnTomoName` | run name |
//! | `_rlnCoordinateX/Y/Z` | position in pixels of size `pixel_size_a` (Å / pixel size) |
//! | `_rlnCenteredCoordinateX/Y/ZAngst` | Å from the tomogram centre: Å − (size_px / 2) · pixel size |
//! | `_rlnClassNumber` | class index + 1 (RELION classes are 1-based), named in a header comment |
//! | `_rlnAutopickFigureOfMerit` | detection score |
//!
//! Coordinates are converted as copick converts them (Å = pixel · pixel size, centre size / 2),
//! with no half-voxel shift. RELION centres voxel i at i, while Å here come from the convention
//! that voxel i spans [i, i+1): RELION sees each pick half a voxel higher on every axis. And
//! RELION's `_rlnCoordinate*` are tilt-series pixels: they equal these (tomogram voxels) only for
//! unbinned tomograms; RELION 5 reads the centred Å columns first.
//!
//! [`read_star_coordinates`] reads such a file back (columns found by name), mainly for tests.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::particles::{Pick, CLASSES};

/// The RELION STAR format version written in the file header.
pub const STAR_VERSION_LINE: &str = "# version 50001";
/// Name of the data block holding the picks.
pub const PARTICLES_BLOCK: &str = "data_particles";
/// Columns written by [`write_run_star`], in order.
pub const COLUMNS: [&str; 9] = [
    "_rlnTomoName",
    "_rlnCoordinateX",
    "_rlnCoordinateY",
    "_rlnCoordinateZ",
    "_rlnCenteredCoordinateXAngst",
    "_rlnCenteredCoordinateYAngst",
    "_rlnCenteredCoordinateZAngst",
    "_rlnClassNumber",
    "_rlnAutopickFigureOfMerit",
];

/// What each `_rlnClassNumber` stands for: "_rlnClassNumber 1 apo-ferritin, 2 …".
pub fn class_legend() -> String {
    let names: Vec<String> = CLASSES.iter().enumerate().map(|(i, c)| format!("{} {}", i + 1, c.name)).collect();
    format!("_rlnClassNumber {}", names.join(", "))
}

/// Why `name` cannot be a bare STAR value (RELION does not parse quoted values reliably).
fn bad_star_value(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    if name.is_empty() {
        Some("it is empty")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("it contains whitespace")
    } else if name.contains('"') || name.contains('\'') {
        Some("it contains a quote")
    } else if name.starts_with(['_', '#', ';', '$', '[', ']']) {
        Some("it starts with a STAR reserved character")
    } else if ["data_", "loop_", "save_", "global_", "stop_"].iter().any(|k| lower.starts_with(k)) {
        Some("it starts with a STAR keyword")
    } else {
        None
    }
}

/// Errors when `run` cannot be a bare STAR value, so that `run --star-out` refuses such a run before
/// computing it.
pub fn check_run_name(run: &str) -> Result<()> {
    match bad_star_value(run) {
        Some(why) => bail!("run name {run:?} cannot be written as a STAR value: {why}"),
        None => Ok(()),
    }
}

/// Writes the picks of `run` (others in `picks` are skipped, order kept) as a RELION 5 particle
/// STAR file, atomically.
///
/// `pixel_size_a` is the pixel size (Å) of the coordinates' pixel grid and `volume_shape_zyx` the
/// tomogram size in those pixels, `[z, y, x]`; the centre used for the centred coordinates is
/// `size / 2` pixels on each axis. Pick coordinates are in Å (as [`Pick`] stores them). Errors on a
/// non-positive pixel size, a run name that cannot be a bare STAR value, a class index outside
/// [`CLASSES`] or a non-finite coordinate.
pub fn write_run_star(
    path: &Path,
    run: &str,
    picks: &[Pick],
    pixel_size_a: f64,
    volume_shape_zyx: [usize; 3],
) -> Result<()> {
    let text = run_star_text(path, run, picks, pixel_size_a, volume_shape_zyx)?;
    crate::util::write_atomic(path, |f| {
        f.write_all(text.as_bytes()).with_context(|| format!("{}: cannot write STAR file", path.display()))
    })
}

/// The bytes [`write_run_star`] writes to `path` (named in errors), with its checks.
pub fn run_star_text(
    path: &Path,
    run: &str,
    picks: &[Pick],
    pixel_size_a: f64,
    volume_shape_zyx: [usize; 3],
) -> Result<String> {
    let name = path.display();
    if !(pixel_size_a.is_finite() && pixel_size_a > 0.0) {
        bail!("{name}: invalid pixel size {pixel_size_a} Å for STAR coordinates (must be > 0)");
    }
    check_run_name(run).with_context(|| name.to_string())?;
    // Tomogram centre in Å, per axis x, y, z.
    let centre = [2, 1, 0].map(|axis| volume_shape_zyx[axis] as f64 / 2.0 * pixel_size_a);

    use std::fmt::Write as _;
    let mut text = String::with_capacity(160 * (picks.len() + 12));
    let _ = writeln!(text, "{STAR_VERSION_LINE}");
    let _ = writeln!(text);
    let _ = writeln!(text, "# RELION 5 tomography particles of {run}, written by fastdet");
    let _ = writeln!(text, "# {}", class_legend());
    // Which grid the coordinates are in, so the file can be read on its own (a level or a
    // voxel size other than the full-resolution tomogram's).
    let [z, y, x] = volume_shape_zyx;
    let _ = writeln!(text, "# _rlnCoordinateX/Y/Z: voxels of {pixel_size_a} Å of a {x} x {y} x {z} (x, y, z) tomogram; _rlnCentered*Angst: Å from its centre");
    let _ = writeln!(text);
    let _ = writeln!(text, "{PARTICLES_BLOCK}");
    let _ = writeln!(text);
    let _ = writeln!(text, "loop_");
    for (i, c) in COLUMNS.iter().enumerate() {
        let _ = writeln!(text, "{c} #{}", i + 1);
    }
    for (i, p) in picks.iter().enumerate().filter(|(_, p)| p.run == run) {
        if p.class >= CLASSES.len() {
            bail!("{name}: pick {i} of {run} has class index {} (only {} classes)", p.class, CLASSES.len());
        }
        let a = [p.x, p.y, p.z];
        if a.iter().any(|v| !v.is_finite()) {
            bail!("{name}: pick {i} of {run} has a non-finite coordinate ({}, {}, {}) Å", p.x, p.y, p.z);
        }
        let px = a.map(|v| v / pixel_size_a);
        let centred = [a[0] - centre[0], a[1] - centre[1], a[2] - centre[2]];
        let _ = writeln!(
            text,
            "{run} {:12.6} {:12.6} {:12.6} {:12.6} {:12.6} {:12.6} {:3} {:10.6}",
            px[0],
            px[1],
            px[2],
            centred[0],
            centred[1],
            centred[2],
            p.class + 1,
            p.score as f64
        );
    }
    let _ = writeln!(text);
    Ok(text)
}

/// Splits a STAR data line into values, honouring `'…'` / `"…"` quoting.
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' || c == '\'' {
            chars.next();
            let mut s = String::new();
            for d in chars.by_ref() {
                if d == c {
                    break;
                }
                s.push(d);
            }
            out.push(s);
        } else {
            let mut s = String::new();
            while let Some(&d) = chars.peek() {
                if d.is_whitespace() {
                    break;
                }
                s.push(d);
                chars.next();
            }
            out.push(s);
        }
    }
    out
}

struct Loop {
    block: String,
    columns: Vec<String>,
    /// (1-based line number, values)
    rows: Vec<(usize, Vec<String>)>,
}

/// Reads `(tomo name, class number, x, y, z in pixels, figure of merit)` per particle from a STAR
/// file, finding the columns `_rlnTomoName`, `_rlnClassNumber`, `_rlnCoordinateX/Y/Z` and
/// `_rlnAutopickFigureOfMerit` by name. The loop of the `data_particles` block is used when it has
/// them, otherwise the first loop that does. Errors name the file and line.
#[allow(clippy::type_complexity)]
pub fn read_star_coordinates(path: &Path) -> Result<Vec<(String, usize, f64, f64, f64, f32)>> {
    let name = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read STAR file"))?;

    let mut loops: Vec<Loop> = Vec::new();
    let mut block = String::new();
    // Some(true): reading a loop's column names; Some(false): its rows; None: outside a loop.
    let mut in_loop: Option<bool> = None;
    for (ln, raw) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        if let Some(b) = raw.strip_prefix("data_") {
            block = b.trim().to_owned();
            in_loop = None;
        } else if raw == "loop_" || raw.starts_with("loop_ ") {
            loops.push(Loop { block: block.clone(), columns: Vec::new(), rows: Vec::new() });
            in_loop = Some(true);
        } else if raw.starts_with('_') {
            match in_loop {
                Some(true) => {
                    let col = raw.split_whitespace().next().unwrap_or_default().to_owned();
                    loops.last_mut().expect("in a loop").columns.push(col);
                }
                // A `_name value` pair after the rows ends the loop.
                _ => in_loop = None,
            }
        } else if in_loop.is_some() {
            in_loop = Some(false);
            loops.last_mut().expect("in a loop").rows.push((ln, tokens(raw)));
        }
    }

    let needed = [
        "_rlnTomoName",
        "_rlnClassNumber",
        "_rlnCoordinateX",
        "_rlnCoordinateY",
        "_rlnCoordinateZ",
        "_rlnAutopickFigureOfMerit",
    ];
    let has_all = |l: &Loop| needed.iter().all(|n| l.columns.iter().any(|c| c == n));
    let Some(lp) = loops
        .iter()
        .find(|l| l.block == "particles" && has_all(l))
        .or_else(|| loops.iter().find(|l| has_all(l)))
    else {
        bail!("{name}: no STAR loop has all of the columns {}", needed.join(", "));
    };
    let col: Vec<usize> = needed.iter().map(|n| lp.columns.iter().position(|c| c == n).unwrap()).collect();

    let mut out = Vec::with_capacity(lp.rows.len());
    for (ln, row) in &lp.rows {
        if row.len() != lp.columns.len() {
            bail!("{name}:{ln}: {} values, the loop has {} columns", row.len(), lp.columns.len());
        }
        let num = |k: usize| -> Result<f64> {
            row[col[k]].parse::<f64>().with_context(|| {
                format!("{name}:{ln}: {} = {:?} is not a number", needed[k], row[col[k]])
            })
        };
        let class = row[col[1]]
            .parse::<usize>()
            .with_context(|| format!("{name}:{ln}: _rlnClassNumber = {:?} is not a class number", row[col[1]]))?;
        out.push((row[col[0]].clone(), class, num(2)?, num(3)?, num(4)?, num(5)? as f32));
    }
    Ok(out)
}
