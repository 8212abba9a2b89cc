"""Reward model stage: a scalar head on a causal LM's backbone, trained with the pairwise ranking loss.

    score(x, y) = head(h_last),  h_last = final hidden state of the last non-pad token of prompt + response
    loss        = -log sigmoid(score(x, y_chosen) - score(x, y_rejected))          (Bradley-Terry)

The paper initialises the reward model from the SFT model and trains 2 epochs, lr 1e-5, batch 64
(``RewardConfig`` keeps lr and epochs; the batch default is small for CPU runs). Training steps through
``hbat.trainer.step.train_loop``, as SFT and DPO do. Responses are scored
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
from .checks import numbers
from .common import StageConfig
from .step import Objective, train_loop


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class RewardModel(nn.Module):
    """LM backbone (e.g. ``LlamaModel``) + a ``Linear(hidden, 1)`` head; ``forward`` returns one float32 score per
    row, the head's output at the last attended token. ``head`` None: a fresh, small head (``from_causal_lm``)."""

    def __init__(self, backbone: nn.Module, hidden_size: int, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        if head is None:
            head = nn.Linear(hidden_size, 1)
            # small head init (as in Stiennon et al. / TRL) so the initial scores are O(1); its own seeded
            # generator, so the judge does not depend on how much of the global RNG stream earlier code consumed
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden_size + 1),
                            generator=torch.Generator().manual_seed(0))
            nn.init.zeros_(head.bias)
        self.head = head
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

    @classmethod
    def from_sequence_classifier(cls, model: nn.Module) -> "RewardModel":
        """The backbone and one-label ``score`` head of a transformers ``*ForSequenceClassification`` (Llama,
        Qwen2, Mistral, GPT-2, ...), taken over as they are (no copy)."""
        head = getattr(model, "score", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(f"{type(model).__name__} has no one-label `score` head (a reward model is an "
                             "AutoModelForSequenceClassification saved with num_labels=1)")
        return cls(model.base_model, head.in_features, head)

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


class RetokenizedRewardModel(nn.Module):
    """A reward model with a tokenizer of its own (``model.reward_path``): it scores the TEXT of token ids made
    by the policy's tokenizer (``source_tokenizer``), re-encoded with its own tokenizer as in training
    (special tokens, EOS appended), the last ``max_len`` tokens of each row."""

    def __init__(self, reward_model: RewardModel, tokenizer, source_tokenizer, max_len: int):
        super().__init__()
        self.reward_model = reward_model
        self.tokenizer, self.source_tokenizer, self.max_len = tokenizer, source_tokenizer, max_len

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            text = self.source_tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            own = list(self.tokenizer(text, add_special_tokens=True)["input_ids"]) + eos
            rows.append({"input_ids": own[-self.max_len:]})
        batch = collate(rows, pad_token_id(self.tokenizer))
        device = _device(self.reward_model)
        return self.reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device))


@dataclass
class RewardConfig(StageConfig):
    """Reward-model training (paper: lr 1e-5, 2 epochs, batch 64). Shared fields: ``common.StageConfig``."""

    lr: float = 1e-5                 # AdamW learning rate
    batch_size: int = 8              # preference pairs per step
    epochs: int = 2                  # passes over the pairs
    lr_scheduler_type: str = "constant"  # the lr of every step (or "linear" / "cosine" decay after warm-up)

    def __post_init__(self):
        super().__post_init__()
        numbers(self, "lr", strict=True)


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
    """Train ``rm`` on preference rows ``{prompt, chosen, rejected}`` with the ranking loss, stepping through
    the training loop every stage uses (``hbat.trainer.step.train_loop``: clipping, AdamW, fp32 masters for bf16
    weights).

    Logs ``rm/loss``, ``rm/accuracy``, ``rm/margin`` and ``train/*`` every ``logging_steps`` steps through
    ``log``; returns their means over the run, ``train/steps``, ``rm/loss_last`` and, with ``eval_pairs``, the
    held-out ``rm/eval_accuracy``, ``rm/eval_margin``, ``rm/eval_loss``. A non-finite loss raises
    hbat.trainer.guards.TrainingDiverged.
    """
    cfg = cfg or RewardConfig()
    if not pairs:
        raise ValueError("train_reward_model needs at least one preference pair")
    encoded = encode_preference(tokenizer, pairs, cfg.max_len)
    pad = pad_token_id(tokenizer)
    device = _device(rm)

    def micro_loss(micro, batch):
        chosen, rejected = _pair_scores(rm, collate_preference([encoded[i] for i in micro], pad), device)
        loss = ranking_loss(chosen, rejected)
        share = len(micro) / len(batch)  # weight: the micro-batch's share of the pairs
        stats = {"rm/loss": loss.detach(), "rm/accuracy": (chosen > rejected).float().mean(),
                 "rm/margin": (chosen - rejected).detach().mean()}
        return loss * share, {key: value * share for key, value in stats.items()}

    result = train_loop(rm, Objective(len(encoded), micro_loss, desc="reward", loss_key="rm/loss"), cfg, log=log,
                        progress=progress)
    if eval_pairs:
        held_out = evaluate_reward_model(rm, tokenizer, eval_pairs, batch_size=cfg.eval_batch_size,
                                         max_len=cfg.max_len)
        held_out = {key.replace("rm/", "rm/eval_"): value for key, value in held_out.items()}
        result.update(held_out)
        if log is not None:
            log(dict(held_out))
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
