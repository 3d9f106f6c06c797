"""reevaluation: how many keep/prune decisions the paper's re-evaluation changes against summed scores.

At each ImagePiece pruning block, the same merged tokens are scored both ways, the class attention
recomputed over the merged tokens ("attention", the default) and a piece's parts' scores summed
("sum"), and the two kept sets are compared. The model runs with "attention", so later blocks see what
the default model sees. Reported per pruning block: the share of image tokens whose keep/prune
decision differs (mean and worst image) and how many images differ at all. No hub weights exist
here, so weights are random: timm's init (near-uniform attention, where rankings are near-ties) or
"sharpened" (query/key projections scaled up so attention peaks, as in a trained DeiT).
"""
from __future__ import annotations

import argparse
from typing import Dict, List

import torch

from ..blocks import AttentionReevaluation, ImagePieceReduction, Pruning, SummedScores
from ..model import create_model
from ..reduce import retokenize
from .random_weights import WEIGHTS, random_weights
from .results import ResultsWriter

HELP = "keep/prune decisions changed by re-evaluation vs summed scores (eager, no timing)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=list(WEIGHTS))
    parser.add_argument("--images", type=int, default=64, help="Gaussian-noise images")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.images < 1 or args.batch < 1:
        parser.error("--images and --batch must be >= 1")
    args.weights = list(dict.fromkeys(args.weights))  # given twice, its blocks would be reported twice under one key


def _kept(scores: torch.Tensor, num_kept: int) -> torch.Tensor:
    """[B, N'] bool: the image tokens pruning keeps ([CLS] column False)."""
    top = scores[:, 1:].topk(num_kept, dim=1).indices + 1
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)


def changed_decisions(model: torch.nn.Module, images: torch.Tensor) -> Dict[int, torch.Tensor]:
    """Per pruning block: [B] share of image tokens whose keep/prune decision differs between modes."""
    changes: Dict[int, torch.Tensor] = {}
    summed, reevaluated = SummedScores(), AttentionReevaluation(model.reduction_config.prop_attn)

    def probe(index, reducer, args):
        x, size, attention = args[:3]
        merge = retokenize(attention.scores, attention.metric, reducer.num_candidates, reducer.num_merges)
        by_sum = _kept(summed(merge, x, size, attention)[2], reducer.prune.num_kept)
        by_attention = _kept(reevaluated(merge, x, size, attention)[2], reducer.prune.num_kept)
        changes[index] = (by_sum != by_attention).sum(dim=1).float() / (by_sum.shape[1] - 1)

    hooks = [block.reduction.register_forward_pre_hook(lambda reducer, args, index=index: probe(index, reducer, args))
             for index, block in enumerate(model.blocks)
             if isinstance(block.reduction, ImagePieceReduction) and isinstance(block.reduction.prune, Pruning)]
    try:
        with torch.inference_mode():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return changes


def run(args: argparse.Namespace) -> int:
    writer = ResultsWriter(args.out, "reevaluation", f"{args.arch}_{args.images}img", device=args.device)
    lines = [f"keep/prune decisions changed by re-evaluation ('attention') vs summed scores ('sum'), {args.arch} "
             f"ImagePiece defaults, {args.images} Gaussian-noise images, seed {args.seed}"]
    print(f"# {writer.provenance}\n{lines[0]}", flush=True)
    record = {}
    for weights in args.weights:
        torch.manual_seed(args.seed)
        model = random_weights(create_model(args.arch, "imagepiece"), weights).to(args.device)
        generator = torch.Generator().manual_seed(args.seed + 1)
        per_block: Dict[int, List[torch.Tensor]] = {}
        for start in range(0, args.images, args.batch):
            images = torch.randn(min(args.batch, args.images - start), 3, 224, 224, generator=generator).to(args.device)
            for block, share in changed_decisions(model, images).items():
                per_block.setdefault(block, []).append(share.cpu())
        lines.append(f"{weights} weights:")
        record[weights] = {}
        for block, shares in sorted(per_block.items()):
            share = torch.cat(shares)
            record[weights][block] = {"mean": float(share.mean()), "max": float(share.max()), "images_changed": int((share > 0).sum()),
                                      "images": share.numel()}
            lines.append(f"  block {block}: {100 * share.mean():5.2f}% of decisions differ on average, worst image "
                         f"{100 * share.max():5.2f}%, {int((share > 0).sum())}/{share.numel()} images differ")
        print("\n".join(lines[-len(per_block) - 1:]), flush=True)
    writer.report("\n".join(lines), vars(args), blocks=record)
    return 0
