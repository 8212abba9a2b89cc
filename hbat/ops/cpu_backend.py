"""The C++ CPU backend (csrc/cpu): ATen parallel loops, one pass over the data per call."""
from __future__ import annotations

from hbat._ext import load_extension

from ._native import lerp_, penalty_grad_, scaled_diff, snapshot_, sum_sq_diff  # noqa: F401


def unavailable_reason() -> str:
    return load_extension("hbat._C")[1]

from ._native import adamw_ewc_step_  # noqa: E402,F401
