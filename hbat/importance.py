"""Importance modes: F_i from the accumulated change AC_i of eq. (10), one float per parameter unit.

The paper's eq. (6)/(9) is ``F = F_max * softmax(AC)``. Taken literally it is almost uniform, because a
mean squared change AC is ~1e-8; the released code scales AC by 1e20 first, which makes it one-hot.
Neither extreme uses the measured ranking, so ``normalized`` (the default) makes the softmax
scale-invariant: ``softmax(scale * AC / mean(AC))``. A unit that changed twice as much as the average gets
``e**scale`` times the average weight, whatever the learning rate or model size. ``hbat compare`` measures
the modes against each other (see docs/results/).
"""
from __future__ import annotations

import torch

from . import ops

IMPORTANCE_MODES = ("normalized", "paper", "released", "proportional", "uniform")
DEFAULT_IMPORTANCE_MODE = "normalized"
RELEASED_CODE_SCALE = 1e20  # the released code multiplies differences by 1e10 before squaring


def check_mode(mode: str) -> str:
    if mode not in IMPORTANCE_MODES:
        raise ValueError(f"importance_mode must be one of {IMPORTANCE_MODES}, got {mode!r}")
    return mode


def compute_importance(acc_change: torch.Tensor, f_max: float, mode: str = DEFAULT_IMPORTANCE_MODE,
                       scale: float = 1.0) -> torch.Tensor:
    """F (float32, sums to ``f_max``) from the accumulated change (any float dtype, >= 0).

    - ``normalized``: ``f_max * softmax(scale * AC / mean(AC))``; uniform when nothing changed.
    - ``paper``: ``f_max * softmax(scale * AC)``, eq. (6)/(9) literally (scale 1: nearly uniform).
    - ``released``: ``f_max * softmax(1e20 * scale * AC)``, the released code (nearly one-hot).
    - ``proportional``: ``f_max * AC**scale / sum(AC**scale)``; uniform when nothing changed.
    - ``uniform``: ``f_max / n`` for every unit (the ablation without importance).
    """
    check_mode(mode)
    acc = acc_change.detach().to(torch.float64).cpu()
    n = acc.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float32)
    if not bool(torch.isfinite(acc).all()) or bool((acc < 0).any()):
        bad = int((~torch.isfinite(acc) | (acc < 0)).nonzero()[0, 0])
        raise ValueError(f"accumulated change [{bad}] is {acc[bad].item()}; it must be finite and >= 0")
    uniform = torch.full((n,), float(f_max) / n, dtype=torch.float32)
    mean = float(acc.mean())
    if mode == "uniform" or (mode in ("normalized", "proportional") and mean == 0.0):
        return uniform
    if mode == "normalized":
        return ops.importance(acc / mean, f_max, scale=scale)
    if mode == "paper":
        return ops.importance(acc, f_max, scale=scale)
    if mode == "released":
        return ops.importance(acc, f_max, scale=RELEASED_CODE_SCALE * scale)
    weights = (acc / acc.max()) ** scale  # proportional; dividing by the max first keeps powers finite
    return (float(f_max) * weights / weights.sum()).to(torch.float32)


def importance_entropy(F: torch.Tensor) -> float:
    """Entropy of F / sum(F) divided by log(n): 1 for uniform importance, 0 for one-hot, 0 for n <= 1."""
    F = F.detach().to(torch.float64).cpu()
    total = float(F.sum())
    if F.numel() <= 1 or total <= 0:
        return 0.0
    p = F / total
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / torch.log(torch.tensor(float(F.numel()), dtype=torch.float64)))
