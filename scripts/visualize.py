#!/usr/bin/env python
"""Draw what re-tokenization did to an image: which patches merged into which piece, which were pruned.

For each chosen block, the image is shown with every piece (a token after that block) outlined and
tinted in its own colour; patches pruned into EViT's fused token are greyed out. Source tracking
follows ToMe's visualisation: each token carries a map of the input patches it covers.

examples:
  python scripts/visualize.py --image dog.jpg --checkpoint deit_s_ip.pth --out pieces.png
  python scripts/visualize.py --synthetic --blocks 0 3 6 11 --out pieces.png   # no image needed
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

import imagepiece
from imagepiece import CheckpointError, create_model
from imagepiece.command_line import OneLineErrors
from imagepiece.config import LCB_CHOICES, PRESETS, lcb_from_cli
from imagepiece.files import check_output_file
from imagepiece.pieces import piece_maps, render_pieces, save_png
from imagepiece.termination import STOPPED, exit_status, how_stopped, sigterm_unwinds
from imagepiece.weights import UntrainedLCBWarning, fill_model_flags, fine_tuned_flags, fine_tuned_settings, reduction_difference


def load_image(path: Path, model) -> tuple:
    """(normalised [1, 3, H, W] tensor, display [H, W, 3] uint8) with the model's eval transform."""
    from timm.data import create_transform, resolve_data_config

    from imagepiece.predict.decode import ImageError, decode_rgb
    from imagepiece.predict.preprocess import check_resizes

    config = resolve_data_config(pretrained_cfg=model.pretrained_cfg)
    transform = create_transform(**config)
    try:  # the predict CLI's decoder and refusals (a 16-bit image would otherwise be clipped to white; a strip resized to GBs)
        image = decode_rgb(str(path), advice="")  # this script has no --max-pixels
        check_resizes(image, transform)
        tensor = transform(image).unsqueeze(0)
    except ImageError as error:
        raise ValueError(f"--image {str(path)!r}: {error}") from None
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    display = ((tensor[0] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0)
    return tensor, display


def synthetic_image() -> tuple:
    """A picture with a flat sky, a striped ground and a textured object: distinct regions to merge."""
    height = width = 224
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.zeros(3, height, width)
    image[2] = 0.9  # sky
    ground = yy >= 150
    image[:, ground] = torch.tensor([0.3, 0.6, 0.2])[:, None] * (1 + 0.2 * torch.sin(xx[ground] / 6.0))
    object_mask = ((yy - 110) ** 2 + (xx - 112) ** 2) < 45**2
    texture = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    image[:, object_mask] = 0.8 * texture[:, object_mask] + torch.tensor([0.2, 0.0, 0.0])[:, None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((image - mean) / std).unsqueeze(0), (image * 255).byte().permute(1, 2, 0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrors(prog="visualize.py", description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="an image file (resized and centre-cropped like evaluation)")
    source.add_argument("--synthetic", action="store_true", help="a built-in synthetic scene")
    # The model flags default to what a fine-tune recorded in --checkpoint (weights.fine_tuned_flags), else to DeiT-S's.
    parser.add_argument("--arch", choices=sorted(imagepiece.ARCHS), help="DeiT size (default: the fine-tune's, else deit_small_patch16_224)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model setting (default: the fine-tune's, else imagepiece)")
    parser.add_argument("--checkpoint", type=Path, help="weights (default: random, which makes arbitrary pieces)")
    parser.add_argument("--lcb", choices=LCB_CHOICES, help="Local Coherence Bias (default: the fine-tune's, else none)")
    parser.add_argument("--num-classes", type=int, help="head size of --checkpoint (default: the fine-tune's, else 1000)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 3, 6, 11], help="blocks to draw (after the block)")
    parser.add_argument("--out", type=Path, required=True, help="output PNG")
    args = parser.parse_args(argv)
    if args.num_classes is not None and args.num_classes < 1:  # 0 would build a model with no head at all
        parser.error(f"--num-classes must be >= 1, got {args.num_classes}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_unwinds():  # a stop while the model builds or draws: one line, not a traceback
            return draw_pieces(args)
    except STOPPED as stop:
        print(f"visualize.py: {how_stopped(stop)}; nothing written", file=sys.stderr)
        return exit_status(stop)


def draw_pieces(args) -> int:
    try:
        check_output_file(args.out, inputs={"--image": args.image, "--checkpoint": args.checkpoint})
        if args.out.suffix.lower() != ".png":  # PNG bytes under another name would fool every viewer
            raise ValueError(f"--out {str(args.out)!r}: the picture is a PNG; name it *.png")
        fine_tuned = fine_tuned_settings(args.checkpoint) if args.checkpoint else None
        fill_model_flags(args, fine_tuned_flags(fine_tuned))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = create_model(args.arch, checkpoint=args.checkpoint, lcb=lcb_from_cli(args.lcb), num_classes=args.num_classes,
                                 allow_untrained_lcb=args.lcb == "stem", **PRESETS[args.preset])
        # A stem the checkpoint has no weights for stays random: said in one line and in the picture's title.
        untrained = [warning for warning in caught if issubclass(warning.category, UntrainedLCBWarning)]
        for warning in caught:
            if warning in untrained:
                print(f"visualize.py: warning: {warning.message}", file=sys.stderr)
            else:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        difference = reduction_difference(fine_tuned, args.checkpoint, model.reduction_config)
        if difference:
            print(f"visualize.py: warning: {difference}", file=sys.stderr)
        depth = len(model.blocks)
        bad = [b for b in args.blocks if not 0 <= b < depth]
        if bad:
            raise ValueError(f"--blocks {bad} outside 0..{depth - 1}")
        images, display = synthetic_image() if args.synthetic else load_image(args.image, model)
        maps = piece_maps(model, images, args.blocks)
        lcb = model.reduction_config.lcb
        weights = " (random weights)" if not args.checkpoint else " (untrained LCB stem)" if untrained else ""
        picture = render_pieces(display, maps, title=f"{args.arch} {args.preset}" + (f" lcb {lcb}" if lcb else "") + weights)
        save_png(picture, args.out)
    except (ValueError, CheckpointError, OSError) as error:
        print(f"visualize.py: error: {error}", file=sys.stderr)
        return 2
    for block, piece_map in maps.items():
        print(f"block {block}: {piece_map.num_pieces} pieces, {int(piece_map.pruned.sum())} patches pruned")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
