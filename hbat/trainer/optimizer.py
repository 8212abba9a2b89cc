"""The optimizer a stage steps, whatever the backend: AdamW over the trained parameters, its lr schedule, the
micro-batch split, and the fp32 master copies of low-precision weights.

Weights in bfloat16 (``model.dtype``) are stepped through fp32 masters: AdamW's moments and update run in fp32
on the master, which is rounded back into the bf16 weight after each step (a plain bf16 AdamW loses every update
below bf16's resolution: lr 1e-6 on a weight of 1e-2 changes nothing). fp32 weights are their own master (no
copy). The masters belong to the model, not to a stage (``master_weights``): the next stage's stepper continues
from them, as DeepSpeed keeps its fp32 partitions, so progress below bf16's resolution is not lost at a stage
boundary; a weight changed from outside (``load_state_dict``) gets a fresh master. ``master_state`` /
``load_master_state`` carry them through a checkpoint (exact resume in bf16). The EWC penalty of a bf16 model is
measured on the masters (``master_named_parameters``, as DeepSpeed's bf16 engine does on its fp32 partitions).
"""
from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch

# module -> {parameter: its fp32 master}; outside the module, so copies of the module (references) share none
_MASTERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a stage trains (frozen tensors, e.g. HBAT-Freeze or a LoRA base, are left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return params


@torch.no_grad()
def master_weights(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The fp32 master of each of ``params`` (a weight of ``model``): the weight itself when it is fp32, else
    the master ``model`` keeps (one tensor for the whole run, which HybridEWC may hold), set again from the
    weight where the weight is no longer the master rounded (it was changed from outside)."""
    store = _MASTERS.setdefault(model, {})
    low = [p for p in params if p.dtype != torch.float32]
    for p in low:
        if p not in store:
            store[p] = p.detach().float().requires_grad_(True)  # a leaf HybridEWC's view accepts
    flags = [(store[p].to(p.dtype) == p).all() for p in low]
    valid = torch.stack([f.to(low[0].device) for f in flags]).tolist() if low else []  # one host sync
    for p, ok in zip(low, valid):
        if not ok:
            store[p].copy_(p)
    return [p if p.dtype == torch.float32 else store[p] for p in params]


def master_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``model``'s trainable (name, parameter) pairs with each bf16 weight replaced by its fp32 master: what the
    EWC penalty of a bf16 model measures and adds its gradient to (the step folds it in before clipping)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return list(zip([name for name, _ in named], master_weights(model, [p for _, p in named])))


def has_low_precision(model: torch.nn.Module) -> bool:
    return any(p.requires_grad and p.dtype != torch.float32 for p in model.parameters())


def drop_master_weights(model: torch.nn.Module) -> None:
    """Forget the masters of ``model`` (a model that is trained no more, e.g. the shared SFT model)."""
    _MASTERS.pop(model, None)


def master_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The masters ``model`` keeps, by parameter name (CPU copies), for a checkpoint."""
    store = _MASTERS.get(model, {})
    return {name: store[p].detach().cpu().clone() for name, p in model.named_parameters() if p in store}


@torch.no_grad()
def load_master_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Masters from ``master_state``, loaded after the weights (each must round to its weight)."""
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params or params[name].dtype == torch.float32]
    if missing:
        raise ValueError(f"master weight {missing[0]!r} is not a low-precision parameter of the model")
    for master, value in zip(master_weights(model, [params[name] for name in state]), state.values()):
        master.copy_(value)


def make_optimizer(params: Sequence[torch.Tensor], cfg) -> torch.optim.Optimizer:
    """A fresh AdamW over ``params`` with the stage's lr and weight decay."""
    return torch.optim.AdamW(list(params), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio * total_steps`` steps, then constant / linear / cosine decay to 0."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def split_micro(indices: Sequence[int], parts: int) -> list[list[int]]:
    """``parts`` near-equal consecutive chunks (fewer when there are fewer rows than parts)."""
    size = math.ceil(len(indices) / parts)
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]

