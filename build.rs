//! Records the git commit the binary is built from (`FASTDET_COMMIT`, "unknown" outside a git
//! checkout), so that `fastdet --version`, the self-test and the benchmarks' JSON name it: their
//! logs travel to machines that have no checkout.
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(o.stdout).ok()?.trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let commit = git(&["rev-parse", "--short=7", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FASTDET_COMMIT={commit}");
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
    println!("cargo:rerun-if-changed=build.rs");
}
