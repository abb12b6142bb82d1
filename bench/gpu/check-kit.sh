#!/usr/bin/env bash
# Prove the GPU kit here, without a GPU: a Python 3.12 venv holding only what the GPU machine has
# (at its versions, where the registry has them), plus .whl/ installed exactly as bench/gpu/run.sh
# installs it there, runs `bench/engine.py --config tiny` to the end. From a clean clone:
#   bench/gpu/check-kit.sh              # ~5 GB venv (torch 2.11's CUDA build) the first time
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${KIT_VENV:-$HOME/.cache/voxtral_app/kit-venv-py312}
PY312=${PY312:-$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12}
stamp() { echo "[$(date -u +%T)] $*"; }
# The GPU machine's packages that matter here, listed once in device-packages.txt (also read by
# tests/test_gpu_kit.py). Not matched: python 3.12.3 there, the pyenv 3.12 here.
DEVICE_PACKAGES=$(grep -v '^#' bench/gpu/device-packages.txt)
if [ ! -x "$VENV/bin/python" ]; then
    stamp "creating $VENV with $("$PY312" -V)"
    "$PY312" -m venv "$VENV"
fi
stamp "installing the GPU machine's packages"
"$VENV/bin/python" -m pip install -q $DEVICE_PACKAGES
"$VENV/bin/python" -m pip list 2>/dev/null | grep -i -E '^(torch|transformers|accelerate|huggingface.hub|numpy|onnxruntime|tiktoken|tokenizers|safetensors) '
[ -n "$(ls .whl/*.whl 2>/dev/null)" ] || PIP="$VENV/bin/python -m pip" bench/gpu/wheels.sh
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
stamp "bench/gpu/run.sh --config tiny, as on the GPU machine"
OUT=${OUT:-bench-out/check-kit} SITE="$SITE" PYTHON="$VENV/bin/python" bench/gpu/run.sh --config tiny "$@"
stamp "check-kit passed"
