#!/usr/bin/env bash
# Create (or refresh) the project environment in .venv and install the package into it.
# Idempotent: a second run only checks what is installed (repairing what is missing or broken) and rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'echo "[setup] failed (exit $?) at: $BASH_COMMAND" >&2' ERR  # which step: pip's and CMake's own last lines may not say
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
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
      command -v sudo >/dev/null || { echo "[setup] error: installing ${missing[*]} needs root or sudo; install them and rerun" >&2; exit 1; }
      sudo="sudo"
    fi
    # Stopped here, not after gigabytes of wheels, where the C++ build would fail on the missing headers.
    if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
      echo "[setup] error: apt-get could not install ${missing[*]}; install them and rerun" >&2
      exit 1
    fi
  fi
fi
# A .venv without a working pip (a first run stopped while venv was still making it) is made again.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "[setup] $([ -e .venv ] && echo "remaking the incomplete .venv" || echo "creating .venv") with $($python --version)"
  "$python" -m venv --clear .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -r requirements.txt
# pip trusts its records: a torch whose files were damaged (a disk filled mid-install) passes them, then fails the C++ build.
if ! .venv/bin/python -c "import torch, torchvision, timm" >/dev/null 2>&1; then
  echo "[setup] .venv's torch, torchvision or timm does not import: reinstalling them"
  .venv/bin/python -m pip install -q --force-reinstall --no-deps -r requirements.txt
fi
# --no-build-isolation: the C++ parts compile against the torch installed above.
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
echo "[setup] ready: $(.venv/bin/python -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")')"
