"""Single-process predict: decode threads feeding a model thread through a bounded window.

Decoding and resizing run in a pool of threads (Pillow releases the GIL in both) while the calling
thread runs the model (`ip_runtime.Runtime.run` releases it too), so the two overlap. At most
`window` images are decoded ahead of the model, so memory stays bounded on a billion-file input.
Rows come out in input order: error rows wait with the images around them until the batch holding
those images has been classified; an error does not shrink a batch (the images after it fill it). Only
where MAX_HELD_ROWS rows pile up before a batch fills (a long run of unreadable files) are they let
go, and the few images among them classified as a short batch.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .classifier import Classifier
from .decode import DEFAULT_MAX_PIXELS, ImageError, decode_rgb
from .preprocess import Preprocess
from .rows import Row, prediction_rows
from .sources import InputItem

MAX_HELD_ROWS = 4096
DECODE_NICENESS = 10
Prepared = Tuple[Optional[np.ndarray], str, float]  # (uint8 [H, W, 3] or None, error, seconds spent)


@dataclass
class RunStats:
    """What a run did. `decode_seconds` is CPU time summed over the decode threads (work, not wall time);
    `inference_seconds` is the model's wall time (normalising the batch included). None where not
    measured (on Ray they are spread over workers: see Ray Data's own stats)."""

    images: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    decode_seconds: Optional[float] = 0.0
    inference_seconds: Optional[float] = 0.0

    def summary(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        skipped = f", {self.skipped} already done" if self.skipped else ""
        line = f"{self.images} images ({self.errors} errors{skipped}) in {self.seconds:.1f} s: {rate:.1f} img/s"
        if self.decode_seconds is not None and self.inference_seconds is not None:
            line += (f"; decode+resize {self.decode_seconds:.1f} s (summed over workers), "
                     f"inference {self.inference_seconds:.1f} s")
        return line


class ImagePreparer:
    """location -> (uint8 [H, W, 3], "", seconds), or (None, error message, seconds): never raises."""

    def __init__(self, preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __call__(self, location: str) -> Prepared:
        began = time.thread_time()  # CPU time: a decode thread waiting for a core is not decoding
        try:
            pixels, error = self.preprocess(decode_rgb(location, self.max_pixels), self.max_pixels), ""
        except ImageError as failure:
            pixels, error = None, str(failure)
        except Exception as failure:  # one strange file must not end a long run
            pixels, error = None, f"cannot preprocess ({type(failure).__name__}: {failure})"
        return pixels, error, time.thread_time() - began


def _yield_to_the_model() -> None:
    # Where decode threads and the model's threads share the cores (a CPU artifact), a decode thread
    # that preempts one of the model's OpenMP threads stalls the other at the next barrier. At a
    # lower priority (Linux: per thread) decoding takes the cycles the model leaves idle instead,
    # and still gets whole cores whenever the model waits for images. Spare cores: no difference.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: plain priority
        pass


def prepared_in_order(items: Iterable[InputItem], prepare: Callable[[str], Prepared], workers: int,
                      window: int) -> Iterator[Tuple[InputItem, Prepared]]:
    """`prepare(item.location)` for each item, `workers` at a time, at most `window` ahead, in order."""
    if workers <= 0:
        for item in items:
            yield item, prepare(item.location)
        return
    pending: deque = deque()
    source = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode", initializer=_yield_to_the_model) as pool:
        try:
            for item in source:
                pending.append((item, pool.submit(prepare, item.location)))
                if len(pending) >= window:
                    done_item, future = pending.popleft()
                    yield done_item, future.result()
            while pending:
                done_item, future = pending.popleft()
                yield done_item, future.result()
        finally:
            for _, future in pending:  # stopped early (error, Ctrl-C): do not decode the rest
                future.cancel()


def predict_items(items: Iterable[InputItem], classifier: Classifier, names: List[str], workers: int = 2,
                  max_pixels: int = DEFAULT_MAX_PIXELS, stats: Optional[RunStats] = None) -> Iterator[List[Row]]:
    """Rows for `items`, yielded a batch at a time (the batch's images plus the error rows among them)."""
    stats = stats if stats is not None else RunStats()
    prepare = ImagePreparer(classifier.preprocess(), max_pixels)
    window = max(2 * classifier.batch, 4 * workers)
    began, inference_before = time.perf_counter(), classifier.inference_seconds
    rows: List[Optional[Row]] = []
    images: List[np.ndarray] = []
    slots: List[Tuple[int, str]] = []  # (index in rows, path) of each image in `images`

    def flush() -> List[Row]:
        if images:
            classes, probs = classifier.classify(np.stack(images))
            for (index, _), row in zip(slots, prediction_rows([p for _, p in slots], classes, probs, names)):
                rows[index] = row
        done = list(rows)
        for held in (rows, images, slots):
            held.clear()
        stats.images += len(done)
        stats.inference_seconds = classifier.inference_seconds - inference_before
        stats.seconds = time.perf_counter() - began
        return done

    for item, (pixels, error, seconds) in prepared_in_order(items, prepare, workers, window):
        stats.decode_seconds += seconds
        if pixels is None:
            stats.errors += 1
            rows.append(Row(item.path, error=error))
        else:
            slots.append((len(rows), item.path))
            rows.append(None)
            images.append(pixels)
            if len(images) == classifier.batch:
                yield flush()
        if len(rows) >= MAX_HELD_ROWS:  # a long run of unreadable files: do not hold them all
            yield flush()
    if rows:
        yield flush()
