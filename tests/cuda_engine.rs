//! The CUDA engine against the CPU engine.
//!
//! With a CUDA driver and a GPU: the quick self-test (every kernel against its CPU twin, both seed
//! networks on a 64³ tile). Without one (CI, this repository's development machines) the GPU test
//! prints SKIP and the reason, and the rest checks that "no GPU" is an ordinary error with exit
//! status 2, never a panic, and that the self-test's CLI works on the host emulator of the kernels.

use std::process::Command;

use fastdet::engine::cuda::selftest::{self, Options, Status, Target};
use fastdet::engine::{self, Device};

fn fastdet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fastdet"))
}

#[test]
fn quick_selftest_on_the_gpu() {
    let target = Target::Cuda(0);
    match selftest::check_target(target) {
        Err(e) => {
            println!("SKIP quick_selftest_on_the_gpu: {e:#}");
            return;
        }
        Ok(d) => println!("running the quick self-test on {d}"),
    }
    let mut o = Options::new(target);
    o.quick = true;
    o.pipeline = false;
    let report = selftest::run(&o, &mut |row| println!("{}", row.line())).expect("the self-test starts");
    let fails: Vec<String> = report.rows.iter().filter(|r| r.status == Status::Fail).map(|r| r.line()).collect();
    assert!(report.passed && fails.is_empty(), "{} failure(s):\n{}", fails.len(), fails.join("\n"));
}

#[test]
fn no_gpu_is_an_error_not_a_panic() {
    if fastdet::engine::cuda::driver_available() {
        println!("SKIP no_gpu_is_an_error_not_a_panic: a CUDA driver is present");
        return;
    }
    let w = fastdet::weights::Weights::random(&fastdet::model::spec::ModelSpec::segresnet(8, 16, 8), 1);
    let e = engine::open(Device::Cuda(0), &w).err().expect("no driver: an error");
    assert!(format!("{e:#}").contains("no CUDA driver found"), "{e:#}");
    assert!(fastdet::engine::cuda::probe(0).is_err());

    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("st.json");
    let o = fastdet().args(["selftest", "--device", "cuda:0", "--quick", "--json"]).arg(&json).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("no CUDA driver found") && !err.contains("panicked"), "{err}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["no_device"], true);
}

#[test]
fn selftest_cli_on_the_kernel_emulator() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("st.json");
    let o = fastdet().args(["selftest", "--device", "emu", "--no-networks", "--no-pipeline", "--json"]).arg(&json).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("selftest PASSED") && out.contains("conv3d_igemm_f16") && out.contains("norm group(8)"), "{out}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["passed"], true);
    assert!(j["rows"].as_array().unwrap().len() > 40);
    // A device that does not exist is refused with the accepted forms (cpu runs the CPU self-test:
    // tests/cli.rs).
    let o = fastdet().args(["selftest", "--device", "tpu:0"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cuda:N"));
}

/// The device-check script's own no-GPU path: a clear message, exit status 2, logs written.
#[test]
fn device_check_script_without_a_gpu() {
    if fastdet::engine::cuda::driver_available() {
        println!("SKIP device_check_script_without_a_gpu: a CUDA driver is present");
        return;
    }
    if Command::new("bash").arg("--version").output().is_err() || Command::new("timeout").arg("--version").output().is_err() {
        println!("SKIP device_check_script_without_a_gpu: bash or timeout missing");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("check");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/device-check.sh");
    let o = Command::new("bash").arg(&script).arg(&out).env("FASTDET", env!("CARGO_BIN_EXE_fastdet")).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{text}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("NO USABLE GPU") && text.contains("RESULT: NO GPU"), "{text}");
    for f in ["summary.txt", "summary-final.txt", "env.txt", "selftest-quick.log", "selftest-quick.json", "version.txt"] {
        assert!(out.join(f).is_file(), "{f} not written");
    }
    // Bad usage is refused before anything runs.
    let o = Command::new("bash").arg(&script).output().unwrap();
    assert_eq!(o.status.code(), Some(64));
    let o = Command::new("bash").arg(&script).arg(&out).args(["--budget", "x"]).output().unwrap();
    assert_eq!(o.status.code(), Some(64));
}
