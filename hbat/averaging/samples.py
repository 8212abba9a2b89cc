"""Samples of the aligned policy (JSONL or text) for the HMA loss: reading, tokenising, sampling."""
from __future__ import annotations

import json
from typing import Sequence

import torch

from ..data import collate, encode_sft, pad_token_id

__all__ = ["load_samples", "encode_samples", "sample_responses"]


def load_samples(path: str) -> list[dict]:
    """Rows from ``path``: JSONL with {"prompt", "response"} (loss on the response), {"text"}, or {"prompt"}
    alone (responses are then sampled from the aligned model); any other file: one text per non-empty line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        if not path.endswith((".jsonl", ".json")):
            return [{"text": line.rstrip("\n")} for line in f if line.strip()]
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not ({"text", "prompt"} & set(row)):
                raise ValueError(f"{path}:{lineno}: a sample needs a 'text' or a 'prompt' (and 'response') field")
            for key in ("text", "prompt", "response"):
                if key in row and not isinstance(row[key], str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} must be a string")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples")
    return rows


def encode_samples(tokenizer, rows: Sequence[dict], *, max_length: int = 256, batch_size: int = 4) -> list[dict]:
    """Batches of input_ids / attention_mask / labels, tokenised like the trainer's SFT data (hbat.data):
    right padding, labels -100 on prompt and padding tokens; a {"text"} row is all response."""
    pairs = [{"prompt": "", "response": r["text"]} if "text" in r else {"prompt": r["prompt"], "response": r["response"]}
             for r in rows]
    # a row needs a predicted response token (the first label is never predicted)
    encoded = [e for e in encode_sft(tokenizer, pairs, max_length) if any(l != -100 for l in e["labels"][1:])]
    if not encoded:
        raise ValueError("no sample has a response token within max_length")
    pad = pad_token_id(tokenizer)
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, top_p: float = 0.95,
                     temperature: float = 0.75, seed: int = 0) -> list[str]:
    """Responses of ``model`` to ``prompts`` (nucleus sampling with the paper's top-p / temperature)."""
    torch.manual_seed(seed)
    responses = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=top_p,
                             temperature=temperature, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        responses.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return responses
