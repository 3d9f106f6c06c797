"""An artifact as a classifier of uint8 image batches: top-k class indices and probabilities.

Owns one `ip_runtime.Runtime` and everything that depends on the artifact: its batch range (any
number of images is cut into runs of `batch`; a static-batch artifact gets its last short run padded
and the padding's logits dropped), its input dtype, its device (on CUDA the uint8 batch is staged in
pinned memory, copied asynchronously, and normalised on the GPU) and its preprocessing numbers.
Used by the single-process pipeline and by each Ray actor alike.

An artifact that takes uint8 [B, H, W, 3] pixels (input_format "uint8_nhwc", `aot_compile.py
--input-format uint8`: normalisation compiled in) gets the (staged) uint8 batch as it is: no float
work on the host, and on CUDA 4x fewer bytes cross the bus.
"""
from __future__ import annotations

import time
from typing import Optional, Tuple

import numpy as np
import torch

import ip_runtime
from imagepiece.artifact import INPUT_DTYPES
from imagepiece.artifact_metadata import example_images

from .preprocess import Preprocess, normalise

DEFAULT_BATCH = 32


def choose_batch(batch_range: dict, requested: Optional[int] = None) -> int:
    """The batch to run: a static artifact's own; for a dynamic one `requested` (default 32) within its range."""
    if not batch_range["dynamic"]:
        return int(batch_range["max"])
    return max(int(batch_range["min"]), min(requested or DEFAULT_BATCH, int(batch_range["max"])))


class Classifier:
    def __init__(self, artifact: str, topk: int = 5, batch: Optional[int] = None, device: str = "") -> None:
        self.runtime = ip_runtime.Runtime(str(artifact), device=device)
        info = self.runtime.info
        self.metadata = info["metadata"]
        self.device = torch.device(self.runtime.options.device)
        self.dtype = INPUT_DTYPES[info["dtype"]]
        self.takes_pixels = info["input_format"] == "uint8_nhwc"
        self.num_classes = int(info["num_classes"])
        self.topk = max(1, min(topk, self.num_classes))
        self.batch_min = int(info["batch_min"])
        self.batch = choose_batch(info["metadata"]["batch"], batch)
        self.preprocessing = self.metadata["preprocessing"]
        self.input_shape = tuple(self.metadata["input_shape"])
        self._staging = None
        if self.device.type == "cuda":
            channels, height, width = self.input_shape
            self._staging = torch.empty((self.batch, height, width, channels), dtype=torch.uint8).pin_memory()
        self.inference_seconds = 0.0

    def preprocess(self) -> Preprocess:
        """The per-image resize/crop this artifact was compiled for."""
        return Preprocess(self.preprocessing, self.input_shape)

    def example_input(self) -> torch.Tensor:
        """A ready model input of `batch` images (what `runtime.run` takes), for model-only timing."""
        return example_images(self.runtime.info, self.batch).to(self.device)

    def _model_input(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [n, H, W, 3] (n <= batch) -> the artifact's input, padded to a size it accepts."""
        count = len(pixels)
        padded = max(count, self.batch_min)
        if self._staging is not None:
            staged = self._staging[:padded]
            staged[:count] = torch.from_numpy(pixels)
            staged[count:] = 0
            batch = staged.to(self.device, non_blocking=True)
        else:
            batch = torch.from_numpy(pixels)
            if padded > count:
                batch = torch.cat([batch, batch.new_zeros((padded - count, *batch.shape[1:]))])
        if self.takes_pixels:
            return batch
        return normalise(batch, self.preprocessing["mean"], self.preprocessing["std"], self.dtype)

    def classify(self, pixels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 [n, H, W, 3] -> (class indices [n, k] int64, probabilities [n, k] float32), best first."""
        classes, probs = [], []
        for start in range(0, len(pixels), self.batch):
            chunk = pixels[start : start + self.batch]
            began = time.perf_counter()
            logits = self.runtime.run(self._model_input(chunk))[: len(chunk)]
            top = torch.softmax(logits.float(), dim=1).topk(self.topk, dim=1)
            classes.append(top.indices.cpu().numpy())
            probs.append(top.values.cpu().numpy())
            self.inference_seconds += time.perf_counter() - began
        if not classes:
            return np.zeros((0, self.topk), np.int64), np.zeros((0, self.topk), np.float32)
        return np.concatenate(classes), np.concatenate(probs)
