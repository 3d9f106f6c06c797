"""SIGTERM handled like Ctrl-C by the command-line tools: an exception that unwinds.

Python's default for SIGTERM ends the process at once, so no `with` or `finally` block runs: a killed
benchmark left its busy neighbour processes spinning and its HTTP server listening, and a killed compile
left its staging folder. Raised in the main thread instead, `Terminated` unwinds like KeyboardInterrupt,
and the tools catch both: one line, and the exit status a shell expects (130 for Ctrl-C, 143 for SIGTERM).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator


class Terminated(BaseException):
    """The process got SIGTERM while inside `sigterm_unwinds()`.

    A BaseException, as KeyboardInterrupt is: the `except Exception` that keeps a long run going past one bad
    file (a decode error row, an unreadable table) must not turn the stop into an error row and carry on."""


STOPPED = (KeyboardInterrupt, Terminated)


def how_stopped(stop: BaseException) -> str:
    """"terminated" (SIGTERM) or "interrupted" (Ctrl-C), for the tools' one-line message."""
    return "terminated" if isinstance(stop, Terminated) else "interrupted"


def exit_status(stop: BaseException) -> int:
    """128 + the signal's number, as a shell reports a process that the signal ended."""
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    loader_worker_deaths_unshown()  # now: a loader is cleaned up as the stop unwinds, before any `except` runs
    raise Terminated


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM are noted, not raised; the first is raised (KeyboardInterrupt,
    Terminated) when the block has finished: for steps that a stop must not cut in half. Python-level handlers,
    not a signal mask: Python runs handlers in the main thread whichever thread the kernel delivered to."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {number: signal.signal(number, lambda signum, frame: received.append(signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        raise Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread; the previous handler comes back after.
    Elsewhere than the main thread (where Python delivers signals) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def loader_worker_deaths_unshown() -> None:
    """For the rest of this (ending) process, once SIGTERM has stopped it: a DataLoader's report that its worker
    processes died is not shown. Docker (tini -g), systemd and scancel signal the whole process group, so the workers
    die of the SIGTERM the command unwinds from, and the loader, cleaned up as it unwinds, reports each death
    ("DataLoader worker (pid …) is killed by signal: Terminated") as an exception it ignores: a traceback above the
    command's one line. The workers keep SIGTERM's default: one that ignored it (as PyTorch's ignore Ctrl-C) could
    not be stopped by the loader's own terminate(), and one stuck on a slow file held the command's exit, then
    outlived it."""
    if getattr(sys.unraisablehook, "drops_loader_worker_deaths", False):
        return
    shown = sys.unraisablehook

    def hook(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value).startswith("DataLoader worker")):
            shown(unraisable)

    hook.drops_loader_worker_deaths = True
    sys.unraisablehook = hook
