#!/usr/bin/env bash
# Checks fastdet's cuDNN graph-API descriptors against the real library on a machine without a
# GPU: fetches the cuDNN 9 wheel from PyPI (about 520 MB, kept in .cache/cudnn-host), builds a
# stand-in libcuda.so.1 whose every function fails (cuDNN's engine libraries link against the
# driver; nothing here calls it), and runs the unit tests of src/engine/cuda/dnn_graph.rs with
# both on LD_LIBRARY_PATH. The tensors, the convolution, its forward operation and the operation
# graph finalize on the host; heuristics and plans need a GPU (`fastdet selftest --device cuda:0`).
#
# Usage: tools/cudnn-host-check.sh [cuDNN wheel version, e.g. 9.14.0.64; default: the newest,
#        or the one fetched before]
# Exit status: 0 passed, 3 the wheel could not be fetched (nothing was checked), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.cache/cudnn-host
mkdir -p "$dir"
# A different version asked for: fetch it afresh.
if [ -n "${1:-}" ] && [ "$(cat "$dir/version" 2>/dev/null || true)" != "$1" ]; then rm -rf "$dir/lib"; fi
if [ ! -f "$dir/lib/libcudnn.so.9" ]; then
    rm -rf "$dir/wheel" "$dir/lib"
    python3 -m pip download --quiet --no-deps --dest "$dir/wheel" "nvidia-cudnn-cu13${1:+==$1}" \
        || { echo "cudnn-host-check: could not fetch nvidia-cudnn-cu13${1:+==$1} from PyPI" >&2; exit 3; }
    python3 - "$dir" <<'PY'
import glob, os, sys, zipfile
d = sys.argv[1]
wheels = glob.glob(os.path.join(d, "wheel", "*.whl"))
if len(wheels) != 1:
    sys.exit(f"cudnn-host-check: expected one wheel in {d}/wheel, found {wheels}")
os.makedirs(os.path.join(d, "lib"), exist_ok=True)
with zipfile.ZipFile(wheels[0]) as z:
    for n in z.namelist():
        if n.startswith("nvidia/cudnn/lib/") and ".so" in n:
            with open(os.path.join(d, "lib", os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
# The wheel's version (nvidia_cudnn_cu13-9.14.0.64-py3-...): what a later call compares with.
with open(os.path.join(d, "version"), "w") as f:
    f.write(os.path.basename(wheels[0]).split("-")[1] + "\n")
PY
    rm -rf "$dir/wheel"
    [ -f "$dir/lib/libcudnn.so.9" ] || { echo "cudnn-host-check: the wheel holds no libcudnn.so.9" >&2; exit 1; }
fi
# The stand-in driver: every cu* symbol the cuDNN libraries import (some versions import none
# and only name the library), each returning an error.
stub="$dir/stub"
mkdir -p "$stub"
command -v nm >/dev/null || { echo "cudnn-host-check: needs nm (binutils)" >&2; exit 1; }
{
    echo "int fastdet_stand_in_driver(void) { return 999; }"
    for f in "$dir"/lib/*.so.9; do
        nm -D --undefined-only "$f" | awk '{print $2}' | { grep -E '^cu[A-Z]' || true; }
    done | sort -u | awk '{print "int " $1 "(void) { return 999; }"}'
} > "$stub/libcuda.c"
cc -shared -fPIC -o "$stub/libcuda.so.1" "$stub/libcuda.c"
LD_LIBRARY_PATH="$PWD/$dir/lib:$PWD/$stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test --release --lib dnn_graph -- --nocapture 2>&1 | tee "$dir/test.log"
grep -q "conv_node_descriptors_finalize_in_cudnn ... ok" "$dir/test.log" || { echo "cudnn-host-check: the descriptor test did not pass" >&2; exit 1; }
grep -q "skipped: libcudnn" "$dir/test.log" && { echo "cudnn-host-check: the library did not load" >&2; exit 1; }
version=$(python3 -c "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).cudnnGetVersion())" "$dir/lib/libcudnn.so.9")
echo "cudnn-host-check: passed with cuDNN $version"
