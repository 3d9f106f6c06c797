"""ImagePiece: static-shape token-reduced DeiTs (ImagePiece, ToMe, EViT) for AOT compilation.

Importing this package registers `{method}_{arch}` names in timm's model registry.
"""
from .config import METHODS, PRESETS, BlockSchedule, ReductionConfig, format_schedule, token_schedule
from .model import ARCHS, ImagePieceViT, create_model, parse_model_name
from .weights import CheckpointError, load_checkpoint

__version__ = "0.1.0"

__all__ = [
    "ARCHS",
    "METHODS",
    "PRESETS",
    "BlockSchedule",
    "CheckpointError",
    "ImagePieceViT",
    "ReductionConfig",
    "create_model",
    "format_schedule",
    "load_checkpoint",
    "parse_model_name",
    "token_schedule",
]
