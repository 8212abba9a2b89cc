"""The ops the benchmarks time, their inputs, and the providers: the ways to compute each op.

The ops are every op of the op table (hbat/ops/table.py), then ``ewc_penalty`` (not a table op: the
differentiable loss, squared_change forward and its gradient into ``.grad`` backward). A provider is one way to
compute an op:

    hbat-<backend>  the op as hbat.ops runs it, for every op of the table: its tensor lists checked by its table
                    entry (hbat.ops.prepare), then the backend's kernel; one provider per backend that runs here
    naive           a Python loop over the tensors with plain torch ops (the penalty through autograd: what the
                    released HBAT code does)
    foreach         the best plain PyTorch: torch._foreach_* over whole lists
    fisher          the original EWC: one importance float per parameter element, penalty through autograd
                    (the penalty ops only)

A provider of a table op computes what the op's schema says (``table.OpDef.doc``): the same per-tensor sums or new
tensors and the same writes, on the inputs of ``build_inputs`` (the op's argument lists, its vectors and scalars
from VECTORS and SCALARS): benchmarks/test_bench_ops.py cross-checks them. naive and foreach are written by hand,
one entry of BASELINES per op (tests/test_op_table.py fails while a table op has none).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from hbat import ops
from hbat.importance import compute_importance
from hbat.ops import prepare, table

#: the table's ops, then the differentiable penalty loss
OPS = tuple(op.name for op in table.OPS) + ("ewc_penalty",)
#: minimum bytes moved per fp32 element (table.OpDef.min_bytes; ../shared/HBAT.md section 7); ewc_penalty is
#: forward (read p, a) plus a backward into .grad (read p, a, g; write g)
MIN_BYTES = {op.name: op.min_bytes for op in table.OPS}
MIN_BYTES["ewc_penalty"] = MIN_BYTES["squared_change"] + MIN_BYTES["ewc_penalty_grad_"]
PENALTY_OPS = ("ewc_penalty_grad_", "ewc_penalty")
LAM = 1.0
F_MAX = 100.0
#: the reference backend computes in float64: only worth timing on small inputs
REFERENCE_MAX_SIZE = 1_000_000
#: the per-tensor vectors by name (the table names them): a function of the inputs, or one value for every tensor
VECTORS = {
    "coef": lambda x: LAM * x.importance,
    "weights": lambda x: torch.linspace(0.2, 0.8, len(x.params), device=x.importance.device),
    "lr": 1e-3, "weight_decay": 0.01, "bias_correction1": 0.1, "bias_correction2": 1e-3,
}
SCALARS = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
#: lists whose values must not be negative (a second moment: its square root is taken)
NONNEGATIVE = ("exp_avg_sq",)


@dataclass
class Inputs:
    """Everything the providers of one op read, built once and shared (in-place results do not change cost)."""

    lists: dict  # the op's argument lists by name (ewc_penalty: params, anchors, grads)
    vectors: dict  # name -> float32 [n]
    scalars: dict  # name -> float
    importance: torch.Tensor  # [n] float32
    leaves: list = field(default_factory=list)  # params as autograd leaves, .grad = grads (the penalty ops)
    fisher: list = field(default_factory=list)  # per-element importance (fisher provider)

    @property
    def params(self) -> list:
        return next(iter(self.lists.values()))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def host(self, vector: str) -> list:
        """A vector's values as Python floats (how plain PyTorch code holds per-tensor settings)."""
        return self.vectors[vector].tolist()


def _filled(shape, device, generator, scale=1.0, offset=0.0) -> torch.Tensor:
    # rand is several times cheaper than randn on the CPU; the values do not change the cost
    t = torch.empty(shape, device=device, dtype=torch.float32)
    return t.uniform_(-scale + offset, scale + offset, generator=generator)


def _list_names(op: str) -> list:
    return ["params", "anchors", "grads"] if op == "ewc_penalty" else [t.name for t in table.op(op).arguments]


def build_inputs(op: str, shapes, device, *, with_fisher: bool = False, seed: int = 0, random: bool = True) -> Inputs:
    """The op's inputs: its first list near 0, every other list near the first (non-negative where NONNEGATIVE
    says), a list the op only writes zeros (its pages touched before the timing); ``random=False`` fills
    constants instead (several times faster to build; the memory children use it, since no op's cost or
    allocations depend on the values)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def filled(shape, scale=1.0, offset=0.0):
        return _filled(shape, device, gen, scale, offset) if random else torch.full(shape, offset + scale / 2, device=device)

    names = _list_names(op)
    params = [filled(s, 0.02) for s in shapes]
    lists = {names[0]: params}
    for name in names[1:]:
        role = table.READ if op == "ewc_penalty" else table.op(op).tensor_list(name).role
        if role == table.WRITE:
            lists[name] = [torch.zeros_like(p) for p in params]
        else:
            lists[name] = [p + filled(s, 1e-3) for p, s in zip(params, shapes)]
            if name in NONNEGATIVE:
                lists[name] = [t.abs_() for t in lists[name]]
    if random:
        # an importance vector like one of a real stage boundary (HybridEWC's default mode)
        first, second = params, lists[names[1]]
        change = torch.stack([((p - a) ** 2).mean() for p, a in zip(first, second)])
        importance = compute_importance(change, F_MAX).to(device)
    else:
        importance = torch.full((len(shapes),), F_MAX / max(len(shapes), 1), device=device)
    x = Inputs(lists, {}, {}, importance)
    vector_names = () if op == "ewc_penalty" else table.op(op).vectors
    for name in vector_names:
        value = VECTORS[name]
        x.vectors[name] = value(x) if callable(value) else torch.full((len(shapes),), value, device=device)
    x.scalars = {name: SCALARS[name] for name in (() if op == "ewc_penalty" else table.op(op).scalars)}
    if op in PENALTY_OPS:
        x.leaves = [p.detach().requires_grad_(True) for p in params]  # same storage
        for leaf, g in zip(x.leaves, lists["grads"]):
            leaf.grad = g
        if with_fisher:
            x.fisher = [filled(s, 0.5, 0.5) for s in shapes]
    return x


# --------------------------------------------------------------------------------------------- providers
def hbat_provider(op: str, backend: str, x: Inputs) -> Callable[[], object]:
    """Op ``op`` of the table as hbat.ops runs it on ``backend``: the list checks of its table entry, then the
    backend's kernel with the op's vectors and scalars."""
    spec = table.op(op)
    lists = [x.lists[t.name] for t in spec.arguments]
    rest = [x.vectors[v] for v in spec.vectors] + [x.scalars[s] for s in spec.scalars]

    def run():
        checked, _, module = prepare.prepare(op, backend, *lists)
        with torch.no_grad():
            return getattr(module, op)(*checked, *rest)

    return run


def autograd_penalty(leaves, anchors, coefs, lam):
    """sum_i (lam/2) (F_i * (p_i - a_i)**2).sum() as a loss, by a Python loop: the released code's penalty
    when ``coefs`` holds one float per tensor, the original EWC when it holds a per-element Fisher tensor."""
    total = 0.0
    for p, a, f in zip(leaves, anchors, coefs):
        total = total + (lam / 2) * (f * (p - a) ** 2).sum()
    return total


def _penalty_backward(leaves, anchors, coefs, lam):
    total = autograd_penalty(leaves, anchors, coefs, lam)
    total.backward()
    return total.detach()


def _foreach_squares(params, refs) -> torch.Tensor:
    diffs = torch._foreach_sub(params, refs)
    return torch.stack(torch._foreach_norm(diffs)) ** 2


def _naive_sums(params, refs) -> torch.Tensor:
    return torch.stack([((p - r) ** 2).sum() for p, r in zip(params, refs)])


def _naive_penalty_grad_(x: Inputs):
    """The released code's loop through autograd, with coef = lam F_i: grads += coef_i (p - a); the per-tensor sums."""
    anchors, coefs = x.lists["anchors"], x.host("coef")

    def run():
        sums = [((p - a) ** 2).sum() for p, a in zip(x.leaves, anchors)]
        sum(c / 2 * s for c, s in zip(coefs, sums)).backward()
        return torch.stack(sums).detach()
    return run


def _foreach_penalty_grad_(x: Inputs):
    p, a, g, coefs = x.lists["params"], x.lists["anchors"], x.lists["grads"], x.host("coef")

    def run():
        diffs = torch._foreach_sub(p, a)
        sums = torch.stack(torch._foreach_norm(diffs)) ** 2
        torch._foreach_mul_(diffs, coefs)
        torch._foreach_add_(g, diffs)
        return sums
    return run


def _naive_snapshot_(x: Inputs):
    p, a = x.lists["params"], x.lists["anchors"]

    def run():
        sums = _naive_sums(p, a)
        for pi, ai in zip(p, a):
            ai.copy_(pi)
        return sums
    return run


def _foreach_snapshot_(x: Inputs):
    p, a = x.lists["params"], x.lists["anchors"]

    def run():
        sums = _foreach_squares(p, a)
        torch._foreach_copy_(a, p)
        return sums
    return run


def _naive_lerp_(x: Inputs):
    dst, a, b, weights = x.lists["dst"], x.lists["a"], x.lists["b"], x.host("weights")

    def run():
        for d, ai, bi, w in zip(dst, a, b, weights):
            d.copy_((1 - w) * ai + w * bi)
    return run


def _foreach_lerp_(x: Inputs):
    dst, a, b, weights = x.lists["dst"], x.lists["a"], x.lists["b"], x.host("weights")

    def run():
        torch._foreach_copy_(dst, a)
        torch._foreach_lerp_(dst, b, weights)
    return run


def _adamw_settings(x: Inputs):
    """(coef, lr, weight_decay, sqrt(bias_correction2), lr / bias_correction1) per tensor, and beta1, beta2, eps."""
    coef, lr, wd, bc1, bc2 = (x.host(v) for v in ("coef", "lr", "weight_decay", "bias_correction1", "bias_correction2"))
    return (coef, lr, wd, [math.sqrt(c) for c in bc2], [r / c for r, c in zip(lr, bc1)],
            x.scalars["beta1"], x.scalars["beta2"], x.scalars["eps"])


def _naive_adamw_ewc_step_(x: Inputs):
    """torch's single-tensor AdamW (torch.optim.AdamW(foreach=False)) with grads + coef (p - a) as the gradient."""
    p, g, m, v, a = (x.lists[k] for k in ("params", "grads", "exp_avg", "exp_avg_sq", "anchors"))
    coef, lr, wd, bc2_sqrt, step_size, beta1, beta2, eps = _adamw_settings(x)

    def run():
        sums = []
        for i in range(len(p)):
            diff = p[i] - a[i]
            sums.append((diff * diff).sum())
            grad = g[i] + coef[i] * diff
            p[i].mul_(1 - lr[i] * wd[i])
            m[i].lerp_(grad, 1 - beta1)
            v[i].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            p[i].addcdiv_(m[i], (v[i].sqrt() / bc2_sqrt[i]).add_(eps), value=-step_size[i])
        return torch.stack(sums)
    return run


def _foreach_adamw_ewc_step_(x: Inputs):
    """torch's multi-tensor AdamW (torch.optim.AdamW(foreach=True)) with grads + coef (p - a) as the gradient."""
    p, g, m, v, a = (x.lists[k] for k in ("params", "grads", "exp_avg", "exp_avg_sq", "anchors"))
    coef, lr, wd, bc2_sqrt, step_size, beta1, beta2, eps = _adamw_settings(x)
    decay, neg_step = [1 - r * w for r, w in zip(lr, wd)], [-s for s in step_size]

    def run():
        diffs = torch._foreach_sub(p, a)
        sums = torch.stack(torch._foreach_norm(diffs)) ** 2
        torch._foreach_mul_(diffs, coef)
        grads = torch._foreach_add(diffs, g)
        torch._foreach_mul_(p, decay)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, neg_step)
        return sums
    return run


def _naive_penalty(x: Inputs):
    return lambda: _penalty_backward(x.leaves, x.lists["anchors"], x.importance.tolist(), LAM)


def _foreach_penalty(x: Inputs):
    a, F = x.lists["anchors"], x.importance

    def run():
        diffs = torch._foreach_sub(x.leaves, a)  # foreach ops are differentiable
        total = (0.5 * LAM) * (F * torch.stack(torch._foreach_norm(diffs)) ** 2).sum()
        total.backward()
        return total.detach()
    return run


def _lists(*names):
    return lambda x: [x.lists[n] for n in names]


#: the plain-PyTorch providers of every op: name -> {provider: a function of the Inputs giving the callable}
BASELINES = {
    "squared_change": {
        "naive": lambda x: lambda: _naive_sums(*_lists("params", "refs")(x)),
        "foreach": lambda x: lambda: _foreach_squares(*_lists("params", "refs")(x)),
    },
    "snapshot_": {"naive": _naive_snapshot_, "foreach": _foreach_snapshot_},
    "ewc_penalty_grad_": {"naive": _naive_penalty_grad_, "foreach": _foreach_penalty_grad_},
    "scaled_diff": {
        "naive": lambda x: lambda: [c * (p - a) for p, a, c in zip(*_lists("params", "anchors")(x), x.host("coef"))],
        "foreach": lambda x: lambda: list(torch._foreach_mul(torch._foreach_sub(*_lists("params", "anchors")(x)),
                                                             x.host("coef"))),
    },
    "lerp_": {"naive": _naive_lerp_, "foreach": _foreach_lerp_},
    "adamw_ewc_step_": {"naive": _naive_adamw_ewc_step_, "foreach": _foreach_adamw_ewc_step_},
    "ewc_penalty": {"naive": _naive_penalty, "foreach": _foreach_penalty},
}


def _hbat_penalty(backend: str, x: Inputs):
    def run():
        total = ops.ewc_penalty(x.leaves, x.lists["anchors"], x.importance, LAM, backend=backend)
        total.backward()
        return total.detach()
    return run


def make_provider(op: str, provider: str, x: Inputs) -> Callable[[], object]:
    """A no-argument callable that runs ``op`` the way ``provider`` does on the inputs ``x``."""
    if provider.startswith("hbat-"):
        backend = provider[len("hbat-"):]
        return _hbat_penalty(backend, x) if op == "ewc_penalty" else hbat_provider(op, backend, x)
    if provider in BASELINES.get(op, {}):
        return BASELINES[op][provider](x)
    if provider == "fisher" and op in PENALTY_OPS:
        return lambda: _penalty_backward(x.leaves, x.lists["anchors"], x.fisher, LAM)
    raise ValueError(f"provider {provider!r} does not implement {op!r}")


def providers_for(op: str, size: int, device, only: list[str] | None = None) -> list[str]:
    names = [f"hbat-{b}" for b in ops.available_backends(device) if b != "reference" or size <= REFERENCE_MAX_SIZE]
    names += list(BASELINES[op]) + (["fisher"] if op in PENALTY_OPS else [])
    return [n for n in names if only is None or n in only or n.split("-")[0] in only]
