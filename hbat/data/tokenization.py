"""Tokenisation and collation shared by every stage (SFT, reward model, DPO, PPO).

Prompt and completion are tokenised separately and concatenated, so the prompt/response boundary is exact
(no merge across it): ``input_ids = prompt_ids + response_ids (+ eos)``. The prompt gets the tokenizer's
special tokens (e.g. BOS), the response none; EOS is appended to the response so models learn to stop.

Truncation to ``max_len`` keeps the start of the response: when prompt + response is too long, the
response keeps ``min(len(response), max(max_len - len(prompt), max_len // 2))`` tokens from its start, and
the prompt is cut from the LEFT (its end, which leads into the response, is kept; a leading BOS stays).

Labels are the response tokens; prompt tokens and padding are -100 (ignored by cross-entropy).

Padding: ``collate(..., padding_side="right")`` (the default) pads after the text; it is what training
uses (SFT, reward model, DPO). ``padding_side="left"`` pads before the text, as generation needs (the
prompts of a PPO batch end in the same column). Padded positions have attention_mask 0 and labels -100.
Models are given ``position_ids = cumsum(attention_mask) - 1`` (see ``position_ids_from_mask``), so left
padding does not shift positions.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

IGNORE_INDEX = -100


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (pad positions are masked, so any id works)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def truncate_pair(prompt_ids: list[int], response_ids: list[int], max_len: int,
                  bos_id: int | None = None) -> tuple[list[int], list[int]]:
    """Cut (prompt, response) to at most ``max_len`` tokens keeping the response start (module docstring)."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if len(prompt_ids) + len(response_ids) <= max_len:
        return prompt_ids, response_ids
    response_keep = min(len(response_ids), max(max_len - len(prompt_ids), max_len // 2))
    prompt_keep = max_len - response_keep
    if prompt_keep == 0:
        prompt_ids = []
    elif bos_id is not None and prompt_ids and prompt_ids[0] == bos_id and prompt_keep > 1:
        prompt_ids = [bos_id] + prompt_ids[len(prompt_ids) - prompt_keep + 1:]
    else:
        prompt_ids = prompt_ids[len(prompt_ids) - prompt_keep:]
    return prompt_ids, response_ids[:response_keep]


def _encode_pair(tokenizer, prompt: str, response: str, max_len: int, add_eos: bool) -> dict:
    prompt_ids = _ids(tokenizer, prompt, special=True)
    response_ids = _ids(tokenizer, response, special=False)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        response_ids.append(int(eos))
    prompt_ids, response_ids = truncate_pair(prompt_ids, response_ids, max_len, getattr(tokenizer, "bos_token_id", None))
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def encode_sft(tokenizer, rows: Iterable[dict], max_len: int, *, add_eos: bool = True) -> list[dict]:
    """Rows ``{prompt, response}`` -> ``[{"input_ids": list[int], "labels": list[int]}]`` (labels -100 on the prompt)."""
    return [_encode_pair(tokenizer, row["prompt"], row["response"], max_len, add_eos) for row in rows]


def encode_preference(tokenizer, rows: Iterable[dict], max_len: int, *, add_eos: bool = True) -> list[dict]:
    """Rows ``{prompt, chosen, rejected}`` -> ``[{chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels}]``."""
    encoded = []
    for row in rows:
        chosen = _encode_pair(tokenizer, row["prompt"], row["chosen"], max_len, add_eos)
        rejected = _encode_pair(tokenizer, row["prompt"], row["rejected"], max_len, add_eos)
        encoded.append({
            "chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
            "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
        })
    return encoded


def encode_prompts(tokenizer, prompts: Iterable[dict | str], max_len: int) -> list[list[int]]:
    """Prompts (rows ``{prompt}`` or strings) -> token ids, cut from the left to ``max_len`` (BOS kept)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    encoded = []
    for prompt in prompts:
        text = prompt["prompt"] if isinstance(prompt, dict) else prompt
        ids, _ = truncate_pair(_ids(tokenizer, text, special=True), [], max_len, bos)
        encoded.append(ids)
    return encoded


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int, *, padding_side: str = "right",
                  length: int | None = None) -> torch.Tensor:
    """Stack lists of ints into a LongTensor [B, length] (default: the longest)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    longest = max((len(s) for s in sequences), default=0)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest sequence ({longest})")
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            values = torch.as_tensor(list(seq), dtype=torch.long)
            if padding_side == "right":
                out[i, :len(seq)] = values
            else:
                out[i, length - len(seq):] = values
    return out


def collate(batch: Sequence[dict], pad_id: int, *, padding_side: str = "right",
            length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad encoded rows into ``{"input_ids", "attention_mask"[, "labels"]}`` LongTensors [B, L]."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    ids = [row["input_ids"] for row in batch]
    out = {
        "input_ids": pad_sequences(ids, pad_id, padding_side=padding_side, length=length),
        "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, padding_side=padding_side, length=length),
    }
    if "labels" in batch[0]:
        out["labels"] = pad_sequences([row["labels"] for row in batch], IGNORE_INDEX,
                                      padding_side=padding_side, length=length)
    return out


def collate_preference(batch: Sequence[dict], pad_id: int, *, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded preference rows; chosen and rejected get the SAME length so they can be concatenated.

    Returns ``chosen_input_ids, chosen_attention_mask, chosen_labels`` and the ``rejected_*`` three.
    """
    length = max(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in batch)
    out = {}
    for side in ("chosen", "rejected"):
        rows = [{"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"]} for r in batch]
        for key, value in collate(rows, pad_id, padding_side=padding_side, length=length).items():
            out[f"{side}_{key}"] = value
    return out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens (0 at the first real token; 0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
