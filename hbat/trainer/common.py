"""What the SFT, DPO and reward-model stages share: the config base, log-probabilities of response tokens, and
the stage loop.

``train_loop`` runs a stage's optimizer steps: for each step, the micro-batches' losses (each weighted by its
share of the batch) go backward, then an optional mixed-in loss (RLHF+pt / SFT+ppo baselines), then the
stepper's ``step(penalty)`` (hbat.trainer.steppers: the EWC gradient of eq. 5 / 8, clipping, AdamW with fp32
masters for bf16 weights, the schedule; the same step PPO's policy and critic take). Under DeepSpeed the
stepper takes this rank's micro-batches of the global batch.

``batch_size`` counts the rows of one optimizer step; they are split into ``grad_accum_steps`` micro-batches.
Each stage weights a micro-batch's loss by its share of the batch (tokens for SFT, pairs for DPO and the
reward model), so accumulating gives the same gradient as one big batch; a plain ``1 / grad_accum_steps`` is
only exact when all micro-batches have the same share.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX, position_ids_from_mask
from .checks import choice, fail, integers, learning_rates, numbers
from .guards import check_values
from .steppers import make_stepper

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
    """The StageConfig a stepper (hbat.trainer.steppers) takes, for a stage whose config is no StageConfig (PPO):
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


# --- the stage loop ----------------------------------------------------------------------------------------------

def read_scalars(values: dict) -> dict[str, float]:
    """0-dim tensors (or numbers) as floats, in ONE host synchronisation (they are gathered on one device)."""
    tensors = [torch.as_tensor(v).detach().float().reshape(()) for v in values.values()]
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    read = torch.stack([t.to(device) for t in tensors]).tolist() if tensors else []
    return dict(zip(values, read))


def planned_steps(cfg: StageConfig, n_rows: int) -> int:
    return cfg.epochs * math.ceil(n_rows / cfg.batch_size) if cfg.max_steps is None else cfg.max_steps


# micro_loss(micro_indices, batch_indices) -> (weighted loss, weighted detached stats)
MicroLoss = Callable[[list, list], tuple]


def train_loop(model: nn.Module, n_rows: int, cfg: StageConfig, micro_loss: MicroLoss, *, desc: str,
               loss_key: str, penalty=None, extra_loss: Callable[[int], torch.Tensor] | None = None,
               extra_key: str = "train/extra_loss", log: Callable[[dict], None] | None = None,
               progress: bool = True) -> dict:
    """Optimise ``model`` over ``n_rows`` rows (order and step structure: module docstring).

    ``micro_loss(micro_indices, batch_indices) -> (loss, stats)``: the micro-batch's loss already weighted by
    its share of the batch, and detached 0-dim stats weighted the same way (summed over the micro-batches they
    give the batch means). ``stats[loss_key]`` is the bar's live loss. Logs the stats plus ``train/lr``,
    ``train/grad_norm`` (before clipping), ``train/step``, ``train/epoch``, ``ewc/penalty`` (with ``penalty``) and
    ``extra_key`` (with ``extra_loss``). Returns the means over the run, ``train/steps`` and ``<loss_key>_last``.
    A non-finite loss, mixed-in loss or penalty raises hbat.trainer.guards.TrainingDiverged at the next log call.
    """
    from tqdm.auto import tqdm  # optional: hbat[train]

    total_steps = planned_steps(cfg, n_rows)
    stepper = make_stepper(model, cfg, total_steps)  # plain PyTorch, or this rank's part of a DeepSpeed engine
    generator = torch.Generator().manual_seed(cfg.seed)  # the same order on every rank
    sums: dict[str, torch.Tensor] = {}
    window: dict[str, torch.Tensor] = {}  # stats since the last log call
    step, last = 0, {}
    was_training = model.training
    model.train()
    stepper.start()
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False)
    try:
        while step < total_steps:
            order = torch.randperm(n_rows, generator=generator).tolist()
            for start in range(0, n_rows, cfg.batch_size):
                if step >= total_steps:
                    break
                batch = order[start:start + cfg.batch_size]
                stats: dict[str, torch.Tensor] = {}
                micros = stepper.micro_batches(batch, cfg.grad_accum_steps)
                for index, micro in enumerate(micros):
                    if micro:
                        loss, micro_stats = micro_loss(micro, batch)
                    else:  # DeepSpeed: this rank's share ran out; it still joins every reduction, with weight 0
                        loss, micro_stats = micro_loss(batch[:1], batch)
                        loss, micro_stats = loss * 0.0, {k: v * 0.0 for k, v in micro_stats.items()}
                    stepper.backward(loss, last=extra_loss is None and index == len(micros) - 1)
                    for key, value in micro_stats.items():
                        stats[key] = stats.get(key, 0.0) + value.detach().float()
                stats = stepper.reduce(stats)
                if extra_loss is not None:
                    extra = extra_loss(step)  # the same rows on every rank
                    stepper.backward(extra, last=True, replicated=True)
                    stats[extra_key] = extra.detach().float()
                stats.update(stepper.step(penalty))  # ewc/penalty, train/grad_norm (before clipping), train/lr
                step += 1
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                    window[key] = window.get(key, 0.0) + value
                bar.update(1)
                if step % cfg.logging_steps == 0 or step == total_steps:
                    count = (step - 1) % cfg.logging_steps + 1
                    last = {key: value / count for key, value in read_scalars(window).items()}
                    window.clear()
                    # a NaN at any step of the interval is in its sum (hbat.trainer.guards)
                    check_values(last, (loss_key, extra_key, "ewc/penalty"),
                                 f"step {step}" if count == 1 else f"steps {step - count + 1}-{step}",
                                 f" (a smaller {desc}.lr may help)")
                    last.update({"train/step": step, "train/epoch": (start + len(batch)) / n_rows
                                 + (step - 1) // math.ceil(n_rows / cfg.batch_size)})
                    if log is not None:
                        log(dict(last))
                    bar.set_postfix(loss=f"{last[loss_key]:.4f}")
    finally:
        bar.close()
        stepper.close()
        model.train(was_training)
    summary = {key: float(value) / max(step, 1) for key, value in sums.items()}
    summary.update({"train/steps": step, f"{loss_key}_last": last.get(loss_key, float("nan"))})
    return summary
