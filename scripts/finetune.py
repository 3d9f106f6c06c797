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
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch

import imagepiece
from imagepiece import CheckpointError, create_model
from imagepiece.command_line import OneLineErrors
from imagepiece.config import LCB_CHOICES, PRESETS, lcb_from_cli
from imagepiece.data import (DatasetError, check_storable_class_names, class_names, collate_readable, describe_class_differences,
                             eval_transform, image_folder, train_transform)
from imagepiece.environment import device_problem
from imagepiece.evaluation import NonFiniteLogits, eager_predictor, evaluate
from imagepiece.files import atomic_write_text, check_writable_dir, held_exclusively
from imagepiece.training import (RECIPES, CheckpointWriteError, Trainer, TrainingDiverged, check_recipe, epoch_order, log_line,
                                 save_checkpoint, seed_everything)
from imagepiece.termination import STOPPED, exit_status, how_stopped, sigterm_unwinds
from imagepiece.weights import fine_tuned_settings, read_state_dict

LOCK_NAME = ".finetune.lock"  # in --output while a run trains there
# What a run's last.pth records that the same command must repeat to resume it (else the saved optimizer and
# schedule would silently win over the new flags, or train another model under the old run's name).
RESUME_MUST_MATCH = ("arch", "preset", "lcb", "num_classes", "classes", "seed", "recipe")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrors(prog="finetune.py", description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with train/ and val/ (each <class>/<image>)")
    parser.add_argument("--output", type=Path, required=True, help="run folder: last.pth, best.pth, log.jsonl")
    parser.add_argument("--arch", default="deit_small_patch16_224", choices=sorted(imagepiece.ARCHS))
    parser.add_argument("--preset", default="imagepiece", choices=sorted(PRESETS))
    parser.add_argument("--lcb", choices=LCB_CHOICES, default="residual",
                        help="Local Coherence Bias to train (default residual; recorded in the checkpoint, which aot_compile, evaluate and "
                        "visualize take it from)")
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
    args = parser.parse_args(argv)
    if args.save_every < 1 or args.workers < 0 or (args.max_steps is not None and args.max_steps < 1):
        parser.error("--save-every and --max-steps must be >= 1, --workers >= 0")
    if not 0 <= args.seed < 2**32:  # what numpy's seeding takes
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if device_problem(args.device):
        parser.error(device_problem(args.device))
    return args


def resolve_recipe(args):
    recipe = RECIPES[args.recipe]
    overrides = {field.name: getattr(args, field.name) for field in dataclasses.fields(recipe)
                 if getattr(args, field.name, None) is not None}
    if args.auto_augment is not None:
        overrides["auto_augment"] = None if args.auto_augment == "none" else args.auto_augment
    recipe = dataclasses.replace(recipe, **overrides)
    scaled = ""
    if recipe.lr_base_batch and args.lr is None:
        recipe = dataclasses.replace(recipe, lr=recipe.lr * recipe.batch_size / recipe.lr_base_batch)
        scaled = (f" (lr {recipe.lr:.3g} is the recipe's {RECIPES[args.recipe].lr:g} x --batch-size {recipe.batch_size} / "
                  f"{recipe.lr_base_batch}: pass --lr or --min-lr)")
    try:
        check_recipe(recipe)
    except ValueError as error:  # e.g. a small batch scaled lr below min_lr: say where that lr came from
        raise ValueError(f"{error}{scaled}") from None
    if recipe.batch_size % 2 and (recipe.mixup > 0 or recipe.cutmix > 0):
        raise ValueError("mixup/cutmix need an even --batch-size")
    return recipe


def resume_mismatches(saved: dict, current: dict) -> list:
    """What `saved` (a last.pth) recorded differently from this command (keys it lacks are not compared)."""
    differing = []
    for key in RESUME_MUST_MATCH:
        if key not in saved or saved[key] == current[key]:
            continue
        if isinstance(saved[key], dict) and isinstance(current[key], dict):  # the recipe: the fields that differ
            differing += [f"{key} {field}: the run has {saved[key].get(field, 'no value')!r}, this command "
                          f"{current[key].get(field, 'no value')!r}" for field in sorted(set(saved[key]) | set(current[key]))
                          if field not in saved[key] or field not in current[key] or saved[key][field] != current[key][field]]
        else:
            differing.append(f"{key}: the run has {saved[key]!r}, this command {current[key]!r}")
    return differing


def another_runs_best(best: Path, current: dict) -> bool:
    """Whether `best` (a best.pth where no last.pth is) belongs to another run than this command's. Its own first
    epoch cut short while saving (best.pth is written before last.pth) is not: a best.pth of epoch 1 with this
    command's settings starts over, as the run would have."""
    if not best.exists():
        return False
    try:
        saved = torch.load(best, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: not this run's to replace either
        return True
    return not isinstance(saved, dict) or saved.get("epoch") != 1 or bool(resume_mismatches(saved, current))


def name_skipped(unreadable, reported: set) -> None:
    """Name each undecodable file once per run, in training and in validation alike."""
    for path, error in unreadable:
        if path not in reported:
            reported.add(path)
            print(f"finetune.py: skipped {path}: {error}", file=sys.stderr)


def usable_batch(images, targets, unreadable, even: bool, reported: set):
    """The decoded part of a loader batch (None if nothing is left), naming its undecodable files;
    mixup pairs images, so `even` drops one more when the count is odd."""
    name_skipped(unreadable, reported)
    if images is not None and even and len(images) % 2:
        images, targets = images[:-1], targets[:-1]
    return (images, targets) if images is not None and len(images) else None


def build_model(args, recipe, lcb):
    """The model to train. A checkpoint brings its own head size: one this script wrote records it (e.g. its
    best.pth), any other has it in its head.weight (a timm model fine-tuned on other classes)."""
    settings = fine_tuned_settings(args.checkpoint) if args.checkpoint is not None else None
    if settings:
        head = {"num_classes": settings["num_classes"]}
    elif args.checkpoint is not None:
        head_weight = read_state_dict(args.checkpoint).get("head.weight")
        # No head (a self-supervised backbone, a num_classes=0 export): built without one, main() adds the dataset's.
        head = {"num_classes": head_weight.shape[0] if head_weight is not None and head_weight.dim() == 2 else 0}
    else:
        head = {}
    model = create_model(args.arch, lcb=lcb, drop_path_rate=recipe.drop_path, **PRESETS[args.preset], **head)
    if args.checkpoint is not None:
        imagepiece.load_checkpoint(model, args.checkpoint, allow_untrained_lcb=lcb == "stem")
    return model


def keep_log_up_to(log: Path, step: int) -> None:
    """A run resumes from its last save and takes the steps after it again: their lines from the interrupted
    run (and a line cut short by a kill) leave the log, so that each step is logged once."""
    lines = log_records(log)
    kept = [line for line, record in lines if record is not None and record.get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(log, "".join(kept))


def logged_step_losses(log: Path, epoch: int) -> list:
    """The losses `log` holds for the steps of `epoch` (a resumed run's epoch began in an earlier run)."""
    return [record["loss"] for _, record in log_records(log) if record is not None and "loss" in record and record.get("epoch") == epoch]


def log_records(log: Path) -> list:
    """(line, its JSON object, or None for a line cut short by a kill) for each line of `log`."""
    if not log.exists():
        return []
    records = []
    for line in log.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        records.append((line, record if isinstance(record, dict) else None))
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    device = torch.device(args.device)
    try:
        recipe = resolve_recipe(args)
        train_set = image_folder(args.data / "train")
        val_set = image_folder(args.data / "val")
        names = class_names(train_set)
        check_storable_class_names(names)  # before training, not when an artifact is compiled from the result
        if class_names(val_set) != names:  # labels are indices: the same count in another order scores nonsense
            raise DatasetError(f"train and val must have the same class folders ({describe_class_differences(names, class_names(val_set), 'train')})")
        classes = len(names)
        lcb = lcb_from_cli(args.lcb)
        model = build_model(args, recipe, lcb)
        # A DeiT checkpoint has a 1000-class head; replace it when the dataset has other classes.
        if classes != model.num_classes:
            model.reset_classifier(classes)
        preprocessing = model.pretrained_cfg
        try:
            train_set.transform = train_transform(preprocessing, recipe.auto_augment, recipe.re_prob)
        except (AssertionError, KeyError, ValueError) as error:  # timm asserts on an unknown policy
            raise ValueError(f"--auto-augment {recipe.auto_augment!r} is not a timm auto-augment policy ({error})") from None
        drop_last = recipe.mixup > 0 or recipe.cutmix > 0  # mixup needs even batches
        steps_per_epoch = len(train_set) // recipe.batch_size if drop_last else -(-len(train_set) // recipe.batch_size)
        if steps_per_epoch == 0:
            raise ValueError(f"{len(train_set)} training images are fewer than one batch of {recipe.batch_size}")
        check_writable_dir(args.output, create=True)  # made last: a refused command leaves no empty run folder
    except (ValueError, CheckpointError, DatasetError) as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        return 2

    with contextlib.ExitStack() as held:
        try:  # two runs on one --output would resume from each other's last.pth and both write its log and checkpoints
            held.enter_context(held_exclusively(args.output / LOCK_NAME, f"--output {args.output}"))
        except ValueError as error:
            print(f"finetune.py: error: {error}", file=sys.stderr)
            return 2
        val_set.transform = eval_transform(preprocessing)
        trainer = Trainer(model, recipe, classes, steps_per_epoch, device, args.amp)
        last = args.output / "last.pth"
        run = {"best_accuracy": 0.0}  # updated by train(); every checkpoint records it with the run's settings
        extra = lambda: {"best_accuracy": run["best_accuracy"], "arch": args.arch, "preset": args.preset, "lcb": lcb,
                         "num_classes": classes, "classes": names, "seed": args.seed,
                         "reduction": model.reduction_config.to_dict()}
        if not last.exists() and another_runs_best(args.output / "best.pth", extra()):
            # Starting afresh here would cut that run's log and, at the first epoch's end, replace its best.pth.
            print(f"finetune.py: error: {args.output} holds best.pth of an earlier run but no last.pth to resume it from: "
                  "give another --output (or remove best.pth and log.jsonl there to start over)", file=sys.stderr)
            return 2
        if last.exists():
            try:
                # On the CPU: the RNG states must stay there; load_state_dict moves the rest to the model's device.
                state = torch.load(last, map_location="cpu", weights_only=True)
                differing = resume_mismatches(state, {**extra(), "recipe": dataclasses.asdict(recipe)})
                if differing:
                    print(f"finetune.py: error: {last} belongs to a run with other settings ({'; '.join(differing)}); "
                          "repeat that run's flags to resume it, or give another --output", file=sys.stderr)
                    return 2
                trainer.restore(state)
            except Exception as error:  # truncated, not a last.pth (a best.pth has no optimizer), another model's shapes
                print(f"finetune.py: error: cannot resume from {last}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}; "
                      "move it away to start afresh", file=sys.stderr)
                return 2
            run["best_accuracy"] = state.get("best_accuracy", 0.0)
            print(f"resumed from {last}: epoch {trainer.epoch}, step {trainer.global_step}"
                  + (f" (the weights of --checkpoint {args.checkpoint} are replaced by last.pth's)" if args.checkpoint else ""))
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=recipe.batch_size, num_workers=args.workers,
                                                 collate_fn=collate_readable)
        log = args.output / "log.jsonl"
        keep_log_up_to(log, trainer.global_step)
        if args.max_steps and trainer.global_step >= args.max_steps:  # the same command again: nothing left to do
            print(f"already at step {trainer.global_step} (--max-steps {args.max_steps}): nothing to train; "
                  "a larger --max-steps (or none) goes on")
            return 0
        if trainer.epoch >= recipe.epochs:
            print(f"already finished: {recipe.epochs} epochs, best val top-1 {run['best_accuracy']:.2f}% -> {args.output / 'best.pth'}")
            return 0
        print(f"training {args.arch} {args.preset} (lcb {lcb}) on {len(train_set)} images, {classes} classes: {recipe}")
        try:
            with sigterm_unwinds():  # a scheduler's SIGTERM too: checkpoints are renamed into place, so none is half written
                train(args, recipe, trainer, train_set, val_loader, device, run, extra, log, drop_last)
        except (TrainingDiverged, NonFiniteLogits, CheckpointWriteError, DatasetError) as error:
            saved = (f"{last} holds the last good state (resuming takes the same flags; other flags, e.g. a lower --lr, "
                     "need another --output)") if last.exists() else "nothing was saved"
            print(f"finetune.py: error: {error}; {saved}", file=sys.stderr)
            return 1
        except STOPPED as stop:
            saved = (f"{last} holds the last saved step: rerun the same command to resume" if last.exists()
                     else f"nothing was saved yet (the first save is at step {args.save_every} or the epoch's end)")
            print(f"finetune.py: {how_stopped(stop)}; {saved}", file=sys.stderr)
            return exit_status(stop)
        return 0


def train(args, recipe, trainer, train_set, val_loader, device, run, extra, log, drop_last) -> None:
    """The epochs left, from where `trainer` stands; checkpoints as it goes, the best one by val top-1."""
    last, best = args.output / "last.pth", args.output / "best.pth"
    reported = set()
    # Steps an interrupted run took in the epoch this one resumes: its train_loss is the whole epoch's mean.
    earlier_losses = logged_step_losses(log, trainer.epoch) if trainer.step_in_epoch else []
    while trainer.epoch < recipe.epochs:
        order = epoch_order(len(train_set), args.seed, trainer.epoch)[trainer.batches_in_epoch * recipe.batch_size:]
        # Its own generator: creating a loader must not draw from the global RNG that augmentation
        # uses, or a resumed run would diverge from an uninterrupted one.
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, order.tolist()), batch_size=recipe.batch_size,
                                             num_workers=args.workers, drop_last=drop_last, collate_fn=collate_readable,
                                             generator=torch.Generator().manual_seed(args.seed + trainer.epoch))
        losses, stopping = [], False
        for seen, batch in enumerate(loader, start=1):
            usable = usable_batch(*batch, even=drop_last, reported=reported)
            if usable is None:
                trainer.skip_batch()
                continue
            lr = trainer.optimizer.param_groups[0]["lr"]  # the step's own: the step sets the next one
            losses.append(trainer.train_step(*usable))
            log_line(log, {"step": trainer.global_step, "epoch": trainer.epoch, "loss": losses[-1], "lr": lr}, echo=lambda line: None)
            if trainer.global_step % args.save_every == 0:
                save_checkpoint(last, trainer.state(extra()))
            if args.max_steps and trainer.global_step >= args.max_steps:
                stopping = True
                if seen == len(loader):
                    break  # the epoch's last step: the epoch ends (validation, best.pth) before the run stops
                save_checkpoint(last, trainer.state(extra()))
                print(f"stopped at step {trainer.global_step} (--max-steps); rerun with a larger --max-steps (or none) to resume")
                return
        if trainer.step_in_epoch == 0:  # not one step: "training" on would save the initial weights as the best
            raise DatasetError(f"no training image of epoch {trainer.epoch} decoded (each skipped file is named above)")
        trainer.end_epoch()
        result = evaluate(eager_predictor(trainer.model), val_loader, device)
        name_skipped(((entry["path"], entry["error"]) for entry in result["unreadable"]), reported)
        if result["images"] == 0:  # a top-1 of 0% over no image would be logged, and saved as the best
            raise DatasetError("no validation image decoded (each skipped file is named above)")
        top1 = result["top1"]
        if top1 >= run["best_accuracy"]:
            run["best_accuracy"] = top1
            save_checkpoint(best, {"model": trainer.model.state_dict(), **extra(), "epoch": trainer.epoch})
        save_checkpoint(last, trainer.state(extra()))
        epoch_losses, earlier_losses = earlier_losses + losses, []
        log_line(log, {"epoch": trainer.epoch, "step": trainer.global_step,
                       "train_loss": sum(epoch_losses) / len(epoch_losses) if epoch_losses else None,
                       "val_top1": top1, "best_top1": run["best_accuracy"]})
        if stopping and trainer.epoch < recipe.epochs:
            print(f"stopped at step {trainer.global_step} (--max-steps), after epoch {trainer.epoch} of {recipe.epochs}; "
                  "rerun with a larger --max-steps (or none) to resume")
            return
    print(f"done: best val top-1 {run['best_accuracy']:.2f}% -> {best}")


if __name__ == "__main__":
    sys.exit(main())
