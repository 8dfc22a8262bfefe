#!/usr/bin/env bash
# Builds what tools/device-check.sh runs on a GPU machine that has no Rust toolchain:
# target/release/fastdet and the criterion bench binary target/release/cuda_ops
# (benches/cuda_ops.rs), copies MONAI's wheel (for the PyTorch baseline) from ../shared/wheels into
# .cache/wheels when it is there, then prints the paths to copy there with the working tree and
# the size of that copy (tools/slim-tree.sh on leaves the test fixtures behind).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --bin fastdet
# The bench executable's name carries a hash: take it from cargo's own report.
exe="$(cargo bench --bench cuda_ops --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "cuda_ops" and m.get("executable"):
        print(m["executable"])')"
if [ -z "$exe" ] || [ ! -x "$exe" ]; then
    echo "build-for-device: cargo did not report the cuda_ops bench executable" >&2
    exit 1
fi
cp "$exe" target/release/cuda_ops
echo "built: target/release/fastdet target/release/cuda_ops"
carry="target/release/fastdet target/release/cuda_ops"
if ls ../shared/wheels/monai-*.whl > /dev/null 2>&1; then
    mkdir -p .cache/wheels
    cp ../shared/wheels/monai-*.whl .cache/wheels/
fi
[ -d .cache/wheels ] && carry="$carry .cache/wheels"
echo "carry: $carry"
# shellcheck disable=SC2086
bash tools/slim-tree.sh status $carry
