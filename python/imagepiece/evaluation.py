"""Top-1/top-5 accuracy and throughput over a data loader, for any `images -> logits` function:
an eager model (`eager_predictor`) in evaluation and fine-tuning, or a compiled artifact; and
`logit_agreement`, how close two models' logits are (a low-precision model against fp32)."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch


def eager_predictor(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> logits of `model` in eval mode, without autograd."""

    def predict(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        with torch.inference_mode():
            return model(images)

    return predict


class NonFiniteLogits(ValueError):
    """The model gave NaN or infinite logits: its accuracy would be meaningless (NaN ranks first)."""


def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device,
             fixed_batch: Optional[int] = None, progress=None) -> dict:
    """Accuracy of `predict` over `loader` (batches of `imagepiece.data.collate_readable`: images,
    targets and the files that did not decode, which are counted and named, never scored).

    Args:
        fixed_batch: a static-batch artifact accepts only this batch size: a short last batch is
            padded with copies of its last image and the padding's logits are dropped.
        progress: an optional tqdm-like object updated per batch.
    Raises NonFiniteLogits for a model whose logits are NaN or infinite (diverged weights).
    "img_per_s" leaves out the first call, which pays one-time costs (an artifact's first run took 1.4 s
    where later ones took 0.04 s), unless it was the only one; "top5" is top-min(5, classes) ("top_k").
    """
    correct1 = correct5 = seen = 0
    top_k = 5
    unreadable = []
    model_seconds = 0.0
    first_call = None  # (seconds, images)
    started = time.perf_counter()
    for images, targets, failed in loader:
        unreadable += failed
        if progress is not None:
            progress.update(len(failed))
        if images is None:
            continue
        count = images.shape[0]
        if fixed_batch is not None and count < fixed_batch:
            images = torch.cat([images, images[-1:].expand(fixed_batch - count, -1, -1, -1)])
        images = images.to(device, non_blocking=True).contiguous()
        begin = time.perf_counter()
        logits = torch.as_tensor(predict(images))[:count]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - begin
        first_call = first_call or (elapsed, count)
        model_seconds += elapsed
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits(f"the model's logits are not finite (NaN or infinite) on images {seen}..{seen + count - 1}: "
                                  "its weights have diverged or overflow at this precision, so no accuracy can be given")
        top_k = min(5, logits.shape[1])
        top = logits.float().topk(top_k, dim=1).indices.cpu()
        targets = targets.view(-1, 1)
        correct1 += int((top[:, :1] == targets).sum())
        correct5 += int((top == targets).any(dim=1).sum())
        seen += count
        if progress is not None:
            progress.update(count)
    later_calls = first_call is not None and seen > first_call[1]
    timed_seconds, timed_images = (model_seconds - first_call[0], seen - first_call[1]) if later_calls else (model_seconds, seen)
    return {
        "images": seen,
        "top1": 100.0 * correct1 / max(seen, 1),
        "top5": 100.0 * correct5 / max(seen, 1),
        "top_k": top_k,
        "unreadable": [{"path": path, "error": error} for path, error in unreadable],
        "model_seconds": model_seconds,
        "total_seconds": time.perf_counter() - started,
        "img_per_s": timed_images / timed_seconds if timed_seconds > 0 else float("nan"),
    }


def logit_agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far [N, classes] `logits` are from `reference` (e.g. int8 or bf16 against fp32): top-1 agreement
    (images), the largest and the median per-image max |difference|, and the mean cosine similarity."""
    logits, reference = logits.float().cpu(), reference.float().cpu()
    deviation = (logits - reference).abs().amax(dim=1)
    return {"images": len(reference), "top1_agree": int((logits.argmax(1) == reference.argmax(1)).sum()),
            "max_abs_logit_diff": float(deviation.max()), "median_abs_logit_diff": float(deviation.median()),
            "cosine_mean": float(torch.nn.functional.cosine_similarity(logits, reference).mean())}
