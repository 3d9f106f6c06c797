"""One image file -> an 8-bit RGB PIL image, or an `ImageError` that says, in one line, why not.

Decoder: Pillow (PIL). It is maintained, ships libjpeg-turbo (SIMD JPEG), libpng, libwebp and
libtiff in its wheels, releases the GIL while it decodes and resamples (so decode threads overlap
with each other and with inference), and above all it is what timm's eval transform resizes with:
decoding and resizing with Pillow gives *the same pixels* `evaluate.py` and timm give, which
`torchvision.io.decode_jpeg` + tensor resizing (a different antialias filter) would not.
Pillow-SIMD is faster at resampling but a fork that lags Pillow, has no wheels and replaces the
`PIL` package every other library imports; not worth a silent accuracy difference.

Refused before any pixel is decoded: images over `max_pixels` (decompression bombs: a few KB on
disk that would expand to gigabytes); Pillow reads the size from the header, and we check it before
`load()`. Refused after opening: 16-bit and float images (modes I;16, I, F), which Pillow would
convert to RGB by clipping, a silently wrong picture. Grayscale, palette, CMYK, RGBA, LA, 1-bit
are converted to RGB as timm's loader does (alpha dropped, no EXIF rotation: same as timm).

Only raster formats are opened (`RASTER_FORMATS`): Pillow would hand an EPS file to Ghostscript, a
PostScript interpreter, which an upload from anyone must never reach; the rest of Pillow's long list
(scientific, game-texture and video formats) is refused as "not an image" too.
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from typing import BinaryIO, Union

from PIL import Image, UnidentifiedImageError

# Pillow's own default guard, 89.5 Mpx (~0.25 GiB as RGB): far above any photo a classifier needs.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
MAX_PIXELS_ADVICE = "; --max-pixels raises it"  # predict's and the server's flag
UNSUPPORTED_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
                     "F": "32-bit float"}

# The formats Image.open may try, by Pillow's format names (a JPEG with several pictures, MPO, opens as JPEG).
# Not ICO: Pillow decodes an icon's embedded PNG inside Image.open, before its size can be checked (a 0.6 MiB
# .ico claiming 256x256 held a 13000x13000 PNG: 650 MB decoded past --max-pixels).
RASTER_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF", "PPM", "TGA", "JPEG2000")

# scheme://... anywhere in a location: a list's or a table's URL entry arrives joined to that file's folder.
_URL = re.compile(r"(?:^|/)[A-Za-z][A-Za-z0-9+.-]*://")

# This module enforces the pixel limit itself (as an error row); Pillow's warning for images between
# its limit and twice it would only repeat that on stderr.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(Exception):
    """A file that cannot be predicted; the message is what its output row's `error` says."""


def _check_readable(location: str) -> None:
    if not location:
        raise ImageError("empty path")
    try:
        status = os.stat(location)
    except FileNotFoundError:
        if os.path.islink(location):
            raise ImageError(f"file not found (dangling symlink to {os.readlink(location)!r})") from None
        if _URL.search(location):
            raise ImageError("a URL, not a file: URLs are not supported (download the images and list their local paths)") from None
        raise ImageError("file not found") from None
    except OSError as error:
        raise ImageError(f"cannot read file ({error.strerror})") from None
    if stat.S_ISDIR(status.st_mode):
        raise ImageError("is a directory, not an image file")
    if not stat.S_ISREG(status.st_mode):  # opening a FIFO would wait for a writer; a device may never end
        raise ImageError("not a regular file (a FIFO, socket or device), not opened")
    if status.st_size == 0:
        raise ImageError("empty file (0 bytes)")


def _allow_pillow_up_to(max_pixels: int) -> None:
    # Pillow raises DecompressionBombError inside Image.open above 2x its global limit; keep that
    # global at least as high as ours so the refusal (and its message) is always ours.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def decode_rgb(location: str, max_pixels: int = DEFAULT_MAX_PIXELS, advice: str = MAX_PIXELS_ADVICE) -> Image.Image:
    """The image at `location` as a loaded 8-bit RGB PIL image; ImageError if it cannot be one. `advice` follows the
    decompression-bomb refusal: how the caller's command raises the limit ("" where it has no --max-pixels)."""
    _check_readable(location)
    return _decode(location, max_pixels, advice)


def decode_rgb_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An image file's bytes (an upload) as decode_rgb decodes a file, with the same refusals."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    return _decode(io.BytesIO(data), max_pixels, MAX_PIXELS_ADVICE)


def _decode(source: Union[str, BinaryIO], max_pixels: int, advice: str) -> Image.Image:
    _allow_pillow_up_to(max_pixels)
    try:
        with Image.open(source, formats=RASTER_FORMATS) as image:
            # Step 1: header only so far; refuse a decompression bomb before decoding anything.
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                                 f"{max_pixels:,}: refused before decoding (decompression-bomb guard{advice})")
            # Step 2: refuse what would convert to a wrong picture.
            if image.mode in UNSUPPORTED_MODES:
                raise ImageError(f"unsupported {UNSUPPORTED_MODES[image.mode]} image (mode {image.mode}): "
                                 "convert it to 8 bits per channel first")
            # Step 3: decode, then convert to RGB exactly as timm's loader does (RGB needs no copy).
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    except ImageError:
        raise
    except PermissionError as error:
        raise ImageError(f"cannot read file ({error.strerror})") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image in an accepted format (no decoder of {', '.join(RASTER_FORMATS)} recognises the file)") from None
    except Image.DecompressionBombError as error:  # Pillow's guard fired first: only ever above our limit
        raise ImageError(f"image has more than {max_pixels:,} pixels: refused before decoding "
                         f"(decompression-bomb guard{advice}; Pillow says: {error})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
        # Pillow's plugins signal broken data with any of these (truncated JPEG: OSError,
        # broken PNG chunk: SyntaxError, bad TIFF tags: ValueError/IndexError ...).
        raise ImageError(f"corrupt or truncated image data ({type(error).__name__}: {error})") from None
