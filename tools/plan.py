#!/usr/bin/env python
"""Parallel layouts that fit, with predicted memory and MFU (same as `melama plan`)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from melama_mcore.cli import run_main  # noqa: E402
from melama_mcore.commands.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
