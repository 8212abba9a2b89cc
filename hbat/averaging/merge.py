"""``ModelAverager``: ``(1 - w) * pre + w * post`` into an output model, one fused ``lerp_`` pass per call.

``sweep`` walks a list of alphas re-using one output model (one fused pass per alpha, nothing re-allocated),
which gives the reward / forgetting trade-off curve.
"""
from __future__ import annotations

import copy
from typing import Iterable, Iterator

import torch
from torch import nn

from .. import ops
from .plan import check_alpha, plan_merge

__all__ = ["ModelAverager", "average", "sweep"]


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

    def average_(self, alpha: float, *, extrapolate: bool = False) -> nn.Module:
        """Uniform averaging with the aligned model's weight ``alpha`` in [0, 1]; with ``extrapolate`` any alpha
        >= 0, above 1 past the aligned model: ``post + (alpha - 1) * (post - pre)`` (ExPO)."""
        alpha = check_alpha(alpha, extrapolate=extrapolate)
        return self.merge_(torch.full((len(self._dst),), alpha, dtype=torch.float32))

    def average_blocks_(self, ratios, mean: float | None = None) -> nn.Module:
        """Heterogeneous averaging: one ratio (aligned model's weight) per block of ``plan.block_names``."""
        return self.merge_(self.tensor_weights(ratios, mean))

    def sweep(self, alphas: Iterable[float]) -> Iterator[tuple[float, nn.Module]]:
        """Yield ``(alpha, out)`` for each alpha; ``out`` is the same module, overwritten at every step."""
        alphas = [check_alpha(a) for a in alphas]
        for alpha in alphas:
            yield alpha, self.average_(alpha)


def average(pre: nn.Module, post: nn.Module, alpha: float, *, scope: str = "all", out: nn.Module | None = None,
            backend: str = "auto", extrapolate: bool = False) -> nn.Module:
    """``(1 - alpha) * pre + alpha * post`` as a new model (or written into ``out``); alpha in [0, 1], or with
    ``extrapolate`` any alpha >= 0 (above 1: ExPO)."""
    return ModelAverager(pre, post, out=out, scope=scope, backend=backend).average_(alpha, extrapolate=extrapolate)


def sweep(pre: nn.Module, post: nn.Module, alphas: Iterable[float], *, scope: str = "all",
          out: nn.Module | None = None, backend: str = "auto") -> Iterator[tuple[float, nn.Module]]:
    """Yield ``(alpha, model)`` over ``alphas``; one output model is allocated once and overwritten each time."""
    return ModelAverager(pre, post, out=out, scope=scope, backend=backend).sweep(alphas)
