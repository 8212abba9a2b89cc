"""hbat.data: the data formats of the trainer, loading with precise errors, adapters, splitting, tokenising.

Formats (hbat.data.formats): SFT ``{prompt, response}``, preference ``{prompt, chosen, rejected}``, PPO
``{prompt}``; sources: JSONL files, lists of dicts, ``datasets`` data sets. Adapters for the paper's data
sets (hbat.data.adapters): TL;DR SFT and comparisons, AlpacaFarm instructions and preferences.
Needs torch alone (``datasets`` only when a data set is passed).
"""
from .adapters import ADAPTERS, alpaca_prompt, tldr_prompt
from .errors import DataError
from .formats import load_preference, load_prompts, load_sft, write_jsonl
from .split import split_parts, train_val_split
from .tokenization import (IGNORE_INDEX, collate, collate_preference, encode_preference, encode_prompts, encode_sft,
                       pad_sequences, pad_token_id, position_ids_from_mask, truncate_pair)

__all__ = [
    "ADAPTERS", "DataError", "IGNORE_INDEX", "alpaca_prompt", "collate", "collate_preference", "encode_preference",
    "encode_prompts", "encode_sft", "load_preference", "load_prompts", "load_sft", "pad_sequences", "pad_token_id",
    "position_ids_from_mask", "split_parts", "tldr_prompt", "train_val_split", "truncate_pair", "write_jsonl",
]
