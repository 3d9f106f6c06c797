"""What a benchmark row measures besides time: FLOPs per image and peak memory."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def gflops_per_image(model: torch.nn.Module, input_shape, device: torch.device, dtype: torch.dtype) -> float:
    """Forward GFLOPs of one image, counted by torch.utils.flop_counter (matmuls, convs, attention)."""
    images = torch.randn(1, *input_shape, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(images)
    return counter.get_total_flops() / 1e9


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on a GPU, else the process's peak RSS.

    CPU peak RSS is process-wide (it includes every loaded model); Linux lets it be reset through
    /proc/self/clear_refs, so each row still sees its own high-water mark.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.mib = int(line.split()[1]) / 1024
        except OSError:
            pass
