"""Fine-tuning an ImagePiece-family model with timm's training parts (scripts/finetune.py).

Two documented recipes:
  * "finetune": EViT's fine-tuning of a pretrained DeiT with token reduction in place (30 epochs,
    AdamW, lr 2e-5 -> 2e-6 cosine, weight decay 1e-6), DeiT's augmentation and mixup.
  * "deit": DeiT's 300-epoch recipe from scratch (lr 5e-4 x batch/512, weight decay 0.05, 5 warm-up
    epochs, RandAugment, random erasing, mixup 0.8 / cutmix 1.0, label smoothing 0.1, drop path 0.1),
    the one the ImagePiece paper trains with (needed to train LCB "stem").

Checkpoints are written to a temporary file and renamed, so a kill at any moment leaves the last
complete checkpoint; resuming restores model, optimizer, scheduler, step counters and the data order.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from .files import atomic_write


@dataclass
class Recipe:
    epochs: int
    lr: float
    min_lr: float
    weight_decay: float
    warmup_epochs: int
    batch_size: int
    mixup: float
    cutmix: float
    smoothing: float
    drop_path: float
    auto_augment: Optional[str]
    re_prob: float
    lr_base_batch: Optional[int] = None  # DeiT scales lr by batch / 512; None: lr is absolute


RECIPES = {
    "finetune": Recipe(epochs=30, lr=2e-5, min_lr=2e-6, weight_decay=1e-6, warmup_epochs=0, batch_size=128,
                       mixup=0.8, cutmix=1.0, smoothing=0.1, drop_path=0.0, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25),
    "deit": Recipe(epochs=300, lr=5e-4, min_lr=1e-5, weight_decay=0.05, warmup_epochs=5, batch_size=128,
                   mixup=0.8, cutmix=1.0, smoothing=0.1, drop_path=0.1, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                   lr_base_batch=512),
}


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_recipe(recipe: Recipe) -> Recipe:
    """`recipe`, or ValueError naming the settings no training can run with (a non-finite lr trains NaN weights)."""
    numbers = {name: value for name, value in dataclasses.asdict(recipe).items() if isinstance(value, (int, float))}
    # The optimizer holds them as float32: 1e39 is finite here and overflows there.
    bad = [name for name, value in numbers.items() if not math.isfinite(value) or abs(value) > FLOAT32_MAX]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be finite numbers within float32's range: {recipe}")
    rules = [("epochs", recipe.epochs >= 1, ">= 1"), ("batch_size", recipe.batch_size >= 1, ">= 1"), ("lr", recipe.lr > 0, "> 0"),
             ("min_lr", recipe.min_lr >= 0, ">= 0"), ("weight_decay", recipe.weight_decay >= 0, ">= 0"),
             ("warmup_epochs", recipe.warmup_epochs >= 0, ">= 0"),
             # The cosine would climb from lr up to min_lr; a warm-up as long as the run never reaches lr.
             ("min_lr", recipe.min_lr <= recipe.lr, f"<= lr {recipe.lr:.3g}"),
             ("warmup_epochs", recipe.warmup_epochs < recipe.epochs, f"< epochs {recipe.epochs}"), ("mixup", recipe.mixup >= 0, ">= 0"),
             ("cutmix", recipe.cutmix >= 0, ">= 0"), ("smoothing", 0 <= recipe.smoothing < 1, "in [0, 1)"),
             ("drop_path", 0 <= recipe.drop_path < 1, "in [0, 1)"), ("re_prob", 0 <= recipe.re_prob <= 1, "in [0, 1]")]
    broken = [f"{name} {rule} (got {getattr(recipe, name)})" for name, holds, rule in rules if not holds]
    if broken:
        raise ValueError("the recipe needs " + "; ".join(broken))
    return recipe


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost folder); the previous one is intact."""


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite: the step was not taken, so the weights are still finite."""


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save beside `path`, then an atomic rename: never a half-written checkpoint."""
    try:
        atomic_write(path, lambda staged: torch.save(state, staged))
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointWriteError(f"cannot write {path} (disk full?): {message}; the previous checkpoint is intact") from None


def _numpy_rng_state() -> tuple:
    # As tensors and plain numbers, so checkpoints load with torch.load(weights_only=True).
    name, keys, position, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)


class Trainer:
    """One training run: model, optimizer, scheduler, mixup and counters, resumable from a checkpoint."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, num_classes: int, steps_per_epoch: int,
                 device: torch.device, amp: bool) -> None:
        self.model, self.recipe, self.device, self.amp = model.to(device), recipe, device, amp
        self.optimizer = create_optimizer_v2(model, opt="adamw", lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched="cosine", num_epochs=recipe.epochs, min_lr=recipe.min_lr,
                                                warmup_epochs=recipe.warmup_epochs, step_on_epochs=False,
                                                # DeiT's warm-up starts at 1e-6 (timm's default, 1e-5, is above a small lr)
                                                warmup_lr=min(1e-6, recipe.lr),
                                                updates_per_epoch=steps_per_epoch)
        mixing = recipe.mixup > 0 or recipe.cutmix > 0
        self.mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.smoothing,
                           num_classes=num_classes) if mixing else None
        self.criterion = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(recipe.smoothing)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
        self.epoch = 0  # current epoch
        self.step_in_epoch = 0  # optimizer steps done in the current epoch
        # Loader batches the current epoch consumed, skipped ones (no image decoded) included: where a resumed
        # epoch picks up its sample order. Counting steps instead would replay samples after a skipped batch.
        self.batches_in_epoch = 0
        self.global_step = 0

    def state(self, extra: dict) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "batches_in_epoch": self.batches_in_epoch,
                "global_step": self.global_step,
                "recipe": dataclasses.asdict(self.recipe),
                # Augmentation and mixup draw from these: restoring them makes a resumed run
                # continue exactly as the uninterrupted one would have.
                "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()},
                **extra}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.batches_in_epoch = state.get("batches_in_epoch", self.step_in_epoch)  # older checkpoints: a batch per step
        torch.set_rng_state(state["rng"]["torch"])
        name, keys, position, has_gauss, cached = state["rng"]["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        random.setstate(state["rng"]["python"])

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        self.model.train()
        images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with torch.autocast(self.device.type, dtype=torch.bfloat16 if self.device.type == "cpu" else torch.float16, enabled=self.amp):
            loss = self.criterion(self.model(images), targets)
        if not bool(torch.isfinite(loss)):  # before the step: the weights stay finite, and the run can resume with other flags
            raise TrainingDiverged(f"the loss became {float(loss.detach())} at step {self.global_step + 1} (epoch {self.epoch}); "
                                   "the step was not taken: lower --lr, or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        self.step_in_epoch += 1
        self.batches_in_epoch += 1
        self.scheduler.step_update(num_updates=self.global_step)
        return float(loss.detach())

    def skip_batch(self) -> None:
        """A batch of which no image (or, for mixup, no even number of images) decoded: consumed without a step."""
        self.batches_in_epoch += 1

    def end_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.batches_in_epoch = 0
        self.scheduler.step(self.epoch)


def seed_everything(seed: int) -> None:
    """Seed every RNG that initialisation, augmentation (timm uses `random` too) and mixup draw from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of an epoch, a pure function of (seed, epoch): resumable exactly."""
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def log_line(path: Path, record: dict, echo: Callable[[str], None] = print) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    echo(json.dumps(record))
