//! Our kernels are checked on a device before a run trusts it with them. The test suite compares
//! them with the CPU engine on the host (their own source compiled for it), but a compiler,
//! driver or architecture they have not met can still make one compute wrongly on a card, and a
//! wrong kernel gives wrong picks without any error. So the first `fastdet run` on a device runs
//! the self-test's kernel section there (every kernel, and cuDNN's convolutions, against its CPU
//! twin on fresh random data) and remembers a pass in `kernel-checks.json` beside the compiled
//! kernels, keyed by the device, its driver, NVRTC, cuDNN and fastdet's kernels (a passing
//! `fastdet selftest` is remembered too). A failure stops that device's runs and names the
//! failing checks.
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
use super::selftest::{self, Options, Report, Status, Target};
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
    seconds: f64,
}

const WHAT: &str = "remembered kernel checks";

/// `kernel-checks.json` beside the compiled kernels (`KernelCache::default_dir`).
pub fn default_store() -> JsonStore {
    JsonStore::at(KernelCache::default_dir().join("kernel-checks.json"))
}

/// What a pass on `gpu` is valid for.
pub fn check_key(gpu: &Gpu) -> String {
    let cudnn = if gpu.is_emulator() { None } else { Dnn::new(gpu).ok().map(|d| d.version_string()) };
    let nvrtc = nvrtc_version().map_or("none".to_string(), |(a, b)| format!("{a}.{b}"));
    format!("{} | NVRTC {nvrtc} | cuDNN {} | {}", device_key(gpu), cudnn.as_deref().unwrap_or("none"), kernels_key())
}

/// Remembers that every kernel check of `report` passed on `gpu` (nothing when one failed or no
/// kernel was checked).
pub fn remember_pass(gpu: &Gpu, report: &Report, seconds: f64, store: &JsonStore) -> Result<()> {
    let checks = report.rows.iter().filter(|r| r.section == "kernels" && r.status == Status::Pass).count();
    let failed = report.rows.iter().any(|r| r.section == "kernels" && r.status == Status::Fail);
    if failed || checks == 0 {
        return Ok(());
    }
    store.put(WHAT, &[check_key(gpu)], &Passed { checks, seconds: (seconds * 100.0).round() / 100.0 })
}

/// Checks the kernels on `device` as `policy` says (`store`: the remembered passes): the line a
/// run logs (None when nothing was checked) and the device's handle, which the caller keeps
/// while it opens its engines so that the device is not opened twice; an error naming the
/// failing checks when one failed.
pub fn ensure_checked(device: Device, policy: CheckKernels, store: &JsonStore) -> Result<(Option<String>, Option<Arc<Gpu>>)> {
    if policy == CheckKernels::Never {
        return Ok((None, None));
    }
    let gpu = match device {
        Device::Cuda(i) => Gpu::open(i, None)?,
        Device::Emu(i) => Gpu::open_emulator(i)?,
        Device::Cpu => return Ok((None, None)),
    };
    Ok((Some(check(&gpu, device, policy, store)?), Some(gpu)))
}

fn check(gpu: &Arc<Gpu>, device: Device, policy: CheckKernels, store: &JsonStore) -> Result<String> {
    // Two workers on one device check one at a time; the second finds the first's pass.
    let lock = device_lock(gpu);
    let _turn = lock.lock().unwrap_or_else(|e| e.into_inner());
    let key = check_key(gpu);
    if policy == CheckKernels::Once {
        if let Some(p) = store.get::<Passed>(WHAT, &key) {
            return Ok(format!("kernels: {} checks against the CPU engine passed earlier on this device", p.checks));
        }
    }
    let mut opts = Options::new(if gpu.is_emulator() { Target::Emulator } else { Target::Cuda(gpu.info.ordinal) });
    opts.networks = false;
    opts.pipeline = false;
    // Fresh random data at each check.
    opts.seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let started = Instant::now();
    // On the run's own device handle; the self-test synchronises after every launch, which a
    // run does not.
    let report = selftest::run_on(gpu.clone(), &opts, &mut |_| {});
    gpu.set_sync_each(false);
    let report = report?;
    let seconds = started.elapsed().as_secs_f64();
    let failed: Vec<String> = report.rows.iter().filter(|r| r.status == Status::Fail).map(|r| format!("{} {}: max|Δ| {:.2e}, tolerance {:.2e}", r.name, r.shape, r.max_abs, r.tol_abs)).collect();
    if !failed.is_empty() {
        let shown: Vec<&str> = failed.iter().take(3).map(String::as_str).collect();
        bail!(
            "{} of {} kernel checks failed against the CPU engine on {device} ({}{}); fastdet does not run kernels that compute wrongly. \
             `fastdet selftest --device {device}` prints every check; run with --device cpu, or set FASTDET_CHECK_KERNELS=never to run anyway",
            failed.len(),
            report.rows.iter().filter(|r| matches!(r.status, Status::Pass | Status::Fail)).count(),
            shown.join("; "),
            if failed.len() > shown.len() { "; …" } else { "" }
        );
    }
    let checks = report.rows.iter().filter(|r| r.status == Status::Pass).count();
    let kept = match (policy, store.path(), remember_pass(gpu, &report, seconds, store)) {
        (CheckKernels::Always, ..) | (_, None, _) => String::new(),
        (_, Some(p), Ok(())) => format!("; remembered in {}", p.display()),
        (_, Some(_), Err(e)) => format!("; not remembered: {e:#}"),
    };
    Ok(format!("kernels: {checks} checks against the CPU engine passed on this device in {seconds:.1} s{kept}"))
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
        assert!(again.contains("passed earlier on this device"), "{again}");
        assert!(line(CheckKernels::Always).unwrap().contains("passed on this device in"));
        assert!(matches!(ensure_checked(device, CheckKernels::Never, &store).unwrap(), (None, None)));
        assert!(matches!(ensure_checked(Device::Cpu, CheckKernels::Always, &store).unwrap(), (None, None)));

        // A kernel computing wrongly on the device: the check fails naming it, nothing is
        // remembered, and the device stays failed at the next check.
        let wrong = Gpu::open_emulator(8).unwrap();
        wrong.emu().unwrap().compute_wrongly("conv3d_tc");
        let other = JsonStore::at(dir.path().join("other.json"));
        for _ in 0..2 {
            let msg = format!("{:#}", ensure_checked(Device::Emu(8), CheckKernels::Once, &other).err().unwrap());
            assert!(msg.contains("kernel checks failed against the CPU engine on emu:8 (conv3d_tc") && msg.contains("FASTDET_CHECK_KERNELS=never"), "{msg}");
            assert!(!other.path().unwrap().exists(), "a failed check is not remembered");
        }
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
