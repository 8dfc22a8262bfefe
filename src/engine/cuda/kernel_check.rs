//! Our kernels are checked on a device before a run trusts it with them. The test suite compares
//! them with the CPU engine on the host (their own source compiled for it), but a compiler,
//! driver or architecture they have not met can still make one compute wrongly on a card, and a
//! wrong kernel gives wrong picks without any error. So the first `fastdet run` on a card model
//! runs the self-test's kernel section on its device (every kernel, and cuDNN's convolutions,
//! against its CPU twin on random data drawn from the self-test's seed, so that `fastdet
//! selftest` repeats the very check) and remembers a pass in `kernel-checks.json` beside the
//! compiled kernels, keyed by the card model, its driver, NVRTC, cuDNN and fastdet's kernels (a
//! passing `fastdet selftest` is remembered too). A kernel that computes wrongly stops that
//! device's runs, names the failing checks and forgets an earlier pass.
//!
//! `FASTDET_CHECK_KERNELS=once` (default: once per key) | `always` | `never`. The emulators
//! are not cards, and the test suite checks them: there only an explicit `once` or `always`
//! checks.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::dnn::Dnn;
use super::gpu::Gpu;
use super::nvrtc::{nvrtc_version, KernelCache};
use super::remembered::{device_key, device_lock, kernels_key, JsonStore};
use super::selftest::{self, Options, Report, Row, Status, Target};
use crate::engine::Device;

/// When a device's kernels are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKernels {
    /// Once per device, driver, NVRTC, cuDNN and kernels (a pass is remembered).
    Once,
    /// At every run.
    Always,
    Never,
}

impl CheckKernels {
    /// `FASTDET_CHECK_KERNELS`; unset: `once` on a GPU, `never` on an emulator.
    pub fn from_env(emulator: bool) -> Result<CheckKernels> {
        let set = std::env::var("FASTDET_CHECK_KERNELS").is_ok_and(|v| !v.is_empty());
        if !set {
            return Ok(if emulator { CheckKernels::Never } else { CheckKernels::Once });
        }
        super::env_choice("FASTDET_CHECK_KERNELS", &[("once", CheckKernels::Once), ("always", CheckKernels::Always), ("never", CheckKernels::Never)])
    }
}

/// A remembered pass.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Passed {
    checks: usize,
}

const WHAT: &str = "remembered kernel checks";

/// `kernel-checks.json` beside the compiled kernels (`KernelCache::default_dir`).
pub fn default_store() -> JsonStore {
    JsonStore::at(KernelCache::default_dir().join("kernel-checks.json"))
}

/// What a pass on `gpu` is valid for: the card model (not the one card: identical cards share
/// a pass), its driver, NVRTC, cuDNN and fastdet's kernels.
pub fn check_key(gpu: &Gpu) -> String {
    let cudnn = Dnn::working_version(gpu);
    let nvrtc = nvrtc_version().map_or("none".to_string(), |(a, b)| format!("{a}.{b}"));
    format!("{} | NVRTC {nvrtc} | cuDNN {} | {}", device_key(gpu), cudnn.as_deref().unwrap_or("none"), kernels_key())
}

/// What the kernel section of a self-test report says of its device.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every kernel check passed (how many).
    Passed(usize),
    /// Kernels that computed wrongly or failed to run (a line each).
    Wrong(Vec<String>),
    /// No kernel computed wrongly, but some checks could not run for want of device memory, or
    /// none ran.
    Unchecked(Vec<String>),
}

pub fn verdict(report: &Report) -> Verdict {
    let rows = || report.rows.iter().filter(|r| r.section == "kernels");
    let line = |r: &&Row| {
        if r.max_abs.is_nan() {
            format!("{} {}: {}", r.name, r.shape, r.note)
        } else {
            format!("{} {}: max|Δ| {:.2e}, tolerance {:.2e}", r.name, r.shape, r.max_abs, r.tol_abs)
        }
    };
    let no_memory = |r: &&Row| r.note.contains("out of device memory");
    let wrong: Vec<String> = rows().filter(|r| r.status == Status::Fail && !no_memory(r)).map(|r| line(&r)).collect();
    let unchecked: Vec<String> = rows().filter(|r| r.status == Status::Fail && no_memory(r)).map(|r| line(&r)).collect();
    let passed = rows().filter(|r| r.status == Status::Pass).count();
    if !wrong.is_empty() {
        Verdict::Wrong(wrong)
    } else if !unchecked.is_empty() || passed == 0 {
        Verdict::Unchecked(unchecked)
    } else {
        Verdict::Passed(passed)
    }
}

/// Keeps `verdict` for the device of `key`: a pass is remembered, wrong kernels forget an
/// earlier pass (so that the next run checks again), anything else changes nothing.
pub fn record(key: &str, verdict: &Verdict, store: &JsonStore) -> Result<()> {
    match verdict {
        Verdict::Passed(checks) => store.put(WHAT, &[key.to_string()], &Passed { checks: *checks }),
        Verdict::Wrong(_) => store.remove::<Passed>(WHAT, &[key.to_string()]),
        Verdict::Unchecked(_) => Ok(()),
    }
}

/// Checks the kernels on `device` as `policy` says (`store`: the remembered passes): the line a
/// run logs (None when nothing was checked) and the device's handle, which the caller keeps
/// while it opens its engines so that the device is not opened twice; an error naming the
/// failing checks when a kernel computed wrongly.
pub fn ensure_checked(device: Device, policy: CheckKernels, store: &JsonStore) -> Result<(Option<String>, Option<Arc<Gpu>>)> {
    if policy == CheckKernels::Never {
        return Ok((None, None));
    }
    let Some(gpu) = device.open_gpu()? else { return Ok((None, None)) };
    Ok((Some(check(&gpu, device, policy, store)?), Some(gpu)))
}

fn check(gpu: &Arc<Gpu>, device: Device, policy: CheckKernels, store: &JsonStore) -> Result<String> {
    // Two workers on one device check one at a time; the second finds the first's pass.
    let lock = device_lock(gpu);
    let _turn = lock.lock().unwrap_or_else(|e| e.into_inner());
    let key = check_key(gpu);
    if policy == CheckKernels::Once {
        if let Some(p) = store.get::<Passed>(WHAT, &key) {
            return Ok(format!("kernels: {} checks against the CPU engine passed earlier on this card model", p.checks));
        }
    }
    // The self-test's own seed (1), so that `fastdet selftest` repeats exactly this check.
    let mut opts = Options::new(if gpu.is_emulator() { Target::Emulator } else { Target::Cuda(gpu.info.ordinal) });
    opts.networks = false;
    opts.pipeline = false;
    let started = Instant::now();
    // On the run's own device handle. The self-test synchronises after every launch: the run's
    // own setting (FASTDET_CUDA_SYNC) comes back afterwards, and its memory peak starts afresh.
    let sync_each = gpu.sync_each();
    let report = selftest::run_on(gpu.clone(), &opts, &mut |_| {});
    gpu.set_sync_each(sync_each);
    gpu.reset_memory_peak();
    let report = report?;
    let seconds = started.elapsed().as_secs_f64();
    let verdict = verdict(&report);
    let kept = match (&verdict, store.path(), record(&key, &verdict, store)) {
        (Verdict::Passed(_), Some(p), Ok(())) if policy == CheckKernels::Once => format!("; remembered in {}", p.display()),
        (Verdict::Passed(_), Some(_), Err(e)) => format!("; not remembered: {e:#}"),
        (Verdict::Wrong(_), Some(p), Err(e)) => format!(" The earlier pass in {} could not be forgotten ({e:#}): delete that file.", p.display()),
        _ => String::new(),
    };
    let reproduce = format!("`fastdet selftest --device {device} --no-networks --no-pipeline` repeats this check and prints every line");
    match verdict {
        Verdict::Passed(checks) => Ok(format!("kernels: {checks} checks against the CPU engine passed on this device in {seconds:.1} s{kept}")),
        Verdict::Wrong(lines) => {
            let shown: Vec<&str> = lines.iter().take(3).map(String::as_str).collect();
            bail!(
                "{} kernel check(s) failed against the CPU engine on {device} ({}{}); fastdet does not run kernels that compute wrongly. \
                 {reproduce}; run with --device cpu, or set FASTDET_CHECK_KERNELS=never to run anyway.{kept}",
                lines.len(),
                shown.join("; "),
                if lines.len() > shown.len() { "; …" } else { "" }
            )
        }
        Verdict::Unchecked(lines) => {
            let why = if lines.is_empty() { "no kernel check ran".to_string() } else { format!("{} check(s) found no device memory: {}", lines.len(), lines[0]) };
            crate::errln!("warning: the kernels could not be checked on {device} ({why}); running unchecked, and checking again next time. {reproduce}");
            Ok(format!("kernels: not checked on this device ({why})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the emulator, asked to: the first check runs the kernel section and remembers the
    /// pass, the next finds it; `always` checks again; `never` and the CPU check nothing; a
    /// kernel computing wrongly fails the check, names it, and is not remembered.
    #[test]
    fn a_device_is_checked_once_and_a_wrong_kernel_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = JsonStore::at(dir.path().join("kernel-checks.json"));
        let device = Device::Emu(7);
        let line = |policy| ensure_checked(device, policy, &store).unwrap().0;
        let first = line(CheckKernels::Once).unwrap();
        assert!(first.starts_with("kernels: ") && first.contains("checks against the CPU engine passed on this device") && first.contains("remembered in"), "{first}");
        let again = line(CheckKernels::Once).unwrap();
        assert!(again.contains("passed earlier on this card model"), "{again}");
        assert!(line(CheckKernels::Always).unwrap().contains("passed on this device in"));
        assert!(matches!(ensure_checked(device, CheckKernels::Never, &store).unwrap(), (None, None)));
        assert!(matches!(ensure_checked(Device::Cpu, CheckKernels::Always, &store).unwrap(), (None, None)));

        // A kernel computing wrongly on the device (held open here, so that the check runs on
        // this very handle): `once` trusts the earlier pass; a check that runs fails naming the
        // kernel and forgets the pass, so that the next `once` checks again and fails again.
        let wrong = Gpu::open_emulator(8).unwrap();
        // A run with FASTDET_CUDA_SYNC=1: it synchronises after every launch before and after.
        wrong.set_sync_each(true);
        let other = JsonStore::at(dir.path().join("other.json"));
        let check = |policy| ensure_checked(Device::Emu(8), policy, &other).map(|(l, _)| l.unwrap());
        assert!(check(CheckKernels::Once).unwrap().contains("remembered in"));
        wrong.emu().unwrap().compute_wrongly("conv3d_tc");
        assert!(check(CheckKernels::Once).unwrap().contains("passed earlier"));
        for policy in [CheckKernels::Always, CheckKernels::Once] {
            let msg = format!("{:#}", check(policy).unwrap_err());
            assert!(msg.contains("kernel check(s) failed against the CPU engine on emu:8 (conv3d_tc") && msg.contains("max|Δ| 1.00e0"), "{msg}");
            assert!(msg.contains("fastdet selftest --device emu:8 --no-networks --no-pipeline") && msg.contains("FASTDET_CHECK_KERNELS=never"), "{msg}");
            assert!(other.read_all::<Passed>(WHAT).is_empty(), "the pass is forgotten");
        }
        // The run's own setting comes back after the check; the memory peak starts afresh.
        assert!(wrong.sync_each());
        assert_eq!(wrong.memory_peak(), wrong.memory_live());
    }

    /// Checks that ran out of device memory leave the device unchecked, not wrong; a report
    /// without kernel rows checks nothing.
    #[test]
    fn out_of_memory_is_not_a_wrong_kernel() {
        let row = |name: &str, status, max_abs: f64, note: &str| Row {
            section: "kernels".into(),
            name: name.into(),
            shape: "4".into(),
            max_abs,
            rel: max_abs,
            tol_abs: 1e-3,
            tol_rel: 1e-3,
            status,
            note: note.into(),
        };
        let report = |rows| Report { device: "d".into(), notes: vec![], rows, timings: vec![], passed: false };
        let ok = row("a", Status::Pass, 0.0, "");
        let oom = row("b", Status::Fail, f64::NAN, "error: out of device memory: 25 MB");
        let bad = row("c", Status::Fail, 0.5, "");
        assert_eq!(verdict(&report(vec![ok.clone(), ok.clone()])), Verdict::Passed(2));
        assert_eq!(verdict(&report(vec![ok.clone(), oom.clone()])), Verdict::Unchecked(vec!["b 4: error: out of device memory: 25 MB".into()]));
        assert_eq!(verdict(&report(vec![ok.clone(), oom, bad])), Verdict::Wrong(vec!["c 4: max|Δ| 5.00e-1, tolerance 1.00e-3".into()]));
        assert_eq!(verdict(&report(vec![])), Verdict::Unchecked(vec![]));
        let launch = row("d", Status::Fail, f64::NAN, "error: an illegal memory access was encountered");
        assert!(matches!(verdict(&report(vec![ok, launch])), Verdict::Wrong(_)));
    }

    #[test]
    fn the_policy_reads_its_variable() {
        let var = "FASTDET_CHECK_KERNELS";
        std::env::remove_var(var);
        assert_eq!(CheckKernels::from_env(false).unwrap(), CheckKernels::Once);
        assert_eq!(CheckKernels::from_env(true).unwrap(), CheckKernels::Never);
        std::env::set_var(var, "always");
        assert_eq!(CheckKernels::from_env(true).unwrap(), CheckKernels::Always);
        std::env::set_var(var, "sometimes");
        assert!(format!("{:#}", CheckKernels::from_env(false).unwrap_err()).contains("expected once, always or never"));
        std::env::remove_var(var);
    }
}
