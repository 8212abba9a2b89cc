"""EWC on sharded parameters (DeepSpeed ZeRO-1/2/3, PyTorch FSDP2) without gathering them.

Each rank keeps the anchor only for the elements it owns (its fp32 master partition), computes per-tensor
partial sums over them and all-reduces ONE float32 vector of per-tensor sums; the penalty gradient is added
to the rank's own reduced gradient partition, after the reduction and before ``engine.step()``, so the
overflow check, gradient clipping and the optimizer see it exactly like a loss term.

    view = hbat.distributed.param_view(engine)        # ZeroParamView for ZeRO stages 1, 2, 3
    for batch in loader:
        loss = engine(**batch).loss
        engine.backward(loss)
        ewc.apply_()        # no-op until the gradient-accumulation boundary, then adds lam*F*(p - a)
        engine.step()

``deepspeed`` is never imported here: a view is built from an engine the caller already has.
"""
from __future__ import annotations

from .comm_guard import GATHERS, GatherForbiddenError, record_collectives
from .fsdp import FSDPParamView, is_fsdp2_module
from .zero import ZeroParamView, is_deepspeed_engine

__all__ = ["param_view", "ZeroParamView", "FSDPParamView", "is_deepspeed_engine", "is_fsdp2_module",
           "record_collectives", "GATHERS", "GatherForbiddenError"]


def param_view(model, include=None, exclude=None, select=None):
    """The sharded ParamView for ``model``, or None when the single-process view applies.

    A DeepSpeed engine with ZeRO-1/2/3 gives a ``ZeroParamView``; a module sharded by FSDP2's
    ``fully_shard`` an ``FSDPParamView``; a plain module, or a DeepSpeed engine without ZeRO (every rank holds
    the full parameters and all-reduced gradients; use ``engine.module``), gives None.
    """
    if is_deepspeed_engine(model):
        if int(model.zero_optimization_stage()) == 0:
            return None
        return ZeroParamView(model, include=include, exclude=exclude, select=select)
    if is_fsdp2_module(model):
        return FSDPParamView(model, include=include, exclude=exclude, select=select)
    return None
