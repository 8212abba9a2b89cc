"""adamw_ewc_step_: the float64 reference against torch.optim.AdamW with the EWC penalty as a loss term, and the
C++ CPU kernel against the reference (the Triton and emulated CUDA kernels: test_triton_kernels.py and
test_cuda_emulated.py, with the same cases from adamw_steps.py)."""
from __future__ import annotations

import pytest
import torch

from adamw_steps import BETAS, EPS, check_steps, make_case, run_steps, step_args
from hbat import ops
from hbat.ops import cpu_backend, reference
from ops_cases import backend_cases

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SIZES = [0, 1, 3, 17, 128, 1000, 4097, 65537, 300_001]

BACKENDS = backend_cases(("reference", "cpu", "triton", "cuda"))
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


# ----------------------------------------------------------------------------------------- hbat.ops.adamw_ewc_step_
def _public_step(backend, case, k, **overrides):
    """Step k of the case through the public op: F = coef and lam = 1, per-tensor lr / weight decay / step."""
    kwargs = dict(lr=case.lr.cpu(), weight_decay=case.weight_decay.cpu(), step=case.steps + 1, betas=BETAS, eps=EPS,
                  backend=backend)
    kwargs.update(overrides)
    return ops.adamw_ewc_step_(case.params, case.grads[k], case.exp_avg, case.exp_avg_sq, case.anchors,
                               case.coef.cpu(), 1.0, **kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_public_op_is_torch_adamw_with_the_penalty_as_a_loss_term(backend, device):
    sizes = [0, 1, 3, 17, 130] if backend == "triton" else [0, 1, 3, 17, 1000, 4097]
    case = make_case(sizes, steps=3, seed=11, device=device)
    before = [p.detach().cpu().clone() for p in case.params]
    penalties = []
    for k in range(3):
        versions = [p._version for p in case.params]
        penalties.append(_public_step(backend, case, k))
        assert all(p._version > v for p, v in zip(case.params, versions)), "params' version counters not bumped"
        case.steps += 1
    want_penalty = torch.stack([0.5 * c * (p.double() - a.cpu().double()).square().sum()
                                for p, a, c in zip(before, case.anchors, case.coef.cpu())]).float()
    torch.testing.assert_close(penalties[0].cpu(), want_penalty, rtol=1e-5, atol=1e-6)
    want, _ = torch_adamw_steps(make_case(sizes, steps=3, seed=11).cpu_copy(), 3)
    for i, (got, p) in enumerate(zip(case.params, want)):
        torch.testing.assert_close(got.cpu(), p.detach(), rtol=2e-6, atol=1e-6, msg=lambda m: f"params[{i}]: {m}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_public_op_with_scalar_settings_and_bf16_params(backend, device):
    case = make_case([3, 40, 7], (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), steps=1, seed=12,
                     device=device)
    expected = case.cpu_copy()
    got = _public_step(backend, case, 0, lr=0.01, weight_decay=0.1, step=1)
    want = _public_step("reference", expected, 0, lr=0.01, weight_decay=0.1, step=1)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    for name in ("params", "exp_avg", "exp_avg_sq"):
        for a, e in zip(getattr(case, name), getattr(expected, name)):
            assert a.dtype == e.dtype
            torch.testing.assert_close(a.cpu(), e, rtol=1e-5 if a.dtype == torch.float32 else None,
                                       atol=1e-6 if a.dtype == torch.float32 else None)


def test_public_op_empty_lists_and_anchors_that_are_the_params():
    assert ops.adamw_ewc_step_([], [], [], [], [], [], 1.0, lr=0.1, weight_decay=0.0, step=1).shape == (0,)
    case = make_case([5], steps=1, seed=13)
    case.anchors = list(case.params)  # no anchor: d = 0 whatever the importance
    penalty = _public_step("reference", case, 0)
    assert penalty.tolist() == [0.0]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("change,message", [
    (lambda c: c.exp_avg.__setitem__(1, c.exp_avg[1].bfloat16()), r"exp_avg\[1\] has dtype bfloat16; exp_avg must be float32"),
    (lambda c: c.grads[0].__setitem__(2, c.grads[0][2].float()),
     r"grads\[2\] has dtype float32 but params\[2\] has bfloat16; grads must have the dtype of params"),
    (lambda c: c.exp_avg_sq.__setitem__(2, torch.zeros(4, device=c.coef.device)),
     r"exp_avg_sq\[2\] has shape \(4,\) but params\[2\] has shape \(7,\)"),
    (lambda c: c.exp_avg.__setitem__(0, c.params[0]), r"exp_avg\[0\].*params\[0\]|params\[0\].*exp_avg\[0\]"),
], ids=["state-dtype", "grad-dtype", "shape", "overlap"])
def test_public_op_refuses_bad_lists_before_writing(backend, device, change, message):
    case = make_case([3, 5, 7], (torch.float32, torch.float32, torch.bfloat16), steps=1, seed=14, device=device)
    change(case)
    before = [t.clone() for t in case.params + case.exp_avg + case.exp_avg_sq]
    with pytest.raises((TypeError, ValueError), match=message):
        _public_step(backend, case, 0)
    assert all(torch.equal(t, b) for t, b in zip(case.params + case.exp_avg + case.exp_avg_sq, before))


@pytest.mark.parametrize("overrides,message", [
    (dict(step=torch.tensor([1, 0, 1])), r"step\[1\] is 0; steps are whole numbers >= 1"),
    (dict(step=[1, 2.5, 1]), r"step\[1\] is 2.5"),
    (dict(lr=[0.1, 0.1, -0.1]), r"lr\[2\] is -0.1; it must be >= 0"),
    (dict(lr=[0.1, float("nan"), 0.1]), r"lr\[1\] is nan; every entry must be finite"),
    (dict(weight_decay=[0.1, 0.1]), r"weight_decay has shape \(2,\) but there are 3 tensors"),
    (dict(betas=(0.9, 1.0)), r"betas must be in \[0, 1\)"),
    (dict(eps=-1.0), r"eps must be >= 0"),
], ids=["step-0", "step-fraction", "lr-negative", "lr-nan", "wd-length", "betas", "eps"])
def test_public_op_refuses_bad_settings_before_writing(overrides, message):
    case = make_case([3, 5, 7], steps=1, seed=15)
    before = [t.clone() for t in case.params + case.exp_avg + case.exp_avg_sq]
    with pytest.raises(ValueError, match=message):
        _public_step("reference", case, 0, **overrides)
    assert all(torch.equal(t, b) for t, b in zip(case.params + case.exp_avg + case.exp_avg_sq, before))


def test_public_op_refuses_an_importance_that_overflows():
    case = make_case([3, 5], steps=1, seed=16)
    with pytest.raises(ValueError, match=r"lam \* importance\[1\]"):
        ops.adamw_ewc_step_(case.params, case.grads[0], case.exp_avg, case.exp_avg_sq, case.anchors, [1.0, 3e38],
                            10.0, lr=0.1, weight_decay=0.0, step=1)
