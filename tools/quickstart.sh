#!/usr/bin/env bash
# Builds fastdet, detects particles in the bundled sample with the demo ensemble, and scores the picks.
# On the GPUs when the machine has them (run's --device auto), else on the CPU: about a minute on
# 2 cores after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
bin=target/release/fastdet
out=${1:-sample_submission.csv}
# The bundled sample is 80x160x160 voxels: a 64x96x96 window with 2x3x3 tiles covers it (the seed's
# 192x128x128 window with 1x9x9 tiles is the default for competition-size tomograms).
"$bin" run --data tests/fixtures/dataset --split test \
    --weights weights/demo_segresnetv2.safetensors weights/demo_dynunet.safetensors \
    --window 64,96,96 --tiles 2,3,3 --with-score --out "$out"
"$bin" score --truth tests/fixtures/dataset --split test "$out"
