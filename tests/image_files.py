"""Image files for the predict tests: good ones in every format and colour mode, and each kind of bad one."""
from __future__ import annotations

import os
import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

HUGE = 20_000  # a 20000x20000 "image" of a few hundred bytes: a decompression bomb


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [height, width, 3]: smooth colour fields plus noise, so patches differ like a photo's."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    fields = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = 127 + 90 * np.stack(fields, axis=-1) + rng.normal(0, 20, (height, width, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def _jpeg_bytes(pixels: np.ndarray, **options) -> bytes:
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit gray) and whose data is a few bytes."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")


def huge_jpeg(width: int, height: int) -> bytes:
    """A small baseline JPEG with its frame header (SOF0) rewritten to declare width x height."""
    data = bytearray(_jpeg_bytes(photo(16, 16, seed=0)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def corrupt_png() -> bytes:
    """A PNG with a valid header and checksums whose compressed pixel data is garbage."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
    garbage = bytes(np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", b"\x78\x9c" + garbage) + _png_chunk(b"IEND", b"")


def write_good_images(root: Path) -> List[str]:
    """Images that must be predicted: RGB JPEG/PNG/WebP of several sizes and aspect ratios, and
    grayscale, 1-bit, palette (with transparency), RGBA, LA and CMYK ones. Names relative to root."""
    root = Path(root)
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    names = []

    def save(name: str, image: Image.Image, **options) -> None:
        image.save(root / name, **options)
        names.append(name)

    sizes = [(320, 240), (240, 320), (500, 375), (96, 96), (64, 200), (256, 256), (41, 33), (300, 120)]
    for index, (width, height) in enumerate(sizes):
        save(f"rgb_{index}.jpg", Image.fromarray(photo(width, height, seed=index)), quality=90)
    for index, (width, height) in enumerate(sizes[:4]):
        save(f"nested/rgb_{index}.png", Image.fromarray(photo(width, height, seed=20 + index)))
    save("nested/deeper/upper_suffix.JPG", Image.fromarray(photo(180, 150, seed=30)), quality=85)
    save("webp_0.webp", Image.fromarray(photo(200, 160, seed=31)), quality=90)
    save("progressive.jpg", Image.fromarray(photo(230, 170, seed=32)), quality=90, progressive=True)
    colour = Image.fromarray(photo(160, 120, seed=40))
    save("gray.jpg", colour.convert("L"), quality=90)
    save("gray.png", colour.convert("L"))
    save("one_bit.png", colour.convert("1"))
    save("palette.png", colour.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    palette = colour.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette_transparent.gif", palette, transparency=0)
    rgba = colour.convert("RGBA")
    rgba.putalpha(Image.fromarray(photo(160, 120, seed=41)[:, :, 0]))
    save("rgba.png", rgba)
    save("gray_alpha.png", colour.convert("LA"))
    save("cmyk.jpg", colour.convert("CMYK"), quality=90)
    for index in range(6):
        save(f"more_{index}.jpg", Image.fromarray(photo(150 + 17 * index, 140, seed=50 + index)), quality=88)
    return names


POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def write_bad_images(root: Path) -> Dict[str, str]:
    """Files in a folder that must each give one error row: name -> a phrase its error must contain."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    good_jpeg, good_png = _jpeg_bytes(photo(120, 90, seed=60)), BytesIO()
    Image.fromarray(photo(120, 90, seed=61)).save(good_png, "PNG")
    files = {
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "truncated.png": (good_png.getvalue()[: len(good_png.getvalue()) // 2], "truncated"),
        "corrupt.png": (corrupt_png(), "corrupt"),
        "empty.jpg": (b"", "empty file"),
        "not_an_image.png": (b"these are words, not pixels\n" * 20, "not an image"),
        # PostScript named as a photo (a folder walk lists no .eps): Pillow would run Ghostscript on it; only raster formats are opened.
        "drawing_eps.jpg": (POSTSCRIPT, "not an image"),
        "bomb.png": (huge_png(HUGE, HUGE), "refused before decoding"),
        "bomb.jpg": (huge_jpeg(HUGE, HUGE), "refused before decoding"),
        # Over predict's default limit (89.5 Mpx) but under Pillow's own hard one: our check's message.
        "bomb_100mpx.png": (huge_png(10_000, 10_000), "10000x10000 = 100,000,000 pixels"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)).save(root / "sixteen_bit.png")
    os.symlink(root / "deleted_long_ago.jpg", root / "dangling_link.jpg")
    expected = {name: phrase for name, (_, phrase) in files.items()}
    expected.update({"sixteen_bit.png": "16-bit", "dangling_link.jpg": "file not found"})
    return expected
