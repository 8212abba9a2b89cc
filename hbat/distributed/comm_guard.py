"""Record (and forbid) collectives inside a block: proof that a code path gathers nothing.

    with record_collectives(forbid=GATHERS) as log:
        ewc.apply_()
    assert log.names() == ["all_reduce"]           # one per-unit float vector, nothing else

Every collective entry point is wrapped for the duration of the block: ``torch.distributed`` and its
``distributed_c10d`` module, ``deepspeed.comm`` and its backend object (which caches function handles at
start-up), and ``deepspeed.zero.GatheredParameters`` (ZeRO-3's parameter gathering context). A call whose
name matches a ``forbid`` pattern raises ``GatherForbiddenError`` before any communication starts, so a
forbidden path fails loudly on every rank instead of hanging.
"""
from __future__ import annotations

import contextlib
import fnmatch
import sys
from dataclasses import dataclass, field

import torch

__all__ = ["record_collectives", "CollectiveLog", "GatherForbiddenError", "GATHERS"]

#: name patterns of the operations that move parameter- or gradient-sized data to every rank
GATHERS = ("*all_gather*", "*allgather*", "_all_gather_base*", "gather", "gather_object", "broadcast*",
           "GatheredParameters")

_COLLECTIVE_PATTERNS = ("*all_gather*", "*allgather*", "_all_gather_base*", "gather", "gather_object",
                        "broadcast*", "all_reduce*", "reduce", "reduce_scatter*", "_reduce_scatter_base",
                        "all_to_all*", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv",
                        "batch_isend_irecv", "inference_all_reduce")


class GatherForbiddenError(RuntimeError):
    """A forbidden collective was called inside ``record_collectives(forbid=...)``."""


@dataclass
class CollectiveLog:
    """What ran inside the block: ``calls`` is a list of (name, number of elements of the first tensor)."""

    calls: list[tuple[str, int]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def numel(self) -> int:
        return sum(n for _, n in self.calls)


def _first_tensor_numel(args, kwargs) -> int:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.numel()
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return sum(t.numel() for t in value)
    return 0


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _targets():
    """(owner, attribute names) pairs to wrap: module functions and the DeepSpeed backend's methods."""
    import torch.distributed as tdist
    import torch.distributed.distributed_c10d as c10d

    owners = [tdist, c10d]
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None:
        owners.append(ds_comm)
        if sys.modules.get("deepspeed.comm") is not None:
            owners.append(sys.modules["deepspeed.comm"])
        if getattr(ds_comm, "cdb", None) is not None:
            owners.append(ds_comm.cdb)
    for owner in owners:
        names = [n for n in dir(owner) if _matches(n, _COLLECTIVE_PATTERNS) and callable(getattr(owner, n, None))]
        yield owner, names


@contextlib.contextmanager
def record_collectives(forbid=()):
    """Log every collective called inside the block; raise ``GatherForbiddenError`` for ``forbid`` names."""
    log = CollectiveLog()
    saved = []
    depth = [0]  # a wrapper calling another wrapper (deepspeed.comm -> torch.distributed) logs once

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            if _matches(name, forbid):
                raise GatherForbiddenError(f"{name} called on a path that must not gather (record_collectives)")
            if depth[0] == 0:
                log.calls.append((name, _first_tensor_numel(args, kwargs)))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    try:
        for owner, names in _targets():
            for name in names:
                original = getattr(owner, name)
                in_dict = isinstance(owner, type(sys)) or name in vars(owner)
                saved.append((owner, name, original, in_dict))
                setattr(owner, name, wrap(name, original))
        zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
        if zero is not None:
            cls = zero.GatheredParameters
            original_init = cls.__init__

            def gathered_init(self, *args, **kwargs):
                if _matches("GatheredParameters", forbid):
                    raise GatherForbiddenError("deepspeed.zero.GatheredParameters used on a path that must not gather")
                log.calls.append(("GatheredParameters", 0))
                original_init(self, *args, **kwargs)

            saved.append((cls, "__init__", original_init, True))
            cls.__init__ = gathered_init
        yield log
    finally:
        for owner, name, original, in_dict in reversed(saved):
            if in_dict:
                setattr(owner, name, original)
            else:  # an instance attribute we added over a class method: remove it again
                delattr(owner, name)
