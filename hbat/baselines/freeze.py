"""HBAT-Freeze: instead of the EWC penalty, freeze the most important parameter tensors for a stage.

The importance is HybridEWC's per-tensor F (or any score per tensor). Tensors are ranked by importance
(descending; ties keep the model's order) and the frozen set is the longest prefix of that ranking that
stays within the budget:

* ``by="tensors"`` (the released code): at most ``floor(fraction * number_of_tensors)`` tensors;
* ``by="params"``: at most ``fraction`` of all parameter elements (the prefix stops at the first tensor that
  would exceed the budget, so a huge, very important embedding may leave nothing frozen: see the record).

Frozen means ``requires_grad = False`` and ``grad = None``: optimizers (AdamW included) skip them, and so do
``HybridEWC.apply_`` and ``FisherEWC.apply_``. Use ``zero_grad(set_to_none=True)`` (PyTorch's default).
Tensors of importance <= 0 are never frozen: in the first stage (no other objective trained yet, F = 0)
nothing is, and with a one-hot importance (HybridEWC's "released" mode) only the one important tensor is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

__all__ = ["FREEZE_BY", "FreezeRecord", "select_top", "TensorFreezer"]

FREEZE_BY = ("tensors", "params")


@dataclass
class FreezeRecord:
    """What one ``freeze_`` call froze."""

    by: str
    fraction: float
    names: list[str] = field(default_factory=list)   # frozen tensors, most important first
    frozen_numel: int = 0
    total_numel: int = 0
    total_tensors: int = 0

    @property
    def tensor_fraction(self) -> float:
        return len(self.names) / self.total_tensors if self.total_tensors else 0.0

    @property
    def param_fraction(self) -> float:
        return self.frozen_numel / self.total_numel if self.total_numel else 0.0

    def metrics(self) -> dict:
        return {"freeze/tensors": float(len(self.names)), "freeze/tensor_fraction": self.tensor_fraction,
                "freeze/param_fraction": self.param_fraction}


def _check_fraction(fraction) -> float:
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return fraction


def select_top(importance: Sequence[float], numels: Sequence[int], fraction: float = 0.2, by: str = "tensors") -> list[int]:
    """Indices of the tensors to freeze, most important first (see the module docstring for the rule)."""
    if by not in FREEZE_BY:
        raise ValueError(f"by must be one of {FREEZE_BY}, got {by!r}")
    fraction = _check_fraction(fraction)
    scores = [float(x) for x in importance]
    if len(scores) != len(numels):
        raise ValueError(f"importance has {len(scores)} entries but there are {len(numels)} tensors")
    for i, s in enumerate(scores):
        if not math.isfinite(s):
            raise ValueError(f"importance[{i}] is {s}; every entry must be finite")
    # stable sort: ties keep model order; a tensor of importance <= 0 is never "important"
    order = [i for i in sorted(range(len(scores)), key=lambda i: -scores[i]) if scores[i] > 0]
    if by == "tensors":
        return order[: int(math.floor(fraction * len(scores) + 1e-9))]
    budget, chosen, used = fraction * sum(numels), [], 0
    for i in order:
        if used + numels[i] > budget:
            break
        chosen.append(i)
        used += numels[i]
    return chosen


class TensorFreezer:
    """Freezes / unfreezes the top ``fraction`` of a model's trainable tensors by importance.

        freezer = TensorFreezer(model, fraction=0.2, by="tensors")
        record = freezer.freeze_(ewc.importance, names=ewc.unit_names)   # at a stage boundary
        ... train the stage ...
        freezer.unfreeze_()                                              # restores the previous flags
    """

    def __init__(self, model: nn.Module, *, fraction: float = 0.2, by: str = "tensors"):
        if by not in FREEZE_BY:
            raise ValueError(f"by must be one of {FREEZE_BY}, got {by!r}")
        self.fraction, self.by = _check_fraction(fraction), by
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.names = list(self.params)
        self.frozen: list[str] = []
        self.records: list[FreezeRecord] = []

    def _scores(self, importance, names) -> list[float]:
        if isinstance(importance, Mapping):
            unknown = [n for n in importance if n not in self.params]
            if unknown:
                raise ValueError(f"importance names a tensor the model does not train: {unknown[0]!r}")
            return [float(importance.get(n, 0.0)) for n in self.names]
        values = importance.detach().cpu().tolist() if isinstance(importance, torch.Tensor) else list(importance)
        if names is None:
            if len(values) != len(self.names):
                raise ValueError(f"importance has {len(values)} entries but the model trains {len(self.names)} "
                                 f"tensors; pass names= (e.g. ewc.unit_names) to map them")
            return [float(v) for v in values]
        names = list(names)
        if len(names) != len(values):
            raise ValueError(f"importance has {len(values)} entries but names has {len(names)}")
        return self._scores(dict(zip(names, values)), None)

    def freeze_(self, importance, names: Sequence[str] | None = None) -> FreezeRecord:
        """Unfreeze what this freezer froze before, then freeze the top tensors by ``importance``.

        importance: one score per trainable tensor (model order), or with ``names`` (e.g. HybridEWC's
        ``importance`` and ``unit_names``), or a {name: score} mapping (missing names score 0).
        """
        scores = self._scores(importance, names)
        numels = [self.params[n].numel() for n in self.names]
        chosen = select_top(scores, numels, self.fraction, self.by)  # validates before anything changes
        self.unfreeze_()
        record = FreezeRecord(self.by, self.fraction, [self.names[i] for i in chosen],
                              sum(numels[i] for i in chosen), sum(numels), len(numels))
        for n in record.names:
            p = self.params[n]
            p.requires_grad_(False)
            p.grad = None
        self.frozen = list(record.names)
        self.records.append(record)
        return record

    def unfreeze_(self) -> list[str]:
        """Make the tensors frozen by the last ``freeze_`` trainable again; returns their names."""
        names, self.frozen = self.frozen, []
        for n in names:
            self.params[n].requires_grad_(True)
        return names
