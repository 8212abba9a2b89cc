"""Fused multi-tensor ops of Hybrid Alignment Training.

Each op takes Python sequences of tensors (one entry per parameter tensor, a "unit" of the paper) and
returns float32 per-tensor results on the tensors' device. ``backend`` is one of "auto", "reference",
"cpu", "triton", "cuda" ("auto": the fastest available for the device, see ``available_backends``).

    squared_change(params, refs)                  -> [n]  mean (or sum) of (p - r)^2 per tensor     eq. (7)
    snapshot_(params, anchors)                    -> [n]  the same against the anchors, then anchors <- params
    importance(acc_change, f_max, scale=1.0)      -> [n]  f_max * softmax(scale * acc_change)          eq. (6)/(9)
    ewc_penalty_grad_(params, anchors, grads, F, lam) -> [n]  (lam/2) F_i sum (p - a)^2, grads += lam F_i (p - a)
    ewc_penalty(params, anchors, F, lam)          -> scalar, differentiable w.r.t. params             eq. (5)/(8)
    lerp_(dst, a, b, weights)                     -> None  dst_i = (1 - w_i) a_i + w_i b_i (model averaging)
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _validate as V
from ._dispatch import available_backends, backend_status, resolve

Tensors = Sequence[torch.Tensor]

__all__ = [
    "squared_change",
    "snapshot_",
    "importance",
    "ewc_penalty_grad_",
    "ewc_penalty",
    "lerp_",
    "available_backends",
    "backend_status",
    "EWCPenalty",
]

_REDUCTIONS = ("mean", "sum")


def _prepare(backend: str, lists: dict, writable=()):
    """Validate parallel lists and pick the backend. Returns (lists, device, backend_name, module)."""
    first_name = next(iter(lists))
    lead = V.as_tensor_list(first_name, lists[first_name])
    device = lead[0].device if lead else None
    name, module = resolve(backend, device)
    converted, device = V.check_lists(
        lists,
        dtypes=V.REFERENCE_DTYPES if name == "reference" else V.NATIVE_DTYPES,
        need_contiguous=name != "reference",
        writable=writable,
    )
    return converted, device, name, module


def _empty(device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float32, device=device if device is not None else "cpu")


def _numels(tensors: list[torch.Tensor], device) -> torch.Tensor:
    # float64: numel can exceed float32's exact integer range
    return torch.tensor([max(t.numel(), 1) for t in tensors], dtype=torch.float64, device=device)


def _reduce(sums: torch.Tensor, tensors, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return sums
    return (sums.to(torch.float64) / _numels(tensors, sums.device)).to(sums.dtype)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def squared_change(params: Tensors, refs: Tensors, *, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Per tensor, the mean (or sum) of ``(p - r)**2``: C_i of eq. (7). The mean of an empty tensor is 0."""
    _check_reduction(reduction)
    (params, refs), device, _, be = _prepare(backend, {"params": params, "refs": refs})
    if not params:
        return _empty(device)
    return _reduce(be.sum_sq_diff(params, refs), params, reduction)


def snapshot_(params: Tensors, anchors: Tensors, *, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Per-tensor change of ``params`` against the anchors' old values, and ``anchors[i] <- params[i]``
    (cast to the anchor's dtype) in the same pass over the data: the stage boundary of Algorithm 1."""
    _check_reduction(reduction)
    (params, anchors), device, _, be = _prepare(backend, {"params": params, "anchors": anchors}, writable=("anchors",))
    if not params:
        return _empty(device)
    return _reduce(be.snapshot_(params, anchors), params, reduction)


def importance(acc_change, f_max: float, *, scale: float = 1.0) -> torch.Tensor:
    """``f_max * softmax(scale * acc_change)``: F_i of eq. (6) / (9), one float32 per tensor.

    Stable for any finite input: the softmax is taken of ``(acc - max(acc)) * scale`` in float64, so huge
    scales (the released code behaves like scale = 1e20) give the one-hot limit instead of NaN, and tiny
    changes at scale 1 (the paper, literally) give the near-uniform limit.
    """
    f_max = V.check_scalar("f_max", f_max)
    scale = V.check_scalar("scale", scale)
    if not isinstance(acc_change, torch.Tensor):
        acc_change = torch.as_tensor(acc_change, dtype=torch.float64)
    if acc_change.dim() != 1:
        raise ValueError(f"acc_change must be 1-D (one entry per tensor), got shape {tuple(acc_change.shape)}")
    acc = acc_change.detach().to(torch.float64)
    if acc.numel() == 0:
        return _empty(acc.device)
    if not bool(torch.isfinite(acc).all()):
        bad = int((~torch.isfinite(acc)).nonzero()[0, 0])
        raise ValueError(f"acc_change[{bad}] is {acc[bad].item()}; every entry must be finite")
    pivot = acc.max() if scale >= 0 else acc.min()
    # (acc - pivot) * scale <= 0 everywhere and == 0 at the pivot: exp never overflows, the sum is >= 1.
    # An underflow of (acc - pivot) to -inf (values spanning +-1e308) correctly gives weight 0.
    z = (acc - pivot) * scale
    weights = torch.softmax(z, dim=0)
    return (f_max * weights).to(torch.float32)




def ewc_penalty_grad_(
    params: Tensors, anchors: Tensors, grads: Tensors, importance, lam: float, *, backend: str = "auto"
) -> torch.Tensor:
    """Per tensor ``(lam/2) * F_i * sum_j (p_ij - a_ij)**2``; in the same pass ``grads[i] += lam*F_i*(p_i - a_i)``.

    The fast path for a training loop: call it after backward, before gradient clipping and the optimizer
    step. Returns the per-tensor penalties (sum them for the total) without a host synchronisation.
    """
    lam = V.check_scalar("lam", lam)
    (params, anchors, grads), device, _, be = _prepare(
        backend, {"params": params, "anchors": anchors, "grads": grads}, writable=("grads",)
    )
    coef = lam * V.check_vector("importance", importance, len(params), device)
    if not params:
        return _empty(device)
    sums = be.penalty_grad_(params, anchors, grads, coef)
    return (0.5 * coef) * sums


class _EWCPenaltyFunction(torch.autograd.Function):
    """Total penalty sum_i (lam/2) F_i ||p_i - a_i||^2. Saves only the inputs (no parameter-sized
    temporary): backward recomputes lam * F_i * (p_i - a_i) in one fused pass."""

    @staticmethod
    def forward(ctx, backend_module, n, lam, F, *tensors):
        params, anchors = list(tensors[:n]), list(tensors[n:])
        sums = backend_module.sum_sq_diff(params, anchors)
        ctx.backend_module, ctx.n, ctx.lam = backend_module, n, lam
        ctx.save_for_backward(F, sums, *params, *anchors)
        return (0.5 * lam) * (F * sums).sum()

    @staticmethod
    def backward(ctx, grad_out):
        F, sums, *tensors = ctx.saved_tensors
        n, lam = ctx.n, ctx.lam
        params, anchors = tensors[:n], tensors[n:]
        grad_params = [None] * n
        if any(ctx.needs_input_grad[4 : 4 + n]):
            coef = (grad_out.to(torch.float32) * lam) * F.to(torch.float32)
            grad_params = ctx.backend_module.scaled_diff(list(params), list(anchors), coef)
        grad_F = (0.5 * lam) * grad_out * sums if ctx.needs_input_grad[3] else None
        return (None, None, None, grad_F, *grad_params, *([None] * n))


def ewc_penalty(params: Tensors, anchors: Tensors, importance, lam: float, *, backend: str = "auto") -> torch.Tensor:
    """The total penalty ``sum_i (lam/2) * F_i * sum_j (p_ij - a_ij)**2`` as a differentiable scalar.

    Gradients flow to ``params`` (``lam * F_i * (p_i - a_i)``) and to ``importance`` if it requires grad;
    anchors are constants. Use it as a loss term; ``ewc_penalty_grad_`` is the faster in-place path.
    """
    lam = V.check_scalar("lam", lam)
    (params, anchors), device, _, be = _prepare(backend, {"params": params, "anchors": anchors})
    n = len(params)
    if isinstance(importance, torch.Tensor) and importance.requires_grad:
        F = importance
        V.check_vector("importance", importance, n, device)
    else:
        F = V.check_vector("importance", importance, n, device)
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=device if device is not None else "cpu")
    return _EWCPenaltyFunction.apply(be, n, lam, F, *params, *[a.detach() for a in anchors])


def lerp_(dst: Tensors, a: Tensors, b: Tensors, weights, *, backend: str = "auto") -> None:
    """Multi-tensor model averaging: ``dst[i] <- (1 - w_i) * a[i] + w_i * b[i]``, one weight per tensor.

    ``dst`` may be ``a`` or ``b`` (in-place averaging). With theta_pre = a (the SFT model) and
    theta_post = b (the aligned model), w is the paper's alpha: 0 returns the SFT model, 1 the aligned one.
    """
    (dst, a, b), device, _, be = _prepare(backend, {"dst": dst, "a": a, "b": b}, writable=("dst",))
    w = V.check_vector("weights", weights, len(dst), device)
    if dst:
        be.lerp_(dst, a, b, w)


class EWCPenalty(torch.nn.Module):
    """Module wrapper of ``ewc_penalty`` (Liger-style): ``EWCPenalty(lam)(params, anchors, importance)``."""

    def __init__(self, lam: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.lam, self.backend = V.check_scalar("lam", lam), backend

    def forward(self, params: Tensors, anchors: Tensors, importance) -> torch.Tensor:
        return ewc_penalty(params, anchors, importance, self.lam, backend=self.backend)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, backend={self.backend!r}"
