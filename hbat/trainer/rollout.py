"""Sampled responses: one ``Rollout`` per batch of prompts (HF ``generate``), the log-probabilities of its
response tokens under a model, and its reward-model score. Used by PPO and by evaluation."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import nn

from ..data import collate, encode_prompts, pad_token_id, position_ids_from_mask


@dataclass
class Rollout:
    """Token tensors of one sampled batch: left-padded queries, right-padded responses (mask 1 up to EOS)."""

    query_ids: torch.Tensor       # [B, Lq]
    query_mask: torch.Tensor      # [B, Lq]
    response_ids: torch.Tensor    # [B, Lr], pad after the first EOS
    response_mask: torch.Tensor   # [B, Lr], 1 up to and including the first EOS
    has_eos: torch.Tensor         # [B] bool

    @property
    def input_ids(self):
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self):
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def query_len(self) -> int:
        return self.query_ids.shape[1]

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(*(getattr(self, f.name)[index] for f in fields(self)))


def _first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


@torch.no_grad()
def generate(policy: nn.Module, tokenizer, prompts: Sequence[str | dict], cfg) -> Rollout:
    """Sample one response per prompt with HF ``generate`` (``cfg``: a PPOConfig's top_p, temperature, top_k,
    max_new_tokens, max_prompt_len)."""
    from transformers import GenerationConfig  # heavy, optional (hbat[train])

    pad = pad_token_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    queries = collate([{"input_ids": ids} for ids in encode_prompts(tokenizer, prompts, cfg.max_prompt_len)], pad,
                      padding_side="left")
    device = _first_param(policy).device
    query_ids, query_mask = queries["input_ids"].to(device), queries["attention_mask"].to(device)
    generation_config = GenerationConfig(
        do_sample=True, top_p=cfg.top_p, temperature=cfg.temperature, top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
        bos_token_id=getattr(tokenizer, "bos_token_id", None))
    was_training = policy.training
    policy.eval()
    try:
        output = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config)
    finally:
        policy.train(was_training)
    response = output[:, query_ids.shape[1]:]
    if eos is None:
        is_eos = torch.zeros_like(response, dtype=torch.bool)
    else:
        is_eos = response == eos
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    return Rollout(query_ids, query_mask, response.masked_fill(after_eos, pad), response_mask, is_eos.any(1))


def response_logprobs(model: nn.Module, rollout: Rollout, temperature: float, *,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(response token | prefix) [B, Lr] from temperature-scaled logits (and their entropy when asked)."""
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": position_ids_from_mask(attention_mask), "use_cache": False}
    response_len = rollout.response_ids.shape[1]
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = response_len + 1  # only the positions that predict response tokens
        logits = model(**kwargs).logits[:, :-1]
    else:
        logits = model(**kwargs).logits[:, rollout.query_len - 1:-1]
    logits = logits.float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    token_logprobs = log_probs.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logprobs, entropy


@torch.no_grad()
def score_rollout(reward_model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Reward-model score of query + response (the last non-pad token is the EOS when there is one)."""
    return reward_model(rollout.input_ids, rollout.attention_mask).float()
