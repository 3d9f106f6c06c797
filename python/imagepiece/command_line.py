"""What the command lines share: errors in one line, under the name they were invoked by."""
from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

USAGE_ERROR = 2  # argparse's own status for a bad argument


class OneLineErrors(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (the usage block is long), exit status 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def program_name(argv: Optional[Sequence[str]], entry_point: str) -> str:
    """As invoked (scripts/x.py or its entry point), for usage and every error; for `argv` given (a call from
    Python, the tests'), the entry point's."""
    return Path(sys.argv[0]).name if argv is None else entry_point


# What pip installs (the name in an error) for each optional module the commands import.
DISTRIBUTIONS = {"PIL": "pillow", "tqdm": "tqdm", "pyarrow": "pyarrow", "ray": "ray[data]", "fastapi": "fastapi", "uvicorn": "uvicorn",
                 "python_multipart|multipart": "python-multipart", "prometheus_client": "prometheus_client", "matplotlib": "matplotlib"}


class MissingExtra(ImportError):
    """An optional package a command needs is not installed; the message names it and the extra that installs it."""


def missing_modules(modules: Sequence[str]) -> list:
    """Those not importable; "a|b" is either (python-multipart's module was `multipart` before 0.0.13)."""
    return [module for module in modules if all(importlib.util.find_spec(name) is None for name in module.split("|"))]


def require_extra(extra: str, modules: Sequence[str], what: str) -> None:
    """MissingExtra unless every module is importable: checked before any work, where the import itself would fail
    as a traceback (or, for Parquet output, after every image was predicted)."""
    missing = missing_modules(modules)
    if missing:
        names = ", ".join(DISTRIBUTIONS.get(module, module) for module in missing)
        raise MissingExtra(f"{what} needs {names}, which is not installed: pip install 'imagepiece[{extra}]'")


def run_entry_point(module: str, entry_point: str) -> int:
    """Runs `module`.main(), or says in one line (exit 2) which optional package importing it lacks."""
    try:
        main = importlib.import_module(module).main
    except MissingExtra as missing:
        print(f"{program_name(None, entry_point)}: error: {missing}", file=sys.stderr)
        return USAGE_ERROR
    return main()


def warning_printer(prog: Optional[str] = None) -> Callable[[str], None]:
    """A `warn` callback for the commands: each message one line on stderr, "<prog>: warning: ..." ("warning: ..."
    without `prog`, for a library function called outside a command)."""
    prefix = f"{prog}: warning: " if prog else "warning: "
    return lambda message: print(prefix + message, file=sys.stderr)


class Shortage(NamedTuple):
    """An allocation that failed: its size when PyTorch's CPU allocator says it (None for Python's MemoryError)."""

    bytes: Optional[int]

    def __str__(self) -> str:
        return "Python ran out of memory" if self.bytes is None else f"could not allocate {self.bytes / 2**30:.1f} GiB"


def causes(error: Optional[BaseException]) -> Iterator[BaseException]:
    """`error`, then what caused it, and so on (a library's exception often wraps the one that says what happened)."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def allocation_failure(error: Optional[BaseException]) -> Optional[Shortage]:
    """The shortage, when `error` (or what caused it) is running out of memory: building a model with an absurd head
    (--num-classes in the millions) must end in one line, not a traceback."""
    for cause in causes(error):
        if isinstance(cause, MemoryError):
            return Shortage(None)
        asked = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(cause))
        if isinstance(cause, RuntimeError) and asked:
            return Shortage(int(asked.group(1)))
    return None


# What a failed read or write says (os.strerror), also when it surfaces only as text inside another error's.
IO_REASONS = [os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)]
# What g++ prints when the kernel's out-of-memory killer stops its cc1plus (inside Inductor's CppCompileError).
COMPILER_KILLED = "Killed signal terminated program"
KILLED_COMPILER_MESSAGE = "the C++ compiler was killed (the kernel does so when memory runs out)"


def io_failure(error: Optional[BaseException]) -> Optional[str]:
    """The reason, when `error` (or what caused it) is a failed read or write, else None.

    A full disk during compilation surfaces as the C++ compiler's error inside Inductor's own
    exception, so its text is searched too."""
    for cause in causes(error):
        if isinstance(cause, OSError):
            return cause.strerror or str(cause)
        reason = next((reason for reason in IO_REASONS if reason in str(cause)), None)
        if reason is not None:
            return reason
    return None


def compiler_killed(error: Optional[BaseException]) -> bool:
    return any(COMPILER_KILLED in str(cause) for cause in causes(error))


def machine_failure(error: BaseException) -> Optional[str]:
    """One line for a failure of the machine rather than of the code (memory, disk, a compiler the kernel killed),
    else None: a compile that fails so is said so, where its traceback would hide the reason under Inductor's frames."""
    shortage = allocation_failure(error)
    if shortage is not None:
        return f"out of memory: {shortage}"
    if compiler_killed(error):
        return KILLED_COMPILER_MESSAGE
    reason = io_failure(error)  # only a full disk and its kin: another OSError (a port in use, say) keeps its traceback
    return f"could not read or write a file: {reason}" if reason in IO_REASONS else None
