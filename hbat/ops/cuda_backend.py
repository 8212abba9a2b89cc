"""The CUDA backend (csrc/cuda): multi-tensor kernels registered for the CUDA dispatch key."""
from __future__ import annotations

import torch

from . import _native
from ._native import adamw_ewc_step_, lerp_, penalty_grad_, scaled_diff, snapshot_, sum_sq_diff  # noqa: F401


def unavailable_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return _native.unavailable_reason("hbat._C", "hbat._C_cuda")  # the CUDA kernels register into hbat._C's schemas
