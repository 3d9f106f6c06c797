"""What a benchmark row measures besides time: FLOPs per image and peak memory."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry


def _cpu_attention_formula() -> dict:
    # torch's counter has formulas for the GPU's SDPA kernels, none for the CPU's flash kernel: attention went
    # uncounted on the CPU (DeiT-S 8.48 GFLOPs there, 9.20 on the H100). Its operands are the same: same formula.
    aten = torch.ops.aten
    cpu_kernel = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    formula = getattr(flop_registry.get(aten._scaled_dot_product_flash_attention), "__wrapped__", None)
    return {cpu_kernel: formula} if cpu_kernel is not None and formula is not None and cpu_kernel not in flop_registry else {}


def gflops_per_image(model: torch.nn.Module, input_shape, device: torch.device, dtype: torch.dtype) -> float:
    """Forward GFLOPs of one image, counted by torch.utils.flop_counter (matmuls, convs, attention)."""
    images = torch.randn(1, *input_shape, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formula())
    with counter, torch.inference_mode():
        model(images)
    return counter.get_total_flops() / 1e9


class PeakMemory:
    """Peak CUDA allocator memory over a block; NaN on the CPU.

    The CPU has no per-call figure: a process's peak RSS (even reset through /proc/self/clear_refs) holds every
    model the suite loaded and the allocators' caches, so every CPU row showed the same number (4107 MiB).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
