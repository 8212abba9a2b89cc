"""Every backend of hbat.ops against the float64 reference, on fresh random inputs.

Backends that cannot run here are reported as skipped (cuda without a GPU, triton without triton).
Triton runs under its interpreter on CPU tensors when there is no GPU, so its cases use small sizes.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from hbat import ops
from hbat.ops import reference
from ops_cases import (DTYPE_CASES, FLOATS, NAMES, assert_sums_close, assert_tensors_close, backend_cases,
                       check_against_reference, perturbed, rand_like_list, sample_args)

ANCHOR_DTYPES = (torch.float32, torch.bfloat16)


BACKENDS = backend_cases()
NATIVE = [c for c in BACKENDS if c.values[0] != "reference"]


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def sizes_for(backend, device):
    if _interpreted(backend, device):
        return [0, 1, 3, 17, 128, 1000, 4097]
    return [0, 1, 3, 17, 128, 1000, 4097, 65537, 300_001]


# ----------------------------------------------------------------------------------------- every op of the table
@pytest.mark.parametrize("backend,device", NATIVE)
@pytest.mark.parametrize("case", DTYPE_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_every_op_matches_reference(backend, device, name, case):
    """The backend's function of each op of the table (its schema's arguments, ops_cases.SAMPLES) against the
    float64 reference: what it returns, every list it writes, and the lists it only reads left unchanged."""
    module = importlib.import_module(f"hbat.ops.{backend}_backend")
    args = sample_args(name, sizes_for(backend, device), DTYPE_CASES[case], device, seed=NAMES.index(name))
    check_against_reference(getattr(module, name), name, args)


# ----------------------------------------------------------------------------------------- squared_change
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("p_dtypes,r_dtypes", [((torch.float32,), (torch.float32,)), (FLOATS, ANCHOR_DTYPES[::-1])])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_squared_change_matches_reference(backend, device, p_dtypes, r_dtypes, reduction):
    sizes = sizes_for(backend, device)
    params = rand_like_list(sizes, p_dtypes, device, seed=1)
    refs = perturbed(params, r_dtypes, seed=2)
    got = ops.squared_change(params, refs, reduction=reduction, backend=backend)
    sums = torch.tensor(
        [(p.double().cpu() - r.double().cpu()).square().sum().item() for p, r in zip(params, refs)], dtype=torch.float64
    )
    expected = sums if reduction == "sum" else sums / torch.tensor([max(p.numel(), 1) for p in params])
    assert got.device.type == torch.device(device).type and got.shape == (len(sizes),)
    assert_sums_close(got, expected)
    if reduction == "mean":
        assert got[sizes.index(0)].item() == 0.0  # mean of an empty tensor


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_many_tiny_tensors(backend, device):
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 40, (1200,), generator=gen).tolist()
    params = rand_like_list(sizes, FLOATS, device, seed=4)
    refs = perturbed(params, ANCHOR_DTYPES, seed=5)
    got = ops.squared_change(params, refs, reduction="sum", backend=backend)
    assert_sums_close(got, reference.squared_change([p.cpu() for p in params], [r.cpu() for r in refs]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_list_and_single_element(backend, device):
    assert ops.squared_change([], [], backend=backend).shape == (0,)
    p, r = torch.tensor([3.0], device=device), torch.tensor([1.0], device=device)
    assert ops.squared_change([p], [r], backend=backend).tolist() == [4.0]


# ----------------------------------------------------------------------------------------- snapshot_
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("anchor_dtype", ANCHOR_DTYPES)
def test_snapshot_returns_change_and_overwrites_anchors(backend, device, anchor_dtype):
    sizes = sizes_for(backend, device)
    params = rand_like_list(sizes, FLOATS, device, seed=6)
    anchors = perturbed(params, (anchor_dtype,), seed=7)
    expected = ops.squared_change(params, anchors, backend="reference")
    got = ops.snapshot_(params, anchors, backend=backend)
    assert_sums_close(got, expected)
    for i, (p, a) in enumerate(zip(params, anchors)):
        assert a.dtype == anchor_dtype
        assert torch.equal(a, p.to(anchor_dtype)), f"anchor {i} was not refreshed"
    # a second snapshot of unchanged params measures only the rounding of the cast (zero where exact)
    again = ops.snapshot_(params, anchors, backend=backend)
    assert_sums_close(again, ops.squared_change(params, anchors, backend="reference"))
    assert again[[i for i, p in enumerate(params) if p.dtype in (anchor_dtype, torch.bfloat16)]].abs().max() == 0


# ----------------------------------------------------------------------------------------- ewc_penalty_grad_
def _penalty_case(backend, device, *, seed, p_dtypes=FLOATS, a_dtypes=ANCHOR_DTYPES, g_dtypes=None):
    sizes = sizes_for(backend, device)
    params = rand_like_list(sizes, p_dtypes, device, seed=seed)
    anchors = perturbed(params, a_dtypes, seed=seed + 1)
    g_dtypes = g_dtypes or p_dtypes
    grads = rand_like_list(sizes, g_dtypes, device, seed=seed + 2)
    gen = torch.Generator().manual_seed(seed + 3)
    importance = (torch.rand(len(sizes), generator=gen) * 10).to(device)
    return params, anchors, grads, importance


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "p_dtypes,a_dtypes,g_dtypes",
    [
        ((torch.float32,), (torch.float32,), (torch.float32,)),
        (FLOATS, ANCHOR_DTYPES, None),  # grads in the param dtype, mixed across tensors
        ((torch.bfloat16,), (torch.float32,), (torch.float32,)),  # bf16 weights, fp32 anchor and grads
    ],
)
def test_ewc_penalty_grad_matches_reference(backend, device, p_dtypes, a_dtypes, g_dtypes):
    params, anchors, grads, F = _penalty_case(backend, device, seed=10, p_dtypes=p_dtypes, a_dtypes=a_dtypes,
                                              g_dtypes=g_dtypes)
    lam = 0.7
    expected_grads = [g.clone().cpu() for g in grads]
    expected = ops.ewc_penalty_grad_([p.cpu() for p in params], [a.cpu() for a in anchors], expected_grads, F.cpu(), lam,
                                     backend="reference")
    got = ops.ewc_penalty_grad_(params, anchors, grads, F, lam, backend=backend)
    assert_sums_close(got, expected)
    assert_tensors_close(grads, expected_grads)
    # the returned per-tensor penalties are the paper's (lam/2) F_i ||p_i - a_i||^2
    sums = ops.squared_change(params, anchors, reduction="sum", backend="reference")
    assert_sums_close(got, 0.5 * lam * F.cpu().double() * sums.double())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_results_are_bit_identical_run_to_run(backend, device):
    params, anchors, grads, F = _penalty_case(backend, device, seed=20)
    g1, g2 = [g.clone() for g in grads], [g.clone() for g in grads]
    r1 = ops.ewc_penalty_grad_(params, anchors, g1, F, 1.0, backend=backend)
    r2 = ops.ewc_penalty_grad_(params, anchors, g2, F, 1.0, backend=backend)
    assert torch.equal(r1, r2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert torch.equal(ops.squared_change(params, anchors, backend=backend),
                       ops.squared_change(params, anchors, backend=backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_and_inf_propagate(backend, device):
    params = [torch.ones(50, device=device), torch.ones(70, device=device), torch.ones(9, device=device)]
    anchors = [torch.zeros_like(p) for p in params]
    params[0][13] = float("nan")
    anchors[1][5] = float("inf")
    grads = [torch.zeros_like(p) for p in params]
    out = ops.ewc_penalty_grad_(params, anchors, grads, torch.ones(3, device=device), 1.0, backend=backend)
    assert torch.isnan(out[0]) and torch.isinf(out[1]) and out[2].item() == 4.5
    assert torch.isnan(grads[0][13]) and torch.isinf(grads[1][5])
    assert torch.isnan(ops.squared_change(params, anchors, backend=backend)[0])


# ----------------------------------------------------------------------------------------- ewc_penalty
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ewc_penalty_forward_backward_equal_fused_path(backend, device):
    params, anchors, _, F = _penalty_case(backend, device, seed=30, p_dtypes=(torch.float32,))
    lam = 1.3
    leaves = [p.clone().requires_grad_(True) for p in params]
    total = ops.ewc_penalty(leaves, anchors, F, lam, backend=backend)
    total.backward()
    grads = [torch.zeros_like(p) for p in params]
    per_tensor = ops.ewc_penalty_grad_(params, anchors, grads, F, lam, backend=backend)
    torch.testing.assert_close(total.double(), per_tensor.double().sum(), rtol=1e-5, atol=1e-6)
    for i, (leaf, g) in enumerate(zip(leaves, grads)):
        torch.testing.assert_close(leaf.grad, g, rtol=1e-5, atol=1e-6, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ewc_penalty_saves_no_parameter_sized_temporary(backend, device):
    params = [torch.randn(1000, device=device, requires_grad=True) for _ in range(3)]
    anchors = [torch.randn(1000, device=device) for _ in range(3)]
    inputs = {t.data_ptr() for t in params + anchors}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ops.ewc_penalty(params, anchors, torch.ones(3, device=device), 1.0, backend=backend)
    big_new = [t for t in saved if t.numel() >= 1000 and t.data_ptr() not in inputs]
    assert not big_new, "ewc_penalty saved a parameter-sized temporary for backward"
    loss.backward()


def test_ewc_penalty_gradcheck_float64():
    gen = torch.Generator().manual_seed(40)
    params = [torch.randn(s, dtype=torch.float64, generator=gen, requires_grad=True) for s in (3, 1, 5)]
    anchors = [torch.randn(s, dtype=torch.float64, generator=gen) for s in (3, 1, 5)]
    F = torch.rand(3, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(F, *ps):
        return ops.ewc_penalty(list(ps), anchors, F, 0.9, backend="reference")

    assert torch.autograd.gradcheck(fn, (F, *params))


# ----------------------------------------------------------------------------------------- lerp_
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lerp_matches_reference_and_endpoints(backend, device):
    sizes = sizes_for(backend, device)
    a = rand_like_list(sizes, FLOATS, device, seed=50)
    b = perturbed(a, FLOATS, seed=51)
    w = torch.linspace(0, 1, len(sizes))
    w[1] = 0.0  # tensor 0 is empty: the weight-0 endpoint is checked on tensor 1
    w = w.to(device)
    dst = [torch.empty_like(x) for x in a]
    expected = [torch.empty_like(x).cpu() for x in a]
    ops.lerp_(expected, [x.cpu() for x in a], [y.cpu() for y in b], w.cpu(), backend="reference")
    ops.lerp_(dst, a, b, w, backend=backend)
    assert_tensors_close(dst, expected)
    assert torch.equal(dst[1], a[1].to(dst[1].dtype))  # weight 0 -> a exactly
    assert torch.equal(dst[-1], b[-1].to(dst[-1].dtype))  # weight 1 -> b exactly
    # in place: dst is a
    a_copy = [x.clone() for x in a]
    ops.lerp_(a_copy, a_copy, b, w, backend=backend)
    assert_tensors_close(a_copy, expected)


# ----------------------------------------------------------------------------------------- importance
def test_importance_is_f_max_times_softmax():
    acc = torch.tensor([0.1, -2.0, 3.0, 0.5])
    got = ops.importance(acc, 50.0, scale=2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), 50.0 * torch.softmax(2.0 * acc.double(), 0), rtol=1e-6, atol=1e-6)
    assert abs(got.sum().item() - 50.0) < 1e-4


def test_importance_extremes():
    tiny = torch.tensor([1e-8, 3e-8, 2e-9, 0.0])  # the paper taken literally: almost uniform
    torch.testing.assert_close(ops.importance(tiny, 100.0), torch.full((4,), 25.0), rtol=1e-6, atol=1e-6)
    released = ops.importance(tiny, 100.0, scale=1e20)  # the released code: one-hot
    assert released.tolist() == [0.0, 100.0, 0.0, 0.0]
    huge = ops.importance(torch.tensor([1e308, -1e308, 0.0], dtype=torch.float64), 10.0)
    assert huge.tolist() == [10.0, 0.0, 0.0]
    ties = ops.importance(torch.tensor([5.0, 5.0, -1e30]), 10.0, scale=1e20)
    assert ties.tolist() == [5.0, 5.0, 0.0]
    assert ops.importance(torch.tensor([1.0, 2.0]), 1.0, scale=-1e20).tolist() == [1.0, 0.0]
    assert ops.importance(torch.zeros(0), 5.0).shape == (0,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_importance_rejects_non_finite(bad):
    with pytest.raises(ValueError, match=r"acc_change\[1\]"):
        ops.importance(torch.tensor([0.0, bad]), 1.0)


# ----------------------------------------------------------------------------------------- bad input
def _lists(n=3, device="cpu"):
    params = [torch.randn(4, 3, device=device) for _ in range(n)]
    return params, [p.clone() for p in params], [torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bad_input_is_named_and_nothing_is_modified(backend):
    if not ops.backend_status(backend, "cpu")[0]:
        pytest.skip(f"{backend} not available")
    params, anchors, grads = _lists()
    F = torch.ones(3)
    grads_before = [g.clone() for g in grads]
    anchors_before = [a.clone() for a in anchors]

    with pytest.raises(ValueError, match=r"params has 3 tensors but anchors has 2"):
        ops.ewc_penalty_grad_(params, anchors[:2], grads, F, 1.0, backend=backend)
    bad_shape = anchors[:2] + [torch.zeros(3, 4)]
    with pytest.raises(ValueError, match=r"anchors\[2\] has shape \(3, 4\) but params\[2\] has shape \(4, 3\)"):
        ops.ewc_penalty_grad_(params, bad_shape, grads, F, 1.0, backend=backend)
    with pytest.raises(TypeError, match=r"grads\[2\] has integer/bool dtype int64"):
        ops.ewc_penalty_grad_(params, anchors, grads[:2] + [torch.zeros(4, 3, dtype=torch.int64)], F, 1.0,
                              backend=backend)
    with pytest.raises(TypeError, match=r"anchors\[1\] has complex dtype"):
        ops.snapshot_(params, [anchors[0], anchors[1].to(torch.complex64), anchors[2]], backend=backend)
    with pytest.raises(ValueError, match=r"anchors\[2\] is on meta but params\[0\] is on cpu"):
        ops.snapshot_(params, anchors[:2] + [torch.zeros(4, 3, device="meta")], backend=backend)
    with pytest.raises(ValueError, match=r"importance has shape \(2,\) but there are 3 tensors"):
        ops.ewc_penalty_grad_(params, anchors, grads, torch.ones(2), 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"importance\[1\] is nan"):
        ops.ewc_penalty_grad_(params, anchors, grads, torch.tensor([1.0, float("nan"), 1.0]), 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"lam must be finite"):
        ops.ewc_penalty_grad_(params, anchors, grads, F, float("inf"), backend=backend)
    with pytest.raises(TypeError, match=r"params\[1\] is a str"):
        ops.squared_change([params[0], "x", params[2]], anchors, backend=backend)
    with pytest.raises(TypeError, match=r"sequence of tensors"):
        ops.squared_change(params[0], anchors[0], backend=backend)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        ops.squared_change(params, anchors, reduction="max", backend=backend)
    with pytest.raises(ValueError, match=r"weights has shape \(1,\)"):
        ops.lerp_(anchors, params, grads, torch.ones(1), backend=backend)
    assert all(torch.equal(g, b) for g, b in zip(grads, grads_before)), "a failed call modified grads"
    assert all(torch.equal(a, b) for a, b in zip(anchors, anchors_before)), "a failed call modified anchors"


def test_native_backends_run_dense_layouts_and_refuse_gaps_or_mixed_layouts():
    params, anchors, _ = _lists()
    transposed, transposed_anchors = [p.t() for p in params], [a.t() for a in anchors]  # dense, one layout
    gaps = [torch.cat([p, p], dim=-1)[..., ::2] for p in params]  # every other element: not dense
    want = ops.squared_change(params, anchors, backend="reference")
    assert ops.squared_change(gaps, anchors, backend="reference").shape == (3,)
    native = [b for b in ("cpu", "triton") if ops.backend_status(b, "cpu")[0]]
    for backend in native:
        torch.testing.assert_close(ops.squared_change(transposed, transposed_anchors, backend=backend), want)
        with pytest.raises(ValueError, match=r"params\[0\] .* is not dense in memory"):
            ops.squared_change(gaps, anchors, backend=backend)
        with pytest.raises(ValueError, match=r"refs\[0\] \(strides .*\) is laid out unlike params\[0\]"):
            ops.squared_change(transposed, [a.contiguous() for a in transposed_anchors], backend=backend)


def test_unknown_or_unavailable_backend_is_explained():
    params, anchors, _ = _lists()
    with pytest.raises(RuntimeError, match=r"unknown backend 'fast'"):
        ops.squared_change(params, anchors, backend="fast")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available for cpu tensors"):
        ops.squared_change(params, anchors, backend="cuda")


def test_in_place_targets_must_not_be_grad_leaves():
    params, anchors, _ = _lists()
    leaves = [a.clone().requires_grad_(True) for a in anchors]
    with pytest.raises(ValueError, match=r"anchors\[0\] is a leaf that requires grad"):
        ops.snapshot_(params, leaves)


def test_available_backends_lists_auto_choice_first():
    names = ops.available_backends("cpu")
    assert "reference" in names
    if ops.backend_status("cpu", "cpu")[0]:
        assert names[0] == "cpu"


# ----------------------------------------------------------------------------------------- > 2**31 elements
def _free_bytes(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", [c for c in NATIVE if c.values[0] != "triton" or torch.cuda.is_available()])
def test_more_than_2_31_elements_index_correctly(backend, device):
    n = 2**31 + 7
    if _free_bytes(device) < 2 * 2 * n + (6 << 30):
        pytest.skip("not enough free memory for two 4 GiB tensors")
    params = torch.zeros(n, dtype=torch.float16, device=device)
    anchors = torch.zeros(n, dtype=torch.float16, device=device)
    params[0] = 2.0
    params[-3:] = 1.0  # beyond 2**31: lost by int32 offsets
    got = ops.squared_change([params], [anchors], reduction="sum", backend=backend)
    assert got.item() == 7.0
    ops.snapshot_([params], [anchors], backend=backend)
    assert anchors[-1].item() == 1.0 and anchors[0].item() == 2.0
    del params, anchors
