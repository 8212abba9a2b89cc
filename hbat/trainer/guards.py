"""Divergence: a non-finite loss or weight stops the run before anything is saved, evaluated or ranked.

No host sync is added to a training step for it: the stage loop of SFT, DPO and the reward model
(hbat.trainer.step.train_loop) checks the loss, the mixed-in loss and the penalty it already reads at every
log call (summed over the logging interval, so a NaN at any step of the interval shows), PPO checks the values
it reads once per PPO step anyway, and the weights are checked once at the end of every stage, before the
checkpoint, ``best.pt`` or an evaluation.
"""
from __future__ import annotations

import math

import torch


class TrainingDiverged(FloatingPointError):
    """Training produced a non-finite loss or weight; the message says where (method, stage, step).
    ``run_method`` sets ``result``: the run's result.json (``"status": "diverged"``, ``"error"``, ``"stage"``)."""

    result: dict | None = None

    def within(self, where: str) -> "TrainingDiverged":
        """The same error with ``where`` (e.g. "method hbat, stage 1 (hpa, part 1)") in front."""
        return TrainingDiverged(f"{where}: {self}")


def check_values(values: dict, keys, where: str, hint: str = "") -> None:
    """Raise TrainingDiverged if one of ``keys`` present in ``values`` (floats) is not finite."""
    for key in keys:
        value = values.get(key)
        if value is not None and not math.isfinite(value):
            raise TrainingDiverged(f"{where}: {key} is {value}; training diverged{hint}")


def first_nonfinite(tensors) -> str | None:
    """The name of the first floating tensor of ``tensors`` (a state dict, or (name, tensor) pairs) holding
    a NaN or inf, else None. One host sync for all of them."""
    items = [(n, t) for n, t in (tensors.items() if isinstance(tensors, dict) else tensors)
             if t.is_floating_point() and t.numel()]
    if not items:
        return None
    flags = [torch.isfinite(t.detach()).all() for _, t in items]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).cpu()
    if bool(finite.all()):
        return None
    return items[int((~finite).nonzero()[0, 0])][0]


def check_weights(tensors, where: str) -> None:
    name = first_nonfinite(tensors)
    if name is not None:
        raise TrainingDiverged(f"{where}: weight {name} is not finite; training diverged")
