"""Artifacts compiled once per test session, two at a time, through the real CLI.

Compiling is the slow part of the suite (~1 min per model on 2 cores), so every artifact a test
needs is listed here once; the first request starts all builds in the background and each test
waits only for the artifact it uses.

Weights are random, saved to a checkpoint that both the compiled artifact and the eager reference
load. "sharpened" weights scale the query/key projections by SHARPEN so attention is peaked like a
trained DeiT's (random init gives near-uniform attention, where every ranking is a near-tie): used
for fp32 parity on tie-free inputs. "plain" weights (timm's init) keep a random model's decisions
stable under half-precision noise: used where fp16/bf16 are compared with fp32.

Developers may set IMAGEPIECE_TEST_ARTIFACT_CACHE=<folder> to keep artifacts between sessions: each
is stored under a key over its spec, torch and every source file that shapes it, so any change to
the model, the exporter or the compile script compiles afresh. CI leaves it unset.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch

import imagepiece
from imagepiece.bench.random_weights import SHARPEN, sharpen_attention
from imagepiece.export import source_sha256
from imagepiece.input_format import PixelInput

ROOT = Path(__file__).resolve().parent.parent
# Each compile is mostly one single-threaded C++ compile of the wrapper: two at a time on the 2-core
# CI machine, more where there are cores for them (the GPU machine has 16).
PARALLEL_BUILDS = max(2, min(4, (os.cpu_count() or 2) // 4))
CACHE_ENV = "IMAGEPIECE_TEST_ARTIFACT_CACHE"


@dataclass(frozen=True)
class Spec:
    arch: str
    method: str
    batch_args: tuple
    suffix: str = ".so"
    device: str = "cpu"
    dtype: str = "fp32"
    weights: str = "sharpened"
    input_format: str = "float"  # aot_compile.py --input-format

    def available(self) -> bool:
        return self.device == "cpu" or torch.cuda.is_available()


SPECS: Dict[str, Spec] = {
    "ti_plain": Spec("deit_tiny_patch16_224", "plain", ("--batch", "2")),
    "ti_tome_pt2": Spec("deit_tiny_patch16_224", "tome", ("--batch", "2"), ".pt2"),
    "ti_tome": Spec("deit_tiny_patch16_224", "tome", ("--batch", "2")),  # ti_tome_pt2's model as a .so
    "ti_evit": Spec("deit_tiny_patch16_224", "evit", ("--batch", "2")),
    "ti_imagepiece": Spec("deit_tiny_patch16_224", "imagepiece", ("--batch", "2")),
    "ti_imagepiece_dynamic": Spec("deit_tiny_patch16_224", "imagepiece", ("--max-batch", "64")),
    "s_imagepiece": Spec("deit_small_patch16_224", "imagepiece", ("--batch", "2")),
    # Takes uint8 [B, 224, 224, 3] pixels and normalises them itself; same weights as ti_imagepiece.
    "ti_imagepiece_uint8": Spec("deit_tiny_patch16_224", "imagepiece", ("--batch", "2"), input_format="uint8"),
    # int8 (PT2E): timm-init weights, like the half-precision GPU artifacts (sharpened ones turn int8 noise into chaos).
    "ti_imagepiece_int8": Spec("deit_tiny_patch16_224", "imagepiece", ("--batch", "2"), dtype="int8", weights="plain"),
    # bf16 on the CPU (timm-init weights, as for int8): compiled with its default attention kernel, matmul.
    "ti_imagepiece_bf16": Spec("deit_tiny_patch16_224", "imagepiece", ("--batch", "2"), dtype="bf16", weights="plain"),
    # bf16 logits for uint8 pixels, the one artifact numpy can feed whose logits numpy has no type for.
    "ti_plain_bf16_uint8": Spec("deit_tiny_patch16_224", "plain", ("--batch", "2"), dtype="bf16", weights="plain", input_format="uint8"),
    # Compiled on the GPU itself when there is one (an artifact is tied to its device and torch).
    "cuda_ti_imagepiece": Spec("deit_tiny_patch16_224", "imagepiece", ("--batch", "2"), device="cuda"),
    "cuda_ti_imagepiece_dynamic": Spec("deit_tiny_patch16_224", "imagepiece", ("--max-batch", "256"), device="cuda"),
    "cuda_s_imagepiece_fp16": Spec("deit_small_patch16_224", "imagepiece", ("--batch", "64"), device="cuda", dtype="fp16", weights="plain"),
    # bf16 with a dynamic batch, as the GPU benchmarks build it; fp16 static: both batch kinds in half precision.
    "cuda_s_imagepiece_bf16": Spec("deit_small_patch16_224", "imagepiece", ("--max-batch", "256"), device="cuda", dtype="bf16", weights="plain"),
}


def random_state_dict(arch: str, weights: str) -> dict:
    torch.manual_seed(0)
    model = imagepiece.create_model(arch, "plain")
    if weights == "sharpened":
        sharpen_attention(model)
    return model.state_dict()


class CompiledArtifacts:
    """name -> compiled artifact path (built lazily in the background) and its eager twin."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._pool = ThreadPoolExecutor(max_workers=PARALLEL_BUILDS)
        self._builds: Dict[str, Future] = {}
        self._lock = threading.Lock()

    def checkpoint(self, arch: str, weights: str = "sharpened") -> Path:
        path = self.folder / f"{arch}_{weights}.pth"
        with self._lock:
            if not path.exists():
                torch.save(random_state_dict(arch, weights), path)
        return path

    def _build(self, name: str) -> Path:
        spec = SPECS[name]
        out = self.folder / f"{name}{spec.suffix}"
        cached = _cache_entry(spec)
        if cached is not None and cached.is_file():
            shutil.copy(cached, out)
            return out
        command = [sys.executable, str(ROOT / "scripts" / "aot_compile.py"), "--arch", spec.arch, "--method", spec.method,
                   "--device", spec.device, "--dtype", spec.dtype, "--checkpoint", str(self.checkpoint(spec.arch, spec.weights)),
                   "--input-format", spec.input_format, *spec.batch_args, "--out", str(out)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {name} failed:\n{result.stdout}\n{result.stderr}")
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            staged = cached.with_name(f".{cached.name}.{os.getpid()}")
            shutil.copy(out, staged)
            staged.replace(cached)
        return out

    def start_all(self, device: str) -> None:
        """Start every artifact for `device`: a GPU-only run (scripts/gpu_check.sh) then waits for no CPU builds."""
        for name, spec in SPECS.items():
            if spec.device == device and spec.available() and name not in self._builds:
                self.checkpoint(spec.arch, spec.weights)
                self._builds[name] = self._pool.submit(self._build, name)

    def path(self, name: str) -> Path:
        self.start_all(SPECS[name].device)
        return self._builds[name].result()

    def eager(self, name: str) -> torch.nn.Module:
        """The fp32 eager model the artifact was compiled from (on the artifact's device); for an artifact
        that takes uint8 pixels, that model behind the same normalisation (a `PixelInput`)."""
        spec = SPECS[name]
        model = imagepiece.create_model(spec.arch, spec.method, checkpoint=self.checkpoint(spec.arch, spec.weights))
        if spec.input_format == "uint8":
            model = PixelInput(model, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
        return model.to(spec.device)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _cache_entry(spec: Spec):
    """Where a developer's artifact cache keeps `spec` (None when no cache is configured)."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        return None
    # The package's model sources as the metadata records them (editing predict, serve or bench recompiles nothing).
    digest = hashlib.sha256(repr((spec, torch.__version__, SHARPEN, source_sha256())).encode())
    for source in (ROOT / "scripts" / "aot_compile.py", Path(__file__)):
        digest.update(source.read_bytes())
    return Path(folder) / f"{digest.hexdigest()[:20]}{spec.suffix}"
