"""The `hbat` command line: subcommands over the package's jobs."""
from __future__ import annotations

import argparse
import sys

from . import averaging
from .info import report
from .ops_demo import main as ops_demo_main
from .trainer import compare as compare_run
from .trainer import run as train_run
from .trainer.procgroup import finish


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hbat", description="Hybrid Alignment Training")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built and which backends run here")
    ops_demo = sub.add_parser("ops-demo", help="the fused ops on a Llama-shaped list of tensors, against a naive penalty")
    ops_demo.add_argument("args", nargs=argparse.REMAINDER)
    train = sub.add_parser("train", help="train with HBAT (or a baseline); no config: the embedded default demo")
    train_run.build_parser(train)
    train.set_defaults(func=train_run.run)
    compare = sub.add_parser("compare", help="several methods on the same data and budget: table, plot, commands")
    compare_run.build_parser(compare)
    compare.set_defaults(func=compare_run.run)
    average = sub.add_parser("average", help="average an SFT and an aligned model (uniform or HMA)")
    averaging.build_parser(average)
    average.set_defaults(func=averaging.run)
    args = parser.parse_args(argv)
    if args.command == "info":
        print(report())
        return 0
    if args.command == "ops-demo":
        ops_demo_main(args.args)
        return 0
    try:
        code = int(args.func(args) or 0)
    except train_run.COMMAND_ERRORS as exc:  # bad input: a message, not a traceback
        code = train_run.report_error(f"hbat {args.command}", exc)
    return finish(code)


if __name__ == "__main__":
    sys.exit(main())
