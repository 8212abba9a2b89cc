"""The C++ CPU backend (csrc/cpu): ATen parallel loops, one pass over the data per call."""
from __future__ import annotations

from . import _native
from ._native import adamw_ewc_step_, lerp_, penalty_grad_, scaled_diff, snapshot_, sum_sq_diff  # noqa: F401


def unavailable_reason() -> str:
    return _native.unavailable_reason("hbat._C")
