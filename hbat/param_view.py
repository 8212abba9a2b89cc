"""Which parameters HybridEWC sees, and how they form units.

A parameter view lists the tensors ("fragments") this process updates and the unit each belongs to. The
single-process ``LocalParamView`` has one fragment per parameter tensor; the sharded views of
``hbat.distributed`` (DeepSpeed ZeRO, FSDP2) hold only this rank's slices and all-reduce per-unit sums.
``UnitGroups`` then maps units onto importance groups (one per tensor by default, or e.g. per layer).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

from .distributed._view import name_selector

_LAYER_RE = re.compile(r"^((?:.*?\.)?(?:layers|layer|h|blocks|block)\.\d+)\.")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names users know: strips torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        elif type(model).__name__ == "DistributedDataParallel":
            model = model.module
        else:
            return model


def clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def layer_group(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``; tensors outside a layer stay alone."""
    match = _LAYER_RE.match(name)
    return match.group(1) if match else name


class LocalParamView:
    """The trainable parameters of one process (all of the model), one fragment per tensor."""

    grad_scale = 1.0

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], include=None, exclude=None):
        keep = name_selector(include, exclude)
        named, seen = [], set()
        for name, p in named_params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
            if id(p) in seen or not p.requires_grad or not keep(clean_name(name)):
                continue  # shared (tied) tensors count once; frozen parameters are not penalised
            if p.is_sparse or not p.is_floating_point():
                raise TypeError(f"parameter {name!r} has dtype {p.dtype} / layout {p.layout}; need dense float")
            seen.add(id(p))
            named.append((clean_name(name), p))
        if not named:
            raise ValueError("no trainable parameter matches include/exclude (requires_grad=False ones are skipped)")
        self.unit_names = [n for n, _ in named]
        self.unit_numel = [p.numel() for _, p in named]
        self.fragment_names = list(self.unit_names)
        self.fragment_unit = list(range(len(named)))
        self._params = [p for _, p in named]

    def params(self) -> list[torch.Tensor]:
        return self._params

    def grads(self) -> list[torch.Tensor]:
        """The gradients, creating zero ones where ``.grad`` is None (e.g. unused in this step)."""
        out = []
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            out.append(p.grad)
        return out

    def all_reduce_(self, vec: torch.Tensor) -> torch.Tensor:
        return vec  # one process holds every element

    def unit_sums(self, fragment_values: torch.Tensor) -> torch.Tensor:
        return fragment_values.to(torch.float32)


class UnitGroups:
    """Maps the view's units onto importance groups: F has one entry per group."""

    def __init__(self, unit_names: list[str], unit_numel: list[int], group_by: None | str | Callable[[str], str]):
        if group_by is None:
            key = lambda name: name  # noqa: E731 - one group per tensor, the paper's units
        elif group_by == "layer":
            key = layer_group
        elif callable(group_by):
            key = group_by
        else:
            raise ValueError(f"group_by must be None, 'layer' or a callable name -> group, got {group_by!r}")
        index: dict[str, int] = {}
        self.unit_group = []
        for name in unit_names:
            group = key(name)
            if not isinstance(group, str):
                raise TypeError(f"group_by({name!r}) returned {type(group).__name__}; it must return a str")
            self.unit_group.append(index.setdefault(group, len(index)))
        self.names = list(index)
        self.numel = [0] * len(index)
        for unit, g in enumerate(self.unit_group):
            self.numel[g] += unit_numel[unit]

    def __len__(self) -> int:
        return len(self.names)

    def group_sums(self, unit_sums: torch.Tensor) -> torch.Tensor:
        """Per-group sums in float64, added in unit order (deterministic)."""
        out = torch.zeros(len(self.names), dtype=torch.float64)
        if unit_sums.numel():
            out.index_add_(0, torch.tensor(self.unit_group, dtype=torch.long), unit_sums.detach().cpu().double())
        return out
