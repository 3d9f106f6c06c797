#!/usr/bin/env python
"""Label image files with a compiled artifact: `python scripts/predict.py --help` (same as `imagepiece-predict`)."""
import sys

from imagepiece.entry_points import predict as main

if __name__ == "__main__":
    sys.exit(main())
