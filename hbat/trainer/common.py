"""What the stages share: the optimisation settings (``StageConfig``: every stage's config extends it) and the
log-probabilities of response tokens (SFT, DPO, evaluation). The training loop is hbat.trainer.step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX, position_ids_from_mask
from .checks import choice, fail, integers, learning_rates, numbers

SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class StageConfig:
    """Optimisation settings shared by the SFT and DPO stages (each stage sets its paper defaults)."""

    lr: float = 1e-5                  # peak AdamW learning rate
    batch_size: int = 64              # rows (pairs for DPO) per optimizer step, over all micro-batches (paper: 64)
    epochs: int = 1                   # passes over the rows
    max_steps: int | None = None      # stop after this many optimizer steps (None: ``epochs`` passes)
    max_len: int = 256                # tokens of prompt + response (hbat.data truncation rule)
    grad_accum_steps: int = 1         # micro-batches per optimizer step (memory: batch_size / grad_accum_steps rows)
    max_grad_norm: float | None = 1.0  # gradient clipping after the EWC hook (0 or None: off, norm still logged)
    weight_decay: float = 0.0         # AdamW weight decay
    warmup_ratio: float = 0.0         # share of the steps with a linear warm-up from 0
    lr_scheduler_type: str = "linear"  # after warm-up: "constant", "linear" (to 0, HF default) or "cosine"
    logging_steps: int = 1            # call ``log`` (and update the bar) every this many optimizer steps
    eval_batch_size: int = 16         # rows per forward when only evaluating
    seed: int = 0                     # shuffling of the rows

    def __post_init__(self):
        integers(self, 1, "batch_size", "epochs", "grad_accum_steps", "logging_steps", "eval_batch_size")
        integers(self, 1, "max_steps", optional=True)
        integers(self, 2, "max_len")  # a prompt token and a response token at least (hbat.data truncation)
        integers(self, 0, "seed")
        if self.grad_accum_steps > self.batch_size:
            fail(self, "grad_accum_steps", f"must be <= batch_size ({self.batch_size}), got {self.grad_accum_steps}")
        numbers(self, "lr", "weight_decay")
        learning_rates(self, "lr")
        numbers(self, "max_grad_norm", optional=True)
        numbers(self, "warmup_ratio", maximum=1.0)
        if self.warmup_ratio == 1.0:
            fail(self, "warmup_ratio", "must be in [0, 1), got 1.0")
        choice(self, "lr_scheduler_type", SCHEDULERS)


STEPPER_FIELDS = ("lr", "weight_decay", "max_grad_norm", "warmup_ratio", "lr_scheduler_type")  # what a stepper reads


def stepper_settings(source, **overrides) -> StageConfig:
    """The StageConfig a stepper (hbat.trainer.step) takes, for a stage whose config is no StageConfig (PPO):
    the ``STEPPER_FIELDS`` that ``source`` has, then ``overrides``; StageConfig's defaults for the rest."""
    values = {key: getattr(source, key) for key in STEPPER_FIELDS if hasattr(source, key)}
    return StageConfig(**{**values, **overrides})


# --- model helpers -----------------------------------------------------------------------------------------------

def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put models in eval mode (dropout off) and restore each one's previous mode afterwards."""
    modes = [(m, m.training) for m in models if m is not None]
    for model, _ in modes:
        model.eval()
    try:
        yield
    finally:
        for model, mode in modes:
            model.train(mode)


def token_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(label_t | prefix) * mask, mask)``, both float32 [B, L-1]; mask is 1 where the label is not -100.

    ``batch`` holds ``input_ids``, ``labels`` and ``attention_mask`` (right or left padding; positions come from
    the mask) or, for packed rows, ``position_ids`` without an attention mask (see hbat.trainer.sft).
    """
    device = model_device(model)
    attention_mask = batch.get("attention_mask")
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    logits = model(input_ids=batch["input_ids"].to(device),
                   attention_mask=None if attention_mask is None else attention_mask.to(device),
                   position_ids=position_ids.to(device), use_cache=False).logits[:, :-1]
    targets = batch["labels"][:, 1:].to(device)
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.masked_fill(~mask, 0).reshape(-1),
                          reduction="none").view_as(targets)
    mask = mask.float()
    return -nll * mask, mask


def sequence_logprobs(model: nn.Module, batch: dict) -> torch.Tensor:
    """log p(response | prompt) per row: the sum over label tokens (float32 [B])."""
    logps, _ = token_logprobs(model, batch)
    return logps.sum(-1)
