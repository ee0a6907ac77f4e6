#!/usr/bin/env python
"""Per-source token shares and epochs of a blend (same as `melama blend-report`)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from melama_mcore.cli import run_main  # noqa: E402
from melama_mcore.commands.blend_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
