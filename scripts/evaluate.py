#!/usr/bin/env python
"""Top-1/top-5 accuracy and img/s on an ImageNet-style validation folder (one sub-folder per class).

Runs the eager PyTorch model, or a compiled artifact through the C++ runtime (`--artifact`), with timm's
evaluation transform (resize, centre crop, mean/std) from the model's pretrained config, or from the
artifact's metadata. Both ways give the same numbers for the same weights.

examples:
  python scripts/evaluate.py --data imagenet/val --checkpoint deit_small_patch16_224-cd65a155.pth
  python scripts/evaluate.py --data imagenet/val --artifact deit_s_ip.so --json result.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

import imagepiece
import ip_runtime
from imagepiece import CheckpointError, create_model
from imagepiece.artifact import DTYPES, ArtifactError, read_metadata
from imagepiece.command_line import OneLineErrors
from imagepiece.config import LCB_CHOICES, PRESETS, lcb_from_cli
from imagepiece.data import DatasetError, check_num_classes, class_names, collate_readable, describe_class_differences, eval_transform, image_folder, preprocessing_config, spread_subset
from imagepiece.environment import device_problem, machine_info
from imagepiece.evaluation import NonFiniteLogits, eager_predictor, evaluate
from imagepiece.files import atomic_write_text, check_output_file
from imagepiece.predict.decode import DEFAULT_MAX_PIXELS
from imagepiece.predict.preprocess import pixels_of
from imagepiece.termination import STOPPED, exit_status, how_stopped, sigterm_unwinds
from imagepiece.weights import fill_model_flags, fine_tuned_flags, fine_tuned_settings, reduction_difference

MIN_CROP_PCT = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrors(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="validation folder: <data>/<class>/<image>")
    parser.add_argument("--artifact", type=Path, help="a compiled .so/.pt2: evaluate it through ip_runtime")
    # The eager model's; None until parsed, so that one given beside --artifact (which has its model inside) is refused.
    # Each defaults to what a fine-tune recorded in --checkpoint (weights.fine_tuned_flags), else to DeiT-S's.
    parser.add_argument("--arch", choices=sorted(imagepiece.ARCHS), help="eager model (default: the fine-tune's, else deit_small_patch16_224)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="eager model's token reduction (default: the fine-tune's, else imagepiece)")
    parser.add_argument("--checkpoint", type=Path, help="weights for the eager model (default: random)")
    parser.add_argument("--num-classes", type=int, help="eager model head size (default: the fine-tune's, else 1000)")
    parser.add_argument("--lcb", choices=LCB_CHOICES, help="eager model's Local Coherence Bias (default: the fine-tune's, else none)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (a static-batch artifact uses its own)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader worker processes decoding images (0: in this process)")
    parser.add_argument("--device", help="where the model runs (default: an --artifact's own device; the eager model: cuda if present, else cpu)")
    parser.add_argument("--limit", type=int, help="evaluate N images spread evenly over the folder, not the whole folder (each class with at least "
                        "images/N images is sampled)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse images with more pixels, before decoding them (default {DEFAULT_MAX_PIXELS:,})")
    pre = parser.add_argument_group("preprocessing (default: the model's / artifact's own)")
    pre.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"])
    pre.add_argument("--crop-pct", type=float)
    pre.add_argument("--mean", type=float, nargs=3)
    pre.add_argument("--std", type=float, nargs=3)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.workers < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--batch and --limit must be >= 1, --workers >= 0")
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.max_pixels < 1:
        parser.error(f"--max-pixels must be >= 1, got {args.max_pixels}")
    eager_only = [f"--{name.replace('_', '-')}" for name in ("arch", "preset", "lcb", "checkpoint", "num_classes")
                  if getattr(args, name) is not None]
    if args.artifact is not None and eager_only:
        parser.error(f"{', '.join(eager_only)} describe the eager model; an --artifact has its model, weights and head inside")
    # Below 0.05 the short side is resized to over 20x the model's input (4480 px for 224): a typo, refused here
    # rather than as every image failing to resize.
    if args.crop_pct is not None and not (math.isfinite(args.crop_pct) and MIN_CROP_PCT <= args.crop_pct <= 1):
        parser.error(f"--crop-pct must be in [{MIN_CROP_PCT}, 1], got {args.crop_pct}")
    # Normalisation runs in float32: 1e-300 is 0 there, 1e308 is inf, and dividing by 1e-39 overflows.
    mean, std = (torch.tensor(values or [], dtype=torch.float64).float() for values in (args.mean, args.std))
    if not (mean.isfinite().all() and std.isfinite().all() and (std > 0).all() and (1 / std).isfinite().all()):
        parser.error("--mean must be finite and --std finite and > 0, in float32")
    problem = device_problem(args.device) if args.device is not None else None
    if problem:
        parser.error(problem)
    return args


def requested_preprocessing(args) -> dict:
    given = {"interpolation": args.interpolation, "crop_pct": args.crop_pct,
             "mean": list(args.mean) if args.mean else None, "std": list(args.std) if args.std else None}
    return {key: value for key, value in given.items() if value is not None}


class Predictor(NamedTuple):
    predict: Callable[[torch.Tensor], torch.Tensor]
    preprocessing: dict
    head_classes: int
    fixed_batch: Optional[int]  # a static-batch artifact's batch
    description: str
    trained_classes: Optional[list]  # the class folders it was fine-tuned on, where its checkpoint or artifact says
    device: torch.device  # where it takes its images


def build_predictor(args) -> Predictor:
    wanted = requested_preprocessing(args)
    if args.artifact is not None:
        metadata = read_metadata(args.artifact)
        preprocessing = dict(metadata["preprocessing"])
        differing = {k: (preprocessing[k], v) for k, v in wanted.items()
                     if (list(preprocessing[k]) if isinstance(v, list) else preprocessing[k]) != v}
        if differing:
            detail = ", ".join(f"{k}: artifact {a!r}, requested {r!r}" for k, (a, r) in differing.items())
            raise ArtifactError("incompatible", f"{args.artifact} was compiled for other preprocessing ({detail})")
        # Without --device, its own: a CPU artifact on a machine with a GPU runs, not refused as built for another device.
        runtime = ip_runtime.Runtime(str(args.artifact), **({"device": args.device} if args.device else {}))
        batch = metadata["batch"]
        fixed = batch["max"] if not batch["dynamic"] else None
        args.batch = batch["max"] if fixed else min(args.batch, batch["max"])
        if metadata["input_format"] == "uint8_nhwc":  # it normalises itself: hand it the pixels timm's transform normalised
            mean, std = preprocessing["mean"], preprocessing["std"]
            predict = lambda images: runtime.run(pixels_of(images, mean, std))  # noqa: E731
        else:
            dtype = DTYPES[metadata["dtype"]]
            predict = lambda images: runtime.run(images.to(dtype))  # noqa: E731
        return Predictor(predict, preprocessing, metadata["num_classes"], fixed, f"ip_runtime {args.artifact.name}",
                         metadata.get("class_names"), torch.device(runtime.options.device))
    fine_tuned = fine_tuned_settings(args.checkpoint) if args.checkpoint else None  # read once: a checkpoint is ~90 MB
    fill_model_flags(args, fine_tuned_flags(fine_tuned))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_model(args.arch, checkpoint=args.checkpoint, lcb=lcb_from_cli(args.lcb), num_classes=args.num_classes, **PRESETS[args.preset]).to(device)
    preprocessing = {**preprocessing_config(model.pretrained_cfg), **wanted}
    difference = reduction_difference(fine_tuned, args.checkpoint, model.reduction_config)
    if difference:
        print(f"evaluate.py: warning: {difference}", file=sys.stderr)
    return Predictor(eager_predictor(model), preprocessing, model.num_classes, None, f"eager {args.arch} {args.preset}",
                     (fine_tuned or {}).get("classes"), device)


def check_trained_classes(trained: Optional[list], model: Path, dataset, root: Path) -> None:
    """A fine-tune's head scores its own class folders, by position: the same count of other folders would be
    scored as if they were those."""
    found = class_names(dataset)
    if trained is not None and trained != found:
        raise DatasetError(f"{str(model)!r} was fine-tuned on other class folders than {str(root)!r} holds "
                           f"({describe_class_differences(trained, found, 'its training')}); its labels would be scored by position")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_unwinds():  # also while the model or the artifact loads: one line then, not a traceback
            return evaluate_and_report(args)
    except STOPPED as stop:  # Ctrl-C or SIGTERM: the loader's worker processes went with the unwinding
        print(f"evaluate.py: {how_stopped(stop)}; nothing written", file=sys.stderr)
        return exit_status(stop)


def evaluate_and_report(args) -> int:
    from tqdm import tqdm

    try:
        if args.json:
            # Inside --data, the result would replace one of the images being evaluated, or join the folder.
            check_output_file(args.json, inputs={"--checkpoint": args.checkpoint, "--artifact": args.artifact},
                              input_folders={"--data": args.data})
        # The limit travels with the dataset into the loader's worker processes, which decode.
        dataset = image_folder(args.data, max_pixels=args.max_pixels)
        predict, preprocessing, head_classes, fixed_batch, description, trained, device = build_predictor(args)
        # The recorded class folders first: their difference names the folders, where a count says only how many.
        check_trained_classes(trained, args.artifact or args.checkpoint, dataset, args.data)
        check_num_classes(dataset, head_classes, args.data, compiled=args.artifact is not None)
    except (ValueError, CheckpointError, DatasetError, ip_runtime.Error) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2

    dataset.transform = eval_transform(preprocessing)
    files = len(dataset)
    if args.limit:
        dataset = spread_subset(dataset, args.limit)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=False, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", collate_fn=collate_readable)
    print(f"evaluating {description} on {len(dataset)} images from {args.data} ({head_classes} classes), batch {args.batch}")
    try:
        with tqdm(total=len(dataset), unit="img", file=sys.stderr) as progress:
            result = evaluate(predict, loader, device, fixed_batch=fixed_batch, progress=progress)
    except NonFiniteLogits as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 1
    for entry in result["unreadable"]:
        print(f"evaluate.py: skipped {entry['path']}: {entry['error']}", file=sys.stderr)
    if not result["images"]:
        print(f"evaluate.py: error: none of the {len(dataset)} files decoded as an image", file=sys.stderr)
        return 1
    # What was evaluated, so that a subset's or another head's figure is never read as the whole folder's.
    given = {"artifact": args.artifact, "checkpoint": args.checkpoint, "limit": args.limit, "batch": args.batch}
    given.update({} if args.artifact else {"arch": args.arch, "preset": args.preset, "lcb": args.lcb, "num_classes": head_classes})
    result.update(model=description, data=str(args.data), settings={key: str(value) if isinstance(value, Path) else value
                                                                  for key, value in given.items()},
                  files=files, preprocessing=preprocessing, machine=machine_info(),
                  created=datetime.datetime.now().isoformat(timespec="seconds"))
    skipped = f"; {len(result['unreadable'])} unreadable files skipped (listed above)" if result["unreadable"] else ""
    top5 = "top-5" if result["top_k"] == 5 else f"top-5 (all {result['top_k']} classes)"
    print(f"top-1 {result['top1']:.2f}%  {top5} {result['top5']:.2f}%  ({result['images']} images, "
          f"{result['img_per_s']:.1f} img/s in the model{skipped})")
    if args.json:
        try:
            atomic_write_text(args.json, json.dumps(result, indent=2))
        except OSError as error:
            print(f"evaluate.py: error: cannot write {args.json}: {error.strerror or error}", file=sys.stderr)
            return 1
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
