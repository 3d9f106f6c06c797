#!/usr/bin/env python
"""Compile an ImagePiece-family DeiT into one self-contained artifact for the C++ runtime.

The model is exported with torch.export (static token counts, static or dynamic batch) and compiled
by AOTInductor. A `.so` is one shared library holding kernels, weights and metadata; a `.pt2` is an
AOTI package. Either loads in `ip_runtime.Runtime(path)` / `imagepiece::Runtime` or
`imagepiece.export.load(path)`. The metadata records a sha256 digest over the whole artifact, which
every loader checks.

examples:
  python scripts/aot_compile.py --out deit_s_ip.so                       # DeiT-S ImagePiece, random weights
  python scripts/aot_compile.py --checkpoint deit_small_patch16_224-cd65a155.pth --out deit_s_ip.so
  python scripts/aot_compile.py --arch deit_tiny_patch16_224 --method tome --max-batch 64 --out ti_tome.so
  python scripts/aot_compile.py --device cuda --dtype bf16 --batch 256 --out deit_s_ip_bf16.so
  python scripts/aot_compile.py --dtype int8 --calibration val_images/ --batch 8 --out deit_s_ip_int8.so
  python scripts/aot_compile.py --input-format uint8 --batch 8 --out deit_s_ip_u8.so   # takes uint8 [B,224,224,3] pixels

exit status: 0 done, 2 the request cannot work (arguments, checkpoint, calibration images), 1 the system
failed (no C++ compiler or objcopy; the output cannot be written: read-only, no permission, disk full);
130/143 stopped by Ctrl-C/SIGTERM. Whatever the failure, nothing is left at --out.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

import imagepiece
from imagepiece import ARCHS, METHODS, CheckpointError, create_model, format_schedule
from imagepiece.command_line import (KILLED_COMPILER_MESSAGE, USAGE_ERROR, OneLineErrors, allocation_failure, compiler_killed,
                                      io_failure)
from imagepiece.config import LCB_CHOICES, PRESETS, REEVALUATIONS, fields_without_effect, lcb_from_cli
from imagepiece.artifact_metadata import MAX_BATCH, MAX_CLASSES
from imagepiece.blocks import ATTENTION_KERNELS
from imagepiece.files import check_output_file
from imagepiece.export import (PRECISIONS, check_build_tools, check_device_and_dtype, check_output_path, compile_artifact,
                               default_attention)
from imagepiece.input_format import CLI_INPUT_FORMATS
from imagepiece.model import parse_model_name
from imagepiece.quantize import MAX_CALIBRATION_IMAGES
from imagepiece.termination import STOPPED, exit_status, how_stopped, sigterm_unwinds
from imagepiece.weights import MODEL_FLAG_DEFAULTS, fill_model_flags, fine_tuned_flags, fine_tuned_settings, reduction_difference

PROG = "aot_compile.py"
IO_ERROR = 1


def at_least(low: int, high: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be an integer <= {high:,}, got {value:,}")
        return value

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrors(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    # --arch, --preset (or --method), --lcb and --num-classes default to what a fine-tune recorded in --checkpoint
    # (weights.fine_tuned_flags): its weights fit no other model.
    model.add_argument("--arch", choices=sorted(imagepiece.ARCHS), help="DeiT size (default: the fine-tune's, else deit_small_patch16_224)")
    model.add_argument("--model", help="timm-style name, e.g. deit_small_patch16_224.imagepiece (sets --arch and --method)")
    model.add_argument("--method", default=None, choices=METHODS, help="token reduction (default: the fine-tune's, else imagepiece)")
    model.add_argument("--preset", choices=sorted(PRESETS), help="a named setting: a method and its config (e.g. imagepiece_hyper); "
                       "the config overrides apply on top (default: the fine-tune's)")
    model.add_argument("--checkpoint", type=Path, help="local DeiT/ImagePiece .pth or .safetensors (default: random weights)")
    model.add_argument("--allow-untrained-lcb", action="store_true", help="accept a checkpoint without LCB 'stem' weights")
    model.add_argument("--num-classes", type=at_least(1, MAX_CLASSES), help="classifier size of the checkpoint (default: the fine-tune's, else 1000)")
    overrides = parser.add_argument_group("config overrides (default: the preset's or method's published setting)")
    overrides.add_argument("--p", type=float, help="ImagePiece non-semantic fraction (0.3)")
    overrides.add_argument("--merge-ratio", type=float, help="ImagePiece merges per block / image tokens (0.08)")
    overrides.add_argument("--keep-rate", type=float, help="kept fraction where pruning (ImagePiece 0.8, EViT 0.7)")
    overrides.add_argument("--prune-blocks", type=int, nargs="*", help="0-indexed pruning blocks (3 6 9)")
    overrides.add_argument("--tome-r", type=int, help="ToMe merges per block (13)")
    overrides.add_argument("--lcb", choices=LCB_CHOICES, help="Local Coherence Bias variant (default: the fine-tune's, else none)")
    overrides.add_argument("--reevaluation", choices=REEVALUATIONS,
                           help="ImagePiece: how merged tokens are scored for pruning (attention: recomputed, the paper's step 3)")
    overrides.add_argument("--no-prop-attn", dest="prop_attn", action="store_false", default=None, help="disable proportional attention")
    target = parser.add_argument_group("target")
    target.add_argument("--device", help=f"cpu or cuda[:N] (default: {'cuda' if torch.cuda.is_available() else 'cpu'} here; "
                                         "cpu for --dtype int8, a CPU artifact)")
    target.add_argument("--dtype", default="fp32", choices=sorted(PRECISIONS),
                        help="precision (default: fp32); int8 (CPU) quantizes the Linear layers and still takes fp32 images")
    target.add_argument("--input-format", default="float", choices=list(CLI_INPUT_FORMATS),
                        help="float: normalised float [B, 3, H, W] images (default); uint8: resized and cropped RGB pixels "
                        "[B, H, W, 3], normalised inside the artifact (4x fewer bytes to move, no float work on the host)")
    target.add_argument("--calibration", type=Path, help="int8: a folder of images to calibrate activation ranges on "
                        "(default: synthetic Gaussian images, right only for random weights)")
    target.add_argument("--calibration-images", type=at_least(1, MAX_CALIBRATION_IMAGES),
                        help="int8: images to calibrate on (default 32, rounded up to whole batches for a static --batch)")
    target.add_argument("--attention", choices=list(ATTENTION_KERNELS),
                        help="attention kernel: sdpa (fused flash attention, fp32 logits) or matmul (two batched GEMMs and a "
                        "softmax, logits in the model's dtype); default: matmul for bf16 on the CPU (faster there on the AMD EPYC it was "
                        "measured on; not measured on CPUs with AMX), else sdpa")
    batch = target.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=at_least(1, MAX_BATCH), help="static batch size (default: 1 unless --max-batch)")
    batch.add_argument("--max-batch", type=at_least(2, MAX_BATCH), help="dynamic batch 1..N (tokens stay static)")
    parser.add_argument("--out", type=Path, required=True, help="output .so (one self-contained library) or .pt2 (AOTI package)")
    args = parser.parse_args(argv)
    if args.batch is None and args.max_batch is None:
        args.batch = 1
    if args.device is None:  # the documented int8 example must not fail on a machine that has a GPU
        args.device = "cuda" if torch.cuda.is_available() and args.dtype != "int8" else "cpu"
    if (args.calibration is not None or args.calibration_images is not None) and args.dtype != "int8":  # before any work
        parser.error("--calibration and --calibration-images apply only to --dtype int8")
    if args.dtype == "int8" and args.batch is not None and args.batch > MAX_CALIBRATION_IMAGES:
        parser.error(f"--dtype int8 calibrates on whole batches, at most {MAX_CALIBRATION_IMAGES:,} images (held in memory "
                     f"at once): a static --batch {args.batch:,} is more; give --max-batch {args.batch} instead")
    if args.calibration_images is not None and args.batch is not None and args.calibration_images < args.batch:
        parser.error(f"--calibration-images {args.calibration_images} is fewer than one batch: a static --batch {args.batch} "
                     "artifact calibrates on whole batches")
    return args


def check_overrides_apply(method: str, overrides: dict) -> None:
    for field, methods in fields_without_effect(method, overrides).items():
        raise ValueError(f"--{field.replace('_', '-')} has no effect with method {method!r} (it applies to "
                         f"{' and '.join(methods)}); drop it")


def model_request(args: argparse.Namespace, recorded: dict) -> tuple:
    """(arch, {"method", config fields, num_classes}) to build: what the flags say, and where they are silent what a
    fine-tune recorded (`recorded`, weights.fine_tuned_flags), else DeiT-S ImagePiece. Sets args.preset to the preset used."""
    name = args.model or args.arch or recorded.get("arch", MODEL_FLAG_DEFAULTS["arch"])
    arch, method = parse_model_name(name, args.method)
    method_named = args.method is not None or arch != name  # --method, or --model tagged with one
    if args.preset is not None and method_named and PRESETS[args.preset]["method"] != method:
        raise ValueError(f"--preset {args.preset} is method {PRESETS[args.preset]['method']!r}, not {method!r}; drop one of them")
    if args.preset is None and not method_named:
        args.preset = recorded.get("preset")
    fill_model_flags(args, recorded, flags=("lcb", "num_classes"))
    overrides = config_overrides(args)
    setting = dict(PRESETS[args.preset]) if args.preset else {"method": method}
    check_overrides_apply(setting["method"], overrides)
    return arch, {**setting, **overrides}


def config_overrides(args: argparse.Namespace) -> dict:
    fields = {"p": args.p, "merge_ratio": args.merge_ratio, "keep_rate": args.keep_rate, "tome_r": args.tome_r,
              "prop_attn": args.prop_attn, "prune_blocks": tuple(args.prune_blocks) if args.prune_blocks is not None else None,
              "reevaluation": args.reevaluation}
    overrides = {key: value for key, value in fields.items() if value is not None}
    if args.lcb is not None:
        overrides["lcb"] = lcb_from_cli(args.lcb)
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    return overrides


def fail(status: int, message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # Cheap checks first: a bad output path, device or missing tool must not cost a compile.
        out = check_output_file(check_output_path(args.out), inputs={"--checkpoint": args.checkpoint})
        check_device_and_dtype(args.device, args.dtype)
        check_build_tools(out)
        if args.model is not None and args.arch is not None:
            raise ValueError(f"--model {args.model!r} names its arch; drop --arch {args.arch}")
        fine_tuned = fine_tuned_settings(args.checkpoint) if args.checkpoint else None  # read once: a checkpoint is ~90 MB
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            arch, setting = model_request(args, fine_tuned_flags(fine_tuned))
            model = create_model(arch, setting.pop("method"), checkpoint=args.checkpoint,
                                 allow_untrained_lcb=args.allow_untrained_lcb, **setting)
    except (ValueError, CheckpointError) as error:
        return fail(USAGE_ERROR, str(error))
    except OSError as error:  # the output folder cannot be written; a build tool is missing
        return fail(IO_ERROR, error.strerror or str(error))
    except KeyboardInterrupt:  # reading the checkpoint, building the model: nothing written yet
        return fail(exit_status(KeyboardInterrupt()), f"interrupted before compiling; {args.out} was not written")
    except (RuntimeError, MemoryError) as error:
        shortage = allocation_failure(error)
        if shortage is None:
            raise
        # The head's weights ([classes, width] floats) are what an absurd --num-classes makes too large.
        head_sizes = {args.num_classes * settings["embed_dim"] * 4 for settings in ARCHS.values()} if args.num_classes else set()
        head = f" (--num-classes {args.num_classes:,} asks for a head of that many rows)" if shortage.bytes in head_sizes else ""
        return fail(IO_ERROR, f"out of memory building the model: {shortage}{head}; {args.out} was not written")

    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "RANDOM weights (pass --checkpoint for trained ones)"
    batch = f"static batch {args.batch}" if args.batch else f"dynamic batch 1..{args.max_batch}"
    preset = f" ({args.preset})" if args.preset else ""
    print(f"model: {model.arch}.{model.reduction_config.method}{preset} with {weights}")
    difference = reduction_difference(fine_tuned, args.checkpoint, model.reduction_config)
    if difference:
        print(f"{PROG}: warning: {difference} (--preset, --method and the config overrides set it)", file=sys.stderr)
    attention = args.attention or default_attention(torch.device(args.device).type, args.dtype)
    print(f"target: {args.device} {args.dtype}, {batch}, {args.input_format} input, {attention} attention, -> {out}")
    print(format_schedule(model.token_schedule()), flush=True)
    try:
        with sigterm_unwinds():
            report = compile_artifact(model, out, device=args.device, dtype=args.dtype, batch=args.batch, max_batch=args.max_batch,
                                      checkpoint=args.checkpoint, calibration=args.calibration,
                                      calibration_images=args.calibration_images, input_format=CLI_INPUT_FORMATS[args.input_format],
                                      attention=attention, log=lambda message: print(message, flush=True))
    except ValueError as error:
        return fail(USAGE_ERROR, str(error))
    except STOPPED as stop:  # Ctrl-C or SIGTERM: the staging folder is gone by now (it unwound); `out` is untouched
        return fail(exit_status(stop), f"{how_stopped(stop)}; {out} was not written")
    except Exception as error:  # noqa: BLE001  (only I/O and memory failures become a message; bugs keep their traceback)
        shortage = allocation_failure(error)
        if shortage is not None:
            return fail(IO_ERROR, f"out of memory while compiling: {shortage}; {out} was not written")
        if compiler_killed(error):
            return fail(IO_ERROR, f"{KILLED_COMPILER_MESSAGE}; {out} was not written")
        reason = io_failure(error)
        if reason is None:
            raise
        return fail(IO_ERROR, f"could not write {out}: {reason}")
    print(f"export time:   {report.export_seconds:.1f} s")
    print(f"compile time:  {report.compile_seconds:.1f} s")
    print(f"artifact:      {report.path.resolve()} ({report.size_bytes / 2**20:.1f} MiB, metadata and digest inside)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
