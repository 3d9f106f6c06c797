#!/usr/bin/env python
"""The benchmark CLI (the same as `python -m imagepiece.bench`); `--help` lists every mode (suite, compile, ...).

    python scripts/benchmark.py suite --quick
    python scripts/benchmark.py --help
"""
import sys

from imagepiece.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmark.py"))
