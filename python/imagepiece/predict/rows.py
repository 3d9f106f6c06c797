"""One output row per input file: its top-k prediction, or why there is none."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np


@dataclass
class Row:
    """`classes`, `labels`, `probs`: best first, k long; all empty and `error` set when it failed."""

    path: str
    classes: List[int] = field(default_factory=list)
    labels: List[str] = field(default_factory=list)
    probs: List[float] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def round_prob(value: float) -> float:
    """A float32 probability as the shortest double that rounds back to it: 0.12345679, not
    0.12345679104328156. Every output format then stores and reads back exactly the same number."""
    return float(str(np.float32(value)))


def prediction_rows(paths: List[str], classes: np.ndarray, probs: np.ndarray, names: List[str]) -> List[Row]:
    """Rows from a batch's top-k class indices [n, k] and probabilities [n, k]."""
    return [Row(path, [int(c) for c in top], [names[c] for c in top], [round_prob(p) for p in prob])
            for path, top, prob in zip(paths, classes.tolist(), probs)]
