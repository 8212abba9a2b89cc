"""A Llama built from a config (no download) and the short causal-LM pre-training of the embedded task.

Sizes: ``"tiny"`` (~58K parameters, for tests), ``"small"`` (~0.22M, the demo) and ``"base"`` (~0.8M).
Compute, not parameters, is the limit on 2 CPU cores: a step costs roughly (tokens x layers), so "small" is
narrow and 4 layers deep. The demo's settings (pre-training steps, SFT / DPO learning rates and epochs) are
the defaults of ``hbat.trainer.config.TrainConfig``. Pre-training is plain next-token prediction on whole texts
(``<s> text </s>``, right-padded, padding ignored), AdamW with a linear warm-up and cosine decay.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch

MODEL_SIZES = {
    "tiny": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4),
    "base": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
}
CONTEXT = 256  # max_position_embeddings of the embedded model: the longest prompt + response it takes


def build_model(tokenizer, size: str = "tiny", seed: int = 0, max_position_embeddings: int = CONTEXT):
    """A freshly initialised ``LlamaForCausalLM`` for ``tokenizer`` (seeded; special ids from the tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    shape = MODEL_SIZES[size]
    config = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=shape["num_attention_heads"],
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    encoded = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ValueError(f"pretrain text {i} must be a non-empty string, got {text!r}")
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"]) + [eos]
        encoded.append(ids[:max_len])
    return encoded


def pretrain(model, tokenizer, texts: Sequence[str], *, steps: int, batch_size: int = 32, lr: float = 3e-3,
             seed: int = 0, warmup_steps: int | None = None, max_len: int = 256, weight_decay: float = 0.01,
             max_grad_norm: float = 1.0, progress: bool = True, log: Callable[[dict], None] | None = None) -> dict:
    """Next-token pre-training of ``model`` on ``texts`` for ``steps`` steps (batches drawn by epoch, seeded).

    Logs ``pretrain/loss``, ``pretrain/lr``, ``pretrain/step`` through ``log`` each step; returns
    ``pretrain/first_loss`` (the first step's loss), ``pretrain/loss`` (mean of the last 10 steps) and
    ``pretrain/steps``. A non-finite loss raises FloatingPointError naming the step.
    """
    from tqdm.auto import tqdm

    from ..data import collate, pad_token_id, position_ids_from_mask

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if not texts:
        raise ValueError("pretrain needs at least one text")
    encoded = _encode_texts(tokenizer, texts, max_len)
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))

    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    was_training = model.training
    model.train()
    bar = tqdm(total=steps, desc="pretrain", disable=not progress, leave=False)
    try:
        for step in range(steps):
            if len(order) < batch_size:  # refill with a fresh permutation (epochs)
                fresh = list(range(len(encoded)))
                rng.shuffle(fresh)
                order += fresh
            index, order = order[:batch_size], order[batch_size:]
            batch = collate([{"input_ids": encoded[i], "labels": encoded[i]} for i in index], pad)  # labels: -100 on padding
            mask = batch["attention_mask"].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                         position_ids=position_ids_from_mask(mask), labels=batch["labels"].to(device), use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):  # read every step anyway: stop before a NaN model is used or saved
                raise FloatingPointError(f"pre-training diverged at step {step + 1}: loss {losses[-1]}")
            if log is not None:
                log({"pretrain/loss": losses[-1], "pretrain/lr": lr_at(step), "pretrain/step": step + 1})
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        model.train(was_training)
    return {"pretrain/first_loss": losses[0], "pretrain/loss": sum(losses[-10:]) / len(losses[-10:]),
            "pretrain/steps": steps}
