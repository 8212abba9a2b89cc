"""Inputs and checks of adamw_ewc_step_ shared by the tests of every backend (test_adamw_ewc_step.py for the
reference and the C++ CPU kernel, test_triton_kernels.py, test_cuda_emulated.py).

A ``Case`` holds the optimizer state of a few steps: params, fp32 moments, anchors, one gradient per step, and
per-tensor coef / lr / weight_decay (every tensor its own settings, as one launch over several param groups).
``step_args`` gives the backend functions' arguments for a step; ``check_step`` runs one step of a backend and of
the float64 reference from the same state and compares them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from hbat.ops import reference

BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass
class Case:
    params: list
    exp_avg: list
    exp_avg_sq: list
    anchors: list
    grads: list  # one list of gradients per step
    coef: torch.Tensor
    lr: torch.Tensor
    weight_decay: torch.Tensor
    steps: torch.Tensor  # the step number of each tensor before the next step (int64, on the CPU)

    def cpu_copy(self) -> "Case":
        """A copy with every tensor on the CPU (what the reference runs on)."""
        lists = [[t.detach().cpu().clone() for t in ts] for ts in (self.params, self.exp_avg, self.exp_avg_sq,
                                                                   self.anchors)]
        grads = [[g.cpu().clone() for g in gs] for gs in self.grads]
        return Case(*lists, grads, self.coef.cpu(), self.lr.cpu(), self.weight_decay.cpu(), self.steps.clone())


def make_case(sizes, param_dtypes=(torch.float32,), anchor_dtypes=(torch.float32,), *, steps=3, seed=0,
              device="cpu") -> Case:
    """Random params near their anchors, gradients of a few steps (in the params' dtype), fresh moments."""
    gen = torch.Generator().manual_seed(seed)

    def randn(n, dtype, scale=1.0):
        return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    dtypes = list(itertools.islice(itertools.cycle(param_dtypes), len(sizes)))
    params = [randn(n, d) for n, d in zip(sizes, dtypes)]
    anchors = [(p.double() + randn(p.numel(), torch.float64, 0.1)).to(a)
               for p, a in zip(params, itertools.cycle(anchor_dtypes))]
    grads = [[randn(n, d) for n, d in zip(sizes, dtypes)] for _ in range(steps)]
    n = len(sizes)
    vec = lambda lo, hi: (lo + (hi - lo) * torch.rand(n, generator=gen)).to(device)  # noqa: E731
    return Case(params, [torch.zeros_like(p, dtype=torch.float32) for p in params],
                [torch.zeros_like(p, dtype=torch.float32) for p in params], anchors, grads,
                coef=vec(0.0, 3.0), lr=vec(1e-3, 3e-2), weight_decay=vec(0.0, 0.1),
                steps=torch.zeros(n, dtype=torch.int64))


def step_args(case: Case, k: int) -> tuple:
    """The arguments of step k (0-based) of every tensor: lists, vectors, scalars in schema order."""
    t = (case.steps + 1).double()
    beta1, beta2 = BETAS
    bc1 = (1 - beta1 ** t).to(torch.float32).to(case.coef.device)
    bc2 = (1 - beta2 ** t).to(torch.float32).to(case.coef.device)
    return (case.params, case.grads[k], case.exp_avg, case.exp_avg_sq, case.anchors,
            case.coef, case.lr, case.weight_decay, bc1, bc2, beta1, beta2, EPS)


def run_steps(fn, case: Case, steps=None) -> list:
    """Run ``fn`` (a backend's adamw_ewc_step_) for the case's steps; returns the per-step sums."""
    sums = []
    for k in range(len(case.grads) if steps is None else steps):
        sums.append(fn(*step_args(case, k)))
        case.steps += 1
    return sums


def assert_step_matches_reference(fn, case: Case, k: int):
    """Step k of ``fn`` and of the reference from the same state; the sums, the params (their dtype's
    tolerance) and the fp32 moments agree, and the gradients are left as they were."""
    expected = case.cpu_copy()
    want = reference.adamw_ewc_step_(*step_args(expected, k))
    grads_before = [g.clone() for g in case.grads[k]]
    got = fn(*step_args(case, k))
    assert got.dtype == torch.float32 and got.device == case.coef.device
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=1e-5, atol=1e-6)
    for name in ("params", "exp_avg", "exp_avg_sq"):
        for i, (a, e) in enumerate(zip(getattr(case, name), getattr(expected, name))):
            assert a.dtype == e.dtype, (name, i)
            fp32 = a.dtype == torch.float32
            torch.testing.assert_close(a.cpu(), e, rtol=1e-5 if fp32 else None, atol=1e-6 if fp32 else None,
                                       msg=lambda m: f"step {k}, {name}[{i}]: {m}")
    assert all(torch.equal(g, g0) for g, g0 in zip(case.grads[k], grads_before)), "grads were modified"
    case.steps += 1


def check_steps(fn, case: Case):
    """Every step of the case through ``fn``, each compared with the reference from the same state."""
    for k in range(len(case.grads)):
        assert_step_matches_reference(fn, case, k)
