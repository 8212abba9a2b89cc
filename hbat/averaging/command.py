"""``hbat average``: save_pretrained folders in, one averaged folder out (uniform, a list of alphas, or learned
HMA); with ``--sweep`` a ratio sweep evaluated in memory, written as a table, a Pareto front and a plot.

    hbat average --pre sft/ --post dpo/ --alpha 0.5 --out avg/
    hbat average --pre sft/ --post dpo/ --sweep --alpha 0,0.25,0.5,0.75,1,1.25 --ratios 0.2:0.5:0.9 \
        --eval-data new=dpo_prompts.jsonl --eval-data old=sft_heldout.jsonl --out sweep/

The sweep averages the aligned model in place with the SFT model (``hbat.averaging.InPlaceAverager``, one
fused pass per ratio), evaluates, and restores it exactly: no checkpoint per ratio. Each ``--eval-data
NAME=FILE`` gives the metric ``NAME/loss`` (mean LM loss on the file's samples, minimised), ``--eval
MODULE:FUNCTION`` adds ``FUNCTION(model, tokenizer) -> dict of numbers``. ``--out`` receives sweep.json (the
table so far, written after every ratio: an interrupted sweep run again with the same arguments reuses its
rows), sweep_result.json (table, objectives, Pareto front) and sweep.png.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from typing import Sequence

from ..trainer.checkpoint import write_text_atomic
from ..trainer.models import deepspeed_unimported, load_causal_lm
from .hma import HMAConfig, learn_hma
from .inplace import InPlaceAverager
from .merge import ModelAverager
from .plan import NON_LAYER, SCOPES
from .samples import encode_samples, load_samples, sample_responses
from .sweep import run_sweep

__all__ = ["build_parser", "run", "main"]


def _parse_alphas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alpha takes a number or a comma-separated list, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--alpha is empty")
    for a in values:
        if not math.isfinite(a) or a < 0:
            raise argparse.ArgumentTypeError(f"--alpha {a} must be a finite number >= 0")
    return values  # [0, 1] unless --sweep (where above 1 extrapolates, ExPO): checked in run()


def _ratio_vector(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios takes one ratio per block separated by ':', got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"--ratios {text!r} holds a non-finite ratio")
    return values


def _eval_data(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--eval-data takes NAME=FILE, got {text!r}")
    return name, path


def _blocks_arg(text: str):
    if text == "layer":
        return "layer"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes a positive int or 'layer', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--blocks must be >= 1, got {value}")
    return value


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="hbat average",
        description="Average a model before RLHF (--pre) with one after it (--post): uniformly with weight alpha "
                    "on the aligned model, or per layer block with learned ratios of mean alpha (--hma).")
    parser.add_argument("--pre", required=True, help="save_pretrained folder of the model before RLHF (SFT)")
    parser.add_argument("--post", required=True, help="save_pretrained folder of the aligned model")
    parser.add_argument("--alpha", type=_parse_alphas,
                        help="weight of the ALIGNED model in [0, 1] (released HMA code: ratio = 1 - alpha); "
                             "a comma-separated list writes one folder per value under --out (a sweep); "
                             "with --hma it is the mean ratio")
    parser.add_argument("--out", required=True, help="output folder (created; see --overwrite)")
    parser.add_argument("--scope", choices=SCOPES, default="all",
                        help="merge all tensors, or Linear weights only (released code; others copied from --pre)")
    parser.add_argument("--hma", action="store_true", help="heterogeneous averaging: learn one ratio per block")
    parser.add_argument("--blocks", type=_blocks_arg, default=3, help="HMA blocks: an int or 'layer' (default 3)")
    parser.add_argument("--non-layer", choices=NON_LAYER, default="attach",
                        help="HMA: embeddings / final norm / lm_head join the nearest block, use the mean ratio, "
                             "or keep the pre-RLHF values")
    parser.add_argument("--samples", help="HMA: JSONL ({prompt, response} | {text} | {prompt}) or text file of "
                                          "aligned-policy samples")
    parser.add_argument("--steps", type=int, default=HMAConfig.steps, help="HMA: Adam steps on the block logits")
    parser.add_argument("--lr", type=float, default=HMAConfig.lr, help="HMA: learning rate of the block logits")
    parser.add_argument("--l1", type=float, default=HMAConfig.l1, help="HMA: weight of the L1 pull towards alpha")
    parser.add_argument("--batch-size", type=int, default=4, help="HMA: samples per step")
    parser.add_argument("--max-length", type=int, default=256, help="HMA: tokens per sample (truncated)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="HMA: length of sampled responses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", help="hbat.ops backend")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    sweep = parser.add_argument_group("sweep (--sweep): evaluate ratios in memory, no model written")
    sweep.add_argument("--sweep", action="store_true", help="evaluate every --alpha (above 1: extrapolation, ExPO) and "
                                                            "--ratios vector; --out gets the table, front and plot")
    sweep.add_argument("--ratios", type=_ratio_vector, action="append", default=[], metavar="R1:R2:...",
                       help="one HMA ratio per --blocks block, ':'-separated (repeatable)")
    sweep.add_argument("--eval-data", type=_eval_data, action="append", default=[], metavar="NAME=FILE",
                       help="NAME=FILE (samples as for --samples): metric NAME/loss, the mean LM loss (repeatable)")
    sweep.add_argument("--eval", dest="eval_fn", metavar="MODULE:FUNCTION", help="MODULE:FUNCTION, called as FUNCTION(model, tokenizer) -> dict")
    sweep.add_argument("--maximize", action="append", default=[], metavar="METRIC", help="an objective to maximise (repeatable)")
    sweep.add_argument("--minimize", action="append", default=[], metavar="METRIC",
                       help="an objective to minimise (repeatable; default: every NAME/loss)")
    return parser


def _load_lm(path: str, flag: str):
    """The causal LM of the folder ``path``, its weights checked against its config.json (no weight at random)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder (expected a save_pretrained model folder)")
    return load_causal_lm(path, "auto", key=flag)


def _load_tokenizer(*paths: str):
    from transformers import AutoTokenizer  # optional dependency (hbat[train])

    errors = []
    for path in paths:
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - try the next folder, report all at the end
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
    raise ValueError("HMA needs a tokenizer saved with a model; none loaded:\n  " + "\n  ".join(errors))


def _save_atomic(model, tokenizer, out_dir: str, info: dict, overwrite: bool) -> None:
    """save_pretrained into a temporary sibling folder, then rename it into place."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hbat-average-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output folder gets what mkdir would give
        with deepspeed_unimported():
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "hbat_average.json"), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """``hbat average ...``: parse ``argv`` (without the subcommand name) and run."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run ``hbat average`` on arguments parsed by a parser that ``build_parser`` filled."""
    if args.sweep:
        return _run_sweep(args)
    if not args.alpha:
        raise SystemExit("hbat average: --alpha is required (a number or a comma-separated list in [0, 1])")
    outside = [a for a in args.alpha if a > 1]
    if outside:
        raise SystemExit(f"hbat average: --alpha {outside[0]:g} is outside [0, 1] (extrapolation only with --sweep)")
    if args.hma and not args.samples:
        raise SystemExit("hbat average: --hma needs --samples FILE (samples of the aligned policy)")
    if args.hma and len(args.alpha) != 1:
        raise SystemExit("hbat average: --hma takes one --alpha (the mean ratio)")
    pre, post = _load_lm(args.pre, "--pre"), _load_lm(args.post, "--post")
    tokenizer = None
    try:
        tokenizer = _load_tokenizer(args.post, args.pre)
    except ValueError:
        if args.hma:
            raise
    source = {"pre": os.path.abspath(args.pre), "post": os.path.abspath(args.post), "scope": args.scope,
              "convention": "theta = (1 - alpha) * theta_pre + alpha * theta_post (released HMA code: ratio = 1 - alpha)"}

    if not args.hma:
        averager = ModelAverager(pre, post, scope=args.scope, backend=args.backend)
        many = len(args.alpha) > 1
        for alpha, model in averager.sweep(args.alpha):
            out_dir = os.path.join(args.out, f"alpha_{alpha:g}") if many else args.out
            _save_atomic(model, tokenizer, out_dir, {**source, "method": "uniform", "alpha": alpha}, args.overwrite)
            print(f"alpha={alpha:g} -> {out_dir}")
        return 0

    rows = load_samples(args.samples)
    prompts_only = [r for r in rows if "text" not in r and "response" not in r]
    if prompts_only:
        print(f"sampling {len(prompts_only)} responses from the aligned model ...", file=sys.stderr)
        responses = sample_responses(post, tokenizer, [r["prompt"] for r in prompts_only],
                                     max_new_tokens=args.max_new_tokens, seed=args.seed)
        for row, response in zip(prompts_only, responses):
            row["response"] = response
    batches = encode_samples(tokenizer, rows, max_length=args.max_length, batch_size=args.batch_size)
    cfg = HMAConfig(alpha=args.alpha[0], blocks=args.blocks, scope=args.scope, non_layer=args.non_layer,
                    steps=args.steps, lr=args.lr, l1=args.l1, seed=args.seed, backend=args.backend)
    result = learn_hma(pre, post, batches, cfg)
    info = {**source, "method": "hma", **result.to_dict(), "config": asdict(cfg)}
    _save_atomic(result.model, tokenizer, args.out, info, args.overwrite)
    for name, ratio in zip(result.block_names, result.ratios):
        print(f"{name}: alpha={ratio:.4f}")
    print(f"mean alpha={sum(result.ratios) / len(result.ratios):.4f} -> {args.out}")
    return 0


def _loss_metric(batches: list[dict]):
    def metric(model) -> float:
        return sum(float(model(**batch).loss) for batch in batches) / len(batches)

    return metric


def _user_eval(spec: str):
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SystemExit(f"hbat average: --eval {spec!r}: cannot import it ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise SystemExit(f"hbat average: --eval {spec!r} is not callable")
    return fn


def _run_sweep(args: argparse.Namespace) -> int:
    ratios = list(args.alpha or []) + list(args.ratios)
    if not ratios:
        raise SystemExit("hbat average --sweep: give the ratios with --alpha (a list) and/or --ratios")
    if not args.eval_data and not args.eval_fn:
        raise SystemExit("hbat average --sweep: give what to evaluate: --eval-data NAME=FILE and/or --eval MODULE:FN")
    for name, path in args.eval_data:
        if not os.path.isfile(path):
            raise SystemExit(f"hbat average --sweep: --eval-data {name}={path}: no such file")
    user = _user_eval(args.eval_fn) if args.eval_fn else None
    pre, post = _load_lm(args.pre, "--pre"), _load_lm(args.post, "--post")
    tokenizer = _load_tokenizer(args.post, args.pre) if args.eval_data or user else None
    metrics = {f"{name}/loss": _loss_metric(encode_samples(tokenizer, load_samples(path), max_length=args.max_length,
                                                           batch_size=args.batch_size))
               for name, path in args.eval_data}

    def evaluate(model, share):
        out = {key: fn(model) for key, fn in metrics.items()}
        if user is not None:
            out.update(user(model, tokenizer))
        return out

    minimize = args.minimize or ([k for k in metrics if k not in args.maximize])
    averager = InPlaceAverager(post, scope=args.scope, blocks=args.blocks if args.ratios else None,
                               non_layer=args.non_layer, start_from=pre, backend=args.backend)
    del pre  # its tensors are the start copy now
    os.makedirs(args.out, exist_ok=True)
    result = run_sweep(averager, ratios, evaluate, maximize=args.maximize, minimize=minimize,
                       table=os.path.join(args.out, "sweep.json"), plot=os.path.join(args.out, "sweep.png"),
                       log=lambda row: print(json.dumps(row), flush=True))
    info = {**result.to_dict(), "pre": os.path.abspath(args.pre), "post": os.path.abspath(args.post),
            "convention": "theta = (1 - ratio) * theta_pre + ratio * theta_post; above 1: extrapolation (ExPO)"}
    write_text_atomic(json.dumps(info, indent=1), os.path.join(args.out, "sweep_result.json"))
    if result.reused:
        print(f"reused {result.reused} rows of {os.path.join(args.out, 'sweep.json')}", file=sys.stderr)
    print("Pareto front: " + ", ".join(str(result.rows[i]["ratio"]) for i in result.front))
    return 0
