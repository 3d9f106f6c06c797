"""torch.export + AOTInductor: an ImagePiece model -> one artifact (`.so` or `.pt2`) with metadata.

`compile_artifact` is what `scripts/aot_compile.py` runs; `load` runs an artifact from Python with the
same device resolution and input checks as the C++ runtime, so parity can be tested without it; one
difference: host images for a CUDA artifact are refused here, where the C++ runtime stages them through
pinned memory. Metadata handling lives in
`imagepiece.artifact` (re-exported here: `read_metadata`, `ArtifactError`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import hashlib
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from . import __version__
from .artifact import (
    FORMAT_VERSION,
    INPUT_FORMATS,
    PRECISIONS,
    SUFFIXES,
    ArtifactError,
    VerifiedArtifact,
    check_compatible,
    check_images,
    current_cuda_capability,
    input_dtype_name,
    model_dtype,
    open_artifact,
    read_metadata,
    write_metadata,
)
from .artifact_containers import needed_libraries
from .artifact_metadata import MAX_BATCH, resolved_device
from .blocks import ATTENTION_KERNELS, attention_kernel
from .command_line import allocation_failure
from .cpu_target import CpuTarget, compile_target, pinned_march
from .data import preprocessing_config
from .environment import bf16_support, logger_quieted
from .files import check_writable_dir, fsync_file
from .input_format import PixelInput, random_pixels
from .model import ImagePieceViT
from .private_copy import lease

__all__ = ["ArtifactError", "CompiledModel", "CompileReport", "compile_artifact", "load", "read_metadata"]

# A dynamic batch dim is traced with this example size: 1 would make torch.export specialise it.
DYNAMIC_EXAMPLE_BATCH = 2
# PRECISIONS: what an artifact computes in (`--dtype`), the metadata's "precision". Its images' dtype is
# the metadata's "dtype": the same, except int8 (quantized Linear layers, imagepiece.quantize), which
# takes fp32 images, and any artifact taking uint8 pixels (`input_format`).


@dataclass
class CompileReport:
    path: Path
    export_seconds: float
    compile_seconds: float
    size_bytes: int
    metadata: dict


def check_device_and_dtype(device: str, dtype: str) -> torch.device:
    """The torch.device to compile for; ValueError for combinations that cannot work here."""
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype must be one of {sorted(PRECISIONS)}, got {dtype!r}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):  # torch.device("cuda:x") raises a RuntimeError of its own
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    target = torch.device(device)
    # What can never work comes first: a user told "no GPU here" should not move to one to learn that int8 is CPU-only.
    if dtype == "int8" and target.type != "cpu":
        raise ValueError("int8 is a CPU artifact (x86 oneDNN kernels); use --device cpu, or fp16/bf16 on a GPU")
    if dtype == "fp16" and target.type == "cpu":
        raise ValueError("fp16 is not supported on cpu (Inductor's CPU fp16 kernels are slow or missing); use fp32 or bf16")
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is available here (torch.cuda.is_available() is False)")
        if (target.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1}")
        if dtype == "bf16" and torch.cuda.get_device_capability(target.index or 0) < (8, 0):
            raise ValueError(f"bf16 needs a GPU of compute capability >= 8.0; this one is {current_cuda_capability(target.index or 0)}")
    elif dtype == "bf16" and not bf16_support().native:
        warnings.warn(f"bf16 on this CPU will be slow: {bf16_support().reason}", stacklevel=2)
    if dtype == "int8":
        from .quantize import require_torchao

        require_torchao()
    return target


def check_build_tools(out: Union[str, Path]) -> None:
    """OSError (the system's failure, not the request's) naming what this machine lacks to compile `out` (a C++
    compiler; objcopy for a .so), before any work: Inductor finds out only when it first compiles, and objcopy is
    needed after the whole compile."""
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        cpp_builder.get_cpp_compiler()
    except InvalidCxxCompiler:
        raise OSError("AOTInductor needs a C++ compiler and none was found: install g++ (Debian/Ubuntu: "
                      "apt-get install g++), or set CXX to one") from None
    if Path(out).suffix == ".so" and shutil.which("objcopy") is None:
        raise OSError("objcopy (binutils) is needed to put the metadata into a .so: install binutils, or write a .pt2")


def check_output_path(out: Union[str, Path]) -> Path:
    """`out` as a Path; ValueError for a request that cannot work (suffix, missing folder, a directory),
    OSError when the folder cannot be written (read-only, no permission, full)."""
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ValueError(f"output {str(out)!r} must end in .so (one shared library) or .pt2 (AOTI package)")
    if out.is_dir():
        raise ValueError(f"output {str(out)!r} is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"output directory {str(parent)!r} is a file, not a folder")
    if not parent.is_dir():
        raise ValueError(f"output directory {str(parent)!r} does not exist")
    try:
        check_writable_dir(parent)
    except ValueError as error:  # the folder exists: a failure to write there is the system's, not the request's
        raise OSError(str(error)) from None
    return out


def batch_range(batch: Optional[int], max_batch: Optional[int]) -> tuple[int, int]:
    """(min, max) batch the artifact accepts: a static N, or a dynamic 1..max_batch."""
    if (batch is None) == (max_batch is None):
        raise ValueError("give exactly one of batch (static) or max_batch (dynamic 1..max_batch)")
    if batch is not None:
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be in 1..{MAX_BATCH:,}, got {batch:,}")
        return batch, batch
    if not DYNAMIC_EXAMPLE_BATCH <= max_batch <= MAX_BATCH:
        raise ValueError(f"max_batch must be in {DYNAMIC_EXAMPLE_BATCH}..{MAX_BATCH:,} (use batch=1 for a static batch of one), got {max_batch:,}")
    return 1, max_batch


def default_attention(device_type: str, dtype: str) -> str:
    """The attention kernel an artifact gets unless told otherwise (`blocks.ATTENTION_KERNELS`): two GEMMs and a
    softmax for bf16 on the CPU, where PyTorch's flash-attention kernel is the slow part (`blocks.matmul_attention`);
    SDPA everywhere else (fp32 on the CPU: SDPA was 1.03x faster, `bench tuning --tunings default matmul-attention`;
    on a GPU flash attention is the fast kernel). Measured on one AMD EPYC (avx512_bf16, no AMX); on CPUs with AMX,
    whose bf16 tiles PyTorch's flash attention may use, `bench tuning --dtype bf16` should decide it again."""
    return "matmul" if device_type == "cpu" and dtype == "bf16" else "sdpa"


def build_metadata(model: ImagePieceViT, device: torch.device, dtype: str, batch: tuple[int, int],
                   checkpoint: Optional[Path], suffix: str, input_format: str = "float_nchw",
                   cpu: Optional[CpuTarget] = None, attention: Optional[str] = None) -> dict:
    """Everything the runtime checks and a user may want to inspect, as plain JSON values.
    `cpu`: what a CPU artifact's kernels are compiled for (default: what a compile in this process targets,
    `imagepiece.cpu_target.compile_target`); `attention`: the attention kernel compiled in (`blocks.ATTENTION_KERNELS`;
    default: `default_attention`'s). With both left out, what compiling `model` now would record (the demo's reuse check)."""
    if cpu is None and device.type == "cpu":
        cpu = compile_target()
    attention = attention or default_attention(device.type, dtype)
    return {
        "format_version": FORMAT_VERSION,
        "imagepiece_version": __version__,
        "source_sha256": source_sha256(),
        "model_name": f"{model.arch}.{model.reduction_config.method}",
        "arch": model.arch,
        "method": model.reduction_config.method,
        "config": model.reduction_config.to_dict(),
        "token_schedule": [dataclasses.asdict(row) for row in model.token_schedule()],
        "input_shape": [model.in_chans, *model.patch_embed.img_size],  # one image, [C, H, W]
        "input_format": input_format,
        "num_classes": model.num_classes,
        "dtype": input_dtype_name(input_format, dtype),  # of the images it takes
        "precision": dtype,  # what it computes in
        "attention": attention,
        "batch": {"min": batch[0], "max": batch[1], "dynamic": batch[0] != batch[1]},
        "preprocessing": preprocessing_config(model.pretrained_cfg),
        "device_type": device.type,
        "cuda_capability": current_cuda_capability(device.index or 0) if device.type == "cuda" else None,
        "cpu_capability": cpu.capability if cpu else None,
        "cpu_features": list(cpu.features) if cpu else None,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if device.type == "cuda" else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": _checkpoint_provenance(checkpoint),
        "class_names": _fine_tuned_class_names(checkpoint, model.num_classes),
        "artifact_format": suffix.lstrip("."),
    }


# Subpackages that only run artifacts: editing them changes no compiled model.
RUNS_ONLY = ("predict", "serve", "bench")


def source_sha256() -> str:
    """sha256 over this package's sources but those that only run artifacts (`RUNS_ONLY`), in the metadata: with one
    version number for every development state, it is what tells an artifact compiled by other code (the demo's reuse
    check, the tests' artifact cache). Coarse on purpose: an edit to a module a compile does not need (files.py, say)
    also counts, rather than one it needs going unnoticed."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        relative = source.relative_to(package)
        if relative.parts[0] not in RUNS_ONLY:
            digest.update(f"{relative.as_posix()}\0".encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def _checkpoint_provenance(checkpoint: Optional[Path]) -> dict:
    if checkpoint is None:
        return {"sha256": "random", "file": None}
    from .weights import file_sha256

    return {"sha256": file_sha256(checkpoint), "file": Path(checkpoint).name}


def _fine_tuned_class_names(checkpoint: Optional[Path], num_classes: int) -> Optional[list]:
    # The class folder names a fine-tune (scripts/finetune.py) recorded, in label order: predict and serve name
    # their top-k with them, and evaluate refuses a validation folder of other classes. None for other checkpoints.
    if checkpoint is None:
        return None
    from .data import unstorable_class_name
    from .weights import CheckpointError, fine_tuned_settings

    classes = (fine_tuned_settings(checkpoint) or {}).get("classes")
    if classes is None or len(classes) != num_classes:
        return None
    bad_name = unstorable_class_name(classes)
    if bad_name is not None:  # refused here, before the export, not by the metadata writer after the compile
        raise CheckpointError(f"{str(checkpoint)!r} records the class folder {bad_name}, which is not a UTF-8 name, and an "
                              "artifact's metadata holds UTF-8 text only: rename the folder and fine-tune again")
    return classes


# The library must use the process's C++ runtime, never a private static copy of it. On the H200
# machine (Ubuntu 24.04, g++ 13, torch 2.11) AOTInductor's CUDA libraries came out with libstdc++ linked
# statically, and their constructor crashed (SIGSEGV in std::regex's locale code) in every Python
# process: torch loads libstdc++.so there, but not into the global symbol scope, so the library mixed
# its own copy with the process's (a C++ program has it in global scope). Naming the shared library on the link
# line makes the linker resolve the C++ runtime there first, whatever else asks for the static archive
# (Inductor's only hook for extra link libraries is this one; it becomes `-l:libstdc++.so.6`).
# `_check_shared_cxx_runtime` checks the result, and the loaders promote libstdc++ to global scope
# for libraries built elsewhere (`_prepare_process`).
_SHARED_CXX_RUNTIME = {"aot_inductor.custom_op_libs": [":libstdc++.so.6"]} if sys.platform.startswith("linux") else {}


def _check_shared_cxx_runtime(verified: VerifiedArtifact, path: Path) -> None:
    """Warn about a freshly compiled library that carries its own copy of the C++ runtime (see above):
    ip_runtime and `load` run it (they promote the process's copy), other loaders in Python crash."""
    if not sys.platform.startswith("linux"):
        return
    needed = needed_libraries(verified.library)
    if not any(name.startswith(("libstdc++.so", "libc++.so")) for name in needed):
        warnings.warn(f"the C++ toolchain linked the C++ runtime statically into {str(path)!r} (it needs only "
                      f"{', '.join(needed)}): ip_runtime and imagepiece.export.load run it, but torch's own AOTI loaders "
                      "crash on it in a Python process. Check which libstdc++ the linker finds "
                      "(g++ -print-file-name=libstdc++.so) and that nothing adds -static-libstdc++.", RuntimeWarning, stacklevel=3)


def _inductor_options(device: torch.device, dynamic_batch: bool, cpu: Optional[CpuTarget] = None) -> dict:
    # CPU settings measured by `python -m imagepiece.bench tuning`: freezing (weight prepacking) is the
    # one that pays; max-autotune's CPP GEMM templates gained nothing on DeiT and took ~5x the compile time.
    # The library checks its own inputs when AOTI_RUNTIME_CHECK_INPUTS is set (the loaders set it):
    # sizes, strides, dtype and device against what it was compiled for. Its lower bound on a dynamic
    # batch would be 2 (torch.export never specialises on 1), while batch 1 runs correctly: the
    # runtimes check the artifact's declared batch range instead.
    checks = {"aot_inductor.check_lowerbound": not dynamic_batch, **_SHARED_CXX_RUNTIME}
    if device.type == "cuda":
        # Self-contained .so on CUDA: cubins and weights inside the library, no side files.
        return {**checks, "aot_inductor.embed_kernel_binary": True, "aot_inductor.package_constants_in_so": True}
    # CPU: freezing folds the weights into the graph as constants so Inductor can pre-pack them.
    # `cpp.march` replaces Inductor's -march=native with the portable level the metadata promises.
    march = {"cpp.march": cpu.march} if cpu is not None and cpu.march else {}
    return {**checks, **march, **_thread_options(), "freezing": True, "aot_inductor.package_constants_in_so": True}


def _thread_options() -> dict:
    """Inductor options that make CPU kernels run with the OpenMP thread count of the process running them.

    Inductor 2.14 does that by itself when the compiling process uses one thread per core (the default).
    Older ones (2.11), or any compile under another thread count, bake `num_threads(<count at compile
    time>)` into every kernel: oversubscribed on a smaller machine, deaf to torch.set_num_threads, and a
    child forked after a run hangs in its first run. `cpp.dynamic_threads` avoids that everywhere, but
    costs ~7-10% at DeiT-Ti batch 1 on 2.14 (`bench tuning`, dynamic-threads): only where it is needed.
    """
    if torch.__version__ >= "2.14" and torch.get_num_threads() == os.cpu_count():
        return {}
    return {"cpp.dynamic_threads": True}


def compile_artifact(
    model: ImagePieceViT,
    out: Union[str, Path],
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    batch: Optional[int] = None,
    max_batch: Optional[int] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    calibration: Optional[Union[str, Path]] = None,
    calibration_images: Optional[int] = None,
    inductor_overrides: Optional[dict] = None,
    input_format: str = "float_nchw",
    attention: Optional[str] = None,
    log: Callable[[str], None] = lambda message: None,
) -> CompileReport:
    """Export `model` and compile it with AOTInductor into `out` (.so or .pt2), metadata inside.

    The compile runs in a temporary folder beside `out` (AOTInductor writes generated sources next
    to its output); the finished artifact is moved into place with one atomic rename, so a failed
    or interrupted compile never leaves a partial file at `out` and never replaces a good one.

    dtype "int8" quantizes the Linear layers (`imagepiece.quantize`), calibrated on up to
    `calibration_images` images from the folder `calibration` (synthetic Gaussian images without one);
    the artifact still takes fp32 images. `inductor_overrides` replace Inductor options (benchmarks).
    `input_format` "uint8_nhwc" compiles the normalisation in (`imagepiece.input_format.PixelInput`).
    `attention` picks the attention kernel (`blocks.ATTENTION_KERNELS`; default `default_attention`); `model`
    itself keeps its own.
    """
    out = check_output_path(out)
    target = check_device_and_dtype(device, dtype)
    _import_cpp_extension_quietly()
    low, high = batch_range(batch, max_batch)
    if (calibration is not None or calibration_images is not None) and dtype != "int8":
        raise ValueError("calibration images are for --dtype int8 only")
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {list(INPUT_FORMATS)}, got {input_format!r}")
    if attention is None:
        attention = default_attention(target.type, dtype)
    elif attention not in ATTENTION_KERNELS:  # before the model is cast or traced
        raise ValueError(f"attention must be one of {list(ATTENTION_KERNELS)}, got {attention!r}")
    cpu = compile_target() if target.type == "cpu" else None
    metadata = build_metadata(model, target, dtype, (low, high), Path(checkpoint) if checkpoint else None, out.suffix,
                              input_format, cpu, attention)
    float_dtype = model_dtype(metadata)
    model = model.to(device=target, dtype=float_dtype).eval()
    example_batch = low if low == high else DYNAMIC_EXAMPLE_BATCH
    example = _example_batch(example_batch, metadata["input_shape"], target, float_dtype)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=high)},) if low != high else None

    started = time.perf_counter()
    with attention_kernel(model, attention):  # traced into the graph here (int8: by the quantizer's export)
        if dtype == "int8":
            model = _quantized(model, metadata, example, calibration, calibration_images, log)
        if input_format == "uint8_nhwc":
            preprocessing = metadata["preprocessing"]
            model = PixelInput(model, preprocessing["mean"], preprocessing["std"], float_dtype).to(target)
            channels, height, width = metadata["input_shape"]
            example = random_pixels(example_batch, height, width, channels).to(target)
        with torch.no_grad():
            exported = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    export_seconds = time.perf_counter() - started
    log(f"exported in {export_seconds:.1f} s; compiling with AOTInductor for {target.type} {dtype} ...")

    started = time.perf_counter()
    options = {**_inductor_options(target, dynamic_batch=low != high, cpu=cpu), **(inductor_overrides or {})}
    # Absolute: Inductor runs the compiler in its own cache folder, where a relative "-o .x.so.tmp/model.so" names nothing.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent.absolute()) as workdir, \
            command_line_safe(Path(workdir)) as build_dir:
        staged, built = Path(workdir) / f"model{out.suffix}", build_dir / f"model{out.suffix}"
        with torch.no_grad(), pinned_march(options) as options:
            if out.suffix == ".so":
                torch._inductor.aot_compile(exported.module(), (example,), options={**options, "aot_inductor.output_path": str(built)})
            else:
                torch._inductor.aoti_compile_and_package(exported, package_path=str(built), inductor_configs=options)
        write_metadata(staged, metadata)
        verified = open_artifact(staged)  # the artifact must verify before it may replace anything
        try:
            _check_shared_cxx_runtime(verified, out)
        finally:
            verified.close()
        metadata = verified.metadata
        fsync_file(staged)
        os.replace(staged, out)
    compile_seconds = time.perf_counter() - started
    return CompileReport(out, export_seconds, compile_seconds, out.stat().st_size, metadata)


def _survives_shlex(path: str) -> bool:
    try:
        return shlex.split(path) == [path]
    except ValueError:  # an unbalanced quote
        return False


@contextlib.contextmanager
def command_line_safe(folder: Path) -> Iterator[Path]:
    """`folder`, or a link to it from the system's temporary folder when its path would not survive
    Inductor's compiler command line: Inductor joins the paths unquoted and splits the line with shlex,
    so a space or a quote in `--out`'s folder would make g++ write somewhere else ("art x/" -> "art").
    The artifact is still built in `folder` (through the link), so its final rename stays atomic."""
    if _survives_shlex(str(folder)):
        yield folder
        return
    links = Path(tempfile.mkdtemp(prefix="imagepiece-build."))
    try:
        if not _survives_shlex(str(links)):
            raise ValueError(f"cannot compile into {str(folder)!r}: its path holds spaces or quotes, which Inductor's compiler "
                             f"command line splits, and so does the temporary folder {str(links)!r}; choose another --out folder")
        link = links / "build"
        link.symlink_to(folder, target_is_directory=True)
        yield link
    finally:
        shutil.rmtree(links)  # the link only: rmtree does not follow it


def _import_cpp_extension_quietly() -> None:
    """Inductor imports torch.utils.cpp_extension, which logs "No CUDA runtime is found" on import wherever a CUDA
    toolkit is installed without a GPU: noise on every CPU compile (a CUDA one without a GPU is refused before)."""
    with logger_quieted("torch.utils.cpp_extension"):
        import torch.utils.cpp_extension  # noqa: F401


def _device_memory_bytes(target: torch.device) -> int:
    """The memory a compile on `target` can have: the GPU's, or the machine's capped by the container's limit."""
    if target.type == "cuda":
        return torch.cuda.get_device_properties(target).total_memory
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        with contextlib.suppress(OSError, ValueError):  # absent, or "max": no limit
            memory = min(memory, int(Path(limit).read_text().strip()))
    return memory


def _example_batch(batch: int, shape, target: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The random images a static batch is traced with: all of them real, so a huge --batch is refused here, with
    the way out, rather than ending in an allocator's traceback or the OOM killer."""
    needed = batch * math.prod(shape) * dtype.itemsize
    too_large = (f"a static batch of {batch:,} is traced with {needed / 2**30:.1f} GiB of example images, more than "
                 f"this {target.type.upper() if target.type == 'cuda' else 'machine'}'s memory; a dynamic batch "
                 f"(--max-batch, traced at {DYNAMIC_EXAMPLE_BATCH}) or a smaller --batch compiles")
    if needed > _device_memory_bytes(target):
        raise ValueError(too_large)
    try:
        return torch.randn(batch, *shape, device=target, dtype=dtype)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if isinstance(error, torch.OutOfMemoryError) or allocation_failure(error):
            raise ValueError(too_large.replace("more than", "which could not be allocated in")) from None
        raise


def _quantized(model: ImagePieceViT, metadata: dict, example: torch.Tensor, calibration: Optional[Union[str, Path]],
               images: Optional[int], log: Callable[[str], None]) -> torch.nn.Module:
    """`model` with int8 Linear layers; records the scheme, the calibration and the quantized model's
    agreement with `model` on the calibration images in `metadata`."""
    from .quantize import (SCHEME, agreement_with_fp32, default_calibration_images, folder_calibration, quantize_int8,
                           synthetic_calibration, usable_calibration)

    dynamic, batch = metadata["batch"]["dynamic"], example.shape[0]
    count = images or default_calibration_images(batch, dynamic)
    if calibration is not None:
        data = folder_calibration(calibration, metadata["preprocessing"], metadata["input_shape"], count)
    else:
        data = synthetic_calibration(metadata["input_shape"], count)
    given = len(data.images)
    data = usable_calibration(data, batch, dynamic)  # what the metadata records is what the ranges were measured on
    left_out = f"; the last {given - len(data.images)} left out: a static batch-{batch} graph takes whole batches" if given > len(data.images) else ""
    log(f"quantizing to int8, calibrated on {data.images.shape[0]} images ({data.source}{left_out}) ...")
    quantized = quantize_int8(model, example, data, batch=batch,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=metadata["batch"]["max"])},)
                              if dynamic else None)
    from importlib.metadata import version

    agreement = agreement_with_fp32(model, quantized, data.images.to(example.device), batch, dynamic)
    log(f"int8 (its quantize/dequantize reference model) vs fp32 on the calibration images: top-1 {agreement['top1_agree']}/{agreement['images']}, "
        f"max |logit diff| {agreement['max_abs_logit_diff']:.4f}, mean cosine {agreement['cosine_mean']:.5f}")
    metadata["quantization"] = {"scheme": SCHEME, "calibration": data.describe(), "torchao": version("torchao"),
                                "agreement_with_fp32": {**agreement, "on": "the calibration images, quantize/dequantize reference model"}}
    return quantized


class CompiledModel:
    """Runs an artifact through PyTorch's AOTI runner, checking inputs against its metadata first.

    The artifact is read once and verified (`imagepiece.artifact.open_artifact`); the runner loads
    that verified private copy, never the path again (`imagepiece.private_copy`).

    Args:
        path: a `.so` or `.pt2` made by `compile_artifact`.
        device: where to run; default the artifact's device type (cuda means cuda:0).
    """

    def __init__(self, path: Union[str, Path], device: Optional[Union[str, torch.device]] = None) -> None:
        self.path = Path(path)
        verified = open_artifact(self.path)
        self.metadata = verified.metadata
        try:
            self.device = resolved_device(device, self.metadata)
            check_compatible(self.metadata, self.device)
        except BaseException:
            verified.close()
            raise
        _prepare_process()
        self._library = lease(verified.digest, verified.library)
        try:
            if self.device.type == "cuda":
                self._runner = torch._C._aoti.AOTIModelContainerRunnerCuda(self._library.path, 1, str(self.device))
            else:
                self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(self._library.path, 1)
        except Exception as error:  # the runner raises RuntimeError with the loader's message
            self._library.release()
            raise ArtifactError("load_failed", f"could not load {str(self.path)!r}: {error}") from None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(self.metadata, images, self.device)
        try:
            logits = self._runner.run([_with_exact_strides(images)])[0]
        except RuntimeError as error:  # e.g. the library's own input check refused what the metadata allowed
            raise ArtifactError("run_failed", f"the compiled model failed: {error}") from None
        promised = [images.shape[0], self.metadata["num_classes"]]
        if list(logits.shape) != promised:
            raise ArtifactError("run_failed", f"the compiled model returned {list(logits.shape)} but its metadata promises {promised}")
        return logits


def _with_exact_strides(images: torch.Tensor) -> torch.Tensor:
    """`images` with the strides of a freshly allocated tensor. PyTorch calls a tensor contiguous whatever the
    stride of a size-1 dimension; AOTInductor compares every stride. Such a stride moves no address, so the view
    reads the same memory (as runtime.cpp's with_exact_strides)."""
    strides, step = [], 1
    for size in reversed(images.shape):
        strides.append(step)
        step *= max(size, 1)
    strides = tuple(reversed(strides))
    return images if images.stride() == strides else images.as_strided(images.shape, strides)


_prepared = False


def _prepare_process() -> None:
    """Once per process, before the first library runs (what the C++ runtime does too):
    * AOTI_RUNTIME_CHECK_INPUTS=1 unless already set, so every compiled library also checks its inputs
      against what it was compiled for (no metadata can make it read out of bounds);
    * a forked child runs single-threaded (as PyTorch's DataLoader workers do): the parent's OpenMP
      thread pool does not survive fork(), and the next parallel region (AOTI kernels, MKL) would hang;
    * the C++ runtime in the global symbol scope (`_promote_cxx_runtime`)."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
    os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))
    _promote_cxx_runtime()


def _promote_cxx_runtime() -> None:
    """Put the loaded libstdc++ into the global symbol scope, as it is in any C++ program: a library
    that carries a private static copy of it (see `_SHARED_CXX_RUNTIME`) then binds to the process's
    copy instead of mixing the two, which crashed in std::locale. Python loads torch RTLD_LOCAL,
    so without this nothing in the global scope defines the C++ runtime."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_NOLOAD | os.RTLD_NOW | os.RTLD_GLOBAL)
        except OSError:  # no libstdc++ loaded (another C++ runtime): nothing to promote
            pass


def load(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None) -> CompiledModel:
    """Load an artifact for inference from Python (see `CompiledModel`)."""
    return CompiledModel(path, device)
