#!/usr/bin/env bash
# Fills .gpu/ (git-ignored, about 56 MB, under the device tool's 64 MiB limit) with what the offline
# GPU machine lacks: tritonserver 2.51 from the nvidia-pytriton wheel (xz tarball, without its
# libpython3.13), wheels for Python 3.12 (tritonclient, python-rapidjson, grpcio and protobuf for
# machines with older ones, numpy 1.26 for the text models) and SmolLM2's tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SITE=$($PY -c "import site; print(site.getsitepackages()[0])")
mkdir -p .gpu/whl .gpu/tokenizer
if [ ! -f .gpu/tritonserver-2.51-py312.tar.xz ]; then
  tar -C "$SITE" --exclude='libpython3-*.13.so*' -cJf .gpu/tritonserver-2.51-py312.tar.xz \
    pytriton/tritonserver/bin pytriton/tritonserver/backends pytriton/tritonserver/python_backend_stubs/3.12 \
    pytriton/tritonserver/caches nvidia_pytriton.libs
fi
for p in numpy==1.26.4 tritonclient==2.73.0 python-rapidjson==1.25 grpcio==1.85.1 protobuf==6.33.6; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl "$p"
done
$PY - <<'PY'
from trtbuild.checkpoint import load_smollm2_tokenizer
load_smollm2_tokenizer().save_pretrained(".gpu/tokenizer")
PY
du -sh .gpu
