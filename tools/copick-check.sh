#!/usr/bin/env bash
# Checks fastdet's copick reading and writing against the copick library itself (PyPI, pinned,
# in an ignored venv at .cache/copick-venv): copick writes the bundled sample as a project and
# fastdet infers and scores from it; copick reads the picks fastdet wrote. See
# tools/copick_check.py for what is compared. CPU only, about half a minute after the install.
#
# Usage: tools/copick-check.sh [FASTDET_BINARY, default target/release/fastdet, built if absent]
# Exit status: 0 passed, 3 copick could not be installed (nothing was checked), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/copick-venv
pins="copick==1.31.0"
bin=${1:-target/release/fastdet}
if [ -z "${1:-}" ] && [ ! -x "$bin" ]; then cargo build --release; fi
[ -x "$bin" ] || { echo "copick-check: no fastdet binary at $bin" >&2; exit 1; }
if ! { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; } \
    || ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $pins; then
    echo "copick-check: could not install $pins from PyPI" >&2
    exit 3
fi
"$venv/bin/python" tools/copick_check.py "$bin" .
