"""The reference backend: plain PyTorch, one tensor at a time, accumulation in float64.

This is the ground truth every other backend is tested against. It is written for clarity, not speed:
it allocates a temporary per tensor. It accepts any floating dtype, float64 included, and any strides.

Backend contract (shared by cpu_backend.py, triton_backend.py, cuda_backend.py): a backend module has the
five functions below, each a torch operator of the schemas in _library.py (torch.ops.hbat_reference.* here);
inputs were validated by _validate.py: lists are non-empty and of equal length, a written tensor shares
no memory with any other tensor of the call (lerp_'s dst may be a or b), ``coef`` / ``weights`` are float32
vectors on the tensors' device. The per-tensor results (``sum_sq_diff``, ``snapshot_``, ``penalty_grad_``)
are float32 vectors; only the reference returns float64 when given float64 tensors.
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


def _sum_sq_diff(params, refs) -> torch.Tensor:
    return _sums64(params, refs).to(_library.sums_dtype(params, refs))


def _snapshot_(params, anchors) -> torch.Tensor:
    sums = _sums64(params, anchors)
    for p, a in zip(params, anchors):
        a.copy_(p)
    return sums.to(_library.sums_dtype(params, anchors))


def _penalty_grad_(params, anchors, grads, coef) -> torch.Tensor:
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


_ops = _library.define("hbat_reference", {
    "sum_sq_diff": _sum_sq_diff, "snapshot_": _snapshot_, "penalty_grad_": _penalty_grad_,
    "scaled_diff": _scaled_diff, "lerp_": _lerp_,
})
sum_sq_diff = _ops.sum_sq_diff
snapshot_ = _ops.snapshot_
penalty_grad_ = _ops.penalty_grad_
scaled_diff = _ops.scaled_diff
lerp_ = _ops.lerp_
