"""The repository's scripts, run as a user runs them or called in this process.

`run_script` starts a fresh interpreter, exactly as a user's command line does: use it for what
only a real run shows (the exit status of the entry point, output from imports, a compile).
`call_script` calls the same `main(argv)` in this process and captures what it prints: use it for
the many bad-argument cases, which fail before any work. A fresh interpreter spends ~5 s importing
torch on 2 cores, longer than everything such a case checks.
"""
from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from imagepiece.termination import STOPPED

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """`python scripts/<name>.py args...` in a new process (in folder `cwd`, if given)."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@functools.lru_cache(maxsize=None)
def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (its `if __name__ == "__main__"` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_script(name: str, capsys, *args) -> subprocess.CompletedProcess:
    """`main(args)` of scripts/<name>.py in this process, with its exit status and output as `run_script`
    reports them (argparse's errors exit through SystemExit, as they do from the command line)."""
    argv = list(map(str, args))
    capsys.readouterr()  # what ran before is not this call's output
    message = ""
    try:
        status = load_script(name).main(argv)
    except SystemExit as exit:
        # sys.exit("text") prints the text and exits 1; sys.exit() exits 0.
        status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        message = "" if exit.code is None or isinstance(exit.code, int) else f"{exit.code}\n"
    except STOPPED as stop:  # one the command should have caught: a KeyboardInterrupt let out would stop the whole run
        pytest.fail(f"{name}.py let {type(stop).__name__} out of main()")
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([name, *argv], status, out, err + message)
