"""hbat.data: the data formats of the trainer, loading with precise errors, adapters, splitting, tokenising.

Formats (hbat.data.formats): SFT ``{prompt, response}``, preference ``{prompt, chosen, rejected}``, PPO
``{prompt}``, and TRL's standard and conversational formats (conversations rendered with the tokenizer's chat
template, hbat.data.chat); sources (hbat.data.sources): JSONL / JSON / parquet files, ``save_to_disk``
folders, data set names ``datasets.load_dataset`` resolves, lists of dicts, ``datasets`` data sets. Adapters
for the paper's data sets (hbat.data.adapters): TL;DR SFT and comparisons, AlpacaFarm instructions and
preferences. Needs torch alone (``datasets`` / pyarrow only for the sources that need them).
"""
from .adapters import ADAPTERS, alpaca_prompt, tldr_prompt
from .errors import DataError, SourceUnreadable, SplitError
from .formats import load_preference, load_prompts, load_sft, write_jsonl
from .split import split_parts, train_val_split
from .tokenization import (IGNORE_INDEX, TOKEN_IDS, attach_token_ids, collate, collate_preference, encode_preference,
                           encode_prompts, encode_sft, pad_sequences, pad_token_id, position_ids_from_mask,
                           token_cache_key, tokenize_rows, truncate_pair)

__all__ = [
    "ADAPTERS", "DataError", "IGNORE_INDEX", "SourceUnreadable", "SplitError", "TOKEN_IDS", "alpaca_prompt", "attach_token_ids", "collate",
    "collate_preference", "encode_preference", "encode_prompts", "encode_sft", "load_preference", "load_prompts",
    "load_sft", "pad_sequences", "pad_token_id", "position_ids_from_mask", "split_parts", "tldr_prompt",
    "token_cache_key", "tokenize_rows", "train_val_split", "truncate_pair", "write_jsonl",
]
