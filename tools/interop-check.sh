#!/usr/bin/env bash
# Checks fastdet's files against the Python libraries its users read and write them with, in
# ignored venvs under .cache (PyPI, pinned): copick writes the bundled sample as a project
# (OME-Zarr pyramids, truth) and reads back fastdet's copick picks, mrcfile writes the sample as
# MRC files, starfile reads fastdet's STAR files, safetensors its saved maps, zarr-python 3 writes
# the sample as zarr v3 stores. tools/interop_check.py says what is compared. CPU only, about two
# minutes after the install.
#
# Usage: tools/interop-check.sh [FASTDET_BINARY, default target/release/fastdet, built if absent]
# Exit status: 0 passed, 3 the libraries could not be installed (nothing was checked), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/interop-venv
venv3=.cache/interop-venv-zarr3
pins3="zarr==3.1.6 numcodecs==0.16.6"
pins="copick==1.31.0 mrcfile==1.5.4 starfile==0.5.13 zarr==2.18.7 safetensors==0.8.0"
bin=${1:-target/release/fastdet}
if [ -z "${1:-}" ] && [ ! -x "$bin" ]; then cargo build --release; fi
[ -x "$bin" ] || { echo "interop-check: no fastdet binary at $bin" >&2; exit 1; }
# zarr-python 3 in a venv of its own: copick needs zarr 2.
install() {
    { [ -x "$1/bin/python" ] || python3 -m venv "$1"; } \
        && "$1/bin/python" -m pip install --quiet --disable-pip-version-check $2 \
        || { echo "interop-check: could not install $2 from PyPI" >&2; exit 3; }
}
install "$venv" "$pins"
install "$venv3" "$pins3"
stores=$(mktemp -d)
trap 'rm -rf "$stores"' EXIT
"$venv3/bin/python" tools/interop_zarr3.py . "$stores"
"$venv/bin/python" tools/interop_check.py "$bin" . "$stores"
