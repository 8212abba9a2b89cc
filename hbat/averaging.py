"""Model averaging of the model before and after RLHF (Lin et al., 2024), on the fused ``hbat.ops.lerp_``.

Convention used everywhere in hbat: ``alpha`` is the weight of the ALIGNED (post-RLHF) model,

    theta = (1 - alpha) * theta_pre + alpha * theta_post      alpha = 0: the SFT model, alpha = 1: the aligned one.

(The released HMA code writes its ratio on the pre-RLHF model: their ``ratio`` is our ``1 - alpha``.)

* Uniform averaging: one alpha for every merged tensor; ``sweep`` walks a list of alphas re-using one output
  model (one fused pass per alpha, nothing re-allocated), which gives the reward / forgetting trade-off curve.
* Heterogeneous averaging (HMA): one ratio per block of layers (per layer, or e.g. 3 blocks bottom / middle /
  top). The ratios are ``alpha_g = alpha * w_g / mean(w)`` with ``w_g = sigmoid(a_g) + eps``: their mean is
  ``alpha`` by construction (sum_g alpha_g = alpha * G exactly), only their distribution over the layers is
  learned. The logits ``a_g`` minimise the LM loss of the merged model on samples of the aligned policy plus
  ``l1 * mean_g |alpha_g - alpha|``. A ratio may exceed 1 (extrapolation past the aligned model) when the
  others are small; it is at most ``G * alpha``.

Which tensors are merged (``scope``): "all" floating parameters, or "linear" (weights of nn.Linear / Conv1D
modules only, as the released code does; everything else, embeddings and norms, is copied from the pre-RLHF
model). For HMA, tensors outside the numbered layers (embeddings, final norm, lm_head) follow ``non_layer``:
"attach" (default; the block of the nearest preceding layer, block 0 before the first layer: embeddings go
with the bottom block, the final norm and lm_head with the top one), "mean" (merged with the mean ratio,
not learned, as the released split-merge script does) or "pre" (copied from the pre-RLHF model).

``main(argv)`` is the ``hbat average`` command (save_pretrained folders in, one folder out).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from . import ops
from .ops import _validate
from .trainer.models import deepspeed_unimported, load_causal_lm

__all__ = [
    "SCOPES",
    "NON_LAYER",
    "MergePlan",
    "plan_merge",
    "ModelAverager",
    "average",
    "sweep",
    "hma_ratios",
    "HMAConfig",
    "HMAResult",
    "learn_hma",
    "encode_samples",
    "load_samples",
    "sample_responses",
    "build_parser",
    "run",
    "main",
]

SCOPES = ("all", "linear")
NON_LAYER = ("attach", "mean", "pre")
# "model.layers.3.", "transformer.h.3.", "encoder.layer.3.", "blocks.3." ...
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_LINEAR_CLASS_NAMES = ("Linear", "Conv1D")  # Conv1D: GPT-2's transposed Linear


# ----------------------------------------------------------------------------------------------------------
# Which tensors are merged, and in which block


@dataclass
class MergePlan:
    """The merged tensors (in ``named_parameters`` order), the block of each, and what is copied from pre.

    ``blocks[i]`` is the block index of ``names[i]``, or -1 for a tensor merged with the mean ratio
    (``non_layer="mean"``). ``copied`` lists the parameters that keep the pre-RLHF values.
    """

    names: list[str]
    blocks: list[int]
    block_names: list[str]
    copied: list[str] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)


def layer_index(name: str) -> int | None:
    """The transformer layer number in a parameter name ("model.layers.3.mlp..." -> 3), or None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def _is_linear_weight(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return attr == "weight" and type(module).__name__ in _LINEAR_CLASS_NAMES


def _block_of_layer(blocks, num_layers: int) -> tuple[Callable[[int], int], list[str]]:
    if blocks == "layer":
        return (lambda layer: layer), [f"layer {i}" for i in range(num_layers)]
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be a positive int or 'layer', got {blocks!r}")
    if blocks > num_layers:
        raise ValueError(f"blocks={blocks} but the model has only {num_layers} layers")
    # contiguous, as equal as possible: layer l -> floor(l * blocks / num_layers)
    names = []
    for b in range(blocks):
        members = [l for l in range(num_layers) if l * blocks // num_layers == b]
        names.append(f"layers {members[0]}-{members[-1]}" if len(members) > 1 else f"layer {members[0]}")
    return (lambda layer: layer * blocks // num_layers), names


def plan_merge(model: nn.Module, *, scope: str = "all", blocks=None, non_layer: str = "attach") -> MergePlan:
    """Choose the merged tensors of ``model`` and group them into blocks of layers.

    blocks: None (one block: uniform averaging), an int (that many contiguous blocks of layers, bottom to top),
    or "layer" (one block per layer).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if non_layer not in NON_LAYER:
        raise ValueError(f"non_layer must be one of {NON_LAYER}, got {non_layer!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    merged = [n for n, _ in named if scope == "all" or _is_linear_weight(model, n)]
    merged_set = set(merged)
    copied = [n for n, _ in model.named_parameters() if n not in merged_set]
    if blocks is None:
        return MergePlan(merged, [0] * len(merged), ["all"], copied)

    layers = {n: layer_index(n) for n in merged}
    found = [l for l in layers.values() if l is not None]
    if not found:
        raise ValueError(
            "no parameter name contains a layer number (like 'model.layers.3.'); per-block averaging needs one"
        )
    num_layers = max(found) + 1
    block_of, block_names = _block_of_layer(blocks, num_layers)
    names, block_ids, previous = [], [], 0
    for n in merged:
        layer = layers[n]
        if layer is not None:
            previous = block = block_of(layer)
        elif non_layer == "attach":
            block = previous  # the nearest preceding layer's block (block 0 before the first layer)
        elif non_layer == "mean":
            block = -1
        else:  # "pre"
            copied.append(n)
            continue
        names.append(n)
        block_ids.append(block)
    return MergePlan(names, block_ids, block_names, copied)


# ----------------------------------------------------------------------------------------------------------
# Averaging on the fused multi-tensor op


def _check_alpha(alpha) -> float:
    alpha = _validate.check_scalar("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the aligned model), got {alpha}")
    return alpha


class ModelAverager:
    """Writes ``(1 - w) * pre + w * post`` into an output model, one fused ``lerp_`` pass per call.

    ``out`` defaults to a deep copy of ``pre`` (so unmerged tensors and buffers come from the pre-RLHF model);
    pass ``out=pre`` to average in place (then the pre-RLHF weights are gone after the first call).
    The same ``out`` is rewritten by every call: copy it if you need to keep one result.
    """

    def __init__(
        self,
        pre: nn.Module,
        post: nn.Module,
        *,
        out: nn.Module | None = None,
        scope: str = "all",
        blocks=None,
        non_layer: str = "attach",
        backend: str = "auto",
    ):
        self.plan = plan_merge(pre, scope=scope, blocks=blocks, non_layer=non_layer)
        self.backend = backend
        self.out = copy.deepcopy(pre) if out is None else out
        pre_params, post_params = dict(pre.named_parameters()), dict(post.named_parameters())
        out_params = dict(self.out.named_parameters())
        for role, params in (("post", post_params), ("out", out_params)):
            missing = [n for n in self.plan.names if n not in params]
            if missing:
                raise ValueError(f"{role} model has no parameter {missing[0]!r} (the models must share one architecture)")
        for n in self.plan.names:
            for role, params in (("post", post_params), ("out", out_params)):
                if params[n].shape != pre_params[n].shape:
                    raise ValueError(
                        f"parameter {n!r}: pre has shape {tuple(pre_params[n].shape)} but {role} has "
                        f"{tuple(params[n].shape)}"
                    )
        # detached aliases: lerp_ writes the output's storage, autograd never sees the write
        self._pre = [pre_params[n].detach() for n in self.plan.names]
        self._post = [post_params[n].detach() for n in self.plan.names]
        self._dst = [out_params[n].detach() for n in self.plan.names]
        self._block_index = torch.tensor(self.plan.blocks, dtype=torch.long)

    @property
    def names(self) -> list[str]:
        return self.plan.names

    def tensor_weights(self, ratios, mean: float | None = None) -> torch.Tensor:
        """Per-tensor weights from one ratio per block (-1 entries, ``non_layer="mean"``, get ``mean``)."""
        ratios = torch.as_tensor(ratios, dtype=torch.float32).reshape(-1)
        if ratios.numel() != self.plan.num_blocks:
            raise ValueError(f"ratios has {ratios.numel()} entries but there are {self.plan.num_blocks} blocks")
        if mean is None:
            mean = float(ratios.mean())
        padded = torch.cat([ratios, torch.tensor([mean], dtype=torch.float32)])  # index -1 -> the mean
        return padded[self._block_index]

    def merge_(self, weights) -> nn.Module:
        """``out_i <- (1 - weights_i) * pre_i + weights_i * post_i`` for the merged tensors, in one pass."""
        ops.lerp_(self._dst, self._pre, self._post, weights, backend=self.backend)
        return self.out

    def average_(self, alpha: float) -> nn.Module:
        """Uniform averaging with the aligned model's weight ``alpha``."""
        alpha = _check_alpha(alpha)
        return self.merge_(torch.full((len(self._dst),), alpha, dtype=torch.float32))

    def average_blocks_(self, ratios, mean: float | None = None) -> nn.Module:
        """Heterogeneous averaging: one ratio (aligned model's weight) per block of ``plan.block_names``."""
        return self.merge_(self.tensor_weights(ratios, mean))

    def sweep(self, alphas: Iterable[float]) -> Iterator[tuple[float, nn.Module]]:
        """Yield ``(alpha, out)`` for each alpha; ``out`` is the same module, overwritten at every step."""
        alphas = [_check_alpha(a) for a in alphas]
        for alpha in alphas:
            yield alpha, self.average_(alpha)


def average(pre: nn.Module, post: nn.Module, alpha: float, *, scope: str = "all", out: nn.Module | None = None,
            backend: str = "auto") -> nn.Module:
    """``(1 - alpha) * pre + alpha * post`` as a new model (or written into ``out``)."""
    return ModelAverager(pre, post, out=out, scope=scope, backend=backend).average_(alpha)


def sweep(pre: nn.Module, post: nn.Module, alphas: Iterable[float], *, scope: str = "all",
          out: nn.Module | None = None, backend: str = "auto") -> Iterator[tuple[float, nn.Module]]:
    """Yield ``(alpha, model)`` over ``alphas``; one output model is allocated once and overwritten each time."""
    return ModelAverager(pre, post, out=out, scope=scope, backend=backend).sweep(alphas)


# ----------------------------------------------------------------------------------------------------------
# Heterogeneous model averaging: learned ratios with a fixed mean


def hma_ratios(logits: torch.Tensor, alpha: float, eps: float = 1e-3) -> torch.Tensor:
    """``alpha_g = alpha * w_g / mean(w)``, ``w_g = sigmoid(a_g) + eps``: mean(alpha_g) == alpha for any logits."""
    w = torch.sigmoid(logits) + eps
    return alpha * w / w.mean()


@dataclass
class HMAConfig:
    alpha: float = 0.5            # mean ratio: weight of the aligned model, averaged over blocks
    blocks: int | str = 3         # number of contiguous layer blocks, or "layer"
    scope: str = "all"            # "all" tensors or "linear" weights only (released code)
    non_layer: str = "attach"     # embeddings / final norm / lm_head: "attach", "mean" or "pre"
    steps: int = 20               # optimiser steps on the block logits
    lr: float = 0.1               # Adam on the logits
    l1: float = 0.01              # weight of mean_g |alpha_g - alpha|
    eps: float = 1e-3             # w_g = sigmoid(a_g) + eps keeps every w_g > 0
    seed: int = 0
    backend: str = "auto"


@dataclass
class HMAResult:
    ratios: list[float]           # one per block, mean == alpha
    block_names: list[str]
    alpha: float
    losses: list[float]           # LM loss of the merged model at each step (before the step)
    model: nn.Module = field(repr=False)  # the merged model with the final ratios

    def to_dict(self) -> dict:
        return {"ratios": self.ratios, "block_names": self.block_names, "alpha": self.alpha, "losses": self.losses}


def _causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def _ratio_gradients(dst, pre, post) -> torch.Tensor:
    """dL/dw_i = <dL/dtheta_i, post_i - pre_i> per merged tensor (theta_i = pre_i + w_i (post_i - pre_i))."""
    dots = []
    for d, a, b in zip(dst, pre, post):
        if d.grad is None:  # a tensor the loss does not depend on
            dots.append(torch.zeros((), dtype=torch.float64, device=d.device))
        else:
            # one tensor-sized temporary at a time; the difference first, so tiny RLHF deltas do not cancel
            delta = b.to(torch.float32) - a.to(torch.float32)
            dots.append(torch.sum(d.grad.to(torch.float32) * delta, dtype=torch.float64))
    return torch.stack(dots).cpu()  # one host transfer per step


def _hma_step(averager: ModelAverager, merged_params, logits, batch, loss_fn, alpha: float, eps: float,
              l1: float) -> torch.Tensor:
    """Merge with the current ratios, run the LM loss forward / backward, set ``logits.grad``; return the loss.

    ``dL/dalpha_g = sum_{i in g} <dL/dtheta_i, post_i - pre_i>``: exact, with no autograd graph through the
    merge and no model-sized temporaries (the merged tensors must require grad).
    """
    ratios = hma_ratios(logits, alpha, eps)
    weights = torch.cat([ratios, ratios.new_tensor([alpha])])[averager._block_index]  # -1 -> the mean ratio
    averager.merge_(weights.detach())
    for p in merged_params:
        p.grad = None
    loss = loss_fn(averager.out, batch)
    loss.backward()
    grad_w = _ratio_gradients(merged_params, averager._pre, averager._post).to(weights.dtype)
    # surrogate whose gradient w.r.t. the logits is the chain rule through the merge, plus the L1 pull
    objective = (weights * grad_w).sum() + l1 * (ratios - alpha).abs().mean()
    logits.grad = None
    objective.backward()
    return loss.detach()


def learn_hma(
    pre: nn.Module,
    post: nn.Module,
    batches: Sequence[dict],
    config: HMAConfig | None = None,
    *,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    out: nn.Module | None = None,
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> HMAResult:
    """Learn one ratio per layer block from the LM loss of the merged model on ``batches`` (samples of the
    aligned policy: dicts of input_ids / attention_mask / labels with -100 on prompt tokens), cycled for
    ``config.steps`` Adam steps on the block logits, starting from uniform averaging.

    Each step merges with the fused lerp_ into ``out`` (default: a copy of ``pre``), runs forward and backward
    through the merged model (only the merged tensors require grad; dropout off) and chains the gradient to
    the ratios (see ``_hma_step``). ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``.
    Returns the ratios (mean == alpha) and ``out`` merged with them.
    """
    cfg = config or HMAConfig()
    alpha = _check_alpha(cfg.alpha)
    if not batches:
        raise ValueError("learn_hma needs at least one batch of samples from the aligned policy")
    if cfg.steps < 0:
        raise ValueError(f"steps must be >= 0, got {cfg.steps}")
    loss_fn = loss_fn or _causal_lm_loss
    averager = ModelAverager(pre, post, out=out, scope=cfg.scope, blocks=cfg.blocks, non_layer=cfg.non_layer,
                             backend=cfg.backend)
    model = averager.out
    named = dict(model.named_parameters())
    merged_params = [named[n] for n in averager.names]
    merged_ids = {id(p) for p in merged_params}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training

    generator = torch.Generator().manual_seed(cfg.seed)
    # uniform averaging (equal logits) plus a tiny seeded jitter that breaks exact ties
    logits = (1e-3 * torch.randn(averager.plan.num_blocks, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=cfg.lr)
    losses: list[float] = []
    steps = range(cfg.steps)
    if progress:
        try:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="hma", leave=False)
        except ImportError:  # tqdm is optional
            pass
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in merged_ids)
        model.eval()  # no dropout: the loss must be a function of the ratios only
        for step in steps:
            loss = _hma_step(averager, merged_params, logits, batches[step % len(batches)], loss_fn, alpha,
                             cfg.eps, cfg.l1)
            optimizer.step()
            losses.append(float(loss))
            if log is not None:
                ratios = hma_ratios(logits.detach(), alpha, cfg.eps)
                log({"hma/loss": losses[-1], **{f"hma/ratio_{g}": float(r) for g, r in enumerate(ratios)}})
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        for p in merged_params:
            p.grad = None
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.train(was_training)

    final = hma_ratios(logits.detach(), alpha, cfg.eps)
    averager.average_blocks_(final, mean=alpha)
    return HMAResult([float(r) for r in final], averager.plan.block_names, alpha, losses, model)


# ----------------------------------------------------------------------------------------------------------
# Samples of the aligned policy (JSONL or text) for the HMA loss


def load_samples(path: str) -> list[dict]:
    """Rows from ``path``: JSONL with {"prompt", "response"} (loss on the response), {"text"}, or {"prompt"}
    alone (responses are then sampled from the aligned model); any other file: one text per non-empty line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        if not path.endswith((".jsonl", ".json")):
            return [{"text": line.rstrip("\n")} for line in f if line.strip()]
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not ({"text", "prompt"} & set(row)):
                raise ValueError(f"{path}:{lineno}: a sample needs a 'text' or a 'prompt' (and 'response') field")
            for key in ("text", "prompt", "response"):
                if key in row and not isinstance(row[key], str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} must be a string")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples")
    return rows


def encode_samples(tokenizer, rows: Sequence[dict], *, max_length: int = 256, batch_size: int = 4) -> list[dict]:
    """Batches of input_ids / attention_mask / labels, tokenised like the trainer's SFT data (hbat.data):
    right padding, labels -100 on prompt and padding tokens; a {"text"} row is all response."""
    from .data import collate, encode_sft, pad_token_id

    pairs = [{"prompt": "", "response": r["text"]} if "text" in r else {"prompt": r["prompt"], "response": r["response"]}
             for r in rows]
    # a row needs a predicted response token (the first label is never predicted)
    encoded = [e for e in encode_sft(tokenizer, pairs, max_length) if any(l != -100 for l in e["labels"][1:])]
    if not encoded:
        raise ValueError("no sample has a response token within max_length")
    pad = pad_token_id(tokenizer)
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, top_p: float = 0.95,
                     temperature: float = 0.75, seed: int = 0) -> list[str]:
    """Responses of ``model`` to ``prompts`` (nucleus sampling with the paper's top-p / temperature)."""
    torch.manual_seed(seed)
    responses = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=top_p,
                             temperature=temperature, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        responses.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return responses


# ----------------------------------------------------------------------------------------------------------
# hbat average


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


def _load_lm(path: str, flag: str):
    """The causal LM of the folder ``path``, its weights checked against its config.json (no weight at random)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder (expected a save_pretrained model folder)")
    return load_causal_lm(path, "auto", key=flag)


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


if __name__ == "__main__":
    raise SystemExit(main())
