//! CZII / copick dataset layout: run discovery, tomogram paths, sharding.
//!
//! Layout: `{root}/{split}/static/ExperimentRuns/{run}/VoxelSpacing10.000/denoised.zarr`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Voxel-spacing directory used by the competition data.
pub const VOXEL_SPACING_DIR: &str = "VoxelSpacing10.000";
/// Tomogram (OME-Zarr group) name inside the voxel-spacing directory.
pub const TOMOGRAM_NAME: &str = "denoised.zarr";

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
            "{}: runs directory not found (expected {}/{split}/static/ExperimentRuns/<run>/{VOXEL_SPACING_DIR}/{TOMOGRAM_NAME})",
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

/// The canonical tomogram path `{root}/{split}/static/ExperimentRuns/{run}/VoxelSpacing10.000/denoised.zarr`
/// (whether or not it exists).
pub fn default_tomogram_path(root: &Path, split: &str, run: &str) -> PathBuf {
    runs_dir(root, split)
        .join(run)
        .join(VOXEL_SPACING_DIR)
        .join(TOMOGRAM_NAME)
}

/// Tomogram path of `run`: the canonical `VoxelSpacing10.000/denoised.zarr` if it exists,
/// otherwise the only `VoxelSpacing*/denoised.zarr` of the run. Errors (naming the paths) if the
/// run is missing, or there is no candidate, or several candidates and no canonical one.
pub fn run_tomogram_path(root: &Path, split: &str, run: &str) -> Result<PathBuf> {
    let exact = default_tomogram_path(root, split, run);
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
        .map(|e| e.path().join(TOMOGRAM_NAME))
        .filter(|p| p.is_dir())
        .collect();
    candidates.sort();
    match candidates.len() {
        1 => Ok(candidates.pop().unwrap()),
        0 => bail!(
            "{}: tomogram not found, and no VoxelSpacing*/{TOMOGRAM_NAME} in {}",
            exact.display(),
            run_dir.display()
        ),
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
        let exact = default_tomogram_path(root, "train", "TS_a");
        std::fs::create_dir_all(&exact).unwrap();
        assert_eq!(run_tomogram_path(root, "train", "TS_a").unwrap(), exact);
        // single other spacing
        let other = rd
            .join("TS_b")
            .join("VoxelSpacing10.012")
            .join(TOMOGRAM_NAME);
        std::fs::create_dir_all(&other).unwrap();
        assert_eq!(run_tomogram_path(root, "train", "TS_b").unwrap(), other);
        // ambiguous
        std::fs::create_dir_all(
            rd.join("TS_b")
                .join("VoxelSpacing5.000")
                .join(TOMOGRAM_NAME),
        )
        .unwrap();
        let e = run_tomogram_path(root, "train", "TS_b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ambiguous"), "{e}");
        // missing run
        let e = run_tomogram_path(root, "train", "TS_zz")
            .unwrap_err()
            .to_string();
        assert!(e.contains("TS_zz"), "{e}");
    }
}
