"""What hbat.ops refuses, and what it promises autograd, on every backend that runs here.

Refused before anything is written: a written tensor that shares memory with any other tensor of the
call (or with itself), non-finite or overflowing scalars and coefficients. Promised: the version counter
of every written tensor is bumped, so autograd refuses a backward through values an op overwrote.
Also: iterables (generators) are read once, and ops.importance is finite at every finite extreme.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from hbat import ops
from hbat.ops import cpu_backend, prepare, reference, table, validate
from ops_cases import backend_cases

BACKENDS = backend_cases()


def _case(device, n=3, shape=(4, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen).to(device) for _ in range(n)]
    anchors = [torch.randn(shape, generator=gen).to(device) for _ in range(n)]
    grads = [torch.randn(shape, generator=gen).to(device) for _ in range(n)]
    return params, anchors, grads


def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def _unchanged(tensors, before):
    return all(torch.equal(t, b) for t, b in zip(tensors, before))


# ----------------------------------------------------------------------------------------- overlaps
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_written_tensor_listed_twice_is_refused_before_any_write(backend, device):
    params, anchors, grads = _case(device)
    grads[2] = grads[0]
    before = _snapshot(grads)
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[2\] are the same tensor .*tied weights"):
        ops.ewc_penalty_grad_(params, anchors, grads, torch.ones(3), 1.0, backend=backend)
    assert _unchanged(grads, before)
    anchors[1] = anchors[0]
    before = _snapshot(anchors)
    with pytest.raises(ValueError, match=r"anchors\[0\] and anchors\[1\] are the same tensor"):
        ops.snapshot_(params, anchors, backend=backend)
    assert _unchanged(anchors, before)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tied_weights_from_named_parameters_without_dedup(backend, device):
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7, bias=False)).to(device)
    model[1].weight = model[0].weight  # tied input and output embeddings
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    assert len(params) == 2 and params[0] is params[1]
    model(torch.tensor([1, 2], device=device)).sum().backward()
    anchors = [p.detach().clone() for p in params]
    # read-only lists may hold one tensor twice: the change is measured for both entries
    assert ops.squared_change(params, anchors, backend=backend).tolist() == [0.0, 0.0]
    grads = [p.grad for p in params]
    before = _snapshot(grads)
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[1\] are the same tensor"):
        ops.ewc_penalty_grad_(params, anchors, grads, [1.0, 1.0], 1.0, backend=backend)
    assert _unchanged(grads, before)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_partial_overlaps_are_refused_naming_both_lists(backend, device):
    params, anchors, grads = _case(device, shape=(10,))
    buffer = torch.zeros(15, device=device)
    grads[1], grads[2] = buffer[:10], buffer[5:]
    with pytest.raises(ValueError, match=r"grads\[1\] and grads\[2\] overlap in memory; grads is written in place"):
        ops.ewc_penalty_grad_(params, anchors, grads, torch.ones(3), 1.0, backend=backend)
    assert torch.equal(buffer, torch.zeros(15, device=device))
    # a written tensor overlapping a read-only one: the written one is named first
    params, anchors, grads = _case(device, shape=(10,))
    anchors[2] = params[0]
    before = _snapshot(anchors)
    with pytest.raises(ValueError, match=r"anchors\[2\] and params\[0\] are the same tensor"):
        ops.snapshot_(params, anchors, backend=backend)
    grads[1] = params[1]
    with pytest.raises(ValueError, match=r"grads\[1\] and params\[1\] are the same tensor"):
        ops.ewc_penalty_grad_(params, _case(device, shape=(10,))[1], grads, torch.ones(3), 1.0, backend=backend)
    assert _unchanged(anchors, before)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lerp_dst_may_be_a_or_b_at_the_same_index_only(backend, device):
    a, b, _ = _case(device)
    w = torch.tensor([0.25, 0.5, 1.0])
    expected = [torch.empty_like(x) for x in a]
    ops.lerp_(expected, a, b, w, backend=backend)
    in_a, in_b = [x.clone() for x in a], [y.clone() for y in b]
    ops.lerp_(in_a, in_a, b, w, backend=backend)  # dst is a
    ops.lerp_(in_b, a, in_b, w, backend=backend)  # dst is b
    assert _unchanged(in_a, expected) and _unchanged(in_b, expected)
    dst = [x.clone() for x in a]
    before = _snapshot(dst)
    with pytest.raises(ValueError, match=r"dst\[0\] and a\[1\] are the same tensor.*\(dst\[i\] may be a\[i\] or b\[i\] itself\)"):
        ops.lerp_(dst, [dst[0], dst[0], dst[2]], b, w, backend=backend)
    buffer = torch.zeros(2, 4, 3, device=device)
    with pytest.raises(ValueError, match=r"dst\[1\] and b\[1\] overlap in memory"):
        ops.lerp_([dst[0], buffer[0], dst[2]], a, [b[0], buffer.view(-1)[3:15].view(4, 3), b[2]], w, backend=backend)
    assert _unchanged(dst, before) and not buffer.any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_read_only_lists_may_overlap_each_other(backend, device):
    params, _, _ = _case(device)
    assert ops.squared_change(params, params, backend=backend).tolist() == [0.0, 0.0, 0.0]
    shared = params[0]
    F = torch.ones(3)
    assert ops.ewc_penalty([shared, shared, params[2]], [params[1], shared, params[2]], F, 1.0, backend=backend) > 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_overlap_check_is_exact_over_many_tensors(backend, device):
    # one flat buffer cut into adjacent views: touching spans do not overlap, a shifted one does
    n = 300 if backend == "triton" and device == "cpu" else 1500  # Triton's interpreter is slow
    sizes = [1 + (7 * i) % 5 for i in range(n)]
    flat = torch.zeros(sum(sizes), device=device)
    grads = list(flat.split(sizes))
    params = [torch.ones(k, device=device) for k in sizes]
    anchors = [torch.zeros(k, device=device) for k in sizes]
    F = torch.ones(n)
    ops.ewc_penalty_grad_(params, anchors, grads, F, 1.0, backend=backend)
    assert torch.equal(flat, torch.ones_like(flat))
    k = 2 * n // 3
    offset = sum(sizes[:k]) + 1  # grads[k] moved one element right: it overlaps grads[k + 1]
    grads[k] = flat[offset:offset + sizes[k]]
    with pytest.raises(ValueError, match=rf"grads\[{k}\] and grads\[{k + 1}\] overlap in memory"):
        ops.ewc_penalty_grad_(params, anchors, grads, F, 1.0, backend=backend)
    assert torch.equal(flat, torch.ones_like(flat))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_written_view_that_overlaps_itself_is_refused_before_any_write(backend, device):
    params, anchors, _ = _case(device, shape=(12,))
    anchors[2] = torch.zeros(1, device=device).expand(12)
    before = _snapshot(anchors)
    message = r"anchors\[2\] \(shape \(12,\), strides \(0,\)\) " + (
        r"has elements that share memory" if backend == "reference" else r"is not dense in memory")
    with pytest.raises(ValueError, match=message):
        ops.snapshot_(params, anchors, backend=backend)
    assert _unchanged(anchors, before), "anchors 0 and 1 were written before the bad anchor 2 was refused"
    # read-only expanded views are fine on the reference
    if backend == "reference":
        assert ops.squared_change(params, [torch.zeros(1).expand(12)] * 3, backend=backend).shape == (3,)


def _random_call(rng: random.Random, op):
    """Argument lists for ``op`` that are valid or broken in one of the ways check_lists refuses: a wrong dtype,
    shape or rule, a non-contiguous or expanded tensor, a leaf requiring grad in a written list, tensors cut from
    one shared buffer (overlapping or touching), a tensor repeated at the same or another index, a non-tensor."""
    n = rng.randint(1, 6)
    shapes = [(rng.randint(1, 4), rng.randint(1, 5)) for _ in range(n)]
    buffer = torch.zeros(64, dtype=torch.float32)
    lists = []
    for j, spec in enumerate(op.arguments):
        items = []
        for i in range(n):
            dtype = rng.choice((torch.float32, torch.bfloat16, torch.float16))
            if spec.dtype == table.FLOAT32:
                dtype = torch.float32
            elif spec.dtype != table.ANY_FLOAT:  # the dtype of an earlier list's tensor i (if that is a tensor)
                dtype = getattr(lists[op.arguments.index(op.tensor_list(spec.dtype))][i], "dtype", dtype)
            t = torch.rand(shapes[i]).to(dtype)
            fault = rng.random()
            if fault < 0.04:
                t = torch.rand(shapes[i], dtype=torch.float64)
            elif fault < 0.08:
                t = torch.rand(shapes[i][1], shapes[i][0]).to(dtype).t()  # non-contiguous (unless a vector)
            elif fault < 0.12:
                t = torch.rand(shapes[i][0] + 1, shapes[i][1]).to(dtype)
            elif fault < 0.3:
                start = rng.randint(0, 30)  # float32 views of one buffer: overlapping or touching each other
                t = buffer[start:start + shapes[i][0] * shapes[i][1]].view(shapes[i])
            elif fault < 0.4 and lists:
                t = rng.choice(lists)[rng.choice((i, rng.randrange(n)))]  # the very same tensor again
            elif fault < 0.43:
                t = torch.rand(shapes[i]).to(dtype).requires_grad_(True)
            elif fault < 0.45:
                t = torch.zeros(1, dtype=dtype).expand(shapes[i])
            elif fault < 0.46:
                t = 1.0
            items.append(t)
        lists.append(items)
    return lists


@pytest.mark.skipif(not ops.backend_status("cpu", "cpu")[0], reason="the C++ extension is not built")
def test_the_extensions_list_check_passes_exactly_what_python_passes():
    # the native backends ask hbat._C.lists_pass first and skip the Python checks on yes: it must never say yes
    # to what check_lists refuses, and should say yes to what it accepts (or every call pays the Python checks),
    # except calls with a non-contiguous tensor, which Python turns into contiguous views
    rng = random.Random(0)
    outcomes = {True: 0, False: 0}
    for trial in range(3000):
        op = table.OPS[trial % len(table.OPS)]
        lists = _random_call(rng, op)
        try:
            prepare.check_in_python(op, "cpu", {t.name: validate.as_tensor_list(t.name, items)
                                             for t, items in zip(op.arguments, lists)})
            python_passes = True
        except (TypeError, ValueError):
            python_passes = False
        contiguous = all(t.is_contiguous() for items in lists for t in items if isinstance(t, torch.Tensor))
        fast_passes = prepare.lists_pass()(lists, *prepare.list_rules(op.name))
        assert fast_passes == (python_passes and contiguous), (op.name, trial, lists)
        outcomes[fast_passes] += 1
    assert min(outcomes.values()) > 500, outcomes


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dense_tensors_laid_out_alike_run_as_they_are_other_layouts_are_refused(backend, device):
    # channels_last and transposed tensors (what torch's optimizers step in place) run without copies when the
    # tensors at an index share the layout; the native backends stream over memory, so they refuse a mismatch
    gen = torch.Generator().manual_seed(0)

    def lists():
        conv = [torch.randn(2, 3, 4, 5, generator=gen).to(device).to(memory_format=torch.channels_last)
                for _ in range(3)]
        matrix = [torch.randn(5, 3, generator=gen).to(device).t() for _ in range(3)]
        return [[c, m] for c, m in zip(conv, matrix)]

    params, anchors, grads = lists()
    want_grads = [g.contiguous() for g in grads]
    want = ops.ewc_penalty_grad_([p.contiguous() for p in params], [a.contiguous() for a in anchors], want_grads,
                                 [1.0, 2.0], 0.5, backend="reference")
    got = ops.ewc_penalty_grad_(params, anchors, grads, [1.0, 2.0], 0.5, backend=backend)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-6)
    assert grads[0].is_contiguous(memory_format=torch.channels_last) and grads[1].stride() == (1, 3)  # in place
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=1e-5, atol=1e-6)
    ops.snapshot_(params, anchors, backend=backend)
    assert all(torch.equal(a, p) for a, p in zip(anchors, params))
    anchors[1] = anchors[1].contiguous()  # another layout than params[1]
    before = _snapshot(grads)
    if backend == "reference":
        ops.ewc_penalty_grad_(params, anchors, grads, [1.0, 2.0], 0.5, backend=backend)
    else:
        with pytest.raises(ValueError, match=r"anchors\[1\] \(strides \(5, 1\)\) is laid out unlike params\[1\] "
                                             r"\(strides \(1, 3\)\).*one memory layout"):
            ops.ewc_penalty_grad_(params, anchors, grads, [1.0, 2.0], 0.5, backend=backend)
        assert _unchanged(grads, before)


def test_check_lists_refuses_overlaps_for_hybrid_ewc():
    # every op validates through check_lists: the overlap check lives there, not in each op
    params, anchors, grads = _case("cpu")
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[1\] are the same tensor"):
        validate.check_lists({"params": params, "anchors": anchors, "grads": [grads[0], grads[0], grads[2]]},
                                  dtypes=validate.NATIVE_DTYPES, need_dense=True, writable=("grads",))


# ----------------------------------------------------------------------------------------- scalars
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lam_times_importance_overflow_is_refused(backend, device):
    params, anchors, grads = _case(device, n=1)
    params[0] = anchors[0].clone()  # p == a: the true gradient is 0, an overflowing coef gives inf * 0 = NaN
    before = _snapshot(grads)
    with pytest.raises(ValueError, match=r"lam \* importance\[0\] = 1e\+38 \* 10 overflows float32"):
        ops.ewc_penalty_grad_(params, anchors, grads, [10.0], 1e38, backend=backend)
    with pytest.raises(ValueError, match=r"lam \* importance\[0\] = 1e\+38 \* 10 overflows float32"):
        ops.ewc_penalty(params, anchors, [10.0], 1e38, backend=backend)
    with pytest.raises(ValueError, match=r"lam \* importance\[0\] = 1e\+38 \* 10 overflows float32"):
        ops.EWCPenalty(1e38, backend=backend)(params, anchors, torch.tensor([10.0]))
    params3, anchors3, grads3 = _case(device)
    with pytest.raises(ValueError, match=r"lam \* importance\[1\] = 1e\+10 \* 1e\+30 overflows"):
        ops.ewc_penalty_grad_(params3, anchors3, grads3, torch.tensor([1.0, 1e30, 1.0]), 1e10, backend=backend)
    assert _unchanged(grads, before)
    # the largest finite product is accepted, and gives a finite gradient where p == a
    ops.ewc_penalty_grad_(params, anchors, grads, [1.0], 3e38, backend=backend)
    assert _unchanged(grads, before)


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -float("inf"), 1e39, -1e39])
def test_non_finite_or_out_of_range_lam_is_refused_everywhere(lam):
    params, anchors, grads = _case("cpu", n=1)
    message = r"lam must be finite" if lam != lam or abs(lam) == float("inf") else r"lam is -?1e\+39, beyond float32"
    with pytest.raises(ValueError, match=message):
        ops.ewc_penalty_grad_(params, anchors, grads, [0.0], lam)
    with pytest.raises(ValueError, match=message):
        ops.ewc_penalty(params, anchors, [0.0], lam)
    with pytest.raises(ValueError, match=message):
        ops.EWCPenalty(lam)
    with pytest.raises(ValueError, match=message):
        ops.EWCPenaltyGrad([0.0], lam)


def test_importance_and_weights_beyond_float32_are_refused():
    params, anchors, grads = _case("cpu")
    huge = torch.tensor([1.0, 1.0, 1e39], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"importance\[2\] is 1e\+39, beyond float32's range"):
        ops.ewc_penalty_grad_(params, anchors, grads, huge, 1e-3)
    with pytest.raises(ValueError, match=r"importance\[2\] is inf; every entry must be finite"):
        ops.ewc_penalty(params, anchors, [0.0, 1.0, float("inf")], 1.0)
    with pytest.raises(ValueError, match=r"weights\[2\] is 1e\+39, beyond float32's range"):
        ops.lerp_(grads, params, anchors, huge)
    with pytest.raises(ValueError, match=r"f_max is 1e\+39, beyond float32's range"):
        ops.importance([0.0, 1.0], 1e39)


def test_ewc_penalty_grad_object_checks_once_and_scales_the_gradient():
    params, anchors, grads = _case("cpu")
    F = [0.5, 2.0, 1.0]
    expected_grads = [g.clone() for g in grads]
    expected = ops.ewc_penalty_grad_(params, anchors, expected_grads, F, 0.7 * 8.0)
    penalty = ops.EWCPenaltyGrad(F, 0.7)
    got = penalty((p for p in params), anchors, grads, scale=8.0)
    assert all(torch.allclose(g, e) for g, e in zip(grads, expected_grads))
    torch.testing.assert_close(got, expected / 8.0, rtol=1e-5, atol=0)  # the penalty itself is not scaled
    before = _snapshot(grads)
    with pytest.raises(ValueError, match=r"scale must be finite"):
        penalty(params, anchors, grads, scale=float("nan"))
    with pytest.raises(ValueError, match=r"scale \* lam \* importance\[1\] = 3e\+38 \* 1.4 overflows float32"):
        penalty(params, anchors, grads, scale=3e38)
    with pytest.raises(ValueError, match=r"params has 2 tensors but importance has 3 entries"):
        penalty(params[:2], anchors[:2], grads[:2])
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[1\] are the same tensor"):
        penalty(params, anchors, [grads[0], grads[0], grads[2]])
    with pytest.raises(ValueError, match=r"lam \* importance\[0\] = 1e\+38 \* 10 overflows"):
        ops.EWCPenaltyGrad(torch.tensor([10.0]), 1e38)
    with pytest.raises(ValueError, match=r"importance\[1\] is nan"):
        ops.EWCPenaltyGrad([1.0, float("nan")], 1.0)
    with pytest.raises(ValueError, match=r"importance must be 1-D"):
        ops.EWCPenaltyGrad(torch.ones(2, 2), 1.0)
    assert _unchanged(grads, before)


# ----------------------------------------------------------------------------------------- version counters
def _versions(tensors):
    return [t._version for t in tensors]


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_every_written_tensor_gets_its_version_bumped(backend, device, no_grad):
    params, anchors, grads = _case(device)
    read = _versions(params)
    with torch.no_grad() if no_grad else torch.enable_grad():
        v = _versions(anchors)
        ops.snapshot_(params, anchors, backend=backend)
        assert all(new > old for new, old in zip(_versions(anchors), v)), "snapshot_ left an anchor's version"
        v = _versions(grads)
        ops.ewc_penalty_grad_(params, anchors, grads, torch.ones(3), 1.0, backend=backend)
        assert all(new > old for new, old in zip(_versions(grads), v)), "ewc_penalty_grad_ left a grad's version"
        v = _versions(grads)
        ops.EWCPenaltyGrad(torch.ones(3), 1.0, device=device)(params, anchors, grads, backend=backend)
        assert all(new > old for new, old in zip(_versions(grads), v)), "EWCPenaltyGrad left a grad's version"
        v = _versions(anchors)
        ops.lerp_(anchors, anchors, grads, torch.full((3,), 0.5), backend=backend)
        assert all(new > old for new, old in zip(_versions(anchors), v)), "lerp_ left a dst's version"
    assert _versions(params) == read, "a read-only tensor's version changed"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_after_anchors_or_params_were_overwritten_raises(backend, device):
    params, anchors, _ = _case(device)
    leaves = [p.clone().requires_grad_(True) for p in params]
    F = torch.ones(3)
    loss = ops.ewc_penalty(leaves, anchors, F, 1.0, backend=backend)
    ops.snapshot_([p.detach() for p in leaves], anchors, backend=backend)  # a stage boundary
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
        loss.backward()
    loss = ops.ewc_penalty(leaves, anchors, F, 1.0, backend=backend)
    with torch.no_grad():
        ops.lerp_([p.detach() for p in leaves], [p.detach() for p in leaves], params, torch.ones(3), backend=backend)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
        loss.backward()


def test_backend_function_called_directly_bumps_versions():
    # a backend module's functions are the torch operators themselves: calling one bumps what it writes
    if not ops.backend_status("cpu", "cpu")[0]:
        pytest.skip("cpu backend not built")
    for be in (cpu_backend, reference):
        params, anchors, grads = _case("cpu")
        v = _versions(grads)
        be.ewc_penalty_grad_(params, anchors, grads, torch.ones(3))
        assert all(new > old for new, old in zip(_versions(grads), v)), be.__name__


# ----------------------------------------------------------------------------------------- iterables
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_every_list_argument_may_be_a_generator(backend, device):
    params, anchors, grads = _case(device)
    F, w = [0.5, 1.0, 2.0], [0.0, 0.5, 1.0]
    gen = lambda xs: (x for x in xs)  # noqa: E731
    torch.testing.assert_close(ops.squared_change(gen(params), gen(anchors), backend=backend),
                               ops.squared_change(params, anchors, backend=backend))
    torch.testing.assert_close(ops.ewc_penalty(gen(params), gen(anchors), gen(F), 1.0, backend=backend),
                               ops.ewc_penalty(params, anchors, F, 1.0, backend=backend))
    expected_grads = [g.clone() for g in grads]
    expected = ops.ewc_penalty_grad_(params, anchors, expected_grads, F, 1.0, backend=backend)
    got = ops.ewc_penalty_grad_(gen(params), gen(anchors), gen(grads), gen(F), 1.0, backend=backend)
    torch.testing.assert_close(got, expected)
    assert _unchanged(grads, expected_grads)
    expected_dst = [torch.empty_like(p) for p in params]
    ops.lerp_(expected_dst, params, anchors, w, backend=backend)
    dst = [torch.empty_like(p) for p in params]
    ops.lerp_(gen(dst), gen(params), gen(anchors), gen(w), backend=backend)
    assert _unchanged(dst, expected_dst)
    expected_anchors = [p.clone() for p in params]
    ops.snapshot_(gen(params), gen(anchors), backend=backend)
    assert _unchanged(anchors, expected_anchors)
    torch.testing.assert_close(ops.importance(gen([1.0, 2.0]), 1.0), ops.importance([1.0, 2.0], 1.0))


# ----------------------------------------------------------------------------------------- importance
@pytest.mark.parametrize(
    "scale,expected",
    [
        (0.0, [50.0, 50.0]),  # 0 * inf was NaN
        (-1.0, [0.0, 100.0]),
        (1.0, [100.0, 0.0]),
        (1e300, [100.0, 0.0]),
        (-1e300, [0.0, 100.0]),
        (1e-308, [100.0 / (1 + math.e ** -2), 100.0 / (1 + math.e ** 2)]),  # softmax([1, -1]): scaled first
        (-1e-308, [100.0 / (1 + math.e ** 2), 100.0 / (1 + math.e ** -2)]),
    ],
)
def test_importance_is_finite_for_values_spanning_float64(scale, expected):
    got = ops.importance([1e308, -1e308], 100.0, scale=scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_importance_never_nan_at_finite_extremes():
    values = [[1e308, -1e308, 0.0], [-1e308, -1e308], [1e-300, 0.0, -1e-300], [5.0], [1e308, 1e308, -1e308]]
    for acc in values:
        for scale in (0.0, 1e-308, -1e-308, 1e-3, 1.0, -1.0, 1e20, -1e20, 1e308, -1e308):
            got = ops.importance(acc, 10.0, scale=scale)
            assert torch.isfinite(got).all() and abs(got.sum().item() - 10.0) < 1e-4, (acc, scale, got)
    torch.testing.assert_close(ops.importance([1e308, -1e308, 0.0], 30.0, scale=0), torch.full((3,), 10.0))
