"""artifact-load: what verifying an artifact costs at load, and whether reloading it keeps memory flat.

Load time, each trial in a fresh process (page cache warm, nothing loaded yet), kinds interleaved:
  before   PyTorch's AOTI runner handed the file itself, as the runtime loaded artifacts before they were
           verified (.so: AOTIModelContainerRunnerCpu(path); .pt2: torch._inductor.aoti_load_package(path))
  after    ip_runtime.Runtime(path): one read into a sealed private copy, sha256 over it, load that copy
  digest   imagepiece.artifact.read_metadata(path): the read and the digest alone (Python hashlib)
Memory: RSS of one process over --cycles load/run/unload cycles of ip_runtime.Runtime (and, for a .pt2,
of the old way over a few cycles: it kept every load mapped).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ..files import check_writable_dir
from .artifact_option import checked_metadata, model_differences, preset_of
from .results import ResultsWriter
from .timing import summarize

HELP = "load time with and without the digest check and private copy; RSS over load/unload cycles (CPU)"
KINDS = ("before", "after", "digest")


def default_workdir() -> Path:
    """Per user, not a shared /tmp folder: the artifacts found there are loaded, i.e. their code runs in this process."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagepiece" / "bench_artifact_load"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--so", type=Path, help="a CPU .so artifact (default: compile the --pt2's model, else --arch "
                        "ImagePiece, batch 1)")
    parser.add_argument("--pt2", type=Path, help="a CPU .pt2 artifact (default: compile the --so's model, else --arch "
                        "ImagePiece, batch 1)")
    parser.add_argument("--workdir", type=Path,
                        help="where compiled artifacts are kept between runs (reused while this torch release made them); "
                             "a folder of yours that no one else may write: its artifacts are loaded (default: "
                             "$XDG_CACHE_HOME/imagepiece/bench_artifact_load, else ~/.cache/...)")
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per kind and artifact")
    parser.add_argument("--cycles", type=int, default=200, help="load/run/unload cycles for the memory check")
    parser.add_argument("--old-pt2-cycles", type=int, default=10, help="cycles of the old .pt2 loading (it leaks)")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.device != "cpu":
        parser.error("artifact-load measures CPU artifacts (--device cpu)")
    if min(args.repeats, args.cycles, args.old_pt2_cycles) < 1:
        parser.error("--repeats, --cycles and --old-pt2-cycles must be >= 1")
    found = []
    for given, suffix in ((args.so, ".so"), (args.pt2, ".pt2")):
        if given is not None and (given.suffix != suffix or not given.is_file()):
            parser.error(f"--{suffix[1:]} must be an existing {suffix} file, got {str(given)!r}")
        if given is not None:
            found.append(checked_metadata(parser, f"--{suffix[1:]}", given, args.device))
    if len(found) == 2:
        differing = model_differences(*found) or (["batch"] if found[0]["batch"] != found[1]["batch"] else [])
        if differing:
            parser.error(f"--so and --pt2 hold different models ({', '.join(differing)}): the two load paths must load the same "
                         "one to compare")
    if len(found) == 1:  # the other one is compiled as its twin: the same model, precision, batch range and input
        problem = twin_problem(found[0])
        if problem:
            given = "--so" if args.so is not None else "--pt2"
            parser.error(f"{given} {problem}, so its twin cannot be compiled here; give both --so and --pt2 (the same model)")
    # One artifact given: the other is compiled for its model (the results are named after it); none: ImagePiece of --arch.
    args.arch, args.preset, args.batch = ((found[0]["arch"], preset_of(found[0]), found[0]["batch"]["min"]) if found
                                          else (args.arch, "imagepiece", 1))
    if len(found) < 2:
        if args.workdir is None:
            try:
                args.workdir = default_workdir()
            except RuntimeError as error:  # no HOME and no passwd entry: Path.home() cannot say
                parser.error(f"give --workdir: {error}")
        check_workdir(args.workdir, parser)


def twin_problem(metadata: dict) -> Optional[str]:
    """Why a twin of the artifact with `metadata` cannot be compiled from it alone (None if it can): its weights
    or int8 calibration images are not in it, and random weights or synthetic images would make another model."""
    checkpoint = metadata["checkpoint"]
    if checkpoint["sha256"] != "random":
        return f"was compiled from the checkpoint {checkpoint.get('file')!r}, not random weights"
    calibration = (metadata.get("quantization") or {}).get("calibration", {})
    if calibration and not str(calibration.get("source", "")).startswith("synthetic"):
        return f"was calibrated on the images of a {calibration['source']}"
    return None


def check_workdir(workdir: Path, parser: argparse.ArgumentParser) -> None:
    """--workdir, where artifacts will be compiled: a writable folder, or one that can be made (nothing made yet)."""
    existing = next(folder for folder in (workdir, *workdir.parents) if folder.exists())
    if not existing.is_dir():
        parser.error(f"--workdir {str(workdir)!r}: {str(existing)!r} is not a folder")
    try:
        check_writable_dir(existing)
    except ValueError as error:
        parser.error(f"--workdir {str(workdir)!r}: {error}")
    if workdir.is_dir():  # artifacts found in it are loaded: someone else's could run their code here
        status = workdir.stat()
        if status.st_uid != os.getuid() or status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            parser.error(f"--workdir {str(workdir)!r} is not yours alone (owner uid {status.st_uid}, mode "
                         f"{stat.S_IMODE(status.st_mode):o}): the artifacts in it are loaded, so anyone who can write it "
                         "could run code in this process; give a folder only you can write")


# --- in a child process ----------------------------------------------------------------------------

def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def load(kind: str, path: Path):
    import torch

    if kind == "after":
        import ip_runtime

        return ip_runtime.Runtime(path)
    if kind == "digest":
        from ..artifact import read_metadata

        return read_metadata(path)
    if path.suffix == ".pt2":
        return torch._inductor.aoti_load_package(str(path))
    return torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)


def run_once(kind: str, model, images) -> None:
    if kind == "after":
        model.run(images)
    elif kind == "before":  # a container runner takes a list; a loaded package is called
        model.run([images]) if hasattr(model, "run") else model(images)


def measure_load(kind: str, path: Path) -> dict:
    """Seconds to load once (imports done first)."""
    import torch  # noqa: F401
    import ip_runtime  # noqa: F401
    from .. import artifact  # noqa: F401

    started = time.perf_counter()
    load(kind, path)
    return {"seconds": time.perf_counter() - started}


def measure_cycles(kind: str, path: Path, cycles: int) -> dict:
    """RSS after warm-up and every 10 load/run/unload cycles, and the thread count the runs had."""
    import torch

    from ..artifact import read_metadata
    from ..artifact_metadata import example_images

    metadata = read_metadata(path)
    images = example_images(metadata, metadata["batch"]["min"])
    for _ in range(3):
        run_once(kind, load(kind, path), images)
    trace = [resident_mib()]
    started = time.perf_counter()
    for cycle in range(1, cycles + 1):
        model = load(kind, path)
        run_once(kind, model, images)
        del model
        if cycle % 10 == 0 or cycle == cycles:
            trace.append(resident_mib())
    return {"rss_mib": trace, "seconds_per_cycle": (time.perf_counter() - started) / cycles, "threads": torch.get_num_threads()}


def child_main(argv) -> int:
    what, kind, path, *rest = argv
    result = measure_load(kind, Path(path)) if what == "load" else measure_cycles(kind, Path(path), int(rest[0]))
    print(json.dumps(result))
    return 0


# --- the benchmark -----------------------------------------------------------------------------------

def in_child(threads: Optional[int], *args: str) -> dict:
    """One measuring child; `threads` reaches its OpenMP pool (libgomp reads the variable once, at load)."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    result = subprocess.run([sys.executable, "-m", __name__, *args], capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# What makes a compiled artifact the twin of another (metadata keys): the model, what it computes in, the batch
# range and input it takes. Its weights are random, as the twin's original's must be (`twin_problem`).
TWIN_SETTINGS = ("arch", "method", "config", "num_classes", "precision", "attention", "input_format", "batch")


def twin_settings(metadata: dict) -> dict:
    """What a twin of the artifact with `metadata` must share with it (TWIN_SETTINGS, and int8's calibration count)."""
    settings = {key: metadata.get(key) for key in TWIN_SETTINGS}
    settings["calibration_images"] = ((metadata.get("quantization") or {}).get("calibration") or {}).get("images")
    return settings


def default_settings(arch: str) -> dict:
    """The twin settings of the artifact compiled when neither --so nor --pt2 is given: --arch ImagePiece, fp32, batch 1."""
    from ..export import default_attention
    from ..model import create_model

    model = create_model(arch, "imagepiece")
    return {"arch": arch, "method": "imagepiece", "config": json.loads(json.dumps(model.reduction_config.to_dict())),
            "num_classes": model.num_classes, "precision": "fp32", "attention": default_attention("cpu", "fp32"),
            "input_format": "float_nchw", "batch": {"min": 1, "max": 1, "dynamic": False}, "calibration_images": None}


def compiled(settings: dict, suffix: str, workdir: Path) -> Path:
    """`workdir`'s artifact with `settings` (`twin_settings`), compiled with random weights unless one that this
    torch release can load is there."""
    import torch

    from ..artifact import ArtifactError, read_metadata
    from ..artifact_metadata import torch_release
    from ..config import ReductionConfig
    from ..export import compile_artifact
    from ..model import create_model

    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = workdir / f"{settings['arch']}_{settings['method']}_{digest}{suffix}"
    try:
        metadata = read_metadata(out)
        # Reused only when it holds the model its name says (a file put there by hand may not) and this torch loads it.
        if (torch_release(metadata["torch_version"]) == torch_release(torch.__version__) and twin_settings(metadata) == settings
                and metadata["checkpoint"]["sha256"] == "random"):
            return out
    except (ArtifactError, OSError):
        pass  # missing or unreadable: compiled below
    batch = settings["batch"]
    print(f"compiling {out.name} ({settings['precision']}, batch {batch['min']}..{batch['max']}, {settings['input_format']} input) ...",
          flush=True)
    torch.manual_seed(0)
    model = create_model(settings["arch"], config=ReductionConfig(**settings["config"]), num_classes=settings["num_classes"])
    compile_artifact(model, out, dtype=settings["precision"], batch=None if batch["dynamic"] else batch["min"],
                     max_batch=batch["max"] if batch["dynamic"] else None, input_format=settings["input_format"],
                     attention=settings["attention"], calibration_images=settings["calibration_images"])
    return out


def run(args: argparse.Namespace) -> int:
    from ..artifact import read_metadata

    if args.so is None or args.pt2 is None:
        args.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    given = args.so or args.pt2
    settings = twin_settings(read_metadata(given)) if given is not None else default_settings(args.arch)
    artifacts = {".so": args.so or compiled(settings, ".so", args.workdir),
                 ".pt2": args.pt2 or compiled(settings, ".pt2", args.workdir)}
    writer = ResultsWriter(args.out, "artifact_load", f"{args.arch}_{args.preset}", device=args.device)
    print(f"# {writer.provenance}", flush=True)
    loads = {(suffix, kind): [] for suffix in artifacts for kind in KINDS}
    for repeat in range(args.repeats):
        for suffix, path in artifacts.items():
            for kind in KINDS:  # interleaved: drift in machine load hits every kind alike
                loads[suffix, kind].append(in_child(args.threads, "load", kind, str(path))["seconds"])
        print(f"load trials {repeat + 1}/{args.repeats} done", flush=True)
    cycles = {suffix: in_child(args.threads, "cycles", "after", str(path), str(args.cycles)) for suffix, path in artifacts.items()}
    old_pt2 = in_child(args.threads, "cycles", "before", str(artifacts[".pt2"]), str(args.old_pt2_cycles))

    lines = ["Load time, median of fresh processes (ms); 'after' / 'before' is the cost of verifying and the private copy"]
    stats = {f"{suffix} {kind}": summarize(seconds) for (suffix, kind), seconds in loads.items()}
    for suffix, path in artifacts.items():
        median = {kind: stats[f"{suffix} {kind}"]["p50_ms"] for kind in KINDS}
        lines.append(f"  {path.name} ({path.stat().st_size / 2**20:.1f} MiB): before {median['before']:.0f}  after {median['after']:.0f}  "
                     f"(x{median['after'] / median['before']:.2f}, {median['after'] - median['before']:+.0f} ms)  "
                     f"digest alone {median['digest']:.0f}")
    lines.append(f"RSS over load/run/unload cycles (ip_runtime.Runtime, one run of its smallest batch per cycle, "
                 f"{cycles['.so']['threads']} threads)")
    for suffix, record in cycles.items():
        trace = record["rss_mib"]
        lines.append(f"  {artifacts[suffix].name}: {args.cycles} cycles, RSS {trace[0]:.0f} -> {trace[-1]:.0f} MiB "
                     f"(growth {trace[-1] - trace[0]:+.1f} MiB), {record['seconds_per_cycle'] * 1e3:.0f} ms/cycle")
    trace = old_pt2["rss_mib"]
    lines.append(f"  old .pt2 loading (aoti_load_package): {args.old_pt2_cycles} cycles, RSS {trace[0]:.0f} -> {trace[-1]:.0f} MiB "
                 f"({(trace[-1] - trace[0]) / args.old_pt2_cycles:+.1f} MiB per load)")
    report = "\n".join(lines)
    print(report)
    writer.report(report, vars(args),
                  artifacts={suffix: {"path": str(path), "bytes": path.stat().st_size} for suffix, path in artifacts.items()},
                  load_seconds={f"{suffix} {kind}": values for (suffix, kind), values in loads.items()}, load_stats=stats,
                  cycles={suffix: {"count": args.cycles, **record} for suffix, record in cycles.items()},
                  old_pt2_cycles={"count": args.old_pt2_cycles, **old_pt2})
    return 0


if __name__ == "__main__":  # a measuring child (see in_child)
    sys.exit(child_main(sys.argv[1:]))
