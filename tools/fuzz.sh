#!/usr/bin/env bash
# Fuzzes fastdet's file parsers with cargo-fuzz (libFuzzer) on the *stable* toolchain.
#
# Usage:   tools/fuzz.sh [SECONDS] [TARGET...]
#   SECONDS  time per target (default 60); TARGETs default to all five:
#     checkpoint_zip      bytes as a checkpoint → fastdet::checkpoint::read_checkpoint (zip + pickle;
#                         bytes starting 0x80 are wrapped as the data.pkl of a torch.save zip)
#     pickle              bytes → fastdet::pickle::unpickle
#     zarr_metadata       bytes as a v2 .zarray beside a small valid chunk → fastdet::io::zarr::read_zarr_volume
#     safetensors_header  bytes as a weights file → fastdet::weights::Weights::load
#     copick_json         bytes as a picks file → fastdet::io::copick::read_picks_file
# Exits non-zero if any target crashed (panic, overflow, abort, OOM over FUZZ_RSS_MB, or an input
# running over FUZZ_TIMEOUT seconds). A crashing input is kept in tools/fuzz/artifacts/<target>/;
# replay it with `cargo +stable fuzz run --fuzz-dir tools/fuzz --sanitizer none -O -a TARGET FILE`,
# then add it to tests/fuzz_regressions.rs as a plain #[test] asserting a clean error.
#
# Needs: cargo (stable is enough), a C++ compiler (libfuzzer-sys builds libFuzzer), python3 only to
# regenerate the seeds (tools/fuzz/make_seeds.py; the seeds are checked in), and cargo-fuzz, which
# this script installs with `cargo install cargo-fuzz` when it is missing. First build: ~10 min on
# 2 cores. Corpora grow in tools/fuzz/corpus/<target>/ (git-ignored); tools/fuzz/seeds/ seed them.
#
# What makes it work on stable: `--sanitizer none` (AddressSanitizer needs the unstable
# -Zsanitizer flag; safe Rust gains little from it) with `-O -a` (optimised, but with debug
# assertions and overflow checks, so an arithmetic overflow is a crash). The working invocation is
#   cargo +stable fuzz run --fuzz-dir tools/fuzz --sanitizer none -O -a TARGET CORPUS SEEDS -- -max_total_time=N
# Environment: FUZZ_RSS_MB (default 2048), FUZZ_TIMEOUT (per input, s, default 10), FUZZ_JOBS
# (parallel fuzzing processes per target, default 1), TOOLCHAIN (default stable), and
# FUZZ_SANITIZER=address to build with AddressSanitizer instead (on stable through
# RUSTC_BOOTSTRAP=1, which this script then sets; its own build in tools/fuzz/target/asan, ~7 min;
# LeakSanitizer is off there: a self-referential pickle, e.g. `d = {}; d['a'] = d`, becomes an Rc
# cycle that is never freed, by design, and bounded by the input's size).
set -euo pipefail

SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(checkpoint_zip pickle zarr_metadata safetensors_header copick_json)
fi
RSS_MB="${FUZZ_RSS_MB:-2048}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"
JOBS="${FUZZ_JOBS:-1}"
TOOLCHAIN="${TOOLCHAIN:-stable}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FUZZ=tools/fuzz

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz
fi

FLAGS=(--fuzz-dir "$FUZZ" -O -a)
EXTRA=()
case "${FUZZ_SANITIZER:-none}" in
    none) FLAGS+=(--sanitizer none) ;;
    address)
        export RUSTC_BOOTSTRAP=1
        FLAGS+=(--sanitizer address --target-dir "$FUZZ/target/asan")
        EXTRA+=(-detect_leaks=0)
        export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
        ;;
    *) echo "fuzz.sh: FUZZ_SANITIZER must be none or address" >&2; exit 2 ;;
esac
cargo "+$TOOLCHAIN" fuzz build "${FLAGS[@]}" || { echo "fuzz.sh: the fuzz targets do not build" >&2; exit 2; }

failed=()
for t in "${TARGETS[@]}"; do
    mkdir -p "$FUZZ/corpus/$t" "$FUZZ/artifacts/$t"
    echo "=== $t: ${SECONDS_PER_TARGET}s ===" >&2
    log="$FUZZ/artifacts/$t/last_run.log"
    case "$t" in
        pickle | checkpoint_zip) dict="$FUZZ/dicts/pickle.dict" ;;
        *) dict="$FUZZ/dicts/json.dict" ;;
    esac
    if cargo "+$TOOLCHAIN" fuzz run "${FLAGS[@]}" --jobs "$JOBS" "$t" "$FUZZ/corpus/$t" "$FUZZ/seeds/$t" -- \
        ${EXTRA[@]+"${EXTRA[@]}"} -dict="$dict" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb="$RSS_MB" -timeout="$TIMEOUT" \
        -artifact_prefix="$FUZZ/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
        grep -E "^(Done|stat::number_of_executed_units)" "$log" >&2 || true
    else
        failed+=("$t")
        echo "fuzz.sh: $t CRASHED; log: $log" >&2
        grep -E -m1 -A3 "panicked at|ERROR: libFuzzer|SUMMARY" "$log" >&2 || tail -20 "$log" >&2
        ls "$FUZZ/artifacts/$t"/{crash,oom,timeout,leak}-* 2>/dev/null >&2 || true
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${TARGETS[*]} (${SECONDS_PER_TARGET}s each)" >&2
