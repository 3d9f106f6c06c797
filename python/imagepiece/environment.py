"""What machine and software a measurement or an artifact comes from."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, core count, GPU (if any) and library versions, for result files and artifact metadata."""
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def machine_slug(info: dict) -> str:
    """A folder name for benchmarks/results/: the GPU if there is one, else the CPU and its cores."""
    name = info["gpu"] or f"{info['cpu']}-{info['cpu_cores']}core"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
