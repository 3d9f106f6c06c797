"""The check every mode that takes a compiled artifact (--artifact, --so, ...) runs on it in its `check`: a missing
file, a file that is no artifact, another device or a batch it cannot run are refused before any work, in one line
(argparse's error, exit 2), and the results are named after the model the artifact holds."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from ..artifact import ArtifactError, read_metadata
from ..config import PRESETS, ReductionConfig


def checked_metadata(parser: argparse.ArgumentParser, option: str, path: Path, device: str,
                     batch: Optional[int] = None) -> dict:
    """The metadata of the artifact at `path` (given as `option`), or parser.error; `batch`: one the run will use."""
    if not path.is_file():
        parser.error(f"{option} {str(path)!r} is not a file")
    try:
        metadata = read_metadata(path)
    except (ArtifactError, OSError) as error:
        parser.error(f"{option}: {error}")
    if metadata["device_type"] != torch.device(device).type:
        parser.error(f"{option} was compiled for {metadata['device_type']}, not --device {device}")
    low, high = metadata["batch"]["min"], metadata["batch"]["max"]
    if batch is not None and not low <= batch <= high:
        parser.error(f"--batch {batch} is outside the batch range {low}..{high} of {option} {str(path)!r}; give a --batch in it")
    return metadata


def model_differences(first: dict, second: dict) -> list:
    """What makes two artifacts' models differ (their metadata's names), [] for the same model and weights;
    batch, input format, device and file format may differ."""
    differing = [key for key in ("arch", "method", "config", "num_classes", "precision") if first.get(key) != second.get(key)]
    if first["checkpoint"]["sha256"] != second["checkpoint"]["sha256"]:
        differing.append("checkpoint")
    return differing


CUSTOM = "custom"  # the label of an artifact's reduction setting that no preset has


def preset_of(metadata: dict) -> str:
    """The PRESETS name whose reduction setting the artifact's model has, else CUSTOM: its method alone would name
    imagepiece_hyper and imagepiece_sum artifacts "imagepiece"."""
    config = metadata["config"]
    for name, preset in PRESETS.items():
        # depth and the patch count come from the arch, not the preset; JSON: tuples are lists in metadata
        expected = ReductionConfig(**preset, depth=config["depth"], num_patches=config["num_patches"]).to_dict()
        if json.loads(json.dumps(expected)) == config:
            return name
    return CUSTOM


def name_after_artifact(args: argparse.Namespace, metadata: dict) -> None:
    """Results are labelled with --arch and --preset; an artifact may hold another model than their defaults."""
    args.arch, args.preset = metadata["arch"], preset_of(metadata)
