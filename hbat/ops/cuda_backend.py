"""The CUDA backend (csrc/cuda): multi-tensor kernels registered for the CUDA dispatch key."""
from __future__ import annotations

import torch

from hbat._ext import load_extension

from ._native import lerp_, penalty_grad_, scaled_diff, snapshot_, sum_sq_diff  # noqa: F401


def unavailable_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    why = load_extension("hbat._C")[1] or load_extension("hbat._C_cuda")[1]
    return why

from ._native import adamw_ewc_step_  # noqa: E402,F401
