"""Writing output files safely: check the folder before long work, and never leave half a file."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional, Union


def check_writable_dir(folder: Union[str, Path], create: bool = False) -> Path:
    """`folder` as a Path, or ValueError saying why nothing can be written there.

    Writing a temporary file is the only real test: permission bits say nothing for root or for a
    read-only file system.

    Args:
        create: make the folder (and its parents) if it does not exist yet.
    """
    folder = Path(folder) if str(folder) else Path(".")
    # A file on the way is the usual mistake (--out results.json for a folder): say so, not "File exists".
    blocking = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        where = "" if blocking == folder else f": {str(blocking)!r} is"
        raise ValueError(f"output directory {str(folder)!r}{where or ' is'} a file, not a folder")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise ValueError(f"output directory {str(folder)!r} does not exist")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"output directory {str(folder)!r} is not writable ({error.strerror})") from None
    return folder


def check_output_file(path: Union[str, Path], inputs: Optional[Dict[str, object]] = None,
                      input_folders: Optional[Dict[str, object]] = None) -> Path:
    """`path` as a Path, or ValueError when no file can be written there (it is a folder, or its folder
    does not exist or is not writable): checked before long work, not found out after it.

    Args:
        inputs: the command's input files by option name (None where not given): an output that is one of
            them (the same path, or a link to it) is refused, as writing it would destroy that input.
        input_folders: the command's input folders by option name (None where not given): an output inside one
            (through links too) is refused, as writing it would replace or add a file of that input.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a folder; give a file name")
    for option, given in (inputs or {}).items():
        if given is not None and _same_file(given, path):
            raise ValueError(f"output {str(path)!r} is the {option} file: writing it would replace that input")
    for option, folder in (input_folders or {}).items():
        if folder is not None and is_inside(path, folder):
            raise ValueError(f"output {str(path)!r} lies inside the {option} folder {str(folder)!r}: writing it would change "
                             "that input; write it elsewhere")
    check_writable_dir(path.parent)
    return path


def _same_file(a: Union[str, Path], b: Union[str, Path]) -> bool:
    """One file under two names: the same path, a symbolic link or a hard link to it."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def is_inside(path: Union[str, Path], folder: Union[str, Path]) -> bool:
    """Whether `path` (which may not exist yet) is under `folder`, both with every symbolic link resolved."""
    real_path, real_folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real_path, real_folder]) == real_folder


def atomic_write(path: Union[str, Path], write: Callable[[Path], None], replace: bool = True) -> Path:
    """Call `write(staged_path)`, then rename the staged file to `path` in one step.

    A reader never sees a partial file, and a crash (or a kill, or a power loss: the file is synced
    before the rename) while writing leaves the previous `path`, if any, untouched. The staged file
    sits beside `path` (a rename must not cross file systems), has a name no other writer uses (two
    processes writing one path must not write into each other's staged file) and keeps its suffix,
    for writers that choose the format by it (PIL, matplotlib).

    Args:
        replace: False to never replace an existing `path`: FileExistsError instead (the staged file is
            linked to `path`, which fails when it exists, in the same single step).

    A symbolic link is followed (its target is replaced, the link stays), and a target that is not a
    regular file (/dev/stdout, a FIFO) is written directly: renaming over it would replace the device.
    """
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # stat follows the link: /dev/stdout -> a pipe
        write(path)
        return path
    path = Path(os.path.realpath(path))
    staged = path.with_name(staged_name(path))
    try:
        write(staged)
        fsync_file(staged)
        if replace:
            os.replace(staged, path)
        else:
            _publish_new(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return path


def staged_name(path: Path) -> str:
    """The name atomic_write writes `path` under first, beside it (a random part: no two writers share it)."""
    return f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}"


def remove_stale_staged(path: Union[str, Path]) -> None:
    """Removes the staged copies of `path` that writers killed outright (SIGKILL, a power cut) left beside it, each
    the size of the file. Only for a caller that holds `path` exclusively (`held_exclusively`): a live writer's
    copy would go too."""
    path = Path(os.path.realpath(path))
    staged = re.compile(rf"\.{re.escape(path.stem)}\.[0-9a-f]{{8}}\.partial{re.escape(path.suffix)}")
    with contextlib.suppress(OSError):  # a folder that cannot be listed holds none this run could remove either
        for entry in os.scandir(path.parent):
            if staged.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def check_names_fit(folder: Union[str, Path], names: Iterable[str], output: Union[str, Path]) -> None:
    """ValueError where the file system's longest name (NAME_MAX, 255 bytes on most) cannot hold a name a run will
    write beside `output` (its staged copy, a journal): found before the run's work, not when its result is written."""
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):  # no limit known here
        return
    too_long = max(names, key=lambda name: len(os.fsencode(name)))
    if len(os.fsencode(too_long)) > longest:
        excess = len(os.fsencode(too_long)) - longest
        raise ValueError(f"output name {Path(output).name!r} is {excess} bytes too long: the run writes "
                         f"{too_long!r} beside it, and names here hold at most {longest} bytes")


@contextlib.contextmanager
def held_exclusively(lock_path: Path, what: str) -> Iterator[None]:
    """Within the block, this process holds `lock_path` (made for it, removed after); ValueError at once where another
    holds it: two runs writing one output would each remove and read the other's journal. Where the file system has
    no locks (some network ones), the block runs unlocked."""
    while True:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip()
            os.close(descriptor)
            # (A run that died holds nothing: the kernel drops its lock, and its file left behind is taken anew.)
            raise ValueError(f"{what} is being written by another run{f' (pid {holder})' if holder.isdigit() else ''}; "
                             "wait for it to finish") from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            descriptor = None
            break
        try:  # a run that finished meanwhile removed the file this one opened: lock the one at that name now
            current = os.path.samestat(os.fstat(descriptor), os.stat(lock_path))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(descriptor)
    try:
        if descriptor is not None:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still held: a run waiting on this file then finds it gone
        if descriptor is not None:
            os.close(descriptor)


def _publish_new(staged: Path, path: Path) -> None:
    """Rename `staged` to `path` unless `path` exists (FileExistsError): a hard link, which fails when it does;
    where the file system has no hard links, the name is claimed by creating it empty first."""
    try:
        os.link(staged, path)
    except FileExistsError:
        raise
    except OSError:  # EPERM, ENOTSUP: no hard links here (some FUSE and network file systems)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.replace(staged, path)


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    return atomic_write(path, lambda staged: staged.write_text(text))


def fsync_file(path: Union[str, Path]) -> None:
    """Put `path`'s bytes on disk, before a rename makes it the real file: after a power loss the renamed name
    must not point at a file still empty."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
