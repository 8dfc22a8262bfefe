//! copick picks JSON: the competition's ground-truth format and a submission format of its own.
//!
//! One file holds the points of one particle class in one run:
//! `{root}/{split}/overlay/ExperimentRuns/{run}/Picks/{particle}.json` (copick itself writes
//! `{user}_{session}_{particle}.json`; a copick project's folders are named by its configuration,
//! `dataset::Layout`). Coordinates are in Å.
use crate::io::dataset::Layout;
use crate::particles::{class_index, Pick, CLASSES};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The parts of a picks file we read; everything else (orientation, ids, user) is ignored.
#[derive(Deserialize)]
struct PicksIn {
    pickable_object_name: String,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    session_id: Option<String>,
    /// Missing or `null` means no points (copick writes `null` for an empty session).
    #[serde(default)]
    points: Option<Vec<PointIn>>,
}

#[derive(Deserialize)]
struct PointIn {
    location: Location,
    /// Object space to tomogram space; its translation (last column) is a shift in Å added to the
    /// location (e.g. refined in subtomogram averaging): the centre is `location + t[0..3][3]`.
    #[serde(default, rename = "transformation_", alias = "transformation")]
    transformation: Option<[[f64; 4]; 4]>,
    #[serde(default)]
    score: Option<f64>,
}

impl PointIn {
    /// The particle centre in Å: the location plus the transformation's translation.
    fn centre(&self) -> [f64; 3] {
        let Location { x, y, z } = self.location;
        match &self.transformation {
            Some(t) => [x + t[0][3], y + t[1][3], z + t[2][3]],
            None => [x, y, z],
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Location {
    x: f64,
    y: f64,
    z: f64,
}

/// A picks file as copick writes it; field order follows copick's own output.
#[derive(Serialize)]
struct PicksOut<'a> {
    pickable_object_name: &'a str,
    user_id: &'a str,
    session_id: &'a str,
    run_name: &'a str,
    voxel_spacing: Option<f64>,
    unit: &'a str,
    trust_orientation: bool,
    points: Vec<PointOut>,
}

#[derive(Serialize)]
struct PointOut {
    location: Location,
    transformation_: [[f64; 4]; 4],
    instance_id: u32,
    score: f32,
}

const IDENTITY: [[f64; 4]; 4] =
    [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]];

/// Reads one picks file as picks of `run`.
///
/// The class comes from `pickable_object_name` (not the file name, which may carry a user/session
/// prefix); an unknown object is an error, as silently dropping it would hide a mislabelled truth.
/// A point without `score` (ground truth) gets 1.0.
pub fn read_picks_file(path: &Path, run: &str) -> Result<Vec<Pick>> {
    let doc = parse_picks_file(path)?;
    let class = class_index(&doc.pickable_object_name).ok_or_else(|| unknown_object(path, &doc))?;
    points_of(path, doc, class, run)
}

fn parse_picks_file(path: &Path) -> Result<PicksIn> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read picks file", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: malformed copick picks JSON", path.display()))
}

fn unknown_object(path: &Path, doc: &PicksIn) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: unknown pickable_object_name {:?} (known: {})",
        path.display(),
        doc.pickable_object_name,
        CLASSES.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
    )
}

/// The points of a parsed picks file of class `class`, as picks of `run`.
fn points_of(path: &Path, doc: PicksIn, class: usize, run: &str) -> Result<Vec<Pick>> {
    let points = doc.points.unwrap_or_default();
    let mut picks = Vec::with_capacity(points.len());
    for (i, p) in points.into_iter().enumerate() {
        let [x, y, z] = p.centre();
        if !(x.is_finite() && y.is_finite() && z.is_finite()) {
            bail!("{}: point {i} has a non-finite location", path.display());
        }
        picks.push(Pick { run: run.to_string(), class, score: p.score.unwrap_or(1.0) as f32, x, y, z });
    }
    Ok(picks)
}

/// Reads every `*.json` in a run's `Picks/` directory (`{particle}.json` or
/// `{user}_{session}_{particle}.json`), in file-name order so the result is deterministic.
///
/// Every file counts: two sessions of the same particle both contribute their points.
pub fn read_run_picks(picks_dir: &Path, run: &str) -> Result<Vec<Pick>> {
    let mut files = json_files(picks_dir)?;
    files.sort();
    let mut picks = Vec::new();
    for f in files {
        picks.extend(read_picks_file(&f, run)?);
    }
    Ok(picks)
}

fn json_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("{}: cannot list picks directory", dir.display()))?;
    let mut files = Vec::new();
    for e in entries {
        let path = e.with_context(|| format!("{}: cannot list picks directory", dir.display()))?.path();
        let is_json = path.extension().is_some_and(|x| x == "json");
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if is_json && !hidden && path.is_file() {
            files.push(path);
        }
    }
    Ok(files)
}

/// Picks files [`truth_files`] did not count, and the first of each kind, for one note each.
#[derive(Default)]
struct Skipped {
    /// Files of objects other than the six particles, and those objects' names.
    other_objects: usize,
    first_object: Option<PathBuf>,
    objects: Vec<String>,
    other_users: usize,
    first_other: Option<PathBuf>,
    /// Files repeating points of an earlier file, and how many points.
    copies: usize,
    repeated_points: usize,
    /// The first such file, and the file it repeats.
    first_copy: Option<(PathBuf, PathBuf)>,
}

/// Two truth points of one particle class closer than this (Å) in two files of one run are one
/// particle: far below any particle's radius (60 Å and more), far above rounding.
const REPEAT_A: f64 = 1.0;

/// The user id `fastdet run --copick-out` writes by default: predictions, never ground truth.
const OWN_USER: &str = "fastdet";

/// Files of the annotators: user `curation`, or no user (the competition's own `{particle}.json`).
fn by_annotator(d: &PicksIn) -> bool {
    matches!(d.user_id.as_deref(), None | Some("") | Some("curation"))
}

/// A run's picks files of the six particles, parsed, in file-name order. An object other than the
/// six is skipped (with a note) in other users' files, and in the annotators' when the project's
/// configuration declares it (`declared`, its `pickable_objects`: not scored, as in the Kaggle
/// metric); an undeclared one of the annotators is an error (a mislabelled truth would otherwise
/// vanish).
fn particle_files(picks_dirs: &[PathBuf], declared: &[String], skipped: &mut Skipped) -> Result<Vec<(PathBuf, PicksIn, usize)>> {
    let mut files = Vec::new();
    for d in picks_dirs {
        files.extend(json_files(d)?);
    }
    files.sort();
    let mut known = Vec::new();
    for f in files {
        let doc = parse_picks_file(&f)?;
        match class_index(&doc.pickable_object_name) {
            Some(c) => known.push((f, doc, c)),
            None if by_annotator(&doc) && !declared.contains(&doc.pickable_object_name) => return Err(unknown_object(&f, &doc)),
            None => {
                if !skipped.objects.contains(&doc.pickable_object_name) {
                    skipped.objects.push(doc.pickable_object_name.clone());
                }
                skipped.other_objects += 1;
                skipped.first_object.get_or_insert(f);
            }
        }
    }
    Ok(known)
}

/// Which of a run's picks files are its ground truth. A copick project may hold several users'
/// picks beside the annotators' (fastdet's own `--copick-out`, other pickers). In a project where
/// the annotators picked anything (`annotated`), only their files count, in every run: a particle
/// they did not pick in a run has no particles there, whoever else picked it. Otherwise, per
/// particle, the files of the one user and session there is; several users or sessions of one
/// particle is an error, as their points would all count. User `fastdet`'s files never count.
/// A point within [`REPEAT_A`] of one of an earlier file of the same run and particle is that
/// particle written again (a copy under the other naming, rounded, or with its shift moved into
/// the transformation) and counts once. What is left out is counted in `skipped`.
fn truth_files(picks_dir: &str, mut known: Vec<(PathBuf, PicksIn, usize)>, annotated: bool, skipped: &mut Skipped) -> Result<Vec<(PathBuf, PicksIn, usize)>> {
    let who = |d: &PicksIn| (d.user_id.clone().unwrap_or_default(), d.session_id.clone().unwrap_or_default());
    let mut keep = vec![false; known.len()];
    for (c, class) in CLASSES.iter().enumerate() {
        let of_class: Vec<usize> = (0..known.len()).filter(|&i| known[i].2 == c).collect();
        let candidates: Vec<usize> = of_class
            .iter()
            .copied()
            .filter(|&i| if annotated { by_annotator(&known[i].1) } else { known[i].1.user_id.as_deref() != Some(OWN_USER) })
            .collect();
        let mut groups: Vec<(String, String)> = candidates.iter().map(|&i| who(&known[i].1)).collect();
        groups.sort();
        groups.dedup();
        if groups.len() > 1 && !annotated {
            let list: Vec<String> = groups.iter().map(|(u, s)| format!("user {u:?} session {s:?}")).collect();
            bail!(
                "{picks_dir}: {} picked by several users or sessions ({}) and none of user curation: which is the ground truth? Keep one set in this folder",
                class.name,
                list.join(", ")
            );
        }
        // The centres taken from earlier files of this particle, and the file of each.
        let mut taken: Vec<([f64; 3], usize)> = Vec::new();
        for &i in &candidates {
            keep[i] = true;
            let earlier = taken.len();
            let mut fresh = Vec::new();
            let mut repeated = 0;
            for p in known[i].1.points.take().unwrap_or_default() {
                let c = p.centre();
                let near = |t: &&([f64; 3], usize)| (0..3).map(|k| (t.0[k] - c[k]).powi(2)).sum::<f64>() <= REPEAT_A * REPEAT_A;
                match taken[..earlier].iter().find(near) {
                    Some(&(_, of)) => {
                        repeated += 1;
                        skipped.first_copy.get_or_insert_with(|| (known[i].0.clone(), known[of].0.clone()));
                    }
                    None => {
                        taken.push((c, i));
                        fresh.push(p);
                    }
                }
            }
            if repeated > 0 {
                skipped.copies += 1;
                skipped.repeated_points += repeated;
            }
            known[i].1.points = Some(fresh);
        }
        for &i in of_class.iter().filter(|i| !candidates.contains(i)) {
            skipped.other_users += 1;
            skipped.first_other.get_or_insert_with(|| known[i].0.clone());
        }
    }
    Ok(known.into_iter().zip(keep).filter(|(_, k)| *k).map(|(file, _)| file).collect())
}

/// Reads the ground truth of a project: for every run (see [`truth_runs`]), its picks in
/// `{overlay}/ExperimentRuns/{run}/Picks/` and, in a copick project with a static root apart, in
/// `{static}/ExperimentRuns/{run}/Picks/` too; runs sorted by name (`truth_files` says which files
/// count; what it leaves out is printed as a warning). A run without picks has no annotations
/// and contributes nothing.
pub fn read_truth(layout: &Layout) -> Result<Vec<Pick>> {
    truth_warned(layout).map(|(picks, _)| picks)
}

/// The truth, what was left out printed as warnings, and how many files it came from.
fn truth_warned(layout: &Layout) -> Result<(Vec<Pick>, usize)> {
    let (picks, notes, files) = truth_with_files(layout)?;
    for n in notes {
        crate::errln!("warning: {n}");
    }
    Ok((picks, files))
}

/// [`read_truth`] for scoring and tuning: a project without one ground-truth file is an error,
/// as every score against it would be 0 (or 1 with a set of predictions taken for the truth). A
/// file without points is truth: no particles of its class there.
pub fn read_truth_to_score(layout: &Layout) -> Result<Vec<Pick>> {
    let (picks, files) = truth_warned(layout)?;
    if files == 0 {
        bail!("{}: no ground truth: no run has picks of the six particles by user curation (or by one picker other than fastdet)", layout.truth_folders());
    }
    Ok(picks)
}

/// The folders that may hold a run's picks; one folder reached twice (a static root that is a
/// link to the overlay root) is read once.
fn picks_dirs(layout: &Layout, run: &str) -> Vec<PathBuf> {
    let mut dirs = vec![layout.overlay_runs.join(run).join("Picks")];
    if layout.reads_both_roots() {
        dirs.push(layout.static_runs.join(run).join("Picks"));
    }
    dirs.retain(|d| d.is_dir());
    if dirs.len() == 2 && std::fs::canonicalize(&dirs[0]).ok().is_some_and(|a| std::fs::canonicalize(&dirs[1]).ok() == Some(a)) {
        dirs.pop();
    }
    dirs
}

/// The runs that may have ground truth, sorted: the folders of `{overlay}/ExperimentRuns` (and in a
/// copick project, those of the static root with a `Picks` folder). Errors when there is no
/// overlay runs folder and no such static run.
pub fn truth_runs(layout: &Layout) -> Result<Vec<String>> {
    let list = |dir: &Path| -> Result<Vec<String>> {
        match crate::io::dataset::sub_dirs(dir) {
            Some(runs) => runs.with_context(|| format!("{}: cannot list ground-truth runs", dir.display())),
            None => bail!("{}: cannot list ground-truth runs: no such directory", dir.display()),
        }
    };
    let overlay = list(&layout.overlay_runs);
    let mut runs = Vec::new();
    if layout.reads_both_roots() && layout.static_runs.is_dir() {
        runs = list(&layout.static_runs)?;
        runs.retain(|r| layout.static_runs.join(r).join("Picks").is_dir());
    }
    match overlay {
        Ok(o) => runs.extend(o),
        Err(e) if runs.is_empty() => return Err(e),
        Err(_) => {}
    }
    runs.sort();
    runs.dedup();
    Ok(runs)
}

/// The names of the `pickable_objects` a copick configuration declares.
fn declared_objects(file: &Path) -> Result<Vec<String>> {
    let doc = crate::io::dataset::copick_config_json(file)?;
    let objects = doc.get("pickable_objects").and_then(serde_json::Value::as_array).map(Vec::as_slice).unwrap_or_default();
    Ok(objects.iter().filter_map(|o| o.get("name")?.as_str().map(str::to_owned)).collect())
}

/// `read_truth`, with what it left out as notes instead of warnings.
pub fn read_truth_noted(layout: &Layout) -> Result<(Vec<Pick>, Vec<String>)> {
    truth_with_files(layout).map(|(picks, notes, _)| (picks, notes))
}

/// `read_truth_noted`, and how many files the truth came from.
fn truth_with_files(layout: &Layout) -> Result<(Vec<Pick>, Vec<String>, usize)> {
    let mut notes = Vec::new();
    let mut skipped = Skipped::default();
    let declared = match &layout.config {
        Some(file) => declared_objects(file)?,
        None => Vec::new(),
    };
    let mut runs = Vec::new();
    for run in truth_runs(layout)? {
        let dirs = picks_dirs(layout, &run);
        let known = particle_files(&dirs, &declared, &mut skipped)?;
        runs.push((run, dirs, known));
    }
    let annotated = runs.iter().any(|(_, _, known)| known.iter().any(|(_, d, _)| by_annotator(d)));
    let mut picks = Vec::new();
    let mut files = 0;
    for (run, dirs, known) in runs {
        let picks_dir = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" and ");
        for (f, doc, class) in truth_files(&picks_dir, known, annotated, &mut skipped)? {
            picks.extend(points_of(&f, doc, class, &run)?);
            files += 1;
        }
    }
    if let Some(first) = &skipped.first_object {
        notes.push(format!(
            "{} picks file(s) of objects other than the six particles not counted ({}), e.g. {}",
            skipped.other_objects,
            skipped.objects.join(", "),
            first.display()
        ));
    }
    if let Some(first) = &skipped.first_other {
        let whose = if annotated { "the ground truth is user curation's files" } else { "user fastdet's files are predictions" };
        notes.push(format!("{} picks file(s) of other users not counted ({whose}), e.g. {}", skipped.other_users, first.display()));
    }
    if let Some((copy, of)) = &skipped.first_copy {
        notes.push(format!(
            "{} picks file(s) repeat {} point(s) of another file of their run and particle (within {REPEAT_A} Å: a copy under the other naming?); counted once, e.g. {} (as {})",
            skipped.copies,
            skipped.repeated_points,
            copy.display(),
            of.display()
        ));
    }
    Ok((picks, notes, files))
}

fn check_name(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.contains(['/', '\\']) || s == "." || s == ".." {
        bail!("copick {what} {s:?} cannot be used in a file path");
    }
    Ok(())
}

/// A user or session id for `{user}_{session}_{object}.json`: usable in a file name, and without
/// the `_` that separates the parts (or white space), so that copick reads the name back.
pub fn check_id(what: &str, s: &str) -> Result<()> {
    check_name(what, s)?;
    if s.contains('_') || s.chars().any(char::is_whitespace) {
        bail!("copick {what} {s:?}: no '_' or spaces (copick names files {{user}}_{{session}}_{{object}}.json)");
    }
    Ok(())
}

/// Writes `{out_dir}/ExperimentRuns/{run}/Picks/{user}_{session}_{particle}.json` for each of the six
/// classes, so copick tools see the session complete (a class with no picks gets an empty list).
///
/// Only picks of `run` are written, so a whole multi-run submission can be passed. Each file is
/// written atomically. Points carry an identity orientation marked as not to be trusted
/// (`trust_orientation: false`), as the detector predicts none.
pub fn write_run_picks(out_dir: &Path, run: &str, picks: &[Pick], user_id: &str, session_id: &str) -> Result<()> {
    crate::util::write_files_atomic(&run_picks_files(out_dir, run, picks, user_id, session_id)?)
}

/// The files [`write_run_picks`] writes, as (path, bytes): a job writes every run's files at
/// once, so that a failure leaves none of them.
pub fn run_picks_files(out_dir: &Path, run: &str, picks: &[Pick], user_id: &str, session_id: &str) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    check_name("run", run)?;
    check_id("user_id", user_id)?;
    check_id("session_id", session_id)?;
    let dir = out_dir.join("ExperimentRuns").join(run).join("Picks");
    let mut files = Vec::with_capacity(CLASSES.len());
    for (ci, class) in CLASSES.iter().enumerate() {
        let points = picks
            .iter()
            .filter(|p| p.class == ci && p.run == run)
            .map(|p| PointOut {
                location: Location { x: p.x, y: p.y, z: p.z },
                transformation_: IDENTITY,
                instance_id: 0,
                score: p.score,
            })
            .collect();
        let doc = PicksOut {
            pickable_object_name: class.name,
            user_id,
            session_id,
            run_name: run,
            voxel_spacing: None,
            unit: "angstrom",
            // The detector finds centres only: the identity orientation is not a measurement
            // (copick marks point annotations without angles so).
            trust_orientation: false,
            points,
        };
        let path = dir.join(format!("{user_id}_{session_id}_{}.json", class.name));
        let bytes = serde_json::to_vec_pretty(&doc).with_context(|| format!("{}: cannot write", path.display()))?;
        files.push((path, bytes));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dataset")
    }

    #[test]
    fn reads_fixture_truth_file() {
        let f = overlay().join("test/overlay/ExperimentRuns/TS_synth_1/Picks/ribosome.json");
        let picks = read_picks_file(&f, "TS_synth_1").unwrap();
        assert!(!picks.is_empty());
        // serde_json parses floats exactly only with its `float_roundtrip` feature (which this crate
        // gets through zarrs); without it the last bit may differ, so allow one ulp.
        let ulp_eq = |a: f64, b: f64| (a - b).abs() <= b.abs() * f64::EPSILON;
        let p = &picks[0];
        assert_eq!((p.run.as_str(), p.class, p.score), ("TS_synth_1", 2, 1.0));
        assert!(ulp_eq(p.x, 475.57000000000005) && ulp_eq(p.y, 785.942) && ulp_eq(p.z, 345.414), "{p:?}");
        assert!(ulp_eq(picks[1].x, 1326.5900000000001), "{:?}", picks[1]);
        assert!(picks.iter().all(|p| p.class == 2 && p.score == 1.0));
    }

    /// In a project with the annotators' files (user curation or none), only theirs are the truth,
    /// in every run; without them, one user per particle is, never fastdet's own picks; several
    /// users of one particle is an error; a copy of a file under the other naming counts once.
    #[test]
    fn truth_is_the_curation_users_picks() {
        let root = tempfile::tempdir().unwrap();
        let picks = |project: &str, run: &str| {
            let d = root.path().join(project).join("test/overlay/ExperimentRuns").join(run).join("Picks");
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let file = |dir: &Path, name: &str, user: Option<&str>, object: &str, n: usize| {
            let points: Vec<String> = (0..n).map(|i| format!(r#"{{"location": {{"x": {i}, "y": 1, "z": 2}}}}"#)).collect();
            let user = user.map(|u| format!(r#""user_id": "{u}", "session_id": "0", "#)).unwrap_or_default();
            let text = format!(r#"{{"pickable_object_name": "{object}", {user}"points": [{}]}}"#, points.join(","));
            std::fs::write(dir.join(name), text).unwrap();
        };
        let read = |project: &str| read_truth_noted(&Layout::split(&root.path().join(project), "test"));
        let count = |truth: &[Pick], run: &str| truth.iter().filter(|p| p.run == run).count();

        let a = picks("annotated", "TS_a");
        file(&a, "ribosome.json", Some("curation"), "ribosome", 3);
        file(&a, "fastdet_0_ribosome.json", Some("fastdet"), "ribosome", 5);
        file(&a, "x_0_membrane.json", Some("x"), "membrane", 1);
        file(&a, "apo-ferritin.json", None, "apo-ferritin", 2);
        file(&a, "curation_0_apo-ferritin.json", Some("curation"), "apo-ferritin", 2);
        // A copy rounded differently, with one more point: that one counts.
        file(&a, "beta-amylase.json", None, "beta-amylase", 2);
        let moved = r#"{"pickable_object_name": "beta-amylase", "user_id": "curation", "session_id": "0", "points": [
            {"location": {"x": 0.0004, "y": 1, "z": 2}}, {"location": {"x": 0.5, "y": 1, "z": 2}, "transformation_": [[1,0,0,0.5],[0,1,0,0],[0,0,1,0],[0,0,0,1]]},
            {"location": {"x": 7, "y": 1, "z": 2}}]}"#;
        std::fs::write(a.join("curation_0_beta-amylase.json"), moved).unwrap();
        // Curation did not pick TS_b: other pickers' files there are not its truth either.
        let b = picks("annotated", "TS_b");
        file(&b, "alice_0_ribosome.json", Some("alice"), "ribosome", 2);
        file(&b, "fastdet_0_ribosome.json", Some("fastdet"), "ribosome", 4);
        let (truth, notes) = read("annotated").unwrap();
        assert_eq!((count(&truth, "TS_a"), count(&truth, "TS_b")), (8, 0), "{truth:?}");
        assert!(truth.iter().any(|p| p.class == 5 && p.x == 7.0), "{truth:?}");
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].contains("membrane"), "{notes:?}");
        assert!(notes[1].starts_with("3 picks file(s) of other users not counted (the ground truth is user curation's files)"), "{notes:?}");
        assert!(notes[2].starts_with("2 picks file(s) repeat 4 point(s) of another file of their run and particle (within 1 Å") && notes[2].contains("curation_0_apo-ferritin.json (as ") && notes[2].ends_with("/apo-ferritin.json)"), "{notes:?}");
        // A curation file of an unknown object is a mislabelled truth: an error.
        file(&a, "membrane.json", Some("curation"), "membranes", 1);
        let e = read("annotated").unwrap_err().to_string();
        assert!(e.contains("unknown pickable_object_name \"membranes\""), "{e}");

        // No annotator anywhere: one picker per particle is the truth, fastdet never.
        let c = picks("pickers", "TS_c");
        file(&c, "alice_0_ribosome.json", Some("alice"), "ribosome", 2);
        file(&c, "fastdet_0_ribosome.json", Some("fastdet"), "ribosome", 4);
        file(&c, "carol_0_apo-ferritin.json", Some("carol"), "apo-ferritin", 1);
        let (truth, notes) = read("pickers").unwrap();
        assert_eq!(count(&truth, "TS_c"), 3);
        assert!(notes.len() == 1 && notes[0].contains("1 picks file(s) of other users not counted (user fastdet's files are predictions)"), "{notes:?}");
        file(&c, "bob_0_ribosome.json", Some("bob"), "ribosome", 4);
        let e = read("pickers").unwrap_err().to_string();
        assert!(e.contains("TS_c") && e.contains("ribosome picked by") && e.contains("user \"alice\"") && e.contains("user \"bob\"") && e.contains("none of user curation"), "{e}");

        // Only fastdet's own picks: nothing to score against.
        let d = picks("own", "TS_d");
        file(&d, "fastdet_0_ribosome.json", Some("fastdet"), "ribosome", 4);
        let layout = Layout::split(&root.path().join("own"), "test");
        assert!(read_truth_noted(&layout).unwrap().0.is_empty());
        let e = read_truth_to_score(&layout).unwrap_err().to_string();
        assert!(e.contains("own/test/overlay/ExperimentRuns: no ground truth"), "{e}");
    }

    /// A point's centre is its location plus its transformation's translation (copick's rule).
    #[test]
    fn transformation_translation_moves_the_centre() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ribosome.json");
        std::fs::write(
            &f,
            r#"{"pickable_object_name": "ribosome", "points": [
                {"location": {"x": 100, "y": 200, "z": 300}, "transformation_": [[1,0,0,5],[0,1,0,-7],[0,0,1,0.5],[0,0,0,1]]},
                {"location": {"x": 1, "y": 2, "z": 3}}]}"#,
        )
        .unwrap();
        let p = read_picks_file(&f, "TS").unwrap();
        assert_eq!([p[0].x, p[0].y, p[0].z], [105.0, 193.0, 300.5]);
        assert_eq!([p[1].x, p[1].y, p[1].z], [1.0, 2.0, 3.0]);
    }

    /// In a copick project the picks of both roots count, and a run with picks in the static
    /// root only is a run with ground truth; one annotator's set split over the two roots is one set.
    #[test]
    fn copick_project_truth_from_both_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let (stat, over) = (tmp.path().join("s"), tmp.path().join("o"));
        let layout = Layout { static_runs: stat.join("ExperimentRuns"), overlay_runs: over.join("ExperimentRuns"), config: Some(tmp.path().join("c.json")) };
        std::fs::write(tmp.path().join("c.json"), r#"{"overlay_root": "o"}"#).unwrap();
        let e = read_truth_noted(&layout).unwrap_err().to_string();
        assert!(e.contains("cannot list ground-truth runs"), "{e}");
        let file = |root: &Path, run: &str, name: &str, object: &str, n: usize| {
            let d = root.join("ExperimentRuns").join(run).join("Picks");
            std::fs::create_dir_all(&d).unwrap();
            let points: Vec<String> = (0..n).map(|i| format!(r#"{{"location": {{"x": {i}, "y": 1, "z": 2}}}}"#)).collect();
            let text = format!(r#"{{"pickable_object_name": "{object}", "user_id": "curation", "session_id": "0", "points": [{}]}}"#, points.join(","));
            std::fs::write(d.join(name), text).unwrap();
        };
        file(&stat, "TS_s", "curation_0_ribosome.json", "ribosome", 2);
        assert_eq!(truth_runs(&layout).unwrap(), vec!["TS_s".to_string()]);
        file(&over, "TS_s", "curation_0_apo-ferritin.json", "apo-ferritin", 3);
        file(&over, "TS_o", "curation_0_ribosome.json", "ribosome", 1);
        std::fs::create_dir_all(stat.join("ExperimentRuns/TS_none/VoxelSpacing10.000")).unwrap();
        assert_eq!(truth_runs(&layout).unwrap(), vec!["TS_o".to_string(), "TS_s".to_string()]);
        let (truth, notes) = read_truth_noted(&layout).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        let count = |run: &str, class: usize| truth.iter().filter(|p| p.run == run && p.class == class).count();
        assert_eq!((count("TS_s", 2), count("TS_s", 0), count("TS_o", 2)), (2, 3, 1));
        // The competition layout reads the overlay only.
        let split = Layout { config: None, ..layout.clone() };
        assert_eq!(read_truth(&split).unwrap().len(), 4);
        // A seventh object the configuration declares is not scored; one it does not is an error.
        std::fs::write(tmp.path().join("c.json"), r#"{"overlay_root": "o", "pickable_objects": [{"name": "proteasome", "is_particle": true}]}"#).unwrap();
        file(&over, "TS_o", "curation_0_proteasome.json", "proteasome", 2);
        let (truth, notes) = read_truth_noted(&layout).unwrap();
        assert_eq!(truth.len(), 6);
        assert!(notes.len() == 1 && notes[0].starts_with("1 picks file(s) of objects other than the six particles not counted (proteasome), e.g. ") && notes[0].ends_with("curation_0_proteasome.json"), "{notes:?}");
        file(&over, "TS_o", "curation_0_membrane.json", "membrane", 2);
        let e = read_truth_noted(&layout).unwrap_err().to_string();
        assert!(e.contains("unknown pickable_object_name \"membrane\""), "{e}");
        std::fs::remove_file(over.join("ExperimentRuns/TS_o/Picks/curation_0_membrane.json")).unwrap();
        std::fs::remove_file(over.join("ExperimentRuns/TS_o/Picks/curation_0_proteasome.json")).unwrap();
        // A static root that is a link to the overlay root: its picks are read once.
        #[cfg(unix)]
        {
            let link = tmp.path().join("link");
            std::os::unix::fs::symlink(&over, &link).unwrap();
            let linked = Layout { static_runs: link.join("ExperimentRuns"), ..layout.clone() };
            let (truth, notes) = read_truth_noted(&linked).unwrap();
            assert_eq!((truth.len(), notes.len()), (4, 0), "{notes:?}");
        }
    }

    #[test]
    fn reads_fixture_split_sorted_by_run() {
        let truth = read_truth(&Layout::split(&overlay(), "test")).unwrap();
        let runs: Vec<&str> = truth.iter().map(|p| p.run.as_str()).collect();
        assert_eq!(runs.first(), Some(&"TS_synth_1"));
        assert_eq!(runs.last(), Some(&"TS_synth_2"));
        assert!(runs.windows(2).all(|w| w[0] <= w[1]), "runs come sorted");
        // Every class is annotated in the fixture runs.
        for c in 0..CLASSES.len() {
            assert!(truth.iter().any(|p| p.class == c && p.run == "TS_synth_2"), "class {c}");
        }
        let err = read_truth(&Layout::split(&overlay(), "train")).unwrap_err().to_string();
        assert!(err.contains("train/overlay/ExperimentRuns"), "{err}");
    }

    #[test]
    fn score_empty_points_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let p = write(
            "a.json",
            r#"{"pickable_object_name": "thyroglobulin", "points": [
                {"location": {"x": 1.5, "y": 2, "z": -3}, "score": 0.25},
                {"location": {"x": 4, "y": 5, "z": 6}, "score": null}]}"#,
        );
        let picks = read_picks_file(&p, "r").unwrap();
        assert_eq!(picks[0], Pick { run: "r".into(), class: 3, score: 0.25, x: 1.5, y: 2.0, z: -3.0 });
        assert_eq!(picks[1].score, 1.0);
        let p = write("b.json", r#"{"pickable_object_name": "ribosome", "points": []}"#);
        assert!(read_picks_file(&p, "r").unwrap().is_empty());
        let p = write("c.json", r#"{"pickable_object_name": "ribosome", "points": null}"#);
        assert!(read_picks_file(&p, "r").unwrap().is_empty());

        let p = write("d.json", r#"{"pickable_object_name": "membrane", "points": []}"#);
        let e = format!("{:#}", read_picks_file(&p, "r").unwrap_err());
        assert!(e.contains("d.json") && e.contains("membrane"), "{e}");
        let p = write("e.json", r#"{"pickable_object_name": "ribosome", "points": [{"location": {"x": 1}}"#);
        let e = format!("{:#}", read_picks_file(&p, "r").unwrap_err());
        assert!(e.contains("e.json") && e.contains("malformed"), "{e}");
        let p = write("f.json", r#"{"points": []}"#);
        let e = format!("{:#}", read_picks_file(&p, "r").unwrap_err());
        assert!(e.contains("f.json") && e.contains("pickable_object_name"), "{e}");
    }

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |run: &str, class, score, x| Pick { run: run.into(), class, score, x, y: x * 2.0 + 0.1, z: -x / 3.0 };
        let picks = vec![
            mk("TS_a", 0, 0.5, 100.25),
            mk("TS_a", 4, 0.987_654_3, 1_234.567_890_123),
            mk("TS_b", 0, 0.9, 5.0),
            mk("TS_a", 0, 0.3, 777.777),
        ];
        write_run_picks(dir.path(), "TS_a", &picks, "fastdet", "0").unwrap();
        let pdir = dir.path().join("ExperimentRuns/TS_a/Picks");
        let mut names: Vec<String> =
            std::fs::read_dir(&pdir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        let mut want: Vec<String> = CLASSES.iter().map(|c| format!("fastdet_0_{}.json", c.name)).collect();
        want.sort();
        assert_eq!(names, want, "six files, nothing temporary left");

        let mut back = read_run_picks(&pdir, "TS_a").unwrap();
        back.sort_by(|a, b| (a.class, a.x).partial_cmp(&(b.class, b.x)).unwrap());
        let mut expect: Vec<Pick> = picks.iter().filter(|p| p.run == "TS_a").cloned().collect();
        expect.sort_by(|a, b| (a.class, a.x).partial_cmp(&(b.class, b.x)).unwrap());
        assert_eq!(back.len(), expect.len());
        for (b, e) in back.iter().zip(&expect) {
            assert_eq!((&b.run, b.class, b.score), (&e.run, e.class, e.score));
            for (u, v) in [(b.x, e.x), (b.y, e.y), (b.z, e.z)] {
                assert!((u - v).abs() <= 1e-9 * v.abs().max(1.0), "{u} vs {v}");
            }
        }

        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(pdir.join("fastdet_0_apo-ferritin.json")).unwrap()).unwrap();
        assert_eq!(doc["pickable_object_name"], "apo-ferritin");
        assert_eq!(doc["user_id"], "fastdet");
        assert_eq!(doc["session_id"], "0");
        assert_eq!(doc["run_name"], "TS_a");
        assert!(doc["voxel_spacing"].is_null());
        assert_eq!(doc["unit"], "angstrom");
        assert_eq!(doc["trust_orientation"], false);
        let pts = doc["points"].as_array().unwrap();
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0]["location"]["x"], 100.25);
        assert_eq!(pts[0]["instance_id"], 0);
        assert_eq!(pts[0]["score"], 0.5);
        assert_eq!(pts[0]["transformation_"][2][2], 1.0);
        assert_eq!(pts[0]["transformation_"][0][1], 0.0);
        let empty: serde_json::Value =
            serde_json::from_slice(&std::fs::read(pdir.join("fastdet_0_ribosome.json")).unwrap()).unwrap();
        assert_eq!(empty["points"].as_array().unwrap().len(), 0);

        assert!(write_run_picks(dir.path(), "../x", &picks, "u", "0").is_err());
    }
}
