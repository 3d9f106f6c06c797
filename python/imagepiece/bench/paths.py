"""The ways to run a model that the suite compares, each turned into a zero-argument callable.

eager        timm's / our nn.Module in inference mode
compile      torch.compile (mode "default"; "max-autotune" on CUDA)
aoti         the AOTInductor artifact through PyTorch's runner (imagepiece.export.load)
ip_runtime   the same artifact through the C++ runtime's Python module
ip_runtime_graphs   ip_runtime with CUDA graphs (CUDA only)
cpp          the google-benchmark binary (cpp/bench) on the same artifact (CPU only; timed by itself)
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..artifact import DTYPES
from ..export import compile_artifact, load

PATHS = ("eager", "compile", "aoti", "ip_runtime", "ip_runtime_graphs", "cpp")
CUDA_ONLY = ("ip_runtime_graphs",)
CPU_ONLY = ("cpp",)


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
    compile_seconds: Dict[Tuple[str, str], float] = field(default_factory=dict)
    _artifacts: Dict[str, Path] = field(default_factory=dict)
    _compiled: Dict[str, torch.nn.Module] = field(default_factory=dict)

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
            self.compile_seconds[(variant, "aoti")] = report.export_seconds + report.compile_seconds
            self._artifacts[variant] = out
        return self._artifacts[variant]


def _inference(function: Callable) -> Callable:
    def run(images: torch.Tensor):
        with torch.inference_mode():
            return function(images)

    return run


def make_runner(context: Context, path: str, variant: str) -> Callable[[torch.Tensor], object]:
    """A callable images -> logits for `variant` on `path` (not used for the "cpp" path)."""
    if path == "eager":
        return _inference(context.eager_model(variant))
    if path == "compile":
        if variant not in context._compiled:
            mode = "max-autotune" if context.device.type == "cuda" else "default"
            context._compiled[variant] = torch.compile(context.eager_model(variant), mode=mode, dynamic=False)
        return _inference(context._compiled[variant])
    if path == "aoti":
        return _inference(load(context.artifact(variant), device=context.device))
    if path in ("ip_runtime", "ip_runtime_graphs"):
        import ip_runtime

        graphs = path == "ip_runtime_graphs"
        runtime = ip_runtime.Runtime(str(context.artifact(variant)), device=str(context.device), cuda_graphs=graphs,
                                     batch_buckets=sorted(context.batches) if graphs else [])
        return runtime.run
    raise ValueError(f"unknown path {path!r}; choose from {PATHS}")


def run_cpp_bench(context: Context, variant: str, batch: int, repeats: int) -> List[float]:
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
