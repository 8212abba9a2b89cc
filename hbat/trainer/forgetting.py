"""The forgetting meter of ``hbat train`` (``eval.kl_to_start_every: N``): every N optimizer steps of an SFT or
DPO stage, ``ewc/kl_to_start`` and ``ewc/kl_to_start_reverse`` go into metrics.jsonl beside the step's loss.

They are hbat.averaging.kl_to_start: the exact token-level KL between the stage's start weights and the current
ones, KL(start || current) (the "forward KL" of RL's Razor, arXiv 2509.04259, which tracks forgetting) and its
reverse, on a fixed held-out batch of the stage's own task: the first ``eval.kl_to_start_rows`` validation rows
(SFT rows in an IFA stage, the prompts with their chosen answers in a DPO stage). The start weights are copied
when the stage starts (one copy of the trained weights: the memory plan's "forgetting meter" row) and swapped
into the model in place for the start forward, exactly, then back: training is the same bit for bit with the
meter on or off. Cost per measurement: two forwards of the rows (``eval.batch_size`` rows per forward, no larger
than evaluation's), no backward, no generation; its time counts in ``train_seconds``. PPO stages and DeepSpeed runs
are not measured (refused at load under DeepSpeed).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..averaging.kl import kl_to_start
from ..averaging.shards import WeightShards
from ..data import pad_token_id
from .config import TrainConfig
from .sft import collate_sft, encode_for_sft

Log = Callable[[dict], None]


def with_forgetting_meter(model, tokenizer, rows: Sequence[dict], cfg: TrainConfig, log: Log, *,
                          max_len: int) -> Log:
    """``log`` itself when the meter is off, else a log that adds the two KLs to the first record at or after
    every ``cfg.eval.kl_to_start_every``-th optimizer step (records carry ``train/step``) of this stage. The rows
    are cut to the stage's ``max_len`` and measured ``eval.batch_size`` rows per forward, as evaluation runs."""
    every = cfg.eval.kl_to_start_every
    rows = [r if "response" in r else {"prompt": r["prompt"], "response": r["chosen"]}
            for r in rows[:cfg.eval.kl_to_start_rows]]
    if not every or not rows:
        return log
    encoded, pad = encode_for_sft(tokenizer, rows, max_len), pad_token_id(tokenizer)
    size = cfg.eval.batch_size
    batches = [collate_sft(encoded[i:i + size], pad) for i in range(0, len(encoded), size)]
    shards = WeightShards(model)  # the stage's start weights, copied now
    due = [every]

    def logged(record: dict) -> None:
        step = record.get("train/step")
        if step is not None and step >= due[0]:
            record = {**record, **_measure(shards, batches)}
            due[0] = (step // every + 1) * every
        log(record)

    return logged


def _logits(module, batch) -> torch.Tensor:
    return module(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits


def _measure(shards: WeightShards, batches: list[dict]) -> dict[str, float]:
    """Both KLs over the scored positions of all ``batches`` (each batch's mean weighted by its positions)."""
    parts = [kl_to_start(shards, batch, forward=_logits) for batch in batches]
    tokens = sum(p["kl_tokens"] for p in parts)
    return {f"ewc/{key}": sum(p[key] * p["kl_tokens"] for p in parts) / tokens
            for key in ("kl_to_start", "kl_to_start_reverse")}
