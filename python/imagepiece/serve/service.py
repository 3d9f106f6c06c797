"""An artifact behind a dynamic batcher: image file bytes -> the artifact's input -> logits -> top-k.

Framework-free (the HTTP layer is app.py), so the same object serves a test, a benchmark or another
front end. `prepare` is the per-request CPU work (decode + resize/crop + normalise, run in a thread
pool: Pillow and torch release the GIL); `submit` hands the prepared image to the
`ip_runtime.Batcher`, which groups concurrent requests into one run of the model.
"""
from __future__ import annotations

import concurrent.futures
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

import ip_runtime
from imagepiece.artifact import INPUT_DTYPES
from imagepiece.predict.decode import DEFAULT_MAX_PIXELS, decode_rgb_bytes
from imagepiece.predict.labels import class_names
from imagepiece.predict.preprocess import Preprocess, normalise
from imagepiece.predict.rows import round_prob

MiB = 1 << 20


@dataclass
class ServeConfig:
    """What `scripts/serve.py` sets. Batcher fields as in ip_runtime.Batcher (max_batch 0: the artifact's largest)."""

    artifact: Path
    device: str = ""
    topk: int = 5
    labels: Optional[Path] = None
    max_batch: int = 0
    max_delay_ms: float = 1.0
    queue_capacity: int = 128
    preferred_batches: List[int] = field(default_factory=list)
    max_upload_bytes: int = 20 * MiB
    # Uploads are buffered whole before their decode: all those in progress together may hold this much (beyond it,
    # 503), or --max-connections clients each sending just under the upload limit would hold 1000 x 20 MiB.
    max_buffered_bytes: int = 512 * MiB
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_threads: int = 2
    # An upload that sends nothing for this long, or a request head not complete within it, gets 408 and its
    # connection closed.
    read_timeout_s: float = 30.0
    # After that grace, an upload must keep arriving at this many bytes/s on average (Apache mod_reqtimeout's
    # minrate is 500): a client that trickles a byte now and then gets 408 instead of keeping its connection.
    min_upload_rate: float = 1024.0
    # However fast it keeps arriving, an upload that takes longer gets 408: what has arrived would otherwise buy a
    # trickling client hours at the minimum rate, holding its buffer.
    upload_timeout_s: float = 300.0
    warmup: bool = True


# The Batcher's own names for what the command line calls by its flags (its errors name the former).
BATCHER_FLAGS = {"max_batch": "--max-batch", "max_delay_ms": "--max-delay-ms", "queue_capacity": "--queue-capacity",
                 "preferred_batches": "--preferred-batch"}


def in_flag_names(message: str) -> str:
    """A Batcher's message in the server's words (its flags), as the server's own messages name them."""
    return re.sub(r"\b(" + "|".join(BATCHER_FLAGS) + r")\b", lambda match: BATCHER_FLAGS[match.group(1)], message)


class BatcherOptionError(ValueError):
    """ServeConfig's batching fields (max_batch, max_delay_ms, queue_capacity, preferred_batches) that the artifact
    cannot take; the message names them as ip_runtime.Batcher does."""


class ClassificationService:
    """One artifact (one `ip_runtime.Runtime`) and its `ip_runtime.Batcher`; thread-safe."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.runtime = ip_runtime.Runtime(str(config.artifact), device=config.device)
        info = self.runtime.info
        metadata = info["metadata"]
        self.model_name = str(info["model_name"])
        self.num_classes = int(info["num_classes"])
        if config.topk > self.num_classes:  # a request may not ask for more either (400)
            raise ValueError(f"--topk {config.topk} is more than the {self.num_classes} classes of {config.artifact.name}")
        self.names = class_names(metadata, config.labels)
        self.preprocessing = metadata["preprocessing"]
        self.preprocess = Preprocess(self.preprocessing, metadata["input_shape"])
        self.dtype = INPUT_DTYPES[info["dtype"]]
        self.takes_pixels = info["input_format"] == "uint8_nhwc"  # normalisation compiled in
        try:
            self.batcher = ip_runtime.Batcher(self.runtime, max_batch=config.max_batch, max_delay_ms=config.max_delay_ms,
                                              queue_capacity=config.queue_capacity, preferred_batches=config.preferred_batches)
        except ip_runtime.Error as error:  # the only errors that name the batching fields, for a front end to respell
            raise BatcherOptionError(str(error)) from None
        if config.warmup:  # the first run initialises the model: not on a client's time (nor in the batcher's stats)
            # Decoded under the default pixel limit: a --max-pixels below the warm-up picture is about uploads.
            image = self.model_input(self.preprocess(decode_rgb_bytes(_grey_png())))
            self.runtime.run(image.expand(int(info["batch_min"]), *image.shape).contiguous())

    def prepare(self, data: bytes) -> torch.Tensor:
        """An image file's bytes -> the artifact's input row; ImageError for a file that is not a usable image."""
        pixels = self.preprocess(decode_rgb_bytes(data, self.config.max_pixels), self.config.max_pixels)
        return self.model_input(pixels)

    def model_input(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> [3, H, W] normalised, as predict's Classifier feeds a float artifact.
        (An artifact that takes uint8 pixels with the normalisation compiled in takes `pixels` as they are.)"""
        if self.takes_pixels:
            return torch.from_numpy(pixels)
        batch = normalise(torch.from_numpy(pixels).unsqueeze(0), self.preprocessing["mean"], self.preprocessing["std"], self.dtype)
        return batch[0]

    def submit(self, image: torch.Tensor) -> concurrent.futures.Future:
        """The future logits row of a prepared image; raises ip_runtime.Error (`overloaded`, `cancelled`) at once."""
        return self.batcher.submit(image)

    def top_k(self, logits: torch.Tensor, k: Optional[int] = None) -> List[Dict]:
        """Best first: [{"index", "label", "probability"}]."""
        k = min(k or self.config.topk, self.num_classes)
        top = torch.softmax(logits.float(), dim=0).topk(k)
        return [{"index": index, "label": self.names[index], "probability": round_prob(prob)}
                for index, prob in zip(top.indices.tolist(), top.values.tolist())]

    def expedite(self) -> None:
        """A graceful shutdown began: no image waits for its batch to fill any more; new ones are still taken."""
        self.batcher.expedite()

    def close(self, drain: bool = True) -> None:
        self.batcher.close(drain)


def _grey_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()
