#!/usr/bin/env bash
# Makes the working tree small for copying it to a GPU machine where the copy's size is limited
# (tracked plus untracked-not-ignored files): the test fixtures (about 73 MiB; the device check
# reads none of them) leave git's index and are ignored through .git/info/exclude, staying on
# disk. `off` puts them back exactly as committed. While the tree is slim a pre-commit hook
# refuses every commit, so that the fixtures' removal can never be committed by mistake.
#
#   tools/slim-tree.sh on [PATH...]   slim the tree; print what would travel, PATHs (carried
#                                     build outputs, e.g. target/release/fastdet) included
#   tools/slim-tree.sh off            restore the index, the exclude file and the hooks
#   tools/slim-tree.sh status [PATH...]
set -euo pipefail
SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$SELF")/.."

SLIM_PATHS=(tests/fixtures)
GIT_DIR="$(git rev-parse --git-dir)"
MARK="$GIT_DIR/fastdet-slim-tree"
EXCLUDE="$GIT_DIR/info/exclude"
HOOK="$GIT_DIR/hooks/pre-commit"
TAG="# fastdet slim-tree"

# Bytes of every file that would travel: tracked and untracked-not-ignored files, plus PATHs.
travel_bytes() {
    {
        git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null || true
        for p in "$@"; do
            [ -e "$p" ] && find "$p" -type f -exec stat -c %s {} +
        done
    } | awk '{s += $1} END {print s + 0}'
}

report() {
    local b
    b=$(travel_bytes "$@")
    printf 'would travel: %.1f MiB (%s)%s\n' "$(echo "$b / 1048576" | bc -l)" \
        "$([ -e "$MARK" ] && echo "slim tree" || echo "whole tree")" "$([ $# -gt 0 ] && echo ", with $*")"
}

case "${1:-}" in
    on)
        shift
        if [ -e "$MARK" ]; then
            echo "slim-tree: the tree is already slim ('tools/slim-tree.sh off' restores it)" >&2
            exit 1
        fi
        if ! git diff --quiet -- "${SLIM_PATHS[@]}" || ! git diff --cached --quiet -- "${SLIM_PATHS[@]}"; then
            echo "slim-tree: ${SLIM_PATHS[*]} has uncommitted changes; commit them first" >&2
            exit 1
        fi
        if [ -e "$HOOK" ]; then
            echo "slim-tree: $HOOK exists; not replacing it" >&2
            exit 1
        fi
        mkdir -p "$GIT_DIR/info" "$GIT_DIR/hooks"
        touch "$MARK"
        { echo "$TAG begin"; printf '/%s/\n' "${SLIM_PATHS[@]}"; echo "$TAG end"; } >> "$EXCLUDE"
        cat > "$HOOK" <<EOF
#!/bin/sh
$TAG
echo "pre-commit: the working tree is slim (${SLIM_PATHS[*]} out of the index); run tools/slim-tree.sh off first" >&2
exit 1
EOF
        chmod +x "$HOOK"
        git rm -r -q --cached -- "${SLIM_PATHS[@]}"
        report "$@"
        echo "slim: ${SLIM_PATHS[*]} out of the index (still on disk); 'tools/slim-tree.sh off' puts them back"
        ;;
    off)
        if [ ! -e "$MARK" ]; then
            echo "slim-tree: the tree is not slim"
            exit 0
        fi
        git reset -q -- "${SLIM_PATHS[@]}"
        # Drop the block of exclude lines this script added.
        sed -i "/^$TAG begin\$/,/^$TAG end\$/d" "$EXCLUDE"
        if [ -e "$HOOK" ] && grep -qF "$TAG" "$HOOK"; then rm -f "$HOOK"; fi
        rm -f "$MARK"
        if ! git diff --cached --quiet -- "${SLIM_PATHS[@]}"; then
            echo "slim-tree: the index still differs from HEAD under ${SLIM_PATHS[*]}" >&2
            exit 1
        fi
        report
        echo "restored: ${SLIM_PATHS[*]} back in the index"
        ;;
    status)
        shift
        report "$@"
        ;;
    *)
        sed -n '2,11p' "$SELF" | sed 's/^# \{0,1\}//'
        exit 64
        ;;
esac
