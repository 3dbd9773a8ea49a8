#!/usr/bin/env bash
# Installs nnunetv2_rfmedsam and everything it needs into $PYTHON (default python3), on a machine with or
# without a GPU. Safe to re-run: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  # PyPI's default torch (a CUDA build) runs on a CPU as well; installing torch and torchvision in one
  # command makes pip pick a matching pair (a mismatched torchvision fails at import)
  "$PY" -m pip install torch torchvision
fi
if [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("sam2"))' 2>/dev/null)" != "1.1.0" ]; then
  # sam2 ships only an sdist: build it against the installed torch, without its optional CUDA extension
  # (used only for post-processing), instead of letting pip download a second torch into a build env
  "$PY" -m pip install setuptools wheel
  SAM2_BUILD_CUDA=0 "$PY" -m pip install --no-build-isolation sam2==1.1.0
fi
"$PY" -m pip install -e ".[test]"
