"""What keeps one objective from erasing the other: the regulariser contract, and the trainer's regularisers.

Two contracts, each a ``typing.Protocol`` checked against every implementation (tests/test_trainer_loop.py):

``Regularizer``, what the stage loop (hbat.trainer.algorithm) calls, one per run:

    regularizer.begin_stage(objective, previous_rows)  -> metrics   (stage boundary of Algorithm 1)
    regularizer.penalty                                -> the stages' ``Penalty``, or None (nothing added)
    regularizer.state_dict() / regularizer.load_state_dict(state)   (checkpoint.pt, exact resume)

``Penalty``, what the optimizer step (hbat.trainer.step) calls, once per step: ``penalty.apply_()`` adds the
penalty's gradient to ``.grad`` and returns its value (logged as ``ewc/penalty``). hbat.HybridEWC and
hbat.baselines.FisherEWC are penalties; a HybridEWC of the parameters the step updates is fused into the
optimizer (hbat.HybridAdamW) instead.

The regularisers, by ``MethodSpec.regularizer`` (hbat.trainer.methods): "hbat" (HybridEWC, eq. 5/8), "none",
"freeze" (HBAT-Freeze: the same importance freezes the top tensors; no penalty) and "fisher" (the per-element
empirical Fisher EWC). ``previous_rows`` are SFT-format rows ({prompt, response}) of the stage that just
ended; only the Fisher baseline needs them (its importance is estimated from data, HBAT's from the weights).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..baselines import FisherEWC, TensorFreezer
from ..data import encode_sft
from ..distributed import is_deepspeed_engine
from ..ewc import HybridEWC
from .config import EWCConfig
from .optimizer import has_low_precision, master_named_parameters


@runtime_checkable
class Penalty(Protocol):
    """The optimizer step's side of a regulariser (hbat.HybridEWC, hbat.baselines.FisherEWC)."""

    def begin_stage(self, objective: str) -> dict:
        """The stage boundary: measure the stage that ended, set the importance for ``objective``."""

    def apply_(self) -> torch.Tensor:
        """Add the penalty gradient to ``.grad``; return the penalty (0-dim tensor)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class Regularizer(Protocol):
    """The stage loop's side: one object per run, whatever the method (module docstring)."""

    penalty: Penalty | None

    def begin_stage(self, objective: str, previous_rows: list[dict] | None = None) -> dict:
        """The stage boundary before a stage of ``objective``; returns metrics to log (may be empty)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # EWCConfig.anchor_dtype (checked there)


def hybrid_ewc(model, cfg: EWCConfig, *, lam: float | None = None) -> HybridEWC:
    return HybridEWC(model, f_max=cfg.f_max, lam=cfg.lam if lam is None else lam,
                     importance_mode=cfg.importance_mode, importance_scale=cfg.importance_scale,
                     anchor_dtype=_DTYPES[cfg.anchor_dtype], include=cfg.include, exclude=cfg.exclude,
                     group_by=cfg.group_by)


class NoRegularizer:
    """No regulariser (two-stage, SFT only, the no-EWC ablation, RLHF+pt, SFT+hpa)."""

    penalty = None

    def begin_stage(self, objective, previous_rows=None) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class HBATRegularizer:
    """HybridEWC: the penalty of eq. (5)/(8) with importance from the other objective's accumulated change."""

    def __init__(self, model, cfg: EWCConfig):
        # bf16 weights (one process): the penalty is measured on their fp32 masters (hbat.trainer.optimizer)
        bf16 = not is_deepspeed_engine(model) and has_low_precision(model)
        self.penalty = hybrid_ewc(master_named_parameters(model) if bf16 else model, cfg)

    def begin_stage(self, objective, previous_rows=None) -> dict:
        return self.penalty.begin_stage(objective)

    def state_dict(self) -> dict:
        return {"ewc": self.penalty.state_dict()}  # checkpoint format: the key stays "ewc"

    def load_state_dict(self, state: dict) -> None:
        self.penalty.load_state_dict(state["ewc"])


class FreezeRegularizer:
    """HBAT-Freeze: the same importance, but the top tensors are frozen for the stage instead of penalised."""

    def __init__(self, model, cfg: EWCConfig):
        self.tracker = hybrid_ewc(model, cfg, lam=0.0)  # importance bookkeeping only (never applied)
        self.freezer = TensorFreezer(model, fraction=cfg.freeze_fraction, by=cfg.freeze_by)
        self.penalty = None  # frozen, not penalised

    def begin_stage(self, objective, previous_rows=None) -> dict:
        self.freezer.unfreeze_()
        metrics = self.tracker.begin_stage(objective)
        if bool((self.tracker.importance != 0).any()):
            record = self.freezer.freeze_(self.tracker.importance, names=self.tracker.unit_names)
            metrics.update(record.metrics())
        return metrics

    def state_dict(self) -> dict:
        return {"ewc": self.tracker.state_dict(), "frozen": list(self.freezer.frozen)}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["ewc"])
        self.freezer.unfreeze_()
        for name in state["frozen"]:
            self.freezer.params[name].requires_grad_(False)
        self.freezer.frozen = list(state["frozen"])


class FisherRegularizer:
    """The paper's "original EWC": a per-element empirical Fisher of the previous stage's data."""

    def __init__(self, model, cfg: EWCConfig, tokenizer, max_len: int):
        self.penalty = FisherEWC(model, lam=cfg.lam, scale=cfg.fisher_scale, max_samples=cfg.fisher_samples)
        self.tokenizer, self.max_len = tokenizer, max_len

    def begin_stage(self, objective, previous_rows=None) -> dict:
        samples = None
        if previous_rows:
            samples = encode_sft(self.tokenizer, previous_rows[: self.penalty.max_samples], self.max_len)
        return self.penalty.begin_stage(objective, samples=samples)

    def state_dict(self) -> dict:
        return {"fisher": self.penalty.state_dict()}  # checkpoint format: the key stays "fisher"

    def load_state_dict(self, state: dict) -> None:
        self.penalty.load_state_dict(state["fisher"])


def make_regularizer(kind: str, model, cfg: EWCConfig, tokenizer=None, max_len: int = 256) -> Regularizer:
    if kind == "hbat":
        return HBATRegularizer(model, cfg)
    if kind == "freeze":
        return FreezeRegularizer(model, cfg)
    if kind == "fisher":
        return FisherRegularizer(model, cfg, tokenizer, max_len)
    if kind == "none":
        return NoRegularizer()
    raise ValueError(f"unknown regularizer {kind!r}")
