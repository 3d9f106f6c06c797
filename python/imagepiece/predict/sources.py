"""What to predict: `--input` as a folder, a glob, one image, a text file of paths, or a CSV/Parquet column.

Each input becomes an `InputItem`: `path`, the string its output row carries (as listed, so a user
can join rows back to their table), and `location`, where to open it. Relative paths in a list or a
table are relative to that file's folder (a list travels with its images), not to the working
directory. A folder is walked recursively in sorted order and yields files with an image suffix
(Pillow's registered ones), hidden files and folders skipped, so a README or .DS_Store beside the
photos is not an error row; a list, a table or a glob names its files explicitly and every entry
gets a row, whatever its suffix.
"""
from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from PIL import Image

TABLE_SUFFIXES = (".csv", ".parquet")
DEFAULT_COLUMN = "path"


def image_suffixes() -> frozenset:
    return frozenset(suffix.lower() for suffix in Image.registered_extensions())


class InputError(ValueError):
    """An --input that cannot be listed (missing, empty, unknown column)."""


@dataclass(frozen=True)
class InputItem:
    path: str
    location: str


def _walk_folder(folder: str) -> List[InputItem]:
    suffixes = image_suffixes()
    items = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes:
                path = os.path.join(root, name)
                items.append(InputItem(path, path))
    return items


def _relative_to(listing: Path, entries: List[str]) -> List[InputItem]:
    base = listing.parent
    return [InputItem(entry, entry if os.path.isabs(entry) or not entry else str(base / entry)) for entry in entries]


def _pick_column(columns: List[str], column: Optional[str], source: Path) -> str:
    if column is not None:
        if column not in columns:
            raise InputError(f"{str(source)!r} has no column {column!r} (columns: {', '.join(columns)})")
        return column
    if DEFAULT_COLUMN in columns:
        return DEFAULT_COLUMN
    if len(columns) == 1:
        return columns[0]
    raise InputError(f"{str(source)!r} has columns {', '.join(columns)}: name the one holding image paths with --column")


def _table_column(source: Path, column: Optional[str]) -> List[str]:
    try:
        if source.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(source).names
            values = pq.read_table(source, columns=[_pick_column(names, column, source)]).column(0).to_pylist()
        else:
            with open(source, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                name = _pick_column(list(reader.fieldnames or []), column, source)
                values = [row[name] for row in reader]
    except InputError:
        raise
    except Exception as error:  # pyarrow/csv raise many kinds for an unreadable table
        raise InputError(f"cannot read table {str(source)!r} ({type(error).__name__}: {error})") from None
    return ["" if value is None else str(value) for value in values]


def _text_list(source: Path) -> List[str]:
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read path list {str(source)!r} ({error})") from None
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def list_inputs(spec: str, column: Optional[str] = None) -> List[InputItem]:
    """The inputs named by `spec`, in a stable order; InputError if none."""
    source = Path(spec)
    if source.is_dir():
        items = _walk_folder(spec)
        what = f"folder {spec!r} holds no image files (suffixes such as .jpg, .png, .webp)"
    elif source.is_file():
        suffix = source.suffix.lower()
        if column is not None and suffix not in TABLE_SUFFIXES:
            raise InputError(f"--column applies to a .csv or .parquet input, not {spec!r}")
        if suffix in TABLE_SUFFIXES:
            items = _relative_to(source, _table_column(source, column))
        elif suffix in image_suffixes():
            items = [InputItem(spec, spec)]
        else:
            items = _relative_to(source, _text_list(source))
        what = f"{spec!r} lists no image paths"
    elif glob.has_magic(spec):
        items = [InputItem(p, p) for p in sorted(glob.glob(spec, recursive=True)) if not os.path.isdir(p)]
        what = f"pattern {spec!r} matches no files"
    else:
        raise InputError(f"input {spec!r} does not exist (give a folder, a glob, an image, a text file of paths, or a .csv/.parquet table)")
    if not items:
        raise InputError(what)
    return items
