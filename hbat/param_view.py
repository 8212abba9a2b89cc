"""Which parameters HybridEWC sees, how they form units, and how its anchors follow them between views.

A parameter view lists the tensors ("fragments") this process updates and the unit each belongs to. The
single-process ``LocalParamView`` has one fragment per parameter tensor; the sharded views of
``hbat.distributed`` (DeepSpeed ZeRO, FSDP2) hold only this rank's slices and all-reduce per-unit sums. An
``UnboundView`` holds the same names with no live tensors: a model that ZeRO-3 has partitioned before any
engine exists, or a HybridEWC whose engine finished. ``relayout`` re-cuts this rank's anchors for a new view
without communication. ``UnitGroups`` maps units onto importance groups (one per tensor by default, or per
layer).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable

import torch

from .distributed._view import clean_name, name_selector

_LAYER_RE = re.compile(r"^((?:.*?\.)?(?:layers|layer|h|blocks|block)\.\d+)\.")

__all__ = ["LocalParamView", "UnboundView", "UnitGroups", "make_view", "module_of", "relayout", "unwrap_model",
           "clean_name", "layer_group"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names users know: strips torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        elif type(model).__name__ == "DistributedDataParallel":
            model = model.module
        else:
            return model


def layer_group(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``; tensors outside a layer stay alone."""
    match = _LAYER_RE.match(name)
    return match.group(1) if match else name


def _zero3_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_numel")  # DeepSpeed ZeRO-3: p.data is an empty placeholder


def _selected(named_params, include, exclude) -> list[tuple[str, torch.Tensor]]:
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
    return named


class LocalParamView:
    """The trainable parameters of one process (all of the model), one fragment per tensor."""

    grad_scale = 1.0

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], include=None, exclude=None):
        named = _selected(named_params, include, exclude)
        self.unit_names = [n for n, _ in named]
        self.unit_numel = [p.numel() for _, p in named]
        self.fragment_names = list(self.unit_names)
        self.fragment_unit = list(range(len(named)))
        self.fragment_offsets = [0] * len(named)
        self.fragment_shapes = [tuple(p.shape) for _, p in named]
        self._params = [p for _, p in named]

    def params(self) -> list[torch.Tensor]:
        return self._params

    def trainable(self) -> list[int] | None:
        """Indices of the fragments whose parameter has ``requires_grad`` now; None when all have (the usual case).
        One attribute read per tensor: about 20 ns each, small beside the penalty pass itself."""
        flags = [p.requires_grad for p in self._params]
        return None if all(flags) else [i for i, f in enumerate(flags) if f]

    def grads(self, keep: list[int] | None = None) -> list[torch.Tensor]:
        """The gradients of the fragments ``keep`` (default: all), creating zero ones where ``.grad`` is None."""
        out = []
        for p in (self._params if keep is None else [self._params[i] for i in keep]):
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            out.append(p.grad)
        return out

    def all_reduce_(self, vec: torch.Tensor) -> torch.Tensor:
        return vec  # one process holds every element

    def unit_sums(self, fragment_values: torch.Tensor) -> torch.Tensor:
        return fragment_values.to(torch.float32)


class UnboundView:
    """Unit and fragment names without live tensors; every use of the tensors raises ``RuntimeError(reason)``."""

    grad_scale = 1.0

    def __init__(self, unit_names, unit_numel, *, reason: str, pending: bool = False, fragment_unit=(),
                 fragment_names=(), fragment_offsets=(), fragment_shapes=()):
        self.pending = pending  # True: this rank's fragments are not known yet (no engine has partitioned them)
        self.unit_names, self.unit_numel = list(unit_names), [int(n) for n in unit_numel]
        self.fragment_unit, self.fragment_names = list(fragment_unit), list(fragment_names)
        self.fragment_offsets, self.fragment_shapes = list(fragment_offsets), [tuple(s) for s in fragment_shapes]
        self.reason = reason

    @classmethod
    def of(cls, view, reason: str) -> "UnboundView":
        """The names and layout of ``view`` (this rank's fragments), without its tensors."""
        return cls(view.unit_names, view.unit_numel, reason=reason, fragment_unit=view.fragment_unit,
                   fragment_names=view.fragment_names, fragment_offsets=view.fragment_offsets,
                   fragment_shapes=view.fragment_shapes)

    def params(self, *args, **kwargs):
        raise RuntimeError(self.reason)

    grads = all_reduce_ = unit_sums = params

    def grads_ready(self) -> bool:
        return True  # so that apply_ reaches params() and says why it cannot run

    def trainable(self) -> None:
        return None


ZERO3_UNBOUND = (
    "the parameters are partitioned by DeepSpeed ZeRO-3 (zero.Init, or an earlier engine), so this rank cannot "
    "take their anchors yet: bind the HybridEWC to the engine that trains them (HybridEWCCallback does this when "
    "train() starts; in your own loop call ewc.bind(engine) or build HybridEWC(engine))"
)


def _local_view(named_params, include, exclude):
    named = _selected(named_params, include, exclude)
    if any(_zero3_partitioned(p) for _, p in named):
        numel = [int(p.ds_numel) if _zero3_partitioned(p) else p.numel() for _, p in named]
        return UnboundView([n for n, _ in named], numel, reason=ZERO3_UNBOUND, pending=True)
    return LocalParamView(named)


def make_view(target, include=None, exclude=None):
    """The view of ``target``: a DeepSpeed engine or FSDP2 module (sharded), an ``nn.Module`` or (name, param) pairs."""
    from .distributed import is_deepspeed_engine, param_view

    if isinstance(target, torch.nn.Module) or is_deepspeed_engine(target):
        view = param_view(target, include=include, exclude=exclude)  # ZeRO-1/2/3 or FSDP2: sharded
        if view is not None:
            return view
        if is_deepspeed_engine(target):
            target = target.module  # no ZeRO: every rank holds all parameters and reduced gradients
    if isinstance(target, torch.nn.Module):
        return _local_view(unwrap_model(target).named_parameters(), include, exclude)
    if isinstance(target, (str, bytes, torch.Tensor)) or not isinstance(target, Iterable):
        raise TypeError("HybridEWC needs an nn.Module, a DeepSpeed engine or an iterable of (name, parameter) pairs, "
                        f"not {type(target).__name__}")
    pairs = list(target)
    for i, item in enumerate(pairs):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"named parameters entry {i} is {type(item).__name__}; expected a (name, tensor) pair")
    return _local_view(pairs, include, exclude)


def module_of(target) -> torch.nn.Module | None:
    """The user's model behind ``target`` (a DeepSpeed engine's module, a module without its wrappers), if any."""
    from .distributed import is_deepspeed_engine

    if is_deepspeed_engine(target):
        target = target.module
    return unwrap_model(target) if isinstance(target, torch.nn.Module) else None


def relayout(anchors: list[torch.Tensor], old, new, dtype: torch.dtype) -> list[torch.Tensor]:
    """This rank's anchors for the fragments of view ``new``, cut from ``anchors`` (laid out as ``old``).

    Purely local: every fragment of ``new`` must lie inside this rank's fragment of the same unit in ``old``
    (a full tensor covers any shard; the same sharding covers itself). Raises before anything is copied.
    """
    held = {unit: i for i, unit in enumerate(old.fragment_unit)}
    pieces = []
    for j, (unit, offset, shape) in enumerate(zip(new.fragment_unit, new.fragment_offsets, new.fragment_shapes)):
        numel, i = math.prod(shape), held.get(unit)
        start = None if i is None else offset - old.fragment_offsets[i]
        if i is None or start < 0 or start + numel > math.prod(old.fragment_shapes[i]):
            here = "nothing of it" if i is None else old.fragment_names[i]
            raise ValueError(
                f"this rank holds no anchor for {new.fragment_names[j]} (it holds {here}): the parameters are "
                "partitioned differently from the run the anchors were taken in (another ZeRO stage, world size or "
                "optimizer parameter grouping); keep them the same for every stage"
            )
        pieces.append((i, start, numel, shape))
    params = new.params()
    out = []
    for (i, start, numel, shape), p in zip(pieces, params):
        piece = anchors[i].reshape(-1).narrow(0, start, numel).view(shape)
        moved = piece.to(device=p.device, dtype=dtype)
        # a slice of a larger anchor is copied, so that the full one can be freed
        out.append(moved.clone() if moved.data_ptr() == piece.data_ptr() and numel != anchors[i].numel() else moved)
    return out


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
