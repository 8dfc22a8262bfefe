//! The Kaggle CZII F-beta metric (beta = 4), reproducing the reference `fbeta` exactly, and a
//! per-class threshold tuner built on the same matching.
//!
//! Semantics (SPEC.md "Metric", reference `pipeline.py::fbeta`):
//! - runs are those present in the truth; candidates of other runs are ignored;
//! - per class and run, a reference point is matched when any candidate lies within
//!   `0.5 x radius` Å (distance `<=` r, like a KD-tree ball query);
//!   TP = distinct matched references, FP = candidates − TP, FN = references − TP;
//!   a run without references of the class adds all its candidates to FP;
//! - counts are summed over runs, F-beta is computed per class from the totals
//!   (p, r = 0 on empty denominators, F = 0 when p + r = 0), and the total is the mean weighted by
//!   the classes' metric weights.
//!
//! Matching uses a uniform grid with cells of one match radius, so each candidate looks at 27
//! cells instead of every reference: linear time in practice, which the threshold sweep needs.
use crate::particles::{Pick, CLASSES};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;

/// Fraction of the particle radius within which a candidate matches (Kaggle's `distance_multiplier`).
pub const DISTANCE_MULTIPLIER: f64 = 0.5;

/// The competition's beta: recall weighs 16 times as much as precision.
pub const BETA: f64 = 4.0;

/// Threshold kept for a class that has no candidates to tune on.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// One class's totals over all runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    pub name: String,
    pub tp: usize,
    /// Candidates − TP, signed as in the reference: it is negative when one candidate is within
    /// reach of two references (which real, non-overlapping particles never allow; precision is
    /// then above 1), and the F-beta follows it.
    pub fp: i64,
    #[serde(rename = "fn")]
    pub fn_: usize,
    pub precision: f64,
    pub recall: f64,
    pub fbeta: f64,
    pub weight: f64,
}

/// The weighted total and the per-class details, in class order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub fbeta: f64,
    pub per_class: Vec<ClassScore>,
}

/// Match radius of class `c` in Å.
fn match_radius(c: usize) -> f64 {
    CLASSES[c].radius_a * DISTANCE_MULTIPLIER
}

/// Uniform-grid index over one run's references of one class.
struct RefIndex {
    pts: Vec<[f64; 3]>,
    r2: f64,
    inv_cell: f64,
    cells: HashMap<[i64; 3], Vec<u32>>,
}

impl RefIndex {
    fn new(pts: Vec<[f64; 3]>, r: f64) -> Self {
        // Cells a little wider than the radius: everything within r of a point lies in the 3x3x3
        // block around its cell, also where rounding in `v * inv_cell` (or a squared distance
        // that rounds down to r²) would otherwise put a pair at distance r two cells apart.
        let inv_cell = 1.0 / (r.max(1e-9) * (1.0 + 1e-6));
        let mut cells: HashMap<[i64; 3], Vec<u32>> = HashMap::with_capacity(pts.len());
        for (i, p) in pts.iter().enumerate() {
            cells.entry(Self::key(p, inv_cell)).or_default().push(i as u32);
        }
        RefIndex { pts, r2: r * r, inv_cell, cells }
    }

    fn key(p: &[f64; 3], inv_cell: f64) -> [i64; 3] {
        p.map(|v| (v * inv_cell).floor() as i64)
    }

    /// Calls `f` with every reference within the radius of `q` (squared distance `<=` r², as
    /// scipy's ball query compares).
    fn for_each_within(&self, q: &[f64; 3], mut f: impl FnMut(usize)) {
        let k = Self::key(q, self.inv_cell);
        for dz in -1..=1 {
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let Some(ids) = self.cells.get(&[k[0] + dx, k[1] + dy, k[2] + dz]) else { continue };
                    for &i in ids {
                        let p = &self.pts[i as usize];
                        let d2 = (p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2) + (p[2] - q[2]).powi(2);
                        if d2 <= self.r2 {
                            f(i as usize);
                        }
                    }
                }
            }
        }
    }
}

/// Picks grouped as `[class][run] -> points`, runs numbered by their rank among the truth's runs.
struct Grouped<'a> {
    runs: HashMap<&'a str, usize>,
    refs: Vec<Vec<Vec<[f64; 3]>>>,
}

impl<'a> Grouped<'a> {
    fn from_truth(truth: &'a [Pick]) -> Self {
        let mut names: Vec<&str> = truth.iter().map(|p| p.run.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let runs: HashMap<&str, usize> = names.iter().enumerate().map(|(i, r)| (*r, i)).collect();
        let mut refs = vec![vec![Vec::new(); names.len()]; CLASSES.len()];
        for p in truth.iter().filter(|p| p.class < CLASSES.len()) {
            refs[p.class][runs[p.run.as_str()]].push([p.x, p.y, p.z]);
        }
        Grouped { runs, refs }
    }

    /// Run index of a candidate, `None` for a run the truth does not know or an invalid class.
    fn run_of(&self, p: &Pick) -> Option<usize> {
        if p.class >= CLASSES.len() {
            return None;
        }
        self.runs.get(p.run.as_str()).copied()
    }
}

/// Precision, recall and F-beta from signed totals, exactly as the reference computes them.
fn class_f(tp: i64, fp: i64, fn_: i64, beta: f64) -> (f64, f64, f64) {
    let p = if tp + fp != 0 { tp as f64 / (tp + fp) as f64 } else { 0.0 };
    let r = if tp + fn_ != 0 { tp as f64 / (tp + fn_) as f64 } else { 0.0 };
    let b2 = beta * beta;
    let f = if p + r > 0.0 { (1.0 + b2) * p * r / (b2 * p + r) } else { 0.0 };
    (p, r, f)
}

fn class_score(c: usize, tp: i64, fp: i64, fn_: i64, beta: f64) -> ClassScore {
    let (precision, recall, fbeta) = class_f(tp, fp, fn_, beta);
    ClassScore {
        name: CLASSES[c].name.to_string(),
        tp: tp as usize,
        fp,
        fn_: fn_ as usize,
        precision,
        recall,
        fbeta,
        weight: CLASSES[c].metric_weight,
    }
}

fn total(per_class: Vec<ClassScore>) -> Score {
    let wsum: f64 = per_class.iter().map(|c| c.weight).sum();
    let fbeta = if wsum > 0.0 { per_class.iter().map(|c| c.fbeta * c.weight).sum::<f64>() / wsum } else { 0.0 };
    Score { fbeta, per_class }
}

/// Scores a submission against the truth with the Kaggle CZII F-beta (`beta` = 4 in the competition).
/// Picks' scores are ignored: every candidate counts.
pub fn score(truth: &[Pick], submission: &[Pick], beta: f64) -> Score {
    let g = Grouped::from_truth(truth);
    let nruns = g.runs.len();
    let mut cands = vec![vec![Vec::new(); nruns]; CLASSES.len()];
    for p in submission {
        if let Some(run) = g.run_of(p) {
            cands[p.class][run].push([p.x, p.y, p.z]);
        }
    }
    let per_class = (0..CLASSES.len())
        .map(|c| {
            let (mut tp, mut fp, mut fn_) = (0i64, 0i64, 0i64);
            for (refs, cand) in g.refs[c].iter().zip(&cands[c]) {
                if refs.is_empty() {
                    fp += cand.len() as i64;
                    continue;
                }
                let index = RefIndex::new(refs.clone(), match_radius(c));
                let mut matched = vec![false; refs.len()];
                for q in cand {
                    index.for_each_within(q, |i| matched[i] = true);
                }
                let t = matched.iter().filter(|&&m| m).count() as i64;
                tp += t;
                fp += cand.len() as i64 - t;
                fn_ += refs.len() as i64 - t;
            }
            class_score(c, tp, fp, fn_, beta)
        })
        .collect();
    total(per_class)
}

/// Chooses per-class score thresholds that maximise the F-beta of `candidates` (picks from a
/// low-threshold detection run, with scores) against `truth`.
///
/// Classes are tuned independently, which is exact because the total is a weighted sum of per-class
/// scores. For each class the candidates (of runs in the truth) are swept in descending score order,
/// counting a reference as matched when the first candidate within reach arrives; F-beta is
/// evaluated after each group of equal scores, i.e. at each distinct score `t` with the candidates
/// `score >= t` kept. Ties go to the higher threshold (fewer picks for the same score). Any
/// threshold between that score and the next lower candidate's (or `floor`, the lowest score the
/// candidates were kept at) keeps the same picks; the midpoint is returned, as far from both as
/// the data allow, rather than the best group's own score, which on other tomograms would drop
/// every particle scored a hair lower (β = 4 counts recall most). A class whose candidates are all
/// false positives keeps none of them: its threshold lies halfway between the top score and 1.
/// A class with no candidates or
/// no annotated particle keeps [`DEFAULT_THRESHOLD`]: there is nothing to tune it on. Returns the
/// thresholds in class order and the score of `candidates` filtered by them.
pub fn tune_thresholds(truth: &[Pick], candidates: &[Pick], beta: f64, floor: f32) -> (Vec<f32>, Score) {
    tune_thresholds_above(truth, candidates, beta, &[floor; CLASSES.len()])
}

/// [`tune_thresholds`] with a floor per class: candidates kept at other thresholds per class (a
/// `run` output with its scores, made at the run's per-class thresholds).
pub fn tune_thresholds_above(truth: &[Pick], candidates: &[Pick], beta: f64, floors: &[f32; CLASSES.len()]) -> (Vec<f32>, Score) {
    let g = Grouped::from_truth(truth);
    let thresholds: Vec<f32> = (0..CLASSES.len())
        .map(|c| {
            let floor = floors[c];
            let indices: Vec<RefIndex> =
                g.refs[c].iter().map(|refs| RefIndex::new(refs.clone(), match_radius(c))).collect();
            let nrefs: usize = g.refs[c].iter().map(Vec::len).sum();
            let offsets: Vec<usize> = g.refs[c]
                .iter()
                .scan(0usize, |acc, r| {
                    let o = *acc;
                    *acc += r.len();
                    Some(o)
                })
                .collect();
            let mut cands: Vec<(f32, usize, [f64; 3])> = candidates
                .iter()
                .filter(|p| p.class == c && !p.score.is_nan())
                .filter_map(|p| g.run_of(p).map(|run| (p.score, run, [p.x, p.y, p.z])))
                .collect();
            // Never below the floor: candidates under it were not seen, and a run would keep them.
            if cands.is_empty() || nrefs == 0 {
                return DEFAULT_THRESHOLD.max(floor);
            }
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));

            let mut matched = vec![false; nrefs];
            // Keeping nothing is a choice too: it wins the ties of a class whose candidates are
            // all false positives (F = 0 either way, and fewer picks).
            let (mut tp, mut best_f, mut best_t, mut best_end) = (0i64, class_f(0, 0, nrefs as i64, beta).2, cands[0].0, None);
            for (n, &(s, run, q)) in cands.iter().enumerate() {
                indices[run].for_each_within(&q, |i| {
                    let m = &mut matched[offsets[run] + i];
                    if !*m {
                        *m = true;
                        tp += 1;
                    }
                });
                let group_ends = cands.get(n + 1).is_none_or(|next| next.0 != s);
                if group_ends {
                    let kept = n as i64 + 1;
                    let (_, _, f) = class_f(tp, kept - tp, nrefs as i64 - tp, beta);
                    if f > best_f {
                        (best_f, best_t, best_end) = (f, s, Some(n));
                    }
                }
            }
            let Some(best_end) = best_end else {
                // Above the top candidate (a probability is at most 1).
                return midpoint_above(cands[0].0, 1.0);
            };
            let below = cands.get(best_end + 1).map_or(floor.min(best_t), |c| c.0);
            midpoint_above(below, best_t)
        })
        .collect();
    let kept: Vec<Pick> =
        candidates.iter().filter(|p| p.class < CLASSES.len() && p.score >= thresholds[p.class]).cloned().collect();
    let s = score(truth, &kept, beta);
    (thresholds, s)
}

/// The f32 halfway between `below` and `top` that is still above `below` (a threshold `>=` keeps
/// `top` and drops `below`); `top` itself when they are adjacent floats.
fn midpoint_above(below: f32, top: f32) -> f32 {
    let mid = ((below as f64 + top as f64) / 2.0) as f32;
    if mid > below && mid <= top {
        mid
    } else {
        top
    }
}

/// One run scored on its own (`fastdet score --per-run`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunScore {
    pub run: String,
    /// Annotated particles and picks of the run (every class).
    pub particles: usize,
    pub picks: usize,
    pub tp: usize,
    pub fp: i64,
    #[serde(rename = "fn")]
    pub fn_: usize,
    /// The weighted F-beta over the classes annotated in this run (a run without some class would
    /// otherwise score 0 for it); `None` when none of them has a weight.
    pub fbeta: Option<f64>,
}

/// Each annotated run of `truth` scored alone, in name order; picks of other runs are left out.
pub fn score_per_run(truth: &[Pick], submission: &[Pick], beta: f64) -> Vec<RunScore> {
    let mut runs: Vec<&str> = truth.iter().map(|p| p.run.as_str()).collect();
    runs.sort_unstable();
    runs.dedup();
    runs.into_iter()
        .map(|run| {
            let t: Vec<Pick> = truth.iter().filter(|p| p.run == run).cloned().collect();
            let sub: Vec<Pick> = submission.iter().filter(|p| p.run == run && p.class < CLASSES.len()).cloned().collect();
            let s = score(&t, &sub, beta);
            let annotated: Vec<&ClassScore> = s.per_class.iter().filter(|c| c.tp + c.fn_ > 0 && c.weight > 0.0).collect();
            let wsum: f64 = annotated.iter().map(|c| c.weight).sum();
            RunScore {
                run: run.to_string(),
                particles: t.len(),
                picks: sub.len(),
                tp: s.per_class.iter().map(|c| c.tp).sum(),
                fp: s.per_class.iter().map(|c| c.fp).sum(),
                fn_: s.per_class.iter().map(|c| c.fn_).sum(),
                fbeta: (wsum > 0.0).then(|| annotated.iter().map(|c| c.fbeta * c.weight).sum::<f64>() / wsum),
            }
        })
        .collect()
}

/// A fixed-width table of [`score_per_run`]'s rows.
pub fn format_run_table(rows: &[RunScore]) -> String {
    let width = rows.iter().map(|r| r.run.len()).max().unwrap_or(0).max(3);
    let mut s = String::new();
    let _ = writeln!(s, "{:<width$} {:>9} {:>7} {:>7} {:>7} {:>7} {:>9}", "run", "particles", "picks", "TP", "FP", "FN", "F-beta");
    for r in rows {
        let f = r.fbeta.map_or_else(|| "-".to_string(), |f| format!("{f:.4}"));
        let _ = writeln!(s, "{:<width$} {:>9} {:>7} {:>7} {:>7} {:>7} {:>9}", r.run, r.particles, r.picks, r.tp, r.fp, r.fn_, f);
    }
    s
}

/// A fixed-width per-class table (name, weight, TP, FP, FN, precision, recall, F-beta) and the
/// weighted total, for logs and the CLI.
pub fn format_table(score: &Score) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<20} {:>6} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9}",
        "class", "weight", "TP", "FP", "FN", "precision", "recall", "F-beta"
    );
    for c in &score.per_class {
        let _ = writeln!(
            s,
            "{:<20} {:>6.1} {:>7} {:>7} {:>7} {:>9.4} {:>9.4} {:>9.4}",
            c.name, c.weight, c.tp, c.fp, c.fn_, c.precision, c.recall, c.fbeta
        );
    }
    let _ = writeln!(
        s,
        "{:<20} {:>6.1} {:>53.6}",
        "total (weighted)",
        score.per_class.iter().map(|c| c.weight).sum::<f64>(),
        score.fbeta
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn pk(run: &str, class: usize, score: f32, x: f64, y: f64, z: f64) -> Pick {
        Pick { run: run.into(), class, score, x, y, z }
    }
    fn at(run: &str, class: usize, x: f64, y: f64, z: f64) -> Pick {
        pk(run, class, 1.0, x, y, z)
    }
    fn counts(s: &Score, c: usize) -> (usize, i64, usize) {
        (s.per_class[c].tp, s.per_class[c].fp, s.per_class[c].fn_)
    }
    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// A small truth with every class in two runs, particles well apart.
    fn truth_all() -> Vec<Pick> {
        let mut t = Vec::new();
        for (ri, run) in ["TS_a", "TS_b"].iter().enumerate() {
            for c in 0..6 {
                for k in 0..3 {
                    t.push(at(run, c, 1000.0 * c as f64 + 400.0 * k as f64, 500.0 * ri as f64, 77.0));
                }
            }
        }
        t
    }

    #[test]
    fn runs_scored_alone_sum_to_the_whole() {
        // TS_a: a ribosome found, a thyroglobulin missed, one stray beta-galactosidase pick.
        // TS_b: only apo-ferritin, found twice over (one true, one false positive). A pick of
        // another run is left out.
        let truth = vec![at("TS_a", 2, 0.0, 0.0, 0.0), at("TS_a", 3, 500.0, 0.0, 0.0), at("TS_b", 0, 0.0, 0.0, 0.0)];
        let sub = vec![at("TS_a", 2, 10.0, 0.0, 0.0), at("TS_a", 1, 900.0, 0.0, 0.0), at("TS_b", 0, 5.0, 0.0, 0.0), at("TS_b", 0, 400.0, 0.0, 0.0), at("TS_z", 0, 0.0, 0.0, 0.0)];
        let rows = score_per_run(&truth, &sub, BETA);
        assert_eq!(rows.iter().map(|r| r.run.as_str()).collect::<Vec<_>>(), ["TS_a", "TS_b"]);
        let a = &rows[0];
        assert_eq!((a.particles, a.picks, a.tp, a.fp, a.fn_), (2, 2, 1, 1, 1));
        // Over its annotated classes: ribosome (weight 1) F = 1, thyroglobulin (weight 2) F = 0.
        assert!((a.fbeta.unwrap() - 1.0 / 3.0).abs() < 1e-12, "{a:?}");
        let b = &rows[1];
        assert_eq!((b.particles, b.picks, b.tp, b.fp, b.fn_), (1, 2, 1, 1, 0));
        let (_, _, f) = class_f(1, 1, 0, BETA);
        assert!((b.fbeta.unwrap() - f).abs() < 1e-12, "{b:?}");
        // The counts add up to the whole's.
        let whole = score(&truth, &sub, BETA);
        let sum = |f: fn(&ClassScore) -> i64| whole.per_class.iter().map(f).sum::<i64>();
        assert_eq!(rows.iter().map(|r| r.tp as i64).sum::<i64>(), sum(|c| c.tp as i64));
        assert_eq!(rows.iter().map(|r| r.fp).sum::<i64>(), sum(|c| c.fp));
        assert_eq!(rows.iter().map(|r| r.fn_ as i64).sum::<i64>(), sum(|c| c.fn_ as i64));
        // Only beta-amylase (weight 0) annotated: no F-beta to give.
        let rows = score_per_run(&[at("TS_c", 5, 0.0, 0.0, 0.0)], &[], BETA);
        assert_eq!(rows[0].fbeta, None);
        assert!(format_run_table(&rows).lines().nth(1).unwrap().trim_end().ends_with('-'));
    }

    #[test]
    fn perfect_match_is_one() {
        let t = truth_all();
        let s = score(&t, &t, BETA);
        assert_eq!(s.fbeta, 1.0);
        for (c, cs) in s.per_class.iter().enumerate() {
            assert_eq!((cs.name.as_str(), cs.weight), (CLASSES[c].name, CLASSES[c].metric_weight));
            assert_eq!(counts(&s, c), (6, 0, 0));
            assert_eq!((cs.precision, cs.recall, cs.fbeta), (1.0, 1.0, 1.0));
        }
        // Empty submission: nothing found, every class 0.
        let s = score(&t, &[], BETA);
        assert_eq!(s.fbeta, 0.0);
        assert_eq!(counts(&s, 2), (0, 0, 6));
    }

    #[test]
    fn duplicate_candidates_on_one_particle() {
        let t = vec![at("r", 0, 100.0, 100.0, 100.0)];
        let sub = vec![at("r", 0, 101.0, 100.0, 100.0), at("r", 0, 100.0, 95.0, 103.0)];
        let s = score(&t, &sub, BETA);
        assert_eq!(counts(&s, 0), (1, 1, 0));
        let c = &s.per_class[0];
        assert_eq!((c.precision, c.recall), (0.5, 1.0));
        // (1 + 16) * 0.5 * 1 / (16 * 0.5 + 1) = 8.5 / 9
        assert!(close(c.fbeta, 8.5 / 9.0), "{}", c.fbeta);
        assert!(close(s.fbeta, 8.5 / 9.0 / 7.0));
    }

    #[test]
    fn run_without_truth_for_a_class_and_unknown_runs() {
        // Run A has a ribosome, run B only an apo-ferritin.
        let t = vec![at("A", 2, 0.0, 0.0, 0.0), at("B", 0, 500.0, 500.0, 500.0)];
        let sub = vec![
            at("A", 2, 10.0, 0.0, 0.0),      // TP
            at("B", 2, 0.0, 0.0, 0.0),       // FP: B has no ribosome truth
            at("B", 2, 900.0, 0.0, 0.0),     // FP
            at("C", 2, 0.0, 0.0, 0.0),       // ignored: run C is not in the truth
            at("C", 0, 500.0, 500.0, 500.0), // ignored
            at("B", 0, 500.0, 500.0, 530.0), // TP (exactly at apo-ferritin's 30 Å)
        ];
        let s = score(&t, &sub, BETA);
        assert_eq!(counts(&s, 2), (1, 2, 0));
        assert_eq!(counts(&s, 0), (1, 0, 0));
        let f_ribo = 17.0 * (1.0 / 3.0) / (16.0 / 3.0 + 1.0);
        assert!(close(s.per_class[2].fbeta, f_ribo));
        // A class with no truth and no candidates anywhere scores 0 (p = r = 0).
        assert_eq!(counts(&s, 4), (0, 0, 0));
        assert_eq!(s.per_class[4].fbeta, 0.0);
        assert!(close(s.fbeta, (1.0 + f_ribo) / 7.0));
    }

    #[test]
    fn radius_boundary_is_inclusive() {
        // apo-ferritin: radius 60 Å, match radius 30 Å. 18² + 24² = 30² exactly.
        let t = vec![at("r", 0, 1000.0, 1000.0, 1000.0)];
        let on = score(&t, &[at("r", 0, 1018.0, 1024.0, 1000.0)], BETA);
        assert_eq!(counts(&on, 0), (1, 0, 0));
        let inside = score(&t, &[at("r", 0, 1000.0, 1000.0, 1029.999)], BETA);
        assert_eq!(counts(&inside, 0), (1, 0, 0));
        let outside = score(&t, &[at("r", 0, 1000.0, 1000.0, 1030.001)], BETA);
        assert_eq!(counts(&outside, 0), (0, 1, 1));
        // Ribosome (radius 150): 74.9 Å matches, 75.1 Å does not; cells of other sizes are not mixed up.
        let t = vec![at("r", 2, -5.0, -5.0, -5.0)];
        assert_eq!(counts(&score(&t, &[at("r", 2, 69.9, -5.0, -5.0)], BETA), 2), (1, 0, 0));
        assert_eq!(counts(&score(&t, &[at("r", 2, -80.1, -5.0, -5.0)], BETA), 2), (0, 1, 1));
        // Wrong class at the right place: not a match.
        assert_eq!(counts(&score(&t, &[at("r", 1, -5.0, -5.0, -5.0)], BETA), 2), (0, 0, 1));
    }

    #[test]
    fn radius_boundary_across_a_cell_edge() {
        // A pair at the match radius (30 Å) whose coordinates fall on either side of a cell edge:
        // scipy matches it (d² rounds to 900), so must the grid.
        let t = vec![at("r", 0, 30.0, 0.0, 0.0)];
        let s = score(&t, &[at("r", 0, -1e-15, 0.0, 0.0)], BETA);
        assert_eq!(counts(&s, 0), (1, 0, 0));
        let s = score(&t, &[at("r", 0, -1e-9, 0.0, 0.0)], BETA);
        assert_eq!(counts(&s, 0), (0, 1, 1));
    }

    #[test]
    fn weighted_total() {
        let mut t = Vec::new();
        let mut sub = Vec::new();
        t.push(at("r", 0, 0.0, 0.0, 0.0)); // apo-ferritin (w1): perfect
        sub.push(at("r", 0, 0.0, 0.0, 0.0));
        t.push(at("r", 1, 1000.0, 0.0, 0.0)); // beta-galactosidase (w2): duplicate → 8.5/9
        sub.push(at("r", 1, 1000.0, 0.0, 0.0));
        sub.push(at("r", 1, 1001.0, 0.0, 0.0));
        t.push(at("r", 3, 2000.0, 0.0, 0.0)); // thyroglobulin (w2): missed → 0
        t.push(at("r", 5, 3000.0, 0.0, 0.0)); // beta-amylase (w0): perfect but weightless
        sub.push(at("r", 5, 3000.0, 0.0, 0.0));
        let s = score(&t, &sub, BETA);
        let want = (1.0 + 2.0 * 8.5 / 9.0 + 2.0 * 0.0) / 7.0;
        assert!(close(s.fbeta, want), "{} vs {want}", s.fbeta);
        assert_eq!(s.per_class[5].fbeta, 1.0);
        // beta = 1 is the plain F1: beta-galactosidase 2 * 0.5 * 1 / 1.5.
        let s1 = score(&t, &sub, 1.0);
        assert!(close(s1.per_class[1].fbeta, 2.0 / 3.0));
    }

    #[test]
    fn one_candidate_reaching_two_references_follows_the_reference() {
        // Two apo-ferritin references 20 Å apart; one candidate between them matches both, so the
        // reference gets TP 2, FP −1, precision 2 and F = 17*2/(32+1). Real particles never overlap so.
        let t = vec![at("r", 0, 0.0, 0.0, 0.0), at("r", 0, 20.0, 0.0, 0.0)];
        let s = score(&t, &[at("r", 0, 10.0, 0.0, 0.0)], BETA);
        // The FP is shown signed, so precision 2 = tp / (tp + fp) reads off the table.
        assert_eq!(counts(&s, 0), (2, -1, 0));
        assert_eq!(s.per_class[0].precision, 2.0);
        assert!(close(s.per_class[0].fbeta, 34.0 / 33.0));
        assert!(format_table(&s).lines().any(|l| l.starts_with("apo-ferritin") && l.contains(" -1 ")), "{}", format_table(&s));
    }

    #[test]
    fn tune_drops_a_low_score_false_positive() {
        let t = vec![at("r", 0, 0.0, 0.0, 0.0), at("r", 0, 500.0, 0.0, 0.0)];
        let cands = vec![
            pk("r", 0, 0.9, 1.0, 0.0, 0.0),
            pk("r", 0, 0.8, 501.0, 0.0, 0.0),
            pk("r", 0, 0.3, 900.0, 0.0, 0.0), // FP, lowest score
        ];
        let (th, s) = tune_thresholds(&t, &cands, BETA, 0.05);
        // Halfway between the last kept score and the FP's.
        assert_eq!(th[0], 0.55);
        assert_eq!(counts(&s, 0), (2, 0, 0));
        assert_eq!(s.per_class[0].fbeta, 1.0);
        // Classes without candidates keep the default.
        assert_eq!(&th[1..], &[0.5; 5]);
        assert!(close(s.fbeta, 1.0 / 7.0));
    }

    #[test]
    fn tune_weighs_recall_over_precision() {
        // Two references; scores: TP 0.9, FP 0.6, FP 0.5, TP 0.4.
        // t = 0.9: p 1, r 0.5 → 8.5/16.5 = 0.515; t = 0.4: p 0.5, r 1 → 8.5/9 = 0.944: keep all.
        let t = vec![at("r", 3, 0.0, 0.0, 0.0), at("r", 3, 1000.0, 0.0, 0.0)];
        let cands = vec![
            pk("r", 3, 0.6, 3000.0, 0.0, 0.0),
            pk("r", 3, 0.9, 0.0, 10.0, 0.0),
            pk("r", 3, 0.4, 1000.0, 0.0, 10.0),
            pk("r", 3, 0.5, 5000.0, 0.0, 0.0),
        ];
        let (th, s) = tune_thresholds(&t, &cands, BETA, 0.1);
        // Every candidate kept: halfway down to the floor they were kept at.
        assert_eq!(th[3], 0.25);
        assert!(close(s.per_class[3].fbeta, 8.5 / 9.0));
        // With beta = 0.25 precision dominates: 0.9 alone wins, halfway down to 0.6.
        let (th, _) = tune_thresholds(&t, &cands, 0.25, 0.1);
        assert_eq!(th[3], 0.75);
    }

    #[test]
    fn tune_ties_and_classes_without_truth() {
        // Ribosome candidates but no ribosome truth: F is 0 at every threshold → the highest.
        // A duplicate after the match adds only an FP, equal scores are one group.
        let t = vec![at("r", 0, 0.0, 0.0, 0.0)];
        let cands = vec![
            pk("r", 2, 0.4, 0.0, 0.0, 0.0),
            pk("r", 2, 0.7, 0.0, 0.0, 0.0),
            pk("r", 0, 0.6, 0.0, 0.0, 0.0),
            pk("r", 0, 0.6, 900.0, 0.0, 0.0), // same score as the TP: kept together
            pk("r", 0, 0.2, 1.0, 0.0, 0.0),
            pk("zz", 1, 0.9, 0.0, 0.0, 0.0), // run not in truth: beta-galactosidase has no candidates
        ];
        let (th, s) = tune_thresholds(&t, &cands, BETA, 0.05);
        // Ribosome has no truth to tune on: the default.
        assert_eq!(th, vec![0.4, 0.5, 0.5, 0.5, 0.5, 0.5]);
        assert_eq!(counts(&s, 0), (1, 1, 0));
        assert_eq!(counts(&s, 2), (0, 1, 0));
        // Above the default floor, a class with nothing to tune on keeps the floor.
        let (th, _) = tune_thresholds(&t, &[], BETA, 0.65);
        assert_eq!(th, vec![0.65; 6]);
        // Adjacent floats: no float between them, the kept score itself.
        let next = f32::from_bits(0.6f32.to_bits() - 1);
        assert_eq!(midpoint_above(next, 0.6), 0.6);
        assert_eq!(midpoint_above(0.2, 0.6), 0.4);
    }

    /// A class whose candidates are all false positives keeps none: F is 0 either way, and the
    /// tie goes to fewer picks.
    #[test]
    fn tune_keeps_nothing_when_every_candidate_is_wrong() {
        let t = vec![at("r", 2, 0.0, 0.0, 0.0), at("r", 0, 0.0, 0.0, 0.0)];
        let cands = vec![pk("r", 2, 0.9, 5000.0, 0.0, 0.0), pk("r", 2, 0.4, 9000.0, 0.0, 0.0), pk("r", 0, 0.6, 0.0, 0.0, 0.0)];
        let (th, s) = tune_thresholds(&t, &cands, BETA, 0.05);
        assert_eq!(th[2], 0.95);
        assert_eq!(counts(&s, 2), (0, 0, 1));
        assert_eq!(th[0], midpoint_above(0.05, 0.6));
        // A top score of 1 cannot be dropped by a probability threshold: it stays.
        let (th, _) = tune_thresholds(&t, &[pk("r", 2, 1.0, 5000.0, 0.0, 0.0)], BETA, 0.05);
        assert_eq!(th[2], 1.0);
    }

    /// Small deterministic generator for randomized cross-checks.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn random_case(seed: u64) -> (Vec<Pick>, Vec<Pick>) {
        let mut g = Lcg(seed);
        let runs = ["A", "B", "C"];
        let mut truth = Vec::new();
        let mut cands = Vec::new();
        for _ in 0..150 {
            let run = runs[(g.next() * 2.0) as usize]; // truth only in A and B
            let c = (g.next() * 6.0) as usize;
            let p = [g.next() * 2000.0, g.next() * 2000.0, g.next() * 600.0];
            truth.push(at(run, c, p[0], p[1], p[2]));
            // Noisy detections near some particles, sometimes twice.
            for _ in 0..(g.next() * 3.0) as usize {
                let j = CLASSES[c].radius_a * 0.4;
                let q = p.map(|v| v + (g.next() - 0.5) * 2.0 * j);
                cands.push(pk(run, c, (g.next() * 20.0).round() as f32 / 20.0, q[0], q[1], q[2]));
            }
        }
        for _ in 0..200 {
            let run = runs[(g.next() * 3.0) as usize];
            let c = (g.next() * 6.0) as usize;
            let q = [g.next() * 2000.0, g.next() * 2000.0, g.next() * 600.0];
            cands.push(pk(run, c, (g.next() * 20.0).round() as f32 / 20.0, q[0], q[1], q[2]));
        }
        (truth, cands)
    }

    /// The reference algorithm, brute force.
    fn brute(truth: &[Pick], sub: &[Pick], c: usize) -> (i64, i64, i64) {
        let mut runs: Vec<&str> = truth.iter().map(|p| p.run.as_str()).collect();
        runs.sort();
        runs.dedup();
        let r2 = match_radius(c).powi(2);
        let (mut tp, mut fp, mut fn_) = (0, 0, 0);
        for run in runs {
            let refs: Vec<&Pick> = truth.iter().filter(|p| p.run == run && p.class == c).collect();
            let cand: Vec<&Pick> = sub.iter().filter(|p| p.run == run && p.class == c).collect();
            let t = refs
                .iter()
                .filter(|r| cand.iter().any(|q| (r.x - q.x).powi(2) + (r.y - q.y).powi(2) + (r.z - q.z).powi(2) <= r2))
                .count() as i64;
            tp += t;
            fp += cand.len() as i64 - t;
            fn_ += refs.len() as i64 - t;
        }
        (tp, fp, fn_)
    }

    #[test]
    fn grid_matching_agrees_with_brute_force() {
        for seed in 1..6 {
            let (truth, cands) = random_case(seed);
            let s = score(&truth, &cands, BETA);
            for c in 0..6 {
                let (tp, fp, fn_) = brute(&truth, &cands, c);
                assert_eq!(counts(&s, c), (tp as usize, fp, fn_ as usize), "seed {seed} class {c}");
                assert_eq!(s.per_class[c].fbeta, class_f(tp, fp, fn_, BETA).2);
            }
        }
    }

    #[test]
    fn tune_agrees_with_exhaustive_search() {
        for seed in 10..14 {
            let (truth, cands) = random_case(seed);
            let (th, s) = tune_thresholds(&truth, &cands, BETA, 0.0);
            for (c, &th_c) in th.iter().enumerate() {
                let mut ts: Vec<f32> = cands.iter().filter(|p| p.class == c && p.run != "C").map(|p| p.score).collect();
                ts.sort_by(|a, b| b.total_cmp(a));
                ts.dedup();
                // Keeping nothing first: F 0, and it wins ties.
                let mut best = (0.0, f32::INFINITY);
                for &t in &ts {
                    let kept: Vec<Pick> = cands.iter().filter(|p| p.class == c && p.score >= t).cloned().collect();
                    let (tp, fp, fn_) = brute(&truth, &kept, c);
                    let f = class_f(tp, fp, fn_, BETA).2;
                    if f > best.0 {
                        best = (f, t);
                    }
                }
                // The midpoint down to the next lower score (or the floor, 0 here); the default
                // for a class without truth; above the top score when nothing is worth keeping.
                let expected = if truth.iter().all(|p| p.class != c) || ts.is_empty() {
                    DEFAULT_THRESHOLD
                } else if best.1 == f32::INFINITY {
                    midpoint_above(ts[0], 1.0)
                } else {
                    let below = ts.iter().copied().find(|&t| t < best.1).unwrap_or(0.0);
                    midpoint_above(below, best.1)
                };
                assert_eq!(th_c, expected, "seed {seed} class {c}");
                if truth.iter().any(|p| p.class == c) && !ts.is_empty() {
                    assert_eq!(s.per_class[c].fbeta, best.0, "seed {seed} class {c}");
                }
            }
        }
    }

    #[test]
    fn fixture_submission_scores_as_reference() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let truth = crate::io::copick::read_truth(&crate::io::dataset::Layout::split(&root.join("dataset"), "test")).unwrap();
        let sub = crate::io::csv::read_submission(&root.join("pipeline/expected_submission.csv")).unwrap();
        let s = score(&truth, &sub, BETA);
        assert!((s.fbeta - 0.9979102203210861).abs() < 1e-9, "{}", s.fbeta);
        let want = [
            ("apo-ferritin", 0.9970674486803519),
            ("beta-galactosidase", 1.0),
            ("ribosome", 1.0),
            ("thyroglobulin", 0.9941520467836257),
            ("virus-like-particle", 1.0),
            ("beta-amylase", 1.0),
        ];
        for (cs, (name, f)) in s.per_class.iter().zip(want) {
            assert_eq!(cs.name, name);
            assert!((cs.fbeta - f).abs() < 1e-12, "{name}: {}", cs.fbeta);
        }
        assert_eq!(s.per_class.iter().map(|c| c.tp as i64 + c.fp).sum::<i64>(), 64);
        // Tuning on the submission itself can only do as well or better.
        let (_, tuned) = tune_thresholds(&truth, &sub, BETA, 0.0);
        assert!(tuned.fbeta >= s.fbeta - 1e-12);
    }

    #[test]
    fn table_and_json() {
        let t = truth_all();
        let s = score(&t, &t[1..], BETA);
        let table = format_table(&s);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 8);
        assert!(lines[0].starts_with("class") && lines[0].contains("F-beta"));
        assert!(lines[1].starts_with("apo-ferritin") && lines[1].contains("0.8333"), "{}", lines[1]);
        assert!(lines[7].starts_with("total (weighted)") && lines[7].ends_with(&format!("{:.6}", s.fbeta)));
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["fbeta"], s.fbeta);
        assert_eq!(v["per_class"][0]["name"], "apo-ferritin");
        assert_eq!(v["per_class"][0]["tp"], 5);
        assert_eq!(v["per_class"][0]["fn"], 1);
        assert_eq!(v["per_class"].as_array().unwrap().len(), 6);
    }
}
