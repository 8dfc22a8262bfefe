//! Compiles every kernel in `kernels/` with NVRTC, without a GPU: PTX for compute_75 and
//! compute_90 (every `extern "C"` kernel must be in it), and cubins for sm_75 (T4) and sm_90 (H100)
//! whose ptxas report must show no spill and no stack frame (local memory) for any function. Prints a register table.
//!
//! Needs the NVRTC library (`libnvrtc.so.13` on the loader path) and `cuda_fp16.h`
//! (`FASTDET_CUDA_INCLUDE`); `.ci/run` installs both from PyPI wheels. Without NVRTC the test
//! prints SKIP and passes, unless `FASTDET_REQUIRE_NVRTC=1` (set by `.ci/run`), when it fails.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fastdet::engine::cuda::kernels::{kernel_names, SOURCES};
use fastdet::engine::cuda::nvrtc::{self, compile, find_cuda_include, parse_ptxas_report, KernelCache, Target};

const PTX_ARCHS: &[&str] = &["compute_75", "compute_90"];
const CUBIN_ARCHS: &[&str] = &["sm_75", "sm_90"];

fn required() -> bool {
    std::env::var("FASTDET_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

/// The include dir, or None after printing why (and failing when NVRTC is required).
fn setup() -> Option<Vec<PathBuf>> {
    if !nvrtc::nvrtc_available() {
        assert!(!required(), "FASTDET_REQUIRE_NVRTC=1 but NVRTC cannot be loaded ({})", nvrtc::INSTALL_HINT);
        println!("SKIP: NVRTC not found ({})", nvrtc::INSTALL_HINT);
        return None;
    }
    let Some(inc) = find_cuda_include() else {
        assert!(!required(), "FASTDET_REQUIRE_NVRTC=1 but cuda_fp16.h was not found (set FASTDET_CUDA_INCLUDE)");
        println!("SKIP: NVRTC found but not cuda_fp16.h: set FASTDET_CUDA_INCLUDE ({})", nvrtc::INSTALL_HINT);
        return None;
    };
    let (maj, min) = nvrtc::nvrtc_version().expect("NVRTC version");
    println!("NVRTC {maj}.{min}, headers from {}", inc.display());
    Some(vec![inc])
}

/// A `.entry NAME(` line (PTX's kernel entry) for `name`.
fn ptx_has_entry(ptx: &str, name: &str) -> bool {
    ptx.lines().any(|l| {
        let l = l.trim_start();
        (l.starts_with(".visible .entry ") || l.starts_with(".entry ")) && {
            let rest = l.rsplit(".entry ").next().unwrap_or("");
            rest.strip_prefix(name).is_some_and(|r| r.starts_with('(') || r.trim().is_empty())
        }
    })
}

#[test]
fn every_kernel_compiles_for_t4_and_h100_without_spills() {
    let Some(inc) = setup() else { return };
    let mut failures = Vec::new();
    // registers[kernel][arch]
    let mut regs: BTreeMap<String, BTreeMap<&str, u32>> = BTreeMap::new();
    let mut count = 0;
    for (file, src) in SOURCES {
        let names = kernel_names(src);
        assert!(!names.is_empty(), "{file}: no extern \"C\" __global__ kernel");
        for arch in PTX_ARCHS {
            match compile(file, src, arch, &inc) {
                Ok(c) => {
                    let ptx = c.ptx().expect("PTX is text");
                    let target = format!(".target sm_{}", &arch["compute_".len()..]);
                    if !ptx.contains(&target) {
                        failures.push(format!("{file} {arch}: PTX lacks `{target}`"));
                    }
                    for n in &names {
                        if !ptx_has_entry(ptx, n) {
                            failures.push(format!("{file} {arch}: kernel {n} missing from the PTX"));
                        }
                    }
                    if c.log.to_lowercase().contains("warning") {
                        failures.push(format!("{file} {arch}: warnings:\n{}", c.log));
                    }
                    // The *_async_f16 tensor-core kernels copy with cp.async on sm_80+ and
                    // synchronously below.
                    if *file == "conv_tc.cu" && ptx.contains("cp.async.cg.shared.global") != (*arch == "compute_90") {
                        failures.push(format!("{file} {arch}: cp.async {}expected in the PTX", if *arch == "compute_90" { "" } else { "not " }));
                    }
                    count += 1;
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        for arch in CUBIN_ARCHS {
            match compile(file, src, arch, &inc) {
                Ok(c) => {
                    assert!(c.ptx_or_cubin.starts_with(b"\x7fELF"), "{file} {arch}: cubin is not an ELF image");
                    if c.log.to_lowercase().contains("warning") {
                        failures.push(format!("{file} {arch}: warnings:\n{}", c.log));
                    }
                    let report = parse_ptxas_report(&c.log);
                    for n in &names {
                        match report.iter().find(|f| &f.name == n && f.entry) {
                            Some(f) => match f.registers {
                                Some(r) => {
                                    regs.entry(n.clone()).or_default().insert(arch, r);
                                }
                                None => failures.push(format!("{file} {arch}: no register count for {n}:\n{}", c.log)),
                            },
                            None => failures.push(format!("{file} {arch}: kernel {n} not in the ptxas report:\n{}", c.log)),
                        }
                    }
                    for f in &report {
                        // A stack frame is local memory (an array indexed at run time, or a
                        // spill by another name): off-chip traffic in the hot loops.
                        if f.stack_frame != 0 {
                            failures.push(format!("{file} {arch}: {} has a {} byte stack frame (local memory)", f.name, f.stack_frame));
                        }
                        if f.spill_stores != 0 || f.spill_loads != 0 {
                            failures.push(format!(
                                "{file} {arch}: {} spills ({} bytes stores, {} bytes loads)",
                                f.name, f.spill_stores, f.spill_loads
                            ));
                        }
                    }
                    count += 1;
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
    }
    println!("{:<32} {:>6} {:>6}   (registers per thread; no spill, no stack frame anywhere)", "kernel", "sm_75", "sm_90");
    for (k, a) in &regs {
        let g = |arch: &str| a.get(arch).map_or("-".to_string(), |r| r.to_string());
        println!("{k:<32} {:>6} {:>6}", g("sm_75"), g("sm_90"));
    }
    assert!(failures.is_empty(), "{} problem(s):\n{}", failures.len(), failures.join("\n"));
    assert_eq!(count, SOURCES.len() * (PTX_ARCHS.len() + CUBIN_ARCHS.len()));
}

#[test]
fn a_bad_kernel_reports_nvrtc_log() {
    let Some(inc) = setup() else { return };
    let e = compile("bad.cu", "extern \"C\" __global__ void k() { undefined_thing(); }", "compute_75", &inc).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("bad.cu") && msg.contains("undefined_thing"), "{msg}");
}

#[test]
fn kernel_cache_compiles_once_then_hits() {
    let Some(inc) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::new(dir.path());
    let (file, src) = SOURCES[0];
    let (a, compiled) = cache.get_or_compile(file, src, "compute_90", &inc).unwrap();
    assert!(compiled.is_some_and(|s| s > 0.0), "a miss compiles: {compiled:?}");
    let ver = nvrtc::nvrtc_version().unwrap();
    let path = cache.path(file, src, Target::Ptx(90), ver);
    assert!(path.is_file(), "{} not written", path.display());
    // A hit returns the stored bytes (even doctored ones): proof that no recompilation happened.
    std::fs::write(&path, b"// cached\n").unwrap();
    assert_eq!(cache.get_or_compile(file, src, "compute_90", &inc).unwrap(), (b"// cached\n".to_vec(), None));
    assert!(std::str::from_utf8(&a).unwrap().contains(".entry"));
}

/// A first start compiles every kernel file on parallel threads into the cache, each image
/// the one a lone compile gives; the next start finds them all there.
#[test]
fn every_file_compiles_in_parallel_into_the_cache() {
    let Some(inc) = setup() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cache = KernelCache::new(tmp.path().to_path_buf());
    let (first, wall_s) = cache.get_or_compile_all(SOURCES, "compute_90", &inc).unwrap();
    assert_eq!(first.len(), SOURCES.len());
    let sum: f64 = first.iter().map(|(_, t)| t.expect("an empty cache compiles every file")).sum();
    println!("{} files: {sum:.1} s of compiling in {wall_s:.1} s", SOURCES.len());
    for ((file, src), (image, _)) in SOURCES.iter().zip(&first) {
        let ptx = std::str::from_utf8(image).expect("PTX is text");
        for n in kernel_names(src) {
            assert!(ptx_has_entry(ptx, &n), "{file}: {n} missing from its image");
        }
    }
    let (again, _) = cache.get_or_compile_all(SOURCES, "compute_90", &inc).unwrap();
    assert!(again.iter().all(|(_, t)| t.is_none()), "the second start compiles nothing");
    assert!(first.iter().zip(&again).all(|(a, b)| a.0 == b.0));
}
