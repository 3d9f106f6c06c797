#!/usr/bin/env bash
# Create (or refresh) the project environment in .venv and install the package into it.
# Idempotent: a second run only checks what is installed and rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# C++ build dependencies of the runtime beyond torch: nlohmann/json (strict metadata JSON) and OpenSSL's
# libcrypto (the artifact digest). Installed on Debian/Ubuntu when missing; elsewhere install them yourself.
if command -v dpkg-query >/dev/null && command -v apt-get >/dev/null; then
  missing=()
  for package in nlohmann-json3-dev libssl-dev; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] installing ${missing[*]}"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# --no-build-isolation: the C++ parts compile against the torch installed above.
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
echo "[setup] ready: $(.venv/bin/python -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")')"
