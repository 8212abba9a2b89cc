"""The compiled backends (C++ CPU and CUDA) share one set of operators, torch.ops.hbat.*, defined in
csrc/bindings/library.cpp; the dispatcher runs the kernel registered for the tensors' device. Their fakes,
the backward of sum_sq_diff and the version bumps of written tensors are registered from Python
(_library.py) as soon as the extension is loaded."""
from __future__ import annotations

import torch

from hbat._ext import load_extension

from . import _library


def unavailable_reason(*extensions: str) -> str:
    """"" once every extension named loaded (and the ops are registered); otherwise why one did not."""
    for name in extensions:
        why = load_extension(name)[1]
        if why:
            return why
    _library.register("hbat")
    return ""


def sum_sq_diff(params, refs) -> torch.Tensor:
    return torch.ops.hbat.sum_sq_diff(params, refs)


def snapshot_(params, anchors) -> torch.Tensor:
    return torch.ops.hbat.snapshot_(params, anchors)


def penalty_grad_(params, anchors, grads, coef) -> torch.Tensor:
    return torch.ops.hbat.penalty_grad_(params, anchors, grads, coef)


def scaled_diff(params, anchors, coef) -> list[torch.Tensor]:
    return torch.ops.hbat.scaled_diff(params, anchors, coef)


def lerp_(dst, a, b, weights) -> None:
    torch.ops.hbat.lerp_(dst, a, b, weights)


def adamw_ewc_step_(params, grads, exp_avg, exp_avg_sq, anchors, coef, lr, weight_decay, bias_correction1,
                    bias_correction2, beta1, beta2, eps) -> torch.Tensor:
    return torch.ops.hbat.adamw_ewc_step_(params, grads, exp_avg, exp_avg_sq, anchors, coef, lr, weight_decay,
                                          bias_correction1, bias_correction2, beta1, beta2, eps)
