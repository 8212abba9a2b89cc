"""Reward model stage: a scalar head on a causal LM's backbone, trained with the pairwise ranking loss.

    score(x, y) = head(h_last),  h_last = final hidden state of the last non-pad token of prompt + response
    loss        = -log sigmoid(score(x, y_chosen) - score(x, y_rejected))          (Bradley-Terry)

The paper initialises the reward model from the SFT model and trains 2 epochs, lr 1e-5, batch 64
(``RewardConfig`` keeps lr and epochs; the batch default is small for CPU runs). Responses are scored
with EOS appended, exactly as they are encoded for training (hbat.data.encode_sft).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import collate, collate_preference, encode_preference, encode_sft, pad_token_id, position_ids_from_mask
from .checks import integers, numbers
from .guards import check_values


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class RewardModel(nn.Module):
    """LM backbone (e.g. ``LlamaModel``) + ``Linear(hidden, 1)``; ``forward`` returns one float32 score per row."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        # small head init (as in Stiennon et al. / TRL) so the initial scores are O(1); its own seeded generator,
        # so the judge does not depend on how much of the global RNG stream earlier code consumed
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden_size + 1),
                        generator=torch.Generator().manual_seed(0))
        nn.init.zeros_(self.head.bias)
        self.config = getattr(backbone, "config", None)

    @classmethod
    def from_causal_lm(cls, lm: nn.Module) -> "RewardModel":
        """A reward model whose backbone is a deep copy of ``lm``'s base model (``lm`` is left untouched)."""
        backbone = getattr(lm, "base_model", None)
        if backbone is None or backbone is lm:
            raise TypeError(f"{type(lm).__name__} has no separate base model (expected a *ForCausalLM)")
        backbone = copy.deepcopy(backbone)
        reward_model = cls(backbone, lm.config.hidden_size)
        reference = next(backbone.parameters())
        reward_model.head.to(device=reference.device, dtype=reference.dtype)
        return reward_model

    def hidden_states(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.head(last).squeeze(-1).float()


@dataclass
class RewardConfig:
    """Reward-model training (paper: lr 1e-5, 2 epochs, batch 64)."""

    lr: float = 1e-5                 # AdamW learning rate
    batch_size: int = 8              # preference pairs per step
    epochs: int = 2                  # passes over the pairs
    max_len: int = 256               # tokens of prompt + response (hbat.data truncation rule)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0       # gradient clipping (0 or None: off)
    eval_batch_size: int = 16
    seed: int = 0                    # shuffling of the pairs

    def __post_init__(self):
        integers(self, 1, "batch_size", "epochs", "eval_batch_size")
        integers(self, 2, "max_len")
        integers(self, 0, "seed")
        numbers(self, "lr", strict=True)
        numbers(self, "weight_decay", "max_grad_norm")


def ranking_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _pair_scores(rm: RewardModel, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected in ONE forward (the two halves are padded to the same length)."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).to(device)
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]).to(device)
    scores = rm(ids, mask)
    half = batch["chosen_input_ids"].shape[0]
    return scores[:half], scores[half:]


def train_reward_model(rm: RewardModel, tokenizer, pairs: Sequence[dict], cfg: RewardConfig | None = None, *,
                       log: Callable[[dict], None] | None = None, eval_pairs: Sequence[dict] | None = None,
                       progress: bool = True) -> dict:
    """Train ``rm`` on preference rows ``{prompt, chosen, rejected}`` with the ranking loss.

    Logs ``rm/loss``, ``rm/accuracy``, ``rm/margin``, ``rm/epoch`` per step through ``log``; returns the last
    epoch's means (``rm/loss``, ``rm/accuracy``, ``rm/margin``), ``rm/steps`` and, with ``eval_pairs``, the
    held-out ``rm/eval_accuracy``, ``rm/eval_margin``, ``rm/eval_loss``. A non-finite loss raises
    hbat.trainer.guards.TrainingDiverged.
    """
    from tqdm.auto import tqdm

    cfg = cfg or RewardConfig()
    if not pairs:
        raise ValueError("train_reward_model needs at least one preference pair")
    encoded = encode_preference(tokenizer, pairs, cfg.max_len)
    pad = pad_token_id(tokenizer)
    device = _device(rm)
    optimizer = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    was_training = rm.training
    rm.train()
    step, epoch_stats = 0, {}
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="reward model", disable=not progress, leave=False)
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(encoded), generator=generator).tolist()
            sums = {"rm/loss": 0.0, "rm/accuracy": 0.0, "rm/margin": 0.0}
            for start in range(0, len(order), cfg.batch_size):
                batch = collate_preference([encoded[i] for i in order[start:start + cfg.batch_size]], pad)
                chosen, rejected = _pair_scores(rm, batch, device)
                loss = ranking_loss(chosen, rejected)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.max_grad_norm)
                optimizer.step()
                step += 1
                stats = {"rm/loss": loss.item(), "rm/accuracy": (chosen > rejected).float().mean().item(),
                         "rm/margin": (chosen - rejected).mean().item()}
                check_values(stats, ("rm/loss",), f"reward model step {step}", " (a smaller reward.lr may help)")
                for key, value in stats.items():
                    sums[key] += value
                if log is not None:
                    log({**stats, "rm/epoch": epoch + min(start + cfg.batch_size, len(order)) / len(order), "rm/step": step})
                bar.update(1)
                bar.set_postfix(loss=f"{stats['rm/loss']:.4f}", acc=f"{stats['rm/accuracy']:.2f}")
            epoch_stats = {key: value / steps_per_epoch for key, value in sums.items()}
    finally:
        bar.close()
        rm.train(was_training)
    result = {**epoch_stats, "rm/steps": step}
    if eval_pairs:
        held_out = evaluate_reward_model(rm, tokenizer, eval_pairs, batch_size=cfg.eval_batch_size,
                                         max_len=cfg.max_len)
        result.update({key.replace("rm/", "rm/eval_"): value for key, value in held_out.items()})
        if log is not None:
            log({key.replace("rm/", "rm/eval_"): value for key, value in held_out.items()})
    return result


@torch.no_grad()
def evaluate_reward_model(rm: RewardModel, tokenizer, pairs: Sequence[dict], *, batch_size: int = 16,
                          max_len: int = 256) -> dict:
    """Held-out ``{"rm/accuracy", "rm/margin", "rm/loss"}``: accuracy = fraction with r_chosen > r_rejected."""
    if not pairs:
        raise ValueError("evaluate_reward_model needs at least one preference pair")
    encoded = encode_preference(tokenizer, pairs, max_len)
    pad = pad_token_id(tokenizer)
    device = _device(rm)
    was_training = rm.training
    rm.eval()
    chosen_all, rejected_all = [], []
    try:
        for start in range(0, len(encoded), batch_size):
            chosen, rejected = _pair_scores(rm, collate_preference(encoded[start:start + batch_size], pad), device)
            chosen_all.append(chosen.cpu())
            rejected_all.append(rejected.cpu())
    finally:
        rm.train(was_training)
    chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
    return {"rm/accuracy": (chosen > rejected).float().mean().item(),
            "rm/margin": (chosen - rejected).mean().item(),
            "rm/loss": ranking_loss(chosen, rejected).item()}


@torch.no_grad()
def score_responses(rm: RewardModel, tokenizer, prompts: Sequence[str | dict], responses: Sequence[str], *,
                    batch_size: int = 16, max_len: int = 256) -> torch.Tensor:
    """Scores (float32 [N], on the CPU) of ``prompt + response`` texts, encoded as in training (EOS appended)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = [{"prompt": p["prompt"] if isinstance(p, dict) else p, "response": r} for p, r in zip(prompts, responses)]
    encoded = encode_sft(tokenizer, rows, max_len)
    pad = pad_token_id(tokenizer)
    device = _device(rm)
    was_training = rm.training
    rm.eval()
    scores = []
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start:start + batch_size], pad)
            scores.append(rm(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
    finally:
        rm.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)
