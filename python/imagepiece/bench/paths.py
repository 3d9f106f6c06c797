"""The ways to run a model that the benchmarks compare: a registry of `RunPath`s.

A path either gives a zero-argument-per-batch runner (images -> logits) that the suite times
interleaved with every other contender, or measures itself with its own harness (the C++
google-benchmark binary). Another way to run a model is one more `register_path(RunPath(...))` with a
function that builds its runner from the shared `Context`: the peers (ONNX Runtime, OpenVINO) are
registered in `peer_paths`, the artifacts of another precision than the run's in `precision_paths`.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..artifact import DTYPES
from ..export import compile_artifact, load

Runner = Callable[[torch.Tensor], object]


@dataclass
class Context:
    """Shared state of one suite run: models, compiled artifacts and wrappers are built once."""

    arch: str
    device: torch.device
    dtype: str
    batches: List[int]
    workdir: Path
    models: Dict[str, Dict[str, torch.nn.Module]]
    cpp_bench: Optional[Path] = None
    log: Callable[[str], None] = print
    gflops: Dict[str, float] = field(default_factory=dict)  # per variant, filled by the suite
    # (variant, path, what) -> seconds spent preparing it: export + AOTInductor, torch.compile's first call
    compile_seconds: Dict[Tuple[str, str, str], float] = field(default_factory=dict)
    _artifacts: Dict[str, Path] = field(default_factory=dict)
    _compiled: Dict[str, torch.nn.Module] = field(default_factory=dict)
    # What other paths build once per run (ONNX files, artifacts of another precision), by their own keys.
    prepared: Dict[tuple, object] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def eager_model(self, variant: str) -> torch.nn.Module:
        models = self.models[variant]
        return models.get("timm", models["ours"])

    def artifact(self, variant: str) -> Path:
        """One artifact per variant with a dynamic batch covering every benchmarked batch size."""
        if variant not in self._artifacts:
            low, high = min(self.batches), max(self.batches)
            out = self.workdir / f"{variant}_{self.dtype}.so"
            self.log(f"compiling {variant} with AOTInductor ({self.device.type} {self.dtype}, batch up to {high}) ...")
            report = compile_artifact(self.models[variant]["ours"], out, device=str(self.device), dtype=self.dtype,
                                      batch=high if high == low else None, max_batch=high if high > low else None)
            self.compile_seconds[(variant, "aoti", "torch.export")] = report.export_seconds
            self.compile_seconds[(variant, "aoti", "AOTInductor compile")] = report.compile_seconds
            self._artifacts[variant] = out
        return self._artifacts[variant]


@dataclass(frozen=True)
class RunPath:
    """One way to run a model.

    Args:
        devices: device types it runs on.
        make_runner: (context, variant) -> runner, timed interleaved by the suite.
        time_itself: (context, variant, batch, repeats) -> seconds per call, for paths with their own
            harness; such a path is timed on its own, after the interleaved contenders.
        requires: Python modules it needs (optional extras).
        dtypes: the run dtypes (the images' dtype) it takes part in; a path with its own precision
            (e.g. OpenVINO bf16 on fp32 images) names that precision in its name.
        in_default: part of a suite run that names no --paths (peers and extra precisions are asked for).
        precision: the arithmetic it runs at when that is not the run's dtype ("bf16", "int8", ...).
    """

    name: str
    description: str
    devices: Tuple[str, ...] = ("cpu", "cuda")
    make_runner: Optional[Callable[[Context, str], Runner]] = None
    time_itself: Optional[Callable[[Context, str, int, int], List[float]]] = None
    requires: Tuple[str, ...] = ()
    dtypes: Tuple[str, ...] = ("fp32", "fp16", "bf16")
    in_default: bool = True
    precision: Optional[str] = None

    def missing(self) -> List[str]:
        """Required modules that are not installed."""
        return [module for module in self.requires if importlib.util.find_spec(module) is None]


PATHS: Dict[str, RunPath] = {}


def register_path(path: RunPath) -> RunPath:
    if (path.make_runner is None) == (path.time_itself is None):
        raise ValueError(f"path {path.name!r} needs exactly one of make_runner and time_itself")
    PATHS[path.name] = path
    return path


def _inference(function: Callable) -> Runner:
    def run(images: torch.Tensor):
        with torch.inference_mode():
            return function(images)

    return run


def _eager(context: Context, variant: str) -> Runner:
    return _inference(context.eager_model(variant))


def _torch_compile(context: Context, variant: str) -> Runner:
    if variant not in context._compiled:
        mode = "max-autotune" if context.device.type == "cuda" else "default"
        context._compiled[variant] = torch.compile(context.eager_model(variant), mode=mode, dynamic=False)
    return _inference(context._compiled[variant])


def _aoti(context: Context, variant: str) -> Runner:
    return _inference(load(context.artifact(variant), device=context.device))


def _ip_runtime(context: Context, variant: str, cuda_graphs: bool = False) -> Runner:
    import ip_runtime

    runtime = ip_runtime.Runtime(str(context.artifact(variant)), device=str(context.device), cuda_graphs=cuda_graphs,
                                 batch_buckets=sorted(context.batches) if cuda_graphs else [])
    return runtime.run


def _cpp_bench(context: Context, variant: str, batch: int, repeats: int) -> List[float]:
    """Seconds per call of BM_Runtime at `batch`, measured by the google-benchmark binary."""
    if context.cpp_bench is None:
        raise RuntimeError("the C++ benchmark binary is not built (needs libbenchmark-dev)")
    result = subprocess.run(
        [str(context.cpp_bench), str(context.artifact(variant)), f"--benchmark_filter=^BM_Runtime/{batch}/",
         f"--benchmark_repetitions={repeats}", "--benchmark_format=json", "--benchmark_min_time=0.2s"],
        capture_output=True, text=True, check=True,
    )
    runs = [row for row in json.loads(result.stdout)["benchmarks"] if row.get("run_type") == "iteration"]
    scale = {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}
    return [row["real_time"] * scale[row["time_unit"]] for row in runs]


register_path(RunPath("eager", "timm's / our nn.Module in inference mode", make_runner=_eager))
register_path(RunPath("compile", "torch.compile (mode default; max-autotune on CUDA)", make_runner=_torch_compile))
register_path(RunPath("aoti", "the AOTInductor artifact through PyTorch's runner (imagepiece.export.load)", make_runner=_aoti))
register_path(RunPath("ip_runtime", "the same artifact through the C++ runtime's Python module", make_runner=_ip_runtime))
register_path(RunPath("ip_runtime_graphs", "ip_runtime with CUDA graphs", devices=("cuda",),
                      make_runner=lambda context, variant: _ip_runtime(context, variant, cuda_graphs=True)))
register_path(RunPath("cpp", "the google-benchmark binary (cpp/bench) on the same artifact, fp32 images", devices=("cpu",),
                      time_itself=_cpp_bench, dtypes=("fp32",)))

from . import peer_paths, precision_paths  # noqa: E402,F401  (they register more paths)
