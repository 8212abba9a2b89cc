"""SFT stage of IFA (eq. 2): maximum likelihood of the response tokens, prompt tokens masked.

    L_MLE = - sum_t log p(y_t | y_<t, x) / (number of response tokens in the batch)

The loss is the mean over all response tokens of the optimizer batch (not a mean of per-row means), so
long responses weigh what their tokens weigh, and grad accumulation is exact (hbat.trainer.step).
With ``penalty`` (hbat.HybridEWC) the step adds the EWC gradient of eq. (8) before clipping.

Packing (``SFTConfig.packing``): encoded rows are concatenated greedily into rows of at most ``max_len``
tokens, with position ids restarting at 0 for each sequence and no attention mask; transformers' masking
utilities (Llama, Mistral, Qwen2, ... all models built on ``transformers.masking_utils``) then build a
block-diagonal causal mask from the position ids, so sequences never attend to each other. With packing,
``batch_size`` counts packed rows. A model that ignores position ids for masking would attend across
sequences: leave packing off for it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..data import IGNORE_INDEX, collate, encode_sft, pad_sequences, pad_token_id
from .checks import booleans
from .common import StageConfig, eval_mode, token_logprobs
from .step import Objective, train_loop


@dataclass
class SFTConfig(StageConfig):
    """SFT settings (paper: lr 1e-5, batch 64, 3 epochs). Shared fields: ``hbat.trainer.common.StageConfig``.

    Tests and the CPU demo use a much larger lr (about 1e-3) on tiny models; 1e-5 is for 7B-scale models.
    """

    lr: float = 1e-5                  # peak AdamW learning rate (paper: 1e-5)
    batch_size: int = 64              # rows per optimizer step (paper: 64)
    epochs: int = 3                   # passes over the rows (paper: 3)
    packing: bool = False             # concatenate rows into max_len-token rows (module docstring)

    def __post_init__(self):
        super().__post_init__()
        booleans(self, "packing")


def pack_rows(encoded: Sequence[dict], max_len: int) -> list[dict]:
    """Greedily concatenate encoded rows (in order) into rows of <= ``max_len`` tokens with restarting positions."""
    packed, current = [], {"input_ids": [], "labels": [], "position_ids": []}
    for row in encoded:
        if current["input_ids"] and len(current["input_ids"]) + len(row["input_ids"]) > max_len:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += row["input_ids"]
        current["labels"] += row["labels"]
        current["position_ids"] += list(range(len(row["input_ids"])))
    if current["input_ids"]:
        packed.append(current)
    return packed


def collate_sft(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; packed rows get ``position_ids`` (pads restart at 0) and no attention mask."""
    if "position_ids" not in rows[0]:
        return collate(rows, pad_id)
    batch = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], pad_id)
    batch["position_ids"] = pad_sequences([r["position_ids"] for r in rows], 0)
    del batch["attention_mask"]
    return batch


def encode_for_sft(tokenizer, rows: Sequence[dict], max_len: int, packing: bool = False) -> list[dict]:
    """Encode (and optionally pack) SFT rows, checking them first so a bad row fails before any training."""
    for index, row in enumerate(rows):
        missing = [key for key in ("prompt", "response") if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(f"SFT row {index} has no field {missing[0]!r} (expected {{prompt, response}})")
    encoded = encode_sft(tokenizer, rows, max_len)
    return pack_rows(encoded, max_len) if packing else encoded


def _label_count(row: dict) -> int:
    # labels are shifted by one in the loss: the first position is never a target
    return sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX)


def sft_objective(model: nn.Module, tokenizer, rows: Sequence[dict], cfg: SFTConfig,
                  mix_loss: Callable[[int], torch.Tensor] | None = None) -> Objective:
    """The MLE loss of the response tokens of rows ``{prompt, response}`` (each micro-batch weighted by its share of
    the batch's tokens), for ``hbat.trainer.step.train_loop``; ``mix_loss(step)`` is added to every step."""
    if not rows:
        raise ValueError("run_sft needs at least one SFT row")
    encoded = encode_for_sft(tokenizer, rows, cfg.max_len, cfg.packing)
    counts = [_label_count(row) for row in encoded]
    pad = pad_token_id(tokenizer)

    def micro_loss(micro, batch):
        logps, _ = token_logprobs(model, collate_sft([encoded[i] for i in micro], pad))
        loss = -logps.sum() / max(1, sum(counts[i] for i in batch))  # weight: the micro-batch's share of tokens
        return loss, {"sft/loss": loss.detach()}

    return Objective(len(encoded), micro_loss, desc="sft", loss_key="sft/loss", extra_loss=mix_loss,
                     extra_key="sft/mix_loss")


def run_sft(model: nn.Module, tokenizer, rows: Sequence[dict], cfg: SFTConfig | None = None, *, penalty=None,
            log: Callable[[dict], None] | None = None, progress: bool = True,
            mix_loss: Callable[[int], torch.Tensor] | None = None) -> dict:
    """Fine-tune ``model`` in place on rows ``{prompt, response}`` with the MLE loss of the response tokens.

    A fresh AdamW per call (one call = one IFA stage). ``mix_loss(step)``, when given, returns a scalar loss
    added to each optimizer step (the SFT+ppo baseline mixes a DPO loss in: ``hbat.trainer.dpo.dpo_mix_loss``).
    Logs ``sft/loss`` (mean per-token loss of the step's batch), ``sft/mix_loss``, ``ewc/penalty``,
    ``train/lr``, ``train/grad_norm``, ``train/step``, ``train/epoch`` every ``logging_steps`` steps; returns their
    means over the run plus ``train/steps`` and ``sft/loss_last``.
    """
    cfg = cfg or SFTConfig()
    return train_loop(model, sft_objective(model, tokenizer, rows, cfg, mix_loss), cfg, penalty=penalty, log=log,
                      progress=progress)


@torch.no_grad()
def sft_loss(model: nn.Module, tokenizer, rows: Sequence[dict], *, batch_size: int = 16, max_len: int = 256) -> float:
    """Held-out mean per-token loss of the response tokens (model in eval mode, restored after)."""
    if not rows:
        raise ValueError("sft_loss needs at least one SFT row")
    encoded = encode_for_sft(tokenizer, rows, max_len)
    pad = pad_token_id(tokenizer)
    total, tokens = 0.0, 0.0
    with eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            logps, mask = token_logprobs(model, collate(encoded[start:start + batch_size], pad))
            total -= logps.sum().item()
            tokens += mask.sum().item()
    return total / max(tokens, 1.0)


def sft_mix_loss(model: nn.Module, tokenizer, rows: Sequence[dict], *, coef: float, batch_size: int,
                 max_len: int = 256, seed: int = 0) -> Callable[[int], torch.Tensor]:
    """``step -> coef * SFT loss`` on the next batch of ``rows`` (cycling, reshuffled each pass).

    Mixed into the DPO stage for the RLHF+pt baseline (``DPOConfig.sft_coef``).
    """
    encoded = encode_for_sft(tokenizer, rows, max_len)
    if not encoded:
        raise ValueError("sft_mix_loss needs at least one SFT row")
    pad = pad_token_id(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    order = itertools.chain.from_iterable(
        torch.randperm(len(encoded), generator=generator).tolist() for _ in itertools.count())

    def loss(step: int) -> torch.Tensor:
        batch = collate([encoded[next(order)] for _ in range(batch_size)], pad)
        logps, mask = token_logprobs(model, batch)
        return coef * (-logps.sum() / mask.sum().clamp(min=1))

    return loss
