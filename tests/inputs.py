"""Test images."""
import torch


def random_images(count: int, seed: int) -> torch.Tensor:
    """Gaussian noise images: every patch unlike every other (the hardest case for merging)."""
    return torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def scene_images(count: int, seed: int, regions: int = 6) -> torch.Tensor:
    """Images made of a few textured regions (a Voronoi map over the 14x14 patch grid).

    Like real photos, many patches repeat their neighbours, so a near-tie between two tokens is
    mostly a tie between near-identical tokens, where either choice gives nearly the same output.
    """
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij"), dim=-1)  # [14,14,2]
    images = []
    for _ in range(count):
        textures = torch.randn(regions, 3, 16, 16, generator=generator)
        centres = torch.rand(regions, 2, generator=generator) * 14
        region = ((grid[None] - centres[:, None, None]) ** 2).sum(-1).argmin(0)  # [14, 14]
        images.append(textures[region].permute(2, 0, 3, 1, 4).reshape(3, 224, 224))
    return torch.stack(images)


def write_image_folder(root, classes: int = 4, per_class: int = 8, size: int = 64, seed: int = 0) -> None:
    """An ImageNet-style folder root/<class>/<n>.png of easy classes: each class its own colour."""
    from pathlib import Path

    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    palette = torch.rand(classes, 3, generator=generator)
    for label in range(classes):
        folder = Path(root) / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            noise = 0.15 * torch.rand(size, size, 3, generator=generator)
            pixels = ((palette[label] * 0.85 + noise).clamp(0, 1) * 255).byte().numpy()
            Image.fromarray(pixels).save(folder / f"{index}.png")
