"""The whole resolved config, checked when it is loaded: what the fields' own checks cannot see.

``check_config(cfg)`` (run by ``load_config``):

- data and model agree: data (``data.sft`` ..., a split other than "train") needs ``model.path``, and
  ``model.path`` needs ``data.sft`` and ``data.preference``; the model folder (with its config.json), the
  tokenizer folder and the data files or folders exist (a data set name is resolved when the data is read);
  ``data.prompts_split`` needs ``data.prompts``;
- every token budget fits the model's context (``max_position_embeddings`` or the like in its config.json,
  or the embedded model's): ``sft.max_len``, ``reward.max_len``, ``dpo.max_len``, PPO's prompt plus response,
  and evaluation's prompt (at most ``EVAL_PROMPT_LEN`` tokens) plus ``eval.max_new_tokens``;
- ``ewc.include`` / ``ewc.exclude`` select a parameter of the model (names from an empty "meta" copy);
- under DeepSpeed, what the trainer refuses there (``hbat.trainer.engine.check_supported``).

``check_data(splits, cfg, sources)`` checks the data once it is read, before any model is built: each
training set has at least ``n_parts`` rows.
"""
from __future__ import annotations

import json
import os

from .checks import ConfigError

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
DATA_FILES = ("sft", "preference", "prompts")
USER_DATA_KEYS = DATA_FILES + ("sft_adapter", "preference_adapter", "prompts_adapter")
DATA_SPLITS = tuple(f"{key}_split" for key in DATA_FILES)
DEFAULT_SPLIT = "train"


def check_config(cfg) -> None:
    from .methods import spec

    _check_data_and_model(cfg)
    context, source = model_context(cfg)
    if context is not None:
        _check_context(cfg, context, source)
    method = spec(cfg.method)
    if method.regularizer in ("hbat", "freeze") and (cfg.ewc.include or cfg.ewc.exclude):
        _check_selection(cfg)
    if cfg.deepspeed is not None:
        from .engine import check_supported

        check_supported(cfg, method.regularizer)


def _check_data_and_model(cfg) -> None:
    d = cfg.data
    if cfg.model.path is None:
        given = [f"data.{key}" for key in USER_DATA_KEYS if getattr(d, key) is not None]
        given += [f"data.{key}" for key in DATA_SPLITS if getattr(d, key) != DEFAULT_SPLIT]
        if given:
            raise ConfigError("config.model.path", f"is null (the embedded task), but {', '.join(given)} "
                              f"{'is' if len(given) == 1 else 'are'} set and would be ignored; set model.path to a "
                              "local transformers model folder, or remove them")
        if cfg.model.tokenizer is not None:
            raise ConfigError("config.model.tokenizer", "is set but model.path is null (the embedded task has its "
                              "own tokenizer)")
        return
    missing = [f"data.{key}" for key in ("sft", "preference") if getattr(d, key) is None]
    if missing:
        raise ConfigError("config.model.path", f"is set, so data.sft and data.preference must name JSONL files "
                          f"({', '.join(missing)} {'is' if len(missing) == 1 else 'are'} null) or other data (JSON or "
                          "parquet files, save_to_disk folders, data set names)")
    for key in ("path", "tokenizer"):
        folder = getattr(cfg.model, key)
        if folder is not None and not os.path.isdir(folder):
            raise ConfigError(f"config.model.{key}", f"is not a folder: {folder}")
    if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError("config.model.path", f"has no config.json (expected a save_pretrained model folder): "
                          f"{cfg.model.path}")
    _check_data_sources(d)


def _check_data_sources(d) -> None:
    from ..data.sources import DATA_FILE_SUFFIXES, looks_like_dataset_name

    if d.prompts is None and d.prompts_split != DEFAULT_SPLIT:
        raise ConfigError("config.data.prompts_split", f"= {d.prompts_split!r} is set but data.prompts is null (the "
                          "prompts come from data.preference, split data.preference_split)")
    for key in DATA_FILES:
        source = getattr(d, key)
        if source is None or os.path.exists(source) or looks_like_dataset_name(source):
            continue
        if source.lower().endswith(DATA_FILE_SUFFIXES):
            raise ConfigError(f"config.data.{key}", f"is not a file: {source}")
        raise ConfigError(f"config.data.{key}", f"is not a file, a folder or a data set name: {source}")


def model_context(cfg) -> tuple[int | None, str]:
    """(tokens the model can attend to, where that number comes from); (None, "") when its config has none."""
    if cfg.model.path is None:
        from ..task import CONTEXT

        return CONTEXT, "the embedded model's context"
    path = os.path.join(cfg.model.path, "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (ValueError, OSError) as exc:
        raise ConfigError("config.model.path", f"has an unreadable config.json ({path}: {exc})") from None
    sections = [config, config.get("text_config")] if isinstance(config, dict) else []
    for section in sections:
        for key in CONTEXT_KEYS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"{key} in {path}"
    return None, ""


def _check_context(cfg, context: int, source: str) -> None:
    from .evaluate import EVAL_PROMPT_LEN
    from .methods import spec

    method = spec(cfg.method)
    budgets = [("sft.max_len", cfg.sft.max_len), ("reward.max_len", cfg.reward.max_len)]
    if method.hpa and cfg.hpa == "ppo":
        budgets.append(("ppo.max_prompt_len + ppo.max_new_tokens", cfg.ppo.max_prompt_len + cfg.ppo.max_new_tokens))
    if method.hpa and cfg.hpa == "dpo" or method.mix == "hpa_in_sft":
        budgets.append(("dpo.max_len", cfg.dpo.max_len))
    budgets.append((f"eval.max_new_tokens + {EVAL_PROMPT_LEN} (the evaluation's prompt limit)",
                    cfg.eval.max_new_tokens + EVAL_PROMPT_LEN))
    for key, tokens in budgets:
        if tokens > context:
            raise ConfigError(f"config.{key}", f"= {tokens} tokens exceeds the model's context of {context} "
                              f"({source}); lower it")


def _check_selection(cfg) -> None:
    from ..param_view import LocalParamView

    named = named_parameters(cfg)
    try:
        LocalParamView(named, include=cfg.ewc.include, exclude=cfg.ewc.exclude)
    except ValueError:
        chosen = f"{cfg.ewc.include}" + (f" without ewc.exclude {cfg.ewc.exclude}" if cfg.ewc.exclude else "")
        raise ConfigError("config.ewc.include", f"{chosen} selects no parameter of the model (its names look like "
                          f"{named[0][0]!r})") from None


def named_parameters(cfg) -> list:
    """(name, parameter) pairs of the run's model, built on the "meta" device: no memory, no weights read."""
    import torch

    with torch.device("meta"):
        if cfg.model.path is None:
            from ..task import build_model, build_tokenizer

            model = build_model(build_tokenizer(), size=cfg.model.size)
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.path))
    return list(model.named_parameters())


def check_data(splits: dict, cfg, sources: dict[str, str]) -> None:
    """Each training set of ``splits`` (``sft_train``, ``pref_train``, ``prompts_train``) has ``n_parts`` rows;
    ``sources`` names where each set comes from (``{"sft": "data.sft (path)", ...}``)."""
    for kind in ("sft", "pref", "prompts"):
        rows = len(splits[f"{kind}_train"])
        if rows < cfg.n_parts:
            raise ConfigError("config.n_parts", f"= {cfg.n_parts} needs at least {cfg.n_parts} training rows in each "
                              f"data set, but {sources[kind]} has {rows}; lower n_parts or add rows")
