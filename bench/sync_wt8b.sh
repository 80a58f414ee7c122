#!/usr/bin/env bash
# Copies this worktree (no .git, wheels or artifacts) to /work/main/.wt8b/ for the device tool (carry [".wt8b"]).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
dst=${1:-/work/main/.wt8b}
rm -rf "$dst" && mkdir -p "$dst"
tar -C "$src" --exclude=.git --exclude='*.whl' --exclude=artifacts --exclude=__pycache__ --exclude=.pytest_cache --exclude=engines -cf - . | tar -C "$dst" -xf -
du -sh "$dst"
