"""What to predict: `--input` as a folder, a glob, one image, a text file of paths, or a CSV/Parquet column.

Each input becomes an `InputItem`: `path`, the string its output row carries (as listed, so a user
can join rows back to their table), and `location`, where to open it. Relative paths in a list or a
table are relative to that file's folder (a list travels with its images), not to the working
directory. A folder is walked recursively in sorted order and yields files with the suffix of a format
decode.py opens (RASTER_FORMATS: .jpg, .png, .webp, ...; not .pdf, .psd or .eps), hidden files and folders
skipped, so a README or .DS_Store beside the photos is not an error row; a sub-folder that cannot be listed is reported through `warn`. A list,
a table or a glob names its files explicitly and every entry gets a row, whatever its suffix. A
glob's `**` does not follow symbolic links to folders (as a folder walk does not): a link back up
the tree would list the same files again, or without end; and, as glob.glob, its wildcards match no hidden
names unless they spell one (a hidden folder in the pattern's fixed part, ~/.cache/photos/**, is fine).
A CSV's first line is its header: a one-column CSV whose "header" is an image path is refused, not read
one image short.

A file name that is not valid UTF-8 (possible on Linux) is opened as it is, and its row's `path`
spells the bad bytes as backslash escapes (\\xff): every output format holds only valid text. Such a
name has its own backslashes doubled too, and so has a valid name holding "\\x" (which would read as
an escape): the file named `a\\xff.jpg` and the one named a, byte 0xff, .jpg get distinct rows.
"""
from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from PIL import Image, UnidentifiedImageError

from .decode import RASTER_FORMATS

TABLE_SUFFIXES = (".csv", ".parquet")
# Spreadsheet exports that are not comma-separated (Excel writes ";" where "," is the decimal comma).
OTHER_SEPARATORS = {"semicolon": ";", "tab": "\t"}
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")  # refused: read as a list of paths, each JSON line became one
DEFAULT_COLUMN = "path"


def image_suffixes() -> frozenset:
    """The suffixes of the formats decode.py opens: a folder's .pdf, .psd or .mpg is no input at all. (.mpo, a JPEG
    with several pictures, is Pillow's "MPO" by suffix and opens as JPEG.)"""
    return frozenset(suffix.lower() for suffix, name in Image.registered_extensions().items() if name in (*RASTER_FORMATS, "MPO"))


class InputError(ValueError):
    """An --input that cannot be listed (missing, empty, unknown column)."""


@dataclass(frozen=True)
class InputItem:
    path: str
    location: str


def printable(location: str) -> str:
    """`location` as an output row's path: as it is, unless it holds bytes that are not UTF-8 or the two characters
    "\\x"; then backslashes are doubled and each bad byte spelled \\xNN. Every spelled name holds "\\x" and no name
    left as it is does, so two files never share a row's path (the output and --resume are keyed by it)."""
    if "\\x" not in location and _is_utf8(location):
        return location
    raw = location.encode("utf-8", "surrogateescape")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _is_utf8(location: str) -> bool:
    # os functions (and os.fsdecode) hand back undecodable bytes as lone surrogates, which no UTF-8 writer accepts.
    try:
        location.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def found_file(location: str) -> InputItem:
    """An item for a file name found on disk (not read from a list)."""
    return InputItem(printable(location), location)


def walk_folder(folder: str, warn: Callable[[str], None]) -> List[InputItem]:
    """os.walk's order (each folder's files, then its sub-folders, all sorted), with a stack of its own: Python
    3.11's os.walk recurses, and a tree deeper than ~1000 folders would end in a RecursionError."""
    suffixes = image_suffixes()
    items = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as entries:
                entries = sorted(entries, key=lambda entry: entry.name)
        except OSError as error:
            if current == folder:
                raise InputError(f"cannot list folder {folder!r} ({error.strerror})") from None
            warn(f"cannot list folder {found_file(current).path!r} ({error.strerror}): its images are left out")
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_folder = entry.is_dir()
                followed = is_folder and not entry.is_symlink()  # as os.walk: a link to a folder is not entered
            except OSError:
                is_folder = followed = False
            if followed:
                folders.append(entry.path)
            elif not is_folder and os.path.splitext(entry.name)[1].lower() in suffixes:
                items.append(found_file(entry.path))
        pending.extend(reversed(folders))  # popped in sorted order
    return items


def _glob(pattern: str) -> List[InputItem]:
    matches = glob.glob(pattern) if "**" not in pattern else _glob_without_following_links(pattern)
    return [found_file(p) for p in sorted(set(matches)) if not os.path.isdir(p)]


def _hidden(part: str) -> bool:
    return part.startswith(".") and part not in (".", "..")


def _glob_without_following_links(pattern: str) -> List[str]:
    """glob.glob(pattern, recursive=True) through pathlib, whose "**" does not descend into symbolic links to
    folders (glob.glob's does: a link back up the tree lists the same files again, or without end)."""
    if pattern.endswith("**"):  # pathlib's trailing "**" lists folders only; glob.glob's lists their files too
        pattern = os.path.join(pattern, "*")
    parts = Path(pattern).parts
    fixed = 0  # the leading parts without wildcards: matched as they are, hidden or not
    while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
        fixed += 1
    base = Path(*parts[:fixed]) if fixed else Path(".")
    # As glob.glob: a wildcard matches a hidden name only where the pattern spells one.
    keep_hidden = any(_hidden(part) for part in parts[fixed:])
    prefix = "./" if pattern.startswith("./") else ""  # Path drops it; rows keep the user's spelling
    return [prefix + str(match) for match in base.glob(str(Path(*parts[fixed:])))
            if keep_hidden or not any(_hidden(part) for part in match.relative_to(base).parts)]


def _single_image(source: Path) -> bool:
    """A file Pillow recognises as an image (read from its header only)."""
    try:
        with Image.open(source):
            return True
    except Image.DecompressionBombError:  # an image, if a huge one: its row will say so
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def _relative_to(listing: Path, entries: List[str]) -> List[InputItem]:
    base = str(listing.parent)
    # os.path.join, not Path's "/": the entry stays as written, so a URL keeps its "//" for decode to recognise.
    return [InputItem(printable(entry), entry if os.path.isabs(entry) or not entry else os.path.join(base, entry))
            for entry in entries]


def _pick_column(columns: List[str], column: Optional[str], source: Path) -> str:
    if not columns:
        raise InputError(f"{str(source)!r} has no columns (an empty table, or a CSV without its header row)")
    if column is not None:
        if column not in columns:
            raise InputError(f"{str(source)!r} has no column {column!r} (columns: {', '.join(columns)})")
    elif DEFAULT_COLUMN in columns:
        column = DEFAULT_COLUMN
    elif len(columns) == 1:
        column = columns[0]
    else:
        raise InputError(f"{str(source)!r} has columns {', '.join(columns)}: name the one holding image paths with --column")
    if columns.count(column) > 1:  # a CSV reader would silently take the last of them
        raise InputError(f"{str(source)!r} has {columns.count(column)} columns named {column!r}: which holds the image "
                         "paths is ambiguous; rename the others")
    return column


def _table_column(source: Path, column: Optional[str]) -> List[str]:
    try:
        if source.suffix.lower() == ".parquet":
            values = _parquet_column(source, column)
        else:
            with open(source, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's "CSV UTF-8" starts with a BOM
                reader = csv.DictReader(handle, strict=True)
                names = list(reader.fieldnames or [])
                name = _pick_column(names, column, source)
                if column is None and names == [name] and os.path.splitext(name)[1].lower() in image_suffixes():
                    raise InputError(f"{str(source)!r} looks like a list of paths without a header line: its first line, "
                                     f"{name!r}, would be read as the column's name and that image left out; add a first "
                                     f"line '{DEFAULT_COLUMN}', or give the paths as a .txt list")
                separator = next((word for word, char in OTHER_SEPARATORS.items() if char in name), None)
                if column is None and names == [name] and separator:  # "path;label": rows of paths that do not exist
                    raise InputError(f"{str(source)!r} looks {separator}-separated (its header line is {name!r}); predict "
                                     "reads comma-separated CSV: save it with commas or as Parquet (or name that column "
                                     "with --column)")
                values = _csv_column(reader, name, source)
    except InputError:
        raise
    except Exception as error:  # pyarrow/csv raise many kinds for an unreadable table
        raise InputError(f"cannot read table {str(source)!r} ({type(error).__name__}: {error})") from None
    return [_path_value(value, source) for value in values]


def _csv_column(reader: csv.DictReader, name: str, source: Path) -> list:
    """`name`'s cells; InputError where the CSV is malformed. Lenient csv took an unbalanced quote as the start of one
    field running to the end of the file: every later path became part of one made-up name, and left out unsaid."""
    values, last_line = [], reader.line_num
    try:
        for row in reader:
            values.append(row[name])
            last_line = reader.line_num
    except csv.Error as error:
        raise InputError(f"{str(source)!r} is not well-formed CSV after line {last_line} ({error}): a double quote "
                         "that opens a field must close it, and one inside a field is written twice (\"\")") from None
    return values


def _parquet_column(source: Path, column: Optional[str]) -> list:
    """The path column of a Parquet file, or of a dataset's folder of them (Spark, Ray, pyarrow), read as one table."""
    import pyarrow.parquet as pq

    table = pq.ParquetDataset(source)
    if not source.is_dir():
        return table.read(columns=[_pick_column(table.schema.names, column, source)]).column(0).to_pylist()
    if not table.files:
        raise InputError(f"{str(source)!r} is a folder named like a Parquet table, but holds no Parquet files")
    # Each part by its own schema: the dataset's is its first part's, which would pick the column from that part
    # alone, cast every other part to it (all-null first, text after: refused) and read a part without it as nulls.
    parts = table.fragments
    name = _pick_column(list(dict.fromkeys(field for part in parts for field in part.physical_schema.names)), column, source)
    values = []
    for part in parts:
        schema = part.physical_schema
        if name not in schema.names:
            raise InputError(f"table {str(source)!r}: its part {part.path!r} has no column {name!r} "
                             f"(columns: {', '.join(schema.names)})")
        if not _holds_text(schema.field(name).type):  # a number column would become made-up paths ("1")
            raise InputError(f"table {str(source)!r}: its path column holds {schema.field(name).type} values in "
                             f"{part.path!r}, not text")
        values += part.to_table(columns=[name], schema=schema).column(0).to_pylist()
    return values


def _holds_text(column_type) -> bool:
    """A Parquet column type whose values read as text or bytes (a pandas category column is dictionary-encoded)."""
    import pyarrow as pa

    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    return any(check(column_type) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                                 pa.types.is_large_binary, pa.types.is_null,
                                                 getattr(pa.types, "is_string_view", lambda _: False),
                                                 getattr(pa.types, "is_binary_view", lambda _: False)))


def _path_value(value, source: Path) -> str:
    """A table cell as a path: text, or bytes (a binary column) decoded as os functions would; None is the empty
    path (its row says so). Anything else (numbers, lists) would become a made-up path: refused."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, bytes):
        return os.fsdecode(value)
    raise InputError(f"table {str(source)!r}: its path column holds {type(value).__name__} values, not text (e.g. {value!r})")


def _text_list(source: Path) -> List[str]:
    try:
        lines = source.read_text(encoding="utf-8-sig").split("\n")  # not splitlines(): U+2028 may be in a name
    except UnicodeDecodeError as error:
        raise InputError(f"{str(source)!r} is neither an image Pillow recognises nor a text file of paths "
                         f"(not UTF-8: {error.reason} at byte {error.start})") from None
    except OSError as error:
        raise InputError(f"cannot read path list {str(source)!r} ({error.strerror})") from None
    lines = [line.removesuffix("\r") for line in lines]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _ignore(message: str) -> None:
    pass


def list_inputs(spec: str, column: Optional[str] = None, warn: Callable[[str], None] = _ignore) -> List[InputItem]:
    """The inputs named by `spec`, in a stable order; InputError if none. `warn` hears of folders that
    could not be listed."""
    source = Path(spec)
    parquet_dataset = source.is_dir() and source.suffix.lower() == ".parquet"  # a folder of Parquet files (Spark, Ray)
    if source.is_dir() and not parquet_dataset:
        items = walk_folder(spec, warn)
        what = f"folder {spec!r} holds no image files (suffixes such as .jpg, .png, .webp)"
    elif source.is_file() or parquet_dataset:
        suffix = source.suffix.lower()
        if column is not None and suffix not in TABLE_SUFFIXES:
            raise InputError(f"--column applies to a .csv or .parquet input, not {spec!r}")
        if suffix in JSON_SUFFIXES:
            raise InputError(f"input {spec!r} is JSON, which predict does not read: give a .csv or .parquet table "
                             f"(column {DEFAULT_COLUMN!r}, or --column), or a text file of paths, one per line")
        if suffix in TABLE_SUFFIXES:
            items = _relative_to(source, _table_column(source, column))
        elif suffix in image_suffixes() or _single_image(source):  # also a photo saved without its suffix
            items = [found_file(spec)]
        else:
            items = _relative_to(source, _text_list(source))
        what = f"{spec!r} lists no image paths"
    elif source.exists():
        raise InputError(f"input {spec!r} is neither a folder nor a regular file (a FIFO or a device?)")
    elif glob.has_magic(spec):
        items = _glob(spec)
        what = f"pattern {spec!r} matches no files"
    else:
        raise InputError(f"input {spec!r} does not exist (give a folder, a glob, an image, a text file of paths, or a .csv/.parquet table)")
    if not items:
        raise InputError(what)
    return items
