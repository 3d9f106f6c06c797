"""Private, sealed in-memory copies of artifact bytes, and the process-wide set of loaded ones.

An artifact is read once into an anonymous memory file (memfd) sealed against any change, verified
there, and the loader is handed `/proc/self/fd/N`: a path nothing else can replace, overwrite or
shadow (no library search path, no file swapped at the same name, no SIGBUS when the original file
is rewritten while loaded).

AOTInductor libraries define STB_GNU_UNIQUE symbols, so glibc never unmaps them (dlclose is a no-op).
Each distinct library (by digest) is therefore kept loaded once per process and reused by every later
load of the same bytes, so loading the same artifact again costs no memory; a copy is released only
when no model uses it and the dynamic loader has really let it go. cpp/src/library_copies.cpp does
the same for the C++ runtime.
"""
from __future__ import annotations

import _ctypes
import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Dict

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
# The kernel refuses F_SEAL_WRITE (EBUSY) while it still holds extra references to freshly written pages; seen
# once in CI, sealing a compiled library on a busy 2-core machine. Transient: waited out, ~1 s at most.
_SEAL_ATTEMPTS = 12
_CHUNK = 1 << 30


def _seal(fd: int) -> None:
    for attempt in range(1, _SEAL_ATTEMPTS + 1):
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return
        except OSError as error:
            if error.errno != errno.EBUSY or attempt == _SEAL_ATTEMPTS:
                raise
            time.sleep(0.015 * attempt)


class SealedFile:
    """Bytes in a memfd that nothing can change any more; `path` opens exactly these bytes."""

    def __init__(self, name: str) -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.size = 0

    @classmethod
    def _filled(cls, name: str, fill) -> "SealedFile":
        """A new copy that `fill(copy)` writes (adding to copy.size), then sealed; closed if anything fails."""
        copy = cls(name)
        try:
            fill(copy)
            _seal(copy.fd)
        except BaseException:
            copy.close()
            raise
        return copy

    @classmethod
    def copy_of(cls, source: Path) -> "SealedFile":
        """One read of `source` into a fresh sealed copy (OSError if it cannot be read)."""
        def fill(copy: "SealedFile") -> None:
            with open(source, "rb") as handle:
                while sent := os.sendfile(copy.fd, handle.fileno(), None, _CHUNK):
                    copy.size += sent

        return cls._filled(f"imagepiece:{source.name}", fill)

    @classmethod
    def holding(cls, data: bytes, name: str) -> "SealedFile":
        """A sealed copy of `data`."""
        def fill(copy: "SealedFile") -> None:
            view = memoryview(data)
            while copy.size < len(data):
                copy.size += os.write(copy.fd, view[copy.size :])

        return cls._filled(name, fill)

    @classmethod
    def slice_of(cls, other: "SealedFile", offset: int, size: int, name: str) -> "SealedFile":
        """A sealed copy of `size` bytes of `other` from `offset` (kernel-side, no Python buffer)."""
        def fill(copy: "SealedFile") -> None:
            while copy.size < size:
                sent = os.sendfile(copy.fd, other.fd, offset + copy.size, min(_CHUNK, size - copy.size))
                if sent == 0:
                    raise OSError(f"short copy of {name}")
                copy.size += sent

        return cls._filled(name, fill)

    def read(self, offset: int, size: int) -> bytes:
        """Exactly `size` bytes from `offset` (the caller checked the range)."""
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read at {offset}")
        return data

    def chunks(self, start: int, end: int):
        """The bytes in [start, end) in pieces, for hashing without one big buffer."""
        while start < end:
            piece = self.read(start, min(end - start, 1 << 24))
            start += len(piece)
            yield piece

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _still_loaded(path: str) -> bool:
    """Whether the dynamic loader still has the library opened from `path` (RTLD_NOLOAD opens nothing)."""
    try:
        handle = _ctypes.dlopen(path, os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return False
    _ctypes.dlclose(handle)
    return True


class _Entry:
    def __init__(self, copy: SealedFile) -> None:
        self.copy, self.users = copy, 0


_lock = threading.RLock()  # re-entrant: __del__ may run from a garbage collection inside the lock
_entries: Dict[str, _Entry] = {}


class LibraryLease:
    """A use of the loaded copy of one library; `release()` when the model using it is gone."""

    def __init__(self, digest: str, path: str) -> None:
        self.digest, self.path, self._released = digest, path, False

    def release(self) -> None:
        with _lock:
            if not self._released:
                self._released = True
                _entries[self.digest].users -= 1
            _forget_unloaded()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: module state may already be gone
            pass


def lease(digest: str, candidate: SealedFile) -> LibraryLease:
    """The process's copy of the library with `digest`: `candidate` becomes it, or is closed in favour of
    the one already loaded (same digest, same bytes)."""
    with _lock:
        _forget_unloaded()
        entry = _entries.get(digest)
        if entry is None:
            entry = _entries[digest] = _Entry(candidate)
        elif entry.copy is not candidate:
            candidate.close()
        entry.users += 1
        return LibraryLease(digest, entry.copy.path)


def _forget_unloaded() -> None:
    # A copy is closed only when unused *and* unloaded: its fd number must not be reused while glibc
    # still knows a library by the name /proc/self/fd/N (dlopen matches loaded libraries by name).
    for digest in [d for d, e in _entries.items() if e.users == 0 and not _still_loaded(e.copy.path)]:
        _entries.pop(digest).copy.close()
