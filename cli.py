#!/usr/bin/env python3
"""Run the kernelsearch CLI from a checkout: `python cli.py tune specs/cosine_sim.yaml`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernelsearch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
