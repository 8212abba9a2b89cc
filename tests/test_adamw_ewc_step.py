"""adamw_ewc_step_: the float64 reference against torch.optim.AdamW with the EWC penalty as a loss term, and the
C++ CPU kernel against the reference (the Triton and emulated CUDA kernels: test_triton_kernels.py and
test_cuda_emulated.py, with the same cases from adamw_steps.py)."""
from __future__ import annotations

import pytest
import torch

from adamw_steps import BETAS, EPS, check_steps, make_case, run_steps, step_args
from hbat.ops import cpu_backend, reference

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SIZES = [0, 1, 3, 17, 128, 1000, 4097, 65537, 300_001]

needs_cpu_kernels = pytest.mark.skipif(bool(cpu_backend.unavailable_reason()), reason=cpu_backend.unavailable_reason())


def torch_adamw_steps(case, steps):
    """``steps`` steps of torch.optim.AdamW (one param group per tensor: its own lr and weight decay) whose
    gradient is the case's plus that of the loss term sum_i (coef_i / 2) ||p_i - a_i||^2; returns the params
    and the optimizer."""
    params = [p.detach().clone().requires_grad_(True) for p in case.params]
    groups = [{"params": [p], "lr": float(lr), "weight_decay": float(wd)}
              for p, lr, wd in zip(params, case.lr, case.weight_decay)]
    opt = torch.optim.AdamW(groups, betas=BETAS, eps=EPS, foreach=False)
    for k in range(steps):
        for p, g in zip(params, case.grads[k]):
            p.grad = g.clone()
        penalty = sum(0.5 * c * (p - a).square().sum() for p, a, c in zip(params, case.anchors, case.coef))
        penalty.backward()  # accumulates coef (p - a) into .grad, as any loss term
        opt.step()
    return params, opt


@pytest.mark.parametrize("sizes", [[0, 1, 3, 17, 1000], [257] * 40])
def test_reference_is_torch_adamw_with_the_penalty_as_a_loss_term(sizes):
    case = make_case(sizes, steps=5, seed=1)
    before = [p.clone() for p in case.params]
    sums = run_steps(reference.adamw_ewc_step_, case)
    torch.testing.assert_close(sums[0], torch.stack([(p.double() - a.double()).square().sum()
                                                     for p, a in zip(before, case.anchors)]).float())
    want, opt = torch_adamw_steps(make_case(sizes, steps=5, seed=1), 5)
    for i, (got, p) in enumerate(zip(case.params, want)):
        state = opt.state[p] if p.numel() else None
        torch.testing.assert_close(got, p.detach(), rtol=2e-6, atol=1e-7, msg=lambda m: f"params[{i}]: {m}")
        if state:  # torch rounds each gradient to fp32 (|g| < 4: 5e-7) before the moments; the reference does not
            torch.testing.assert_close(case.exp_avg[i], state["exp_avg"], rtol=2e-6, atol=1e-6)
            torch.testing.assert_close(case.exp_avg_sq[i], state["exp_avg_sq"], rtol=2e-6, atol=1e-8)


@needs_cpu_kernels
def test_cpu_kernel_is_torch_adamw_with_the_penalty_as_a_loss_term():
    case = make_case([0, 1, 3, 17, 1000, 65537], steps=4, seed=2)
    run_steps(cpu_backend.adamw_ewc_step_, case)
    want, _ = torch_adamw_steps(make_case([0, 1, 3, 17, 1000, 65537], steps=4, seed=2), 4)
    for i, (got, p) in enumerate(zip(case.params, want)):
        torch.testing.assert_close(got, p.detach(), rtol=2e-6, atol=1e-7, msg=lambda m: f"params[{i}]: {m}")


@needs_cpu_kernels
@pytest.mark.parametrize("param_dtypes,anchor_dtypes", [
    ((torch.float32,), (torch.float32,)),
    ((torch.bfloat16,), (torch.float32,)),
    (FLOATS, (torch.bfloat16, torch.float32)),
], ids=["fp32", "bf16", "mixed"])
def test_cpu_kernel_matches_reference(param_dtypes, anchor_dtypes):
    check_steps(cpu_backend.adamw_ewc_step_, make_case(SIZES, param_dtypes, anchor_dtypes, steps=3, seed=3))


@needs_cpu_kernels
def test_cpu_kernel_many_tiny_tensors():
    sizes = torch.randint(0, 40, (1000,), generator=torch.Generator().manual_seed(4)).tolist()
    check_steps(cpu_backend.adamw_ewc_step_, make_case(sizes, FLOATS, steps=2, seed=5))


@needs_cpu_kernels
def test_cpu_kernel_is_bit_identical_for_any_thread_count():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            case = make_case(SIZES, (torch.float32, torch.bfloat16), steps=2, seed=6)
            sums = run_steps(cpu_backend.adamw_ewc_step_, case)
            results.append((sums, case.params, case.exp_avg, case.exp_avg_sq))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@needs_cpu_kernels
def test_binding_refuses_states_that_are_not_float32():
    case = make_case([5, 6], (torch.bfloat16,), steps=1, seed=7)
    case.exp_avg_sq[1] = case.exp_avg_sq[1].bfloat16()
    with pytest.raises(RuntimeError, match=r"exp_avg_sq\[1\] has dtype BFloat16; expected float32"):
        torch.ops.hbat.adamw_ewc_step_(*step_args(case, 0))
    case = make_case([5, 6], (torch.bfloat16,), steps=1, seed=7)
    case.grads[0][0] = case.grads[0][0].float()
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype Float; expected the dtype of params\[0\]"):
        torch.ops.hbat.adamw_ewc_step_(*step_args(case, 0))
