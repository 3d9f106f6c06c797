"""ImagePiece: static-shape token-reduced DeiTs (ImagePiece, ToMe, EViT) for AOT compilation.

Importing this package registers `{method}_{arch}` names in timm's model registry.

Imported before torch, it also makes waiting OpenMP threads sleep instead of spin
(OMP_WAIT_POLICY=PASSIVE) unless the environment already says how they should wait: on a machine whose
cores are shared with other processes, spinning threads made a compiled DeiT-S several times slower (6.9x
with two busy neighbours on 2 cores), and sleeping costs 8% alone (`python -m imagepiece.bench contention`,
benchmarks/README.md). Set OMP_WAIT_POLICY=ACTIVE to spin.
"""
import os as _os
import sys as _sys

if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read once, when torch loads OpenMP (libgomp)
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
