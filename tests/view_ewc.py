"""A minimal EWC driver over any ParamView: the HBAT math of ``hbat.HybridEWC`` reduced to its core (test-only).

It exists so that the sharded views can be exercised with nothing but ``hbat.ops``: tests/distributed_worker.py
uses it as a second implementation next to ``HybridEWC``. Per call it communicates one float32 vector of
per-unit sums (stage boundary) and, when asked for the penalty value, one more (``apply_``).
"""
from __future__ import annotations

import torch

from hbat import ops


class ViewEWC:
    """Alternating-objective EWC over ``view`` (see ``hbat/ewc.py`` for the full-featured class).

    ``begin_stage(name)`` measures the per-unit mean squared change of the stage that ended (eq. 7), adds it
    to that objective's accumulated change (eq. 10), refreshes the anchor in the same pass and sets the
    importance of the new stage from the other objectives' accumulated change (eq. 6/9). ``apply_()`` adds
    ``lam * F_i * (p - a)`` to the view's gradient fragments and returns the penalty of eq. (5)/(8).
    """

    def __init__(self, view, f_max: float = 100.0, lam: float = 1.0, importance_scale: float = 1.0,
                 objectives=("ifa", "hpa"), backend: str = "auto"):
        self.view, self.backend = view, backend
        self.f_max, self.lam, self.scale = float(f_max), float(lam), float(importance_scale)
        self.objectives = tuple(objectives)
        n = len(view.unit_names)
        self.accumulated = {name: torch.zeros(n, dtype=torch.float64) for name in self.objectives}
        self.seen = {name: False for name in self.objectives}
        self.importance = torch.zeros(n, dtype=torch.float32)
        self.objective = None
        self.anchors = [p.detach().clone() for p in view.params()]
        self.last_change = torch.zeros(n, dtype=torch.float32)

    @property
    def unit_names(self):
        return self.view.unit_names

    @property
    def active(self) -> bool:
        return bool((self.importance != 0).any())

    def _unit_means(self, fragment_sums: torch.Tensor) -> torch.Tensor:
        sums = self.view.all_reduce_(self.view.unit_sums(fragment_sums))
        numel = torch.tensor([max(n, 1) for n in self.view.unit_numel], dtype=torch.float64)
        return (sums.to(torch.float64) / numel).to(torch.float32)

    @torch.no_grad()
    def begin_stage(self, objective: str) -> dict:
        if objective not in self.objectives:
            raise ValueError(f"objective {objective!r} is not one of {self.objectives}")
        sums = ops.snapshot_(self.view.params(), self.anchors, reduction="sum", backend=self.backend)
        change = self._unit_means(sums)  # all ranks call it, also at the first boundary (no rank skips)
        if self.objective is not None:
            self.accumulated[self.objective] += change.to(torch.float64)
            self.seen[self.objective] = True
            self.last_change = change
        others = [o for o in self.objectives if o != objective and self.seen[o]]
        if others:
            acc = sum(self.accumulated[o] for o in others)
            self.importance = ops.importance(acc, self.f_max, scale=self.scale)
        else:
            self.importance = torch.zeros(len(self.unit_names), dtype=torch.float32)
        self.objective = objective
        return {"ewc/change_mean": float(change.mean()) if change.numel() else 0.0}

    @torch.no_grad()
    def apply_(self, reduce_penalty: bool = True) -> torch.Tensor:
        if hasattr(self.view, "grads_ready") and not self.view.grads_ready():
            return torch.zeros((), dtype=torch.float32)  # inside gradient accumulation: nothing to add yet
        frag_unit = torch.tensor(self.view.fragment_unit, dtype=torch.long)
        scale = float(getattr(self.view, "grad_scale", 1.0))
        coef = self.importance[frag_unit] * scale if len(frag_unit) else torch.zeros(0)
        per_fragment = ops.ewc_penalty_grad_(self.view.params(), self.anchors, self.view.grads(), coef, self.lam,
                                             backend=self.backend) / scale
        if hasattr(self.view, "grads_done_"):
            self.view.grads_done_()  # e.g. ZeRO optimizer offload refreshes its per-tensor gradient norms
        total = per_fragment.sum().reshape(1)
        if reduce_penalty:  # one float over the network, only for logging
            self.view.all_reduce_(total)
        return total[0]
