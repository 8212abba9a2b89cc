"""What keeps one objective from erasing the other, behind one interface for the loop.

    reg.begin_stage(objective, previous_rows)  -> metrics     (stage boundary)
    reg.hook                                   -> object with apply_() given to the stages, or None
    reg.state_dict() / reg.load_state_dict()

``previous_rows`` are SFT-format rows ({prompt, response}) of the stage that just ended; only the Fisher
baseline needs them (its importance is estimated from data, HBAT's from the weights alone).
"""
from __future__ import annotations

import torch

from ..baselines import FisherEWC, TensorFreezer
from ..data import encode_sft
from ..distributed import is_deepspeed_engine
from ..ewc import HybridEWC
from .config import EWCConfig
from .steppers import has_low_precision, master_named_parameters

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # EWCConfig.anchor_dtype (checked there)


def hybrid_ewc(model, cfg: EWCConfig, *, lam: float | None = None) -> HybridEWC:
    return HybridEWC(model, f_max=cfg.f_max, lam=cfg.lam if lam is None else lam,
                     importance_mode=cfg.importance_mode, importance_scale=cfg.importance_scale,
                     anchor_dtype=_DTYPES[cfg.anchor_dtype], include=cfg.include, exclude=cfg.exclude,
                     group_by=cfg.group_by)


class NoRegularizer:
    hook = None

    def begin_stage(self, objective, previous_rows=None) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class HBATRegularizer:
    """HybridEWC: the penalty of eq. (5)/(8) with importance from the other objective's accumulated change."""

    def __init__(self, model, cfg: EWCConfig):
        # bf16 weights (one process): the penalty is measured on their fp32 masters (hbat.trainer.steppers)
        bf16 = not is_deepspeed_engine(model) and has_low_precision(model)
        self.ewc = hybrid_ewc(master_named_parameters(model) if bf16 else model, cfg)
        self.hook = self.ewc

    def begin_stage(self, objective, previous_rows=None) -> dict:
        return self.ewc.begin_stage(objective)

    def state_dict(self) -> dict:
        return {"ewc": self.ewc.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ewc.load_state_dict(state["ewc"])


class FreezeRegularizer:
    """HBAT-Freeze: the same importance, but the top tensors are frozen for the stage instead of penalised."""

    def __init__(self, model, cfg: EWCConfig):
        self.ewc = hybrid_ewc(model, cfg, lam=0.0)  # importance bookkeeping only
        self.freezer = TensorFreezer(model, fraction=cfg.freeze_fraction, by=cfg.freeze_by)
        self.hook = None

    def begin_stage(self, objective, previous_rows=None) -> dict:
        self.freezer.unfreeze_()
        metrics = self.ewc.begin_stage(objective)
        if bool((self.ewc.importance != 0).any()):
            record = self.freezer.freeze_(self.ewc.importance, names=self.ewc.unit_names)
            metrics.update(record.metrics())
        return metrics

    def state_dict(self) -> dict:
        return {"ewc": self.ewc.state_dict(), "frozen": list(self.freezer.frozen)}

    def load_state_dict(self, state: dict) -> None:
        self.ewc.load_state_dict(state["ewc"])
        self.freezer.unfreeze_()
        for name in state["frozen"]:
            self.freezer.params[name].requires_grad_(False)
        self.freezer.frozen = list(state["frozen"])


class FisherRegularizer:
    """The paper's "original EWC": a per-element empirical Fisher of the previous stage's data."""

    def __init__(self, model, cfg: EWCConfig, tokenizer, max_len: int):
        self.fisher = FisherEWC(model, lam=cfg.lam, scale=cfg.fisher_scale, max_samples=cfg.fisher_samples)
        self.tokenizer, self.max_len = tokenizer, max_len
        self.hook = self.fisher

    def begin_stage(self, objective, previous_rows=None) -> dict:
        samples = None
        if previous_rows:
            samples = encode_sft(self.tokenizer, previous_rows[: self.fisher.max_samples], self.max_len)
        return self.fisher.begin_stage(objective, samples=samples)

    def state_dict(self) -> dict:
        return {"fisher": self.fisher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.fisher.load_state_dict(state["fisher"])


def make_regularizer(kind: str, model, cfg: EWCConfig, tokenizer=None, max_len: int = 256):
    if kind == "hbat":
        return HBATRegularizer(model, cfg)
    if kind == "freeze":
        return FreezeRegularizer(model, cfg)
    if kind == "fisher":
        return FisherRegularizer(model, cfg, tokenizer, max_len)
    if kind == "none":
        return NoRegularizer()
    raise ValueError(f"unknown regularizer {kind!r}")
