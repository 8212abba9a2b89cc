"""Each op's math for the Triton multi-tensor kernel (kernels/ewc.py), one ``@triton.jit`` function per op of the
table (hbat/ops/table.py), named after the op. The C++ kernels' math is csrc/ops/<op>.h: keep both alike.

A function gets, for one block of elements of one tensor, tuples as long as the op's table entry says:
    e  the op's lists in table order, float32 blocks (lists the op does not load hold 0)
    v  the tensor's entry of each per-tensor vector (float32), in the table's order
    s  the call's scalars (float64), in the table's order
and returns (e, sq): a tuple of the op's lists (the stored ones with their new values; the others are not
stored, any value does) and the block's values to sum per tensor (0.0 for an op that does not reduce).
"""
from __future__ import annotations

import triton
import triton.language as tl

from hbat.ops import table


@triton.jit
def squared_change(e, v, s):
    d = e[0] - e[1]  # params, refs
    return e, d * d


@triton.jit
def snapshot_(e, v, s):
    d = e[0] - e[1]  # params, anchors; the anchors take the params' value after their old value was read
    return (e[0], e[0]), d * d


@triton.jit
def ewc_penalty_grad_(e, v, s):
    d = e[0] - e[1]  # params, anchors, grads; v: coef
    return (e[0], e[1], e[2] + v[0] * d), d * d


@triton.jit
def scaled_diff(e, v, s):
    return (e[0], e[1], v[0] * (e[0] - e[1])), 0.0  # params, anchors, out; v: coef


@triton.jit
def lerp_(e, v, s):
    # dst, a, b; v: weights. (1 - w) a + w b keeps both endpoints exact (w = 0 gives a, w = 1 gives b)
    return ((1.0 - v[0]) * e[1] + v[0] * e[2], e[1], e[2]), 0.0


@triton.jit
def adamw_ewc_step_(e, v, s):
    """One torch.optim.AdamW step with grads + coef (params - anchors) as the gradient (csrc/ops/adamw_ewc_step.h
    has the derivation). e: params, grads, exp_avg, exp_avg_sq, anchors; v: coef, lr, weight_decay,
    bias_correction1, bias_correction2; s: beta1, beta2, eps."""
    lr = v[1].to(tl.float64)
    decay = tl.cast(1.0 - lr * v[2].to(tl.float64), tl.float32)
    step_size = tl.cast(lr / v[3].to(tl.float64), tl.float32)
    bc2_sqrt = tl.cast(tl.sqrt(v[4].to(tl.float64)), tl.float32)
    one_minus_beta1 = tl.cast(1.0 - s[0], tl.float32)
    beta2 = tl.cast(s[1], tl.float32)
    one_minus_beta2 = tl.cast(1.0 - s[1], tl.float32)
    eps = tl.cast(s[2], tl.float32)
    d = e[0] - e[4]
    g = e[1] + v[0] * d
    p = e[0] * decay
    m = e[2] + one_minus_beta1 * (g - e[2])
    q = e[3] * beta2 + one_minus_beta2 * g * g
    p = p - step_size * m / (tl.sqrt(q) / bc2_sqrt + eps)
    return (p, e[1], m, q, e[4]), d * d


#: the math of each op of the table, by name
MATH = {name: fn for name, fn in list(globals().items()) if name in table.BY_NAME}


def math_of(name: str):
    """The jit function of op ``name``."""
    if name not in MATH:
        raise LookupError(f"kernels/op_math.py has no math for op {name!r}")
    return MATH[name]
