"""SIGTERM handled like Ctrl-C by the command-line tools: an exception that unwinds.

Python's default for SIGTERM ends the process at once, so no `with` or `finally` block runs: a killed
benchmark left its busy neighbour processes spinning and its HTTP server listening, and a killed compile
left its staging folder. Raised in the main thread instead, `Terminated` unwinds like KeyboardInterrupt,
and the tools catch both: one line, and the exit status a shell expects (130 for Ctrl-C, 143 for SIGTERM).
"""
from __future__ import annotations

import contextlib
import signal
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
    # Docker (tini -g), systemd and scancel signal the whole process group: a DataLoader's workers die of this SIGTERM
    # too, and PyTorch's SIGCHLD handler raises each death as an error ("DataLoader worker (pid …) is killed by
    # signal"), over this stop or as a traceback while the loader is cleaned up. The process is stopping: a child's
    # death is no news now. (The workers keep SIGTERM's default: one that ignored it, as they ignore Ctrl-C, could not
    # be stopped by the loader's own terminate(), and one stuck on a slow file held the exit, then outlived it.)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
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
