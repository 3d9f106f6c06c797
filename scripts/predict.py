#!/usr/bin/env python
"""Label image files with a compiled artifact: `python scripts/predict.py --help` (same as `imagepiece-predict`)."""
import sys

from imagepiece.predict.cli import main

if __name__ == "__main__":
    sys.exit(main())
