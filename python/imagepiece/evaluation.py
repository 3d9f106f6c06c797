"""Top-1/top-5 accuracy and throughput over a data loader, for any `images -> logits` function."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch


def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device,
             fixed_batch: Optional[int] = None, progress=None) -> dict:
    """Accuracy of `predict` over `loader`.

    Args:
        fixed_batch: a static-batch artifact accepts only this batch size: a short last batch is
            padded with copies of its last image and the padding's logits are dropped.
        progress: an optional tqdm-like object updated per batch.
    """
    correct1 = correct5 = seen = 0
    model_seconds = 0.0
    started = time.perf_counter()
    for images, targets in loader:
        count = images.shape[0]
        if fixed_batch is not None and count < fixed_batch:
            images = torch.cat([images, images[-1:].expand(fixed_batch - count, -1, -1, -1)])
        images = images.to(device, non_blocking=True).contiguous()
        begin = time.perf_counter()
        logits = torch.as_tensor(predict(images))[:count]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_seconds += time.perf_counter() - begin
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        targets = targets.view(-1, 1)
        correct1 += int((top[:, :1] == targets).sum())
        correct5 += int((top == targets).any(dim=1).sum())
        seen += count
        if progress is not None:
            progress.update(count)
    return {
        "images": seen,
        "top1": 100.0 * correct1 / max(seen, 1),
        "top5": 100.0 * correct5 / max(seen, 1),
        "model_seconds": model_seconds,
        "total_seconds": time.perf_counter() - started,
        "img_per_s": seen / model_seconds if model_seconds else float("nan"),
    }
