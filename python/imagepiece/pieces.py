"""Which input patches each token covers after a block, and a picture of it (scripts/visualize.py).

Follows ToMe's source tracking: `forward_tokens(trace_source=True)` carries, for every token, a map
over the input tokens: 1 for patches merged into it, 0.5 for patches pruned into it (EViT's fused
token). Every patch lies in exactly one token after every block.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch


@dataclass
class PieceMap:
    """One image after one block, on the patch grid."""

    owner: torch.Tensor  # [H, W] index of the token each patch belongs to
    pruned: torch.Tensor  # [H, W] bool: the patch was pruned into a fused token

    @property
    def num_pieces(self) -> int:
        return int(self.owner[~self.pruned].unique().numel())


@torch.no_grad()
def piece_maps(model: torch.nn.Module, images: torch.Tensor, blocks: List[int]) -> Dict[int, PieceMap]:
    """Piece maps of the first image after each of `blocks` (0-indexed)."""
    captured: Dict[int, torch.Tensor] = {}
    hooks = [model.blocks[b].register_forward_hook(lambda mod, args, out, b=b: captured.__setitem__(b, out[2][0]))
             for b in blocks]
    try:
        model.forward_tokens(images[:1], trace_source=True)
    finally:
        for hook in hooks:
            hook.remove()
    grid = model.patch_embed.grid_size
    maps = {}
    for block in blocks:
        source = captured[block][:, 1:]  # [tokens, patches], [CLS] column dropped
        if not torch.equal((source > 0).sum(dim=0), torch.ones(source.shape[1], dtype=torch.long, device=source.device)):
            raise AssertionError(f"block {block}: a patch is covered by no token or by several")
        owner = source.argmax(dim=0)
        pruned = source.gather(0, owner[None]).squeeze(0) < 1
        maps[block] = PieceMap(owner.view(grid).cpu(), pruned.view(grid).cpu())
    return maps


def render_pieces(display: torch.Tensor, maps: Dict[int, PieceMap], out: Path, title: str = "") -> None:
    """Save a PNG: the image, then one panel per block with pieces tinted and outlined, pruned greyed.

    Args:
        display: [H, W, 3] uint8 image as shown (after resize/crop).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    image = display.numpy().astype(np.float32) / 255.0
    height, width = image.shape[:2]
    figure, axes = plt.subplots(1, len(maps) + 1, figsize=(3.2 * (len(maps) + 1), 3.4), squeeze=False)
    axes[0][0].imshow(image)
    axes[0][0].set_title("input")
    palette = np.random.default_rng(0).uniform(0.15, 1.0, size=(1024, 3))
    for axis, (block, piece_map) in zip(axes[0][1:], maps.items()):
        rows, cols = piece_map.owner.shape
        scale_y, scale_x = height // rows, width // cols
        owner = np.kron(piece_map.owner.numpy(), np.ones((scale_y, scale_x), dtype=np.int64))
        pruned = np.kron(piece_map.pruned.numpy().astype(np.int64), np.ones((scale_y, scale_x), dtype=np.int64)).astype(bool)
        tinted = 0.55 * image + 0.45 * palette[owner % len(palette)]
        tinted[pruned] = 0.25 * image[pruned] + 0.35
        edges = np.zeros_like(pruned)
        edges[1:, :] |= owner[1:, :] != owner[:-1, :]
        edges[:, 1:] |= owner[:, 1:] != owner[:, :-1]
        tinted[edges] = 0.0
        axis.imshow(tinted.clip(0, 1))
        axis.set_title(f"after block {block}: {piece_map.num_pieces} pieces\n{int(piece_map.pruned.sum())} patches pruned", fontsize=9)
    for axis in axes[0]:
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    staged = out.with_name(f".{out.name}.partial.png")
    figure.savefig(staged, dpi=100)
    plt.close(figure)
    staged.replace(out)
