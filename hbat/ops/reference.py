"""The reference backend: plain PyTorch, one tensor at a time, accumulation in float64.

This is the ground truth every other backend is tested against. It is written for clarity, not speed:
it allocates a temporary per tensor. It accepts any floating dtype, float64 included, and any strides.

Backend contract (shared by cpu_backend.py, triton_backend.py, cuda_backend.py): a backend module has one
function per op of the table (table.py), named like the op, with its schema's arguments (lists, per-tensor
vectors, scalars); each runs a torch operator of that schema (torch.ops.hbat_reference.* here, see
_library.py). Inputs were validated by hbat.ops (validate.py and prepare.py, from the op's table entry): lists
are non-empty and of equal length, each tensor's dtype follows its list's rule, a written tensor shares no
memory with any other tensor of the call (except the table's ``may_alias`` pairs: lerp_'s dst may be a or b,
adamw_ewc_step_'s anchors may be the params), the vectors are float32 [n] on the tensors' device. The
per-tensor sums of the reducing ops are float32; only the reference returns float64 when given float64 tensors.
"""
from __future__ import annotations

import torch

from . import _library


def _sums64(params, refs) -> torch.Tensor:
    out = torch.zeros(len(params), dtype=torch.float64, device=params[0].device)
    for i, (p, r) in enumerate(zip(params, refs)):
        if p.numel():
            out[i] = (p.to(torch.float64) - r.to(torch.float64)).square().sum()
    return out


def _squared_change(params, refs) -> torch.Tensor:
    return _sums64(params, refs).to(_library.sums_dtype(params, refs))


def _snapshot_(params, anchors) -> torch.Tensor:
    sums = _sums64(params, anchors)
    for p, a in zip(params, anchors):
        a.copy_(p)
    return sums.to(_library.sums_dtype(params, anchors))


def _ewc_penalty_grad_(params, anchors, grads, coef) -> torch.Tensor:
    sums = _sums64(params, anchors)
    for i, (p, a, g) in enumerate(zip(params, anchors, grads)):
        diff = p.to(torch.float64) - a.to(torch.float64)
        g.copy_(g.to(torch.float64) + coef[i].to(torch.float64) * diff)
    return sums.to(_library.sums_dtype(params, anchors, grads))


def _scaled_diff(params, anchors, coef) -> list[torch.Tensor]:
    """coef[i] * (params[i] - anchors[i]), computed in float64, returned contiguous in params[i]'s dtype."""
    return [
        (coef[i].to(torch.float64) * (p.to(torch.float64) - a.to(torch.float64))).to(p.dtype).contiguous()
        for i, (p, a) in enumerate(zip(params, anchors))
    ]


def _lerp_(dst, a, b, weights) -> None:
    for i, (d, x, y) in enumerate(zip(dst, a, b)):
        w = weights[i].to(torch.float64)
        d.copy_((1 - w) * x.to(torch.float64) + w * y.to(torch.float64))


def _adamw_ewc_step_(params, grads, exp_avg, exp_avg_sq, anchors, coef, lr, weight_decay, bias_correction1,
                     bias_correction2, beta1, beta2, eps) -> torch.Tensor:
    """One ``torch.optim.AdamW`` step (decoupled weight decay, bias correction, no amsgrad) whose gradient is
    ``grads[i] + coef[i] * (params[i] - anchors[i])``, in float64; ``grads`` is not modified. Returns the
    per-tensor sums of ``(params - anchors)**2`` before the step. The order of operations is torch's
    ``_single_tensor_adam``; the states are rounded to their dtype (float32) after the step, the params to
    theirs. The per-tensor vectors are ``bias_correction1[i] = 1 - beta1**step_i`` and likewise for beta2."""
    sums = _sums64(params, anchors)
    with torch.no_grad():
        for i, (p, g, m, v, a) in enumerate(zip(params, grads, exp_avg, exp_avg_sq, anchors)):
            c, lr_i, wd, bc1, bc2 = (x[i].to(torch.float64) for x in (coef, lr, weight_decay, bias_correction1,
                                                                       bias_correction2))
            p64, m64, v64 = p.to(torch.float64), m.to(torch.float64), v.to(torch.float64)
            g64 = g.to(torch.float64) + c * (p64 - a.to(torch.float64))
            p64 = p64 * (1 - lr_i * wd)
            m64 = m64 + (1 - beta1) * (g64 - m64)
            v64 = v64 * beta2 + (1 - beta2) * g64 * g64
            p64 = p64 - (lr_i / bc1) * m64 / (v64.sqrt() / bc2.sqrt() + eps)
            p.copy_(p64)
            m.copy_(m64)
            v.copy_(v64)
    return sums.to(_library.sums_dtype(params, grads, exp_avg, exp_avg_sq, anchors))


# every op of the table: its kernel is the function _<op name> above
_library.define("hbat_reference", _library.kernels_named(globals(), "_{}", "hbat/ops/reference.py"))
_library.export_ops("hbat_reference", globals())
