"""What the command lines share: errors in one line, under the name they were invoked by."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

USAGE_ERROR = 2  # argparse's own status for a bad argument


class OneLineErrors(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (the usage block is long), exit status 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def program_name(argv: Optional[Sequence[str]], entry_point: str) -> str:
    """As invoked (scripts/x.py or its entry point), for usage and every error; for `argv` given (a call from
    Python, the tests'), the entry point's."""
    return Path(sys.argv[0]).name if argv is None else entry_point
