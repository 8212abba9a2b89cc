"""``hbat average``: save_pretrained folders in, one averaged folder out (uniform, a list of alphas, or learned HMA).

    hbat average --pre sft/ --post dpo/ --alpha 0.5 --out avg/
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from typing import Sequence

from .hma import HMAConfig, learn_hma
from .merge import ModelAverager
from .plan import NON_LAYER, SCOPES
from .samples import encode_samples, load_samples, sample_responses

__all__ = ["build_parser", "run", "main"]


def _parse_alphas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alpha takes a number or a comma-separated list, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--alpha is empty")
    for a in values:
        if not 0.0 <= a <= 1.0 or math.isnan(a):
            raise argparse.ArgumentTypeError(f"--alpha {a} is outside [0, 1]")
    return values


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
    parser.add_argument("--alpha", required=True, type=_parse_alphas,
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
    return parser


def _load_lm(path: str):
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder (expected a save_pretrained model folder)")
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto")


def _load_tokenizer(*paths: str):
    from transformers import AutoTokenizer

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
    if args.hma and not args.samples:
        raise SystemExit("hbat average: --hma needs --samples FILE (samples of the aligned policy)")
    if args.hma and len(args.alpha) != 1:
        raise SystemExit("hbat average: --hma takes one --alpha (the mean ratio)")
    pre, post = _load_lm(args.pre), _load_lm(args.post)
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
