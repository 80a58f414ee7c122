#!/usr/bin/env bash
# Splits SmolLM2's GGUF (98 MB, over the device tool's 64 MiB carry) into .smol/a and .smol/b
# (git-ignored) with the gguf wheel transformers needs to read it. Two device calls in a row carry
# one part each (the machine keeps ignored files while warm); bench/gpu_smollm2.sh joins them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GGUF=$($PY -c "from trtbuild.checkpoint import _smollm2_dir, SMOLLM2_GGUF; print(_smollm2_dir() / SMOLLM2_GGUF)")
rm -rf .smol && mkdir -p .smol/a .smol/b
head -c 56623104 "$GGUF" > .smol/a/gguf.part-a
tail -c +56623105 "$GGUF" > .smol/b/gguf.part-b
sha256sum "$GGUF" | cut -d' ' -f1 > .smol/b/gguf.sha256
$PY -m pip download -q --no-deps -d .smol/b "gguf==0.19.0"
du -sh .smol/a .smol/b
