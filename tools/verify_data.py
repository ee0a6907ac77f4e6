#!/usr/bin/env python
"""Check a megatron-core .bin/.idx pair (same as `melama verify-data`)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from melama_mcore.cli import run_main  # noqa: E402
from melama_mcore.commands.verify_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
