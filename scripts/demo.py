#!/usr/bin/env python
"""The main job on its embedded default: compile DeiT-S ImagePiece and classify through the runtime.

1. builds DeiT-S with ImagePiece re-tokenization (random weights: scripts/aot_compile.py --checkpoint
   compiles trained ones) and prints its token schedule;
2. compiles it with torch.export + AOTInductor into one .so (reused on later runs while what it would compile is
   unchanged: model code and config, batch, torch, device and CPU; it says why when it compiles; --recompile forces it);
3. classifies a batch through `ip_runtime` (the C++ runtime) and prints top-5 per image;
4. times timm eager DeiT-S, eager ImagePiece and ip_runtime ImagePiece interleaved, side by side;
5. builds the C++ example (cpp/examples) against the installed package and runs it on the artifact.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import timm
import torch

import imagepiece
import ip_runtime
from imagepiece.artifact import SUFFIXES, ArtifactError, check_compatible, read_metadata
from imagepiece.artifact_metadata import MAX_BATCH
from imagepiece.command_line import machine_failure
from imagepiece.environment import device_problem, machine_info
from imagepiece.export import build_metadata, check_device_and_dtype, check_output_path, compile_artifact
from imagepiece.bench.timing import summarize, time_interleaved
from imagepiece.termination import STOPPED, exit_status, how_stopped, sigterm_unwinds

ROOT = Path(__file__).resolve().parent.parent
PROG = "demo.py"


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def why_recompile(artifact: Path, model: imagepiece.ImagePieceViT, target: torch.device, batch: int) -> Optional[str]:
    """Why the artifact at `artifact` is not what this run would compile (None: it is, reuse it): its metadata
    against what compiling `model` now would record (but its creation time), the package's code (`source_sha256`)
    included, and whether this process can run it at all (torch release, device, CPU)."""
    if not artifact.exists():
        return f"there is none at {artifact} yet"
    try:
        found = read_metadata(artifact)
        check_compatible(found, target)
    except ArtifactError as error:
        return str(error)
    wanted = json.loads(json.dumps(build_metadata(model, target, "fp32", (batch, batch), None, artifact.suffix)))  # lists, not tuples
    differing = [key for key in wanted if key != "created" and found.get(key) != wanted[key]]
    if differing:
        return f"{artifact} differs from what would be compiled now in {', '.join(differing)}"
    return None


def run_cpp_example(artifact: Path) -> int:
    """Builds and runs the C++ example; its exit status (or 1 where it cannot be built), which the demo's is."""
    cmake = shutil.which("cmake", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if cmake is None:
        print("cmake not found: cannot build the C++ example (--skip-cpp leaves it out)")
        return 1
    build = ROOT / "build" / "examples"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for command in ([cmake, "-S", str(ROOT / "cpp" / "examples"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={ip_runtime.cmake_prefix_path}"], [cmake, "--build", str(build)]):
        step = subprocess.run(command, capture_output=True, text=True, env=env)
        if step.returncode != 0:
            print(f"building the C++ example failed:\n{step.stdout[-2000:]}{step.stderr[-2000:]}")
            return 1
    print(f"$ build/examples/classify {artifact.relative_to(ROOT) if artifact.is_relative_to(ROOT) else artifact}")
    result = subprocess.run([str(build / "classify"), str(artifact)], capture_output=True, text=True)
    print(result.stdout + result.stderr, end="")
    if result.returncode != 0:
        print(f"the C++ example failed (exit {result.returncode})")
    return result.returncode


def checked_output(out: Path) -> Path:
    """--out, its folder made where there is none (artifacts/ on a first run); ValueError or OSError for one no
    compile could write (check_output_path's reasons)."""
    if out.suffix in SUFFIXES and not out.parent.exists():
        try:
            out.parent.mkdir(parents=True)
        except OSError as error:
            raise ValueError(f"cannot make the folder {str(out.parent)!r} for --out ({error.strerror})") from None
    return check_output_path(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_small_patch16_224", choices=sorted(imagepiece.ARCHS), help="DeiT size (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="static batch of the artifact and of the timed runs (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N] (default: %(default)s here)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per contender; the median is shown (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "deit_s_ip.so",
                        help="the artifact, reused by later runs while what they would compile matches it (default: artifacts/deit_s_ip.so)")
    parser.add_argument("--recompile", action="store_true", help="compile even where the artifact at --out could be reused")
    parser.add_argument("--skip-cpp", action="store_true", help="do not build and run the C++ example")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= MAX_BATCH or args.repeats < 1:
        parser.error(f"--batch must be in 1..{MAX_BATCH:,} and --repeats >= 1")
    try:
        target = check_device_and_dtype(args.device, "fp32")
        args.out = checked_output(args.out)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    problem = device_problem(args.device)
    if problem:
        parser.error(problem)
    try:
        with sigterm_unwinds():
            return run(args, target)
    except STOPPED as stop:  # the artifact is written whole or not at all (compile_artifact stages it)
        print(f"{PROG}: {how_stopped(stop)}", file=sys.stderr)
        return exit_status(stop)
    except Exception as error:  # noqa: BLE001  (a machine out of memory or disk is said in one line; bugs keep their traceback)
        reason = machine_failure(error)
        if reason is None:
            raise
        print(f"{PROG}: error: {reason}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, target: torch.device) -> int:
    info = machine_info()
    print(f"machine: {info['cpu']} ({info['cpu_cores']} cores), GPU {info['gpu']}; torch {info['torch']}, timm {info['timm']}")
    banner(f"1. {args.arch} + ImagePiece (random weights: no hub is reachable; aot_compile.py --checkpoint takes real ones)")
    torch.manual_seed(0)
    plain = timm.create_model(args.arch).eval().to(args.device)
    model = imagepiece.create_model(args.arch, "imagepiece").to(args.device)
    model.load_state_dict(plain.state_dict())
    print(imagepiece.format_schedule(model.token_schedule()))

    banner(f"2. torch.export + AOTInductor -> {args.out}")
    why = "asked to by --recompile" if args.recompile else why_recompile(args.out, model, target, args.batch)
    if why is None:
        print(f"reusing {args.out}: compiled from the same model code, config and batch, for this torch, device and CPU "
              "(--recompile to rebuild)")
    else:
        print(f"compiling ({why})")
        report = compile_artifact(model, args.out, device=args.device, batch=args.batch, log=print)
        print(f"export {report.export_seconds:.1f} s, compile {report.compile_seconds:.1f} s, "
              f"{report.size_bytes / 2**20:.1f} MiB (kernels, weights and metadata in one file)")

    banner(f"3. classify {args.batch} images through ip_runtime (C++ runtime)")
    runtime = ip_runtime.Runtime(str(args.out))
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(args.device)
    top5 = runtime.run(images).softmax(-1).topk(5)
    print("  top-5 classes (probability) of random images:")
    for index, (p, c) in enumerate(zip(top5.values.tolist(), top5.indices.tolist())):
        print(f"  image {index}: " + "  ".join(f"{k:>4} ({v:.3f})" for k, v in zip(c, p)))

    banner(f"4. speed, batch {args.batch}, {args.device} fp32, interleaved, median of {args.repeats}")
    with torch.inference_mode():
        samples = time_interleaved({"timm eager DeiT": lambda: plain(images), "eager ImagePiece": lambda: model(images),
                                    "ip_runtime ImagePiece": lambda: runtime.run(images)},
                                   repeats=args.repeats, device=torch.device(args.device))
    baseline = summarize(samples["timm eager DeiT"])["p50_ms"]
    for name, seconds in samples.items():
        p50 = summarize(seconds)["p50_ms"]
        print(f"  {name:<24} {p50:8.1f} ms  {args.batch / p50 * 1e3:8.1f} img/s  {baseline / p50:5.2f}x")

    if not args.skip_cpp:
        banner("5. the C++ example app (cpp/examples/classify.cpp) on the same artifact")
        return run_cpp_example(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
