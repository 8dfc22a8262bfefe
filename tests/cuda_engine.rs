//! The CUDA engine against the CPU engine.
//!
//! With a CUDA driver and a GPU: the quick self-test (every kernel against its CPU twin, both seed
//! networks on a 64³ tile). Without one (CI, this repository's development machines) the GPU test
//! prints SKIP and the reason, and the rest checks that "no GPU" is an ordinary error with exit
//! status 2, never a panic, that the self-test's CLI works on the host emulator of the kernels, and
//! that `fastdet run --device emu` (the CUDA path on that emulator) gives the same picks however it
//! blends and however many workers it has.

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

    // Every worker failed: the job is an error naming why, and writes no output.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tmp.path().join("none.csv");
    let o = fastdet()
        .args(["run", "--gpus", "0,1", "--data"])
        .arg(root.join("tests/fixtures/dataset"))
        .arg("--weights")
        .arg(root.join("weights/demo_segresnetv2.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("error: no CUDA driver found") && !err.contains("remaining run(s) go to"), "{err}");
    assert!(!out.exists());
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
    // --pack: the kept files and one archive holding the rest, nothing else.
    let packed = tmp.path().join("packed");
    let o = Command::new("bash").arg(&script).arg(&packed).arg("--pack").env("FASTDET", env!("CARGO_BIN_EXE_fastdet")).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    let mut left: Vec<String> = std::fs::read_dir(&packed).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["logs.tar.gz", "selftest-quick.log", "summary-final.txt"]);
    let listing = Command::new("tar").arg("-tzf").arg(packed.join("logs.tar.gz")).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for f in ["./summary.txt", "./env.txt", "./selftest-quick.json", "./version.txt", "./summary-final.txt"] {
        assert!(listing.lines().any(|l| l == f), "{f} not in the archive:\n{listing}");
    }
    // Bad usage is refused before anything runs.
    let o = Command::new("bash").arg(&script).output().unwrap();
    assert_eq!(o.status.code(), Some(64));
    let o = Command::new("bash").arg(&script).arg(&out).args(["--budget", "x"]).output().unwrap();
    assert_eq!(o.status.code(), Some(64));
    // A --data folder holding the user's files is refused, not emptied.
    let precious = tmp.path().join("precious");
    std::fs::create_dir_all(&precious).unwrap();
    std::fs::write(precious.join("keep.txt"), b"keep").unwrap();
    let o = Command::new("bash").arg(&script).arg(&out).arg("--data").arg(&precious).env("FASTDET", env!("CARGO_BIN_EXE_fastdet")).output().unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&o.stderr).contains("was not made by this script"));
    assert_eq!(std::fs::read(precious.join("keep.txt")).unwrap(), b"keep");
}

/// tools/bench_torch.py --profile sorts each profiled kernel by its name: cuDNN's convolutions
/// (fprop and the dgrad of transposed ones), normalisations (Triton-fused ones too), the other
/// Triton kernels, the rest; and sums them per call. (Importing it needs no torch.)
#[test]
fn bench_torch_profile_puts_kernels_in_classes() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIP bench_torch_profile_puts_kernels_in_classes: python3 missing");
        return;
    }
    let code = r#"
import sys
sys.dont_write_bytecode = True
import bench_torch as b
cases = {
    "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_ndhwc_kernel": "conv",
    "sm80_xmma_dgrad_implicit_gemm_indexed_f16f16": "conv",
    "void cudnn::cnn::conv2d_grouped_direct_kernel": "conv",
    "triton_red_fused_native_group_norm_relu_0": "norm",
    "void cudnn::bn_fw_inf_1C11_kernel_NCHW": "norm",
    "triton_poi_fused_add_leaky_relu_3": "fused",
    "void at::native::vectorized_elementwise_kernel<4>": "other",
    "Memcpy DtoD (Device -> Device)": "other",
    "aten::mkldnn_convolution": "conv",
    "aten::native_group_norm": "norm",
}
for name, want in cases.items():
    got = b.kernel_class(name)
    assert got == want, (name, got, want)
p = b.summarize_profile([("sm90_xmma_fprop", 3000.0), ("triton_poi_fused_add", 600.0), ("Memcpy", 300.0), ("triton_per_fused_group_norm", 900.0)], 3, top=2)
assert p["calls"] == 3, p
assert p["ms_per_call"] == {"conv": 1.0, "norm": 0.3, "fused": 0.2, "other": 0.1}, p
assert [t["kernel"] for t in p["top"]] == ["sm90_xmma_fprop", "triton_per_fused_group_norm"], p
print("ok")
"#;
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools");
    let o = Command::new("python3").current_dir(&tools).args(["-c", code]).output().unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "ok", "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

/// The device-check script's GPU path, which no machine here can take, run end to end with
/// stand-ins for the fastdet binary and the criterion bench that answer as a GPU machine would:
/// every step runs in its order and passes, and the summary and results.json gather their
/// figures. (It checks the script's logic, not a GPU.)
#[test]
fn device_check_script_runs_every_gpu_step_in_order() {
    for tool in ["bash", "timeout", "python3"] {
        if Command::new(tool).arg("--version").output().is_err() {
            println!("SKIP device_check_script_runs_every_gpu_step_in_order: {tool} missing");
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("fastdet");
    std::fs::write(
        &fake,
        r#"#!/usr/bin/env bash
# Stand-in for fastdet on a GPU machine.
echo "$*" >> "$FAKE_CALLS"
cmd="$1"; shift
case "$cmd" in
  --version) echo "fastdet 0.0.0 (stand-in)" ;;
  selftest)
    mkdir -p "$FASTDET_KERNEL_CACHE" && echo cubin > "$FASTDET_KERNEL_CACHE/conv_tc.sm_90.cubin"
    case "$*" in *--no-networks*) ;; *) [ -n "${FAKE_SELFTEST_FAILS:-}" ] && { echo "selftest FAILED: 2 passed, 1 failed"; exit 1; } ;; esac
    while [ $# -gt 0 ]; do [ "$1" = --json ] && echo '{"passed": true, "device": "cuda:0 Stand-in H200 (sm_90, 132 SMs, 139.8 GiB), driver CUDA 13.0", "notes": ["kernels: sm_90 from NVRTC 13.0 (cache k; 13 files, 13 compiled by NVRTC in 21.5 s, loaded in 22.0 s)"]}' > "$2"; shift; done
    echo "selftest PASSED: 3 passed, 0 failed, 0 skipped in 0.1 s on a stand-in" ;;
  bench)
    case "$*" in
      *--host-blend*) echo '{"device": "cuda:0", "tomogram": [32, 64, 64], "models": {"segresnetv2": 5, "dynunet": 5}, "device_blend": false, "s_per_tomogram": 2.5, "upload_s": 0.0, "infer_s": 1.8, "blend_s": 0.5, "detect_s": 0.2, "tflops": 80.0, "flops_per_tomogram": 2e14, "cold_start_s": 0.5}' ;;
      *--tomogram*--batch\ 2*) echo '{"device": "cuda:0", "tomogram": [32, 64, 64], "models": {"segresnetv2": 5, "dynunet": 5}, "batch": 2, "device_blend": true, "s_per_tomogram": 1.25, "upload_s": 0.03, "infer_s": 0.8, "blend_s": 0.3, "detect_s": 0.15, "tflops": 120.0, "flops_per_tomogram": 2e14, "cold_start_s": 0.5}' ;;
      *--tomogram*) s=1.5; [ "${FASTDET_CONV:-}" = measure ] && s=1.4
         echo '{"device": "cuda:0", "tomogram": [32, 64, 64], "models": {"segresnetv2": 5, "dynunet": 5}, "device_blend": true, "s_per_tomogram": '"$s"', "upload_s": 0.03, "infer_s": 1.0, "blend_s": 0.3, "detect_s": 0.2, "tflops": 100.0, "flops_per_tomogram": 2e14, "cold_start_s": 0.5, "device_memory_peak_mib": 1843.0, "card_memory_in_use_mib": 2662.0}' ;;
      *) choice=null
         echo "bench sees LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >> "$FAKE_CALLS"
         profile=null
         case "$*" in *--profile*) profile='{"steps": [{"ops": [0, 2], "label": "conv3x3x3/s1 1->32 + groupnorm(8)+relu @ 8x8x8", "kind": "conv3x3x3 + groupnorm", "ms": 3.0, "gflop": 300.0}, {"ops": [2, 3], "label": "add @ 8x8x8", "kind": "add", "ms": 1.0, "gflop": 0.0}], "by_kind": [{"kind": "conv3x3x3 + groupnorm", "ms": 3.0, "steps": 1, "gflop": 300.0, "tflops": 100.0}, {"kind": "add", "ms": 1.0, "steps": 1, "gflop": 0.0, "tflops": null, "min_gbytes": 1.5, "gbps": 1500.0}], "sum_ms": 4.0}' ;; esac
         [ "${FASTDET_CONV:-}" = measure ] && choice='{"label": "tc-wide", "remembered": false, "batch": 1, "ms_per_walk": {"cudnn": 5.5, "tc": 4.75, "tc-wide": 4.5, "tc-async": null}}'
         echo '{"device": "cuda:0", "tile": [192, 128, 128], "batch": 1, "fastdet_version": "0", "cold_start_s": 0.4, "kernel_load": {"files": 13, "compiled": 0, "compile_s": 0.0, "load_s": 0.05}, "models": [{"model": "segresnetv2", "engine": "cuda:0:stand-in", "ms_per_tile": 5.0, "ms_per_tile_min": 4.9, "ms_per_tile_max": 5.1, "gflops": 1000.0, "open_s": 0.2, "device_memory_peak_mib": 900.0, "conv_choice": '"$choice"', "profile": '"$profile"'}]}' ;;
    esac ;;
  synth) mkdir -p "$1" ;;
  run)
    echo "run sees FASTDET_CHECK_KERNELS=${FASTDET_CHECK_KERNELS:-unset}" >> "$FAKE_CALLS"
    case " $* " in *" --device "*|*" --devices "*) ;; *) echo "auto sees CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}" >> "$FAKE_CALLS"
      echo "2 run(s), 2 model(s) on cuda:0 (auto: 1 GPU(s), the first a Stand-in H200), window 192,128,128" >&2 ;; esac
    while [ $# -gt 0 ]; do [ "$1" = --out ] && echo "experiment,particle_type,x,y,z" > "$2"; shift; done
    echo "wrote 0 picks" ;;
  score) echo "total 0 0 0 0.5" ;;
  *) echo "stand-in: unexpected command $cmd" >&2; exit 9 ;;
esac
"#,
    )
    .unwrap();
    let bench = tmp.path().join("cuda_ops");
    std::fs::write(
        &bench,
        r#"#!/usr/bin/env bash
# Stand-in for the criterion bench: one block group with two variants, one tile group with two,
# one transposed-conv group with two.
for v in cudnn tc_fused; do
  mkdir -p "$CRITERION_HOME/block_32ch_8x8x8/$v/new"
  echo '{"median": {"point_estimate": 1500000.0}}' > "$CRITERION_HOME/block_32ch_8x8x8/$v/new/estimates.json"
done
for v in tc tc_wide; do
  mkdir -p "$CRITERION_HOME/tile_dynunet/$v/new"
  echo '{"median": {"point_estimate": 4250000.0}}' > "$CRITERION_HOME/tile_dynunet/$v/new/estimates.json"
done
for v in fma tc; do
  mkdir -p "$CRITERION_HOME/convt_128to64_48x32x32/$v/new"
  echo '{"median": {"point_estimate": 250000.0}}' > "$CRITERION_HOME/convt_128to64_48x32x32/$v/new/estimates.json"
done
echo "block_32ch_8x8x8/tc_fused time: [1.4 ms 1.5 ms 1.6 ms]"
"#,
    )
    .unwrap();
    // compute-sanitizer: runs the command it wraps and reports no finding.
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let sanitizer = bin.join("compute-sanitizer");
    std::fs::write(
        &sanitizer,
        r#"#!/usr/bin/env bash
echo "compute-sanitizer $*" >> "$FAKE_CALLS"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift 2; done
"$@" || exit $?
if [ -n "${FAKE_SANITIZER_FINDS:-}" ]; then
  echo "========= Invalid __global__ read of size 16 bytes"
  echo "========= ERROR SUMMARY: 1 error"
  exit 99
fi
echo "========= ERROR SUMMARY: 0 errors"
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in [&fake, &bench, &sanitizer] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // A cuDNN of the Python wheels' kind (libcudnn.so.9 alone) on a library folder the user names.
    let wheel_cudnn = tmp.path().join("wheel-cudnn");
    std::fs::create_dir(&wheel_cudnn).unwrap();
    std::fs::write(wheel_cudnn.join("libcudnn.so.9"), b"").unwrap();
    let out = tmp.path().join("check");
    let calls = tmp.path().join("calls.txt");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/device-check.sh");
    // A `torch` that imports and has nothing: the PyTorch baseline starts, with the options
    // FASTDET_TORCH_ARGS adds, and fails, which the check notes without failing.
    let fake_torch = tmp.path().join("py/torch");
    std::fs::create_dir_all(&fake_torch).unwrap();
    std::fs::write(fake_torch.join("__init__.py"), b"").unwrap();
    let o = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .args(["--pack", "--budget", "400", "--data"])
        .arg(tmp.path().join("data"))
        .env("PYTHONPATH", tmp.path().join("py"))
        .env("FASTDET_TORCH_ARGS", "--modes compile --batches 1,2")
        .env("FASTDET", &fake)
        .env("FASTDET_CUDA_BENCH", &bench)
        .env("FAKE_CALLS", &calls)
        .env("FASTDET_CHECK_SHAPE", "32,64,64")
        .env("FASTDET_CHECK_LIBDIRS", &wheel_cudnn)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("RESULT: PASS"), "{text}");
    // --pack left six files; the archive holds the rest (unpacked here for the checks below).
    let mut left: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["logs.tar.gz", "results.json", "results.md", "selftest-full.log", "selftest-quick.log", "summary-final.txt"]);
    assert!(Command::new("tar").arg("-xzf").arg(out.join("logs.tar.gz")).arg("-C").arg(&out).status().unwrap().success());
    assert!(out.join("criterion/tile_dynunet/tc_wide/new/estimates.json").is_file() && !out.join("kernel-cache").exists());
    // The synthetic data it made is removed (it carries the script's mark).
    assert!(!tmp.path().join("data").exists());
    // Each step passed, in this order: the full self-test and the timed run before the longer
    // benchmarks (the PyTorch baseline, failing here on a stand-in torch, is checked below).
    let steps = [
        "selftest --quick",
        "bench fastdet ",
        "bench fastdet --batch 2",
        "bench fastdet tensor-core",
        "bench fastdet measured choice",
        "bench fastdet cuDNN graph API",
        "bench fastdet (wheel cuDNN)",
        "selftest (full)",
        "bench tomogram (5+5 models)",
        "bench tomogram measured choice",
        "synth 2 runs 32,64,64",
        "run --device cuda:0 (2 models)",
        "score gpu.csv",
        "run again: same bytes",
        "run --devices cuda:0,cuda:0: same bytes",
        "run --device auto (the default): same bytes",
        "bench tomogram --host-blend",
        "bench tomogram --batch 2",
        "bench fastdet cuDNN graph API + runtime-compiled",
        "bench criterion cuda_ops",
        "sanitizer memcheck (kernels)",
        "sanitizer racecheck (kernels)",
    ];
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    let mut at = 0;
    for s in steps {
        let line = summary[at..].lines().find(|l| l.starts_with(s)).unwrap_or_else(|| panic!("step {s:?} missing or out of order:\n{summary}"));
        assert!(line.contains("PASS"), "{line}");
        at += summary[at..].find(line).unwrap() + line.len();
    }
    // The PyTorch baseline ran with the extra options last, failed on the stand-in torch, and
    // was only noted.
    let commands = std::fs::read_to_string(out.join("commands.txt")).unwrap();
    assert!(text.contains("bench torch") && text.contains("note: bench torch failed"), "{text}");
    let torch = commands.lines().find(|l| l.starts_with(">> bench torch")).unwrap_or_else(|| panic!("{commands}"));
    // Its place: after the tomogram benches, before the synthetic run.
    let at = |name: &str| commands.find(&format!(">> {name}")).unwrap_or_else(|| panic!("{name}: {commands}"));
    assert!(at("bench tomogram measured choice") < at("bench torch") && at("bench torch") < at("synth 2 runs"), "{commands}");
    assert!(torch.contains("bench_torch.py --device cuda:0") && torch.contains(" --profile ") && torch.ends_with(" --modes compile --batches 1,2"), "{torch}");
    // The tensor-core bench ran with FASTDET_CONV=tc; the figures reached results.json.
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert!(calls.lines().filter(|l| l.starts_with("bench --device cuda:0 --tile 192,128,128")).count() == 7, "{calls}");
    assert!(calls.contains("bench --device cuda:0 --tile 192,128,128 --batch 2 "), "{calls}");
    // The first per-tile bench and the graph API's profile a walk; the summary shows it by kind.
    assert_eq!(calls.lines().filter(|l| l.starts_with("bench ") && l.contains("--profile")).count(), 2, "{calls}");
    assert!(text.contains("profile: 4.00 ms in 2 steps; by kind:") && text.contains("conv3x3x3 + groupnorm") && text.contains("100.0 TFLOP/s"), "{text}");
    assert!(text.contains("1 step(s)  1500 GB/s at least"), "{text}");
    // The wheels' cuDNN bench ran with a folder holding a libcudnn.so link to it first on the path;
    // the other benches with the user's folder first.
    let wheel_dir = wheel_cudnn.to_string_lossy().into_owned();
    let paths: Vec<&str> = calls.lines().filter_map(|l| l.strip_prefix("bench sees LD_LIBRARY_PATH=")).collect();
    assert_eq!(paths.len(), 7, "{calls}");
    assert_eq!(paths.iter().filter(|p| p.starts_with(&wheel_dir)).count(), 6, "{calls}");
    let linked = paths.iter().find(|p| !p.starts_with(&wheel_dir)).unwrap();
    assert_eq!(linked.split(':').nth(1), Some(wheel_dir.as_str()), "the link's folder, then the rest: {linked}");
    // The same command again, two workers on the card, and no device (auto): each compared byte
    // for byte; auto's log names the GPU it took.
    assert!(calls.lines().filter(|l| l.starts_with("run --data")).count() == 4 && calls.contains("--devices cuda:0,cuda:0 --out"), "{calls}");
    assert!(calls.lines().any(|l| l.starts_with("run --data") && !l.contains("--device")), "{calls}");
    assert!(!text.contains("run --device auto: the log does not show"), "{text}");
    assert!(calls.contains("auto sees CUDA_VISIBLE_DEVICES=0\n"), "auto is shown the first card only: {calls}");
    assert!(text.contains("same bytes as"), "{text}");
    for tool in ["memcheck", "racecheck"] {
        assert!(calls.contains(&format!("compute-sanitizer --tool {tool} --error-exitcode 99 --print-limit 30 {} selftest --device cuda:0 --quick --no-networks --no-pipeline", fake.display())), "{calls}");
    }
    assert!(text.contains("sanitizer-racecheck.log: ERROR SUMMARY: 0 errors"), "{text}");
    // The self-test passed: runs check their kernels as a user's would (the pass is remembered).
    assert!(calls.contains("run sees FASTDET_CHECK_KERNELS=unset"), "{calls}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["tile"]["segresnetv2"]["fastdet_ms"], 5.0);
    assert_eq!(r["tile"]["segresnetv2"]["fastdet_fused_ms"], 5.0);
    assert_eq!(r["tile"]["segresnetv2"]["fastdet_batch2_ms"], 5.0);
    assert_eq!(r["tile"]["segresnetv2"]["fastdet_graph_ms"], 5.0);
    assert_eq!(r["blocks"]["32ch_8x8x8"]["tc_fused_ms"], 1.5);
    assert_eq!(r["tile_criterion"]["dynunet"]["tc_wide_ms"], 4.25);
    assert_eq!(r["convt"]["128to64_48x32x32"]["tc_ms"], 0.25);
    assert_eq!(r["card"], "Stand-in H200", "the card from the self-test's device when PyTorch did not run");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    // fastdet's own profile by kind, for each API's walk.
    assert!(md.contains("- segresnetv2, default path: conv3x3x3 + groupnorm 3.00 ms (100 TFLOP/s); add 1.00 ms (≥ 1500 GB/s)"), "{md}");
    assert_eq!(r["tile"]["segresnetv2"]["fastdet_profile"]["cudnn_graph"][1]["gbps"], 1500.0);
    // The measured choice's walk (device-resident, batch 1) stands in for a bench without
    // ms_per_tile_device.
    assert!(md.contains("| segresnetv2 | – | – | 5.00 ms | 5.00 ms | 5.00 ms | 5.00 ms / 4.50 ms (tc-wide) |") && md.contains("| dynunet | – | – | – | – | – | – | – | – | – | – | – |\n"), "{md}");
    assert!(md.contains("- segresnetv2: tc-wide chosen; cudnn 5.50 ms, tc 4.75 ms, tc-wide 4.50 ms, tc-async failed"), "{md}");
    assert_eq!(r["tile"]["segresnetv2"]["conv_choice"], "tc-wide");
    assert!(text.contains("measured choice: tc-wide (ms per walk of 1: cudnn 5.50, tc 4.75, tc-wide 4.50, tc-async failed)"), "{text}");
    // The full self-test's log closes the section, command line and all.
    assert!(md.contains("Self-test log (selftest-full.log") && md.contains("```text\n# ") && md.contains("selftest PASSED: 3 passed"), "{md}");
    assert_eq!(r["tomogram_s"], 1.5);
    assert_eq!(r["tomogram_host_blend_s"], 2.5);
    assert_eq!(r["tomogram_batch2_s"], 1.25);
    assert_eq!(r["tomogram_measured_s"], 1.4);
    assert!(md.contains("| 1.50 s | 2.50 s | 1.25 s | 1.40 s |"), "{md}");
    assert_eq!(r["first_start_nvrtc_s"], 21.5);
    assert_eq!(r["cold_start_kernels_compiled"], 0);
    assert!(text.contains(r#""tomogram_host_blend_s": 2.5"#) && text.contains(r#""first_start_nvrtc_s": 21.5"#), "{text}");
    assert!(text.contains("cold start 0.40 s to the first tile; kernels: 13 files, 0 compiled (0.0 s), loaded in 0.05 s"), "{text}");
    assert!(text.contains("blending on the GPU; upload 0.03") && text.contains("blending on the CPU; upload 0.00"), "{text}");
    // Device memory of the tomogram's worker: fastdet's buffers and the whole card.
    assert!(text.contains("; fastdet's device memory peak 1843 MiB; card memory in use 2662 MiB)"), "{text}");
    assert!((r["tomogram_peak_mem_gib"].as_f64().unwrap() - 1843.0 / 1024.0).abs() < 1e-12 && (r["card_mem_gib"].as_f64().unwrap() - 2662.0 / 1024.0).abs() < 1e-12);
    assert!(md.contains("1.80 GiB (the tomogram's ensemble; card in use 2.60 GiB)"), "{md}");
    assert!(text.contains("block 32ch_8x8x8") && text.contains("tc_fused 1.500 ms"), "{text}");
    assert!(text.contains("tile  dynunet") && text.contains("tc_wide 4.250 ms"), "{text}");
    assert!(text.contains("convT 128to64_48x32x32") && text.contains("fma 0.250 ms  tc 0.250 ms"), "{text}");

    // A sanitizer finding fails the check, and the summary names it. Here the self-test fails
    // too: the runs after it skip their kernel check so that their timings are still taken.
    let o = Command::new("bash")
        .arg(&script)
        .arg(tmp.path().join("check-finding"))
        .args(["--skip-torch", "--skip-full", "--budget", "400", "--data"])
        .arg(tmp.path().join("data"))
        .env("FASTDET", &fake)
        .env("FASTDET_CUDA_BENCH", &bench)
        .env("FAKE_CALLS", tmp.path().join("calls2.txt"))
        .env("FAKE_SANITIZER_FINDS", "1")
        .env("FAKE_SELFTEST_FAILS", "1")
        .env("FASTDET_CHECK_SHAPE", "32,64,64")
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    let calls = std::fs::read_to_string(tmp.path().join("calls2.txt")).unwrap();
    assert!(calls.contains("run sees FASTDET_CHECK_KERNELS=never") && !calls.contains("=unset"), "{calls}");
    assert!(text.lines().any(|l| l.starts_with("selftest --quick") && l.contains("FAIL(1)")), "{text}");
    assert!(text.contains("the runs below skip their kernel check (FASTDET_CHECK_KERNELS=never)"), "{text}");
    assert!(text.contains("RESULT: FAIL") && text.contains("sanitizer-memcheck.log: ERROR SUMMARY: 1 error"), "{text}");
    assert!(text.contains("1 ========= Invalid __global__ read of size 16 bytes"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("sanitizer memcheck (kernels)") && l.contains("FAIL(99)")), "{text}");
}

/// `fastdet run` on the fixture dataset with demo `models` at a small window, compiled kernels
/// and remembered choices in `dir/kernels`: (the CSV, stderr); asserts success.
fn small_run(dir: &std::path::Path, name: &str, models: &[&str], env: &[(&str, &str)], args: &[&str]) -> (String, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = dir.join(format!("{name}.csv"));
    let o = fastdet()
        .envs(env.iter().copied())
        .env("FASTDET_KERNEL_CACHE", dir.join("kernels"))
        .args(["run", "--data"])
        .arg(root.join("tests/fixtures/dataset"))
        .arg("--weights")
        .args(models.iter().map(|m| root.join(format!("weights/{m}.safetensors"))))
        .args(["--window", "32,64,64", "--tiles", "1,2,2", "--out"])
        .arg(&out)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{name}: {err}");
    (std::fs::read_to_string(&out).unwrap(), err)
}

/// `FASTDET_CONV=measure`: the first run times the convolution paths of each network on its batch
/// and window and says which won; the second takes the remembered choices (no timing) and gives
/// the same picks.
#[test]
fn a_measured_convolution_choice_is_logged_remembered_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str| small_run(tmp.path(), name, &["demo_segresnetv2", "demo_dynunet"], &[("FASTDET_CONV", "measure")], &["--device", "emu", "--runs", "TS_synth_1"]);
    let (first, log) = run("first");
    // The two demo networks differ: one line each, every tensor-core variant timed.
    assert_eq!(log.matches("convolutions of 1 model(s): tc").count(), 2, "{log}");
    assert_eq!(log.matches(", measured now (FASTDET_CONV=measure on emu:0)").count(), 2, "{log}");
    assert!(log.contains("tc-wide-async") && log.contains("tc-norms-in-loads") && log.contains("tc-halo-norms-in-loads"), "{log}");
    let stored = std::fs::read_to_string(tmp.path().join("kernels/conv-choices.json")).unwrap();
    assert_eq!(stored.matches("\"choice\"").count(), 2, "{stored}");
    let (second, log2) = run("second");
    assert_eq!(log2.matches(", measured earlier (FASTDET_CONV=measure on emu:0)").count(), 2, "{log2}");
    assert_eq!(first, second, "the remembered choice runs the same path");
    assert!(first.lines().count() > 1, "picks expected:\n{first}");
}

/// The first run on a device checks our kernels there against the CPU engine and remembers the
/// pass; two workers on one device check once; the next run finds the pass; `never` skips it.
#[test]
fn a_run_checks_the_kernels_on_its_device_once() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, policy: &str| small_run(tmp.path(), name, &["demo_segresnetv2"], &[("FASTDET_CHECK_KERNELS", policy)], &["--devices", "emu:0,emu:0"]).1;
    let log = run("first", "once");
    assert_eq!(log.matches("checks against the CPU engine passed on this device in").count(), 1, "{log}");
    assert_eq!(log.matches("checks against the CPU engine passed earlier on this card model").count(), 1, "{log}");
    assert!(tmp.path().join("kernels/kernel-checks.json").exists());
    let log = run("second", "once");
    assert_eq!(log.matches("checks against the CPU engine passed earlier on this card model").count(), 2, "{log}");
    let log = run("third", "never");
    assert!(!log.contains("checks against the CPU engine"), "{log}");
}

/// `fastdet run` on the emulated GPU takes the CUDA path end to end (device blending and peak
/// finding, CUDA graphs, one worker per device): the picks do not depend on where the blending
/// runs or on how many workers there are, and match the CPU engine's within fp16 tolerance.
#[test]
fn run_on_the_emulated_gpu_is_the_same_across_workers_and_blending() {
    let tmp = tempfile::tempdir().unwrap();
    let run_env = |name: &str, args: &[&str], env: &[(&str, &str)]| -> (String, String) {
        let args: Vec<&str> = ["--with-score"].iter().chain(args).copied().collect();
        small_run(tmp.path(), name, &["demo_segresnetv2", "demo_dynunet"], env, &args)
    };
    let run = |name: &str, args: &[&str]| run_env(name, args, &[]);
    let (gpu, log) = run("emu", &["--device", "emu"]);
    // 2 runs x 4 tiles x 2 models: each model's first batch eager, the rest from its graph.
    assert!(log.contains("CUDA graphs on emu:0: 14 batch(es) replayed from 2 graph(s), 2 run eagerly"), "{log}");
    // Each volume went up once, from the reader thread (a side stream on a GPU).
    assert_eq!(log.matches(" s (copied ahead), infer ").count(), 2, "{log}");
    let (in_turn, log_in_turn) = run_env("in-turn", &["--device", "emu"], &[("FASTDET_OVERLAP_UPLOAD", "0")]);
    assert_eq!(gpu, in_turn, "volumes copied ahead or in their turn give the same picks");
    assert!(log_in_turn.matches(", upload ").count() == 2 && !log_in_turn.contains("copied ahead"), "{log_in_turn}");
    let (host_blend, _) = run("host-blend", &["--device", "emu", "--host-blend"]);
    assert_eq!(gpu, host_blend, "blending on the device and on the host give the same picks");
    let (two, log2) = run("two", &["--devices", "emu:0,emu:1"]);
    assert!(log2.contains("[emu:0] TS_synth_1:") && log2.contains("[emu:1] TS_synth_2:"), "worker k takes runs[k::2]:\n{log2}");
    assert_eq!(gpu, two, "two workers give one worker's output");
    let (same_card, _) = run("same-card", &["--devices", "emu:0,emu:0"]);
    assert_eq!(gpu, same_card, "two workers on one device");
    // No more workers than runs: one run, one worker; the second device is not opened.
    let (one, log_one) = run("one-run", &["--devices", "emu:0,emu:1", "--runs", "TS_synth_1"]);
    let first_run: Vec<&str> = gpu.lines().filter(|l| !l.contains(",TS_synth_2,")).collect();
    assert_eq!(one.lines().collect::<Vec<_>>(), first_run, "the first run's picks");
    assert!(log_one.contains("1 run(s) to compute: worker(s) on emu:0; emu:1 stand by") && log_one.contains("\n  TS_synth_1: "), "{log_one}");
    assert!(!log_one.contains("[emu:") && !log_one.contains("on emu:1"), "nothing ran on emu:1:\n{log_one}");
    // A device that cannot work does not stop the others: its runs go to one that did.
    let (handed, log_handed) = run("handed-over", &["--devices", "emu:0,cuda:99"]);
    assert_eq!(gpu, handed, "the runs of a failed worker, done by another");
    assert!(log_handed.contains("warning: cuda:99 failed: ") && log_handed.contains("its 1 remaining run(s) go to emu:0") && log_handed.contains("[emu:0] TS_synth_2:"), "{log_handed}");
    // With fewer runs than devices, the devices left out stand by: one takes a failed worker's runs.
    let (spare, log_spare) = run("spare", &["--devices", "cuda:99,emu:0", "--runs", "TS_synth_2"]);
    let second_run: Vec<&str> = gpu.lines().filter(|l| !l.contains(",TS_synth_1,")).map(|l| l.split_once(',').unwrap().1).collect();
    assert_eq!(spare.lines().map(|l| l.split_once(',').unwrap().1).collect::<Vec<_>>(), second_run, "the second run's picks (ids aside)");
    assert!(log_spare.contains("warning: cuda:99 failed: ") && log_spare.contains("its 1 remaining run(s) go to emu:0"), "{log_spare}");

    // Against the CPU engine: every pick matched within a voxel (10.012 Å) and 0.01 in score.
    let (cpu, _) = run("cpu", &["--device", "cpu"]);
    let rows = |csv: &str| -> Vec<(String, String, f64, [f64; 3])> {
        csv.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let v = |i: usize| f[i].parse::<f64>().unwrap();
                (f[1].to_string(), f[2].to_string(), v(3), [v(4), v(5), v(6)])
            })
            .collect()
    };
    let (g, c) = (rows(&gpu), rows(&cpu));
    assert!(!c.is_empty() && g.len() == c.len(), "{} picks on the emulated GPU, {} on the CPU", g.len(), c.len());
    let mut used = vec![false; g.len()];
    for (run, class, score, at) in &c {
        let hit = g.iter().enumerate().position(|(j, (r, k, s, p))| {
            !used[j] && r == run && k == class && (s - score).abs() <= 0.01 && (0..3).map(|a| (p[a] - at[a]).powi(2)).sum::<f64>().sqrt() <= 10.012
        });
        let j = hit.unwrap_or_else(|| panic!("CPU pick {run} {class} {score} {at:?} has no match on the emulated GPU"));
        used[j] = true;
    }
}

/// The JSON the real binary writes (`bench`, `bench` on the tensor-core path, `bench --tomogram`;
/// here on the emulated GPU at toy sizes) is what tools/results_json.py reads: its figures reach
/// results.json unchanged (the device-check test above uses hand-written stand-ins).
#[test]
fn results_json_reads_the_benches_the_binary_writes() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIP results_json_reads_the_benches_the_binary_writes: python3 missing");
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    // A folder without any bench output (a check that found no GPU) gives no figures at all.
    let o = Command::new("python3").arg(root.join("tools/results_json.py")).arg(tmp.path()).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty() && String::from_utf8_lossy(&o.stderr).contains("nothing was measured"));
    let bench = |file: &str, conv: &str, args: &[&str]| -> serde_json::Value {
        let o = fastdet()
            .args(["bench", "--device", "emu", "--iters", "1", "--warmup", "0", "--json"])
            .args(args)
            .env("FASTDET_CONV", conv)
            .env("FASTDET_KERNEL_CACHE", tmp.path().join("kernels"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{file}: {}", String::from_utf8_lossy(&o.stderr));
        std::fs::write(tmp.path().join(file), &o.stdout).unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let tile = bench("bench-fastdet.json", "auto", &["--tile", "32,32,32", "--profile"]);
    let tile_tc = bench("bench-fastdet-tc.json", "tc", &["--tile", "32,32,32"]);
    let tile_measured = bench("bench-fastdet-measure.json", "measure", &["--tile", "32,32,32"]);
    let tomo = bench("bench-tomogram.json", "auto", &["--tomogram", "32,64,64", "--models", "1,1", "--window", "32,32,32", "--tiles", "1,2,2"]);
    let o = Command::new("python3").arg(root.join("tools/results_json.py")).arg(tmp.path()).args(["--commit", "abc", "--date", "2026-12-02"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut peak: f64 = 0.0;
    for (i, arch) in ["segresnetv2", "dynunet"].into_iter().enumerate() {
        assert_eq!(tile["models"][i]["model"], arch);
        assert_eq!(r["tile"][arch]["fastdet_ms"], tile["models"][i]["ms_per_tile"], "{arch}");
        assert_eq!(r["tile"][arch]["fastdet_fused_ms"], tile_tc["models"][i]["ms_per_tile"], "{arch}");
        let choice = &tile_measured["models"][i]["conv_choice"];
        assert_eq!(r["tile"][arch]["fastdet_measured_ms"], tile_measured["models"][i]["ms_per_tile"], "{arch}");
        assert_eq!(r["tile"][arch]["conv_choice"], choice["label"], "{arch}");
        assert_eq!(r["tile"][arch]["conv_variants_ms"], choice["ms_per_walk"], "{arch}");
        assert_eq!(choice["ms_per_walk"].as_object().unwrap().len(), 7, "{arch}: the emulator's seven tensor-core variants");
        assert!(tile["models"][i]["conv_choice"].is_null(), "{arch}: no choice without FASTDET_CONV=measure");
        assert!(r["tile"][arch]["torch_eager_ms"].is_null());
        // The walks on a device-resident input, beside the host-to-host figures.
        for (t, key) in [(&tile, "fastdet_device_ms"), (&tile_tc, "fastdet_fused_device_ms"), (&tile_measured, "fastdet_measured_device_ms")] {
            let m = &t["models"][i];
            assert!(m["ms_per_tile_device"].as_f64().unwrap() > 0.0 && m["device_times_ms"].as_array().unwrap().len() == 1, "{arch}: {m}");
            assert_eq!(r["tile"][arch][key], m["ms_per_tile_device"], "{arch} {key}");
        }
        // --profile: the walk's steps cover its ops once each, in order, with all its FLOPs; the
        // kinds sum the steps.
        let p = &tile["models"][i]["profile"];
        let steps = p["steps"].as_array().unwrap();
        let mut next = 0;
        for st in steps {
            assert_eq!(st["ops"][0].as_u64().unwrap(), next, "{arch}: {st}");
            next = st["ops"][1].as_u64().unwrap();
            assert!(next > st["ops"][0].as_u64().unwrap() && st["ms"].as_f64().unwrap() >= 0.0 && st["label"].as_str().unwrap().contains(" @ "), "{arch}: {st}");
        }
        let gflop: f64 = steps.iter().map(|st| st["gflop"].as_f64().unwrap()).sum();
        assert!((gflop - tile["models"][i]["gflop_per_tile"].as_f64().unwrap()).abs() < 1e-9, "{arch}: {gflop}");
        let sum = p["sum_ms"].as_f64().unwrap();
        let by_kind: f64 = p["by_kind"].as_array().unwrap().iter().map(|k| k["ms"].as_f64().unwrap()).sum();
        assert!(sum > 0.0 && (sum - by_kind).abs() < 1e-9 * sum, "{arch}: {sum} vs {by_kind}");
        assert!(p["by_kind"].as_array().unwrap().iter().any(|k| k["kind"].as_str().unwrap().starts_with("conv3x3x3")), "{arch}: {p}");
        // Each step's least traffic: more than nothing for a conv (a norm applied in the next
        // conv's loads may move nothing), summed by kind, and a bandwidth from it.
        assert!(steps.iter().all(|st| st["min_gbytes"].as_f64().unwrap() >= 0.0), "{arch}: {p}");
        assert!(steps.iter().filter(|st| st["kind"].as_str().unwrap().starts_with("conv")).all(|st| st["min_gbytes"].as_f64().unwrap() > 0.0), "{arch}: {p}");
        let gbytes = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x["min_gbytes"].as_f64().unwrap()).sum::<f64>();
        assert!((gbytes(&p["steps"]) - gbytes(&p["by_kind"])).abs() < 1e-12, "{arch}: {p}");
        for k in p["by_kind"].as_array().unwrap() {
            let (gb, ms) = (k["min_gbytes"].as_f64().unwrap(), k["ms"].as_f64().unwrap());
            if ms > 0.0 && gb > 0.0 {
                assert!((k["gbps"].as_f64().unwrap() - gb / (ms * 1e-3)).abs() <= 1e-9 * gb / (ms * 1e-3), "{arch}: {k}");
            }
        }
        assert!(tile_tc["models"][i]["profile"].is_null(), "{arch}: no profile without --profile");
        // DynUNet's transposed convs write into their concat's buffer: the concat step copies
        // the skip alone (read and write, fp16).
        if arch == "dynunet" {
            let g = fastdet::model::graph::Graph::build(&fastdet::model::spec::ModelSpec::seed(fastdet::model::spec::Arch::Dynunet)).unwrap();
            let concats: Vec<&serde_json::Value> = steps.iter().filter(|st| st["kind"] == "concat").collect();
            assert_eq!(concats.len(), 4, "{p}");
            for st in concats {
                let op = &g.ops[st["ops"][0].as_u64().unwrap() as usize];
                let skip = g.numel(op.inputs[1], [32, 32, 32]) as f64;
                assert!((st["min_gbytes"].as_f64().unwrap() - skip * 4.0 * 1e-9).abs() < 1e-15, "{st}");
            }
        }
        // results.json keeps the walk's kinds with their rates.
        let kinds = r["tile"][arch]["fastdet_profile"]["default"].as_array().unwrap();
        assert_eq!(kinds.len(), p["by_kind"].as_array().unwrap().len(), "{arch}");
        assert_eq!((&kinds[0]["kind"], &kinds[0]["gbps"]), (&p["by_kind"][0]["kind"], &p["by_kind"][0]["gbps"]), "{arch}");
        // Random weights are generated as each model is taken, their time outside the cold start.
        assert!(tile["models"][i]["random_weights_s"].as_f64().unwrap() > 0.0, "{arch}");
        peak = peak.max(tile["models"][i]["device_memory_peak_mib"].as_f64().unwrap());
    }
    assert!(peak > 0.0);
    assert!((r["peak_mem_gib"].as_f64().unwrap() - peak / 1024.0).abs() < 1e-12);
    // The tomogram's worker: fastdet's buffers; an emulator has no card to ask.
    assert!((r["tomogram_peak_mem_gib"].as_f64().unwrap() - tomo["device_memory_peak_mib"].as_f64().unwrap() / 1024.0).abs() < 1e-12);
    assert!(tomo["card_memory_in_use_mib"].is_null() && r["card_mem_gib"].is_null() && tile["models"][0]["card_memory_in_use_mib"].is_null());
    assert_eq!(r["tomogram_s"], tomo["s_per_tomogram"]);
    assert_eq!(r["cold_start_s"], tile["cold_start_s"]);
    assert_eq!(r["cold_start_kernels_compiled"], tile["kernel_load"]["compiled"]);
    assert_eq!(r["tile_shape"], serde_json::json!([32, 32, 32]));
    assert_eq!(r["sources"]["fastdet_device"], "emu:0");
    // No PyTorch figures, no floor: nulls, not invented numbers.
    assert!(r["floor_s"].is_null() && r["card"].is_null() && r["tomogram_host_blend_s"].is_null());
    assert!(r["tile"]["dynunet"]["floor_ms"].is_null());
    assert_eq!(r["commit"], "abc", "--commit wins");
    // Without --commit: the commit the binary was built from, as its JSON names it.
    assert_eq!(tile["fastdet_commit"], fastdet::COMMIT);
    let o = Command::new("python3").arg(root.join("tools/results_json.py")).arg(tmp.path()).output().unwrap();
    let named: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    if fastdet::COMMIT != "unknown" {
        assert_eq!(named["commit"], fastdet::COMMIT);
    }

    // With a PyTorch baseline (its JSON as tools/bench_torch.py writes it): floors, speed-ups and
    // the RESULTS.md section.
    let eager = 2.0 * tile["models"][0]["ms_per_tile"].as_f64().unwrap();
    let torch = serde_json::json!({"card": "Stand-in GPU", "tile": [32, 32, 32], "fp16_matmul_tflops": 0.5,
        "best": {"segresnetv2": {"eager_ms": eager, "eager_batch": 1}},
        // --profile's classes for the compiled network, profiled at batch 2.
        "results": {"segresnetv2": {"compile": {"2": {"ms_per_tile": 1.0, "profile": {"calls": 3,
            "ms_per_call": {"conv": 3.0, "norm": 1.0, "fused": 0.5, "other": 0.25}, "top": []}}}}}});
    std::fs::write(tmp.path().join("bench-torch.json"), torch.to_string()).unwrap();
    let run = |extra: &[&str]| -> String {
        let o = Command::new("python3").arg(root.join("tools/results_json.py")).arg(tmp.path()).args(["--commit", "abc", "--date", "2026-12-02"]).args(extra).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let r: serde_json::Value = serde_json::from_str(&run(&[])).unwrap();
    let gflop = tile["models"][1]["gflop_per_tile"].as_f64().unwrap();
    assert!((r["tile"]["dynunet"]["floor_ms"].as_f64().unwrap() - gflop / 0.5).abs() < 1e-9 * gflop);
    let flops = tomo["flops_per_tomogram"].as_f64().unwrap();
    assert!((r["floor_s"].as_f64().unwrap() - flops / 0.5e12).abs() < 1e-9 * flops / 0.5e12);
    let md = run(&["--markdown"]);
    assert!(md.starts_with("### 2026-12-02: Stand-in GPU, commit abc"), "{md}");
    let ms = |v: &serde_json::Value| format!("{:.2} ms", v.as_f64().unwrap());
    let seg = md.lines().find(|l| l.starts_with("| segresnetv2 |")).unwrap_or_else(|| panic!("{md}"));
    // Speed-ups compare PyTorch's device-resident figures with fastdet's device-resident walks.
    let best = [&tile, &tile_tc, &tile_measured].iter().map(|t| t["models"][0]["ms_per_tile_device"].as_f64().unwrap()).fold(f64::INFINITY, f64::min);
    assert!(seg.contains(&format!("| {:.2} ms | – |", eager)) && seg.contains(&ms(&tile["models"][0]["ms_per_tile"])), "{seg}");
    assert!(seg.contains(&format!("| {:.2}x | – |", eager / best)), "speed-up over eager, no compile figure: {seg}");
    let label = tile_measured["models"][0]["conv_choice"]["label"].as_str().unwrap();
    assert!(seg.contains(&format!("{} / {} ({label})", ms(&tile_measured["models"][0]["ms_per_tile"]), ms(&tile_measured["models"][0]["ms_per_tile_device"]))), "{seg}");
    assert!(md.contains(&format!("- segresnetv2: {label} chosen; tc ")), "{md}");
    assert_eq!(r["tile"]["segresnetv2"]["torch_profile"]["compile"]["batch"], 2);
    assert!(r["tile"]["dynunet"]["torch_profile"].is_null());
    assert!(md.contains("- segresnetv2 compile (batch 2): conv 3.00 ms, norm 1.00 ms, fused 0.50 ms, other 0.25 ms"), "{md}");
    // The bench copied its volume ahead on the side path, as `fastdet run` does by default.
    assert_eq!(tomo["upload_overlapped"], true);
    assert_eq!(r["tomogram_config"]["upload_overlapped"], true);
    assert!(md.contains("| 32x64x64 | 1 SegResNetV2 + 1 DynUNet, 1x2x2 tiles of 32x32x32, volumes copied ahead |"), "{md}");
}

/// tools/slim-tree.sh, on a scratch repository laid out like this one: `on` takes the fixtures out
/// of what a copy of the tree holds (tracked and untracked-not-ignored files) while they stay on
/// disk, and refuses commits; `off` gives back exactly the committed index.
#[test]
fn slim_tree_leaves_the_fixtures_out_of_the_copy_and_puts_them_back() {
    if Command::new("git").arg("--version").output().is_err() || Command::new("bash").arg("--version").output().is_err() {
        println!("SKIP slim_tree_leaves_the_fixtures_out_of_the_copy_and_puts_them_back: git or bash missing");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path();
    let git = |args: &[&str]| {
        let o = Command::new("git").arg("-C").arg(repo).args(["-c", "user.name=t", "-c", "user.email=t@t"]).args(args).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
    };
    assert!(git(&["init", "-q"]).0);
    std::fs::create_dir_all(repo.join("tools")).unwrap();
    std::fs::create_dir_all(repo.join("tests/fixtures/golden")).unwrap();
    std::fs::copy(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/slim-tree.sh"), repo.join("tools/slim-tree.sh")).unwrap();
    std::fs::write(repo.join("tests/fixtures/golden/big.bin"), vec![7u8; 3 << 20]).unwrap();
    std::fs::write(repo.join("README.md"), "r\n").unwrap();
    assert!(git(&["add", "-A"]).0 && git(&["commit", "-q", "-m", "c"]).0);
    let copied = || git(&["ls-files", "--cached", "--others", "--exclude-standard"]).1;
    let slim = |arg: &str| Command::new("bash").arg(repo.join("tools/slim-tree.sh")).arg(arg).output().unwrap();

    let o = slim("on");
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("would travel: 0.0 MiB (slim tree)"), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(copied(), "README.md\ntools/slim-tree.sh\n");
    assert!(repo.join("tests/fixtures/golden/big.bin").is_file(), "the fixtures stay on disk");
    let (ok, msg) = git(&["commit", "-q", "--allow-empty", "-m", "slim"]);
    assert!(!ok && msg.contains("the working tree is slim"), "{msg}");
    assert!(!slim("on").status.success(), "a second `on` is refused");

    let o = slim("off");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(copied(), "README.md\ntests/fixtures/golden/big.bin\ntools/slim-tree.sh\n");
    assert_eq!(git(&["status", "--porcelain"]).1, "", "index and exclude file as before");
    assert!(git(&["commit", "-q", "--allow-empty", "-m", "after"]).0, "commits work again");
}
