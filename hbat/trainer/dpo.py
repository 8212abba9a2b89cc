"""DPO stage of HPA (eq. 4): the sigmoid loss of Rafailov et al. against a frozen reference.

    r_w = beta * (log pi(y_w|x) - log pi_ref(y_w|x)),   r_l = beta * (log pi(y_l|x) - log pi_ref(y_l|x))
    L   = - mean log sigmoid(r_w - r_l)

log pi(y|x) is the SUM over response tokens (EOS included, prompt masked), as in the DPO paper and TRL.
The reference is the policy at the start of the HPA stage unless a ``ref_model`` is given (e.g. the initial
SFT model). With ``precompute_ref_logprobs`` (default) the reference log-probs of every pair are computed
once, up front, so no second model is held during training; with ``ref_model=None`` that pass runs on the
policy itself before its first update, so no copy is ever made. Metrics use TRL's names
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``). With ``sft_coef > 0`` and ``sft_rows``, ``sft_coef`` times the SFT loss of a batch of
``sft_rows`` is added to every step: the RLHF+pt baseline. With ``penalty`` the EWC gradient of eq. (5) is added.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import collate_preference, encode_preference, pad_token_id
from .checks import booleans, integers, numbers
from .common import StageConfig, eval_mode, model_device, sequence_logprobs
from .models import base_of, frozen_copy
from .sft import sft_mix_loss
from .step import Objective, train_loop


@dataclass
class DPOConfig(StageConfig):
    """DPO settings (paper: lr 1e-6, batch 64, 2 epochs, beta 0.1). Shared fields: ``common.StageConfig``."""

    lr: float = 1e-6                  # peak AdamW learning rate (paper: 1e-6; tiny CPU models need ~1e-3)
    batch_size: int = 64              # preference pairs per optimizer step (paper: 64)
    epochs: int = 2                   # passes over the pairs (paper: 2)
    beta: float = 0.1                 # strength of the implicit KL constraint (DPO paper: 0.1)
    precompute_ref_logprobs: bool = True  # reference log-probs once per stage, before training (module docstring)
    sft_coef: float = 0.0             # RLHF+pt: weight of the SFT loss on ``sft_rows`` mixed into each step
    sft_batch_size: int | None = None  # SFT rows per step for sft_coef (None: batch_size // grad_accum_steps)

    def __post_init__(self):
        super().__post_init__()
        numbers(self, "beta", strict=True)
        numbers(self, "sft_coef")
        integers(self, 1, "sft_batch_size", optional=True)
        booleans(self, "precompute_ref_logprobs")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean loss, chosen_rewards [B], rejected_rewards [B])``; the rewards are detached (metrics only)."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


def encode_pairs(tokenizer, rows: Sequence[dict], max_len: int) -> list[dict]:
    """Encode preference rows, checking every row first so a bad one fails before any training."""
    for index, row in enumerate(rows):
        missing = [key for key in ("prompt", "chosen", "rejected") if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(f"preference row {index} has no field {missing[0]!r} "
                             "(expected {prompt, chosen, rejected})")
    return encode_preference(tokenizer, rows, max_len)


def pair_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen and rejected, in ONE forward (both halves padded to one length)."""
    both = {key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
            for key in ("input_ids", "attention_mask", "labels")}
    logps = sequence_logprobs(model, both)
    half = batch["chosen_input_ids"].shape[0]
    return logps[:half], logps[half:]


@torch.no_grad()
def reference_logprobs(ref_model: nn.Module, encoded: Sequence[dict], pad: int, batch_size: int):
    """Chosen and rejected log-probs of every encoded pair under ``ref_model`` (float32 [N] each, its device)."""
    chosen, rejected = [], []
    with eval_mode(ref_model):
        for start in range(0, len(encoded), batch_size):
            c, r = pair_logprobs(ref_model, collate_preference(encoded[start:start + batch_size], pad))
            chosen.append(c)
            rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def dpo_objective(policy: nn.Module, ref_model: nn.Module | None, tokenizer, rows: Sequence[dict], cfg: DPOConfig,
                  sft_rows: Sequence[dict] | None = None) -> Objective:
    """The DPO loss of rows ``{prompt, chosen, rejected}`` against ``ref_model`` (None: the policy as it is now;
    module docstring), for ``hbat.trainer.step.train_loop``; with ``cfg.sft_coef`` the SFT loss of ``sft_rows``
    is mixed in. The reference log-probs are computed here, before the policy's first update."""
    if not rows:
        raise ValueError("run_dpo needs at least one preference pair")
    if cfg.sft_coef > 0 and not sft_rows:
        raise ValueError("DPOConfig.sft_coef > 0 needs sft_rows (the SFT data mixed in, RLHF+pt)")
    encoded = encode_pairs(tokenizer, rows, cfg.max_len)
    pad = pad_token_id(tokenizer)
    ref_chosen = ref_rejected = None
    if ref_model is None:
        ref_model = base_of(policy)  # LoRA: the base with the adapters disabled; else None (the policy now)
    if cfg.precompute_ref_logprobs:
        ref_chosen, ref_rejected = reference_logprobs(ref_model if ref_model is not None else policy, encoded, pad,
                                                      cfg.eval_batch_size)
    elif ref_model is None:
        ref_model = frozen_copy(policy)
    extra = None
    if cfg.sft_coef > 0:
        extra = sft_mix_loss(policy, tokenizer, sft_rows, coef=cfg.sft_coef, max_len=cfg.max_len, seed=cfg.seed,
                             batch_size=cfg.sft_batch_size or max(1, cfg.batch_size // cfg.grad_accum_steps))

    def micro_loss(micro, batch):
        pairs = collate_preference([encoded[i] for i in micro], pad)
        chosen, rejected = pair_logprobs(policy, pairs)
        if ref_chosen is not None:
            index = torch.tensor(micro, device=ref_chosen.device)
            ref_c, ref_r = ref_chosen[index].to(chosen.device), ref_rejected[index].to(chosen.device)
        else:
            with torch.no_grad(), eval_mode(ref_model):
                ref_c, ref_r = pair_logprobs(ref_model, pairs)
        loss, reward_c, reward_r = dpo_loss(chosen, rejected, ref_c, ref_r, cfg.beta)
        share = len(micro) / len(batch)  # weight: the micro-batch's share of the pairs
        stats = {"dpo/loss": loss.detach(), "rewards/chosen": reward_c.mean(), "rewards/rejected": reward_r.mean(),
                 "rewards/accuracies": (reward_c > reward_r).float().mean(),
                 "rewards/margins": (reward_c - reward_r).mean(),
                 "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
        return loss * share, {key: value * share for key, value in stats.items()}

    return Objective(len(encoded), micro_loss, desc="dpo", loss_key="dpo/loss", extra_loss=extra,
                     extra_key="dpo/sft_loss")


def run_dpo(policy: nn.Module, ref_model: nn.Module | None, tokenizer, rows: Sequence[dict],
            cfg: DPOConfig | None = None, *, penalty=None, log: Callable[[dict], None] | None = None,
            progress: bool = True, sft_rows: Sequence[dict] | None = None) -> dict:
    """DPO on rows ``{prompt, chosen, rejected}``; updates ``policy`` in place (a fresh AdamW per call).

    ``ref_model`` None: the policy as it is now (module docstring); for a LoRA policy, its base with the
    adapters disabled (hbat.trainer.models.base_of: no copy). Logs per step ``dpo/loss``, the TRL
    metrics, ``dpo/sft_loss`` (RLHF+pt), ``ewc/penalty``, ``train/lr``, ``train/grad_norm``, ``train/step``,
    ``train/epoch``; returns their means over the run plus ``train/steps`` and ``dpo/loss_last``.
    """
    cfg = cfg or DPOConfig()
    return train_loop(policy, dpo_objective(policy, ref_model, tokenizer, rows, cfg, sft_rows), cfg, penalty=penalty,
                      log=log, progress=progress)


@torch.no_grad()
def evaluate_dpo(policy: nn.Module, ref_model: nn.Module, tokenizer, rows: Sequence[dict], *, beta: float = 0.1,
                 batch_size: int = 16, max_len: int = 256) -> dict:
    """Held-out ``{"rewards/accuracies", "rewards/margins", "dpo/loss"}`` of the implicit reward."""
    if not rows:
        raise ValueError("evaluate_dpo needs at least one preference pair")
    encoded = encode_pairs(tokenizer, rows, max_len)
    pad = pad_token_id(tokenizer)
    chosen, rejected = reference_logprobs(policy, encoded, pad, batch_size)  # same pass, on the policy
    ref_chosen, ref_rejected = reference_logprobs(ref_model, encoded, pad, batch_size)
    device = chosen.device
    loss, reward_c, reward_r = dpo_loss(chosen, rejected, ref_chosen.to(device), ref_rejected.to(device), beta)
    return {"rewards/accuracies": (reward_c > reward_r).float().mean().item(),
            "rewards/margins": (reward_c - reward_r).mean().item(), "dpo/loss": loss.item()}


def preference_accuracy(policy: nn.Module, ref_model: nn.Module, tokenizer, rows: Sequence[dict],
                        beta: float = 0.1, **kwargs) -> float:
    """Fraction of pairs whose implicit reward ranks chosen above rejected (ties count as wrong)."""
    return evaluate_dpo(policy, ref_model, tokenizer, rows, beta=beta, **kwargs)["rewards/accuracies"]


def dpo_mix_loss(policy: nn.Module, ref_model: nn.Module | None, tokenizer, rows: Sequence[dict], *, coef: float,
                 batch_size: int, beta: float = 0.1, max_len: int = 256,
                 seed: int = 0) -> Callable[[int], torch.Tensor]:
    """``step -> coef * DPO loss`` on the next batch of ``rows`` (cycling, reshuffled each pass): the SFT+ppo
    baseline passes it as ``run_sft(..., mix_loss=...)``. Reference log-probs are computed now, under
    ``ref_model`` (None: the policy as it is now; LoRA: its base)."""
    encoded = encode_pairs(tokenizer, rows, max_len)
    if not encoded:
        raise ValueError("dpo_mix_loss needs at least one preference pair")
    pad = pad_token_id(tokenizer)
    reference = ref_model if ref_model is not None else base_of(policy) or policy
    ref_chosen, ref_rejected = reference_logprobs(reference, encoded, pad, batch_size)
    generator = torch.Generator().manual_seed(seed)
    order = itertools.chain.from_iterable(
        torch.randperm(len(encoded), generator=generator).tolist() for _ in itertools.count())
    device = model_device(policy)

    def loss(step: int) -> torch.Tensor:
        index = [next(order) for _ in range(batch_size)]
        chosen, rejected = pair_logprobs(policy, collate_preference([encoded[i] for i in index], pad))
        ids = torch.tensor(index, device=ref_chosen.device)
        value, _, _ = dpo_loss(chosen, rejected, ref_chosen[ids].to(device), ref_rejected[ids].to(device), beta)
        return coef * value

    return loss
