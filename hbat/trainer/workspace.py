"""Everything the methods of one comparison share: tokenizer, base model, data splits, SFT reference, reward model.

``prepare(cfg)`` builds them once (the embedded task, or the user's model and data) and caches the trained
pieces, and the token ids of the user's data (``shared/tokens/``), under ``<output_dir>/shared/`` (atomic files
with checksums, hbat.trainer.checkpoint), so that several methods, and a resumed run, start from the very same
base weights, reward model and data. The data (``load_data``, hbat.trainer.rundata) is read and checked against
the config before any model is built; a cached file that fails its check is an error (never rebuilt silently);
a piece whose training diverges is not cached (TrainingDiverged).

Models (hbat.trainer.models): every one in ``model.dtype``; ``model.sft_path`` / ``model.reward_path`` are
loaded instead of trained (and not cached); with LoRA the shared SFT and reward models are trained with
adapters and merged. Before any model is loaded, the run's memory plan must fit the device
(hbat.trainer.memory); the user's models are all loaded, their weights checked against their config.json
(``load_pretrained``), before anything trains.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from ..task import build_model, build_tokenizer, pretrain
from .checkpoint import CheckpointError, load, remove_stale_temp_files, save_atomic
from .config import TrainConfig
from .ds_config import run_ds_config
from .guards import TrainingDiverged, check_weights
from .memory import plan_memory
from .models import (has_tokenizer, load_causal_lm, load_pretrained, load_tokenizer, merge_lora, pick_device,
                     prepare_trainee, resolve_dtype)
from .procgroup import barrier, init_distributed, is_main
from .reward import RetokenizedRewardModel, RewardModel, train_reward_model
from .rundata import RunData, attach_cached_token_ids, data_tokenizer, load_data
from .sft import run_sft
from .optimizer import drop_master_weights
from .validate import check_data


@dataclass
class Workspace:
    tokenizer: object
    base_state: dict                  # weights every method starts from (CPU)
    build: Callable[[], torch.nn.Module]  # a fresh trainee from base_state on ``device`` (hbat.trainer.models)
    sft_train: list[dict]
    sft_val: list[dict]
    pref_train: list[dict]
    pref_val: list[dict]
    prompts_train: list[dict]
    prompts_val: list[dict]
    sft_model: torch.nn.Module        # frozen; SFT on all SFT data (or model.sft_path): the KL / win-rate reference,
    #                                   the reward model's initialisation
    reward_model: torch.nn.Module     # frozen (or model.reward_path); judges validation reward (keep-best) and PPO
    device: torch.device
    exact_match: Callable | None = None       # the embedded task's exact checks (None for user data)
    preference_score: Callable | None = None
    info: dict | None = None


def shared_key(cfg: TrainConfig) -> str:
    """Cache key of the shared pieces: a hash of the settings they depend on (a changed setting rebuilds)."""
    relevant = {"seed": cfg.seed, "model": asdict(cfg.model), "data": asdict(cfg.data), "sft": asdict(cfg.sft),
                "reward": asdict(cfg.reward)}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]


CACHE_REMEDY = "delete it (the shared pieces are rebuilt from the config on the next run)"


def prepare(cfg: TrainConfig, *, progress: bool = True, log=None, data: RunData | None = None) -> Workspace:
    """Build or load the shared pieces of a run (see the module docstring) from ``data`` (default:
    ``load_data(cfg)``), which is checked against ``cfg`` (hbat.trainer.validate.check_data) first.

    Under DeepSpeed (``cfg.deepspeed``) rank 0 builds and caches them first while the other ranks wait at a
    barrier, then those load the cache: every rank holds identical data, base weights and judges.
    """
    if cfg.deepspeed is None:
        return _prepare(cfg, progress=progress, log=log, data=data)

    init_distributed()
    run_ds_config(cfg)  # a bad DeepSpeed config fails now, not after the shared pieces are trained
    if not is_main():
        barrier()  # rank 0 is building the cache (the default process-group timeout is 30 minutes)
    ws = _prepare(cfg, progress=progress and is_main(), log=log if is_main() else None, data=data)
    if is_main():
        barrier()
    return ws


def _prepare(cfg: TrainConfig, *, progress: bool, log, data: RunData | None) -> Workspace:
    data = data or load_data(cfg)
    check_data(data.splits, cfg, data.sources)  # before any model is built
    plan_memory(cfg).check()  # every model and state the run holds, sized from configs: before any is loaded
    shared = os.path.join(cfg.output_dir, "shared", shared_key(cfg))
    os.makedirs(shared, exist_ok=True)
    remove_stale_temp_files(shared)
    device = pick_device()
    dtype = resolve_dtype(cfg)
    tokenizer, fresh = _embedded_model(cfg) if cfg.model.path is None else _user_model(cfg)
    attach_cached_token_ids(cfg, data, tokenizer, progress=progress)  # before any model: tokenised once, cached
    # the user's models are loaded (their weights checked against their config.json) before anything trains
    own_sft = None if cfg.model.sft_path is None else load_causal_lm(cfg.model.sft_path, dtype,
                                                                     key="config.model.sft_path")
    own_reward = None if cfg.model.reward_path is None else _load_reward_model(cfg, tokenizer, dtype)
    base_state = _base_weights(cfg, shared, tokenizer, fresh, data, dtype, progress, log)

    def build_plain() -> torch.nn.Module:
        model = fresh().to(dtype=dtype)
        model.load_state_dict(base_state)
        return model.to(device)

    def build() -> torch.nn.Module:  # what a method trains: gradient checkpointing and LoRA as configured
        return prepare_trainee(build_plain(), cfg.model, seed=cfg.seed)

    sft_model = _sft_model(cfg, shared, build_plain, tokenizer, data, own_sft, device, progress, log)
    reward_model = _reward_model(cfg, shared, sft_model, tokenizer, data, own_reward, device, progress, log)
    return Workspace(tokenizer=tokenizer, base_state=base_state, build=build, sft_model=sft_model,
                     reward_model=reward_model, device=device, exact_match=data.exact_match,
                     preference_score=data.preference_score, info=data.info, **data.splits)


def _sft_model(cfg, shared, build_plain, tokenizer, data, own_sft, device, progress, log) -> torch.nn.Module:
    """``model.sft_path`` (``own_sft``, loaded), or the base trained on all SFT data once and cached (LoRA: merged)."""
    if own_sft is not None:
        sft_model = own_sft.to(device)
    else:
        sft_model = build_plain()

        def train():
            trainee = prepare_trainee(sft_model, cfg.model, seed=cfg.seed)
            run_sft(trainee, tokenizer, data.splits["sft_train"], replace(cfg.sft, seed=cfg.seed), log=log,
                    progress=progress)
            merge_lora(trainee)  # sft_model holds the trained weights, plain
            drop_master_weights(sft_model)

        _cached(os.path.join(shared, "sft.pt"), sft_model, train, "the shared SFT reference", "sft.lr")
    return sft_model.eval().requires_grad_(False)


def _load_reward_model(cfg, tokenizer, dtype) -> torch.nn.Module:
    """``model.reward_path`` loaded (its weights checked), re-tokenizing with its own tokenizer where it has
    another one (on the CPU)."""
    path = cfg.model.reward_path
    classifier = load_pretrained("AutoModelForSequenceClassification", path, dtype, key="config.model.reward_path",
                                 what="a sequence classifier (reward model)")
    reward_model = RewardModel.from_sequence_classifier(classifier)
    own = load_tokenizer(path, key="config.model.reward_path") if has_tokenizer(path) else None
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        reward_model = RetokenizedRewardModel(reward_model, own, tokenizer, cfg.reward.max_len)
    return reward_model


def _reward_model(cfg, shared, sft_model, tokenizer, data, own_reward, device, progress, log) -> torch.nn.Module:
    """``model.reward_path`` (``own_reward``, loaded), or a reward model initialised from the SFT model (a new
    score head on its backbone), trained once and cached (LoRA: merged)."""
    if own_reward is not None:
        return own_reward.to(device).eval().requires_grad_(False)
    reward_model = RewardModel.from_causal_lm(sft_model).to(device)
    reward_model.requires_grad_(True)

    def train():
        reward_model.backbone = prepare_trainee(reward_model.backbone, cfg.model, seed=cfg.seed, task_type=None)
        train_reward_model(reward_model, tokenizer, data.splits["pref_train"], replace(cfg.reward, seed=cfg.seed),
                           log=log, progress=progress)
        reward_model.backbone = merge_lora(reward_model.backbone)
        drop_master_weights(reward_model)

    _cached(os.path.join(shared, "reward_model.pt"), reward_model, train, "the shared reward model", "reward.lr")
    return reward_model.eval().requires_grad_(False)


def _base_weights(cfg: TrainConfig, shared: str, tokenizer, fresh, data: RunData, dtype, progress: bool,
                  log) -> dict:
    """The weights every method starts from (CPU, in ``dtype``): the user's model as loaded, or the embedded model
    pre-trained once (in fp32) and cached like the other pieces."""
    base = fresh()
    if cfg.model.path is None:
        def pretrain_base():
            if cfg.model.pretrain_steps:
                pretrain(base, tokenizer, data.pretrain_texts, steps=cfg.model.pretrain_steps,
                         batch_size=cfg.model.pretrain_batch_size, lr=cfg.model.pretrain_lr, seed=cfg.seed,
                         progress=progress, log=log)

        _cached(os.path.join(shared, "base.pt"), base, pretrain_base, "the shared base model", "model.pretrain_lr")
    return {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype).clone()
            for k, v in base.state_dict().items()}


def _embedded_model(cfg: TrainConfig):
    tokenizer = build_tokenizer()
    return tokenizer, lambda: build_model(tokenizer, size=cfg.model.size, seed=cfg.seed)


def _user_model(cfg: TrainConfig):
    tokenizer = data_tokenizer(cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, lambda: load_causal_lm(cfg.model.path, resolve_dtype(cfg), key="config.model.path")


def _cached(path: str, module: torch.nn.Module, train: Callable[[], object], what: str, lr_key: str) -> None:
    """Load ``module``'s weights from the cache file ``path`` (checked), or ``train()`` it and cache the weights,
    which must be finite."""
    if os.path.exists(path):
        state = load(path, remedy=CACHE_REMEDY)
        try:
            module.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: does not fit the model ({str(exc).splitlines()[0]}); "
                                  f"{CACHE_REMEDY}") from None
        return
    try:
        train()
    except FloatingPointError as exc:  # TrainingDiverged (which names the lr to lower), or pre-training's own
        hint = "" if isinstance(exc, TrainingDiverged) else f" (a smaller {lr_key} may help)"
        raise TrainingDiverged(f"{what}: {exc}{hint}") from None
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    check_weights(state, what)
    save_atomic(state, path)
