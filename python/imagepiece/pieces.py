"""Which input patches each token covers after a block, and a picture of it (scripts/visualize.py).

Follows ToMe's source tracking: `forward_tokens(trace_source=True)` carries, for every token, a map
over the input tokens: 1 for patches merged into it, 0.5 for patches pruned into it (EViT's fused
token). Every patch lies in exactly one token after every block.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from .files import atomic_write

# Layout of the picture, in pixels: a caption strip above the panels, a margin around them.
HEADER = 34
MARGIN = 8
# One colour per token index: a 6x6x6 grid of colours in a fixed shuffled order, so that any two
# tokens (up to 216, more than DeiT's 197) get clearly different colours and neighbours contrast.
_LEVELS = np.linspace(0.15, 1.0, 6)
PALETTE = np.stack(np.meshgrid(_LEVELS, _LEVELS, _LEVELS, indexing="ij"), axis=-1).reshape(-1, 3)[
    np.random.default_rng(0).permutation(216)]


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


def piece_overlay(image: np.ndarray, piece_map: PieceMap) -> np.ndarray:
    """One panel: every piece tinted in its own colour, its outline black, pruned patches greyed.

    Args:
        image: [H, W, 3] float image in [0, 1], H and W multiples of the patch grid.
    Returns:
        [H, W, 3] float image in [0, 1].
    """
    height, width = image.shape[:2]
    rows, cols = piece_map.owner.shape
    cell = np.ones((height // rows, width // cols), dtype=np.int64)
    owner = np.kron(piece_map.owner.numpy(), cell)
    pruned = np.kron(piece_map.pruned.numpy().astype(np.int64), cell).astype(bool)
    tinted = 0.55 * image + 0.45 * PALETTE[owner % len(PALETTE)]
    tinted[pruned] = 0.25 * image[pruned] + 0.35
    edges = np.zeros_like(pruned)
    edges[1:, :] |= owner[1:, :] != owner[:-1, :]
    edges[:, 1:] |= owner[:, 1:] != owner[:, :-1]
    tinted[edges] = 0.0
    return tinted.clip(0, 1)


def panel_origin(index: int, panel_width: int) -> Tuple[int, int]:
    """(left, top) pixel of panel `index` (0 is the input image) in `render_pieces`' picture."""
    return MARGIN + index * (panel_width + MARGIN), HEADER


def render_pieces(display: torch.Tensor, maps: Dict[int, PieceMap], title: str = "") -> Image.Image:
    """The picture: the image, then one `piece_overlay` panel per block, each captioned.

    Panels sit at fixed places (`panel_origin`), pixel for pixel, so the picture can be checked
    against the piece maps.

    Args:
        display: [H, W, 3] uint8 image as shown (after resize/crop).
    """
    image = display.numpy().astype(np.float32) / 255.0
    height, width = image.shape[:2]
    panels = [image] + [piece_overlay(image, piece_map) for piece_map in maps.values()]
    captions = ["input"] + [f"block {block}: {m.num_pieces} pieces, {int(m.pruned.sum())} pruned" for block, m in maps.items()]
    canvas = Image.new("RGB", (MARGIN + len(panels) * (width + MARGIN), HEADER + height + MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 2), title, fill="black")
    for index, (panel, caption) in enumerate(zip(panels, captions)):
        left, top = panel_origin(index, width)
        canvas.paste(Image.fromarray((panel * 255).round().astype(np.uint8)), (left, top))
        draw.text((left, HEADER - 14), caption, fill="black")
    return canvas


def save_png(picture: Image.Image, out: Path) -> Path:
    return atomic_write(out, lambda staged: picture.save(staged, format="PNG"))
