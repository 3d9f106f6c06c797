"""e2e: image files -> predictions through `imagepiece-predict`'s pipeline, beside the model alone.

The measurement is `imagepiece.predict.bench.e2e_benchmark` (its docstring says what each contender
is and how rounds are interleaved); this mode gives it an artifact and writes the results. Without
--artifact it compiles --arch with --preset at a static --batch (random weights: speed does not
depend on them), and with --uint8 also its uint8-input twin (`aot_compile.py --input-format uint8`).
Goal (issue 12) on the 2-core CPU, DeiT-S ImagePiece fp32, batch 8: single-process >= 80% of model-only.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..config import PRESETS
from .artifact_option import checked_metadata, model_differences, name_after_artifact
from .results import ResultsWriter

HELP = "JPEG files -> predictions (single process, and Ray with --ray) beside the same artifact's model-only img/s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", type=Path, help="the artifact to measure, of any precision and input format (default: compile --arch/--preset at --batch)")
    parser.add_argument("--uint8-artifact", type=Path, help="the same model compiled with --input-format uint8, measured beside it")
    parser.add_argument("--uint8", action="store_true", help="without --uint8-artifact: compile the uint8-input twin and measure it too")
    parser.add_argument("--preset", default="imagepiece", choices=sorted(PRESETS), help="model setting to compile (default: imagepiece)")
    parser.add_argument("--batch", type=int, default=8, help="static batch to compile; a dynamic-batch artifact runs at it (default 8)")
    parser.add_argument("--images", type=int, default=400, help="synthetic JPEGs per run (default 400)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[500, 375], metavar=("WIDTH", "HEIGHT"),
                        help="JPEG size (default 500 375, an ImageNet-typical photo)")
    parser.add_argument("--workers", type=int, default=2, help="predict's decode threads (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of model-only and single-process (default 3)")
    parser.add_argument("--ray", action="store_true", help="also run the Ray Data path once (a local Ray)")
    parser.add_argument("--ray-concurrency", type=int, help="Ray model actors (default: one per CPU)")


MAX_JPEG_SIDE = 65500  # libjpeg's largest width or height (the test images are JPEGs)


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..predict.decode import DEFAULT_MAX_PIXELS

    if min(args.batch, args.images, args.rounds, *args.image_size) < 1 or args.workers < 0:
        parser.error("--batch, --images, --rounds and --image-size must be >= 1, --workers >= 0")
    width, height = args.image_size
    if width * height > DEFAULT_MAX_PIXELS:  # predict would refuse every image: nothing would be measured
        parser.error(f"--image-size {width} {height} is {width * height:,} pixels, over predict's limit of {DEFAULT_MAX_PIXELS:,}")
    if max(width, height) > MAX_JPEG_SIDE:
        parser.error(f"--image-size {width} {height}: a JPEG side holds at most {MAX_JPEG_SIDE} pixels")
    if args.images < args.batch:  # model-only would time a whole batch against one padded partial batch
        parser.error(f"--images {args.images} is fewer than one --batch {args.batch}: the two would measure different work")
    if args.ray_concurrency is not None and (args.ray_concurrency < 1 or not args.ray):
        parser.error("--ray-concurrency must be >= 1 and needs --ray")
    if args.uint8 and args.uint8_artifact is not None:
        parser.error("give --uint8 (compile the twin) or --uint8-artifact (use this one), not both")
    # The twin compiled by --uint8 is --arch/--preset's model with random weights: not an --artifact's.
    if args.uint8 and args.artifact is not None:
        parser.error("--uint8 compiles the uint8 twin of --arch/--preset; beside --artifact give --uint8-artifact "
                     "(its model compiled with scripts/aot_compile.py --input-format uint8)")
    if args.uint8_artifact is not None and args.artifact is None:
        parser.error("--uint8-artifact needs --artifact: the same model with float input, to compare it with")
    found = {}
    for name, input_format in (("artifact", None), ("uint8_artifact", "uint8_nhwc")):
        given, option = getattr(args, name), f"--{name.replace('_', '-')}"
        if given is None:
            continue
        given = Path(given).absolute()  # recorded in the results: a relative path names no file later
        setattr(args, name, given)
        # --batch is checked, not clamped: the results would name a batch the run did not use
        metadata = checked_metadata(parser, option, given, args.device, batch=args.batch)
        if input_format is not None and metadata["input_format"] != input_format:
            parser.error(f"{option} must take {input_format} input (scripts/aot_compile.py --input-format uint8); "
                         f"{str(given)!r} takes {metadata['input_format']}")
        found[name] = metadata
    differing = model_differences(found["artifact"], found["uint8_artifact"]) if len(found) == 2 else []
    if differing:
        parser.error(f"--uint8-artifact holds another model than --artifact (they differ in {', '.join(differing)}): "
                     "it would not be its twin")
    if "artifact" in found:  # the results are named after the model measured, not --arch's default
        name_after_artifact(args, found["artifact"])


def _compiled(args: argparse.Namespace, folder: Path, input_format: str) -> Path:
    from ..export import compile_artifact
    from ..model import create_model

    out = folder / f"{args.arch}_{args.preset}_b{args.batch}_{input_format}.so"
    print(f"compiling {args.arch} {args.preset} (random weights), batch {args.batch}, {input_format} input, for {args.device} ...",
          flush=True)
    torch.manual_seed(0)
    compile_artifact(create_model(args.arch, **PRESETS[args.preset]), out, device=args.device, batch=args.batch,
                     input_format=input_format)
    return out


def run(args: argparse.Namespace) -> int:
    from ..predict.bench import FailedImages, e2e_benchmark, report

    with tempfile.TemporaryDirectory(prefix="benchmark_e2e.") as folder:
        artifact = args.artifact or _compiled(args, Path(folder), "float_nchw")
        pixels: Optional[Path] = args.uint8_artifact or (_compiled(args, Path(folder), "uint8_nhwc") if args.uint8 else None)
        try:
            result = e2e_benchmark(str(artifact), images=args.images, size=tuple(args.image_size), batch=args.batch,
                                   workers=args.workers, rounds=args.rounds, ray=args.ray, ray_concurrency=args.ray_concurrency,
                                   uint8_artifact=str(pixels) if pixels else None, device=args.device)
        except FailedImages as error:
            print(f"e2e: {error}; nothing was saved", file=sys.stderr)
            return 1
    text = report(result)
    print(text, end="")
    subject = f"{result['model'].replace(' ', '_')}_{result['precision']}_b{result['batch']}"
    writer = ResultsWriter(args.out, "predict_e2e", subject, machine=result["machine"])
    writer.report(text, vars(args), result=result)
    return 0
