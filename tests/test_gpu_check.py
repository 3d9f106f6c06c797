"""scripts/gpu_check.sh without a GPU: valid bash, a plan, clear refusals, and a clean "nothing to check".

The GPU run itself is exercised only on a GPU machine (issue 15); these tests keep the script from
rotting in between, since it is used on machines where a failed start costs scarce GPU time.
"""
import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_check(*args, env=None, timeout=120):
    environment = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    environment.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=environment,
                          timeout=timeout, cwd=ROOT)


def test_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_without_a_gpu_it_checks_nothing_says_so_and_keeps_the_environment(tmp_path):
    out = tmp_path / "out"
    result = gpu_check(out, env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU, whatever this machine has
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no CUDA GPU: nothing to check" in result.stdout
    assert "no CUDA GPU: nothing to check" in (out / "summary.txt").read_text()
    assert "no CUDA GPU" in (out / "gpu_check.log").read_text()
    with tarfile.open(out / "details.tar.gz") as archive:
        names = set(archive.getnames())
        versions = json.load(archive.extractfile("details/env/versions.json"))
    assert {"details/env/pip-freeze.txt", "details/env/machine.txt", "details/summary.txt"} <= names
    assert not any(name.endswith(("install.log", "tests.log")) for name in names), "a step ran without a GPU"
    assert versions["torch"] == torch.__version__ and versions["cuda_available"] is False
    assert not (out / "details").exists(), "details/ should be packed into details.tar.gz"


def test_dry_run_plans_every_step_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = gpu_check("--dry-run", "--budget-minutes", "9", out)
    assert result.returncode == 0, result.stdout + result.stderr
    plan = result.stdout
    assert "-m pip install --no-index --no-build-isolation --no-deps -v -e ." in plan
    assert "-m pytest -q tests/test_cuda.py tests/test_runtime_cuda.py" in plan
    assert "scripts/benchmark.py suite --device cuda --arch deit_small_patch16_224" in plan
    assert "step goals-runtime" in plan and "--dtype bf16 --batch 1 8 64 256 --variants plain imagepiece --paths eager ip_runtime ip_runtime_graphs" in plan
    assert "step goals-compile" in plan and "--dtype bf16 --batch 1 256 --variants plain --paths eager compile" in plan
    for dtype in ("bf16", "fp16"):
        assert f"step bench-{dtype}-runtime" in plan and f"--dtype {dtype} --batch 1 8 64 256 --variants plain tome evit imagepiece imagepiece_hyper" in plan
        assert f"step bench-{dtype}-compile" in plan and f"--dtype {dtype} --batch 1 8 64 256 --variants plain --paths eager compile" in plan
    assert "step profile" in plan and "scripts/benchmark.py profile --device cuda --arch deit_small_patch16_224 --preset imagepiece --dtype bf16 --batch 256" in plan
    order = ["step install", "step tests", "step goals-runtime", "step goals-compile", "step profile", "step bench-bf16-runtime",
             "step bench-fp16-runtime"]
    assert [plan.index(step) for step in order] == sorted(plan.index(step) for step in order)
    assert "budget: 9 min" in plan
    assert not out.exists()


def test_every_benchmark_step_is_a_command_the_benchmark_cli_accepts(tmp_path, monkeypatch):
    from imagepiece.bench import cli
    from imagepiece.bench.paths import PATHS
    from imagepiece.bench.variants import VARIANTS

    result = gpu_check("--dry-run", "--steps", "goals,profile,bench", tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [line.split("): ", 1)[1].split() for line in result.stdout.splitlines() if line.startswith(("step bench-", "step goals-", "step profile"))]
    assert len(commands) == 7, result.stdout
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the plan is for a GPU machine; only parsed here
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100's, for the bf16 check
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")  # names the results folder
    for words in commands:
        argv = words[words.index("scripts/benchmark.py") + 1:]
        assert argv[0] in cli.MODES, words
        argv[argv.index("--out") + 1] = str(tmp_path / "results")
        if argv[0] == "profile":
            args = cli.parse_args(argv)
            assert (args.device, args.dtype, args.batch) == ("cuda", "bf16", 256)
            continue
        listed = {option: words[words.index(option) + 1:] for option in ("--variants", "--paths")}
        for option, registry in (("--variants", VARIANTS), ("--paths", PATHS)):
            names = list(itertools.takewhile(lambda word: not word.startswith("--"), listed[option]))
            assert names and set(names) <= set(registry), (option, names)
        args = cli.parse_args(argv)  # the CLI's own checks: dtypes per path, devices, batch sizes
        assert args.mode == "suite" and args.device == "cuda"


def test_a_missing_package_stops_it_with_one_line_naming_it(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('hidden by the test')\n")
    result = gpu_check("--dry-run", "--steps", "tests", tmp_path / "out", env={"PYTHONPATH": str(blocker)})
    assert result.returncode == 2
    missing = [line for line in result.stdout.splitlines() if line.startswith("missing:")]
    assert missing == ["missing: python package matplotlib: ImportError: hidden by the test"]


def test_bad_arguments_are_refused(tmp_path):
    cases = [
        (["--steps", "tests,bogus", tmp_path], "unknown step 'bogus'"),
        (["--budget-minutes", "soon", tmp_path], "--budget-minutes must be a whole number"),
        (["--frobnicate", tmp_path], "unknown option --frobnicate"),
        ([tmp_path / "a", tmp_path / "b"], "one output folder"),
        ([], "no output folder"),
        (["--dev-headers", tmp_path / "absent.tgz", tmp_path], "--dev-headers: no such file"),
        # an empty or wrong file was only found out in a real run, after minutes of GPU time
        (["--dev-headers", tmp_path / "empty.tgz", tmp_path], "is not an archive of the headers (make it with --pack-dev-headers)"),
        (["--budget-minutes", "0", tmp_path], "--budget-minutes must be a whole number of minutes > 0, got '0'"),
    ]
    (tmp_path / "empty.tgz").write_bytes(b"")
    for args, message in cases:
        result = gpu_check(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_it_packs_the_development_headers_the_gpu_machine_lacks(tmp_path):
    result = gpu_check("--pack-dev-headers", tmp_path / "headers.tgz")
    assert result.returncode == 0, result.stdout + result.stderr
    with tarfile.open(tmp_path / "headers.tgz") as archive:
        names = set(archive.getnames())
    assert {"usr/include/nlohmann/json.hpp", "usr/include/openssl/evp.h", "usr/share/cmake/nlohmann_json/nlohmann_jsonConfig.cmake"} <= names
    # accepted as --dev-headers; a budget with a leading zero is minutes in base 10 (bash read 08 as bad octal)
    result = gpu_check("--dry-run", "--steps", "tests", "--budget-minutes", "08", "--dev-headers", tmp_path / "headers.tgz", tmp_path / "out")
    assert "--dev-headers" not in result.stderr and "value too great for base" not in result.stderr, result.stderr
    assert "budget: 8 min" in result.stdout, result.stdout


CRASHING_TESTS = """
import os


def test_fails_first():
    assert 1 + 1 == 3, "the message a later crash must not swallow"


def test_then_crashes():
    os.abort()  # as a SIGSEGV in native code would: pytest never reaches its summary
"""


@pytest.mark.parametrize("at_once", [True, False])
def test_failures_are_printed_before_a_later_crash_when_asked(tmp_path, at_once):
    (tmp_path / "test_crash.py").write_text(CRASHING_TESTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "IMAGEPIECE_TEST_FAILURES_AT_ONCE": "1" if at_once else "0"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "failures_at_once", "-p", "no:cacheprovider", "test_crash.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    printed = "the message a later crash must not swallow" in result.stdout + result.stderr
    assert printed == at_once, result.stdout + result.stderr
