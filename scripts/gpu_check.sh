#!/usr/bin/env bash
# Check the GPU paths on a machine with a CUDA GPU and its own torch, offline (issue 15).
#
# Records the machine, installs this project against the torch that is already there (nothing is
# downloaded), runs the CUDA tests (they compile their CUDA artifacts inside the same pytest run
# that uses them: an AOTInductor artifact runs only with the torch that built it), then the GPU
# benchmarks, and leaves everything under one output folder.
#
#   bash scripts/gpu_check.sh OUTDIR                          # everything, within 25 minutes
#   bash scripts/gpu_check.sh --budget-minutes 9 "$OUT"       # under a 10-minute command limit
#   bash scripts/gpu_check.sh --steps install,tests OUTDIR    # some steps (names below)
#   bash scripts/gpu_check.sh --dry-run OUTDIR                # print the plan and what is missing
#   bash scripts/gpu_check.sh --pack-dev-headers FILE.tgz     # here: pack the headers the GPU machine lacks
#   bash scripts/gpu_check.sh --dev-headers FILE.tgz OUTDIR   # there: unpack them first (as root)
#
# The GPU machines of this workplace have no nlohmann-json3-dev and no libssl-dev (and no package
# index): pack their headers on a machine that has them (scripts/setup.sh installs them), carry the
# file along and name it with --dev-headers; it is unpacked into / keeping every file already there.
# Relative paths (OUTDIR, FILE) are taken from the repository root.
#
# Steps, in this order: install, tests, goals-runtime, goals-compile, profile, bench-bf16-runtime,
# bench-bf16-compile, bench-fp16-runtime, bench-fp16-compile ("goals" = the two short runs behind issue
# 15's goals: bf16 plain DeiT-S and ImagePiece; "profile" = where ImagePiece's GPU time goes, kernel by
# kernel, beside plain DeiT-S; "bench" = all four full benchmark runs, "bench-bf16" / "bench-fp16" = two). Each step
# has its own timeout, capped by what is left of the budget; a step that no longer fits is skipped.
# PYTHON=... picks the interpreter (default: the first of python, python3 that imports torch).
#
# OUTDIR afterwards (few files, so a tool that returns only a handful gets all of them):
#   summary.txt       machine, versions, one line per step with its result and time
#   gpu_check.log     everything printed
#   junit-cuda.xml    the CUDA tests' results
#   details.tar.gz    details/: env/ (nvidia-smi, pip freeze, versions.json, torch collect_env, lscpu,
#                     git state), one log per step, benchmarks/ (the suite's csv/json/md/png)
# Exit status: 0 every step passed; 1 a step failed, timed out or did not fit the budget;
# 2 it cannot run here (bad arguments, missing package or tool); 3 no CUDA GPU: nothing checked.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

ALL_STEPS=(install tests goals-runtime goals-compile profile bench-bf16-runtime bench-bf16-compile bench-fp16-runtime bench-fp16-compile)
TEST_FILES=(tests/test_cuda.py tests/test_runtime_cuda.py)
RESERVE_S=30  # kept back from the budget for packing the results

# ------------------------------------------------------------------------------------------------
# GPU BENCHMARKS: the one place that knows how the suite is called (`python -m imagepiece.bench suite`,
# through its wrapper scripts/benchmark.py; tests/test_gpu_check.py parses these words with that CLI).
# Issue 15 item 2: timm eager and torch.compile(max-autotune) plain DeiT-S; ToMe, EViT, ImagePiece and
# hyper-speed through ip_runtime with and without CUDA graphs; batch 1 8 64 256; bf16 (the goals) first.
# The suite times every chosen path for every chosen variant, and max-autotune for 5 variants x 4
# batches would take most of an hour, so torch.compile runs for plain DeiT-S alone in its own run;
# eager DeiT-S is in both runs of a dtype, the common row between them.
# The goals runs come first: issue 15's goals need only bf16 DeiT-S and ImagePiece (ip_runtime with and
# without CUDA graphs; torch.compile max-autotune at the goal's batch 256 and at batch 1), so they fit a
# short lease where the full runs do not.
BENCH_COMMON=(scripts/benchmark.py suite --device cuda --arch deit_small_patch16_224 --repeats 30 --min-seconds 1)
bench_args() {  # step name -> the suite's own arguments for that run
  case $1 in
    goals-runtime) echo "--dtype bf16 --batch 1 8 64 256 --variants plain imagepiece --paths eager ip_runtime ip_runtime_graphs" ;;
    goals-compile) echo "--dtype bf16 --batch 1 256 --variants plain --paths eager compile" ;;
    bench-*-runtime) echo "--dtype ${1:6:4} --batch 1 8 64 256 --variants plain tome evit imagepiece imagepiece_hyper --paths eager aoti ip_runtime ip_runtime_graphs" ;;
    bench-*-compile) echo "--dtype ${1:6:4} --batch 1 8 64 256 --variants plain --paths eager compile" ;;
  esac
}
# ------------------------------------------------------------------------------------------------

step_cap_s() {  # longest a step may take (on an H100; cold caches)
  case $1 in
    install) echo 900 ;;            # the C++ runtime and bindings: ~2-3 min on 16 cores
    tests) echo 900 ;;              # 4 CUDA artifacts compiled two at a time, then the tests: ~5 min
    goals-runtime) echo 420 ;;      # 2 AOTI compiles (DeiT-S, batch 1..256) + timing
    goals-compile) echo 300 ;;      # 2 max-autotune compiles of DeiT-S + timing
    profile) echo 420 ;;            # 2 AOTI compiles (DeiT-S, batch 256) + 10 profiled calls each
    bench-*-runtime) echo 600 ;;    # 5 AOTI compiles (DeiT-S, batch 1..256) + timing
    bench-*-compile) echo 480 ;;    # 4 max-autotune compiles of DeiT-S + timing
  esac
}
step_least_s() {  # a step is skipped when less than this is left of the budget
  case $1 in
    install) echo 120 ;;
    tests) echo 300 ;;
    goals-*) echo 120 ;;
    profile) echo 240 ;;
    bench-*-runtime) echo 300 ;;
    bench-*-compile) echo 200 ;;
  esac
}
step_command() {  # the command a step runs, one word per line
  case $1 in
    install) printf '%s\n' "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e . ;;
    tests) printf '%s\n' "$PY" -m pytest -q "${TEST_FILES[@]}" -rA -o junit_logging=system-out --junitxml "$DETAILS/junit-cuda.xml" ;;
    goals-* | bench-*) printf '%s\n' "$PY" "${BENCH_COMMON[@]}" $(bench_args "$1") --out "$DETAILS/benchmarks" ;;
    # Issue 15 item 3: ImagePiece ran 0.43x (batch 1) to 0.97x (batch 256) plain DeiT-S on the H100; this shows why.
    profile) printf '%s\n' "$PY" scripts/benchmark.py profile --device cuda --arch deit_small_patch16_224 --preset imagepiece \
      --dtype bf16 --batch 256 --out "$DETAILS/benchmarks" ;;
  esac
}

usage() {
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}
die_usage() { echo "gpu_check: $1 (see --help)" >&2; exit 2; }

# --- arguments ------------------------------------------------------------------------------------
DRY_RUN=0
DEV_HEADERS=""
PACK_TO=""
BUDGET_MIN=25
REQUESTED="install,tests,goals,profile,bench"
OUTDIR=""
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --budget-minutes) (($# >= 2)) || die_usage "--budget-minutes needs a number"; BUDGET_MIN=$2; shift ;;
    --steps) (($# >= 2)) || die_usage "--steps needs a list"; REQUESTED=$2; shift ;;
    --dev-headers) (($# >= 2)) || die_usage "--dev-headers needs a file"; DEV_HEADERS=$2; shift ;;
    --pack-dev-headers) (($# >= 2)) || die_usage "--pack-dev-headers needs a file"; PACK_TO=$2; shift ;;
    -*) die_usage "unknown option $1" ;;
    *) [[ -z $OUTDIR ]] || die_usage "one output folder, got '$OUTDIR' and '$1'"; OUTDIR=$1 ;;
  esac
  shift
done
# The development headers the install step needs, as files under / (Debian/Ubuntu multiarch layout).
DEV_HEADER_PATHS=(usr/include/nlohmann usr/share/cmake/nlohmann_json usr/include/openssl usr/include/x86_64-linux-gnu/openssl)
if [[ -n $PACK_TO ]]; then
  for path in "${DEV_HEADER_PATHS[@]}"; do
    [[ -e /$path ]] || { echo "gpu_check: cannot pack: /$path is missing (apt-get install nlohmann-json3-dev libssl-dev)" >&2; exit 2; }
  done
  tar -czf "$PACK_TO" -C / "${DEV_HEADER_PATHS[@]}" || exit 2
  echo "gpu_check: packed ${DEV_HEADER_PATHS[*]} into $PACK_TO"
  exit 0
fi
[[ -z $DEV_HEADERS || -f $DEV_HEADERS ]] || die_usage "--dev-headers: no such file '$DEV_HEADERS'"
# Listed now, not found broken after minutes of GPU time: the archive --pack-dev-headers makes, with the headers in it.
if [[ -n $DEV_HEADERS ]] && [[ $'\n'$(tar -tzf "$DEV_HEADERS" 2>/dev/null)$'\n' != *$'\n'usr/include/nlohmann/json.hpp$'\n'* ]]; then
  die_usage "--dev-headers '$DEV_HEADERS' is not an archive of the headers (make it with --pack-dev-headers)"
fi
OUTDIR=${OUTDIR:-${OUT:-}}
[[ -n $OUTDIR ]] || die_usage "no output folder: give OUTDIR or set \$OUT"
[[ $BUDGET_MIN =~ ^[0-9]+$ ]] && BUDGET_MIN=$((10#$BUDGET_MIN)) && ((BUDGET_MIN > 0)) || die_usage "--budget-minutes must be a whole number of minutes > 0, got '$BUDGET_MIN'"

STEPS=()
IFS=',' read -r -a wanted <<<"$REQUESTED"
for step in "${ALL_STEPS[@]}"; do  # keep the fixed order whatever order they were asked in
  for want in "${wanted[@]}"; do
    if [[ $step == "$want" || $step == "$want"-* ]]; then STEPS+=("$step"); break; fi
  done
done
for want in "${wanted[@]}"; do
  known=0
  for step in "${ALL_STEPS[@]}"; do [[ $step == "$want" || $step == "$want"-* ]] && known=1; done
  ((known)) || die_usage "unknown step '$want'; steps: ${ALL_STEPS[*]} (or goals, bench, bench-bf16, bench-fp16)"
done
((${#STEPS[@]})) || die_usage "no steps chosen"
has_step() { local s; for s in "${STEPS[@]}"; do [[ $s == "$1"* ]] && return 0; done; return 1; }

# --- the interpreter: the first that imports torch ------------------------------------------------
PY=""
if [[ -n ${PYTHON:-} ]]; then  # an explicit choice is used as it is (a missing torch is reported below)
  PY=$(command -v "$PYTHON") || { echo "gpu_check: cannot run: PYTHON=$PYTHON is not an executable" >&2; exit 2; }
else
  for candidate in python python3; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    [[ -z $PY ]] && PY=$(command -v "$candidate")
    if "$candidate" -c "import torch" >/dev/null 2>&1; then PY=$(command -v "$candidate"); break; fi
  done
  [[ -n $PY ]] || { echo "gpu_check: cannot run: no python found (set PYTHON=...)" >&2; exit 2; }
fi

# Everything this run needs that is not there, one line each (no GPU needed to tell).
missing_requirements() {
  local modules="torch timm safetensors numpy pytest tqdm matplotlib"
  has_step install && modules+=" pip scikit_build_core"
  has_step install || modules+=" ip_runtime imagepiece"
  "$PY" - $modules <<'EOF'
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as error:  # a broken install counts as missing too
        hint = " (run the install step)" if name in ("ip_runtime", "imagepiece") else ""
        print(f"missing: python package {name}{hint}: {type(error).__name__}: {error}")
EOF
  if has_step install; then
    command -v c++ >/dev/null || command -v g++ >/dev/null || echo "missing: a C++ compiler (c++ or g++)"
    command -v cmake >/dev/null || "$PY" -c "import cmake" 2>/dev/null || echo "missing: cmake (executable or the cmake python package)"
    command -v ninja >/dev/null || "$PY" -c "import ninja" 2>/dev/null || echo "missing: ninja (executable or the ninja python package)"
    command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc || -x ${CUDA_HOME:-/nonexistent}/bin/nvcc ]] ||
      echo "missing: nvcc (a CUDA toolkit: find_package(Torch) of a CUDA torch needs it; set CUDA_HOME or PATH)"
    [[ -f /usr/include/nlohmann/json.hpp ]] || echo "missing: nlohmann/json headers (apt-get install nlohmann-json3-dev, or carry them: --dev-headers)"
    [[ -f /usr/include/openssl/evp.h ]] || echo "missing: OpenSSL headers (apt-get install libssl-dev, or carry them: --dev-headers)"
  fi
}

if ((DRY_RUN)); then
  DETAILS="$OUTDIR/details"
  echo "gpu_check (dry run): nothing is run or written"
  echo "python: $PY ($("$PY" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")' 2>&1 | tail -1))"
  echo "output: $OUTDIR   budget: $BUDGET_MIN min"
  for step in "${STEPS[@]}"; do
    mapfile -t words < <(step_command "$step")
    echo "step $step (timeout up to $(step_cap_s "$step")s, skipped under $(step_least_s "$step")s left): ${words[*]}"
  done
  problems=$(missing_requirements)
  if [[ -n $problems ]]; then echo "$problems"; echo "gpu_check: would stop: something needed is missing"; exit 2; fi
  echo "preflight: every package and tool is present (the GPU is checked only in a real run)"
  exit 0
fi

# --- a real run -----------------------------------------------------------------------------------
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
DETAILS="$OUTDIR/details"
mkdir -p "$DETAILS/env"
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1
STARTED=$(date +%s)
DEADLINE=$((STARTED + BUDGET_MIN * 60))
SUMMARY=()
FAILED=0
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export IMAGEPIECE_TEST_FAILURES_AT_ONCE=1  # a crash later in the run must not swallow earlier failures (tests/failures_at_once.py)
# Reruns on the same machine reuse artifacts; the key covers torch and every source (tests/artifacts.py).
export IMAGEPIECE_TEST_ARTIFACT_CACHE=${IMAGEPIECE_TEST_ARTIFACT_CACHE:-${TMPDIR:-/tmp}/imagepiece-gpu-check-artifacts}

say() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
record() { SUMMARY+=("$(printf '%-8s %-20s %s' "$1" "$2" "$3")"); }

finish() {  # always: summary, then pack the details into one file
  local rc=$?
  trap - EXIT
  ((FAILED && rc == 0)) && rc=1
  {
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $(( $(date +%s) - STARTED ))s of a ${BUDGET_MIN}-min budget, exit $rc"
    [[ -f $DETAILS/env/headline.txt ]] && cat "$DETAILS/env/headline.txt"
    printf '%s\n' "${SUMMARY[@]}"
  } >"$OUTDIR/summary.txt"
  [[ -f $DETAILS/junit-cuda.xml ]] && cp "$DETAILS/junit-cuda.xml" "$OUTDIR/junit-cuda.xml"
  command -v nvidia-smi >/dev/null && nvidia-smi >"$DETAILS/env/nvidia-smi-after.txt" 2>&1
  cp "$OUTDIR/summary.txt" "$DETAILS/summary.txt"
  if tar -czf "$OUTDIR/details.tar.gz" -C "$OUTDIR" details; then rm -rf "$DETAILS"; fi
  cat "$OUTDIR/summary.txt"
  exit "$rc"
}
trap finish EXIT
trap 'say "interrupted"; exit 130' INT TERM

say "python $PY, output $OUTDIR, budget ${BUDGET_MIN} min, steps: ${STEPS[*]}"

# The machine, before anything runs.
{
  uname -a
  command -v lscpu >/dev/null && lscpu
  command -v free >/dev/null && free -g
  df -h "$ROOT" /tmp
} >"$DETAILS/env/machine.txt" 2>&1
if command -v nvidia-smi >/dev/null; then
  { nvidia-smi; nvidia-smi -q; } >"$DETAILS/env/nvidia-smi.txt" 2>&1
  DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
  SMI_LINE=$(nvidia-smi -L 2>&1 | head -1)
else
  DRIVER="" SMI_LINE="nvidia-smi not found"
fi
"$PY" -m pip freeze >"$DETAILS/env/pip-freeze.txt" 2>&1
if command -v git >/dev/null && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
  { git -C "$ROOT" rev-parse HEAD; git -C "$ROOT" status --short; git -C "$ROOT" diff --stat; } >"$DETAILS/env/git.txt" 2>&1
fi
DRIVER="$DRIVER" "$PY" - "$DETAILS/env" <<'EOF' || { record missing python "$PY cannot import torch"; say "cannot run: $PY has no working torch"; FAILED=0; exit 2; }
import json, os, platform, sys
import torch
info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "driver": os.environ.get("DRIVER") or None,
        "cuda_available": torch.cuda.is_available(), "platform": platform.platform(), "gpus": []}
for name in ("triton", "timm", "numpy"):
    try:
        info[name] = __import__(name).__version__
    except Exception as error:
        info[name] = f"unavailable: {error}"
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        info["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                             "sms": p.multi_processor_count})
with open(os.path.join(sys.argv[1], "versions.json"), "w") as out:
    json.dump(info, out, indent=2)
gpu = info["gpus"][0] if info["gpus"] else None
with open(os.path.join(sys.argv[1], "headline.txt"), "w") as out:
    out.write(f"GPU: {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB), driver {info['driver']}\n" if gpu else "GPU: none\n")
    out.write(f"torch {info['torch']} (CUDA {info['torch_cuda']}, cuDNN {info['cudnn']}), triton {info['triton']}, "
              f"timm {info['timm']}, Python {info['python']}\n")
EOF
cat "$DETAILS/env/headline.txt"

read -r torch_version cuda_available < <("$PY" -c "import json, sys; v = json.load(open(sys.argv[1])); print(v['torch'], v['cuda_available'])" "$DETAILS/env/versions.json")
if [[ $cuda_available != True ]]; then
  message="no CUDA GPU: nothing to check (torch $torch_version sees no CUDA device; $SMI_LINE)"
  record none gpu "$message"
  say "$message"
  exit 3
fi
timeout 120 "$PY" -m torch.utils.collect_env >"$DETAILS/env/collect_env.txt" 2>&1

if [[ -n $DEV_HEADERS ]] && has_step install; then  # before the preflight, which looks for them
  say "unpacking $DEV_HEADERS into / (files already there are kept)"
  tar -xzf "$DEV_HEADERS" -C / --skip-old-files || { record failed dev-headers "could not unpack $DEV_HEADERS"; exit 2; }
  crypto_dir=/usr/lib/x86_64-linux-gnu  # libssl-dev's only non-header file is the link-time name of libcrypto
  if [[ ! -e $crypto_dir/libcrypto.so && -e $crypto_dir/libcrypto.so.3 ]]; then ln -s libcrypto.so.3 "$crypto_dir/libcrypto.so"; fi
fi
problems=$(missing_requirements)
if [[ -n $problems ]]; then
  echo "$problems" | tee "$DETAILS/missing.txt"
  record missing preflight "$(echo "$problems" | head -1) (all: details/missing.txt)"
  say "cannot run: something needed is missing (nothing is downloaded)"
  exit 2
fi

run_step() {  # name: run it under its timeout, log to details/<name>.log, record the result
  local name=$1 left cap limit started rc seconds last
  left=$((DEADLINE - RESERVE_S - $(date +%s)))
  if ((left < $(step_least_s "$name"))); then
    record skipped "$name" "budget spent: ${left}s left, needs $(step_least_s "$name")s"
    say "skip $name: only ${left}s of the budget left"
    FAILED=1
    return 1
  fi
  cap=$(step_cap_s "$name")
  limit=$((cap < left ? cap : left))
  mapfile -t words < <(step_command "$name")
  say "step $name (timeout ${limit}s): ${words[*]}"
  started=$(date +%s)
  (cd "$ROOT" && timeout --kill-after=30 "$limit" "${words[@]}") 2>&1 | tee "$DETAILS/$name.log"
  rc=${PIPESTATUS[0]}
  seconds=$(($(date +%s) - started))
  last=$(grep -v '^\s*$' "$DETAILS/$name.log" | tail -1 | cut -c1-160)
  case $rc in
    0) record ok "$name" "${seconds}s  $last" ;;
    124 | 137) record timeout "$name" "${seconds}s (limit ${limit}s)  $last"; FAILED=1 ;;
    *) record failed "$name" "${seconds}s rc $rc  $last"; FAILED=1 ;;
  esac
  say "$name: rc $rc after ${seconds}s"
  return "$rc"
}

for step in "${STEPS[@]}"; do
  if ! run_step "$step" && [[ $step == install ]]; then
    for rest in "${STEPS[@]:1}"; do record "not-run" "$rest" "the install step did not succeed"; done
    break
  fi
done
exit 0  # finish() turns a failed step into exit 1
