"""The compiled backends (C++ CPU and CUDA) share one set of operators, torch.ops.hbat.*, defined in
csrc/bindings/library.cpp; the dispatcher runs the kernel registered for the tensors' device."""
from __future__ import annotations

import torch


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
