"""In-place averaging of the weights a run trains with a start copy of them, on every rank's own shard.

    avg = InPlaceAverager(model_or_engine)          # takes the start copy now (see WeightShards)
    ...train...
    avg.apply_(0.5)                                 # theta <- 0.5 theta_start + 0.5 theta      (uniform)
    avg.apply_(1.3)                                 # theta <- theta + 0.3 (theta - theta_start)  (ExPO)
    avg.apply_([0.2, 0.5, 0.9])                     # one ratio per block of layers (HMA; blocks=3)
    with avg.averaged(0.5): evaluate(model)         # averaged weights inside, restored bit for bit after
    with avg.start_weights(): evaluate(model)       # the start model inside (swapped in place, no second model)

A ratio is always the weight of the CURRENT (trained) model, hbat's ``alpha`` (``hbat.averaging``): 0 gives
the start model, 1 the current one, above 1 extrapolates past the current one away from the start (ExPO).
Tensors the plan copies (``scope="linear"``: embeddings and norms; HMA ``non_layer="pre"``) get ratio 0.
Each call is one fused ``hbat.ops.lerp_`` pass over this rank's slots; nothing is gathered.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Sequence

import torch

from ..param_view import clean_name, module_of
from .plan import plan_merge
from .shards import WeightShards

__all__ = ["InPlaceAverager", "check_ratio"]

_COPIED = -2  # a unit the plan copies from the start model: ratio 0


def check_ratio(ratio, num_blocks: int | None = None, what: str = "ratio"):
    """A finite float, or (per block) a sequence of ``num_blocks`` finite floats; one clear error otherwise."""
    if isinstance(ratio, numbers.Real) and not isinstance(ratio, bool):
        value = float(ratio)
        if not math.isfinite(value):
            raise ValueError(f"{what} must be finite, got {value}")
        return value
    if isinstance(ratio, torch.Tensor):
        ratio = ratio.detach().reshape(-1).tolist()
    if not isinstance(ratio, Sequence) or isinstance(ratio, (str, bytes)) or not ratio:
        raise TypeError(f"{what} must be a number or a non-empty sequence of numbers (one per block), got "
                        f"{type(ratio).__name__}")
    values = [check_ratio(r, what=f"{what}[{i}]") for i, r in enumerate(ratio)]
    if num_blocks is not None and len(values) != num_blocks:
        raise ValueError(f"{what} has {len(values)} entries but the plan has {num_blocks} blocks")
    return values


class InPlaceAverager:
    """Averages ``target``'s weights in place with the start copy taken at construction.

    Args:
        target: the model as it is trained: a module (DDP-wrapped or not), an FSDP2 module or a DeepSpeed
            engine (ZeRO-1/2/3).
        scope / blocks / non_layer: the merge plan of ``hbat.averaging.plan_merge`` (blocks: None for one
            ratio for everything, an int or "layer" for per-block ratios).
        include / exclude: parameter-name patterns (trainable parameters only).
        start_device: where the start copy lives (None: beside the weights; "cpu").
        start_from: one process only: a model whose parameters are the start (taken over, not copied).
        backend: the ``hbat.ops`` backend.
    """

    def __init__(self, target, *, scope: str = "all", blocks=None, non_layer: str = "attach", include=None,
                 exclude=None, start_device=None, start_from=None, backend: str = "auto"):
        module = _module(target)
        self.plan = plan_merge(module, scope=scope, blocks=blocks, non_layer=non_layer)  # checked before the copy
        self.settings = {"scope": scope, "blocks": blocks, "non_layer": non_layer}
        self.shards = WeightShards(target, include=include, exclude=exclude, start_device=start_device,
                                   start_from=start_from, backend=backend)
        block = {clean_name(n): b for n, b in zip(self.plan.names, self.plan.blocks)}
        self.unit_block = [block.get(name, _COPIED) for name in self.shards.unit_names]
        self._block_index = torch.tensor([b if b >= 0 else len(self.plan.block_names) + (b == _COPIED)
                                          for b in self.unit_block], dtype=torch.long)

    @property
    def module(self) -> torch.nn.Module:
        """The user's model (its forward gathers shards under ZeRO-3 / FSDP2)."""
        return self.shards.module

    @property
    def block_names(self) -> list[str]:
        return self.plan.block_names

    @property
    def per_block(self) -> bool:
        return self.settings["blocks"] is not None

    def check(self, ratio, what: str = "ratio"):
        """``ratio`` checked against this plan (a vector needs per-block averaging and one entry per block)."""
        value = check_ratio(ratio, None, what)
        if isinstance(value, list) and not self.per_block:
            raise ValueError(f"{what} is a vector of {len(value)} ratios but this averager has one block (pass "
                             "blocks=... for per-block ratios)")
        if isinstance(value, list) and len(value) != self.plan.num_blocks:
            raise ValueError(f"{what} has {len(value)} entries but the plan has {self.plan.num_blocks} blocks "
                             f"({', '.join(self.plan.block_names)})")
        return value

    def unit_weights(self, ratio) -> torch.Tensor:
        """One lerp weight per parameter tensor (``shards.unit_names``): its block's ratio, the mean ratio for
        ``non_layer="mean"`` tensors, 0 for tensors the plan copies from the start."""
        value = self.check(ratio)
        ratios = [value] * self.plan.num_blocks if isinstance(value, float) else value
        mean = sum(ratios) / len(ratios)
        table = torch.tensor(ratios + [mean, 0.0], dtype=torch.float64)  # index G: the mean, G + 1: copied
        return table[self._block_index].to(torch.float32)

    # ------------------------------------------------------------------ writes
    def apply_(self, ratio) -> None:
        """``theta <- (1 - r) theta_start + r theta`` per tensor, in one fused pass (r per block with HMA)."""
        self.shards.blend_(self.shards.weights(self.unit_weights(ratio)))

    def ema_(self, rate: float) -> None:
        """``start <- (1 - rate) start + rate theta``: the start copy becomes an EMA anchor of the weights."""
        rate = check_ratio(rate, what="ema rate")
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"ema rate must be in (0, 1], got {rate}")
        self.shards.ema_(rate)

    @contextlib.contextmanager
    def averaged(self, ratio):
        """The averaged weights inside the block; the weights before it are restored bit for bit afterwards (one
        copy of this rank's slots is held meanwhile)."""
        weights = self.shards.weights(self.unit_weights(ratio))
        saved = self.shards.snapshot()
        try:
            self.shards.blend_(weights, post=saved)
            yield self.module
        finally:
            self.shards.restore_(saved)

    @contextlib.contextmanager
    def start_weights(self):
        """The start model's weights inside the block (exchanged with the live ones in place, then back)."""
        self.shards.swap_()
        try:
            yield self.module
        finally:
            self.shards.swap_()

    def describe(self) -> dict:
        """The plan as plain values (for tables and checkpoints)."""
        return {**self.settings, "block_names": list(self.plan.block_names), "kind": self.shards.kind,
                "units": len(self.shards.unit_names)}


def _module(target) -> torch.nn.Module:
    module = module_of(target)
    if module is None:
        raise TypeError(f"averaging needs an nn.Module, a DDP / FSDP2 module or a DeepSpeed engine, not "
                        f"{type(target).__name__}")
    return module
