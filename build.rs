//! Records the git commit the binary is built from (`FASTDET_COMMIT`, "unknown" outside a git
//! checkout), so that `fastdet --version`, the self-test and the benchmarks' JSON name it: their
//! logs travel to machines that have no checkout. A binary built from sources that differ from
//! that commit (uncommitted edits of what is compiled in) gets "-dirty": its figures are not the
//! commit's.
use std::process::Command;

/// What the binary is built from: an edit here since the commit makes the build "-dirty"
/// (tests/cli.rs checks the stamp against the same list).
const COMPILED_IN: &[&str] = &["src", "kernels", "build.rs", "Cargo.toml", "Cargo.lock"];

fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(o.stdout).ok()?.trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let mut commit = git(&["rev-parse", "--short=7", "HEAD"]).unwrap_or_else(|| "unknown".into());
    if commit != "unknown" {
        let diff = Command::new("git").args(["diff", "--quiet", "HEAD", "--"]).args(COMPILED_IN).status();
        if matches!(diff, Ok(st) if st.code() == Some(1)) {
            commit.push_str("-dirty");
        }
    }
    println!("cargo:rustc-env=FASTDET_COMMIT={commit}");
    // Rerun on every edit of what is compiled in, to tell a dirty tree from a clean one.
    for p in COMPILED_IN {
        println!("cargo:rerun-if-changed={p}");
    }
    // Rebuilt when HEAD moves: the HEAD file, the branch it names, and packed refs.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watch.extend(branch);
    for r in watch {
        // Only files that exist: a missing one would make every build rerun this script.
        if let Some(p) = git(&["rev-parse", "--git-path", &r]).filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
