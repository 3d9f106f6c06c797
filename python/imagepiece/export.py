"""torch.export + AOTInductor: an ImagePiece model -> one artifact (`.so` or `.pt2`) with metadata.

`compile_artifact` is what `scripts/aot_compile.py` runs; `load` runs an artifact from Python with the
same input checks as the C++ runtime, so parity can be tested without it. Metadata handling lives in
`imagepiece.artifact` (re-exported here: `read_metadata`, `ArtifactError`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from . import __version__
from .artifact import (
    DTYPES,
    FORMAT_VERSION,
    PACKAGE_METADATA_KEY,
    SUFFIXES,
    ArtifactError,
    check_compatible,
    check_images,
    current_cuda_capability,
    embed_metadata,
    read_metadata,
)
from .model import ImagePieceViT

__all__ = ["ArtifactError", "CompiledModel", "CompileReport", "compile_artifact", "load", "read_metadata"]

# A dynamic batch dim is traced with this example size: 1 would make torch.export specialise it.
DYNAMIC_EXAMPLE_BATCH = 2


@dataclass
class CompileReport:
    path: Path
    export_seconds: float
    compile_seconds: float
    size_bytes: int
    metadata: dict


def check_device_and_dtype(device: str, dtype: str) -> torch.device:
    """The torch.device to compile for; ValueError for combinations that cannot work here."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is available here (torch.cuda.is_available() is False)")
        if dtype == "bf16" and torch.cuda.get_device_capability(target.index or 0) < (8, 0):
            raise ValueError(f"bf16 needs a GPU of compute capability >= 8.0; this one is {current_cuda_capability(target.index or 0)}")
    elif dtype == "fp16":
        raise ValueError("fp16 is not supported on cpu (Inductor's CPU fp16 kernels are slow or missing); use fp32 or bf16")
    return target


def check_output_path(out: Union[str, Path]) -> Path:
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ValueError(f"output {str(out)!r} must end in .so (one shared library) or .pt2 (AOTI package)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"output directory {str(parent)!r} does not exist")
    try:  # really try: permission bits say nothing for root or for read-only file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise ValueError(f"output directory {str(parent)!r} is not writable ({error.strerror})") from None
    if out.is_dir():
        raise ValueError(f"output {str(out)!r} is a directory")
    return out


def batch_range(batch: Optional[int], max_batch: Optional[int]) -> tuple[int, int]:
    """(min, max) batch the artifact accepts: a static N, or a dynamic 1..max_batch."""
    if (batch is None) == (max_batch is None):
        raise ValueError("give exactly one of batch (static) or max_batch (dynamic 1..max_batch)")
    if batch is not None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return batch, batch
    if max_batch < DYNAMIC_EXAMPLE_BATCH:
        raise ValueError(f"max_batch must be >= {DYNAMIC_EXAMPLE_BATCH} (use batch=1 for a static batch of one), got {max_batch}")
    return 1, max_batch


def build_metadata(model: ImagePieceViT, device: torch.device, dtype: str, batch: tuple[int, int],
                   checkpoint: Optional[Path], suffix: str) -> dict:
    """Everything the runtime checks and a user may want to inspect, as plain JSON values."""
    cfg = model.pretrained_cfg
    return {
        "format_version": FORMAT_VERSION,
        "imagepiece_version": __version__,
        "model_name": f"{model.arch}.{model.reduction_config.method}",
        "arch": model.arch,
        "method": model.reduction_config.method,
        "config": model.reduction_config.to_dict(),
        "token_schedule": [dataclasses.asdict(row) for row in model.token_schedule()],
        "input_shape": [model.in_chans, *model.patch_embed.img_size],
        "num_classes": model.num_classes,
        "dtype": dtype,
        "batch": {"min": batch[0], "max": batch[1], "dynamic": batch[0] != batch[1]},
        "preprocessing": {key: cfg[key] for key in ("mean", "std", "interpolation", "crop_pct", "crop_mode")},
        "device_type": device.type,
        "cuda_capability": current_cuda_capability(device.index or 0) if device.type == "cuda" else None,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if device.type == "cuda" else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": _checkpoint_provenance(checkpoint),
        "artifact_format": suffix.lstrip("."),
    }


def _checkpoint_provenance(checkpoint: Optional[Path]) -> dict:
    if checkpoint is None:
        return {"sha256": "random", "file": None}
    from .weights import file_sha256

    return {"sha256": file_sha256(checkpoint), "file": Path(checkpoint).name}


def _inductor_options(device: torch.device) -> dict:
    if device.type == "cuda":
        # Self-contained .so on CUDA: cubins and weights inside the library, no side files.
        return {"aot_inductor.embed_kernel_binary": True, "aot_inductor.package_constants_in_so": True}
    # CPU: freezing folds the weights into the graph as constants so Inductor can pre-pack them.
    return {"freezing": True, "aot_inductor.package_constants_in_so": True}


def compile_artifact(
    model: ImagePieceViT,
    out: Union[str, Path],
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    batch: Optional[int] = None,
    max_batch: Optional[int] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    log: Callable[[str], None] = lambda message: None,
) -> CompileReport:
    """Export `model` and compile it with AOTInductor into `out` (.so or .pt2), metadata inside.

    The compile runs in a temporary folder beside `out` (AOTInductor writes generated sources next
    to its output); the finished artifact is moved into place with one atomic rename, so a failed
    or interrupted compile never leaves a partial file at `out` and never replaces a good one.
    """
    out = check_output_path(out)
    target = check_device_and_dtype(device, dtype)
    low, high = batch_range(batch, max_batch)
    metadata = build_metadata(model, target, dtype, (low, high), Path(checkpoint) if checkpoint else None, out.suffix)
    model = model.to(device=target, dtype=DTYPES[dtype]).eval()
    example_batch = low if low == high else DYNAMIC_EXAMPLE_BATCH
    example = torch.randn(example_batch, *metadata["input_shape"], device=target, dtype=DTYPES[dtype])
    dynamic = ({0: torch.export.Dim("batch", min=1, max=high)},) if low != high else None

    started = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    export_seconds = time.perf_counter() - started
    log(f"exported in {export_seconds:.1f} s; compiling with AOTInductor for {target.type} {dtype} ...")

    started = time.perf_counter()
    options = _inductor_options(target)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent or ".") as workdir:
        staged = Path(workdir) / f"model{out.suffix}"
        with torch.no_grad():
            if out.suffix == ".so":
                torch._inductor.aot_compile(exported.module(), (example,), options={**options, "aot_inductor.output_path": str(staged)})
                embed_metadata(staged, metadata)
            else:
                options["aot_inductor.metadata"] = {PACKAGE_METADATA_KEY: json.dumps(metadata, sort_keys=True)}
                torch._inductor.aoti_compile_and_package(exported, package_path=str(staged), inductor_configs=options)
        read_metadata(staged)  # the artifact must describe itself before it may replace anything
        os.replace(staged, out)
    compile_seconds = time.perf_counter() - started
    return CompileReport(out, export_seconds, compile_seconds, out.stat().st_size, metadata)


class CompiledModel:
    """Runs an artifact through PyTorch's AOTI runner, checking inputs against its metadata first.

    Args:
        path: a `.so` or `.pt2` made by `compile_artifact`.
        device: where to run; default the artifact's device type (cuda means cuda:0).
    """

    def __init__(self, path: Union[str, Path], device: Optional[Union[str, torch.device]] = None) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.device = torch.device(device if device is not None else self.metadata["device_type"])
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        check_compatible(self.metadata, self.device)
        try:
            if self.path.suffix == ".pt2":
                self._runner = torch._inductor.aoti_load_package(str(self.path), device_index=self.device.index or -1)
                self._run = lambda images: self._runner(images)
            else:
                if self.device.type == "cuda":
                    self._runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(self.path), 1, str(self.device))
                else:
                    self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(self.path), 1)
                self._run = lambda images: self._runner.run([images])[0]
        except Exception as error:  # the runner raises RuntimeError with the loader's message
            raise ArtifactError("load_failed", f"could not load {str(self.path)!r}: {error}") from None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(self.metadata, images, self.device)
        return self._run(images)


def load(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None) -> CompiledModel:
    """Load an artifact for inference from Python (see `CompiledModel`)."""
    return CompiledModel(path, device)
