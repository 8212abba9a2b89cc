"""The backend ops as torch operators: one schema per op, the same in every backend's namespace.

    hbat::*            the C++ CPU and CUDA kernels (schemas defined in csrc/bindings/library.cpp)
    hbat_reference::*  the float64 reference (reference.py)
    hbat_triton::*     the Triton kernels (triton_backend.py)

Beyond the kernels, ``register`` gives every namespace what the dispatcher needs to treat the ops like
torch's own: a fake (meta) implementation of each op, so that torch.compile and FakeTensor can trace
them; the backward of ``sum_sq_diff`` (``ewc_penalty`` is differentiable through it, with no saved
temporary); and a version-counter bump of every written tensor, so that autograd refuses a backward
through values an op overwrote, as it does after torch's in-place ops. The Python kernels are defined
from the same schema strings rather than with ``torch.library.custom_op`` so that all three namespaces get
these registrations the same way (the C++ ops, defined by the extension, cannot be custom_ops).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch.library import Library

#: the backend contract (see reference.py); keep in step with csrc/bindings/library.cpp (a test compares)
SCHEMAS = {
    "sum_sq_diff": "sum_sq_diff(Tensor[] params, Tensor[] refs) -> Tensor",
    "snapshot_": "snapshot_(Tensor[] params, Tensor(a!)[] anchors) -> Tensor",
    "penalty_grad_": "penalty_grad_(Tensor[] params, Tensor[] anchors, Tensor(a!)[] grads, Tensor coef) -> Tensor",
    "scaled_diff": "scaled_diff(Tensor[] params, Tensor[] anchors, Tensor coef) -> Tensor[]",
    "lerp_": "lerp_(Tensor(a!)[] dst, Tensor[] a, Tensor[] b, Tensor weights) -> ()",
}

# the libraries must stay alive: a registration ends when its Library is garbage collected
_LIBRARIES: list[Library] = []


def sums_dtype(*lists) -> torch.dtype:
    """dtype of the per-tensor sums: float32, or float64 when an input is float64 (the reference only)."""
    return torch.float64 if any(t.dtype == torch.float64 for ts in lists for t in ts) else torch.float32


def _sums_like(*lists) -> torch.Tensor:
    return torch.empty(len(lists[0]), dtype=sums_dtype(*lists), device=lists[0][0].device)


_FAKES = {
    "sum_sq_diff": lambda params, refs: _sums_like(params, refs),
    "snapshot_": lambda params, anchors: _sums_like(params, anchors),
    "penalty_grad_": lambda params, anchors, grads, coef: _sums_like(params, anchors, grads),
    "scaled_diff": lambda params, anchors, coef: [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params],
    "lerp_": lambda dst, a, b, weights: None,
}


def define(namespace: str, impls: dict):
    """Define the ops of ``SCHEMAS`` in ``namespace`` with the Python kernels ``impls`` (name -> function,
    for any device), register them (see ``register``) and return ``torch.ops.<namespace>``."""
    lib = Library(namespace, "DEF")
    _LIBRARIES.append(lib)
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, impls[name], "CompositeExplicitAutograd")
    register(namespace)
    return getattr(torch.ops, namespace)


@lru_cache(maxsize=None)
def register(namespace: str) -> None:
    """Fakes, the backward of sum_sq_diff and the version bumps for the ops of ``namespace`` (once)."""
    ops = getattr(torch.ops, namespace)
    lib = Library(namespace, "IMPL")
    _LIBRARIES.append(lib)
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake, lib=lib)
        schema = getattr(ops, name).default._schema
        written = [i for i, arg in enumerate(schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]
        if written:
            lib.impl(name, _version_bump(getattr(ops, name).default, written), "ADInplaceOrView", with_keyset=True)
    _register_sum_sq_diff_backward(lib, namespace, ops.scaled_diff)


def _version_bump(op, written: list[int]):
    """An ADInplaceOrView kernel (what torch's in-place ops have): bump, then run the kernel below."""

    def bump_then_run(keyset, *args):
        for i in written:
            torch.autograd.graph.increment_version(args[i])
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)

    return bump_then_run


def _register_sum_sq_diff_backward(lib: Library, namespace: str, scaled_diff) -> None:
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

    torch.library.register_autograd(f"{namespace}::sum_sq_diff", backward, setup_context=setup_context, lib=lib)
