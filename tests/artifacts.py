"""Artifacts compiled once per test session, two at a time, through the real CLI.

Compiling is the slow part of the suite (~1 min per model on 2 cores), so every artifact a test
needs is listed here once; the first request starts all builds in the background and each test
waits only for the artifact it uses.

Weights are random, saved to a checkpoint that both the compiled artifact and the eager reference
load. "sharpened" weights scale the query/key projections by SHARPEN so attention is peaked like a
trained DeiT's (random init gives near-uniform attention, where every ranking is a near-tie): used
for fp32 parity on tie-free inputs. "plain" weights (timm's init) keep a random model's decisions
stable under half-precision noise: used where fp16/bf16 are compared with fp32.
"""
from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch

import imagepiece

ROOT = Path(__file__).resolve().parent.parent
SHARPEN = 6.0
PARALLEL_BUILDS = 2


@dataclass(frozen=True)
class Spec:
    arch: str
    method: str
    batch_args: tuple
    suffix: str = ".so"
    device: str = "cpu"
    dtype: str = "fp32"
    weights: str = "sharpened"

    def available(self) -> bool:
        return self.device == "cpu" or torch.cuda.is_available()


SPECS: Dict[str, Spec] = {
    "ti_none": Spec("deit_tiny_patch16_224", "none", ("--batch", "2")),
    "ti_tome_pt2": Spec("deit_tiny_patch16_224", "tome", ("--batch", "2"), ".pt2"),
    "ti_evit": Spec("deit_tiny_patch16_224", "evit", ("--batch", "2")),
    "ti_imagepiece": Spec("deit_tiny_patch16_224", "imagepiece", ("--batch", "2")),
    "ti_imagepiece_dynamic": Spec("deit_tiny_patch16_224", "imagepiece", ("--max-batch", "64")),
    "s_imagepiece": Spec("deit_small_patch16_224", "imagepiece", ("--batch", "2")),
    # Compiled on the GPU itself when there is one (an artifact is tied to its device and torch).
    "cuda_ti_imagepiece": Spec("deit_tiny_patch16_224", "imagepiece", ("--batch", "2"), device="cuda"),
    "cuda_ti_imagepiece_dynamic": Spec("deit_tiny_patch16_224", "imagepiece", ("--max-batch", "256"), device="cuda"),
    "cuda_s_imagepiece_fp16": Spec("deit_small_patch16_224", "imagepiece", ("--batch", "64"), device="cuda", dtype="fp16", weights="plain"),
    "cuda_s_imagepiece_bf16": Spec("deit_small_patch16_224", "imagepiece", ("--batch", "64"), device="cuda", dtype="bf16", weights="plain"),
}


def random_state_dict(arch: str, weights: str) -> dict:
    torch.manual_seed(0)
    model = imagepiece.create_model(arch, "none")
    if weights == "sharpened":
        with torch.no_grad():
            for block in model.blocks:
                queries_and_keys = 2 * block.attn.qkv.in_features
                block.attn.qkv.weight[:queries_and_keys] *= SHARPEN
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
        command = [sys.executable, str(ROOT / "scripts" / "aot_compile.py"), "--arch", spec.arch, "--method", spec.method,
                   "--device", spec.device, "--dtype", spec.dtype, "--checkpoint", str(self.checkpoint(spec.arch, spec.weights)),
                   *spec.batch_args, "--out", str(out)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {name} failed:\n{result.stdout}\n{result.stderr}")
        return out

    def start_all(self) -> None:
        for name, spec in SPECS.items():
            if spec.available() and name not in self._builds:
                self.checkpoint(spec.arch, spec.weights)
                self._builds[name] = self._pool.submit(self._build, name)

    def path(self, name: str) -> Path:
        self.start_all()
        return self._builds[name].result()

    def eager(self, name: str) -> imagepiece.ImagePieceViT:
        """The fp32 eager model the artifact was compiled from (on the artifact's device)."""
        spec = SPECS[name]
        model = imagepiece.create_model(spec.arch, spec.method, checkpoint=self.checkpoint(spec.arch, spec.weights))
        return model.to(spec.device)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
