# Sourced by the GPU scripts: installs what the device machine lacks from the carried .gpu/ folder.
# The machine has no network: wheels and an unpacked tritonserver (from the nvidia-pytriton wheel) travel.
set -euo pipefail
GPU_DIR=${GPU_DIR:-$PWD/.gpu}
SITE=/tmp/trtbuild-site
mkdir -p $SITE
# grpcio and protobuf travel too, but are installed only where the machine's are older than tritonclient needs
wheels=$(python3 - "$GPU_DIR/whl" <<'PY'
import glob, importlib.metadata as m, sys
d = sys.argv[1]
def older(dist, want):
    try:
        return tuple(int(x) for x in m.version(dist).split(".")[:2]) < want
    except m.PackageNotFoundError:
        return True
picks = ["tritonclient-*", "python_rapidjson-*"]
picks += ["grpcio-*"] if older("grpcio", (1, 81)) else []
picks += ["protobuf-*"] if older("protobuf", (6, 30)) else []
print(" ".join(f for p in picks for f in glob.glob(f"{d}/{p}.whl")))
PY
)
# a run of the runtime stages only may carry just .gpu/tokenizer: what is absent is skipped
if [ -n "$wheels" ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $wheels; fi
export PYTHONPATH=$PWD:$SITE
if [ ! -d /tmp/triton/pytriton ] && ls $GPU_DIR/tritonserver-*.tar.xz >/dev/null 2>&1; then
  mkdir -p /tmp/triton && tar -xJf $GPU_DIR/tritonserver-*.tar.xz -C /tmp/triton
fi
export TRTBUILD_PYTRITON_ROOT=/tmp/triton
# numpy<2 environment for the text (BYTES) models; every other package from the interpreter's own site-packages
if [ ! -f /tmp/textenv/.ready ] && ls $GPU_DIR/whl/numpy-1.26*.whl >/dev/null 2>&1; then
  rm -rf /tmp/textenv && python3 -m venv /tmp/textenv
  /tmp/textenv/bin/python -m pip install -q --no-index --no-deps --no-compile $GPU_DIR/whl/numpy-1.26*.whl
  python3 -c "import site; print(site.getsitepackages()[0])" > "$(/tmp/textenv/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz-system.pth"
  touch /tmp/textenv/.ready
fi
export TRTBUILD_TEXT_ENV=/tmp/textenv
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
