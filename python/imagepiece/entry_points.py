"""The console scripts pyproject.toml installs (and scripts/predict.py, serve.py): each imports its command only here,
so that an optional package the command lacks is one line naming the extra to install, not an import traceback."""
from __future__ import annotations

from .command_line import run_entry_point


def predict() -> int:
    return run_entry_point("imagepiece.predict.cli", "imagepiece-predict")


def serve() -> int:
    return run_entry_point("imagepiece.serve.cli", "imagepiece-serve")
