use anyhow::{bail, Context, Result};
use clap::Args;
use fastdet::io::csv;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Rows are ordered by run name (each run's rows keep their order) and renumbered, so merging the\n\
outputs of `run --shard K/N` for K = 0..N-1 gives the same file as one unsharded run.\n\
copick outputs of shards that wrote to separate folders are joined with --copick DIR... --copick-out DIR\n\
(shards may also all write into one --copick-out folder: one file per run and particle).\n\
Inputs that `fastdet run` made with other weights or settings than most (their OUT.runs/settings.json) are warned about,\n\
and so are an input that is not the file its job wrote (OUT.runs/out.json: a later job on it failed or was stopped, or it\n\
was changed since) or whose job had runs fail, and a shard K/N none of the inputs is (OUT.runs/shard.json): the merged\n\
file is written, and the exit status is 2. The merged file of one whole job gets that job's record (OUT.runs/), which\n\
`tune --picks` reads.\n\
Example:\n  fastdet merge shards/sub_*.csv -o submission.csv --copick shards/copick_* --copick-out copick")]
pub struct MergeArgs {
    /// Shard CSVs (Kaggle layout, with or without a score column)
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Merged CSV
    #[arg(short, long)]
    pub out: PathBuf,
    /// copick output folders of the shards (each holding ExperimentRuns/{run}/Picks/*.json)
    #[arg(long, num_args = 1.., requires = "copick_out")]
    pub copick: Vec<PathBuf>,
    /// Folder receiving every shard's copick picks
    #[arg(long, requires = "copick")]
    pub copick_out: Option<PathBuf>,
}

/// Every `ExperimentRuns/{run}/Picks/*.json` of `src`, as (path under the output folder, bytes).
fn copick_files(src: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let runs = src.join("ExperimentRuns");
    let entries = std::fs::read_dir(&runs).with_context(|| format!("{}: not a copick output folder", runs.display()))?;
    let mut out = Vec::new();
    for run in entries {
        let run = run?.path();
        let Ok(files) = std::fs::read_dir(run.join("Picks")) else { continue };
        let to = Path::new("ExperimentRuns").join(run.file_name().unwrap()).join("Picks");
        for f in files {
            let f = f?.path();
            if f.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = std::fs::read(&f).with_context(|| format!("{}: cannot read", f.display()))?;
            out.push((to.join(f.file_name().unwrap()), bytes));
        }
    }
    Ok(out)
}

/// Reads every shard's copick picks and checks them against each other and against what `dst`
/// holds already (a file of one run and particle with two contents is a conflict between
/// shards) before anything is written; returns the files to write.
fn plan_copick(srcs: &[PathBuf], dst: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut planned: std::collections::BTreeMap<PathBuf, (Vec<u8>, PathBuf)> = Default::default();
    if let Some((j, i)) = given_twice(srcs) {
        bail!("{}: given twice to --copick (as argument {} and {})", srcs[i].display(), j + 1, i + 1);
    }
    for src in srcs {
        for (rel, bytes) in copick_files(src)? {
            let from = src.join(&rel);
            if let Some((other, other_src)) = planned.get(&rel) {
                if *other != bytes {
                    bail!("{}: conflicts with {} (two shards wrote the same run and particle)", from.display(), other_src.join(&rel).display());
                }
                continue;
            }
            planned.insert(rel, (bytes, src.clone()));
        }
    }
    let mut writes = Vec::new();
    for (rel, (bytes, src)) in planned {
        let target = dst.join(&rel);
        match std::fs::read(&target) {
            Ok(existing) if existing == bytes => {}
            Ok(_) => bail!(
                "{}: already holds other picks than {} (from an earlier merge?); remove it, or give another --copick-out",
                target.display(),
                src.join(&rel).display()
            ),
            Err(_) => writes.push((target, bytes)),
        }
    }
    Ok(writes)
}

/// The first input given twice (the same file under two names too), as `(earlier, later)`
/// indices: merging it would count its runs twice, averaging it would weigh it double.
pub(crate) fn given_twice(inputs: &[PathBuf]) -> Option<(usize, usize)> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    };
    (0..inputs.len()).find_map(|i| inputs[..i].iter().position(|q| same(q, &inputs[i])).map(|j| (j, i)))
}

/// Inputs written by `fastdet run` whose weights or settings differ from those most such inputs share,
/// from the `settings.json` each job left in its runs folder: shards of one job share them, and
/// a shard run with other thresholds or models would pass unseen in the merged file. (Where the
/// tomograms come from may differ: merging jobs on different datasets is fine.)
fn settings_differences(inputs: &[PathBuf]) -> Vec<(String, bool)> {
    let settings = |p: &Path| -> Option<serde_json::Map<String, serde_json::Value>> {
        let dir = super::run::runs_folder(p).ok()?;
        let mut m: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(dir.join("settings.json")).ok()?).ok()?;
        m.remove("inputs");
        Some(m)
    };
    let known: Vec<(&PathBuf, serde_json::Map<String, serde_json::Value>)> = inputs.iter().filter_map(|p| Some((p, settings(p)?))).collect();
    // Compared with the settings most inputs share (the first input's on a tie), so that the odd
    // shard is the one named.
    let alike = |m: &serde_json::Map<String, serde_json::Value>| known.iter().filter(|(_, o)| o == m).count();
    let Some((first, base)) = known.iter().max_by_key(|(p, m)| (alike(m), std::cmp::Reverse(inputs.iter().position(|q| q == *p)))) else {
        return Vec::new();
    };
    known
        .iter()
        .filter(|(_, m)| m != base)
        .map(|(p, m)| {
            let keys: Vec<&str> = super::run::changed_settings(base, m).into_iter().map(|k| if k == "weights_sha256" { "weights" } else { k }).collect();
            // A job array over GPU and CPU nodes: the same job, computed in fp16 or in f32.
            if keys == ["precision"] {
                let line = format!("{} was computed on another kind of device than {} (fp16 on a GPU, f32 on the CPU): its picks may differ slightly from what that device gives", p.display(), first.display());
                return (line, false);
            }
            let line = format!(
                "{} was made with other weights or settings than {} (differ: {}): its picks are not those of the same job",
                p.display(),
                first.display(),
                keys.join(", ")
            );
            (line, true)
        })
        .collect()
}

/// Inputs beside a record of `fastdet run` (`OUT.runs/settings.json`) that are not the file that
/// job wrote (its `out.json` missing: the job that last wrote the record failed or was stopped,
/// and the file is an earlier job's, or an older fastdet wrote it; or naming other bytes: the file
/// was changed or replaced since), and inputs whose job had runs fail. Inputs without a record
/// are not judged. `bytes` are the inputs' contents, as read for the merge.
fn not_whole_job_outputs(inputs: &[PathBuf], bytes: &[Vec<u8>]) -> Vec<String> {
    let mut lines = Vec::new();
    for (p, b) in inputs.iter().zip(bytes) {
        let dir = super::run::runs_folder(p).map(|d| d.display().to_string()).unwrap_or_default();
        match super::run::output_record(p, b) {
            super::run::OutputRecord::None => {}
            super::run::OutputRecord::Stale { changed: false } => lines.push(format!(
                "{} is not the output of the job recorded in {dir} (that job failed or was stopped, so the file is an earlier job's; or an older fastdet wrote it): run that shard again",
                p.display()
            )),
            super::run::OutputRecord::Stale { changed: true } => {
                lines.push(format!("{} is not the file its job wrote (changed or replaced since; {dir} holds the checksum of the file written)", p.display()))
            }
            super::run::OutputRecord::Valid { failed, .. } if !failed.is_empty() => lines.push(format!(
                "{} lacks the runs its job failed on: {} (run them again with --resume, or on their own with --runs)",
                p.display(),
                failed.join(", ")
            )),
            super::run::OutputRecord::Valid { .. } => {}
        }
    }
    lines
}

/// The record `run` would leave beside the merged file, when the inputs are one job's whole
/// output (`whole`) and each has a valid record of the same settings: `OUT.runs/settings.json`
/// and `out.json` with the merged file's checksum and the union of the shards' runs, so that
/// `tune --picks` and a later `merge` read the merged file as that job's. A folder holding more
/// (a job's finished runs) is not touched; one holding only an earlier merge's record loses it
/// when this merge writes none.
fn merged_record(out: &Path, inputs: &[PathBuf], contents: &[Vec<u8>], text: &str, whole: bool) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let dir = super::run::runs_folder(out)?;
    let names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(d) => d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    if names.iter().any(|n| n != "settings.json" && n != super::run::OUTPUT_FILE) {
        return Ok(Vec::new());
    }
    let mut settings: Option<serde_json::Map<String, serde_json::Value>> = None;
    let (mut runs, mut failed) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    let mut valid = whole;
    for (p, b) in inputs.iter().zip(contents) {
        match super::run::output_record(p, b) {
            super::run::OutputRecord::Valid { settings: s, runs: Some(r), failed: f } if valid => {
                if settings.as_ref().is_some_and(|first| *first != s) {
                    valid = false;
                }
                settings.get_or_insert(s);
                runs.extend(r);
                failed.extend(f);
            }
            _ => valid = false,
        }
    }
    match settings.filter(|_| valid) {
        Some(s) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
            let record = serde_json::json!({ "sha256": super::run::sha256_hex(text.as_bytes()), "runs": runs, "failed": failed });
            Ok(vec![(dir.join("settings.json"), serde_json::to_string_pretty(&s)?.into_bytes()), (dir.join(super::run::OUTPUT_FILE), record.to_string().into_bytes())])
        }
        None => {
            for n in &names {
                let _ = std::fs::remove_file(dir.join(n));
            }
            let _ = std::fs::remove_dir(&dir);
            Ok(Vec::new())
        }
    }
}

/// The shards of a job (`--shard k/n`) that none of the inputs is, when every input says which
/// shard it is and all name the same n. (An unsharded input may hold the missing runs, e.g. a
/// failed shard's runs redone with --runs; inputs of other shard counts: nothing is said.) When
/// the inputs agree on the job's runs, a missing shard's runs are named, and a shard that had none
/// (more shards than runs) is not missing.
fn missing_shards(inputs: &[PathBuf]) -> Option<String> {
    let shards: Vec<super::run::ShardRecord> = inputs.iter().map(|p| super::run::shard_of(p)).collect::<Option<_>>()?;
    let n = shards.first()?.n;
    if shards.iter().any(|s| s.n != n) {
        return None;
    }
    let missing: Vec<usize> = (0..n).filter(|k| !shards.iter().any(|s| s.k == *k)).collect();
    let job_runs = shards[0].job_runs.as_ref().filter(|r| shards.iter().all(|s| s.job_runs.as_ref() == Some(*r)));
    let Some(job_runs) = job_runs else {
        let list: Vec<String> = missing.iter().map(|k| format!("{k}/{n}")).collect();
        return (!missing.is_empty()).then(|| format!("the inputs are shards of a job run with --shard K/{n}, and none is shard {}: the merged file lacks its runs (if it had any)", list.join(", ")));
    };
    let mut lacking = Vec::new();
    let mut described = Vec::new();
    for k in missing {
        let runs = fastdet::io::dataset::shard(job_runs, k, n);
        if runs.is_empty() {
            continue;
        }
        let shown: Vec<&str> = runs.iter().take(5).map(String::as_str).collect();
        let more = if runs.len() > shown.len() { format!(" and {} more", runs.len() - shown.len()) } else { String::new() };
        described.push(format!("{k}/{n} ({}{more})", shown.join(", ")));
        lacking.extend(runs);
    }
    (!lacking.is_empty()).then(|| {
        format!(
            "the inputs are shards of a job run with --shard K/{n}, and none is shard {}: the merged file lacks {} of the job's {} run(s)",
            described.join(", "),
            lacking.len(),
            job_runs.len()
        )
    })
}

/// Whether a submission's text has a score column. The header is the first line that is not
/// blank, as the reader takes it.
pub(crate) fn has_score(text: &str) -> bool {
    let header = text.lines().find(|l| !l.trim().is_empty());
    header.is_some_and(|h| h.trim_start_matches('\u{feff}').split(',').any(|c| c.trim() == "score"))
}

pub fn merge(a: MergeArgs) -> Result<ExitCode> {
    fastdet::util::check_output_file(&a.out)?;
    let inputs: Vec<&Path> = a.inputs.iter().chain(&a.copick).map(PathBuf::as_path).collect();
    fastdet::util::check_not_an_input(&a.out, &inputs)?;
    if let Some(dst) = &a.copick_out {
        let shards: Vec<&Path> = a.copick.iter().map(PathBuf::as_path).collect();
        fastdet::util::check_not_an_input(&dst.join("ExperimentRuns"), &shards)?;
    }
    let mut picks = Vec::new();
    let mut unscored: Vec<&PathBuf> = Vec::new();
    // Which input each run came from: a run in two inputs would be counted twice.
    let mut run_from: std::collections::HashMap<String, usize> = Default::default();
    if let Some((j, i)) = given_twice(&a.inputs) {
        bail!("{}: given twice (as input {} and {})", a.inputs[i].display(), j + 1, i + 1);
    }
    // Each input read once: its record is checked against the very bytes merged.
    let mut contents = Vec::new();
    for (i, p) in a.inputs.iter().enumerate() {
        let bytes = std::fs::read(p).with_context(|| format!("{}: cannot read submission", p.display()))?;
        let text = std::str::from_utf8(&bytes).with_context(|| format!("{}: not UTF-8 text", p.display()))?;
        if !has_score(text) {
            unscored.push(p);
        }
        let rows = csv::parse_submission_text(text, &p.display().to_string())?;
        contents.push(bytes);
        for r in &rows {
            match run_from.get(&r.run) {
                Some(&j) if j != i => bail!("{}: run {} also appears in {}; shards must not overlap", p.display(), r.run, a.inputs[j].display()),
                Some(_) => {}
                None => {
                    run_from.insert(r.run.clone(), i);
                }
            }
        }
        picks.extend(rows);
    }
    let mut mixed = not_whole_job_outputs(&a.inputs, &contents);
    for (line, serious) in settings_differences(&a.inputs) {
        if serious {
            mixed.push(line);
        } else {
            fastdet::errln!("note: {line}");
        }
    }
    for line in &mixed {
        fastdet::errln!("warning: {line}");
    }
    // Written all the same (the runs there are are good), but the exit status says the file is
    // not one job's whole output, as `run` says some runs failed: a job-array script notices.
    let incomplete = missing_shards(&a.inputs);
    if let Some(line) = &incomplete {
        fastdet::errln!("warning: {line}");
    }
    // Scores are kept when every input has them.
    let with_score = unscored.is_empty();
    if !with_score && unscored.len() < a.inputs.len() {
        fastdet::errln!("note: {} has no score column, so the merged file has none", unscored[0].display());
    }
    // Every copick folder is read and checked before any output is written.
    let copick_writes = match &a.copick_out {
        Some(dst) => Some((dst, plan_copick(&a.copick, dst)?)),
        None => None,
    };
    picks.sort_by(|x, y| x.run.cmp(&y.run)); // stable: keeps each run's order
    // The copick files and the CSV, written as one: a failure or a stop leaves none of them.
    let mut files = copick_writes.as_ref().map(|(_, w)| w.clone()).unwrap_or_default();
    let text = csv::submission_text(&a.out, &picks, with_score)?;
    files.extend(merged_record(&a.out, &a.inputs, &contents, &text, incomplete.is_none() && mixed.is_empty())?);
    files.push((a.out.clone(), text.into_bytes()));
    if let Some((dst, _)) = &copick_writes {
        std::fs::create_dir_all(dst).with_context(|| format!("{}: cannot create", dst.display()))?;
    }
    fastdet::util::write_files_atomic(&files)?;
    // The files are written: a full standard output does not make the merge a failure.
    let _ = fastdet::util::out_line(format_args!("merged {} picks from {} file(s) into {}", picks.len(), a.inputs.len(), a.out.display()));
    if let Some((dst, writes)) = copick_writes {
        let _ = fastdet::util::out_line(format_args!("copied {} copick picks file(s) from {} folder(s) into {}", writes.len(), a.copick.len(), dst.display()));
    }
    Ok(if incomplete.is_some() || !mixed.is_empty() { ExitCode::from(2) } else { ExitCode::SUCCESS })
}
