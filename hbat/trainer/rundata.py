"""The data of a run, read and checked before any model is built: ``load_data(cfg)`` gives the embedded task, or
the user's data (files, folders, data set names; conversations rendered with the model's chat template), split
into training and validation rows, with errors naming the file and line or row, or the config key.
``attach_cached_token_ids`` then gives the user's rows their token ids, tokenised once and cached in
``<output_dir>/shared/tokens/``. The models built on this data: ``hbat.trainer.workspace``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..data import (attach_token_ids, load_preference, load_prompts, load_sft, SourceUnreadable, SplitError,
                    token_cache_key, tokenize_rows, train_val_split)
from ..task import make_task
from .checkpoint import CheckpointError, load, remove_stale_temp_files, save_atomic
from .checks import ConfigError
from .config import TrainConfig
from .models import load_tokenizer


@dataclass
class RunData:
    """The data of a run, read before any model is built (``load_data``)."""

    splits: dict[str, list[dict]]     # sft_train, sft_val, pref_train, pref_val, prompts_train, prompts_val
    sources: dict[str, str]           # "sft" / "pref" / "prompts" -> where the set comes from (for errors)
    exact_match: Callable | None = None
    preference_score: Callable | None = None
    info: dict | None = None
    pretrain_texts: list[str] | None = None  # the embedded task's pre-training text


def load_data(cfg: TrainConfig) -> RunData:
    """The embedded task, or the user's data (files, folders, data set names; conversations rendered with the
    model's chat template) split into training and validation rows; errors name the file and line or row, or
    the config key."""
    return _embedded_data(cfg) if cfg.model.path is None else _user_data(cfg)


def _embedded_data(cfg: TrainConfig) -> RunData:
    d = cfg.data
    try:
        task = make_task(seed=cfg.seed, n_sft=d.task_n_sft, n_pref=d.task_n_pref, n_prompts=d.task_n_pref // 2,
                         n_val=d.task_n_val, conflict=d.task_conflict)
    except ValueError as exc:
        raise ConfigError("config.data.task_n_sft", f"+ task_n_pref + task_n_val ask too much of the embedded task "
                          f"({exc})") from None
    splits = dict(sft_train=task.sft_train, sft_val=task.sft_val, pref_train=task.pref_train, pref_val=task.pref_val,
                  prompts_train=task.prompts_train, prompts_val=task.prompts_val)
    sources = {"sft": f"the embedded task (data.task_n_sft={d.task_n_sft})",
               "pref": f"the embedded task (data.task_n_pref={d.task_n_pref})",
               "prompts": f"the embedded task (data.task_n_pref // 2 = {d.task_n_pref // 2} prompts)"}
    return RunData(splits, sources, task.exact_match, task.preference_score, task.stats(), task.pretrain_texts)


def _user_data(cfg: TrainConfig) -> RunData:
    d = cfg.data
    tokenizer = data_tokenizer(cfg)  # renders conversational rows with its chat template
    sets = {}
    for kind, key, loader in (("sft", "sft", load_sft), ("pref", "preference", load_preference),
                              ("prompts", "prompts", load_prompts)):
        source, split = getattr(d, key), getattr(d, f"{key}_split")
        if source is not None:
            rows = _read(loader, key, source, getattr(d, f"{key}_adapter"), split, tokenizer)
            sets[kind] = rows, f"data.{key} ({source}{'' if split == 'train' else f', split {split}'})"
    if "prompts" not in sets:
        sets["prompts"] = [{"prompt": r["prompt"]} for r in sets["pref"][0]], f"the prompts of {sets['pref'][1]}"
    splits = {}
    for kind, (rows, source) in sets.items():
        train, val = _split(rows, d.val_size, cfg.seed, source)
        splits[f"{kind}_train"], splits[f"{kind}_val"] = train, val[:d.max_val]
    return RunData(splits, {kind: source for kind, (_, source) in sets.items()})


def data_tokenizer(cfg: TrainConfig):
    """The tokenizer of the user's model (``model.tokenizer``, else ``model.path``)."""
    if cfg.model.tokenizer is not None:
        return load_tokenizer(cfg.model.tokenizer, key="config.model.tokenizer")
    return load_tokenizer(cfg.model.path, key="config.model.path")


def _read(loader, key: str, source: str, adapter, split: str, tokenizer) -> list[dict]:
    """The rows of ``source``; a missing data set or split is an error naming the config key."""
    try:
        rows = loader(source, adapter=adapter, split=split, tokenizer=tokenizer)
    except SplitError as exc:
        raise ConfigError(f"config.data.{key}_split", f"= {split!r}, but {exc}") from None
    except SourceUnreadable as exc:  # a file the reader cannot read at all (e.g. a corrupt parquet file)
        raise ConfigError(f"config.data.{key}", f"= {exc}") from None
    except (OSError, ImportError) as exc:
        raise ConfigError(f"config.data.{key}", f"= {source}: {exc}") from None
    if not rows:
        raise ConfigError(f"config.data.{key}", f"names {'a file' if os.path.isfile(source) else 'a data set'} with "
                          f"no rows: {source}")
    return rows


def _split(rows: list[dict], val_size: float, seed: int, source: str) -> tuple[list[dict], list[dict]]:
    try:
        return train_val_split(rows, val_size, seed=seed)
    except ValueError:
        raise ConfigError("config.data.val_size", f"= {val_size:g} leaves no training or no validation rows of "
                          f"{source}, which has {len(rows)}") from None


TOKENS_REMEDY = "delete it (the data is tokenised again on the next run)"


def attach_cached_token_ids(cfg: TrainConfig, data: RunData, tokenizer, *, progress: bool) -> None:
    """Give the rows of the user's data (none for the embedded task) their token ids, tokenised once and cached
    in ``<output_dir>/shared/tokens/<key>.pt``, keyed by the rows' text (rendered chat templates included) and
    the tokenizer (hbat.data.token_cache_key): a rerun, and every method of a comparison, reuse the file. The ids
    are whole (each stage cuts them to its own max_len), so one file serves every budget."""
    if cfg.model.path is None:
        return

    folder = os.path.join(cfg.output_dir, "shared", "tokens")
    path = os.path.join(folder, f"{token_cache_key(tokenizer, data.splits)}.pt")
    remove_stale_temp_files(folder)
    if os.path.exists(path):
        packed = load(path, remedy=TOKENS_REMEDY)
    else:
        packed = {name: tokenize_rows(tokenizer, rows, progress=progress, desc=f"tokenize {name}")
                  for name, rows in data.splits.items()}
        save_atomic(packed, path)
    for name, rows in data.splits.items():
        try:
            attach_token_ids(rows, packed[name])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: does not fit the data ({type(exc).__name__}: {exc}); "
                                  f"{TOKENS_REMEDY}") from None
