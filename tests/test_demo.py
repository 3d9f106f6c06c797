"""scripts/demo.py, the README's main job: it compiles once and reuses that artifact while it is what it would
compile, says why when it compiles again, refuses an --out or --device it cannot use before any work, and fails
when its C++ example does."""
from __future__ import annotations

import re
import subprocess

import pytest
import torch

import imagepiece.export
from script_runs import call_script, load_script, run_script

TINY = ("--arch", "deit_tiny_patch16_224", "--batch", "2", "--repeats", "1", "--skip-cpp")


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Two runs of the demo on one --out (DeiT-Ti: the size does not matter here) and the artifact."""
    out = tmp_path_factory.mktemp("demo") / "ti_ip.so"
    return [run_script("demo", *TINY, "--out", out) for _ in range(2)], out


def test_the_demo_compiles_once_then_reuses_its_artifact(demo_runs):
    (first, second), out = demo_runs
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    compiled = re.compile(r"export [\d.]+ s, compile [\d.]+ s")
    assert f"compiling (there is none at {out} yet)" in first.stdout and compiled.search(first.stdout)
    assert f"reusing {out}" in second.stdout and not compiled.search(second.stdout), second.stdout
    # The reused artifact classifies as the one just compiled did (same random images, same weights).
    assert second.stdout.split("== 3.")[1].split("== 4.")[0] == first.stdout.split("== 3.")[1].split("== 4.")[0]


def test_the_demo_compiles_again_when_batch_or_model_code_differ(demo_runs, monkeypatch):
    _, out = demo_runs
    demo = load_script("demo")
    torch.manual_seed(0)
    model = imagepiece.create_model("deit_tiny_patch16_224", "imagepiece")
    cpu = torch.device("cpu")
    assert demo.why_recompile(out, model, cpu, 2) is None
    assert demo.why_recompile(out, model, cpu, 4).endswith("differs from what would be compiled now in batch")
    assert "token_schedule" in demo.why_recompile(out, imagepiece.create_model("deit_tiny_patch16_224", "imagepiece", keep_rate=0.7), cpu, 2)
    monkeypatch.setattr(imagepiece.export, "source_sha256", lambda: "0" * 64)  # an edit to the model's code
    assert demo.why_recompile(out, model, cpu, 2).endswith("in source_sha256")


def test_the_demo_compiles_over_what_is_not_an_artifact(tmp_path):
    demo = load_script("demo")
    text = tmp_path / "notes.so"
    text.write_text("not an artifact")
    assert "is not a shared library" in demo.why_recompile(text, imagepiece.create_model("deit_tiny_patch16_224", "imagepiece"), torch.device("cpu"), 2)


@pytest.mark.parametrize("args, message", [
    (("--out", "{tmp}/ti.bin"), "must end in .so (one shared library) or .pt2"),
    (("--out", "{tmp}"), "must end in .so"),
    (("--out", "{tmp}/folder.so"), "is a directory"),
    (("--out", "/proc/no-such/ti.so"), "cannot make the folder '/proc/no-such' for --out"),
    (("--device", "cpu:0"), "device must be cpu or cuda[:N], got 'cpu:0'"),
])
def test_the_demo_refuses_what_it_cannot_compile_to_before_any_work(tmp_path, capsys, args, message):
    (tmp_path / "folder.so").mkdir()
    result = call_script("demo", capsys, *TINY, *(arg.format(tmp=tmp_path) for arg in args))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""  # refused before it printed the machine or built a model
    assert not (tmp_path / "ti.bin").exists()


def test_the_demo_fails_when_its_cpp_example_does(monkeypatch, tmp_path, capsys):
    demo = load_script("demo")

    def builds_but_fails_to_classify(command, **kwargs):
        classify = command[0].endswith("classify")
        return subprocess.CompletedProcess(command, 1 if classify else 0, "", "classify: not_an_artifact ..." if classify else "")

    monkeypatch.setattr(demo.subprocess, "run", builds_but_fails_to_classify)
    assert demo.run_cpp_example(tmp_path / "ti.so") == 1
    assert "the C++ example failed (exit 1)" in capsys.readouterr().out


@pytest.mark.parametrize("failure, status, message", [
    ("disk", 1, "demo.py: error: could not read or write a file: No space left on device"),
    ("interrupt", 130, "demo.py: interrupted"),
])
def test_a_compile_stopped_by_a_full_disk_or_ctrl_c_ends_the_demo_in_one_line(monkeypatch, tmp_path, capsys, failure, status, message):
    from torch._inductor.exc import CppCompileError, InductorError

    demo = load_script("demo")

    def compile_fails(*args, **kwargs):
        if failure == "interrupt":
            raise KeyboardInterrupt
        raise InductorError(CppCompileError(["g++"], "Fatal error: can't write 4096 bytes: 'No space left on device'"), None)

    monkeypatch.setattr(demo, "compile_artifact", compile_fails)
    result = call_script("demo", capsys, *TINY, "--out", tmp_path / "ti.so")
    assert (result.returncode, result.stderr) == (status, message + "\n")
    assert "compiling (there is none at" in result.stdout and list(tmp_path.iterdir()) == []
