//! Kaggle submission CSV: `id,experiment,particle_type,x,y,z`, optionally with a `score` column
//! after `particle_type` (the layout of the reference pipeline's `expected_submission.csv`).
//!
//! Hand-parsed: the fields never contain commas (quotes around a field are dropped), so a plain split is exact and saves a
//! dependency.
use crate::particles::{class_index, Pick, CLASSES};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

/// Header of a plain Kaggle submission.
pub const HEADER: &str = "id,experiment,particle_type,x,y,z";
/// Header with the detection score, placed as in the reference pipeline's fixture.
pub const HEADER_WITH_SCORE: &str = "id,experiment,particle_type,score,x,y,z";

/// A run name goes into a CSV field as it is (no quoting): no comma, quote or line break.
pub fn check_run_name(run: &str) -> Result<()> {
    if run.contains([',', '"', '\n', '\r']) {
        bail!("run name {run:?} cannot be written to a CSV field (it has a comma, quote or line break); rename its file or folder");
    }
    Ok(())
}

/// Writes `picks` as a Kaggle submission, ids `0..n` in the given order.
///
/// Coordinates (Å) get 3 decimals and scores 6, as the reference pipeline prints them (Python's
/// `:.3f` / `:.6f`; both languages round the exact binary value, so the text is identical).
/// The file is written atomically so an interrupted run never leaves a truncated submission.
pub fn write_submission(path: &Path, picks: &[Pick], with_score: bool) -> Result<()> {
    write(path, picks, if with_score { Digits::WithScore } else { Digits::Kaggle })
}

/// As [`write_submission`] with the score, but every number in its shortest form that reads back
/// to the same value: a run's picks kept for `--resume` come back exactly as computed.
pub fn write_submission_exact(path: &Path, picks: &[Pick]) -> Result<()> {
    write(path, picks, Digits::Exact)
}

/// The text [`write_submission`] writes (`origin` names the file in errors), for a caller that
/// writes it together with other files.
pub fn submission_text(origin: &Path, picks: &[Pick], with_score: bool) -> Result<String> {
    render(origin, picks, if with_score { Digits::WithScore } else { Digits::Kaggle })
}

/// The text [`write_submission_exact`] writes (`origin` names the file in errors).
pub fn submission_exact_text(origin: &Path, picks: &[Pick]) -> Result<String> {
    render(origin, picks, Digits::Exact)
}

#[derive(Clone, Copy, PartialEq)]
enum Digits {
    Kaggle,
    WithScore,
    Exact,
}

fn write(path: &Path, picks: &[Pick], digits: Digits) -> Result<()> {
    let text = render(path, picks, digits)?;
    crate::util::write_atomic(path, |f| Ok(f.write_all(text.as_bytes())?))
}

fn render(path: &Path, picks: &[Pick], digits: Digits) -> Result<String> {
    let with_score = digits != Digits::Kaggle;
    let mut text = String::with_capacity(64 * (picks.len() + 1));
    text.push_str(if with_score { HEADER_WITH_SCORE } else { HEADER });
    text.push('\n');
    for (id, p) in picks.iter().enumerate() {
        let name = CLASSES
            .get(p.class)
            .with_context(|| {
                format!("{}: pick {id} has class index {} (only {} classes)", path.display(), p.class, CLASSES.len())
            })?
            .name;
        check_run_name(&p.run).with_context(|| path.display().to_string())?;
        use std::fmt::Write as _;
        let _ = match digits {
            Digits::Kaggle => writeln!(text, "{id},{},{name},{:.3},{:.3},{:.3}", p.run, p.x, p.y, p.z),
            Digits::WithScore => writeln!(text, "{id},{},{name},{:.6},{:.3},{:.3},{:.3}", p.run, p.score as f64, p.x, p.y, p.z),
            Digits::Exact => writeln!(text, "{id},{},{name},{},{},{},{}", p.run, p.score, p.x, p.y, p.z),
        };
    }
    Ok(text)
}

/// Reads a submission written by [`write_submission`] or by any Kaggle notebook.
///
/// Columns are found by name in any order (`id` is ignored; `score` is optional and defaults to 1.0,
/// so a plain submission reads as "all confident"). Blank lines are skipped and `\r\n` endings are
/// accepted. Errors name the file and the 1-based line number.
pub fn read_submission(path: &Path) -> Result<Vec<Pick>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read submission", path.display()))?;
    parse_submission(&text, &path.display().to_string(), None)
}

/// [`read_submission`] for scoring and drawing: rows of another `particle_type` are left out, as
/// the Kaggle metric scores the six particles only, and returned counted by type (for a warning:
/// a misspelt type would otherwise empty its class unseen).
pub fn read_submission_of_known_types(path: &Path) -> Result<(Vec<Pick>, std::collections::BTreeMap<String, usize>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read submission", path.display()))?;
    let mut others = std::collections::BTreeMap::new();
    let picks = parse_submission(&text, &path.display().to_string(), Some(&mut others))?;
    Ok((picks, others))
}

/// [`read_submission`] on a file's text already read (`origin` names it in errors).
pub fn parse_submission_text(text: &str, origin: &str) -> Result<Vec<Pick>> {
    parse_submission(text, origin, None)
}

/// [`read_submission_of_known_types`] on a file's text already read.
pub fn parse_submission_of_known_types(text: &str, origin: &str) -> Result<(Vec<Pick>, std::collections::BTreeMap<String, usize>)> {
    let mut others = std::collections::BTreeMap::new();
    let picks = parse_submission(text, origin, Some(&mut others))?;
    Ok((picks, others))
}

/// The warning for the rows [`read_submission_of_known_types`] left out, if any.
pub fn other_types_warning(path: &Path, others: &std::collections::BTreeMap<String, usize>) -> Option<String> {
    if others.is_empty() {
        return None;
    }
    let list: Vec<String> = others.iter().map(|(t, n)| format!("{n} {t:?}")).collect();
    Some(format!(
        "{}: rows of particle types other than the six are not counted: {} (the six: {})",
        path.display(),
        list.join(", "),
        CLASSES.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
    ))
}

/// A field without its spaces and its quotes: fields never hold commas, but a spreadsheet may
/// quote them (`"TS_1"` is TS_1).
fn unquote(x: &str) -> &str {
    let x = x.trim();
    x.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(x)
}

/// Parses submission text; `origin` names the source in error messages.
fn parse_submission(text: &str, origin: &str, mut others: Option<&mut std::collections::BTreeMap<String, usize>>) -> Result<Vec<Pick>> {
    // A byte-order mark (spreadsheet exports) is not part of the first column's name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end_matches('\r')));
    let (_, header) = lines
        .by_ref()
        .find(|(_, l)| !l.trim().is_empty())
        .with_context(|| format!("{origin}: empty file, expected a header like {HEADER}"))?;
    let names: Vec<&str> = header.split(',').map(unquote).collect();
    let col = |name: &str| names.iter().position(|n| *n == name);
    let need =
        |name: &str| col(name).with_context(|| format!("{origin}:1: missing column `{name}` in header {header:?}"));
    let (c_run, c_cls, c_x, c_y, c_z) =
        (need("experiment")?, need("particle_type")?, need("x")?, need("y")?, need("z")?);
    let c_score = col("score");

    let mut picks = Vec::new();
    for (ln, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(unquote).collect();
        if f.len() != names.len() {
            bail!("{origin}:{ln}: {} fields, header has {}", f.len(), names.len());
        }
        let class = match (class_index(f[c_cls]), others.as_deref_mut()) {
            (Some(c), _) => c,
            (None, Some(others)) => {
                *others.entry(f[c_cls].to_string()).or_insert(0) += 1;
                continue;
            }
            (None, None) => bail!("{origin}:{ln}: unknown particle_type {:?}", f[c_cls]),
        };
        fn num<T: std::str::FromStr + Into<f64> + Copy>(f: &[&str], c: usize, names: &[&str], origin: &str, ln: usize) -> Result<T> {
            let v: T = f[c]
                .parse()
                .map_err(|_| anyhow::anyhow!("{origin}:{ln}: bad number {:?} in column `{}`", f[c], names[c]))?;
            if !v.into().is_finite() {
                bail!("{origin}:{ln}: non-finite value {:?} in column `{}`", f[c], names[c]);
            }
            Ok(v)
        }
        // The score is read straight into f32, so that an f32 written in its shortest form comes
        // back exactly (not rounded twice through f64).
        let score = match c_score {
            Some(c) => num::<f32>(&f, c, &names, origin, ln)?,
            None => 1.0,
        };
        let num = |c: usize| num::<f64>(&f, c, &names, origin, ln);
        picks.push(Pick { run: f[c_run].to_string(), class, score, x: num(c_x)?, y: num(c_y)?, z: num(c_z)? });
    }
    Ok(picks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(run: &str, class: usize, score: f32, x: f64, y: f64, z: f64) -> Pick {
        Pick { run: run.into(), class, score, x, y, z }
    }

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/expected_submission.csv")
    }

    #[test]
    fn writes_plain_and_scored_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let picks =
            vec![pick("TS_5_4", 2, 0.25, 1.0, 2.34567, 3000.0004), pick("TS_6_6", 5, 0.9999999, -0.0001, 10.0, 20.1)];
        let p = dir.path().join("a.csv");
        write_submission(&p, &picks, false).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "id,experiment,particle_type,x,y,z\n\
             0,TS_5_4,ribosome,1.000,2.346,3000.000\n\
             1,TS_6_6,beta-amylase,-0.000,10.000,20.100\n"
        );
        write_submission(&p, &picks, true).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "id,experiment,particle_type,score,x,y,z\n\
             0,TS_5_4,ribosome,0.250000,1.000,2.346,3000.000\n\
             1,TS_6_6,beta-amylase,1.000000,-0.000,10.000,20.100\n"
        );
        // Nothing but the target file is left in the directory (atomic write cleans up).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn reads_fixture_and_rewrites_it_byte_identically() {
        let picks = read_submission(&fixture()).unwrap();
        assert_eq!(picks.len(), 64);
        assert_eq!(picks[0], pick("TS_synth_1", 0, 0.997944, 1316.574, 136.359, 147.159));
        assert_eq!(
            picks.iter().filter(|p| p.run == "TS_synth_2").count(),
            64 - picks.iter().filter(|p| p.run == "TS_synth_1").count()
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.csv");
        write_submission(&out, &picks, true).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(fixture()).unwrap());
    }

    #[test]
    fn exact_layout_reads_back_to_the_same_values() {
        let dir = tempfile::tempdir().unwrap();
        let next = |v: f32| f32::from_bits(v.to_bits() + 1);
        let picks = vec![
            pick("TS_5_4", 2, next(0.3), 1.0 / 3.0, 2.345_678_901_234_5, 3_000.000_000_000_4),
            pick("TS_6_6", 5, 0.999_999_94, -1e-300, 10.0, f64::MAX),
        ];
        let p = dir.path().join("a.csv");
        write_submission_exact(&p, &picks).unwrap();
        assert_eq!(read_submission(&p).unwrap(), picks);
        // The rounded layout does not (what `--resume` kept before).
        write_submission(&p, &picks, true).unwrap();
        assert_ne!(read_submission(&p).unwrap(), picks);
    }

    #[test]
    fn columns_by_name_any_order_and_optional_score() {
        let text =
            "z,y,x,particle_type,experiment,id\r\n7.5,8,9,thyroglobulin,TS_1,0\r\n\r\n1,2,3,apo-ferritin,TS_2,1\r\n";
        let picks = parse_submission(text, "t.csv", None).unwrap();
        assert_eq!(picks, vec![pick("TS_1", 3, 1.0, 9.0, 8.0, 7.5), pick("TS_2", 0, 1.0, 3.0, 2.0, 1.0)]);
        let scored =
            parse_submission("experiment,particle_type,x,y,z,score\nr,ribosome,1,2,3,0.125\n", "t.csv", None).unwrap();
        assert_eq!(scored, vec![pick("r", 2, 0.125, 1.0, 2.0, 3.0)]);
        // Quoted fields.
        assert_eq!(parse_submission("experiment,particle_type,x,y,z\n\"r\",\"ribosome\",\"1\",2,3\n", "t.csv", None).unwrap(), vec![pick("r", 2, 1.0, 1.0, 2.0, 3.0)]);
        // A byte-order mark before the header.
        assert_eq!(parse_submission("\u{feff}score,experiment,particle_type,x,y,z\n0.5,r,ribosome,1,2,3\n", "t.csv", None).unwrap(), vec![pick("r", 2, 0.5, 1.0, 2.0, 3.0)]);
        // Only a header: no picks, no error.
        assert!(parse_submission("id,experiment,particle_type,x,y,z\n", "t.csv", None).unwrap().is_empty());
    }

    #[test]
    fn errors_name_file_and_line() {
        // Scoring leaves other particle types out, counted; reading for a merge refuses them.
        let dir = tempfile::tempdir().unwrap();
        let mixed = dir.path().join("m.csv");
        std::fs::write(&mixed, "experiment,particle_type,x,y,z\nr,membrane,1,2,3\nr,ribosome,1,2,3\nr,membrane,4,5,6\nr,ribosme,1,1,1\n").unwrap();
        let (picks, others) = read_submission_of_known_types(&mixed).unwrap();
        assert_eq!(picks, vec![pick("r", 2, 1.0, 1.0, 2.0, 3.0)]);
        assert_eq!(others.into_iter().collect::<Vec<_>>(), vec![("membrane".to_string(), 2), ("ribosme".to_string(), 1)]);
        let (_, others) = read_submission_of_known_types(&mixed).unwrap();
        let w = other_types_warning(&mixed, &others).unwrap();
        assert!(w.contains("m.csv") && w.contains("2 \"membrane\", 1 \"ribosme\"") && w.contains("apo-ferritin"), "{w}");
        assert!(read_submission(&mixed).unwrap_err().to_string().contains("m.csv:2: unknown particle_type \"membrane\""));
        let err = |t: &str| parse_submission(t, "sub.csv", None).unwrap_err().to_string();
        let e = err("id,experiment,particle_type,x,y,z\n0,r,ribosome,1,2,3\n1,r,membrane,1,2,3\n");
        assert!(e.contains("sub.csv:3") && e.contains("membrane"), "{e}");
        let e = err("id,experiment,particle_type,x,y,z\n0,r,ribosome,1,zz,3\n");
        assert!(e.contains("sub.csv:2") && e.contains("zz") && e.contains("`y`"), "{e}");
        let e = err("id,experiment,particle_type,x,y\n0,r,ribosome,1,2\n");
        assert!(e.contains("sub.csv:1") && e.contains("`z`"), "{e}");
        let e = err("id,experiment,particle_type,x,y,z\n0,r,ribosome,1,2\n");
        assert!(e.contains("sub.csv:2") && e.contains("5 fields"), "{e}");
        let e = err("id,experiment,particle_type,x,y,z\n0,r,ribosome,1,2,NaN\n");
        assert!(e.contains("sub.csv:2"), "{e}");
        assert!(err("").contains("empty"));
        // The real reader names the path too.
        let missing = read_submission(Path::new("/nonexistent/sub.csv")).unwrap_err().to_string();
        assert!(missing.contains("/nonexistent/sub.csv"), "{missing}");
    }

    #[test]
    fn rejects_bad_class_index_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.csv");
        assert!(write_submission(&p, &[pick("r", 6, 1.0, 0.0, 0.0, 0.0)], false).is_err());
        assert!(!p.exists());
    }
}
