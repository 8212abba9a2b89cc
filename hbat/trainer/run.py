"""`hbat train [CONFIG] [--set key=value ...]`: one or several methods on the same data, then a summary table.

With no CONFIG the embedded default runs (no download, CPU, a few minutes): the generated task, a tiny Llama
pre-trained on generated text, then two-stage SFT -> DPO and HBAT side by side (``make demo``).

Exit codes: 0 every run finished; 2 an error before or during the runs (one line ``hbat train: ...``
naming the key, file or line); 3 a run diverged (its row says so; the other methods ran).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from ..errors import UserError
from .algorithm import run_method
from .checkpoint import remove_stale_temp_files, write_text_atomic
from .config import dump_config, load_config
from .evaluate import evaluate_run
from .guards import TrainingDiverged
from .lock import run_lock
from .memory import plan_memory
from .plots import write_training_curves
from .metrics import markdown_table
from .procgroup import finish, shutdown_distributed
from .validate import check_data
from .rundata import load_data
from .workspace import prepare

SUMMARY_COLUMNS = ["method", "eval/exact_match", "eval/sft_loss", "eval/preference", "eval/reward",
                   "eval/win_rate", "eval/kl_to_sft", "train_seconds"]
DEFAULT_METHODS = ("two_stage", "hbat")
DIVERGED = "diverged"  # the metric cells of a diverged run
EXIT_ERROR, EXIT_DIVERGED = 2, 3  # exit codes: bad input / a file / a setting; a run diverged


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
    return markdown_table(results, SUMMARY_COLUMNS)


def train(config_path, overrides, methods=None, *, resume=False, progress=True, name=None) -> list[dict]:
    """Run ``methods`` (default: the config's method) with shared data and models; returns their results.

    Everything is checked before anything is trained: every method's config, the data against each of them,
    each method's memory plan against the device (printed), and the run folders, which are locked for the run
    (a second run into one of them is refused). A method
    whose training diverges gets a result with ``"status": "diverged"`` and its ``"error"``; the others run.
    """
    base = load_config(config_path, overrides)
    methods = methods or [base.method]
    configs = [load_config(config_path, list(overrides) + [f"method={m}"]) for m in methods]
    if name is not None and len(configs) != 1:
        raise ValueError("--name needs exactly one method")
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under DeepSpeed only rank 0 prints and writes
    data = load_data(base)
    for cfg in configs:
        check_data(data.splits, cfg, data.sources)
    plans = [plan_memory(cfg) for cfg in configs]  # sized from the models' configs: nothing is loaded yet
    for plan in plans:
        plan.check()
    with contextlib.ExitStack() as locks:
        if main_rank:
            for cfg in configs:
                locks.enter_context(run_lock(os.path.join(cfg.output_dir, name or cfg.method)))
            remove_stale_temp_files(base.output_dir)
            for cfg in configs:
                write_text_atomic(dump_config(cfg), os.path.join(cfg.output_dir, f"config-{name or cfg.method}.yaml"))
            print(f"hbat train: {', '.join(methods)} -> {base.output_dir}")
            for method, plan in zip(methods, plans):
                print(f"[{method}] {plan.table()}")
            if base.model.path is not None and base.model.reward_path is None:  # no weight of it comes from a file
                print("reward model: the SFT model with a new score head (created by hbat), trained on data.preference")
        started = time.perf_counter()
        ws = prepare(base, progress=progress, data=data)
        if ws.info and main_rank:
            print("task: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in ws.info.items() if k.startswith("pref_train")))
        results = []
        for cfg in configs:
            try:
                results.append(run_method(ws, cfg, resume=resume, progress=progress, run_name=name))
            except TrainingDiverged as exc:  # reported; the other methods still run
                if main_rank:
                    print(f"hbat train: {exc}", file=sys.stderr, flush=True)
                results.append(exc.result)  # as in the run's result.json
    rows = [summary_row(r) for r in results]
    if main_rank and name is None and ws.sft_model is not None:  # the starting point, to read the tax against
        rows.insert(0, {"method": "sft (reference)", **evaluate_run(ws, ws.sft_model, base)})
    table = summary_table(rows)
    command = "hbat train" + (f" {config_path}" if config_path else "") + \
        "".join(f" --set {o}" for o in overrides) + (f" --methods {','.join(methods)}" if len(methods) > 1 else "")
    text = (f"# hbat train summary\n\nCommand: `{command}`\n\nWall time: {time.perf_counter() - started:.0f} s "
            f"(the shared base model, SFT reference and reward model are cached in {base.output_dir}/shared)\n\n"
            f"{table}\n")
    diverged = [r["error"] for r in results if r["status"] == "diverged"]
    if diverged:
        text += "\nDiverged (no result; checkpoint.pt and best.pt are those of the last good stage):\n\n" + \
            "".join(f"- {error}\n" for error in diverged)
    if main_rank:
        # a named run (one row of `hbat compare`) gets its own summary files in a shared output folder
        stem = f"summary-{name}" if name else "summary"
        write_text_atomic(text, os.path.join(base.output_dir, f"{stem}.md"))
        write_text_atomic(json.dumps(results, indent=2, default=str), os.path.join(base.output_dir, f"{stem}.json"))
        # curves.png: the metrics over training of these runs
        write_training_curves(results, os.path.join(base.output_dir, stem.replace("summary", "curves") + ".png"))
        print("\n" + table)
    if base.deepspeed is not None:
        shutdown_distributed()  # only after every rank finished: a failed rank exits with its error instead
    return results


def summary_row(result: dict) -> dict:
    """A row of the summary table: a diverged run shows "diverged" in every metric column."""
    if result.get("status") == "diverged":
        return {"method": result["method"], **{c: DIVERGED for c in SUMMARY_COLUMNS if c.startswith("eval/")}}
    return {**result, "train_seconds": round(result["train_seconds"])}


def run(args) -> int:
    base = load_config(args.config, args.overrides)
    methods = resolve_methods(args, base)
    for m in methods:  # validate every method before any work
        load_config(args.config, list(args.overrides) + [f"method={m}"])
    if args.print_config:
        for m in methods:
            print(f"# method {m}\n" + dump_config(load_config(args.config, list(args.overrides) + [f"method={m}"])))
        return 0
    with contextlib.ExitStack() as stack:
        if args.no_progress:
            stack.enter_context(_no_transformers_bars())
        results = train(args.config, args.overrides, methods, resume=args.resume, progress=not args.no_progress,
                        name=args.name)
    return EXIT_DIVERGED if any(r["status"] == "diverged" for r in results) else 0


@contextlib.contextmanager
def _no_transformers_bars():
    """transformers' own progress bars ("Loading weights") off inside, as hbat's are with --no-progress."""
    from transformers.utils import logging as hf_logging  # heavy, optional (hbat[train])

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# what a command reports in one line (report_error) instead of a traceback
COMMAND_ERRORS = (TrainingDiverged, UserError, ValueError, OSError, KeyError, NotImplementedError)


def report_error(prog: str, exc: BaseException) -> int:
    """One line ``prog: message`` on stderr for an error of ``COMMAND_ERRORS``, and the command's exit code:
    EXIT_DIVERGED (training diverged) or EXIT_ERROR (bad input, a file, a setting, the disk).

    The user's input and machine raise ``hbat.errors.UserError`` where hbat reads or writes their files (config,
    model folder, tokenizer, data, checkpoints: hbat.errors.reading / writing turn third-party exceptions into
    it), a ValueError of an argument check, or an OSError naming its file. Any other exception is a bug of
    hbat and keeps its traceback (the commands catch only ``COMMAND_ERRORS``)."""
    if isinstance(exc, TrainingDiverged):
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    message = f"missing key {exc}" if type(exc) is KeyError else " ".join(
        line.strip() for line in str(exc).splitlines() if line.strip())  # one line, whatever raised it
    print(f"{prog}: {message}", file=sys.stderr)
    return EXIT_ERROR


def main(argv=None) -> int:
    args = build_parser(argparse.ArgumentParser(prog="hbat train", description=__doc__.splitlines()[0])).parse_args(argv)
    try:
        code = run(args)
    except COMMAND_ERRORS as exc:
        code = report_error("hbat train", exc)
    return finish(code)


if __name__ == "__main__":
    sys.exit(main())
