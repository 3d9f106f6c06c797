#!/usr/bin/env bash
# Create (or refresh) the project environment in .venv and install the package into it.
# Idempotent: a second run only checks what is installed and rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# --no-build-isolation: the C++ parts compile against the torch installed above.
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
echo "[setup] ready: $(.venv/bin/python -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")')"
