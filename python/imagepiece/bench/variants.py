"""The models compared: plain DeiT and the reduction presets, all with the same weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import timm
import torch

from ..config import PRESETS, ReductionConfig, token_schedule
from ..model import create_model

BASELINE = "plain"
DEFAULT_ARCH = "deit_small_patch16_224"


@dataclass(frozen=True)
class Variant:
    name: str  # a key of imagepiece.config.PRESETS
    label: str

    def tokens_per_block(self) -> List[int]:
        return [row.tokens_in for row in token_schedule(ReductionConfig(**PRESETS[self.name]))]


VARIANTS: Dict[str, Variant] = {
    "plain": Variant("plain", "DeiT (plain)"),
    "tome": Variant("tome", "ToMe r=13"),
    "evit": Variant("evit", "EViT keep 0.7"),
    "imagepiece": Variant("imagepiece", "ImagePiece"),
    "imagepiece_hyper": Variant("imagepiece_hyper", "ImagePiece hyper-speed"),
    "imagepiece_sum": Variant("imagepiece_sum", "ImagePiece, summed scores"),
}
DEFAULT_VARIANTS = ["plain", "tome", "evit", "imagepiece", "imagepiece_hyper"]


def build_models(arch: str, names: List[str], seed: int = 0) -> Dict[str, Dict[str, torch.nn.Module]]:
    """For each variant: {"timm": timm's model (plain DeiT only), "ours": our model}; shared weights.

    Plain DeiT runs as timm's own model on the eager and torch.compile paths (what a user would pick)
    and as our `method="plain"` model where it must be exported (identical outputs, tested).
    """
    torch.manual_seed(seed)
    reference = timm.create_model(arch).eval()
    models: Dict[str, Dict[str, torch.nn.Module]] = {}
    for name in names:
        ours = create_model(arch, **PRESETS[name])
        ours.load_state_dict(reference.state_dict())
        models[name] = {"ours": ours}
        if name == BASELINE:
            models[name]["timm"] = reference
    return models
