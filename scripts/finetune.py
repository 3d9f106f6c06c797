#!/usr/bin/env python
"""Fine-tune an ImagePiece-family DeiT on an ImageNet-style folder (or train LCB "stem" from scratch).

Recipes (defaults, each overridable): "finetune" = EViT's fine-tuning of a DeiT checkpoint with token
reduction in place: 30 epochs, AdamW, lr 2e-5 -> 2e-6 cosine, weight decay 1e-6; "deit" = DeiT's
300-epoch recipe (lr 5e-4 x batch/512, wd 0.05, warm-up 5, RandAugment, mixup/cutmix, label smoothing,
drop path 0.1). Checkpoints (<output>/last.pth, best.pth) are written then renamed, so a kill loses at
most the steps since the last save; rerunning the same command resumes from last.pth.

examples:
  python scripts/finetune.py --data imagenet --checkpoint deit_small_patch16_224-cd65a155.pth --lcb residual --output runs/ip_s
  python scripts/finetune.py --data imagenet --recipe deit --lcb stem --output runs/ip_s_stem
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

import imagepiece
from imagepiece import CheckpointError, create_model
from imagepiece.config import LCB_CHOICES, PRESETS, lcb_from_cli
from imagepiece.data import DatasetError, eval_transform, image_folder, num_classes, train_transform
from imagepiece.evaluation import eager_predictor, evaluate
from imagepiece.files import check_writable_dir
from imagepiece.training import RECIPES, Trainer, epoch_order, log_line, save_checkpoint, seed_everything


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with train/ and val/ (each <class>/<image>)")
    parser.add_argument("--output", type=Path, required=True, help="run folder: last.pth, best.pth, log.jsonl")
    parser.add_argument("--arch", default="deit_small_patch16_224", choices=sorted(imagepiece.ARCHS))
    parser.add_argument("--preset", default="imagepiece", choices=sorted(PRESETS))
    parser.add_argument("--lcb", choices=LCB_CHOICES, default="residual",
                        help="Local Coherence Bias to train (default residual; pass the same --lcb to aot_compile, evaluate, visualize)")
    parser.add_argument("--checkpoint", type=Path, help="initial weights, e.g. a DeiT .pth (default: random init)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="finetune")
    for name, kind in (("epochs", int), ("lr", float), ("min-lr", float), ("weight-decay", float), ("warmup-epochs", int),
                       ("batch-size", int), ("mixup", float), ("cutmix", float), ("smoothing", float), ("drop-path", float),
                       ("re-prob", float)):
        parser.add_argument(f"--{name}", type=kind, help="override the recipe")
    parser.add_argument("--auto-augment", help="timm auto-augment string, 'none' to disable (recipe: rand-m9-mstd0.5-inc1)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total (smoke runs)")
    parser.add_argument("--save-every", type=int, default=500, help="also checkpoint every N steps (and at each epoch end)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                        help="mixed precision (default: on for CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def resolve_recipe(args):
    recipe = RECIPES[args.recipe]
    overrides = {field.name: getattr(args, field.name) for field in dataclasses.fields(recipe)
                 if getattr(args, field.name, None) is not None}
    if args.auto_augment is not None:
        overrides["auto_augment"] = None if args.auto_augment == "none" else args.auto_augment
    recipe = dataclasses.replace(recipe, **overrides)
    if recipe.lr_base_batch and args.lr is None:
        recipe = dataclasses.replace(recipe, lr=recipe.lr * recipe.batch_size / recipe.lr_base_batch)
    if recipe.epochs < 1 or recipe.batch_size < 1 or recipe.lr <= 0:
        raise ValueError(f"epochs, batch size and lr must be positive: {recipe}")
    if recipe.batch_size % 2 and (recipe.mixup > 0 or recipe.cutmix > 0):
        raise ValueError("mixup/cutmix need an even --batch-size")
    return recipe


def main(argv=None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    device = torch.device(args.device)
    try:
        recipe = resolve_recipe(args)
        check_writable_dir(args.output, create=True)
        train_set = image_folder(args.data / "train")
        val_set = image_folder(args.data / "val")
        classes = num_classes(train_set)
        if num_classes(val_set) != classes:
            raise DatasetError(f"train has {classes} classes but val has {num_classes(val_set)}")
        lcb = lcb_from_cli(args.lcb)
        model = create_model(args.arch, lcb=lcb, drop_path_rate=recipe.drop_path, **PRESETS[args.preset])
        if args.checkpoint is not None:
            # A DeiT checkpoint has a 1000-class head; replace it when the dataset has other classes.
            imagepiece.load_checkpoint(model, args.checkpoint, allow_untrained_lcb=lcb == "stem")
        if classes != model.num_classes:
            model.reset_classifier(classes)
    except (ValueError, CheckpointError, DatasetError) as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        return 2

    preprocessing = model.pretrained_cfg
    train_set.transform = train_transform(preprocessing, recipe.auto_augment, recipe.re_prob)
    val_set.transform = eval_transform(preprocessing)
    drop_last = recipe.mixup > 0 or recipe.cutmix > 0  # mixup needs even batches
    steps_per_epoch = len(train_set) // recipe.batch_size if drop_last else -(-len(train_set) // recipe.batch_size)
    if steps_per_epoch == 0:
        print(f"finetune.py: error: {len(train_set)} training images are fewer than one batch of {recipe.batch_size}", file=sys.stderr)
        return 2
    trainer = Trainer(model, recipe, classes, steps_per_epoch, device, args.amp)
    last, best = args.output / "last.pth", args.output / "best.pth"
    best_accuracy = 0.0
    if last.exists():
        state = torch.load(last, map_location=device, weights_only=True)
        trainer.restore(state)
        best_accuracy = state.get("best_accuracy", 0.0)
        print(f"resumed from {last}: epoch {trainer.epoch}, step {trainer.global_step}")
    extra = lambda: {"best_accuracy": best_accuracy, "arch": args.arch, "preset": args.preset, "lcb": lcb, "num_classes": classes}
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=recipe.batch_size, num_workers=args.workers)
    log = args.output / "log.jsonl"
    if args.max_steps and trainer.global_step >= args.max_steps:  # the same command again: nothing left to do
        print(f"already at step {trainer.global_step} (--max-steps {args.max_steps}): nothing to train")
        return 0
    print(f"training {args.arch} {args.preset} (lcb {lcb}) on {len(train_set)} images, {classes} classes: {recipe}")

    while trainer.epoch < recipe.epochs:
        order = epoch_order(len(train_set), args.seed, trainer.epoch)[trainer.step_in_epoch * recipe.batch_size:]
        # Its own generator: creating a loader must not draw from the global RNG that augmentation
        # uses, or a resumed run would diverge from an uninterrupted one.
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, order.tolist()), batch_size=recipe.batch_size,
                                             num_workers=args.workers, drop_last=drop_last,
                                             generator=torch.Generator().manual_seed(args.seed + trainer.epoch))
        losses = []
        for images, targets in loader:
            losses.append(trainer.train_step(images, targets))
            log_line(log, {"step": trainer.global_step, "epoch": trainer.epoch, "loss": losses[-1],
                           "lr": trainer.optimizer.param_groups[0]["lr"]}, echo=lambda line: None)
            if trainer.global_step % args.save_every == 0:
                save_checkpoint(last, trainer.state(extra()))
            if args.max_steps and trainer.global_step >= args.max_steps:
                save_checkpoint(last, trainer.state(extra()))
                print(f"stopped at step {trainer.global_step} (--max-steps); rerun to resume")
                return 0
        trainer.end_epoch()
        top1 = evaluate(eager_predictor(model), val_loader, device)["top1"]
        if top1 >= best_accuracy:
            best_accuracy = top1
            save_checkpoint(best, {"model": model.state_dict(), **extra(), "epoch": trainer.epoch})
        save_checkpoint(last, trainer.state(extra()))
        # The mean of the steps this run took in the epoch (None: resumed at its very end, the losses went with the last run).
        log_line(log, {"epoch": trainer.epoch, "step": trainer.global_step, "train_loss": sum(losses) / len(losses) if losses else None,
                       "val_top1": top1, "best_top1": best_accuracy})
    print(f"done: best val top-1 {best_accuracy:.2f}% -> {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
