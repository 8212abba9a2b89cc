"""Everything the methods of one comparison share: tokenizer, base model, data splits, SFT reference, reward model.

``prepare(cfg)`` builds them once (the embedded task, or the user's model and JSONL files) and caches the
trained pieces under ``<output_dir>/shared/`` (atomic files), so that several methods, and a resumed run,
start from the very same base weights, reward model and data.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .checkpoint import load, save_atomic
from .config import TrainConfig


@dataclass
class Workspace:
    tokenizer: object
    base_state: dict                  # weights every method starts from (CPU)
    build: Callable[[], torch.nn.Module]  # a fresh model with base_state, on ``device``
    sft_train: list[dict]
    sft_val: list[dict]
    pref_train: list[dict]
    pref_val: list[dict]
    prompts_train: list[dict]
    prompts_val: list[dict]
    sft_model: torch.nn.Module        # SFT on all SFT data: the KL reference, the reward model's initialisation
    reward_model: torch.nn.Module     # frozen; judges validation reward (keep-best) and PPO
    device: torch.device
    exact_match: Callable | None = None       # the embedded task's exact checks (None for user data)
    preference_score: Callable | None = None
    info: dict | None = None


def pick_device() -> torch.device:
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:  # one GPU per rank (torchrun / deepspeed)
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _embedded(cfg: TrainConfig, shared: str, progress: bool, log):
    from ..task import build_model, build_tokenizer, make_task, pretrain

    d = cfg.data
    task = make_task(seed=cfg.seed, n_sft=d.task_n_sft, n_pref=d.task_n_pref, n_prompts=d.task_n_pref // 2,
                     n_val=d.task_n_val, conflict=d.task_conflict)
    tokenizer = build_tokenizer()
    size = cfg.model.size

    def fresh():
        return build_model(tokenizer, size=size, seed=cfg.seed)

    path = os.path.join(shared, "base.pt")
    if os.path.exists(path):
        base_state = load(path)
    else:
        model = fresh()
        if cfg.model.pretrain_steps:
            pretrain(model, tokenizer, task.pretrain_texts, steps=cfg.model.pretrain_steps,
                     batch_size=cfg.model.pretrain_batch_size, lr=cfg.model.pretrain_lr, seed=cfg.seed,
                     progress=progress, log=log)
        base_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        save_atomic(base_state, path)
    data = dict(sft_train=task.sft_train, sft_val=task.sft_val, pref_train=task.pref_train, pref_val=task.pref_val,
                prompts_train=task.prompts_train, prompts_val=task.prompts_val)
    return tokenizer, fresh, base_state, data, task.exact_match, task.preference_score, task.stats()


def _user(cfg: TrainConfig, shared: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import load_preference, load_prompts, load_sft, train_val_split

    d = cfg.data
    if not d.sft or not d.preference:
        raise ValueError("with model.path set, data.sft and data.preference must name JSONL files")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def fresh():
        return AutoModelForCausalLM.from_pretrained(cfg.model.path, torch_dtype=torch.float32)

    base_state = {k: v.detach().cpu().clone() for k, v in fresh().state_dict().items()}
    sft = load_sft(d.sft, adapter=d.sft_adapter)
    pref = load_preference(d.preference, adapter=d.preference_adapter)
    prompts = load_prompts(d.prompts, adapter=d.prompts_adapter) if d.prompts else \
        [{"prompt": r["prompt"]} for r in pref]
    sft_train, sft_val = train_val_split(sft, d.val_size, seed=cfg.seed)
    pref_train, pref_val = train_val_split(pref, d.val_size, seed=cfg.seed)
    prompts_train, prompts_val = train_val_split(prompts, d.val_size, seed=cfg.seed)
    cap = d.max_val
    data = dict(sft_train=sft_train, sft_val=sft_val[:cap], pref_train=pref_train, pref_val=pref_val[:cap],
                prompts_train=prompts_train, prompts_val=prompts_val[:cap])
    return tokenizer, fresh, base_state, data, None, None, {}


def shared_key(cfg: TrainConfig) -> str:
    """Cache key of the shared pieces: a hash of the settings they depend on (a changed setting rebuilds)."""
    import hashlib
    import json
    from dataclasses import asdict

    relevant = {"seed": cfg.seed, "model": asdict(cfg.model), "data": asdict(cfg.data), "sft": asdict(cfg.sft),
                "reward": asdict(cfg.reward)}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare(cfg: TrainConfig, *, progress: bool = True, log=None) -> Workspace:
    """Build or load the shared pieces of a run (see the module docstring).

    Under DeepSpeed (``cfg.deepspeed``) rank 0 builds and caches them first while the other ranks wait at a
    barrier, then those load the cache: every rank holds identical data, base weights and judges.
    """
    if cfg.deepspeed is None:
        return _prepare(cfg, progress=progress, log=log)
    from .engine import barrier, init_distributed, is_main, run_ds_config

    init_distributed()
    run_ds_config(cfg)  # a bad DeepSpeed config fails now, not after the shared pieces are trained
    if not is_main():
        barrier()  # rank 0 is building the cache (the default process-group timeout is 30 minutes)
    ws = _prepare(cfg, progress=progress and is_main(), log=log if is_main() else None)
    if is_main():
        barrier()
    return ws


def _prepare(cfg: TrainConfig, *, progress: bool, log) -> Workspace:
    from .reward import RewardModel, train_reward_model
    from .sft import run_sft

    shared = os.path.join(cfg.output_dir, "shared", shared_key(cfg))
    os.makedirs(shared, exist_ok=True)
    device = pick_device()
    if cfg.model.path is None:
        tokenizer, fresh, base_state, data, exact, pref_score, info = _embedded(cfg, shared, progress, log)
    else:
        tokenizer, fresh, base_state, data, exact, pref_score, info = _user(cfg, shared)

    def build() -> torch.nn.Module:
        model = fresh()
        model.load_state_dict(base_state)
        return model.to(device)

    sft_path = os.path.join(shared, "sft.pt")
    sft_model = build()
    if os.path.exists(sft_path):
        sft_model.load_state_dict(load(sft_path))
    else:
        run_sft(sft_model, tokenizer, data["sft_train"], replace(cfg.sft, seed=cfg.seed), log=log, progress=progress)
        save_atomic({k: v.detach().cpu() for k, v in sft_model.state_dict().items()}, sft_path)
    sft_model.eval().requires_grad_(False)

    rm_path = os.path.join(shared, "reward_model.pt")
    reward_model = RewardModel.from_causal_lm(sft_model).to(device)
    if os.path.exists(rm_path):
        reward_model.load_state_dict(load(rm_path))
    else:
        reward_model.requires_grad_(True)
        train_reward_model(reward_model, tokenizer, data["pref_train"], replace(cfg.reward, seed=cfg.seed),
                           log=log, progress=progress)
        save_atomic({k: v.detach().cpu() for k, v in reward_model.state_dict().items()}, rm_path)
    reward_model.eval().requires_grad_(False)
    return Workspace(tokenizer=tokenizer, base_state=base_state, build=build, sft_model=sft_model,
                     reward_model=reward_model, device=device, exact_match=exact, preference_score=pref_score,
                     info=info, **data)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).eval().requires_grad_(False)
