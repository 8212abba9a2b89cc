"""Real transformers Llama models and synthetic data for bench_importance.py and bench_step.py.

Models are built from a ``LlamaConfig`` scaled to a parameter count (nothing is downloaded); data are random
token ids with the first half of each sequence as the prompt (labels -100 there, as in SFT / DPO).
"""
from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hbat.baselines.fisher import sequence_logprob
from hbat.trainer.dpo import dpo_loss as dpo_objective

VOCAB = 8000
HEAD_DIM = 64


def llama_config(params: float, vocab: int = VOCAB) -> LlamaConfig:
    """A Llama config with about ``params`` parameters: 4 layers up to ~50M, deeper beyond (vocab 8000 on CPU
    sizes, 32000 from 300M up), hidden a multiple of 64, intermediate ~8/3 hidden, untied embeddings."""
    if params >= 3e8:
        vocab = 32000
    layers = 4 if params < 5e7 else (8 if params < 3e8 else 16)
    # params ~= 2 * vocab * h + layers * 12 h^2
    a, b = 12 * layers, 2 * vocab
    hidden = max(HEAD_DIM, round((-b + math.sqrt(b * b + 4 * a * params)) / (2 * a) / HEAD_DIM) * HEAD_DIM)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // HEAD_DIM, num_key_value_heads=hidden // HEAD_DIM,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )


def build_model(params: float, device, seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(params)).to(device=device, dtype=dtype)
    return model


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sft_samples(n: int, seq_len: int, vocab: int = VOCAB, seed: int = 1) -> list[dict]:
    """``n`` samples {input_ids, labels} of ``seq_len`` tokens, the second half being the response."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq_len,), generator=gen)
        labels = ids.clone()
        labels[: seq_len // 2] = -100
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def dpo_batch(pairs: int, seq_len: int, device, vocab: int = VOCAB, seed: int = 2) -> dict:
    """A preference batch: chosen and rejected share the prompt (first half); labels -100 on the prompt."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (pairs, seq_len // 2), generator=gen)
    chosen = torch.cat([prompt, torch.randint(3, vocab, (pairs, seq_len - seq_len // 2), generator=gen)], 1)
    rejected = torch.cat([prompt, torch.randint(3, vocab, (pairs, seq_len - seq_len // 2), generator=gen)], 1)
    ids = torch.cat([chosen, rejected]).to(device)
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100
    return {"input_ids": ids, "labels": labels}


def dpo_loss(policy, reference, batch: dict, beta: float = 0.1) -> torch.Tensor:
    """Eq. (4): -log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected)); chosen rows first."""
    logp = sequence_logprob(policy(batch["input_ids"]).logits, batch["labels"])
    with torch.no_grad():
        ref_logp = sequence_logprob(reference(batch["input_ids"]).logits, batch["labels"])
    return dpo_objective(*logp.chunk(2), *ref_logp.chunk(2), beta)[0]
