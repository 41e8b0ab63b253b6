"""``python -m kernelsearch.tune tune|report ...``: the tuner's commands without the top-level CLI."""
from __future__ import annotations

import argparse
import sys

from ..errors import KernelsearchError
from .cli import register


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernelsearch.tune")
    sub = ap.add_subparsers(dest="command", required=True)
    register(sub)
    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except KernelsearchError as e:
        print(f"kernelsearch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
