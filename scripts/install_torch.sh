#!/bin/sh
# Install torch==VERSION into the venv without ever pulling CUDA wheels onto a machine with no GPU.
#   1. already installed at that version: nothing to do;
#   2. a local wheel pip already knows (find-links): use it, offline;
#   3. a machine with an NVIDIA GPU: the normal wheel from the package index;
#   4. otherwise: the CPU-only build from PyTorch's CPU wheel index.
set -eu
PY="$1"
VERSION="$2"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$VERSION' else 1)" 2>/dev/null; then
  exit 0
fi
if "$PY" -m pip install -q --no-index --no-deps "torch==$VERSION" 2>/dev/null; then
  # torch is in place; this only adds its (small) dependencies.
  exec "$PY" -m pip install -q "torch==$VERSION"
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  exec "$PY" -m pip install -q "torch==$VERSION"
fi
exec "$PY" -m pip install -q "torch==$VERSION" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
