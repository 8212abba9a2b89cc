"""The whole resolved config, checked when it is loaded: what the fields' own checks cannot see.

``check_config(cfg)`` (run by ``load_config``):

- data and model agree: data (``data.sft`` ..., a split other than "train") needs ``model.path``, and
  ``model.path`` needs ``data.sft`` and ``data.preference``; the model folder (with its config.json), the
  tokenizer folder and the data files or folders exist (a data set name is resolved when the data is read);
  ``data.prompts_split`` needs ``data.prompts``;
- every token budget fits the model's context (``max_position_embeddings`` or the like in its config.json,
  or the embedded model's): ``sft.max_len``, ``reward.max_len``, ``dpo.max_len``, PPO's prompt plus response,
  and the evaluation's ``eval.max_prompt_len`` plus ``eval.max_new_tokens``;
- ``ewc.include`` / ``ewc.exclude`` select a parameter of the model (names from an empty "meta" copy);
- your own models: ``model.sft_path`` and ``model.reward_path`` need ``model.path`` and are model folders of
  the right kind (a causal LM; a sequence classifier with one label) sharing the policy's vocabulary (the
  reward model may bring its own tokenizer instead); the policy's vocabulary (``vocab_size`` of its
  config.json) holds every id of its tokenizer, and so does a reward model's with a tokenizer of its own;
  LoRA needs peft and target modules the model has; gradient checkpointing a model that supports it;
- under DeepSpeed, what the trainer refuses there (``hbat.trainer.ds_config.check_supported``).

``check_data(splits, cfg, sources)`` checks the data once it is read, before any model is built: each
training set has at least ``n_parts`` rows.
"""
from __future__ import annotations

import json
import os

import torch

from ..data.sources import DATA_FILE_SUFFIXES, looks_like_dataset_name
from ..param_view import LocalParamView
from ..task import CONTEXT
from .checks import ConfigError
from .ds_config import check_supported
from .memory import lora_numel, meta_policy
from .methods import spec
from .models import has_tokenizer, load_tokenizer, resolve_dtype, tokenizer_size

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
DATA_FILES = ("sft", "preference", "prompts")
USER_DATA_KEYS = DATA_FILES + ("sft_adapter", "preference_adapter", "prompts_adapter")
DATA_SPLITS = tuple(f"{key}_split" for key in DATA_FILES)
DEFAULT_SPLIT = "train"


def check_config(cfg) -> None:
    _check_data_and_model(cfg)
    _check_models(cfg)
    context, source = model_context(cfg)
    if context is not None:
        _check_context(cfg, context, source)
    method = spec(cfg.method)
    if method.regularizer in ("hbat", "freeze") and (cfg.ewc.include or cfg.ewc.exclude):
        _check_selection(cfg)
    if cfg.deepspeed is not None:
        check_supported(cfg, method.regularizer)
    if cfg.ema_anchor and resolve_dtype(cfg) != torch.float32:
        raise ConfigError("config.ema_anchor", "needs float32 weights (model.dtype: float32): the anchor has the "
                          "weights' dtype, and in bfloat16 an update below its resolution is lost")


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


def _config_json(folder: str, key: str) -> dict:
    """The config.json of a transformers model folder named by config key ``key``."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise ConfigError(f"config.{key}", f"is not a folder: {folder}")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config.{key}", f"has no config.json (expected a save_pretrained model folder): "
                          f"{folder}") from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"config.{key}", f"has an unreadable config.json ({path}: {exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config.{key}", f"has a config.json that is not a JSON object: {path}")
    return config


def _vocab(config: dict):
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return text.get("vocab_size")


def _check_models(cfg) -> None:
    """``model.sft_path`` / ``model.reward_path`` (folders of the right kind, sharing the policy's vocabulary
    unless the reward model has its own tokenizer), the vocabularies against the tokenizers, LoRA (peft
    installed, target modules present) and gradient checkpointing (supported by the model)."""
    m = cfg.model
    for key in ("sft_path", "reward_path"):
        if getattr(m, key) is not None and m.path is None:
            raise ConfigError(f"config.model.{key}", "needs model.path (the policy, whose tokenizer it shares): "
                              "your own models come with your own base model")
    if m.sft_path is not None or m.reward_path is not None:
        vocab = _vocab(_config_json(m.path, "model.path"))
    if m.sft_path is not None:
        sft_vocab = _vocab(_config_json(m.sft_path, "model.sft_path"))
        if sft_vocab != vocab:
            raise ConfigError("config.model.sft_path", f"has a vocabulary of {sft_vocab} tokens but model.path has "
                              f"{vocab}: the SFT model must share the policy's tokenizer")
    if m.reward_path is not None:
        config = _config_json(m.reward_path, "model.reward_path")
        kinds = [a for a in config.get("architectures") or [] if str(a).endswith("ForSequenceClassification")]
        labels = len(config.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})
        if not kinds or labels != 1:
            raise ConfigError("config.model.reward_path", f"must be an AutoModelForSequenceClassification saved with "
                              f"num_labels=1, got architectures {config.get('architectures')} with {labels} labels: "
                              f"{m.reward_path}")
        if not has_tokenizer(m.reward_path) and _vocab(config) != vocab:
            raise ConfigError("config.model.reward_path", f"has a vocabulary of {_vocab(config)} tokens but model.path "
                              f"has {vocab}, and no tokenizer of its own: save its tokenizer in {m.reward_path}")
    if m.path is not None:
        tokenizer_key = "model.tokenizer" if m.tokenizer is not None else "model.path"
        _check_vocabulary("model.path", m.path, m.tokenizer or m.path, tokenizer_key)
    if m.reward_path is not None and has_tokenizer(m.reward_path):
        _check_vocabulary("model.reward_path", m.reward_path, m.reward_path, "model.reward_path")
    if m.lora_r:
        try:
            import peft  # noqa: F401  (optional: hbat[lora]; checked here, before any work)
        except ImportError:
            raise ConfigError("config.model.lora_r", "> 0 needs peft: pip install --no-build-isolation "
                              "'hbat[lora]'") from None

        try:
            lora_numel(meta_policy(cfg), m)
        except ValueError as exc:
            raise ConfigError("config.model.lora_target_modules", f"= {m.lora_target_modules} does not fit the "
                              f"model ({' '.join(str(exc).split())[:300]})") from None
    if m.gradient_checkpointing:
        if not getattr(meta_policy(cfg), "supports_gradient_checkpointing", False):
            raise ConfigError("config.model.gradient_checkpointing", "is true but the model does not support it")


def _check_vocabulary(key: str, folder: str, tokenizer_folder: str, tokenizer_key: str) -> None:
    """The model of ``folder`` has an embedding for every id of the tokenizer in ``tokenizer_folder`` (a folder
    without a tokenizer is left to the data loading, which names it)."""
    vocab = _vocab(_config_json(folder, key))
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not has_tokenizer(tokenizer_folder):
        return
    size = _tokenizer_size(tokenizer_folder, tokenizer_key)
    if size > vocab:
        raise ConfigError(f"config.{key}", f"has a vocabulary of {vocab} tokens (vocab_size in "
                          f"{os.path.join(folder, 'config.json')}) but its tokenizer ({tokenizer_folder}) has {size}: "
                          f"token ids from {vocab} on have no embedding; use the tokenizer the model was trained with, "
                          "or resize its embeddings (resize_token_embeddings) and save it again")


_TOKENIZER_SIZES: dict = {}  # (folder, its files' sizes and times) -> ids of the tokenizer there; load_config runs
#                              once per method and per command, the tokenizer is read once


def _tokenizer_size(folder: str, key: str) -> int:
    files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_file())
    cache_key = (os.path.abspath(folder), tuple(files))
    if cache_key not in _TOKENIZER_SIZES:
        _TOKENIZER_SIZES[cache_key] = tokenizer_size(load_tokenizer(folder, key=f"config.{key}"))
    return _TOKENIZER_SIZES[cache_key]


def model_context(cfg) -> tuple[int | None, str]:
    """(tokens the model can attend to, where that number comes from); (None, "") when its config has none."""
    if cfg.model.path is None:
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
    method = spec(cfg.method)
    budgets = [("sft.max_len", cfg.sft.max_len), ("reward.max_len", cfg.reward.max_len)]
    if method.hpa and cfg.hpa == "ppo":
        budgets.append(("ppo.max_prompt_len + ppo.max_new_tokens", cfg.ppo.max_prompt_len + cfg.ppo.max_new_tokens))
    if method.hpa and cfg.hpa == "dpo" or method.mix == "hpa_in_sft":
        budgets.append(("dpo.max_len", cfg.dpo.max_len))
    budgets.append(("eval.max_prompt_len + eval.max_new_tokens", cfg.eval.max_prompt_len + cfg.eval.max_new_tokens))
    for key, tokens in budgets:
        if tokens > context:
            raise ConfigError(f"config.{key}", f"= {tokens} tokens exceeds the model's context of {context} "
                              f"({source}); lower {'one of them' if '+' in key else 'it'}")


def _check_selection(cfg) -> None:
    named = named_parameters(cfg)
    try:
        LocalParamView(named, include=cfg.ewc.include, exclude=cfg.ewc.exclude)
    except ValueError:
        chosen = f"{cfg.ewc.include}" + (f" without ewc.exclude {cfg.ewc.exclude}" if cfg.ewc.exclude else "")
        raise ConfigError("config.ewc.include", f"{chosen} selects no parameter of the model (its names look like "
                          f"{named[0][0]!r})") from None


def named_parameters(cfg) -> list:
    """(name, parameter) pairs of the run's model, built on the "meta" device: no memory, no weights read."""
    return list(meta_policy(cfg).named_parameters())


def check_data(splits: dict, cfg, sources: dict[str, str]) -> None:
    """Each training set of ``splits`` (``sft_train``, ``pref_train``, ``prompts_train``) has ``n_parts`` rows;
    ``sources`` names where each set comes from (``{"sft": "data.sft (path)", ...}``)."""
    for kind in ("sft", "pref", "prompts"):
        rows = len(splits[f"{kind}_train"])
        if rows < cfg.n_parts:
            raise ConfigError("config.n_parts", f"= {cfg.n_parts} needs at least {cfg.n_parts} training rows in each "
                              f"data set, but {sources[kind]} has {rows}; lower n_parts or add rows")
