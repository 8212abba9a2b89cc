"""Heterogeneous model averaging (HMA): learned per-block ratios with a fixed mean.

The ratios are ``alpha_g = alpha * w_g / mean(w)`` with ``w_g = sigmoid(a_g) + eps``: their mean is ``alpha``
by construction (sum_g alpha_g = alpha * G exactly), only their distribution over the layers is learned. The
logits ``a_g`` minimise the LM loss of the merged model on samples of the aligned policy plus
``l1 * mean_g |alpha_g - alpha|``. A ratio may exceed 1 (extrapolation past the aligned model) when the others
are small; it is at most ``G * alpha``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .merge import ModelAverager
from .plan import check_alpha

__all__ = ["hma_ratios", "HMAConfig", "HMAResult", "learn_hma"]


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
    alpha = check_alpha(cfg.alpha)
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

