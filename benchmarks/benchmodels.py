"""Real transformers Llama models and synthetic data for bench_importance.py and bench_step.py.

Models are built from a ``LlamaConfig`` scaled to a parameter count (nothing is downloaded); data are random
token ids with the first half of each sequence as the prompt (labels -100 there, as in SFT / DPO).
"""
from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hbat.baselines.fisher import sequence_logprob
from hbat.trainer.dpo import dpo_loss as sigmoid_dpo_loss

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
    return sigmoid_dpo_loss(*logp.chunk(2), *ref_logp.chunk(2), beta)[0]


# --- the same model for the trainer (bench_step's precision part) ---------------------------------------------

def word_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer of ``vocab`` ids: ``<pad> <s> </s>`` then the words ``w3 .. w{vocab-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_for_trainer(folder: str, params: float, rows: int, seq_len: int) -> dict[str, str]:
    """The bench model (``params``) as a user's run of ``hbat train``: the model with its tokenizer (also the
    SFT model), a one-label reward model of the same shape, and ``rows`` SFT / preference rows of random words
    (half of ``seq_len`` prompt, half response). Returns the config overrides that point at them."""
    import json
    import os

    from transformers import LlamaForSequenceClassification

    tokenizer = word_tokenizer()
    model_dir, reward_dir = os.path.join(folder, "model"), os.path.join(folder, "reward")
    config = llama_config(params)
    config.update({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(reward_dir)
    gen = torch.Generator().manual_seed(3)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(3, VOCAB, (n,), generator=gen).tolist())

    half = seq_len // 2 - 1  # BOS + prompt, response + EOS: seq_len tokens in all
    sets = {"sft": [{"prompt": words(half), "response": words(half)} for _ in range(rows)],
            "preference": [{"prompt": words(half), "chosen": words(half), "rejected": words(half)}
                           for _ in range(rows)]}
    for name, data in sets.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in data)
    return {"model.path": model_dir, "model.sft_path": model_dir, "model.reward_path": reward_dir,
            "data.sft": os.path.join(folder, "sft.jsonl"), "data.preference": os.path.join(folder, "preference.jsonl")}
