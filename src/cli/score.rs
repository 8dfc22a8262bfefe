use anyhow::{bail, Context, Result};
use clap::Args;
use fastdet::io::dataset::Layout;
use fastdet::io::{copick, csv};
use fastdet::metric;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Match radius: 0.5 x particle radius (Å); beta 4; class weights 1,2,1,2,1,0.\nExample:\n  fastdet score --truth tests/fixtures/dataset --split test sub.csv\n  fastdet score --copick-config project.json sub.csv")]
pub struct ScoreArgs {
    /// Submission CSV (id,experiment,particle_type,[score,]x,y,z in Å)
    pub submission: PathBuf,
    /// Dataset root with copick picks under {split}/overlay/ExperimentRuns/{run}/Picks/
    #[arg(long, required_unless_present = "copick_config")]
    pub truth: Option<PathBuf>,
    /// Split holding the ground truth (the competition's labels are under train)
    #[arg(long, default_value = "train")]
    pub split: String,
    /// A copick project's configuration file (JSON) instead of --truth: the ground truth is the
    /// picks of user curation (or, in a project without them, the only user other than fastdet)
    /// in its overlay_root and static_root
    #[arg(long, value_name = "FILE", conflicts_with_all = ["truth", "split"])]
    pub copick_config: Option<PathBuf>,
    /// F-beta's beta
    #[arg(long, default_value_t = 4.0)]
    pub beta: f64,
    /// Print one JSON object (keys fbeta, per_class; per_run with --per-run)
    #[arg(long)]
    pub json: bool,
    /// Also score each run on its own: particles, picks, TP, FP, FN and the weighted F-beta over
    /// the classes annotated in that run (to find the tomograms that go wrong; picks of classes
    /// the run has no particle of count in its FP, not in its F-beta)
    #[arg(long)]
    pub per_run: bool,
    /// Score only these runs (comma-separated), e.g. the runs of one shard; by default every run
    /// with ground truth is scored, and one without picks counts all its particles as missed
    #[arg(long, value_delimiter = ',')]
    pub runs: Vec<String>,
}

pub fn score(a: ScoreArgs) -> Result<ExitCode> {
    if !(a.beta.is_finite() && a.beta > 0.0) {
        bail!("--beta {}: must be a positive number", a.beta);
    }
    let layout = Layout::from_flags(a.truth.as_deref(), &a.split, a.copick_config.as_deref())?.context("give --truth ROOT or --copick-config FILE")?;
    if let Some(root) = a.truth.as_ref().filter(|_| !layout.overlay_runs.is_dir()) {
        if let Some(hint) = layout.split_folder_hint() {
            bail!("{}: no ground truth there; {hint}", layout.overlay_runs.display());
        }
        // Name the splits that do hold ground truth (synth and the sample write `test`).
        let splits: Vec<String> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|s| Layout::split(root, s).overlay_runs.is_dir())
            .collect();
        if !splits.is_empty() {
            bail!(
                "{}: no ground truth for split {:?}; {} has it for {}: give --split",
                layout.overlay_runs.display(),
                a.split,
                root.display(),
                splits.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
            );
        }
    }
    // Where the truth is, for messages.
    let truth_at = match (&a.truth, &layout.config) {
        (Some(root), _) => format!("{} split {:?}", root.display(), a.split),
        (None, config) => format!("copick project {}", config.as_deref().unwrap_or(Path::new("")).display()),
    };
    let mut truth = copick::read_truth_to_score(&layout)?;
    // Runs that may hold ground truth (annotated or not).
    let known: std::collections::BTreeSet<String> = copick::truth_runs(&layout)?.into_iter().collect();
    let (mut sub, others) = csv::read_submission_of_known_types(&a.submission)?;
    if let Some(w) = csv::other_types_warning(&a.submission, &others) {
        fastdet::errln!("warning: {w}");
    }
    if !a.runs.is_empty() {
        let chosen: std::collections::BTreeSet<&str> = a.runs.iter().map(|r| r.trim()).collect();
        // A name the split does not have (a typo) would silently score fewer runs.
        if let Some(r) = chosen.iter().find(|r| !known.contains(**r)) {
            bail!("--runs: run {r:?} is not in {truth_at} ({})", layout.truth_folders());
        }
        truth.retain(|p| chosen.contains(p.run.as_str()));
        sub.retain(|p| chosen.contains(p.run.as_str()));
        if truth.is_empty() {
            bail!("--runs: none of {} has ground truth in {truth_at} ({})", a.runs.join(", "), layout.truth_folders());
        }
    }
    // Runs with particles but no picks: every particle counts as missed. Said, since it is the
    // usual result of scoring one shard's (or one run's) CSV against the whole split.
    let submitted: std::collections::BTreeSet<&str> = sub.iter().map(|p| p.run.as_str()).collect();
    let missing: std::collections::BTreeSet<&str> = truth.iter().map(|p| p.run.as_str()).filter(|r| !submitted.contains(r)).collect();
    warn_runs(&a.submission, &missing, "with ground truth have no picks, and all their particles count as missed", " (--runs scores a subset)");
    let unknown: std::collections::BTreeSet<&str> = sub.iter().map(|p| p.run.as_str()).filter(|r| !known.contains(*r)).collect();
    warn_runs(&a.submission, &unknown, &format!("have no ground truth under {truth_at} and are not scored"), "");
    // A run with a folder but no annotated particle is not scored either (the metric scores the
    // runs of the truth's points, as Kaggle's does): its picks would vanish unsaid.
    let annotated: std::collections::BTreeSet<&str> = truth.iter().map(|p| p.run.as_str()).collect();
    let unannotated: std::collections::BTreeSet<&str> = submitted.iter().copied().filter(|r| known.contains(*r) && !annotated.contains(r)).collect();
    warn_runs(&a.submission, &unannotated, &format!("have no annotated particle in {truth_at} and are not scored (their picks count neither way)"), "");
    let s = metric::score(&truth, &sub, a.beta);
    let per_run = a.per_run.then(|| metric::score_per_run(&truth, &sub, a.beta));
    if a.json {
        let mut v = serde_json::to_value(&s)?;
        if let Some(rows) = &per_run {
            v["per_run"] = serde_json::to_value(rows)?;
        }
        fastdet::outln!("{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        fastdet::outln!("{}", metric::format_table(&s))?;
        if let Some(rows) = &per_run {
            fastdet::outln!("{}", metric::format_run_table(rows))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// "warning: SUBMISSION: N run(s) WHAT: the first few AFTER", when there are any `runs`.
fn warn_runs(submission: &Path, runs: &std::collections::BTreeSet<&str>, what: &str, after: &str) {
    if !runs.is_empty() {
        fastdet::errln!("warning: {}: {} run(s) {what}: {}{after}", submission.display(), runs.len(), first_few(runs.iter().copied()));
    }
}

/// The first five run names, and "..." when there are more.
pub(crate) fn first_few<'a>(runs: impl ExactSizeIterator<Item = &'a str>) -> String {
    let more = runs.len() > 5;
    let list: Vec<&str> = runs.take(5).collect();
    format!("{}{}", list.join(", "), if more { ", ..." } else { "" })
}
