"""The backend ops as torch operators: the schemas of the op table (table.py), the same in every backend's namespace.

    hbat::*            the C++ CPU and CUDA kernels (csrc/bindings/library.cpp defines the table's schemas)
    hbat_reference::*  the float64 reference (reference.py)
    hbat_triton::*     the Triton kernels (triton_backend.py)

Beyond the kernels, ``register`` gives every namespace what the dispatcher needs to treat the ops like
torch's own, all derived from the table: a fake (meta) implementation of each op (per-tensor sums, the new
tensors of a RETURN list, or nothing), so that torch.compile and FakeTensor can trace them; the backward of
``squared_change`` (``ewc_penalty`` is differentiable through it, with no saved temporary); and a
version-counter bump of every written list, so that autograd refuses a backward through values an op
overwrote, as it does after torch's in-place ops. The Python kernels are defined from the same schema strings
rather than with ``torch.library.custom_op`` so that all three namespaces get these registrations the same way
(the C++ ops, defined by the extension, cannot be custom_ops). ``export_ops`` gives a backend module one
function per op of the table.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch.library import Library

from . import table

#: the backend contract: one schema per op of the table (csrc/bindings/library.cpp registers the same strings)
SCHEMAS = {op.name: op.schema for op in table.OPS}

# the libraries must stay alive: a registration ends when its Library is garbage collected
_LIBRARIES: list[Library] = []


def sums_dtype(*lists) -> torch.dtype:
    """dtype of the per-tensor sums: float32, or float64 when an input is float64 (the reference only)."""
    return torch.float64 if any(t.dtype == torch.float64 for ts in lists for t in ts) else torch.float32


def _fake(op: table.OpDef):
    """The fake (meta) kernel of ``op``: outputs of the right shapes, dtypes and device, from the table."""
    arguments = [t.name for t in op.arguments]

    def fake(*args):
        lists = args[:len(arguments)]
        if op.reduces:
            return torch.empty(len(lists[0]), dtype=sums_dtype(*lists), device=lists[0][0].device)
        if op.returned is not None:  # its dtype rule names an argument list (table.OpDef checks it)
            like = lists[arguments.index(op.returned.dtype)] if op.returned.dtype != table.FLOAT32 else None
            return [torch.empty(t.shape, dtype=torch.float32 if like is None else like[i].dtype, device=t.device)
                    for i, t in enumerate(lists[0])]
        return None

    fake.__name__ = f"{op.name}_fake"
    return fake


def define(namespace: str, impls: dict):
    """Define every op of the table in ``namespace`` with the Python kernels ``impls`` (op name -> function, for
    any device), register them (see ``register``) and return ``torch.ops.<namespace>``."""
    if set(impls) != set(SCHEMAS):
        raise ValueError(f"{namespace}: kernels for {sorted(impls)}, but the op table has {sorted(SCHEMAS)}")
    lib = Library(namespace, "DEF")
    _LIBRARIES.append(lib)
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, impls[name], "CompositeExplicitAutograd")
    register(namespace)
    return getattr(torch.ops, namespace)


def kernels_named(module_globals: dict, pattern: str, where: str) -> dict:
    """Op name -> the function ``pattern.format(op name)`` of a module, for every op of the table (``define``'s
    ``impls``); an op without one is named."""
    missing = [op.name for op in table.OPS if pattern.format(op.name) not in module_globals]
    if missing:
        raise LookupError(f"{where} has no kernel {', '.join(pattern.format(m) for m in missing)} for the op table's "
                          f"{', '.join(missing)}")
    return {op.name: module_globals[pattern.format(op.name)] for op in table.OPS}


@lru_cache(maxsize=None)
def register(namespace: str, version_bumps: bool = True) -> None:
    """Fakes, the backward of squared_change and (``version_bumps``) the version bumps for the ops of
    ``namespace`` (once). The C++ extension registers the bumps of ``hbat`` itself (csrc/bindings/library.cpp)."""
    ops = getattr(torch.ops, namespace)
    lib = Library(namespace, "IMPL")
    _LIBRARIES.append(lib)
    for op in table.OPS:
        torch.library.register_fake(f"{namespace}::{op.name}", _fake(op), lib=lib)
        written = [i for i, t in enumerate(op.arguments) if t.written_in_place]
        if written and version_bumps:
            packet = getattr(ops, op.name).default
            lib.impl(op.name, _version_bump(packet, written), "ADInplaceOrView", with_keyset=True)
    _register_squared_change_backward(lib, namespace, ops.scaled_diff)


def export_ops(namespace: str, module_globals: dict) -> None:
    """Give a backend module one function per op of the table, named like the op, that runs
    ``torch.ops.<namespace>.<op>`` (looked up at call time: the C++ ops exist once the extension is loaded)."""
    for op in table.OPS:
        module_globals[op.name] = _forwarder(namespace, op)


def _forwarder(namespace: str, op: table.OpDef):
    def run(*args):
        return getattr(getattr(torch.ops, namespace), op.name)(*args)

    run.__name__ = run.__qualname__ = op.name
    run.__doc__ = f"torch.ops.{namespace}.{op.schema}: {op.doc}"
    return run


def _version_bump(op, written: list[int]):
    """An ADInplaceOrView kernel (what torch's in-place ops have): bump, then run the kernel below."""

    def bump_then_run(keyset, *args):
        for i in written:
            torch.autograd.graph.increment_version(args[i])
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)

    return bump_then_run


def _register_squared_change_backward(lib: Library, namespace: str, scaled_diff) -> None:
    """d sum_j (p_ij - r_ij)^2 / d p_i = 2 (p_i - r_i): one fused scaled_diff pass, from the saved inputs."""

    def setup_context(ctx, inputs, output):
        params, refs = inputs
        ctx.n = len(params)
        ctx.save_for_backward(*params, *refs)

    def backward(ctx, grad_sums):
        saved = ctx.saved_tensors
        params, refs = list(saved[: ctx.n]), list(saved[ctx.n :])
        need_params, need_refs = ctx.needs_input_grad  # one bool per tensor of each list
        grad_params, grad_refs = [None] * ctx.n, [None] * ctx.n
        if any(need_params) or any(need_refs):
            diffs = scaled_diff(params, refs, (2 * grad_sums).contiguous())
            grad_params = [d if need else None for d, need in zip(diffs, need_params)]
            grad_refs = [(-d).to(r.dtype) if need else None for d, r, need in zip(diffs, refs, need_refs)]
        return grad_params, grad_refs

    torch.library.register_autograd(f"{namespace}::squared_change", backward, setup_context=setup_context, lib=lib)
