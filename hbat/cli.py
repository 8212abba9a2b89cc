"""The `hbat` command line: subcommands over the package's jobs."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hbat", description="Hybrid Alignment Training")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built and which backends run here")
    demo = sub.add_parser("demo", help="the fused ops on a Llama-shaped list of tensors, against a naive penalty")
    demo.add_argument("args", nargs=argparse.REMAINDER)
    from . import averaging

    average = sub.add_parser("average", help="average an SFT and an aligned model (uniform or HMA)")
    averaging.build_parser(average)
    average.set_defaults(func=averaging.run)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import report

        print(report())
        return 0
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(args.args)
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # bad input or paths: a message, not a traceback
        print(f"hbat {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
