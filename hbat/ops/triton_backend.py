"""The Triton backend: multi-tensor kernels in the repository's kernels/ folder (installed as hbat.kernels).

Each op is one kernel launch per dtype combination present in the call (usually one) plus, for the
per-tensor sums, one small deterministic reduction launch; see kernels/ewc.py. On CPU tensors it runs only
under Triton's interpreter (TRITON_INTERPRET=1 set before triton is first imported), which the tests use.
"""
from __future__ import annotations

import os

import torch


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason() -> str:
    """"" when the kernels can run here (a CUDA GPU, or the interpreter); otherwise why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means unavailable
        return f"triton is not installed or failed to import ({type(exc).__name__}: {exc}); pip install triton"
    try:
        from hbat.kernels import ewc  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"hbat.kernels.ewc failed to import ({type(exc).__name__}: {exc})"
    if _interpreter_on():
        return ""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch and TRITON_INTERPRET is not set (Triton's CPU interpreter)"
    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as exc:  # noqa: BLE001
        return f"triton has no usable GPU driver ({type(exc).__name__}: {exc})"
    return ""


def sum_sq_diff(params, refs) -> torch.Tensor:
    from hbat.kernels import ewc

    return ewc.sum_sq_diff(params, refs)


def snapshot_(params, anchors) -> torch.Tensor:
    from hbat.kernels import ewc

    return ewc.snapshot_(params, anchors)


def penalty_grad_(params, anchors, grads, coef) -> torch.Tensor:
    from hbat.kernels import ewc

    return ewc.penalty_grad_(params, anchors, grads, coef)


def scaled_diff(params, anchors, coef) -> list[torch.Tensor]:
    from hbat.kernels import ewc

    return ewc.scaled_diff(params, anchors, coef)


def lerp_(dst, a, b, weights) -> None:
    from hbat.kernels import ewc

    ewc.lerp_(dst, a, b, weights)


def adamw_ewc_step_(params, grads, exp_avg, exp_avg_sq, anchors, coef, lr, weight_decay, bias_correction1,
                    bias_correction2, beta1, beta2, eps) -> torch.Tensor:
    from hbat.kernels import ewc

    return ewc.adamw_ewc_step_(params, grads, exp_avg, exp_avg_sq, anchors, coef, lr, weight_decay,
                               bias_correction1, bias_correction2, beta1, beta2, eps)
