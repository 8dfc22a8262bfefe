#!/usr/bin/env bash
# Checks fastdet's files against the Python libraries its users read and write them with, in
# ignored venvs under .cache (PyPI, pinned): copick writes the bundled sample as a project
# (OME-Zarr pyramids, truth) and reads back fastdet's copick picks, mrcfile writes the sample as
# MRC files, starfile reads fastdet's STAR files, safetensors its saved maps, zarr-python 3 writes
# the sample as zarr v3 stores. tools/interop_check.py says what is compared. CPU only, about two
# minutes after the install.
#
# Usage: tools/interop-check.sh [FASTDET_BINARY; default: target/release/fastdet, built first]
# Exit status: 0 passed, 3 the libraries could not be installed (nothing was checked), 1 otherwise.
# zarr-python 3 (Python 3.11 or later) that cannot be installed skips its own check only, saying so.
set -euo pipefail
bin=$(realpath "${1:-$(dirname "$0")/../target/release/fastdet}")
cd "$(dirname "$0")/.."
if [ -z "${1:-}" ]; then cargo build --release; fi
[ -x "$bin" ] || { echo "interop-check: no fastdet binary at $bin" >&2; exit 1; }
# A venv with a working pip (one left broken, e.g. by a removed interpreter, is made again), and
# the pinned packages in it.
install() {
    { "$1/bin/python" -m pip --version >/dev/null 2>&1 || python3 -m venv --clear "$1"; } \
        && "$1/bin/python" -m pip install --quiet --disable-pip-version-check -r "$2"
}
install .cache/interop-venv tools/interop-requirements.txt \
    || { echo "interop-check: could not install tools/interop-requirements.txt from PyPI" >&2; exit 3; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stores=$tmp
if install .cache/interop-venv-zarr3 tools/interop-requirements-zarr3.txt; then
    .cache/interop-venv-zarr3/bin/python tools/interop_zarr3.py . "$stores"
else
    echo "interop-check: NOTE: zarr-python 3 could not be installed (it needs Python 3.11 or later); its stores are not checked" >&2
    stores=
fi
.cache/interop-venv/bin/python tools/interop_check.py "$bin" . ${stores:+"$stores"}
