#!/usr/bin/env bash
# The whole GPU run in one device call (device tool: carry [".gpu"], command `bash bench/gpu_suite.sh`).
# Build the carried folder first, on the CPU machine: `bash bench/prepare_gpu_carry.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
export PYTHONUNBUFFERED=1
python3 -m bench.gpu_suite --out "${OUT:-artifacts/gpu}" "$@"
