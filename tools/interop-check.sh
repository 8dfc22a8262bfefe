#!/usr/bin/env bash
# Checks fastdet's files against the Python libraries its users read and write them with, in an
# ignored venv at .cache/interop-venv (PyPI, pinned): copick writes the bundled sample as a project
# (OME-Zarr pyramids, truth) and reads back fastdet's copick picks, mrcfile writes the sample as MRC
# files, starfile reads fastdet's STAR files. tools/interop_check.py says what is compared. CPU
# only, about a minute after the install.
#
# Usage: tools/interop-check.sh [FASTDET_BINARY, default target/release/fastdet, built if absent]
# Exit status: 0 passed, 3 the libraries could not be installed (nothing was checked), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/interop-venv
pins="copick==1.31.0 mrcfile==1.5.4 starfile==0.5.13 zarr==2.18.7"
bin=${1:-target/release/fastdet}
if [ -z "${1:-}" ] && [ ! -x "$bin" ]; then cargo build --release; fi
[ -x "$bin" ] || { echo "interop-check: no fastdet binary at $bin" >&2; exit 1; }
if ! { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; } \
    || ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $pins; then
    echo "interop-check: could not install $pins from PyPI" >&2
    exit 3
fi
"$venv/bin/python" tools/interop_check.py "$bin" .
