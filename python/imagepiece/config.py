"""Token-reduction configuration and the static per-block token schedule it implies.

Every token count in the model is a Python int derived here, before any tensor exists, so
`torch.export` sees static shapes and the artifact metadata can store the schedule verbatim.

Counting conventions (used by `token_schedule` and by the model, which must agree):
  * N is the number of tokens entering a block, [CLS] included; n = N - 1 are "image tokens".
    After the first pruned block, EViT's fused token is an ordinary image token from then on.
  * ImagePiece: k = floor(p * n) bottom candidates, r = floor(merge_ratio * n) merges.
  * ToMe: r = min(tome_r, n // 2) merges per block (ToMe clamps r the same way).
  * Pruning (EViT and ImagePiece), after any merging in that block: keep ceil(keep_rate * n')
    of the n' image tokens left, fuse the other `pruned` ones into one new token.
With the defaults this gives DeiT-S the design card's schedule 197 182 168 155 116 107 99 75 70 65
50 47 (44 leave the last block). Counts are Python ints, so every image of a batch reduces by the
same amount (what a static-shape artifact needs); which tokens go is decided per image.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

METHODS = ("plain", "tome", "evit", "imagepiece")
LCB_VARIANTS = (None, "stem", "residual")
# Command lines cannot say None: "none" stands for it there (see `lcb_from_cli`).
LCB_CHOICES = ("none", "stem", "residual")
REEVALUATIONS = ("attention", "sum")
DEFAULT_KEEP_RATE = {"evit": 0.7, "imagepiece": 0.8, "plain": 1.0, "tome": 1.0}
DEFAULT_PRUNE_BLOCKS = (3, 6, 9)

# Named settings: the published baselines and a faster ImagePiece. "imagepiece_hyper" trades accuracy
# for speed (about 40% of plain DeiT's tokens per block instead of 56%), in the spirit of the paper's
# hyper-speed experiments, whose exact settings are not published. "imagepiece_sum" scores pieces
# for pruning by summing their parts' attention instead of re-evaluating it (to measure what the
# paper's step 3 costs and changes).
PRESETS = {
    "plain": dict(method="plain"),
    "tome": dict(method="tome", tome_r=13),
    "evit": dict(method="evit", keep_rate=0.7),
    "imagepiece": dict(method="imagepiece"),
    "imagepiece_hyper": dict(method="imagepiece", p=0.4, merge_ratio=0.15, keep_rate=0.7),
    "imagepiece_sum": dict(method="imagepiece", reevaluation="sum"),
}

# The fields only some methods read (the rest of the model ignores them): overriding one for another
# method would change nothing but the metadata's record, so callers refuse that (`fields_without_effect`).
FIELDS_READ_BY = {"p": ("imagepiece",), "merge_ratio": ("imagepiece",), "reevaluation": ("imagepiece",),
                  "tome_r": ("tome",), "keep_rate": ("evit", "imagepiece"), "prune_blocks": ("evit", "imagepiece"),
                  "prop_attn": ("tome", "imagepiece")}  # only merged tokens have sizes to weigh

# floor/ceil of products such as 0.08 * 75 must not fall on the wrong side of an integer
# because of binary rounding (0.07 * 100 == 7.000000000000001).
_ROUNDING_SLACK = 1e-9


def _floor(fraction: float, count: int) -> int:
    return math.floor(fraction * count + _ROUNDING_SLACK)


def _ceil(fraction: float, count: int) -> int:
    return math.ceil(fraction * count - _ROUNDING_SLACK)


@dataclass(frozen=True)
class BlockSchedule:
    """Token bookkeeping of one transformer block.

    `pruned` image tokens are dropped into one fused token (so `fused` is 1 where pruning happens):
    tokens_out = tokens_in - merged - pruned + fused.
    """

    tokens_in: int
    candidates: int  # ImagePiece's bottom-k non-semantic candidates (0 for other methods)
    merged: int
    pruned: int
    fused: int
    tokens_out: int


@dataclass(frozen=True)
class ReductionConfig:
    """How a DeiT reduces its tokens; validated on construction.

    Args:
        method: "plain" (DeiT, no reduction), "tome" (ToMe, r merges per block), "evit" (EViT pruning
            with a fused token) or "imagepiece" (re-tokenization in every block plus EViT-style pruning).
        p: ImagePiece's fraction of image tokens treated as non-semantic merge candidates.
        merge_ratio: ImagePiece's merges per block as a fraction of image tokens; at most p / 2,
            because each merge consumes one A and one B candidate.
        keep_rate: fraction of image tokens kept where pruning happens; None picks the method's
            published default (EViT 0.7, ImagePiece 0.8).
        prune_blocks: 0-indexed blocks that prune (EViT and ImagePiece only).
        tome_r: ToMe's merges per block.
        lcb: Local Coherence Bias: None, "stem" (convolutional stem, must be trained) or
            "residual" (zero-initialised residual convs after the patch embedding).
        prop_attn: proportional attention (+log(size) on the attention logits) for merged tokens.
        reevaluation: how ImagePiece scores tokens for pruning after merging them (its step 3):
            "attention" recomputes the [CLS] attention row over the merged tokens (the paper's
            re-evaluation; see `reduce.reevaluate`), "sum" gives a merged piece the sum of its parts'
            scores and leaves every other score as it was (cheaper, an approximation).
        depth: number of transformer blocks the schedule covers.
        num_patches: image tokens entering the first block (196 for 224px, 16px patches).
    """

    method: str = "imagepiece"
    p: float = 0.3
    merge_ratio: float = 0.08
    keep_rate: Optional[float] = None
    prune_blocks: Tuple[int, ...] = DEFAULT_PRUNE_BLOCKS
    tome_r: int = 13
    lcb: Optional[str] = None
    prop_attn: bool = True
    reevaluation: str = "attention"
    depth: int = 12
    num_patches: int = 196

    def __post_init__(self) -> None:
        # Normalise before validating so that lists from a CLI or JSON compare equal to tuples.
        object.__setattr__(self, "prune_blocks", tuple(self.prune_blocks))
        if self.keep_rate is None:
            object.__setattr__(self, "keep_rate", DEFAULT_KEEP_RATE.get(self.method, 1.0))
        self._validate()

    def _validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.lcb not in LCB_VARIANTS:
            raise ValueError(f"lcb must be one of {LCB_VARIANTS}, got {self.lcb!r}")
        if self.reevaluation not in REEVALUATIONS:
            raise ValueError(f"reevaluation must be one of {REEVALUATIONS}, got {self.reevaluation!r}")
        _require_int("depth", self.depth, 1, 1000)
        _require_int("num_patches", self.num_patches, 4, 1_000_000)
        _require_int("tome_r", self.tome_r, 0, self.num_patches // 2)
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn must be a bool, got {self.prop_attn!r}")
        if not (isinstance(self.p, (int, float)) and 0.0 < self.p < 1.0):
            raise ValueError(f"p must be in (0, 1), got {self.p!r}")
        if not (isinstance(self.merge_ratio, (int, float)) and 0.0 <= self.merge_ratio <= self.p / 2):
            raise ValueError(
                f"merge_ratio must be in [0, p/2] = [0, {self.p / 2:g}] (each merge uses one A and one B "
                f"candidate out of the p fraction), got {self.merge_ratio!r}"
            )
        if not (isinstance(self.keep_rate, (int, float)) and 0.0 < self.keep_rate <= 1.0):
            raise ValueError(f"keep_rate must be in (0, 1], got {self.keep_rate!r}")
        for block in self.prune_blocks:
            _require_int("prune_blocks entries", block, 0, self.depth - 1)
        if list(self.prune_blocks) != sorted(set(self.prune_blocks)):
            raise ValueError(f"prune_blocks must be strictly increasing, got {self.prune_blocks!r}")
        if self.method in ("plain", "tome") and self.keep_rate != 1.0:
            raise ValueError(f"keep_rate must be 1.0 for method {self.method!r} (it does not prune), got {self.keep_rate}")
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        for name, methods in fields_without_effect(self.method, FIELDS_READ_BY).items():
            if name != "keep_rate" and getattr(self, name) != defaults[name]:  # keep_rate: checked above, per method
                raise ValueError(f"{name} has no effect with method {self.method!r} (it applies to {' and '.join(methods)}); "
                                 f"leave it at its default {defaults[name]!r}")

    @property
    def prunes(self) -> bool:
        return self.method in ("evit", "imagepiece") and self.keep_rate < 1.0

    def replace(self, **overrides) -> "ReductionConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config field(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lcb_from_cli(choice: Optional[str]) -> Optional[str]:
    """A command line's `--lcb` choice (one of LCB_CHOICES) as the config value: "none" is None."""
    return None if choice in (None, "none") else choice


def fields_without_effect(method: str, fields) -> dict:
    """Those of `fields` (names) that `method` does not read, each with the methods that do."""
    return {field: FIELDS_READ_BY[field] for field in fields if field in FIELDS_READ_BY and method not in FIELDS_READ_BY[field]}


def _require_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def block_schedule(config: ReductionConfig, block_index: int, tokens_in: int) -> BlockSchedule:
    """What one block does to `tokens_in` tokens under `config` (see the module docstring)."""
    image_tokens = tokens_in - 1
    candidates = merged = 0
    if config.method == "imagepiece":
        candidates = _floor(config.p, image_tokens)
        merged = min(_floor(config.merge_ratio, image_tokens), candidates // 2)
    elif config.method == "tome":
        merged = min(config.tome_r, image_tokens // 2)
    image_tokens -= merged

    pruned = fused = 0
    if config.prunes and block_index in config.prune_blocks:
        kept = max(1, _ceil(config.keep_rate, image_tokens))
        if kept < image_tokens:
            pruned, fused = image_tokens - kept, 1
    tokens_out = tokens_in - merged - pruned + fused
    return BlockSchedule(tokens_in, candidates, merged, pruned, fused, tokens_out)


def token_schedule(config: ReductionConfig) -> Tuple[BlockSchedule, ...]:
    """Per-block token bookkeeping, computed from the config alone."""
    tokens = config.num_patches + 1
    schedule = []
    for index in range(config.depth):
        block = block_schedule(config, index, tokens)
        schedule.append(block)
        tokens = block.tokens_out
    return tuple(schedule)


def format_schedule(schedule: Tuple[BlockSchedule, ...]) -> str:
    """A small table for CLIs: one row per block."""
    rows = ["block  tokens_in  candidates  merged  pruned(+fused)  tokens_out"]
    for index, block in enumerate(schedule):
        pruned = f"{block.pruned}(+{block.fused})" if block.fused else "0"
        rows.append(
            f"{index:>5}  {block.tokens_in:>9}  {block.candidates:>10}  {block.merged:>6}  {pruned:>14}  {block.tokens_out:>10}"
        )
    share = sum(b.tokens_in for b in schedule) / (schedule[0].tokens_in * len(schedule))
    rows.append(f"tokens per block: {share:.0%} of the plain model's {schedule[0].tokens_in}")
    return "\n".join(rows)
