"""The forgetting meter: the KL between the current policy and the start model on a fixed batch of the new task.

    metrics = kl_to_start(shards, batch)   # {"kl_to_start": ..., "kl_to_start_reverse": ..., "kl_tokens": ...}

What is measured. ``batch`` is a fixed held-out batch of the CURRENT task's data (input_ids, attention_mask,
optional labels with -100 on prompt and padding tokens). At every position t whose next token is a
response token (labels[t+1] != -100; without labels: attention_mask[t+1] == 1) both models' next-token
distributions are taken from their logits, and the KL is computed EXACTLY over the whole vocabulary:

    kl_to_start         = mean_t KL(pi_start(.|x_<=t) || pi_theta(.|x_<=t))   "forward KL" of RL's Razor
                          (arXiv 2509.04259: the expectation under the start policy; it predicts forgetting)
    kl_to_start_reverse = mean_t KL(pi_theta || pi_start)                      the direction PPO/DPO constrain

Why exact and not k3. The sampled estimators (k1 = log r, k3 = (r - 1) - log r, HBAT.md section 6) exist
for sequences sampled from one policy, where the full distribution is out of reach. On a fixed batch both
forwards produce every position's full distribution anyway, so the exact per-token KL costs nothing more,
has no sampling variance, is never negative (each term is a KL between two distributions; float rounding
is clamped at 0) and needs no generation. It is the token-level KL on the batch's own prefixes, not a
sequence-level KL under sampling.

How the start model runs. Its weights are swapped into the live (sharded) model in place
(``WeightShards.swap_``: exchanged with the start copy, exactly, then exchanged back), so no second model is
allocated and nothing is gathered beyond what the model's own forward gathers. Cost per call: two forwards
of the batch (no backward) and two exchanges of this rank's slots (3 copies of them each); memory: one
tensor-sized temporary at a time, plus 2 x positions x vocabulary floats of log-probabilities.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .sweep import share_of

__all__ = ["kl_to_start", "token_kl", "response_positions"]


def response_positions(batch: Mapping) -> torch.Tensor:
    """Bool [rows, T-1]: positions t whose NEXT token is scored (a label, or an attended token)."""
    if batch.get("labels") is not None:
        return batch["labels"][:, 1:] != -100
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"][:, 1:] != 0
    return torch.ones_like(batch["input_ids"][:, 1:], dtype=torch.bool)


def _logits(module, batch: Mapping, forward: Callable | None) -> torch.Tensor:
    if forward is not None:
        return forward(module, batch)
    out = module(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def _log_probs(module, batch, positions, forward) -> torch.Tensor:
    logits = _logits(module, batch, forward)[:, :-1]
    return torch.log_softmax(logits[positions].float(), dim=-1)  # [P, vocab], only the measured positions


def token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p || q) = sum_v p (log p - log q) over the last dimension, clamped at 0 (rounding)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def kl_to_start(shards, batch: Mapping, *, forward: Callable | None = None) -> dict[str, float]:
    """Both KLs of the module docstring, averaged over the measured positions of every rank's share of
    ``batch`` (rows split equally over the ranks; sums all-reduced once). ``forward(module, batch)`` may
    return the logits if ``module(input_ids=, attention_mask=)`` does not."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise TypeError("the KL batch must be a dict with an input_ids tensor (and attention_mask / labels)")
    share, _ = share_of(batch, shards.rank, shards.world, "the KL batch")
    module = shards.module
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    share = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in share.items()}
    positions = response_positions(share)
    was_training = module.training
    module.eval()  # no dropout: the same function of the weights in both forwards
    try:
        with torch.no_grad():
            current = _log_probs(module, share, positions, forward)
            shards.swap_()
            try:
                start = _log_probs(module, share, positions, forward)
            finally:
                shards.swap_()
    finally:
        module.train(was_training)
    sums = torch.tensor([float(token_kl(start, current).double().sum()), float(token_kl(current, start).double().sum()),
                         float(positions.sum())], dtype=torch.float64)
    sums = shards.all_reduce_(sums)
    if sums[2] == 0:
        raise ValueError("the KL batch has no scored position (every label is -100 / every mask 0)")
    return {"kl_to_start": float(sums[0] / sums[2]), "kl_to_start_reverse": float(sums[1] / sums[2]),
            "kl_tokens": float(sums[2])}
