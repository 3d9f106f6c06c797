#!/usr/bin/env python
"""Classify images over HTTP with a compiled artifact: `python scripts/serve.py --help` (same as `imagepiece-serve`)."""
import sys

from imagepiece.entry_points import serve as main

if __name__ == "__main__":
    sys.exit(main())
