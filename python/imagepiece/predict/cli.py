"""imagepiece-predict: label image files with a compiled artifact (scripts/predict.py is the same CLI).

examples:
  imagepiece-predict --artifact deit_s_ip.so --input photos/ --output preds.csv
  imagepiece-predict --artifact deit_s_ip.so --input 'shots/**/*.jpg' --output preds.parquet --topk 1
  imagepiece-predict --artifact deit_s_ip.so --input table.parquet --column url_local --output preds.jsonl --resume
  imagepiece-predict --artifact deit_s_ip.so --input photos/ --output preds_dir/ --ray --address auto --concurrency 8

--input: a folder (recursive, image suffixes only), a glob, an image, a text file of paths (one per
line, # comments), or a .csv/.parquet table (column `path`, the only column, or --column; a folder
named *.parquet is one table); relative paths in a list or table are relative to that file.
--output: .csv, .jsonl or .parquet, one row per input (path, top-k classes, labels, probs, error);
with --ray a folder of Parquet files. Files that
cannot be predicted (corrupt, truncated, not an image, 16-bit grayscale, over --max-pixels, unreadable) get
an error row and the run goes on.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import ip_runtime
import torch
from tqdm import tqdm

from imagepiece import command_line
from imagepiece.artifact import ArtifactError, check_compatible, read_metadata
from imagepiece.files import check_names_fit, check_writable_dir, held_exclusively, is_inside
from imagepiece.termination import STOPPED, exit_status, how_stopped, sigterm_unwinds

from .classifier import Classifier, choose_batch
from .decode import DEFAULT_MAX_PIXELS
from .labels import class_names
from .pipeline import RunStats, predict_items
from .ray_job import RayJobFailed, RayRowsLost, StoppedAfterWriting, check_output_folder, run_on_ray
from .sources import list_inputs
from .writers import FORMATS, ResumableOutput, lock_path, names_beside, output_format, warn_if_resume_matches_nothing


DEFAULT_TOPK = 5


def program_name(argv) -> str:
    return command_line.program_name(argv, "imagepiece-predict")


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_line.OneLineErrors(prog=program_name(argv), description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True, help="compiled .so/.pt2 (scripts/aot_compile.py)")
    parser.add_argument("--input", required=True, help="folder, glob, image, text file of paths, or .csv/.parquet table")
    parser.add_argument("--output", type=Path, required=True, help="preds.csv | preds.jsonl | preds.parquet (--ray: a folder)")
    parser.add_argument("--column", help="table column holding the paths (default: 'path' or the only column)")
    parser.add_argument("--topk", type=int, help=f"classes per row (default {DEFAULT_TOPK}, or all of a smaller head's)")
    parser.add_argument("--batch", type=int, help="batch size for a dynamic-batch artifact (default: min(32, its max); "
                                                  "a static-batch artifact always uses its own)")
    parser.add_argument("--workers", type=int, help="decode threads (default: min(4, cores)); 0 decodes in the model's thread "
                                                    "(not with --ray: Ray decodes on its own CPU workers)")
    parser.add_argument("--resume", action="store_true", help="keep the predictions already in --output, do only the rest: "
                                                             "inputs without a row, and those whose row is an error (the file "
                                                             "may have been fixed since); run it with the same artifact and "
                                                             "--topk (the rows do not record the artifact)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse images with more pixels, before decoding them (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--labels", type=Path, help="class names, one per line (default: the artifact's own, else timm's ImageNet names)")
    parser.add_argument("--device", default="", help="run on this device (default: the artifact's), e.g. cuda:1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale = parser.add_argument_group("scale-out on Ray Data")
    scale.add_argument("--ray", action="store_true", help="decode on Ray CPU workers, predict in an actor pool, write Parquet")
    scale.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, as `ray job submit` sets it; "
                                         "without it, or with 'local', start a local Ray on this machine)")
    scale.add_argument("--concurrency", type=int, help="model actors, each holding one Runtime "
                                                       "(default: one per GPU for a CUDA artifact, per CPU otherwise)")
    args = parser.parse_args(argv)
    for name in ("topk", "batch", "concurrency", "max_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if not args.ray and (args.address is not None or args.concurrency is not None):
        parser.error("--address and --concurrency apply only with --ray")
    if args.ray and args.workers is not None:
        parser.error("--workers sets this process's decode threads; with --ray, Ray decodes on its CPU workers")
    args.workers = min(4, os.cpu_count() or 1) if args.workers is None else args.workers
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device (cpu, cuda or cuda:N)")
    if device is not None and device.type == "cpu" and device.index not in (None, 0):
        parser.error(f"--device {args.device!r} does not exist: there is one CPU device, 'cpu'")
    return args


def check_output(path: Path, ray: bool, input_spec: str) -> None:
    if str(path) == "-":  # the journal, the atomic rename and --resume all need a file
        raise ValueError("--output -: predict writes no standard output; give a file name ending in .csv, .jsonl or .parquet"
                         + (" (with --ray, a folder)" if ray else ""))
    if os.path.isfile(input_spec) and path.exists() and os.path.samefile(input_spec, path):
        raise ValueError(f"output {str(path)!r} is the input: it would be overwritten; write the predictions to another file")
    # Every file in a Parquet dataset's folder is read as one of its parts (an image folder takes only images).
    if Path(input_spec).is_dir() and Path(input_spec).suffix.lower() == ".parquet" and is_inside(path, input_spec):
        raise ValueError(f"output {str(path)!r} lies inside the input Parquet dataset {input_spec!r}: the next run would read "
                         "the predictions as input; write them elsewhere")
    if ray:
        if path.suffix.lower() in FORMATS and not path.is_dir():  # Ray would make a folder of that name, silently
            raise ValueError(f"--output {str(path)!r} names a {path.suffix} file, but --ray writes a folder of Parquet "
                             "files: give a folder name")
        if path.exists() and not path.is_dir():
            raise ValueError(f"output {str(path)!r} exists and is not a folder; with --ray the output is a folder of Parquet files")
        check_output_folder(path, input_spec)
    else:
        output_format(path)
        if path.is_dir():
            raise ValueError(f"output {str(path)!r} is a folder; give a file name ending in .csv, .jsonl or .parquet")
        if path.exists() and not path.is_file():  # a FIFO named *.csv, say: written in place (files.atomic_write)
            check_writable_dir(path.parent)  # the journal sits beside the name given
            return
    check_writable_dir(path.parent)
    check_names_fit(path.parent, [lock_path(path).name] if ray else names_beside(path), path)
    # A symbolic link is written through (its target replaced): that folder too must take the file, before the run.
    check_writable_dir(Path(os.path.realpath(path)).parent)


def run_single_process(args, items, classifier, names, warn) -> int:
    output = ResumableOutput(args.output, args.resume, args.topk)
    warn_if_resume_matches_nothing(output.earlier_paths, [item.path for item in items], args.output, warn)
    todo = [item for item in items if not output.done(item.path)]
    stats = RunStats(skipped=len(items) - len(todo))
    try:
        with tqdm(total=len(todo), unit="img", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True) as progress:
            for rows in predict_items(todo, classifier, names, workers=args.workers, max_pixels=args.max_pixels, stats=stats):
                output.add(rows)
                progress.update(len(rows))
        output.finish([item.path for item in items])  # in the try: a stop while writing keeps the journal too
    except STOPPED as stop:  # Ctrl-C, or SIGTERM (a scheduler's stop): the decode threads have finished by now
        output.journal.close(after_failure=True)
        earlier = f" (besides the {stats.skipped} an earlier run did)" if stats.skipped else ""
        print(f"{how_stopped(stop)} after {stats.images} images{earlier}; they are kept in {output.journal.path}: "
              "rerun with --resume to finish", file=sys.stderr)
        return exit_status(stop)
    except OSError as error:  # writing the journal or the output (a full disk, a folder gone)
        output.journal.close(after_failure=True)
        print(f"{program_name(None)}: error: cannot write {error.filename or args.output} ({error.strerror or error}); the "
              f"predictions written so far are kept in {output.journal.path}: rerun with --resume to finish", file=sys.stderr)
        return 1
    print(f"predicted {stats.summary()}; wrote {args.output}")
    return 0


def run_ray(args, items, warn, prog: str) -> int:
    try:
        stats = run_on_ray(args, items, warn)
    except (RayRowsLost, RayJobFailed) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except StoppedAfterWriting as late:
        print(f"{prog}: {how_stopped(late.stop)} after the output was complete: predicted {late.stats.summary()}; wrote "
              f"{args.output}/", file=sys.stderr)
        return exit_status(late.stop)
    except STOPPED as stop:
        # Ray's files are moved into --output only when the whole job finished.
        print(f"{prog}: {how_stopped(stop)}; {args.output} is as it was before this run (rerun to predict; --resume keeps "
              "the rows already there)", file=sys.stderr)
        return exit_status(stop)
    print(f"predicted {stats.summary()}; wrote {args.output}/")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    with sigterm_unwinds():  # SIGTERM unwinds like Ctrl-C: the journal is closed and the run says where it stopped
        return predict(args, program_name(argv))


def optional_modules(args: argparse.Namespace) -> list:
    """What this run imports beyond the core: pyarrow for Parquet in or out (--ray writes Parquet), ray for --ray."""
    parquet = args.ray or ".parquet" in (args.output.suffix.lower(), Path(args.input).suffix.lower())  # a file or a dataset folder
    return ["pyarrow"] * parquet + ["ray"] * args.ray


def predict(args: argparse.Namespace, prog: str) -> int:
    try:
        command_line.require_extra("predict", optional_modules(args), "--ray" if args.ray else "Parquet input or output")
        check_output(args.output, args.ray, args.input)
        metadata = read_metadata(args.artifact)
        check_compatible(metadata, torch.device(args.device or metadata["device_type"]))
        num_classes = int(metadata["num_classes"])
        if args.topk is None:  # a fine-tuned head may have fewer classes than the default asks for
            args.topk = min(DEFAULT_TOPK, num_classes)
        if args.topk > num_classes:
            raise ValueError(f"--topk {args.topk} is more than the artifact's {num_classes} classes")
        names = class_names(metadata, args.labels)
        if not any(names):
            print(f"{prog}: warning: the artifact's {num_classes} classes are no ImageNet head timm names, it records no class names and no --labels was "
                  "given: the label columns stay empty (the class indices are in the rows)", file=sys.stderr)
        warn = command_line.warning_printer(prog)
        running = choose_batch(metadata["batch"], args.batch)
        if args.batch is not None and running != args.batch:
            warn(f"--batch {args.batch}: the artifact runs batches of {running} (its range is "
                 f"{metadata['batch']['min']}..{metadata['batch']['max']})")
        items = list_inputs(args.input, args.column, warn=warn)
        with held_exclusively(lock_path(args.output), f"output {str(args.output)!r}"):
            if args.ray:
                return run_ray(args, items, warn, prog)
            classifier = Classifier(str(args.artifact), topk=args.topk, batch=args.batch, device=args.device)
            return run_single_process(args, items, classifier, names, warn)
    except (ValueError, ArtifactError, ip_runtime.Error, OSError, command_line.MissingExtra) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except STOPPED as stop:  # while loading or listing: nothing predicted yet (a run in progress says more)
        print(f"{prog}: {how_stopped(stop)} before predicting anything", file=sys.stderr)
        return exit_status(stop)


if __name__ == "__main__":
    sys.exit(main())
