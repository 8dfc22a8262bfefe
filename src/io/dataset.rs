//! Where a project's runs are: the competition layout or a copick project's configuration file.
//!
//! Competition layout (`--data ROOT --split S`): tomograms under
//! `{ROOT}/{S}/static/ExperimentRuns/{run}/VoxelSpacing10.000/{tomogram}.zarr` (`denoised` by
//! default), picks under `{ROOT}/{S}/overlay/ExperimentRuns/{run}/Picks/`.
//!
//! copick project (`--copick-config FILE`): the same folders under the file's `static_root` and
//! `overlay_root`, read as copick reads them: runs and tomograms from both roots, picks from both.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Voxel-spacing directory used by the competition data.
pub const VOXEL_SPACING_DIR: &str = "VoxelSpacing10.000";
/// Tomogram type read by default: the competition's `denoised.zarr` in the voxel-spacing
/// directory (the others are `wbp`, `ctfdeconvolved` and `isonetcorrected`).
pub const DEFAULT_TOMOGRAM: &str = "denoised";

/// The two `ExperimentRuns` folders of a project, and where they were named.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// `{static}/ExperimentRuns`: the runs and their tomograms.
    pub static_runs: PathBuf,
    /// `{overlay}/ExperimentRuns`: picks (the ground truth, other pickers'), tomograms a user added.
    pub overlay_runs: PathBuf,
    /// The copick configuration file, when the layout comes from one.
    pub config: Option<PathBuf>,
}

/// `{root}/{split}/static/ExperimentRuns`.
pub fn runs_dir(root: &Path, split: &str) -> PathBuf {
    root.join(split).join("static").join("ExperimentRuns")
}

/// Sub-directory names of `dir`, sorted, hidden entries (`.…`) skipped; `None` when there is no `dir`.
pub(crate) fn sub_dirs(dir: &Path) -> Option<std::io::Result<Vec<String>>> {
    if !dir.is_dir() {
        return None;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return Some(Err(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !name.starts_with('.') && entry.path().is_dir() {
            names.push(name);
        }
    }
    names.sort();
    Some(Ok(names))
}

/// A copick configuration file's JSON.
pub(crate) fn copick_config_json(file: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read the copick configuration", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a copick configuration (not JSON)", file.display()))
}

/// `~` and `~/…` as the home directory, as copick (through fsspec) reads a root.
fn expand_home(path: &str) -> Result<PathBuf> {
    let rest = match path.strip_prefix('~') {
        Some("") => "",
        Some(r) if r.starts_with('/') => &r[1..],
        _ => return Ok(PathBuf::from(path)),
    };
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(rest)),
        None => bail!("cannot expand ~: HOME is not set"),
    }
}

impl Layout {
    /// The competition layout: `{root}/{split}/static` and `{root}/{split}/overlay`.
    pub fn split(root: &Path, split: &str) -> Layout {
        Layout { static_runs: runs_dir(root, split), overlay_runs: root.join(split).join("overlay").join("ExperimentRuns"), config: None }
    }

    /// A copick project's configuration (JSON): `overlay_root`, and `static_root` when the
    /// tomograms lie apart from the overlay (without it, everything is in the overlay). Roots are
    /// local paths, plain or as `local://` / `file://` URLs (or `local:` / `file:`), `~` the home
    /// directory; a relative one is relative to the current directory, as copick reads it. Other storage (`s3://`, the data portal's
    /// `config_type`) is refused: download the runs first.
    pub fn copick_config(file: &Path) -> Result<Layout> {
        let doc = copick_config_json(file)?;
        let Some(obj) = doc.as_object() else {
            bail!("{}: not a copick configuration (a JSON object with overlay_root is expected)", file.display());
        };
        if let Some(t) = obj.get("config_type") {
            if t.as_str() != Some("filesystem") {
                bail!("{}: copick config_type {t}: fastdet reads projects on local disks only (config_type \"filesystem\"); download the runs first", file.display());
            }
        }
        let root = |key: &str| -> Result<Option<PathBuf>> {
            let Some(v) = obj.get(key).filter(|v| !v.is_null()) else {
                return Ok(None);
            };
            let Some(url) = v.as_str() else {
                bail!("{}: {key} must be a path, not {v}", file.display());
            };
            let path = match ["local://", "file://", "local:", "file:"].iter().find_map(|p| url.strip_prefix(p)) {
                Some(p) => p,
                None if url.contains("://") => bail!("{}: {key} {url:?}: fastdet reads local paths only (a path, or local://PATH); copy the project to a local disk first", file.display()),
                None => url,
            };
            if path.is_empty() {
                bail!("{}: {key} is empty", file.display());
            }
            let path = expand_home(path).with_context(|| format!("{}: {key} {url:?}", file.display()))?;
            Ok(Some(std::path::absolute(path).with_context(|| format!("{}: {key} {url:?}", file.display()))?))
        };
        let Some(overlay) = root("overlay_root")? else {
            bail!("{}: not a copick configuration: no overlay_root", file.display());
        };
        let stat = root("static_root")?.unwrap_or_else(|| overlay.clone());
        Ok(Layout { static_runs: stat.join("ExperimentRuns"), overlay_runs: overlay.join("ExperimentRuns"), config: Some(file.to_path_buf()) })
    }

    /// The project `--data ROOT --split S` or `--copick-config FILE` names, if either is given
    /// (`data` first).
    pub fn from_flags(data: Option<&Path>, split: &str, copick_config: Option<&Path>) -> Result<Option<Layout>> {
        Ok(match (data, copick_config) {
            (Some(root), _) => Some(Layout::split(root, split)),
            (None, Some(file)) => Some(Layout::copick_config(file)?),
            (None, None) => None,
        })
    }

    /// Whether runs and picks are looked for in both roots, as copick does: a copick project
    /// whose static root is not its overlay. (The competition layout keeps its tomograms in
    /// `static` and its picks in `overlay`.)
    pub fn reads_both_roots(&self) -> bool {
        self.config.is_some() && self.static_runs != self.overlay_runs
    }

    /// The folders a run's tomograms may be in: the static one, then, in a copick project, the
    /// overlay's (the competition layout's overlay holds picks only).
    fn run_dirs(&self, run: &str) -> Vec<PathBuf> {
        let mut dirs = vec![self.static_runs.join(run)];
        if self.reads_both_roots() {
            dirs.push(self.overlay_runs.join(run));
        }
        dirs
    }

    /// The folders whose runs' `Picks` may hold ground truth, for messages.
    pub fn truth_folders(&self) -> String {
        if self.reads_both_roots() {
            format!("{} and {}", self.overlay_runs.display(), self.static_runs.display())
        } else {
            self.overlay_runs.display().to_string()
        }
    }

    /// Where the runs are, for messages.
    pub fn describe(&self) -> String {
        match &self.config {
            Some(f) => format!("{} (static root of copick project {})", self.static_runs.display(), f.display()),
            None => self.static_runs.display().to_string(),
        }
    }

    /// Run names, sorted: the sub-directories of the static `ExperimentRuns` (hidden entries
    /// starting with `.` are skipped). A copick project's runs also include overlay runs that
    /// hold a tomogram folder (`VoxelSpacing*`), as copick lists both roots. Errors if there is
    /// no runs folder.
    pub fn discover_runs(&self) -> Result<Vec<String>> {
        let listing = |dir: &Path| sub_dirs(dir).map(|r| r.map_err(|e| anyhow::anyhow!("{}: cannot list runs: {e}", dir.display())));
        let mut runs = listing(&self.static_runs).transpose()?;
        if self.reads_both_roots() {
            if let Some(more) = listing(&self.overlay_runs) {
                let with_tomograms = more?.into_iter().filter(|r| {
                    std::fs::read_dir(self.overlay_runs.join(r)).into_iter().flatten().flatten().any(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("VoxelSpacing")))
                });
                let all = runs.get_or_insert_with(Vec::new);
                all.extend(with_tomograms);
                all.sort();
                all.dedup();
            }
        }
        match runs {
            Some(r) => Ok(r),
            None if self.config.is_some() => bail!(
                "{}: runs directory not found, nor {} (the copick project {} has no runs)",
                self.static_runs.display(),
                self.overlay_runs.display(),
                self.config.as_ref().unwrap().display()
            ),
            None => bail!(
                "{}: runs directory not found (expected {}/<run>/{VOXEL_SPACING_DIR}/{DEFAULT_TOMOGRAM}.zarr){}",
                self.static_runs.display(),
                self.static_runs.display(),
                self.split_folder_hint().map(|h| format!("; {h}")).unwrap_or_default()
            ),
        }
    }

    /// When the dataset root given is itself a split folder (`ROOT/test` for `ROOT`, a common
    /// slip), what to give instead. Only for a layout made by [`Layout::split`].
    pub fn split_folder_hint(&self) -> Option<String> {
        if self.config.is_some() {
            return None;
        }
        // static_runs = {root}/{split}/static/ExperimentRuns
        let root = self.static_runs.parent()?.parent()?.parent()?;
        let holds_split = ["static", "overlay"].iter().any(|d| root.join(d).join("ExperimentRuns").is_dir());
        if !holds_split {
            return None;
        }
        // `--data .` inside the split folder: named from where it is.
        let root = root.canonicalize().ok()?;
        let root = root.as_path();
        let name = root.file_name()?.to_string_lossy();
        let parent = match root.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.display().to_string(),
            _ => ".".to_string(),
        };
        Some(format!("{} is itself a split folder (it holds static/ or overlay/ExperimentRuns): give its parent {parent} as the dataset root and --split {name}", root.display()))
    }

    /// The canonical tomogram path `{static}/{run}/VoxelSpacing10.000/{tomogram}.zarr` (whether
    /// or not it exists).
    pub fn default_tomogram_path(&self, run: &str, tomogram: &str) -> PathBuf {
        self.static_runs.join(run).join(VOXEL_SPACING_DIR).join(format!("{tomogram}.zarr"))
    }

    /// Tomogram path of `run`: the canonical `VoxelSpacing10.000/{tomogram}.zarr` if it exists
    /// (in the static root, then the overlay's), otherwise the only `VoxelSpacing*/{tomogram}.zarr`
    /// of the run. Errors (naming the paths) if the run is missing, or there is no candidate, or
    /// several candidates and no canonical one.
    pub fn tomogram_path(&self, run: &str, tomogram: &str) -> Result<PathBuf> {
        self.tomogram_path_near(run, tomogram, None)
    }

    /// [`Self::tomogram_path`], or with `near` Å (`run --level auto`): of several
    /// `VoxelSpacing{Å}` folders holding the tomogram, the one with the level nearest `near` by
    /// ratio (OME metadata; else the spacing the folder's name gives; the finer on a tie), the
    /// canonical one included.
    pub fn tomogram_path_near(&self, run: &str, tomogram: &str, near: Option<f64>) -> Result<PathBuf> {
        let name = format!("{tomogram}.zarr");
        let exact = self.default_tomogram_path(run, tomogram);
        let run_dirs: Vec<PathBuf> = self.run_dirs(run).into_iter().filter(|d| d.is_dir()).collect();
        if let Some(p) = run_dirs.iter().map(|d| d.join(VOXEL_SPACING_DIR).join(&name)).find(|p| p.is_dir()).filter(|_| near.is_none()) {
            return Ok(p);
        }
        if run_dirs.is_empty() {
            bail!("{}: run directory not found (run '{run}')", self.static_runs.join(run).display());
        }
        let spacings = |dir: &PathBuf| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("VoxelSpacing")))
                .map(|e| e.path())
                .collect()
        };
        let mut candidates: Vec<PathBuf> = run_dirs.iter().flat_map(spacings).map(|s| s.join(&name)).filter(|p| p.is_dir()).collect();
        candidates.sort();
        let listed = run_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" or ");
        // The spacing a candidate's folder names (`VoxelSpacing10.000` is 10 Å).
        let spacing_of = |p: &Path| -> Option<f64> {
            p.parent()?.file_name()?.to_str()?.strip_prefix("VoxelSpacing")?.parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0)
        };
        if let (Some(target), true) = (near, candidates.len() > 1) {
            // Each folder by its level nearest the target (a 5 Å folder's 2x level beats a
            // 7.84 Å folder for 10 Å), else by the spacing its name gives.
            let size_of = |p: &Path| -> Option<f64> {
                let levels = crate::io::zarr::level_voxel_sizes(p).unwrap_or_default();
                crate::io::zarr::nearest_level(&levels, target).map(|l| l.1).or_else(|| spacing_of(p))
            };
            let mut named: Vec<(f64, &PathBuf)> = candidates.iter().filter_map(|p| Some((size_of(p)?, p))).collect();
            if named.len() == candidates.len() {
                // Root by root (static before overlay), so the first of equal spacings is the
                // static root's, as the canonical folder is looked for there first.
                let root = |p: &Path| run_dirs.iter().position(|d| p.starts_with(d)).unwrap_or(usize::MAX);
                named.sort_by_key(|(_, p)| root(p));
                let best = crate::io::zarr::nearest_by_ratio(&named, |c| c.0, target);
                return Ok(best.expect("several candidates").1.clone());
            }
            // A folder name that gives no spacing: the canonical folder, as without `near`.
            if let Some(p) = run_dirs.iter().map(|d| d.join(VOXEL_SPACING_DIR).join(&name)).find(|p| p.is_dir()) {
                return Ok(p);
            }
        }
        match candidates.len() {
            1 => Ok(candidates.pop().unwrap()),
            0 => {
                // Name the tomograms the run has, when the type asked for is not among them.
                let mut present: Vec<String> = run_dirs
                    .iter()
                    .flat_map(spacings)
                    .flat_map(|s| std::fs::read_dir(s).into_iter().flatten().flatten())
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".zarr")).map(String::from))
                    .collect();
                present.sort();
                present.dedup();
                let others = if present.is_empty() { String::new() } else { format!(" (it has: {}; choose one with --tomogram)", present.join(", ")) };
                bail!("{}: tomogram not found, and no VoxelSpacing*/{name} in {listed}{others}", exact.display())
            }
            _ => bail!("{}: tomogram not found, and {listed} is ambiguous: several candidates {:?}", exact.display(), candidates),
        }
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
        let layout = Layout::split(root, "train");
        assert!(layout.discover_runs()
            .unwrap_err()
            .to_string()
            .contains("ExperimentRuns"));
        let rd = runs_dir(root, "train");
        for r in ["TS_b", "TS_a", ".hidden"] {
            std::fs::create_dir_all(rd.join(r)).unwrap();
        }
        std::fs::write(rd.join("notes.txt"), "x").unwrap();
        assert_eq!(
            layout.discover_runs().unwrap(),
            names(&["TS_a", "TS_b"])
        );

        // canonical path
        let d = DEFAULT_TOMOGRAM;
        let exact = layout.default_tomogram_path("TS_a", d);
        std::fs::create_dir_all(&exact).unwrap();
        assert_eq!(layout.tomogram_path("TS_a", d).unwrap(), exact);
        // another type, named in the error when it is the only one there
        let wbp = rd.join("TS_a/VoxelSpacing10.000/wbp.zarr");
        std::fs::create_dir_all(&wbp).unwrap();
        assert_eq!(layout.tomogram_path("TS_a", "wbp").unwrap(), wbp);
        let e = layout.tomogram_path("TS_a", "isonetcorrected").unwrap_err().to_string();
        assert!(e.contains("isonetcorrected.zarr") && e.contains("it has: denoised, wbp; choose one with --tomogram"), "{e}");
        // single other spacing
        let other = rd.join("TS_b").join("VoxelSpacing10.012").join("denoised.zarr");
        std::fs::create_dir_all(&other).unwrap();
        assert_eq!(layout.tomogram_path("TS_b", d).unwrap(), other);
        // The competition layout's overlay holds picks: a tomogram there is not the run's.
        std::fs::create_dir_all(root.join("train/overlay/ExperimentRuns/TS_b/VoxelSpacing10.000/denoised.zarr")).unwrap();
        assert_eq!(layout.tomogram_path("TS_b", d).unwrap(), other);
        // ambiguous
        std::fs::create_dir_all(rd.join("TS_b").join("VoxelSpacing5.000").join("denoised.zarr")).unwrap();
        let e = layout.tomogram_path("TS_b", d).unwrap_err().to_string();
        assert!(e.contains("ambiguous"), "{e}");
        // ... unless the nearest spacing is asked for (--level auto), the canonical one included.
        assert_eq!(layout.tomogram_path_near("TS_b", d, Some(10.0)).unwrap(), other);
        assert_eq!(layout.tomogram_path_near("TS_b", d, Some(6.0)).unwrap(), rd.join("TS_b/VoxelSpacing5.000/denoised.zarr"));
        std::fs::create_dir_all(rd.join("TS_b/VoxelSpacing20.024/denoised.zarr")).unwrap();
        assert_eq!(layout.tomogram_path_near("TS_b", d, Some(17.0)).unwrap(), rd.join("TS_b/VoxelSpacing20.024/denoised.zarr"));
        std::fs::create_dir_all(rd.join("TS_b/VoxelSpacing10.000/denoised.zarr")).unwrap();
        assert_eq!(layout.tomogram_path("TS_b", d).unwrap(), rd.join("TS_b/VoxelSpacing10.000/denoised.zarr"));
        assert_eq!(layout.tomogram_path_near("TS_b", d, Some(20.0)).unwrap(), rd.join("TS_b/VoxelSpacing20.024/denoised.zarr"));
        // A folder whose name gives no spacing: the canonical folder, as without a voxel size.
        std::fs::create_dir_all(rd.join("TS_b/VoxelSpacingX/denoised.zarr")).unwrap();
        assert_eq!(layout.tomogram_path_near("TS_b", d, Some(20.0)).unwrap(), rd.join("TS_b/VoxelSpacing10.000/denoised.zarr"));
        std::fs::remove_dir_all(rd.join("TS_b/VoxelSpacing10.000")).unwrap();
        assert!(layout.tomogram_path_near("TS_b", d, Some(20.0)).unwrap_err().to_string().contains("ambiguous"));
        // A folder's levels count: a 5.006 Å pyramid's 2x level beats a 7.84 Å folder for 10 Å.
        let fine = rd.join("TS_c/VoxelSpacing5.006/denoised.zarr");
        std::fs::create_dir_all(&fine).unwrap();
        std::fs::create_dir_all(rd.join("TS_c/VoxelSpacing7.840/denoised.zarr")).unwrap();
        std::fs::write(fine.join(".zgroup"), r#"{"zarr_format": 2}"#).unwrap();
        let level = |p: &str, v: f64| serde_json::json!({"path": p, "coordinateTransformations": [{"type": "scale", "scale": [v, v, v]}]});
        std::fs::write(fine.join(".zattrs"), serde_json::json!({"multiscales": [{"datasets": [level("0", 5.006), level("1", 10.012)]}]}).to_string()).unwrap();
        assert_eq!(layout.tomogram_path_near("TS_c", d, Some(10.012)).unwrap(), fine);
        assert_eq!(layout.tomogram_path_near("TS_c", d, Some(7.0)).unwrap(), rd.join("TS_c/VoxelSpacing7.840/denoised.zarr"));
        // missing run
        let e = layout.tomogram_path("TS_zz", d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("TS_zz"), "{e}");
    }

    /// A copick configuration names the two roots (plain, local://, file://, local:, file: or
    /// from ~; a missing static root is the overlay); runs and tomograms come from both, as copick lists them.
    #[test]
    fn copick_configuration_roots_runs_and_tomograms() {
        let tmp = tempfile::tempdir().unwrap();
        let (stat, over) = (tmp.path().join("static"), tmp.path().join("overlay"));
        let cfg = tmp.path().join("copick.json");
        let write = |text: String| std::fs::write(&cfg, text).unwrap();
        for url in [over.display().to_string(), format!("local://{}", over.display()), format!("file://{}", over.display()), format!("file:{}", over.display()), format!("local:{}", over.display())] {
            write(format!(r#"{{"name": "p", "overlay_root": "{url}", "static_root": "local://{}", "pickable_objects": []}}"#, stat.display()));
            let l = Layout::copick_config(&cfg).unwrap();
            assert_eq!((l.static_runs.clone(), l.overlay_runs.clone()), (stat.join("ExperimentRuns"), over.join("ExperimentRuns")), "{url}");
        }
        write(format!(r#"{{"config_type": "filesystem", "overlay_root": "{}", "static_root": null}}"#, over.display()));
        assert_eq!(Layout::copick_config(&cfg).unwrap().static_runs, over.join("ExperimentRuns"));
        write(r#"{"overlay_root": "rel/overlay"}"#.into());
        assert_eq!(Layout::copick_config(&cfg).unwrap().overlay_runs, std::env::current_dir().unwrap().join("rel/overlay/ExperimentRuns"));
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            write(r#"{"overlay_root": "~/p/overlay", "static_root": "file:~/p/static"}"#.into());
            let l = Layout::copick_config(&cfg).unwrap();
            let home = std::path::absolute(PathBuf::from(home)).unwrap();
            assert_eq!((l.overlay_runs, l.static_runs), (home.join("p/overlay/ExperimentRuns"), home.join("p/static/ExperimentRuns")));
        }
        for (text, says) in [
            (r#"{"static_root": "/x"}"#, "no overlay_root"),
            (r#"{"overlay_root": "s3://bucket/overlay"}"#, "local paths only"),
            (r#"{"overlay_root": 5}"#, "overlay_root must be a path"),
            (r#"{"config_type": "cryoet_data_portal", "overlay_root": "/x"}"#, "config_type \"cryoet_data_portal\""),
            ("[1, 2]", "a JSON object"),
            ("name = 1", "not JSON"),
        ] {
            write(text.into());
            let e = format!("{:#}", Layout::copick_config(&cfg).unwrap_err());
            assert!(e.contains("copick.json") && e.contains(says), "{text}: {e}");
        }
        let e = format!("{:#}", Layout::copick_config(&tmp.path().join("none.json")).unwrap_err());
        assert!(e.contains("none.json: cannot read"), "{e}");

        write(format!(r#"{{"overlay_root": "{}", "static_root": "{}"}}"#, over.display(), stat.display()));
        let l = Layout::copick_config(&cfg).unwrap();
        let e = l.discover_runs().unwrap_err().to_string();
        assert!(e.contains("copick project") && e.contains("copick.json"), "{e}");
        // Static runs, and overlay runs with a tomogram folder; an overlay run of picks only is
        // the same run as the static one, or no run.
        for d in ["static/ExperimentRuns/TS_a/VoxelSpacing10.000/denoised.zarr", "overlay/ExperimentRuns/TS_a/Picks", "overlay/ExperimentRuns/TS_p/Picks", "overlay/ExperimentRuns/TS_o/VoxelSpacing10.000/denoised.zarr", "overlay/ExperimentRuns/TS_a/VoxelSpacing10.000/wbp.zarr"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        assert_eq!(l.discover_runs().unwrap(), names(&["TS_a", "TS_o"]));
        assert_eq!(l.tomogram_path("TS_a", "denoised").unwrap(), stat.join("ExperimentRuns/TS_a/VoxelSpacing10.000/denoised.zarr"));
        assert_eq!(l.tomogram_path("TS_a", "wbp").unwrap(), over.join("ExperimentRuns/TS_a/VoxelSpacing10.000/wbp.zarr"));
        assert_eq!(l.tomogram_path("TS_o", "denoised").unwrap(), over.join("ExperimentRuns/TS_o/VoxelSpacing10.000/denoised.zarr"));
        let e = l.tomogram_path("TS_a", "isonetcorrected").unwrap_err().to_string();
        assert!(e.contains("it has: denoised, wbp"), "{e}");
        // The competition layout lists the static runs only.
        assert_eq!(Layout { config: None, ..l.clone() }.discover_runs().unwrap(), names(&["TS_a"]));
    }
}
