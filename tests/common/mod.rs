//! Helpers shared by the integration tests (each test file that needs them says `mod common;`).
#![allow(dead_code)]

use std::path::Path;

/// The fastdet binary of this build, with `--device auto` (run's default) kept on the CPU: the
/// tests compare runs with CPU references and with each other, which a GPU on the test machine
/// must not change (tests/cuda_engine.rs chooses its devices itself).
pub fn fastdet_on_cpu() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fastdet"));
    c.env("CUDA_VISIBLE_DEVICES", "");
    c
}

/// Copies the folder `src` to `dst`, recursively.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let t = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}
