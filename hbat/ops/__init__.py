"""Fused multi-tensor ops of Hybrid Alignment Training.

Each op takes Python sequences of tensors (one entry per parameter tensor, a "unit" of the paper) and
returns float32 per-tensor results on the tensors' device. ``backend`` is one of "auto", "reference",
"cpu", "triton", "cuda" ("auto": the fastest available for the device, see ``available_backends``).

    squared_change(params, refs)                  -> [n]  mean (or sum) of (p - r)^2 per tensor     eq. (7)
    snapshot_(params, anchors)                    -> [n]  the same against the anchors, then anchors <- params
    importance(acc_change, f_max, scale=1.0)      -> [n]  f_max * softmax(scale * acc_change)          eq. (6)/(9)
    ewc_penalty_grad_(params, anchors, grads, F, lam) -> [n]  (lam/2) F_i sum (p - a)^2, grads += lam F_i (p - a)
    EWCPenaltyGrad(F, lam)(params, anchors, grads)    -> [n]  the same, lam * F_i checked once (the per-step path)
    ewc_penalty(params, anchors, F, lam)          -> scalar, differentiable w.r.t. params             eq. (5)/(8)
    lerp_(dst, a, b, weights)                     -> None  dst_i = (1 - w_i) a_i + w_i b_i (model averaging)
    adamw_ewc_step_(params, grads, exp_avg, exp_avg_sq, anchors, F, lam, lr=, weight_decay=, step=)
                                                  -> [n]  the penalty before the step; one AdamW step whose
                                                          gradient is grads + lam F_i (p - a)

Every op checks all of its inputs before it writes anything (validate.py), its tensor lists by the roles and
dtype rules of its entry in the op table (table.py, prepare.py). Each backend is a namespace of torch operators
(_library.py): written tensors get their version counters bumped, every op has a fake implementation
(torch.compile, torch.library.opcheck).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import validate
from . import validate as V
from ._dispatch import available_backends, backend_status
from .prepare import prepare as _prepare

# the module's name before it was public (hbat/averaging/plan.py imports it so)
_validate = validate

Tensors = Sequence[torch.Tensor]

__all__ = [
    "squared_change",
    "snapshot_",
    "importance",
    "ewc_penalty_grad_",
    "ewc_penalty",
    "lerp_",
    "adamw_ewc_step_",
    "available_backends",
    "backend_status",
    "EWCPenalty",
    "EWCPenaltyGrad",
]

_REDUCTIONS = ("mean", "sum")


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
    (params, refs), device, be = _prepare("squared_change", backend, params, refs)
    if not params:
        return _empty(device)
    return _reduce(be.squared_change(params, refs), params, reduction)


def snapshot_(params: Tensors, anchors: Tensors, *, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Per-tensor change of ``params`` against the anchors' old values, and ``anchors[i] <- params[i]``
    (cast to the anchor's dtype) in the same pass over the data: the stage boundary of Algorithm 1."""
    _check_reduction(reduction)
    (params, anchors), device, be = _prepare("snapshot_", backend, params, anchors)
    if not params:
        return _empty(device)
    with torch.no_grad():  # an in-place op: its results are values, not a graph
        sums = be.snapshot_(params, anchors)
    return _reduce(sums, params, reduction)


def importance(acc_change, f_max: float, *, scale: float = 1.0) -> torch.Tensor:
    """``f_max * softmax(scale * acc_change)``: F_i of eq. (6) / (9), one float32 per tensor.

    Stable for any finite input and any finite scale (0 and negative included): the softmax is taken of
    ``(acc - max(acc)) * scale`` in float64, so huge scales (the released code behaves like scale = 1e20)
    give the one-hot limit instead of NaN, and tiny changes at scale 1 (the paper, literally) give the
    near-uniform limit. ``f_max`` must be finite and within float32's range.
    """
    f_max = V.check_scalar("f_max", f_max, float32=True)
    scale = V.check_scalar("scale", scale)
    acc_change = V.as_vector("acc_change", acc_change)
    if acc_change.dim() != 1:
        raise ValueError(f"acc_change must be 1-D (one entry per tensor), got shape {tuple(acc_change.shape)}")
    acc = acc_change.detach().to(torch.float64)
    if acc.numel() == 0:
        return _empty(acc.device)
    if not bool(torch.isfinite(acc).all()):
        bad = int((~torch.isfinite(acc)).nonzero()[0, 0])
        raise ValueError(f"acc_change[{bad}] is {acc[bad].item()}; every entry must be finite")
    pivot = acc.max() if scale >= 0 else acc.min()
    # z = (acc - pivot) * scale <= 0 everywhere and == 0 at the pivot: exp never overflows, the sum is >= 1.
    # Where acc - pivot overflows (values spanning +-1e308), z is acc*scale - pivot*scale instead: finite
    # where the true z is (|scale| < 1), -inf where that is below float64's range, 0 (not inf * 0 = NaN) at
    # scale 0; the two products have opposite signs, so their difference is never inf - inf.
    diff = acc - pivot
    z = torch.where(torch.isinf(diff), acc * scale - pivot * scale, diff * scale)
    weights = torch.softmax(z, dim=0)
    return (f_max * weights).to(torch.float32)


def _coefficients(importance, lam: float, n: int) -> torch.Tensor:
    """``lam * F_i`` in float32, where ``importance`` lives (checked there: see check_vector)."""
    return (lam * V.check_vector("importance", importance, n, None, lam=lam).to(torch.float64)).to(torch.float32)


def _ewc_penalty_grad(be, params, anchors, grads, coef, grad_coef, device) -> torch.Tensor:
    """The validated call: ``grads += grad_coef * (p - a)``; returns the per-tensor ``(coef/2) * sum (p - a)^2``."""
    if not params:
        return _empty(device)
    with torch.no_grad():  # an in-place op: its results are values, not a graph
        sums = be.ewc_penalty_grad_(params, anchors, grads, grad_coef)
    return (0.5 * coef) * sums


def ewc_penalty_grad_(
    params: Tensors, anchors: Tensors, grads: Tensors, importance, lam: float, *, backend: str = "auto"
) -> torch.Tensor:
    """Per tensor ``(lam/2) * F_i * sum_j (p_ij - a_ij)**2``; in the same pass ``grads[i] += lam*F_i*(p_i - a_i)``.

    The fast path for a training loop: call it after backward, before gradient clipping and the optimizer
    step. Returns the per-tensor penalties (sum them for the total). ``importance`` is checked each call:
    on the host if it is a CPU tensor or a sequence (then copied to the device), with one host sync if it
    is a device tensor. In a loop, build an ``EWCPenaltyGrad`` once per stage instead (checked once).
    """
    lam = V.check_scalar("lam", lam, float32=True)
    (params, anchors, grads), device, be = _prepare("ewc_penalty_grad_", backend, params, anchors, grads)
    coef = _coefficients(importance, lam, len(params)).to(device)
    return _ewc_penalty_grad(be, params, anchors, grads, coef, coef, device)


class EWCPenaltyGrad:
    """``ewc_penalty_grad_`` with the coefficients ``lam * F_i`` checked once: the per-step path.

    Build it when the importance changes (a stage boundary): ``importance`` and ``lam`` are checked then
    (every ``lam * F_i`` finite and within float32; one host sync if ``importance`` is a device tensor) and
    the coefficients are put on ``device``. A call checks the tensor lists (metadata and addresses: shapes,
    dtypes, devices, overlaps) and a float ``scale`` on the host, and never synchronises with the device (a
    one-element tensor ``scale``, e.g. a GradScaler's, is used as it is: unchecked, never read back).

        penalty = ops.EWCPenaltyGrad(F, lam, device=params[0].device)   # once per stage
        per_tensor = penalty(params, anchors, grads)                    # every step, after backward
    """

    def __init__(self, importance, lam: float, *, device: torch.device | str = "cpu"):
        self.lam = V.check_scalar("lam", lam, float32=True)
        importance = V.as_vector("importance", importance)
        if importance.dim() != 1:
            raise ValueError(f"importance must be 1-D (one entry per tensor), got shape {tuple(importance.shape)}")
        coef = _coefficients(importance, self.lam, importance.numel())
        # the largest |lam * F_i| and where it is, on the host: a call checks its scale against it
        self._max_at = int(coef.abs().argmax()) if coef.numel() else 0
        self._max = abs(float(coef[self._max_at])) if coef.numel() else 0.0
        self.coef = coef.to(device)

    def __call__(self, params: Tensors, anchors: Tensors, grads: Tensors, *, scale: float = 1.0,
                 backend: str = "auto") -> torch.Tensor:
        """Per tensor ``(lam/2) F_i sum (p - a)^2``; ``grads[i] += scale * lam * F_i * (p_i - a_i)`` in the same
        pass (``scale``: a loss scale the gradients carry, e.g. a GradScaler's before ``unscale_``)."""
        if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.is_floating_point():
            scale = scale.reshape(())  # on the device: multiplied in there, never read back
        else:
            scale = V.check_scalar("scale", scale, float32=True)
            if abs(scale) * self._max > V.FLOAT32_MAX:
                raise ValueError(f"scale * lam * importance[{self._max_at}] = {scale:g} * {self._max:g} overflows "
                                 f"float32 (+-{V.FLOAT32_MAX:.4g}); the gradient would be inf or NaN")
        (params, anchors, grads), device, be = _prepare("ewc_penalty_grad_", backend, params, anchors, grads)
        if len(params) != self.coef.numel():
            raise ValueError(f"params has {len(params)} tensors but importance has {self.coef.numel()} entries")
        if params and self.coef.device != device:
            raise ValueError(f"params[0] is on {device} but the coefficients are on {self.coef.device}; "
                             f"build EWCPenaltyGrad with device={str(device)!r}")
        if isinstance(scale, torch.Tensor):
            grad_coef = (self.coef * scale.to(self.coef.device)).to(torch.float32)
        else:
            grad_coef = self.coef if scale == 1.0 else self.coef * scale
        return _ewc_penalty_grad(be, params, anchors, grads, self.coef, grad_coef, device)


def ewc_penalty(params: Tensors, anchors: Tensors, importance, lam: float, *, backend: str = "auto") -> torch.Tensor:
    """The total penalty ``sum_i (lam/2) * F_i * sum_j (p_ij - a_ij)**2`` as a differentiable scalar.

    Gradients flow to ``params`` (``lam * F_i * (p_i - a_i)``, one fused pass from the saved inputs, no
    parameter-sized temporary) and to ``importance`` if it requires grad; anchors are constants. Use it as
    a loss term (it traces under ``torch.compile(fullgraph=True)``); ``ewc_penalty_grad_`` is the faster
    in-place path. ``importance`` is checked each call as in ``ewc_penalty_grad_`` (a device tensor: one host
    sync; under torch.compile that check is skipped, lam's is not).
    """
    lam = V.check_scalar("lam", lam, float32=True)
    (params, anchors), device, be = _prepare("squared_change", backend, params, anchors)
    n = len(params)
    F = V.check_vector("importance", importance, n, device, lam=lam)
    if isinstance(importance, torch.Tensor) and importance.requires_grad:
        F = importance.to(device)  # checked above; gradients flow to it
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=device if device is not None else "cpu")
    sums = be.squared_change(params, [a.detach() for a in anchors])
    return (0.5 * lam) * (F * sums).sum()


def lerp_(dst: Tensors, a: Tensors, b: Tensors, weights, *, backend: str = "auto") -> None:
    """Multi-tensor model averaging: ``dst[i] <- (1 - w_i) * a[i] + w_i * b[i]``, one weight per tensor.

    ``dst[i]`` may be ``a[i]`` or ``b[i]`` itself (in-place averaging); any other overlap with a written
    tensor is refused. With theta_pre = a (the SFT model) and theta_post = b (the aligned model), w is the
    paper's alpha: 0 returns the SFT model, 1 the aligned one.
    """
    (dst, a, b), device, be = _prepare("lerp_", backend, dst, a, b)
    w = V.check_vector("weights", weights, len(dst), device)
    if dst:
        with torch.no_grad():
            be.lerp_(dst, a, b, w)


def adamw_ewc_step_(params: Tensors, grads: Tensors, exp_avg: Tensors, exp_avg_sq: Tensors, anchors: Tensors,
                    importance, lam: float, *, lr, weight_decay, step, betas=(0.9, 0.999), eps: float = 1e-8,
                    backend: str = "auto") -> torch.Tensor:
    """One ``torch.optim.AdamW`` step of every tensor, with the EWC gradient inside, in one fused pass.

    The gradient of tensor i is ``grads[i] + lam * F_i * (params[i] - anchors[i])``, exactly as if the penalty
    were a loss term (coupled: it enters both moments); then decoupled weight decay ``p *= 1 - lr_i * wd_i``,
    the moments and the bias-corrected update, in the order of torch's AdamW (no amsgrad, no maximize).
    ``grads`` is only read. Returns the per-tensor penalty ``(lam/2) F_i ||p_i - a_i||^2`` before the step.

    ``params`` (float32 / bfloat16 / float16), ``exp_avg`` and ``exp_avg_sq`` (float32) are updated in place;
    ``grads[i]`` has the dtype of ``params[i]``; ``anchors[i]`` may be ``params[i]`` itself (a tensor without an
    anchor: give it importance 0). ``lr`` and ``weight_decay`` (>= 0): a float or one value per tensor; ``step``:
    the step number this call makes (1 on the first step), an int or one per tensor (bias correction
    ``1 - beta**step``). The per-tensor values are host values (a sequence, a number, a CPU tensor; a device
    tensor costs a sync), checked on the host and sent to the device as one packed [5, n] tensor per call.
    """
    lam = V.check_scalar("lam", lam, float32=True)
    beta1, beta2 = _check_betas(betas)
    eps = _nonnegative("eps", V.check_scalar("eps", eps, float32=True))
    lists, device, be = _prepare("adamw_ewc_step_", backend, params, grads, exp_avg, exp_avg_sq, anchors)
    n = len(lists[0])
    coef = _coefficients(importance, lam, n).cpu()
    lr, weight_decay = _per_tensor("lr", lr, n), _per_tensor("weight_decay", weight_decay, n)
    steps = _per_tensor("step", step, n)
    if n and not torch.compiler.is_compiling():
        for name, vec in (("lr", lr), ("weight_decay", weight_decay)):
            if bool((vec < 0).any()):
                bad = int((vec < 0).nonzero()[0, 0])
                raise ValueError(f"{name}[{bad}] is {vec[bad].item():g}; it must be >= 0")
        wrong = (steps < 1) | (steps != steps.round())
        if bool(wrong.any()):
            bad = int(wrong.nonzero()[0, 0])
            raise ValueError(f"step[{bad}] is {steps[bad].item():g}; steps are whole numbers >= 1 (the first is 1)")
    if not n:
        return _empty(device)
    packed = torch.stack([coef.double(), lr, weight_decay, 1 - beta1 ** steps, 1 - beta2 ** steps]).to(torch.float32)
    if device.type == "cuda" and not torch.compiler.is_compiling():
        packed = packed.pin_memory()  # the copy below is then asynchronous
    vectors = packed.to(device, non_blocking=True).unbind(0)
    return _adamw_ewc_step(be, lists, vectors, beta1, beta2, eps)


def _adamw_ewc_step(be, lists, vectors, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    with torch.no_grad():  # an in-place op: its results are values, not a graph
        sums = be.adamw_ewc_step_(*lists, *vectors, beta1, beta2, eps)
    return (0.5 * vectors[0]) * sums


def _adamw_ewc_step_vectors(params: Tensors, grads: Tensors, exp_avg: Tensors, exp_avg_sq: Tensors, anchors: Tensors,
                            vectors: Sequence[torch.Tensor], *, betas: tuple[float, float], eps: float,
                            backend: str = "auto") -> torch.Tensor:
    """``adamw_ewc_step_`` given its five per-tensor vectors (coef = lam F_i, lr, weight_decay, 1 - beta1**step,
    1 - beta2**step: float32 [n] on the tensors' device) and betas / eps, all checked by the caller
    (hbat.optim.HybridAdamW, once per stage or change); the tensor lists are checked here, as by every op."""
    lists, device, be = _prepare("adamw_ewc_step_", backend, params, grads, exp_avg, exp_avg_sq, anchors)
    if not lists[0]:
        return _empty(device)
    return _adamw_ewc_step(be, lists, vectors, betas[0], betas[1], eps)


def _nonnegative(name: str, value: float) -> float:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_betas(betas) -> tuple[float, float]:
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair of floats, got {betas!r}") from None
    beta1, beta2 = V.check_scalar("betas[0]", beta1), V.check_scalar("betas[1]", beta2)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got ({beta1}, {beta2})")
    return beta1, beta2


def _per_tensor(name: str, value, n: int) -> torch.Tensor:
    """A number (every tensor) or one value per tensor, checked on the host (finite, within float32): float64."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((n,), V.check_scalar(name, value, float32=True), dtype=torch.float64)
    vec = V.as_vector(name, value)
    if isinstance(vec, torch.Tensor):
        vec = vec.detach().cpu()
        vec = vec if vec.is_floating_point() else vec.double()  # integer steps
    return V.check_vector(name, vec, n, None).double()


class EWCPenalty(torch.nn.Module):
    """Module wrapper of ``ewc_penalty`` (Liger-style): ``EWCPenalty(lam)(params, anchors, importance)``."""

    def __init__(self, lam: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.lam, self.backend = V.check_scalar("lam", lam, float32=True), backend

    def forward(self, params: Tensors, anchors: Tensors, importance) -> torch.Tensor:
        return ewc_penalty(params, anchors, importance, self.lam, backend=self.backend)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, backend={self.backend!r}"
