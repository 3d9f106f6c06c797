"""What machine and software a measurement or an artifact comes from."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, Iterator, Optional, Union

import torch

# Optional packages whose versions a measurement records (the peers and the int8 quantizer).
PEER_PACKAGES = ("onnxruntime", "openvino", "onnx", "torchao")


def device_problem(name: str) -> Optional[str]:
    """Why the --device `name` cannot run eager PyTorch here (None if it can), for a CLI's parser.error."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device (cpu, cuda or cuda:N)"
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        return f"--device {name!r} is not available here (cpu{', cuda' if torch.cuda.is_available() else ''})"
    return None


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: Union[str, torch.device, None] = None) -> dict:
    """CPU, core count, GPU (if any) and library versions, for result files and artifact metadata.

    `device`: the one a measurement ran on. A CPU run records no GPU (so its results are filed under the CPU, not
    under a GPU it never used), a CUDA run the GPU it chose (cuda:1, not GPU 0). None: the current GPU, if any.
    """
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": gpu_name(device),
        "python": platform.python_version(),
    }
    if device is not None:
        info["device"] = str(device)
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    from importlib import metadata

    for package in PEER_PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    info["cpu_low_precision"] = sorted(cpu_flags() & LOW_PRECISION_FLAGS)
    return info


def gpu_name(device: Union[str, torch.device, None] = None) -> Optional[str]:
    """The name of the GPU a run on `device` uses: None for a CPU run or without CUDA; `device` None: the current GPU."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    index = None if device is None else torch.device(device).index
    return torch.cuda.get_device_name(index)  # None: the current device, as `cuda` alone means


LOW_PRECISION_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni", "avx512_fp16"})


def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class LowPrecisionSupport:
    native: bool  # the CPU has instructions for it; otherwise libraries emulate it (slowly) or fall back
    reason: str


def bf16_support() -> LowPrecisionSupport:
    """Whether bf16 GEMMs run natively on this CPU (avx512_bf16 or AMX), or would be emulated in fp32."""
    flags = cpu_flags() & {"avx512_bf16", "amx_bf16"}
    if flags:
        return LowPrecisionSupport(True, f"this CPU has {', '.join(sorted(flags))}")
    return LowPrecisionSupport(False, f"this CPU ({cpu_model()}) has neither avx512_bf16 nor amx_bf16: bf16 would be "
                                      "emulated, slower than fp32 and no more accurate")


def int8_support() -> LowPrecisionSupport:
    """Whether int8 GEMMs have VNNI (or AMX) instructions here; without them oneDNN's int8 is much slower."""
    flags = cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}
    if flags:
        return LowPrecisionSupport(True, f"this CPU has {', '.join(sorted(flags))}")
    return LowPrecisionSupport(False, f"this CPU ({cpu_model()}) has no VNNI or AMX int8 instructions: int8 runs a slow path")


def machine_slug(info: dict) -> str:
    """A folder name for benchmarks/results/: the GPU the run used (`machine_info(device)`), else the CPU and its cores."""
    name = info["gpu"] or f"{info['cpu']}-{info['cpu_cores']}core"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


@contextlib.contextmanager
def logger_quieted(name: str) -> Iterator[None]:
    """Within the block, logger `name` says only errors: imports of torch modules that log noise on every command."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
