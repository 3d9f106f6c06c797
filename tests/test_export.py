"""scripts/aot_compile.py and imagepiece.export: metadata, atomic output, and every bad input."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import imagepiece
from imagepiece import export
from imagepiece.artifact import DIGEST_KEY, FORMAT_VERSION, INPUT_FORMATS, ArtifactError, read_metadata
from imagepiece.config import LCB_CHOICES, REEVALUATIONS, lcb_from_cli
from imagepiece.cpu_target import compile_target
from script_runs import call_script, load_script, run_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "aot_compile.py"


def test_metadata_describes_the_artifact(compiled):
    metadata = read_metadata(compiled.path("s_imagepiece"))
    assert metadata["format_version"] == FORMAT_VERSION == 2
    assert len(metadata[DIGEST_KEY]) == 64 and metadata[DIGEST_KEY] != "0" * 64
    assert (metadata["arch"], metadata["method"], metadata["model_name"]) == ("deit_small_patch16_224", "imagepiece", "deit_small_patch16_224.imagepiece")
    assert [row["tokens_in"] for row in metadata["token_schedule"]] == [197, 182, 168, 155, 116, 107, 99, 75, 70, 65, 50, 47]
    assert metadata["config"]["p"] == 0.3 and metadata["config"]["keep_rate"] == 0.8
    assert metadata["input_shape"] == [3, 224, 224] and metadata["num_classes"] == 1000
    assert metadata["dtype"] == "fp32" and metadata["batch"] == {"min": 2, "max": 2, "dynamic": False}
    assert metadata["preprocessing"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                         "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center"}
    assert metadata["device_type"] == "cpu" and metadata["cuda_capability"] is None
    assert (metadata["input_format"], metadata["precision"]) == ("float_nchw", "fp32")
    target = compile_target()  # what this machine compiles for (tests/test_cpu_target.py)
    assert (metadata["cpu_capability"], metadata["cpu_features"]) == (target.capability, list(target.features))
    assert metadata["torch_version"] == torch.__version__
    checkpoint = compiled.checkpoint("deit_small_patch16_224")
    assert metadata["checkpoint"]["sha256"] == imagepiece.weights.file_sha256(checkpoint)
    assert read_metadata(compiled.path("ti_tome_pt2"))["method"] == "tome"  # .pt2 carries it too


def test_random_weights_are_recorded_and_announced(compiled, tmp_path):
    # Reuses the session's compiled DeiT-Ti cache, so this compile is mostly cache hits.
    result = run_script("aot_compile", "--arch", "deit_tiny_patch16_224", "--method", "evit", "--batch", "2", "--out", tmp_path / "random.so")
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stdout and "compile time" in result.stdout and "export time" in result.stdout
    assert read_metadata(tmp_path / "random.so")["checkpoint"]["sha256"] == "random"
    assert [p.name for p in tmp_path.iterdir()] == ["random.so"]  # no generated sources left beside it


def test_command_line_choices_become_the_config_and_input_format():
    """Every --lcb and --reevaluation choice reaches the model's config (the vocabularies of
    imagepiece.config, so a new choice needs no edit here); --input-format names the metadata's format."""
    cli = load_script("aot_compile")
    for choice in LCB_CHOICES:
        args = cli.parse_args(["--lcb", choice, "--out", "x.so"])
        assert cli.config_overrides(args)["lcb"] == lcb_from_cli(choice)
    for choice in REEVALUATIONS:
        model = imagepiece.create_model("deit_tiny_patch16_224", "imagepiece",
                                        **cli.config_overrides(cli.parse_args(["--reevaluation", choice, "--out", "x.so"])))
        assert model.reduction_config.reevaluation == choice
    assert cli.config_overrides(cli.parse_args(["--out", "x.so"])) == {}  # defaults: the method's published setting
    assert cli.parse_args(["--out", "x.so"]).input_format == "float"
    assert {cli.CLI_INPUT_FORMATS[choice] for choice in ("float", "uint8")} == set(INPUT_FORMATS)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--arch", "deit_huge_patch16_224"), "invalid choice"),
        (("--method", "dynamicvit"), "invalid choice"),
        (("--lcb", "conv"), "invalid choice"),
        (("--reevaluation", "max"), "invalid choice"),
        (("--input-format", "rgb"), "invalid choice"),
        (("--attention", "flash"), "invalid choice"),
        (("--p", "1.5"), "p must be in"),
        (("--merge-ratio", "0.3"), "merge_ratio"),
        (("--prune-blocks", "3", "20"), "prune_blocks"),
        (("--checkpoint", "/nonexistent/deit.pth"), "does not exist"),
        (("--dtype", "fp16", "--device", "cpu"), "fp16 is not supported on cpu"),
        (("--device", "tpu"), "device must be"),
        (("--batch", "0"), "--batch: must be an integer >= 1, got 0"),
        (("--batch", "-1"), "--batch: must be an integer >= 1, got -1"),
        (("--batch", "two"), "--batch: must be an integer, got 'two'"),
        (("--max-batch", "1"), "--max-batch: must be an integer >= 2, got 1"),
        (("--batch", "2000000"), "--batch: must be an integer <= 1,048,576, got 2,000,000"),  # the metadata's limit
        (("--max-batch", "99999999999999999999"), "--max-batch: must be an integer <= 1,048,576"),
        # Within the limit, but its example images alone (588 GiB) exceed the machine: refused before any allocation.
        (("--batch", "1048576"), "a static batch of 1,048,576 is traced with 588.0 GiB of example images"),
        (("--device", "cuda:x"), "device must be cpu or cuda[:N], got 'cuda:x'"),
        (("--dtype", "int8", "--device", "cuda"), "int8 is a CPU artifact"),  # before "no GPU here": that would not help
        (("--model", "deit_small_patch16_224.tome"), "names its arch; drop --arch deit_tiny_patch16_224"),
        (("--num-classes", "0"), "--num-classes: must be an integer >= 1, got 0"),
        (("--num-classes", "-5"), "--num-classes: must be an integer >= 1, got -5"),
        (("--num-classes", "99999999"), "--num-classes: must be an integer <= 16,777,216"),  # the metadata's limit
        (("--method", "tome", "--p", "0.5"), "--p has no effect with method 'tome' (it applies to imagepiece)"),
        (("--method", "plain", "--prune-blocks", "1", "2"), "--prune-blocks has no effect with method 'plain'"),
        (("--method", "evit", "--tome-r", "5"), "--tome-r has no effect with method 'evit' (it applies to tome)"),
        (("--calibration-images", "4"), "--calibration and --calibration-images apply only to --dtype int8"),
        (("--method", "tome", "--tome-r", "-1"), "tome_r must be an int"),
        (("--out-suffix", ".onnx"), "must end in .so"),
        (("--out-dir", "/nonexistent-dir"), "does not exist"),
        (("--out-dir", __file__), "is a file, not a folder"),
    ],
)
def test_bad_requests_fail_in_one_line_with_status_2_and_leave_nothing(tmp_path, capsys, args, message):
    folder, suffix = tmp_path, ".so"
    if args[0] == "--out-suffix":
        suffix, args = args[1], ()
    elif args[0] == "--out-dir":
        folder, args = Path(args[1]), ()
    out = folder / f"model{suffix}"
    result = call_script("aot_compile", capsys, "--arch", "deit_tiny_patch16_224", *args, "--out", out)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_out_that_is_the_checkpoint_is_refused_before_compiling(tmp_path, capsys):
    checkpoint = tmp_path / "weights.pt2"  # a checkpoint under an artifact's name: compiling replaced it
    torch.save(imagepiece.create_model("deit_tiny_patch16_224", "plain").state_dict(), checkpoint)
    before = checkpoint.read_bytes()
    result = call_script("aot_compile", capsys, "--arch", "deit_tiny_patch16_224", "--method", "plain", "--checkpoint", checkpoint,
                         "--out", checkpoint)
    assert result.returncode == 2 and "is the --checkpoint file: writing it would replace that input" in result.stderr
    assert checkpoint.read_bytes() == before


def test_a_fine_tune_record_with_no_classes_is_refused_before_compiling(tmp_path, capsys):
    model = imagepiece.create_model("deit_tiny_patch16_224", "plain")
    torch.save({"model": model.state_dict(), "arch": "deit_tiny_patch16_224", "lcb": None, "num_classes": 0}, tmp_path / "zero.pth")
    result = call_script("aot_compile", capsys, "--method", "plain", "--checkpoint", tmp_path / "zero.pth", "--out", tmp_path / "z.so")
    assert result.returncode == 2 and "records num_classes 0: a classifier has 1..16,777,216 classes" in result.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["zero.pth"]


@pytest.mark.parametrize("missing", ["compiler", "objcopy"])
def test_a_missing_build_tool_fails_in_one_line_with_status_1_before_compiling(tmp_path, missing):
    tools = tmp_path / "bin"  # a PATH with the compiler and without objcopy
    tools.mkdir()
    (tools / "g++").symlink_to(shutil.which("g++"))
    env = dict(os.environ, CXX="/nonexistent/g++") if missing == "compiler" else dict(os.environ, PATH=str(tools))
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "deit_tiny_patch16_224", "--out", str(tmp_path / "m.so")],
                            capture_output=True, text=True, env=env, timeout=300)
    expected = "needs a C++ compiler" if missing == "compiler" else "objcopy (binutils) is needed"
    assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["bin"]


def test_a_model_name_and_a_different_method_are_refused():
    from imagepiece.model import parse_model_name

    with pytest.raises(ValueError, match="says method 'tome' but method='evit'"):
        parse_model_name("tome_deit_tiny_patch16_224", "evit")  # the prefix once lost silently
    assert parse_model_name("tome_deit_tiny_patch16_224", "tome") == ("deit_tiny_patch16_224", "tome")


def test_int8_compiles_for_the_cpu_by_default_even_where_there_is_a_gpu(monkeypatch):
    cli = load_script("aot_compile")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.parse_args(["--dtype", "int8", "--out", "q.so"]).device == "cpu"
    assert cli.parse_args(["--out", "f.so"]).device == "cuda"


def test_a_model_too_large_for_memory_fails_in_one_line(tmp_path, capsys, monkeypatch):
    """--num-classes 16777216 (the metadata's limit) makes a DeiT-S head of 24 GiB: the allocator's refusal is one line,
    which names --num-classes only where the head is what could not be allocated."""
    def allocator_refuses(size: int):
        def build(*args, **kwargs):
            if size > 1 << 40:
                return torch.empty(size, dtype=torch.uint8)  # a real refusal (no machine here has 1 PiB)
            # What the allocator says for the head's weights (a large machine might grant 24 GiB for real).
            raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                               f"you tried to allocate {size} bytes. Error code 12 (Cannot allocate memory)")
        return build

    cli = load_script("aot_compile")
    out = tmp_path / "huge.so"
    for size, classes, named in ((16777216 * 384 * 4, "16777216", " (--num-classes 16,777,216 asks for a head of that many rows)"),
                                 (1 << 50, "10", "")):
        monkeypatch.setattr(cli, "create_model", allocator_refuses(size))
        capsys.readouterr()
        assert cli.main(["--arch", "deit_small_patch16_224", "--num-classes", classes, "--out", str(out)]) == 1
        assert capsys.readouterr().err.strip() == (f"aot_compile.py: error: out of memory building the model: could not allocate "
                                                   f"{size / 2**30:.1f} GiB{named}; {out} was not written")


def test_an_unwritable_target_fails_in_one_line_with_status_1():
    result = run_script("aot_compile", "--arch", "deit_tiny_patch16_224", "--out", "/sys/kernel/model.so")
    assert result.returncode == 1
    assert "not writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("failure, status, message", [
    ("oserror", 1, "could not write {out}: No space left on device"),
    ("compiler", 1, "could not write {out}: No space left on device"),
    ("killed", 1, "the C++ compiler was killed (the kernel does so when memory runs out); {out} was not written"),
    ("interrupt", 130, "interrupted; {out} was not written"),
    ("sigterm", 143, "terminated; {out} was not written"),  # Python's default would end at once, the staging folder left
])
def test_a_full_disk_or_ctrl_c_fails_in_one_line_and_leaves_nothing(tmp_path, failure, status, message):
    """The disk fills while AOTInductor writes: as an OSError, or (what a real full disk gives, checked on
    a tiny tmpfs) as the C++ compiler's error text wrapped in Inductor's own exception; the kernel kills the
    compiler for memory; or Ctrl-C comes."""
    out = tmp_path / "model.so"
    script = f"""
        import errno, os, runpy, sys
        import torch

        def fill_the_disk(module, args, options):
            with open(options["aot_inductor.output_path"], "wb") as half:
                half.write(b"half a library")
            if {failure!r} == "interrupt":
                raise KeyboardInterrupt
            if {failure!r} == "sigterm":
                import signal, time
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here, in the main thread
            if {failure!r} == "oserror":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), options["aot_inductor.output_path"])
            from torch._inductor.exc import CppCompileError, InductorError
            if {failure!r} == "killed":  # g++'s words when the out-of-memory killer stops its cc1plus
                raise InductorError(CppCompileError(["g++"], "g++: fatal error: Killed signal terminated program cc1plus"), None)
            raise InductorError(CppCompileError(["g++"], "Fatal error: can't fill 256 bytes in section .lrodata: 'No space left on device'"), None)

        torch._inductor.aot_compile = fill_the_disk
        sys.argv = ["aot_compile.py", "--arch", "deit_tiny_patch16_224", "--method", "plain", "--out", {str(out)!r}]
        runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert result.returncode == status, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("aot_compile.py")]
    assert lines == ["aot_compile.py: error: " + message.format(out=out)], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_mismatched_checkpoint_is_refused(tmp_path, capsys):
    torch.save(imagepiece.create_model("deit_small_patch16_224", "plain").state_dict(), tmp_path / "small.pth")
    result = call_script("aot_compile", capsys, "--arch", "deit_tiny_patch16_224", "--checkpoint", tmp_path / "small.pth", "--out", tmp_path / "x.so")
    assert result.returncode == 2 and "shape mismatch" in result.stderr and not (tmp_path / "x.so").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU message")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    result = call_script("aot_compile", capsys, "--arch", "deit_tiny_patch16_224", "--device", "cuda", "--out", tmp_path / "x.so")
    assert result.returncode == 2 and "no CUDA GPU is available" in result.stderr


def test_kernels_are_asked_to_follow_the_running_thread_count_where_inductor_would_bake_it(monkeypatch):
    from torch.torch_version import TorchVersion

    monkeypatch.setattr(torch, "get_num_threads", lambda: os.cpu_count())
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.14.1"))
    assert export._thread_options() == {}  # Inductor 2.14 emits thread-count-free kernels itself here
    monkeypatch.setattr(torch, "get_num_threads", lambda: os.cpu_count() + 1)
    assert export._thread_options() == {"cpp.dynamic_threads": True}  # it would bake the compiling process's count
    monkeypatch.setattr(torch, "get_num_threads", lambda: os.cpu_count())
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.11.0"))
    assert export._thread_options() == {"cpp.dynamic_threads": True}  # 2.11 always bakes it


def test_failed_compile_keeps_the_previous_artifact_and_leaves_no_debris(tmp_path, monkeypatch):
    out = tmp_path / "model.so"
    out.write_bytes(b"the good artifact from yesterday")

    def crash_midway(module, args, options):
        Path(options["aot_inductor.output_path"]).write_bytes(b"half a library")
        raise RuntimeError("compiler killed")

    monkeypatch.setattr(torch._inductor, "aot_compile", crash_midway)
    model = imagepiece.create_model("deit_tiny_patch16_224", "plain")
    with pytest.raises(RuntimeError, match="compiler killed"):
        export.compile_artifact(model, out, batch=1)
    assert out.read_bytes() == b"the good artifact from yesterday"
    assert [p.name for p in tmp_path.iterdir()] == ["model.so"]


@pytest.fixture
def not_artifacts(tmp_path, compiled):
    good = compiled.path("ti_imagepiece")
    text = tmp_path / "notes.so"
    text.write_text("not a library")
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.so"  # a real shared library that is not ours
    shutil.copy(torch._C.__file__, foreign)
    edited = tmp_path / "edited.pt2"  # a zip that is not an AOTI package
    shutil.make_archive(str(tmp_path / "edited"), "zip", root_dir=ROOT / "scripts")
    (tmp_path / "edited.zip").rename(edited)
    return {
        "missing": (tmp_path / "missing.so", "file_not_found", "does not exist"),
        "directory": (tmp_path, "file_not_found", "not a file"),
        "text": (text, "not_an_artifact", "not a shared library"),
        "truncated": (truncated, "not_an_artifact", "truncated"),
        "foreign": (foreign, "not_an_artifact", "no ImagePiece metadata"),
        "wrong_suffix": (ROOT / "README.md", "not_an_artifact", ".so or .pt2"),
        "zip_not_package": (edited, "not_an_artifact", "not a .pt2 package made by scripts/aot_compile.py"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "text", "truncated", "foreign", "wrong_suffix", "zip_not_package"])
def test_paths_that_are_not_artifacts(not_artifacts, case):
    path, code, message = not_artifacts[case]
    for reader in (read_metadata, export.load):
        with pytest.raises(ArtifactError, match=message) as error:
            reader(path)
        assert error.value.code == code


def test_metadata_mismatch_is_refused_at_load(compiled, tmp_path, monkeypatch):
    path = compiled.path("ti_imagepiece")
    monkeypatch.setattr(torch, "__version__", "2.0.0")
    with pytest.raises(ArtifactError, match=r"compiled with torch .* but this is torch 2.0.0") as error:
        export.load(path)
    assert error.value.code == "incompatible"
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match="compiled for cpu and cannot run on cuda"):
        export.load(path, device="cuda")


@pytest.mark.parametrize(
    "make, code, message",
    [
        (lambda: torch.randn(2, 3, 224), "invalid_shape", "4-D"),
        (lambda: torch.randn(2, 3, 160, 160), "invalid_shape", r"\[B, 3, 224, 224\]"),
        (lambda: torch.randn(2, 224, 224, 3), "invalid_shape", r"\[B, 3, 224, 224\]"),
        (lambda: torch.randn(3, 3, 224, 224), "invalid_batch", "exactly 2"),
        (lambda: torch.randn(2, 3, 224, 224, dtype=torch.float64), "invalid_dtype", "float32"),
        (lambda: torch.randn(2, 224, 224, 3).permute(0, 3, 1, 2), "not_contiguous", "contiguous"),
        (lambda: torch.randn(2, 3, 224, 224).numpy(), "invalid_type", "torch.Tensor"),
    ],
)
def test_python_loader_validates_inputs(compiled, make, code, message):
    model = export.load(compiled.path("ti_imagepiece"))
    with pytest.raises(ArtifactError, match=message) as error:
        model(make())
    assert error.value.code == code


def test_dynamic_loader_rejects_batches_out_of_range(compiled):
    model = export.load(compiled.path("ti_imagepiece_dynamic"))
    for batch in (0, 65):
        with pytest.raises(ArtifactError, match=r"outside the artifact's batch range \(1..64\)"):
            model(torch.randn(batch, 3, 224, 224))


@pytest.mark.parametrize("name", ["my models", "it's", 'say "hi"'])
def test_compiles_reach_folders_whose_paths_a_command_line_would_split_through_a_link(tmp_path, name):
    import shlex

    folder = tmp_path / name
    folder.mkdir()
    with export.command_line_safe(folder) as build_dir:
        assert shlex.split(str(build_dir)) == [str(build_dir)]  # what Inductor's g++ line turns back into one path
        (build_dir / "model.so").write_bytes(b"built")
    assert (folder / "model.so").read_bytes() == b"built" and not build_dir.exists()  # built in place; the link is gone
    with export.command_line_safe(tmp_path) as build_dir:
        assert build_dir == tmp_path  # a safe path is used as it is


def test_the_attention_kernel_follows_device_and_dtype_and_is_what_the_graph_holds(tmp_path):
    from imagepiece.blocks import attention_kernel
    from imagepiece.input_format import PixelInput, random_pixels

    targets = [("cpu", "bf16"), ("cpu", "fp32"), ("cpu", "int8"), ("cuda", "bf16"), ("cuda", "fp16")]
    assert [export.default_attention(*target) for target in targets] == ["matmul", "sdpa", "sdpa", "sdpa", "sdpa"]
    torch.manual_seed(0)
    model = imagepiece.create_model("deit_tiny_patch16_224", "imagepiece").eval()
    with pytest.raises(ValueError, match=r"attention must be one of \['sdpa', 'matmul'\], got 'flash'"):
        export.compile_artifact(model, tmp_path / "model.so", dtype="bf16", batch=1, attention="flash")
    assert next(model.parameters()).dtype == torch.float32, "refused before the caller's model was cast"
    # Behind the uint8 wrapper too (an export traces the wrapped model's attention), and the model keeps its own after.
    wrapped = PixelInput(model, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    for kernel in ("matmul", "sdpa"):
        with attention_kernel(model, kernel), torch.no_grad():
            graph = torch.export.export(wrapped, (random_pixels(1, 224, 224, 3),)).graph
        fused = any("scaled_dot_product" in str(node.target) for node in graph.nodes)
        assert fused == (kernel == "sdpa"), kernel
    assert {block.attn.attention_kernel for block in model.blocks} == {"sdpa"}
