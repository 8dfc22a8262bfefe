#!/usr/bin/env bash
# Device check for a GPU machine without a Rust toolchain: the release binary built elsewhere
# (target/release/fastdet) is carried there and this script
#   1. finds the CUDA libraries (pip wheels nvidia/*/lib, /usr/local/cuda, ldconfig) and cuda_fp16.h,
#   2. prints nvidia-smi,
#   3. runs `fastdet selftest --quick` (kernels vs CPU twins, both seed networks on 64^3),
#   3b. times `fastdet bench` (both seed networks, one 192x128x128 tile: batch 1 with a profile of
#      a walk, batch 2, the tensor-core path, the measured choice, and the Python wheels' cuDNN
#      where the system has another), runs the full `fastdet selftest` (192x128x128 networks,
#      whole-tomogram CPU-vs-GPU check), times the seed ensemble of 5+5 models on one whole
#      tomogram of FASTDET_CHECK_SHAPE, then the PyTorch baseline tools/bench_torch.py (fp16 cuDNN
#      eager + torch.compile, batches 1,2,4, or what FASTDET_TORCH_ARGS says; needs python3 with
#      torch; monai comes from .cache/wheels/ when it is not installed; --skip-torch skips it),
#   4. writes two synthetic 184x630x630 tomograms and times `fastdet run` on the GPU with the demo
#      weights and the seed window/tiles (+ `fastdet score` against its ground truth), then runs
#      it again and with two workers on the card (--devices cuda:N,cuda:N): both must write the
#      same bytes,
#   4a. with the time left, in this order: the tomogram blended on the host and with two tiles
#      per walk, cuDNN's graph API with its runtime-compiled engines, the criterion bench
#      benches/cuda_ops.rs when its binary was carried,
#   4b. compute-sanitizer memcheck and racecheck over the self-test's kernel rows
#      (--no-sanitizer skips them),
#   5. optionally (--cpu-run) the same `fastdet run` on the CPU for comparison (slow),
# and ends with a one-screen summary. Every step has a timeout; the whole script stays within
# --budget seconds (default 450). Logs, JSON reports, compiled kernels and the summary go to OUTDIR
# (a few MB); the synthetic data goes to --data (default under $TMPDIR) and is removed at the end.
# --pack leaves OUTDIR with six files (for a copy-back that takes only a few): the final summary,
# results.json, results.md, both self-test logs and logs.tar.gz holding everything else but the
# compiled kernels.
#
# Exit status: 0 all steps passed, 1 a step failed or timed out, 2 no usable GPU (no driver or
# no device; the logs say which), 3 the fastdet binary does not run here, 64 bad usage.
set -u -o pipefail

usage() {
    cat <<'EOF'
usage: tools/device-check.sh OUTDIR [--budget SECONDS] [--device cuda:N] [--skip-full] [--cpu-run]
                              [--skip-torch] [--no-sanitizer] [--data DIR] [--keep-data] [--pack]

  OUTDIR            where logs, JSON reports, compiled kernels and summary.txt go (created; small)
  --data DIR        where the synthetic tomogram is written (default $TMPDIR/fastdet-device-check-data;
                    about 300 MB, removed at the end unless --keep-data); a new or empty folder, or
                    one an earlier check made: a folder holding anything else is refused
  FASTDET_CHECK_BUDGET (environment) is the default of --budget
  --budget S        wall-clock budget for the whole script in seconds (default 450)
  --device cuda:N   GPU to check (default cuda:0)
  --skip-full       skip the full self-test (192x128x128 networks + whole-tomogram check)
  --skip-torch      skip the PyTorch baseline (tools/bench_torch.py); `fastdet bench` still runs
  --cpu-run         also time `fastdet run --device cpu` on the same data (slow: minutes)
  --no-sanitizer    skip the last steps: compute-sanitizer memcheck and racecheck over the
                    self-test's kernel rows (run when the tool is there and time is left)
  --pack            at the end, leave only summary-final.txt, results.json, results.md,
                    selftest-quick.log, selftest-full.log and logs.tar.gz (every other log, JSON
                    report and criterion estimate; not the compiled kernels) in OUTDIR

benchmarks (after the quick self-test): `fastdet bench` -> bench-fastdet.json (log
bench-fastdet.log; with FASTDET_CONV=tc -> bench-fastdet-tc.json; with FASTDET_CONV=measure ->
bench-fastdet-measure.json, cuDNN and each tensor-core variant timed on the whole network; with
cuDNN's graph API, its engines timed per convolution, profiled -> bench-fastdet-graph.json); `fastdet bench --tomogram` (5+5 seed models) -> bench-tomogram.json (averaging and blending on the GPU,
the default; with --host-blend -> bench-tomogram-host-blend.json);
the criterion bench benches/cuda_ops.rs (fused block vs cuDNN per level, tiles per backend) ->
bench-criterion.log and criterion/ when its binary is there (FASTDET_CUDA_BENCH, default
target/release/cuda_ops, made by tools/build-for-device.sh);
tools/bench_torch.py -> bench-torch.json (log bench-torch.log, about 240 s at most); their lines end
up in the summary, and tools/results_json.py folds them into results.json (and results.md, the
RESULTS.md section for the run).

environment: FASTDET=path/to/fastdet (default: target/release/fastdet next to this script),
             FASTDET_CHECK_SHAPE=z,y,x (default 184,630,630),
             FASTDET_CHECK_LIBDIRS=dir:dir (library folders put first on LD_LIBRARY_PATH),
             FASTDET_TORCH_COMPILE_MODE=auto|default|max-autotune (bench_torch.py's --compile-mode;
             default: default),
             FASTDET_TORCH_ARGS="..." (more bench_torch.py options, split on spaces, after the
             others so they win: e.g. "--modes compile --batches 1,2" to time torch.compile alone
             when the budget is short),
             FASTDET_MONAI_WHEEL=path/to/monai-*.whl (default .cache/wheels/monai-1.6.1-py3-none-any.whl
             of the repository, used only when python3 cannot import monai)
EOF
}

OUT=""
DATA="${TMPDIR:-/tmp}/fastdet-device-check-data"
KEEP_DATA=0
DATA_GIVEN=0
BUDGET="${FASTDET_CHECK_BUDGET:-450}"
DEVICE="cuda:0"
FULL=1
CPU_RUN=0
TORCH_BENCH=1
PACK=0
SANITIZE=1
SHAPE="${FASTDET_CHECK_SHAPE:-184,630,630}"
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --budget) [ $# -ge 2 ] || { echo "device-check: --budget needs a value" >&2; exit 64; }; BUDGET="$2"; shift 2 ;;
        --device) [ $# -ge 2 ] || { echo "device-check: --device needs a value" >&2; exit 64; }; DEVICE="$2"; shift 2 ;;
        --skip-full) FULL=0; shift ;;
        --data) [ $# -ge 2 ] || { echo "device-check: --data needs a value" >&2; exit 64; }; DATA="$2"; DATA_GIVEN=1; shift 2 ;;
        --keep-data) KEEP_DATA=1; shift ;;
        --cpu-run) CPU_RUN=1; shift ;;
        --skip-torch) TORCH_BENCH=0; shift ;;
        --pack) PACK=1; shift ;;
        --no-sanitizer) SANITIZE=0; shift ;;
        -*) echo "device-check: unknown option $1" >&2; usage >&2; exit 64 ;;
        *)
            if [ -z "$OUT" ]; then OUT="$1"; shift
            else echo "device-check: unexpected argument $1" >&2; usage >&2; exit 64; fi ;;
    esac
done
if [ -z "$OUT" ]; then usage >&2; exit 64; fi
case "$BUDGET" in ''|*[!0-9]*) echo "device-check: --budget must be a whole number of seconds, got '$BUDGET'" >&2; exit 64 ;; esac
case "$DEVICE" in cuda:[0-9]*) ;; *) echo "device-check: --device must be cuda:N, got '$DEVICE'" >&2; exit 64 ;; esac
case "$SHAPE" in *[!0-9,]*|'') echo "device-check: FASTDET_CHECK_SHAPE must be z,y,x, got '$SHAPE'" >&2; exit 64 ;; esac
# The data folder is emptied and removed: a --data folder only when this script made it (its
# marker file) or it is empty or new, never a folder of the user's. (The default folder is the
# script's own.)
DATA_MARK="$DATA/.fastdet-device-check-data"
if [ $DATA_GIVEN -eq 1 ] && [ -e "$DATA" ] && [ ! -e "$DATA_MARK" ] && [ -n "$(ls -A "$DATA" 2>/dev/null || echo x)" ]; then
    echo "device-check: --data $DATA is not empty and was not made by this script; give a new folder" >&2
    exit 64
fi
remove_data() { if [ $DATA_GIVEN -eq 0 ] || [ -e "$DATA_MARK" ] || [ -z "$(ls -A "$DATA" 2>/dev/null)" ]; then rm -rf "$DATA"; fi; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FASTDET="${FASTDET:-$ROOT/target/release/fastdet}"
CUDA_BENCH="${FASTDET_CUDA_BENCH:-$ROOT/target/release/cuda_ops}"
mkdir -p "$OUT" || { echo "device-check: cannot create $OUT" >&2; exit 64; }
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
FAILED=0
NO_GPU=0

log() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }

# step NAME MAX_SECONDS LOGFILE CMD... : runs CMD with a timeout (the smaller of MAX_SECONDS and
# what is left of the budget), output to LOGFILE; records a summary line; returns CMD's status
# (124 on timeout, 125 when skipped for lack of time).
step() {
    local name="$1" max="$2" logf="$3"
    shift 3
    local left t s rc e status
    left=$(( $(remaining) - 5 ))
    t=$max
    [ "$left" -lt "$t" ] && t=$left
    if [ "$t" -lt 15 ]; then
        printf '%-34s %-8s %5s   %s\n' "$name" "SKIPPED" "-" "no time left in the ${BUDGET} s budget" | tee -a "$SUMMARY"
        return 125
    fi
    echo ">> $name (timeout ${t} s): $*" | tee -a "$OUT/commands.txt"
    s=$(date +%s)
    { echo "# $*"; echo "# timeout ${t} s, started $(date -u +%FT%TZ)"; } > "$logf"
    timeout --kill-after=10 "$t" "$@" >> "$logf" 2>&1
    rc=$?
    e=$(( $(date +%s) - s ))
    case $rc in
        0) status=PASS ;;
        124|137) status=TIMEOUT ;;
        2) case "$name" in selftest*) status="NO-GPU" ;; *) status="FAIL(2)" ;; esac ;;
        *) status="FAIL($rc)" ;;
    esac
    printf '%-34s %-8s %4ss   %s\n' "$name" "$status" "$e" "$(basename "$logf")" | tee -a "$SUMMARY"
    return $rc
}

# bench_step NAME TIMEOUT BASE [VAR=VALUE ...] -- BENCH-ARGS...: the step NAME running
# `fastdet bench --device DEVICE BENCH-ARGS --json` with those variables set, its JSON in
# OUT/BASE.json (removed first: a failed step leaves none) and its log in OUT/BASE.log.
bench_step() {
    local name="$1" max="$2" base="$3"
    shift 3
    local vars=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do vars+=("$1"); shift; done
    shift
    rm -f "$OUT/$base.json"
    step "$name" "$max" "$OUT/$base.log" \
        bash -c 'json="$1"; shift; exec env "$@" --json > "$json"' \
        "$base" "$OUT/$base.json" ${vars[@]+"${vars[@]}"} "$FASTDET" bench --device "$DEVICE" "$@"
}

log "fastdet device check  $(date -u +%FT%TZ)  host $(hostname 2>/dev/null || echo ?)  budget ${BUDGET} s"
log "output: $OUT"

# ------------------------------------------------------------------------------------------------
# The binary
if [ ! -x "$FASTDET" ]; then
    log "ERROR: $FASTDET is missing or not executable: build it with 'cargo build --release' and carry target/release/fastdet"
    exit 3
fi
if ! "$FASTDET" --version > "$OUT/version.txt" 2>&1; then
    log "ERROR: $FASTDET does not run on this machine:"
    sed 's/^/  /' "$OUT/version.txt" | tee -a "$SUMMARY"
    { echo "--- ldd"; ldd "$FASTDET" 2>&1; echo "--- glibc"; ldd --version 2>&1 | head -1; } >> "$OUT/version.txt"
    log "  (details in version.txt; a glibc older than 2.34 needs a binary built on an older system)"
    exit 3
fi
log "binary: $FASTDET ($(cat "$OUT/version.txt"))"

# ------------------------------------------------------------------------------------------------
# CUDA libraries: the toolkit first (its NVRTC and headers match each other and the driver), then
# every lib directory of the pip wheels (nvidia/*/lib: cuDNN, cuBLAS, NVRTC, runtime).
LIBDIRS=()
INCLUDE=""
# Library folders the user names (FASTDET_CHECK_LIBDIRS, colon-separated) come first.
if [ -n "${FASTDET_CHECK_LIBDIRS:-}" ]; then
    IFS=: read -r -a EXTRA_LIBDIRS <<< "$FASTDET_CHECK_LIBDIRS"
    for d in "${EXTRA_LIBDIRS[@]}"; do [ -d "$d" ] && LIBDIRS+=("$d"); done
fi
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && LIBDIRS+=("$d")
done
# The driver's own directory in containers that mount it there (libcuda.so.1), if the loader's
# path does not already hold it.
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    if ls "$d"/libcuda.so* > /dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then LIBDIRS+=("$d"); fi
done
# The kernels include cuda_fp16.h and mma.h, which includes crt/mma.h (in pip wheels that one
# comes from nvidia-cuda-crt): a directory with all of them wins over one with cuda_fp16.h alone.
PARTIAL_INCLUDE=""
consider_include() {
    [ -z "$INCLUDE" ] && [ -f "$1/cuda_fp16.h" ] || return 0
    if [ -f "$1/crt/mma.h" ]; then INCLUDE="$1"; elif [ -z "$PARTIAL_INCLUDE" ]; then PARTIAL_INCLUDE="$1"; fi
}
for d in /usr/local/cuda/include /usr/local/cuda/targets/x86_64-linux/include; do
    consider_include "$d"
done
NVBASES=""
if command -v python3 > /dev/null 2>&1; then
    NVBASES="$(python3 - <<'PY' 2>/dev/null
import os
try:
    import nvidia
except Exception:
    raise SystemExit(0)
paths = list(getattr(nvidia, "__path__", []) or [])
if not paths and getattr(nvidia, "__file__", None):
    paths = [os.path.dirname(nvidia.__file__)]
for p in paths:
    print(p)
PY
)"
fi
if [ -n "$NVBASES" ]; then
    while IFS= read -r base; do
        [ -d "$base" ] || continue
        # cu13 (CUDA 13 wheels) before the per-library CUDA 12 wheels.
        for d in "$base"/cu13/lib "$base"/*/lib; do
            [ -d "$d" ] || continue
            case " ${LIBDIRS[*]-} " in *" $d "*) ;; *) LIBDIRS+=("$d") ;; esac
        done
        for d in "$base"/cu13/include "$base"/cuda_runtime/include "$base"/*/include; do
            consider_include "$d"
        done
    done <<< "$NVBASES"
else
    log "note: python3 or its 'nvidia' pip packages not found; relying on the system library path"
fi
if [ ${#LIBDIRS[@]} -gt 0 ]; then
    NEWPATH="$(IFS=:; echo "${LIBDIRS[*]}")"
    export LD_LIBRARY_PATH="$NEWPATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [ -z "$INCLUDE" ] && [ -n "$PARTIAL_INCLUDE" ]; then
    INCLUDE="$PARTIAL_INCLUDE"
    log "note: no include directory has crt/mma.h (needed by conv_tc.cu); using $INCLUDE"
fi
[ -n "$INCLUDE" ] && export FASTDET_CUDA_INCLUDE="$INCLUDE"
export FASTDET_KERNEL_CACHE="$OUT/kernel-cache"
{
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "FASTDET_CUDA_INCLUDE=${FASTDET_CUDA_INCLUDE:-<not found>}"
    echo "FASTDET_KERNEL_CACHE=$FASTDET_KERNEL_CACHE"
    echo "--- ldconfig -p (cuda, nvrtc, cudnn, cublas)"
    ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc|libcudnn|libcublas' || echo "(none in the ldconfig cache)"
    echo "--- lib directories"
    for d in "${LIBDIRS[@]-}"; do
        [ -n "$d" ] || continue
        echo "$d:"; ls "$d" 2>/dev/null | grep -E 'libnvrtc|libcudnn\.so|libcublas\.so|libcudart\.so' | sed 's/^/  /'
    done
} > "$OUT/env.txt" 2>&1
log "libraries: ${#LIBDIRS[@]} lib dir(s) on LD_LIBRARY_PATH; cuda_fp16.h: ${FASTDET_CUDA_INCLUDE:-NOT FOUND}; details in env.txt"
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so'; then
    found_cuda=0
    for d in "${LIBDIRS[@]-}"; do [ -n "$d" ] && ls "$d"/libcuda.so* > /dev/null 2>&1 && found_cuda=1; done
    [ $found_cuda -eq 0 ] && log "note: libcuda.so (the NVIDIA driver) is not in the ldconfig cache"
fi

# ------------------------------------------------------------------------------------------------
# nvidia-smi
if command -v nvidia-smi > /dev/null 2>&1; then
    timeout 30 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
        >> "$OUT/nvidia-smi.txt" 2>&1 || true
    log "nvidia-smi: $(tail -1 "$OUT/nvidia-smi.txt")"
else
    echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
    log "nvidia-smi: not found"
fi

# ------------------------------------------------------------------------------------------------
# 1. quick self-test
step "selftest --quick" 200 "$OUT/selftest-quick.log" \
    "$FASTDET" selftest --device "$DEVICE" --quick --json "$OUT/selftest-quick.json"
rc=$?
if [ $rc -eq 2 ]; then
    NO_GPU=1
    log ""
    log "NO USABLE GPU: $(grep -m1 '^selftest:' "$OUT/selftest-quick.log" | sed 's/^selftest: //')"
    log "nothing ran on a GPU; the GPU steps are skipped (logs in $OUT)"
elif [ $rc -ne 0 ]; then
    FAILED=1
    # A run checks the kernels on its device first and refuses a device where one fails; the
    # timings below are still worth having (their picks are not).
    export FASTDET_CHECK_KERNELS=never
    log "the self-test failed: the runs below skip their kernel check (FASTDET_CHECK_KERNELS=never); their picks are not to be trusted"
fi
# A pass is remembered in the check's kernel cache: the runs below find it and do not check again.

# ------------------------------------------------------------------------------------------------
# 1b. per-tile benchmarks of fastdet, the full self-test, the seed ensemble per tomogram
if [ $NO_GPU -eq 0 ]; then
    # JSON on stdout goes to its own file (written by the inner shell), stderr to the step's log.
    # --profile: where a walk's time goes, step by step (conv, norm, ...), summed by kind.
    bench_step "bench fastdet" 120 bench-fastdet -- --tile 192,128,128 --batch 1 --iters 20 --warmup 3 --profile || FAILED=1
    # Two tiles per call (torch.compile's best batch for both networks on the H200).
    bench_step "bench fastdet --batch 2" 90 bench-fastdet-batch2 -- --tile 192,128,128 --batch 2 --iters 10 --warmup 2 || FAILED=1
    # The same tile on conv3d_tc_f16 (FASTDET_CONV=tc: residual and statistics in the store, norms
    # in the loads of 1x1x1 convs only; the self-test and the criterion bench also time them all in
    # the loads, the wide tiles and the cp.async loads).
    bench_step "bench fastdet tensor-core" 90 bench-fastdet-tc FASTDET_CONV=tc -- --tile 192,128,128 --batch 1 --iters 20 --warmup 3 || FAILED=1
    # FASTDET_CONV=measure: cuDNN and every tensor-core variant timed on the whole network, the
    # fastest kept (its choice and each variant's time are in the JSON's conv_choice); the choice
    # file lands in the check's kernel cache, so this measures afresh.
    bench_step "bench fastdet measured choice" 150 bench-fastdet-measure FASTDET_CONV=measure -- --tile 192,128,128 --batch 1 --iters 20 --warmup 3 || FAILED=1
    # cuDNN's graph API, its engines timed on the real buffers per convolution (as PyTorch's
    # cudnn.benchmark), with the profile: each conv's engine and time against the legacy walk's.
    bench_step "bench fastdet cuDNN graph API" 120 bench-fastdet-graph FASTDET_CONV=cudnn FASTDET_CUDNN_API=graph FASTDET_CUDNN_FIND=1 \
        -- --tile 192,128,128 --batch 1 --iters 20 --warmup 3 --profile \
        || log "note: the bench on cuDNN's graph API failed (an experiment: the legacy API is the default); see bench-fastdet-graph.log"
    # The Python wheels' cuDNN, where there is one beside the system's: the loader asks for
    # libcudnn.so before libcudnn.so.9 and the wheels ship only the latter, so the system's is
    # taken first (on the H200 of 2026-12-04: 9.14 against PyTorch's 9.19). A folder holding a
    # libcudnn.so link to the wheel's library, first on the path, times the other one. An
    # experiment: its failure is shown but does not fail the check.
    WHEEL_CUDNN=""
    for d in "${LIBDIRS[@]-}"; do
        if [ -n "$d" ] && [ -f "$d/libcudnn.so.9" ] && [ ! -e "$d/libcudnn.so" ]; then WHEEL_CUDNN="$d/libcudnn.so.9"; break; fi
    done
    if [ -n "$WHEEL_CUDNN" ] && CUDNN_LINK="$(mktemp -d)"; then
        ln -s "$WHEEL_CUDNN" "$CUDNN_LINK/libcudnn.so"
        bench_step "bench fastdet (wheel cuDNN)" 90 bench-fastdet-cudnn-wheel "LD_LIBRARY_PATH=$CUDNN_LINK:$LD_LIBRARY_PATH" \
            -- --tile 192,128,128 --batch 1 --iters 20 --warmup 3 \
            || log "note: the bench with the wheels' cuDNN ($WHEEL_CUDNN) failed; see bench-fastdet-cudnn-wheel.log"
        rm -rf "$CUDNN_LINK"
    else
        rm -f "$OUT/bench-fastdet-cudnn-wheel.json"
        log "bench fastdet (wheel cuDNN): skipped (no libcudnn.so.9 without a libcudnn.so beside it on the library path)"
    fi

    # The full self-test (seed networks on 192x128x128, the whole-tomogram CPU-vs-GPU check) before
    # the longer benchmarks: it is the check of record, so it gets its time first.
    if [ $FULL -eq 1 ]; then
        step "selftest (full)" 300 "$OUT/selftest-full.log" \
            "$FASTDET" selftest --device "$DEVICE" --json "$OUT/selftest-full.json" || FAILED=1
    fi

    # The seed configuration per tomogram: 5 SegResNetV2 + 5 DynUNet (random weights at the seed
    # widths, all resident), 1x9x9 tiles, blending and detection.
    bench_step "bench tomogram (5+5 models)" 150 bench-tomogram -- --tomogram "$SHAPE" --models 5,5 --iters 2 --warmup 1 || FAILED=1
    # The same on the convolution path timed fastest per network (FASTDET_CONV=measure: cuDNN's
    # legacy and graph APIs, the tensor-core variants); the per-tile measured bench above left
    # its choices in the check's kernel cache for this batch and window, so nothing is timed again.
    bench_step "bench tomogram measured choice" 150 bench-tomogram-measure FASTDET_CONV=measure \
        -- --tomogram "$SHAPE" --models 5,5 --iters 2 --warmup 1 || FAILED=1

    # The PyTorch baseline, the speed targets' reference, in the same call on the same card:
    # before the synthetic run (whose paths the self-test's pipeline section covers too).
    rm -f "$OUT/bench-torch.json"
    if [ $TORCH_BENCH -eq 0 ]; then
        log "bench torch: skipped (--skip-torch)"
    elif ! command -v python3 > /dev/null 2>&1; then
        log "bench torch: skipped (no python3)"
    elif ! timeout 120 python3 -c 'import torch' > "$OUT/bench-torch-import.txt" 2>&1; then
        log "bench torch: skipped (python3 cannot import torch: $(tail -1 "$OUT/bench-torch-import.txt" | cut -c1-120))"
    else
        MONAI_WHEEL="${FASTDET_MONAI_WHEEL:-$ROOT/.cache/wheels/monai-1.6.1-py3-none-any.whl}"
        WHEEL_ARGS=()
        if [ -f "$MONAI_WHEEL" ]; then
            WHEEL_ARGS=(--monai-wheel "$MONAI_WHEEL")
        else
            log "note: monai wheel $MONAI_WHEEL not found; bench torch needs monai installed"
        fi
        # The script stops starting new cases 20 s before the step's timeout, so its JSON (rewritten
        # after every case) is complete up to there.
        tb=$(( $(remaining) - 5 ))
        [ "$tb" -gt 240 ] && tb=240
        tb=$(( tb - 20 ))
        [ "$tb" -lt 1 ] && tb=1
        # A failing baseline is shown (FAIL/TIMEOUT line, its log) but does not fail the fastdet check.
        step "bench torch" 240 "$OUT/bench-torch.log" \
            python3 "$ROOT/tools/bench_torch.py" --device "$DEVICE" --json "$OUT/bench-torch.json" \
            --budget "$tb" --compile-mode "${FASTDET_TORCH_COMPILE_MODE:-default}" --profile ${WHEEL_ARGS[@]+"${WHEEL_ARGS[@]}"} \
            ${FASTDET_TORCH_ARGS:-} \
            || log "note: bench torch failed (PyTorch baseline only; not counted in RESULT; see bench-torch.log)"
    fi
fi

# ------------------------------------------------------------------------------------------------
# 4. timed GPU run on a synthetic tomogram with the demo weights and the seed window / tiles
W1="$ROOT/weights/demo_segresnetv2.safetensors"
W2="$ROOT/weights/demo_dynunet.safetensors"
if [ $NO_GPU -eq 0 ]; then
    remove_data
    mkdir -p "$(dirname "$DATA")"
    # Two runs, so that two workers (below) have one each.
    if step "synth 2 runs $SHAPE" 180 "$OUT/synth.log" \
        "$FASTDET" synth "$DATA" --runs 2 --shape "$SHAPE" --seed 1; then
        : > "$DATA_MARK"
        if [ -f "$W1" ] && [ -f "$W2" ]; then
            RUN_ARGS=(--data "$DATA" --split test --weights "$W1" "$W2" --window 192,128,128 --tiles 1,9,9 --with-score)
            if step "run --device $DEVICE (2 models)" 240 "$OUT/run-gpu.log" \
                "$FASTDET" run "${RUN_ARGS[@]}" --device "$DEVICE" --out "$OUT/gpu.csv"; then
                step "score gpu.csv" 60 "$OUT/score-gpu.log" \
                    "$FASTDET" score --truth "$DATA" --split test "$OUT/gpu.csv" || FAILED=1
                # Deterministic: the same command again writes the same bytes; so do two workers
                # sharing the card (worker k takes runs[k::2], one merged output).
                # same_bytes NAME TAG DEVICE-ARGS...: `run` to gpu-TAG.csv, compared with gpu.csv.
                same_bytes() {
                    local name="$1" tag="$2"
                    shift 2
                    step "$name" 120 "$OUT/run-gpu-$tag.log" \
                        bash -c '"$1" run "${@:4}" --out "$3" && cmp "$2" "$3" && echo "same bytes as $2"' \
                        same-bytes "$FASTDET" "$OUT/gpu.csv" "$OUT/gpu-$tag.csv" "${RUN_ARGS[@]}" "$@" || FAILED=1
                }
                same_bytes "run again: same bytes" again --device "$DEVICE"
                same_bytes "run --devices $DEVICE,$DEVICE: same bytes" 2workers --devices "$DEVICE,$DEVICE"
                # `run` with no device (--device auto) takes the card(s) it sees: here the first
                # one only (on a machine of several, another card's fp16 bytes need not be these).
                if [ "$DEVICE" = cuda:0 ]; then
                    visible=${CUDA_VISIBLE_DEVICES-__unset__}
                    first=${CUDA_VISIBLE_DEVICES:-0}
                    export CUDA_VISIBLE_DEVICES="${first%%,*}"
                    same_bytes "run --device auto (the default): same bytes" auto
                    if [ "$visible" = __unset__ ]; then unset CUDA_VISIBLE_DEVICES; else export CUDA_VISIBLE_DEVICES="$visible"; fi
                    [ ! -f "$OUT/run-gpu-auto.log" ] || grep -q " on cuda:0 (auto: 1 GPU(s)" "$OUT/run-gpu-auto.log" \
                        || { log "run --device auto: the log does not show the GPU taken (run-gpu-auto.log)"; FAILED=1; }
                fi
            else
                FAILED=1
            fi
        else
            log "demo weights not found under $ROOT/weights: GPU run skipped"
            FAILED=1
        fi
    else
        FAILED=1
    fi
fi

# ------------------------------------------------------------------------------------------------
# 4a. with the time left, in this order: the tomogram blended on the host and with two tiles per
# walk, the criterion benches (the longest, least needed)
if [ $NO_GPU -eq 0 ]; then
    # The same with the ensemble averaging and blending on the CPU (run --host-blend).
    bench_step "bench tomogram --host-blend" 150 bench-tomogram-host-blend -- --tomogram "$SHAPE" --models 5,5 --iters 2 --warmup 1 --host-blend || FAILED=1
    # Two tiles per walk (torch.compile's best batch for both networks on the H200).
    bench_step "bench tomogram --batch 2" 150 bench-tomogram-batch2 -- --tomogram "$SHAPE" --models 5,5 --iters 2 --warmup 1 --batch 2 || FAILED=1

    # cuDNN's graph API with the engines it compiles at run time as candidates too (compiled as
    # each plan is built): whether they are faster. An experiment: its failure is only noted.
    bench_step "bench fastdet cuDNN graph API + runtime-compiled" 120 bench-fastdet-graph-rtc \
        FASTDET_CONV=cudnn FASTDET_CUDNN_API=graph FASTDET_CUDNN_FIND=1 FASTDET_CUDNN_RUNTIME_COMPILED=1 \
        -- --tile 192,128,128 --batch 1 --iters 20 --warmup 3 \
        || log "note: the bench on cuDNN's graph API with runtime-compiled engines failed (an experiment); see bench-fastdet-graph-rtc.log"

    # criterion: the fused tensor-core residual block against the cuDNN path per SegResNetV2 level,
    # one tile per arch and backend, DynUNet's transposed convs on both kernels
    # (benches/cuda_ops.rs, built by tools/build-for-device.sh).
    if [ -x "$CUDA_BENCH" ]; then
        step "bench criterion cuda_ops" 150 "$OUT/bench-criterion.log" \
            env CRITERION_HOME="$OUT/criterion" "$CUDA_BENCH" --bench --noplot || FAILED=1
    else
        log "bench criterion cuda_ops: skipped ($CUDA_BENCH not found; tools/build-for-device.sh builds it)"
    fi
fi

# ------------------------------------------------------------------------------------------------
# 4b. compute-sanitizer over the self-test's kernel rows, with what time is left: memcheck
# (out-of-bounds, misaligned and uninitialised-pointer accesses) and racecheck (shared-memory
# hazards). A finding fails the check; a step the time cut short does not.
sanitize() {
    local tool="$1" rc
    step "sanitizer $tool (kernels)" 150 "$OUT/sanitizer-$tool.log" \
        "$SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 30 \
        "$FASTDET" selftest --device "$DEVICE" --quick --no-networks --no-pipeline
    rc=$?
    case $rc in
        0|124|125|137) ;;
        *) FAILED=1 ;;
    esac
}
if [ $NO_GPU -eq 0 ] && [ $SANITIZE -eq 1 ]; then
    SANITIZER="$(command -v compute-sanitizer || true)"
    if [ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then SANITIZER=/usr/local/cuda/bin/compute-sanitizer; fi
    if [ -n "$SANITIZER" ]; then
        sanitize memcheck
        sanitize racecheck
    else
        log "sanitizer: skipped (compute-sanitizer not found)"
    fi
fi

# ------------------------------------------------------------------------------------------------
# 5. optional CPU run for comparison
if [ $NO_GPU -eq 0 ] && [ $CPU_RUN -eq 1 ] && [ -d "$DATA" ]; then
    if step "run --device cpu (2 models)" 100000 "$OUT/run-cpu.log" \
        "$FASTDET" run --data "$DATA" --split test --weights "$W1" "$W2" --device cpu \
        --window 192,128,128 --tiles 1,9,9 --out "$OUT/cpu.csv" --with-score; then
        step "score cpu.csv" 60 "$OUT/score-cpu.log" "$FASTDET" score --truth "$DATA" --split test "$OUT/cpu.csv" || true
    fi
fi

[ $KEEP_DATA -eq 1 ] || remove_data

# ------------------------------------------------------------------------------------------------
# Headline figures for benches/results.json (nulls where a bench did not run)
if [ $NO_GPU -eq 0 ] && command -v python3 > /dev/null 2>&1; then
    python3 "$ROOT/tools/results_json.py" "$OUT" -o "$OUT/results.json" > /dev/null 2> "$OUT/results-json.log" \
        || log "note: results.json not written (see results-json.log)"
    # The same figures as the RESULTS.md section for this run (tables, dashes where missing).
    python3 "$ROOT/tools/results_json.py" "$OUT" --markdown -o "$OUT/results.md" > /dev/null 2>> "$OUT/results-json.log" \
        || log "note: results.md not written (see results-json.log)"
fi

# ------------------------------------------------------------------------------------------------
# Summary
# ms/tile lines of bench-fastdet.json and bench-torch.json (python3 when there is one, else grep).
bench_summary() {
    local f
    for f in bench-fastdet.json bench-fastdet-batch2.json bench-fastdet-measure.json bench-fastdet-graph.json bench-fastdet-graph-rtc.json bench-fastdet-cudnn-wheel.json bench-tomogram.json bench-tomogram-measure.json bench-tomogram-host-blend.json bench-tomogram-batch2.json bench-torch.json results.json; do
        [ -f "$OUT/$f" ] || continue
        if command -v python3 > /dev/null 2>&1; then
            python3 - "$OUT/$f" <<'PY' 2>&1 | head -40
import json, sys
path = sys.argv[1]
name = path.rsplit("/", 1)[-1]
try:
    d = json.load(open(path))
except Exception as e:
    print(f"{name}: unreadable ({type(e).__name__}: {e})")
    raise SystemExit(0)
if "s_per_tomogram" in d:  # fastdet bench --tomogram
    m = d.get("models", {})
    print(f"{name}: {d['s_per_tomogram']:.2f} s per tomogram {'x'.join(map(str, d.get('tomogram', [])))} "
          f"({m.get('segresnetv2')} SegResNetV2 + {m.get('dynunet')} DynUNet, batch {d.get('batch', 1)}, blending on the {'GPU' if d.get('device_blend') else 'CPU'}; "
          f"upload {d.get('upload_s') or 0.0:.2f}{' overlapped' if d.get('upload_overlapped') else ''}, infer {d['infer_s']:.2f}, blend {d['blend_s']:.2f}, "
          f"detect {d['detect_s']:.2f} s; {d['tflops']:.1f} TFLOP/s; first tile {d.get('cold_start_s') or float('nan'):.2f} s after start"
          + (f"; fastdet's device memory peak {d['device_memory_peak_mib']:.0f} MiB" if d.get("device_memory_peak_mib") is not None else "")
          + (f"; card memory in use {d['card_memory_in_use_mib']:.0f} MiB" if d.get("card_memory_in_use_mib") is not None else "") + ")")
    raise SystemExit(0)
if "floor_s" in d:  # tools/results_json.py
    print(f"{name}: " + json.dumps({k: d.get(k) for k in ("tomogram_s", "tomogram_host_blend_s", "floor_s", "cold_start_s", "cold_start_kernels_compiled",
                                                "first_start_nvrtc_s", "peak_mem_gib", "tomogram_peak_mem_gib", "card_mem_gib", "fp16_matmul_tflops")}))
    for level, v in d.get("blocks", {}).items():  # criterion, benches/cuda_ops.rs
        print(f"  block {level:<18} " + "  ".join(f"{k[:-3]} {ms:.3f} ms" for k, ms in v.items()))
    for arch, v in d.get("tile_criterion", {}).items():  # criterion tile_<arch> variants
        print(f"  tile  {arch:<18} " + "  ".join(f"{k[:-3]} {ms:.3f} ms" for k, ms in v.items()))
    for shape, v in d.get("convt", {}).items():  # criterion convt_<shape> variants
        print(f"  convT {shape:<18} " + "  ".join(f"{k[:-3]} {ms:.3f} ms" for k, ms in v.items()))
    raise SystemExit(0)
if "models" in d:  # fastdet bench
    print(f"{name}: fastdet {d.get('fastdet_version')} on {d.get('device')}, tile {'x'.join(map(str, d.get('tile', [])))}, batch {d.get('batch')}")
    k = d.get("kernel_load") or {}
    if d.get("cold_start_s") is not None:
        print(f"  cold start {d['cold_start_s']:.2f} s to the first tile; kernels: {k.get('files')} files, {k.get('compiled')} compiled"
              f" ({k.get('compile_s') or 0.0:.1f} s), loaded in {k.get('load_s') or 0.0:.2f} s")
    for m in d["models"]:
        print(f"  {m['model']:<12} {m['ms_per_tile']:8.2f} ms/tile (min {m['ms_per_tile_min']:.2f}, max {m['ms_per_tile_max']:.2f})"
              f"  {m['gflops'] / 1e3:.2f} TFLOP/s  open {m['open_s']:.2f} s  [{m['engine']}]")
        if m.get("ms_per_tile_device") is not None:
            print(f"  {'':<12} {m['ms_per_tile_device']:8.2f} ms/tile device-resident walk  {m['gflops_device'] / 1e3:.2f} TFLOP/s")
        p = m.get("profile")
        if p:
            print(f"    profile: {p['sum_ms']:.2f} ms in {len(p['steps'])} steps; by kind:")
            for k in p["by_kind"][:8]:
                rate = (f"  {k['tflops']:.1f} TFLOP/s" if k.get("tflops") else "") + (f"  {k['gbps']:.0f} GB/s at least" if k.get("gbps") else "")
                print(f"      {k['kind']:<36} {k['ms']:8.3f} ms  {k['steps']:3d} step(s){rate}")
        for n in m.get("notes", []):
            if n.startswith("cuDNN "):
                print(f"    {n}")
        for n in m.get("notes", []):
            if n.startswith("walks:"):
                print(f"    {n}")
        algos = m.get("conv_algorithms") or []
        if algos:
            # Each conv's algorithm or engine (with what timing found, where it timed: the full
            # lines are in the JSON); here how many convs each one ran.
            counts = {}
            for entry in algos:
                algo = entry["algorithm"].split(" [")[0]
                counts[algo] = counts.get(algo, 0) + 1
            print("    cuDNN per conv: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
        c = m.get("conv_choice")
        if c:
            cells = ", ".join(f"{k} {'failed' if v is None else f'{v:.2f}'}" for k, v in (c.get("ms_per_walk") or {}).items())
            print(f"    measured choice: {c.get('label')} (ms per walk of {c.get('batch')}: {cells})")
else:  # tools/bench_torch.py
    print(f"{name}: torch {d.get('torch_version')} cuDNN {d.get('cudnn_version')} on {d.get('card')}, "
          f"{d.get('dtype')} {d.get('memory_format')}, tile {'x'.join(map(str, d.get('tile', [])))}"
          + ("" if d.get("complete", True) else f"  (partial: skipped {', '.join(d.get('skipped', []))})"))
    for arch, r in d.get("results", {}).items():
        for mode in ("eager", "compile"):
            if mode not in r:
                continue
            cells = []
            for b, e in r[mode].items():
                if "ms_per_tile" in e:
                    mem = f", {e['peak_mem_mib']:.0f} MiB" if e.get("peak_mem_mib") is not None else ""
                    cells.append(f"b{b} {e['ms_per_tile']:.2f}{mem}")
                else:
                    cells.append(f"b{b} ERROR")
            extra = ""
            if mode == "compile":
                extra = f"  [{r.get('compile_mode')}, {r.get('compile_s', 0):.0f} s compiling]"
            print(f"  {arch:<12} {mode:<8} ms/tile: " + "; ".join(cells) + extra)
            for b, e in r[mode].items():
                p = e.get("profile")
                if p:
                    print(f"    profile, batch {b}: " + ", ".join(f"{k} {v:.2f}" for k, v in p["ms_per_call"].items()) + " ms per call")
    for arch, b in d.get("best", {}).items():
        parts = [f"{m} {b[m + '_ms']:.2f} (batch {b[m + '_batch']})" for m in ("eager", "compile") if b.get(m + "_ms") is not None]
        print(f"  best {arch:<12} " + (", ".join(parts) or "-"))
PY
        else
            echo "$f:"
            grep -E '"(model|ms_per_tile)"' "$OUT/$f" | head -16 | sed 's/^ */  /'
        fi
    done
}
{
    echo
    echo "================ summary ($(elapsed) s of ${BUDGET} s) ================"
    cat "$SUMMARY"
    echo "----------------"
    for f in selftest-quick.log selftest-full.log; do
        [ -f "$OUT/$f" ] || continue
        r=$(grep -E '^selftest (PASSED|FAILED)' "$OUT/$f" | tail -1)
        echo "$f: ${r:-no result line (see the log)}"
        grep -E '^(note|time): ' "$OUT/$f" | head -12 | sed 's/^/  /'
        grep -E ' FAIL( |$)' "$OUT/$f" | grep -v '^  ' | head -12 | sed 's/^/  FAIL: /'
        grep -E 'timing |CUDA graph replay' "$OUT/$f" | sed 's/^/  /' | cut -c1-240
    done
    for f in sanitizer-memcheck.log sanitizer-racecheck.log; do
        [ -f "$OUT/$f" ] || continue
        echo "$f: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$f" | tail -1 | sed 's/^=* *//')"
        grep -E '^=+ +(Invalid|Race|Error|Uninitialized|Misaligned)' "$OUT/$f" | sort | uniq -c | sort -rn | head -6 | sed 's/^/  /'
    done
    for f in run-gpu.log run-gpu-again.log run-gpu-2workers.log run-cpu.log; do
        [ -f "$OUT/$f" ] || continue
        echo "$f:"
        grep -E 'picks; read|wrote [0-9]+ picks|error|FAILED|warning|CUDA graphs on|same bytes|differ' "$OUT/$f" | head -8 | sed 's/^/  /'
    done
    for f in score-gpu.log score-cpu.log; do
        [ -f "$OUT/$f" ] || continue
        echo "$f: $(awk '/^total/ {print "F-beta (weighted total) " $NF}' "$OUT/$f" | tail -1)"
    done
    bench_summary
    if [ $NO_GPU -eq 1 ]; then
        echo "RESULT: NO GPU (nothing ran on a GPU)"
    elif [ $FAILED -eq 0 ]; then
        echo "RESULT: PASS"
    else
        echo "RESULT: FAIL (see the logs above)"
    fi
} > "$OUT/summary-final.txt"
cat "$OUT/summary-final.txt"

# --pack: the few files a size- and count-limited copy-back takes, everything else in one archive.
PACK_KEEP="summary-final.txt results.json results.md selftest-quick.log selftest-full.log"
pack_outdir() {
    local tmp f
    tmp="$(mktemp -d)" || return 1
    # 15 MiB at most: without the criterion estimates if the whole is larger.
    tar -C "$OUT" --exclude=./kernel-cache -czf "$tmp/logs.tar.gz" . || return 1
    if [ "$(stat -c %s "$tmp/logs.tar.gz")" -gt 15728640 ]; then
        tar -C "$OUT" --exclude=./kernel-cache --exclude=./criterion -czf "$tmp/logs.tar.gz" . || return 1
    fi
    for f in "$OUT"/* "$OUT"/.[!.]*; do
        [ -e "$f" ] || continue
        case " $PACK_KEEP " in *" $(basename "$f") "*) ;; *) rm -rf "$f" ;; esac
    done
    mv "$tmp/logs.tar.gz" "$OUT/logs.tar.gz" && rmdir "$tmp"
}
if [ $PACK -eq 1 ]; then
    if pack_outdir; then
        echo "packed: $(cd "$OUT" && ls | tr '\n' ' ')($(du -sk "$OUT" | cut -f1) KiB)"
    else
        echo "device-check: --pack failed; $OUT left as it was" >&2
    fi
fi
if [ $NO_GPU -eq 1 ]; then exit 2; fi
if [ $FAILED -ne 0 ]; then exit 1; fi
exit 0
