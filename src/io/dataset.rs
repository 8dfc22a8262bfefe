//! CZII / copick dataset layout: run discovery, tomogram paths, sharding.
//!
//! Layout: `{root}/{split}/static/ExperimentRuns/{run}/VoxelSpacing10.000/{tomogram}.zarr`
//! (`denoised` by default).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Voxel-spacing directory used by the competition data.
pub const VOXEL_SPACING_DIR: &str = "VoxelSpacing10.000";
/// Tomogram type read by default: the competition's `denoised.zarr` in the voxel-spacing
/// directory (the others are `wbp`, `ctfdeconvolved` and `isonetcorrected`).
pub const DEFAULT_TOMOGRAM: &str = "denoised";

/// `{root}/{split}/static/ExperimentRuns`.
pub fn runs_dir(root: &Path, split: &str) -> PathBuf {
    root.join(split).join("static").join("ExperimentRuns")
}

/// Run names: the sub-directories of `{root}/{split}/static/ExperimentRuns`, sorted by name
/// (hidden entries starting with `.` are skipped). Errors if that directory is missing.
pub fn discover_runs(root: &Path, split: &str) -> Result<Vec<String>> {
    let dir = runs_dir(root, split);
    if !dir.is_dir() {
        bail!(
            "{}: runs directory not found (expected {}/{split}/static/ExperimentRuns/<run>/{VOXEL_SPACING_DIR}/{DEFAULT_TOMOGRAM}.zarr)",
            dir.display(),
            root.display()
        );
    }
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot list runs: {e}", dir.display()))?;
    let mut runs = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| anyhow::anyhow!("{}: cannot list runs: {e}", dir.display()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        runs.push(name);
    }
    runs.sort();
    Ok(runs)
}

/// The canonical tomogram path `{root}/{split}/static/ExperimentRuns/{run}/VoxelSpacing10.000/{tomogram}.zarr`
/// (whether or not it exists).
pub fn default_tomogram_path(root: &Path, split: &str, run: &str, tomogram: &str) -> PathBuf {
    runs_dir(root, split)
        .join(run)
        .join(VOXEL_SPACING_DIR)
        .join(format!("{tomogram}.zarr"))
}

/// Tomogram path of `run`: the canonical `VoxelSpacing10.000/{tomogram}.zarr` if it exists,
/// otherwise the only `VoxelSpacing*/{tomogram}.zarr` of the run. Errors (naming the paths) if the
/// run is missing, or there is no candidate, or several candidates and no canonical one.
pub fn run_tomogram_path(root: &Path, split: &str, run: &str, tomogram: &str) -> Result<PathBuf> {
    let name = format!("{tomogram}.zarr");
    let exact = default_tomogram_path(root, split, run, tomogram);
    if exact.is_dir() {
        return Ok(exact);
    }
    let run_dir = runs_dir(root, split).join(run);
    if !run_dir.is_dir() {
        bail!(
            "{}: run directory not found (run '{run}', split '{split}')",
            run_dir.display()
        );
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&run_dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot list run directory: {e}", run_dir.display()))?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("VoxelSpacing"))
        })
        .map(|e| e.path().join(&name))
        .filter(|p| p.is_dir())
        .collect();
    candidates.sort();
    match candidates.len() {
        1 => Ok(candidates.pop().unwrap()),
        0 => {
            // Name the tomograms the run has, when the type asked for is not among them.
            let mut present: Vec<String> = std::fs::read_dir(&run_dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("VoxelSpacing")))
                .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".zarr")).map(String::from))
                .collect();
            present.sort();
            present.dedup();
            let others = if present.is_empty() { String::new() } else { format!(" (it has: {}; choose one with --tomogram)", present.join(", ")) };
            bail!("{}: tomogram not found, and no VoxelSpacing*/{name} in {}{others}", exact.display(), run_dir.display())
        }
        _ => bail!(
            "{}: tomogram not found, and {} is ambiguous: several candidates {:?}",
            exact.display(),
            run_dir.display(),
            candidates
        ),
    }
}

/// Every `n`-th run starting at `k` (Python `runs[k::n]`). Panics if `n == 0`.
pub fn shard(runs: &[String], k: usize, n: usize) -> Vec<String> {
    assert!(n > 0, "shard: the number of shards must be at least 1");
    runs.iter().skip(k).step_by(n).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn shard_is_python_slice() {
        let r = names(&["a", "b", "c", "d", "e"]);
        assert_eq!(shard(&r, 0, 2), names(&["a", "c", "e"]));
        assert_eq!(shard(&r, 1, 2), names(&["b", "d"]));
        assert_eq!(shard(&r, 0, 1), r);
        assert_eq!(shard(&r, 3, 2), names(&["d"]));
        assert!(shard(&r, 7, 2).is_empty());
        // shards partition the runs
        let mut all: Vec<String> = (0..3).flat_map(|k| shard(&r, k, 3)).collect();
        all.sort();
        assert_eq!(all, r);
    }

    #[test]
    fn discovery_and_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert!(discover_runs(root, "train")
            .unwrap_err()
            .to_string()
            .contains("ExperimentRuns"));
        let rd = runs_dir(root, "train");
        for r in ["TS_b", "TS_a", ".hidden"] {
            std::fs::create_dir_all(rd.join(r)).unwrap();
        }
        std::fs::write(rd.join("notes.txt"), "x").unwrap();
        assert_eq!(
            discover_runs(root, "train").unwrap(),
            names(&["TS_a", "TS_b"])
        );

        // canonical path
        let d = DEFAULT_TOMOGRAM;
        let exact = default_tomogram_path(root, "train", "TS_a", d);
        std::fs::create_dir_all(&exact).unwrap();
        assert_eq!(run_tomogram_path(root, "train", "TS_a", d).unwrap(), exact);
        // another type, named in the error when it is the only one there
        let wbp = rd.join("TS_a/VoxelSpacing10.000/wbp.zarr");
        std::fs::create_dir_all(&wbp).unwrap();
        assert_eq!(run_tomogram_path(root, "train", "TS_a", "wbp").unwrap(), wbp);
        let e = run_tomogram_path(root, "train", "TS_a", "isonetcorrected").unwrap_err().to_string();
        assert!(e.contains("isonetcorrected.zarr") && e.contains("it has: denoised, wbp; choose one with --tomogram"), "{e}");
        // single other spacing
        let other = rd.join("TS_b").join("VoxelSpacing10.012").join("denoised.zarr");
        std::fs::create_dir_all(&other).unwrap();
        assert_eq!(run_tomogram_path(root, "train", "TS_b", d).unwrap(), other);
        // ambiguous
        std::fs::create_dir_all(rd.join("TS_b").join("VoxelSpacing5.000").join("denoised.zarr")).unwrap();
        let e = run_tomogram_path(root, "train", "TS_b", d).unwrap_err().to_string();
        assert!(e.contains("ambiguous"), "{e}");
        // missing run
        let e = run_tomogram_path(root, "train", "TS_zz", d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("TS_zz"), "{e}");
    }
}
