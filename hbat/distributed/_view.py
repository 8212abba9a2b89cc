"""What every ParamView shares: parameter names and selection; for sharded views, per-unit sums and their all-reduce."""
from __future__ import annotations

import fnmatch
import re
from typing import Callable

import torch
import torch.distributed as dist

# name components that wrappers insert: torch.compile and DDP in front, FSDP1 / activation checkpointing anywhere
_LEADING_WRAPPERS = re.compile(r"^(?:_orig_mod\.|module\.)+")
_INNER_WRAPPERS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def clean_name(name: str) -> str:
    """The parameter name users know: ``module._orig_mod.layers.0._checkpoint_wrapped_module.w`` -> ``layers.0.w``."""
    return _INNER_WRAPPERS.sub("", _LEADING_WRAPPERS.sub("", name))


def name_selector(include, exclude) -> Callable[[str], bool]:
    """Parameter-name filter from fnmatch globs (or compiled regexes); None means everything / nothing."""

    def patterns(value):
        if value is None:
            return []
        if isinstance(value, (str, re.Pattern)):
            return [value]
        return list(value)

    def matches(name, pats):
        return any(p.search(name) if isinstance(p, re.Pattern) else fnmatch.fnmatchcase(name, p) for p in pats)

    inc, exc = patterns(include), patterns(exclude)
    return lambda name: (not inc or matches(name, inc)) and not matches(name, exc)


class ShardedView:
    """Base of the sharded views. Subclasses set ``unit_names``, ``unit_numel``, ``fragment_unit``,
    ``fragment_names``, ``fragment_offsets``, ``process_group`` and implement ``params()`` / ``grads()``.
    Every fragment is 1-D (``fragment_shapes``) and a rank holds at most one fragment of each unit."""

    process_group = None
    comm_device = None  # where the process group's backend wants tensors (NCCL: the current GPU)
    grad_scale = 1.0

    @property
    def fragment_shapes(self) -> list[tuple[int, ...]]:
        return [(t.numel(),) for t in self.params()]

    def grads_ready(self) -> bool:
        return True

    def trainable(self) -> None:
        """Every fragment takes the penalty (freezing a parameter after sharding is not followed)."""
        return None

    def all_reduce_(self, vec: torch.Tensor) -> torch.Tensor:
        """Sum a float32 vector (per-unit partial sums) over the ranks that share the shards, in place."""
        if vec.dtype != torch.float32 or vec.dim() != 1:
            raise ValueError(f"all_reduce_ expects a 1-D float32 vector, got {vec.dtype} {tuple(vec.shape)}")
        if self.comm_device is None or vec.device == self.comm_device:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.process_group)
            return vec
        # e.g. optimizer offload: the sums are on the CPU, NCCL reduces GPU tensors (a few bytes to move)
        moved = vec.to(self.comm_device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=self.process_group)
        return vec.copy_(moved)

    def unit_sums(self, fragment_values: torch.Tensor) -> torch.Tensor:
        """Per-unit local sums of per-fragment values, not yet all-reduced. A rank holds at most one fragment
        per unit, so the result does not depend on summation order."""
        out = torch.zeros(len(self.unit_names), dtype=torch.float32, device=fragment_values.device)
        if fragment_values.numel():
            index = torch.as_tensor(self.fragment_unit, dtype=torch.long, device=fragment_values.device)
            out.index_add_(0, index, fragment_values.to(torch.float32))
        return out

    @property
    def owned_numel(self) -> int:
        """Elements this rank holds an anchor for (per-rank anchor memory = this times the anchor dtype size)."""
        return sum(t.numel() for t in self.params())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(units={len(self.unit_names)}, fragments={len(self.fragment_unit)}, "
                f"owned_numel={self.owned_numel})")
