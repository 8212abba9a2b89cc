"""`hbat train [CONFIG] [--set key=value ...]`: one or several methods on the same data, then a summary table.

With no CONFIG the embedded default runs (no download, CPU, a few minutes): the generated task, a tiny Llama
pre-trained on generated text, then two-stage SFT -> DPO and HBAT side by side (``make demo``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

SUMMARY_COLUMNS = ["method", "eval/exact_match", "eval/sft_loss", "eval/preference", "eval/reward",
                   "eval/win_rate", "eval/kl_to_sft", "train_seconds"]
DEFAULT_METHODS = ("two_stage", "hbat")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded task and settings)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set sft.lr=3e-4 --set ewc.f_max=50 (repeatable)")
    parser.add_argument("--methods", help="comma-separated methods to run on the same data "
                        f"(default: the config's method; with no config: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--name", help="folder / row name of the run (default: the method; one method only)")
    parser.add_argument("--resume", action="store_true", help="continue each method from its last checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def resolve_methods(args, base_cfg) -> list[str]:
    if args.methods:
        return [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.config is None and not any(o.startswith("method=") for o in args.overrides):
        return list(DEFAULT_METHODS)
    return [base_cfg.method]


def summary_table(results: list[dict]) -> str:
    from .metrics import markdown_table

    return markdown_table(results, SUMMARY_COLUMNS)


def train(config_path, overrides, methods=None, *, resume=False, progress=True, name=None) -> list[dict]:
    """Run ``methods`` (default: the config's method) with shared data and models; returns their results."""
    from .checkpoint import write_text_atomic
    from .config import dump_config, load_config
    from .loop import run_method
    from .workspace import prepare

    base = load_config(config_path, overrides)
    methods = methods or [base.method]
    configs = [load_config(config_path, list(overrides) + [f"method={m}"]) for m in methods]
    if name is not None and len(configs) != 1:
        raise ValueError("--name needs exactly one method")
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under DeepSpeed only rank 0 prints and writes
    os.makedirs(base.output_dir, exist_ok=True)
    if main_rank:
        for cfg in configs:
            write_text_atomic(dump_config(cfg), os.path.join(cfg.output_dir, f"config-{name or cfg.method}.yaml"))
        print(f"hbat train: {', '.join(methods)} -> {base.output_dir}")
    started = time.perf_counter()
    ws = prepare(base, progress=progress)
    if ws.info and main_rank:
        print("task: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in ws.info.items() if k.startswith("pref_train")))
    results = [run_method(ws, cfg, resume=resume, progress=progress, run_name=name) for cfg in configs]
    rows = [{**r, "train_seconds": round(r["train_seconds"])} for r in results]
    if main_rank and name is None and ws.sft_model is not None:  # the starting point, to read the tax against
        from .loop import evaluate

        rows.insert(0, {"method": "sft (reference)", **evaluate(ws, ws.sft_model, base)})
    table = summary_table(rows)
    command = "hbat train" + (f" {config_path}" if config_path else "") + \
        "".join(f" --set {o}" for o in overrides) + (f" --methods {','.join(methods)}" if len(methods) > 1 else "")
    text = (f"# hbat train summary\n\nCommand: `{command}`\n\nWall time: {time.perf_counter() - started:.0f} s "
            f"(the shared base model, SFT reference and reward model are cached in {base.output_dir}/shared)\n\n"
            f"{table}\n")
    if main_rank:
        # a named run (one row of `hbat compare`) gets its own summary files in a shared output folder
        stem = f"summary-{name}" if name else "summary"
        write_text_atomic(text, os.path.join(base.output_dir, f"{stem}.md"))
        write_text_atomic(json.dumps(results, indent=2, default=str), os.path.join(base.output_dir, f"{stem}.json"))
        print("\n" + table)
    if base.deepspeed is not None:
        from .engine import shutdown_distributed

        shutdown_distributed()  # only after every rank finished: a failed rank exits with its error instead
    return results


def run(args) -> int:
    from .config import dump_config, load_config

    base = load_config(args.config, args.overrides)
    methods = resolve_methods(args, base)
    for m in methods:  # validate every method before any work
        load_config(args.config, list(args.overrides) + [f"method={m}"])
    if args.print_config:
        for m in methods:
            print(f"# method {m}\n" + dump_config(load_config(args.config, list(args.overrides) + [f"method={m}"])))
        return 0
    train(args.config, args.overrides, methods, resume=args.resume, progress=not args.no_progress, name=args.name)
    return 0


def main(argv=None) -> int:
    parser = build_parser(argparse.ArgumentParser(prog="hbat train", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        code = run(args)
    except (ValueError, OSError, KeyError) as exc:
        print(f"hbat train: {exc}", file=sys.stderr)
        return 2
    from .engine import finish

    return finish(code)


if __name__ == "__main__":
    sys.exit(main())
