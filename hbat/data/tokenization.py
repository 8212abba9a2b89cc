"""Tokenisation and collation shared by every stage (SFT, reward model, DPO, PPO).

Prompt and completion are tokenised separately and concatenated, so the prompt/response boundary is exact
(no merge across it): ``input_ids = prompt_ids + response_ids (+ eos)``. The prompt gets the tokenizer's
special tokens (e.g. BOS), the response none; EOS is appended to the response, unless it already ends with
it (a chat template's), so models learn to stop.

Rows may carry their token ids, ``row["token_ids"] = {field: ids}`` (``attach_token_ids``, from
``tokenize_rows``: tokenised once, e.g. cached by the trainer); the encode functions then use those ids instead
of tokenising the text again. They are the ids the text gives (the prompt with special tokens, a completion
without, no EOS), so a row encodes the same either way.

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

import hashlib
import json
from typing import Iterable, Sequence

import torch

IGNORE_INDEX = -100
TOKEN_IDS = "token_ids"                          # a row's token ids per text field (attach_token_ids)
TEXT_FIELDS = ("prompt", "response", "chosen", "rejected")  # the prompt gets special tokens, the others none
TOKEN_CACHE_VERSION = 1


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (pad positions are masked, so any id works)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _field_ids(tokenizer, row: dict, field: str) -> list[int]:
    """The token ids of ``row[field]``: those the row carries (``row["token_ids"]``), else the tokenizer's."""
    carried = row.get(TOKEN_IDS)
    if carried is not None and field in carried:
        ids = carried[field]
        return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return _ids(tokenizer, row[field], special=field == "prompt")


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


def _encode_pair(tokenizer, row: dict, completion: str, max_len: int, add_eos: bool) -> dict:
    prompt_ids = _field_ids(tokenizer, row, "prompt")
    response_ids = _field_ids(tokenizer, row, completion)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None and response_ids[-1:] != [int(eos)]:
        response_ids.append(int(eos))
    prompt_ids, response_ids = truncate_pair(prompt_ids, response_ids, max_len, getattr(tokenizer, "bos_token_id", None))
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def encode_sft(tokenizer, rows: Iterable[dict], max_len: int, *, add_eos: bool = True) -> list[dict]:
    """Rows ``{prompt, response}`` -> ``[{"input_ids": list[int], "labels": list[int]}]`` (labels -100 on the prompt)."""
    return [_encode_pair(tokenizer, row, "response", max_len, add_eos) for row in rows]


def encode_preference(tokenizer, rows: Iterable[dict], max_len: int, *, add_eos: bool = True) -> list[dict]:
    """Rows ``{prompt, chosen, rejected}`` -> ``[{chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels}]``."""
    encoded = []
    for row in rows:
        chosen = _encode_pair(tokenizer, row, "chosen", max_len, add_eos)
        rejected = _encode_pair(tokenizer, row, "rejected", max_len, add_eos)
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
        row = prompt if isinstance(prompt, dict) else {"prompt": prompt}
        ids, _ = truncate_pair(_field_ids(tokenizer, row, "prompt"), [], max_len, bos)
        encoded.append(ids)
    return encoded


def tokenize_rows(tokenizer, rows: Sequence[dict], *, progress: bool = False, desc: str = "tokenize",
                  batch_size: int = 1024) -> dict[str, dict[str, torch.Tensor]]:
    """The token ids of the text fields of ``rows`` (those of TEXT_FIELDS the first row has), packed per field:
    ``{field: {"values": int32 [all ids], "offsets": int64 [len(rows) + 1]}}``, row i's ids being
    ``values[offsets[i]:offsets[i + 1]]``. Tokenised as the encode functions do (the prompt with the tokenizer's
    special tokens, completions without, no EOS), ``batch_size`` texts per call of a Hugging Face tokenizer;
    a tqdm bar over the rows unless ``progress`` is False."""
    from tqdm.auto import tqdm

    fields = [field for field in TEXT_FIELDS if rows and field in rows[0]]
    ids: dict[str, list[torch.Tensor]] = {field: [] for field in fields}
    lengths: dict[str, list[int]] = {field: [] for field in fields}
    with tqdm(total=len(rows), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            for field in fields:
                encoded = tokenizer([row[field] for row in batch], add_special_tokens=field == "prompt")["input_ids"]
                ids[field] += [torch.tensor(row_ids, dtype=torch.int32) for row_ids in encoded]
                lengths[field] += [len(row_ids) for row_ids in encoded]
            bar.update(len(batch))
    return {field: {"values": torch.cat(ids[field]) if ids[field] else torch.zeros(0, dtype=torch.int32),
                    "offsets": torch.tensor([0] + lengths[field], dtype=torch.int64).cumsum(0)}
            for field in fields}


def attach_token_ids(rows: Sequence[dict], packed: dict[str, dict[str, torch.Tensor]]) -> None:
    """Give every row its ids from ``packed`` (``tokenize_rows``) as ``row["token_ids"]``: views, no copies."""
    for field, part in packed.items():
        if len(part["offsets"]) != len(rows) + 1:
            raise ValueError(f"token ids of {len(part['offsets']) - 1} rows for {len(rows)} rows (field {field!r})")
    bounds = {field: part["offsets"].tolist() for field, part in packed.items()}
    for index, row in enumerate(rows):
        row[TOKEN_IDS] = {field: part["values"][bounds[field][index]:bounds[field][index + 1]]
                          for field, part in packed.items()}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokenizer's ids: its class, its whole ``tokenizers`` state (vocabulary,
    normaliser, pre-tokenizer, added tokens, post-processor with its BOS / EOS) or, for a slow tokenizer, its
    vocabulary, and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256("\0".join([type(tokenizer).__name__, state, special]).encode()).hexdigest()


def token_cache_key(tokenizer, sets: dict[str, Sequence[dict]]) -> str:
    """A key for the token ids of ``sets`` (name -> rows): it changes with any text, row order or the tokenizer."""
    digest = hashlib.sha256(f"hbat token ids v{TOKEN_CACHE_VERSION}\0{tokenizer_fingerprint(tokenizer)}".encode())
    for name in sorted(sets):
        digest.update(f"\0set {name} {len(sets[name])}".encode())
        for row in sets[name]:
            digest.update(json.dumps([row.get(field) for field in TEXT_FIELDS], ensure_ascii=False).encode())
    return digest.hexdigest()[:20]


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
