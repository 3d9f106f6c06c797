#!/usr/bin/env python
"""Classify images over HTTP with a compiled artifact: `python scripts/serve.py --help` (same as `imagepiece-serve`)."""
import sys

from imagepiece.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
