"""tuning: what each AOTInductor CPU setting does to one model's latency and compile time.

One static-batch artifact per setting of `TUNINGS`, each compiled from a cold Inductor cache, then all of
them (and the eager model, for scale) timed interleaved through ip_runtime in one process:

  * no-freezing:   weights stay graph inputs: no constant folding, no weight prepacking;
  * default:       what `scripts/aot_compile.py` does: freezing on, so Inductor folds the weights in
                   and prepacks them for oneDNN (the reference row);
  * max-autotune:  + Inductor's CPU GEMM templates (C++ micro-kernels with fused epilogues) autotuned
                   against ATen/oneDNN per GEMM shape (`max_autotune_gemm_backends="CPP,ATEN"`);
  * march-native:  Inductor's own -march=native instead of the portable level artifacts pin
                   (`imagepiece.cpu_target`): what portability costs. Its metadata still names the
                   portable level, so it is for this comparison only, never to ship.
  * dynamic-threads: `cpp.dynamic_threads`, which `scripts/aot_compile.py` sets only where Inductor would
                   otherwise bake the compiling process's thread count into the kernels (torch < 2.14, or
                   a thread count other than the core count): what it costs where it is not needed.
  * sdpa-attention, matmul-attention: the default Inductor settings with the attention kernel forced
                   (`blocks.ATTENTION_KERNELS`); `default` has the compile's own choice for the dtype
                   (`export.default_attention`: matmul for bf16, else sdpa), so one of the two repeats it.

Each artifact's logits are compared with the eager fp32 model's on the timed images (max |difference|
reported beside its latency): a setting that changes kernels must not change the answer beyond rounding
(on random weights, rounding alone can flip a near-tie decision of a reducing model; plain DeiT has none).
Thread settings and shared cores are the `contention` mode's.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch

from ..config import PRESETS
from ..model import create_model
from .results import ResultsWriter
from .timing import summarize, time_interleaved

HELP = "AOTInductor CPU settings (freezing/prepacking, max-autotune GEMM templates, -march, attention kernel): latency and compile time"


class Tuning(NamedTuple):
    inductor: dict  # Inductor options over the compile's own
    attention: Optional[str] = None  # the attention kernel; None: the compile's default for the dtype


TUNINGS = {
    "no-freezing": Tuning({"freezing": False}),
    "default": Tuning({}),
    "max-autotune": Tuning({"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}),
    "march-native": Tuning({"cpp.march": "native"}),
    "dynamic-threads": Tuning({"cpp.dynamic_threads": True}),
    "sdpa-attention": Tuning({}, attention="sdpa"),
    "matmul-attention": Tuning({}, attention="matmul"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="imagepiece", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--tunings", nargs="+", choices=list(TUNINGS), default=list(TUNINGS))
    parser.add_argument("--repeats", type=int, default=10)


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.device != "cpu":
        parser.error("tuning compares CPU Inductor settings; run it with --device cpu")
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")
    if args.dtype == "int8" and importlib.util.find_spec("torchao") is None:
        parser.error("--dtype int8 needs torchao: pip install 'imagepiece[int8]'")
    # A setting given twice would compile into the same cache folder (warm the second time) and keep one row of two.
    args.tunings = list(dict.fromkeys(args.tunings))


# torch._inductor.codecache's precompiled-header folders (module globals), as paths below the cache folder.
HEADER_FOLDERS = {"_HEADER_DIR": ("precompiled_headers",), "_HEADER_LOCK_DIR": ("precompiled_headers", "locks")}


@contextlib.contextmanager
def inductor_cache(folder: Path) -> Iterator[None]:
    """Inductor's cache in `folder` (cold: nothing reused) while inside; the caller's setting after.

    TORCHINDUCTOR_CACHE_DIR moves the cache Inductor looks up per compile, but not its precompiled headers:
    torch._inductor.codecache fixes their folder (_HEADER_DIR, and _HEADER_LOCK_DIR below it) when it is imported,
    from the cache folder of that time, and remembers each header it has built (`_precompile_header` is a
    functools.cache). Both folders are pointed into `folder` too, and the memo is emptied on the way in and out:
    a cold compile builds its headers afresh, and no later compile is handed a header from a deleted folder.
    """
    from torch._inductor import codecache

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    headers_before = {name: getattr(codecache, name) for name in HEADER_FOLDERS if hasattr(codecache, name)}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    for name in headers_before:
        setattr(codecache, name, os.path.join(folder, *HEADER_FOLDERS[name]))
    _forget_precompiled_headers(codecache)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        for name, value in headers_before.items():
            setattr(codecache, name, value)
        _forget_precompiled_headers(codecache)


def _forget_precompiled_headers(codecache) -> None:
    remembered = getattr(codecache, "_precompile_header", None)
    if hasattr(remembered, "cache_clear"):
        remembered.cache_clear()


def run(args: argparse.Namespace) -> int:
    import ip_runtime

    from ..export import compile_artifact

    writer = ResultsWriter(args.out, "tuning", f"{args.arch}_{args.preset}_{args.dtype}_b{args.batch}", device=args.device)
    torch.manual_seed(0)
    model = create_model(args.arch, **PRESETS[args.preset])
    compile_seconds, calls, deviation, attention = {}, {}, {}, {}
    images = torch.randn(args.batch, 3, 224, 224)
    model_input = images.to(torch.bfloat16) if args.dtype == "bf16" else images
    with torch.inference_mode():
        expected = model(images)
    with tempfile.TemporaryDirectory(prefix="benchmark_tuning.") as folder:
        for name in args.tunings:
            started = time.perf_counter()
            with inductor_cache(Path(folder) / f"cache-{name}"):
                report = compile_artifact(copy.deepcopy(model), Path(folder) / f"{name}.so", dtype=args.dtype, batch=args.batch,
                                          inductor_overrides=TUNINGS[name].inductor, attention=TUNINGS[name].attention)
            attention[name] = report.metadata["attention"]
            compile_seconds[name] = time.perf_counter() - started
            runtime = ip_runtime.Runtime(str(report.path), device="cpu")
            deviation[name] = float((runtime.run(model_input).float() - expected).abs().max())
            calls[name] = lambda runtime=runtime: runtime.run(model_input)
        calls["eager fp32"] = lambda: model(images)
        with torch.inference_mode():
            samples = time_interleaved(calls, repeats=args.repeats)
    stats = {name: summarize(seconds) for name, seconds in samples.items()}
    base_name = "default" if "default" in stats else args.tunings[0]  # without "default", the first setting run
    base = stats[base_name]["p50_ms"]
    lines = [f"AOTInductor CPU settings, {args.arch} {args.preset} {args.dtype}, batch {args.batch}, {args.repeats} interleaved "
             "rounds through ip_runtime, cold Inductor cache per compile; max|dl| = largest |logit - eager fp32|",
             f"{'setting':<17} {'p50 ms':>9} {'p90 ms':>9} {'vs ' + base_name:>11} {'compile s':>10} {'max|dl|':>9}  attention"]
    for name, row in stats.items():
        lines.append(f"{name:<17} {row['p50_ms']:9.2f} {row['p90_ms']:9.2f} {base / row['p50_ms']:10.2f}x "
                     f"{format(compile_seconds[name], '10.1f') if name in compile_seconds else '-':>10} {deviation.get(name, 0.0):9.2g}  {attention.get(name, 'sdpa (eager)')}")
    print(f"# {writer.provenance}\n" + "\n".join(lines))
    writer.report("\n".join(lines), vars(args), stats=stats, baseline=base_name, compile_seconds=compile_seconds, max_abs_logit_diff=deviation,
                  tunings={name: TUNINGS[name]._asdict() for name in args.tunings}, attention=attention)
    return 0
