"""The CUDA kernels (csrc/cuda) run on the CPU against the reference, without a GPU.

tests/cuda_emulator builds the unchanged kernel sources with g++ against a stand-in runtime that runs each
block's threads as real threads (barriers for __syncthreads and warp shuffles) and checks every global
access of the kernels for bounds and alignment. This holds the whole CUDA code path below the torch binding
(planner, table, dtype groups, chunking, grid-stride loop, 16-byte vector body, head and tail, scalar path,
bf16/fp16 rounding, deterministic reductions, 64-bit offsets past 2**31 elements) to the reference. Speed,
the GPU memory model and the binding still need a GPU (tests/test_ops.py with the cuda backend).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import ops_cases
from adamw_steps import check_steps, make_case, run_steps
from cuda_emulator import emulator
from ops_cases import assert_sums_close, assert_tensors_close, perturbed, rand_like_list
from optim_cases import STAGES, run_stages, two_setups

from hbat.ops import reference, table

pytestmark = pytest.mark.skipif(emulator.compiler() is None, reason="g++ not found")

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SIZES = [0, 1, 3, 17, 128, 1000, 4097, 65537, 300_001]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return emulator.build(tmp_path_factory.mktemp("cuda-emulator"))


@pytest.fixture
def emu(lib):
    return emulator.EmulatedCuda(lib, num_sms=4)


def _coef(n, seed):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 3


def _penalty_inputs(sizes, p_dtypes, a_dtypes, g_dtypes, *, seed):
    params = rand_like_list(sizes, p_dtypes, "cpu", seed=seed)
    anchors = perturbed(params, a_dtypes, seed=seed + 1)
    grads = rand_like_list(sizes, g_dtypes, "cpu", seed=seed + 2)
    return params, anchors, grads, _coef(len(sizes), seed + 3)


def _reference_ewc_penalty_grad(params, anchors, grads, coef):
    """The reference's per-tensor sums and updated grads (on copies: ``grads`` is left as it is)."""
    expected_grads = [g.clone() for g in grads]
    return reference.ewc_penalty_grad_(params, anchors, expected_grads, coef), expected_grads


@pytest.mark.parametrize("case", ops_cases.DTYPE_CASES)
@pytest.mark.parametrize("name", ops_cases.NAMES)
def test_every_op_matches_reference(emu, name, case):
    """Every op of the table through the emulated kernels (ops_cases.SAMPLES): planner, table, vector body,
    head and tail, dtype groups and reductions, against the reference."""
    args = ops_cases.sample_args(name, SIZES, ops_cases.DTYPE_CASES[case], seed=60 + ops_cases.NAMES.index(name))
    ops_cases.check_against_reference(lambda *a: emu.run(table.op(name), *a), name, args)
    assert emu.stats["vector_accesses"] > 0


@pytest.mark.parametrize("x_dtypes,y_dtypes", [((torch.float32,), (torch.float32,)), (FLOATS, FLOATS[::-1]),
                                               ((torch.bfloat16,), (torch.float32,))])
def test_squared_change(emu, x_dtypes, y_dtypes):
    xs = rand_like_list(SIZES, x_dtypes, "cpu", seed=1)
    ys = perturbed(xs, y_dtypes, seed=2)
    assert_sums_close(emu.squared_change(xs, ys), reference.squared_change(xs, ys))
    assert emu.stats["vector_accesses"] > 0
    if len(x_dtypes) > 1:
        assert emu.stats["groups"] == 3  # one launch per dtype combination present


@pytest.mark.parametrize("anchor_dtype", (torch.float32, torch.bfloat16))
def test_snapshot_refreshes_anchors_exactly(emu, anchor_dtype):
    params = rand_like_list(SIZES, FLOATS, "cpu", seed=3)
    anchors = perturbed(params, (anchor_dtype,), seed=4)
    expected = reference.squared_change(params, anchors)
    assert_sums_close(emu.snapshot_(params, anchors), expected)
    for i, (p, a) in enumerate(zip(params, anchors)):
        assert torch.equal(a, p.to(anchor_dtype)), f"anchor {i}"


@pytest.mark.parametrize("p_dtypes,a_dtypes,g_dtypes", [
    ((torch.float32,), (torch.float32,), (torch.float32,)),
    (FLOATS, (torch.float32, torch.bfloat16), FLOATS),
    ((torch.bfloat16,), (torch.float32,), (torch.float32,)),  # grads in their own dtype (z dispatch)
    ((torch.float16,), (torch.bfloat16,), (torch.bfloat16,)),
])
def test_ewc_penalty_grad(emu, p_dtypes, a_dtypes, g_dtypes):
    params, anchors, grads, coef = _penalty_inputs(SIZES, p_dtypes, a_dtypes, g_dtypes, seed=5)
    expected, expected_grads = _reference_ewc_penalty_grad(params, anchors, grads, coef)
    assert_sums_close(emu.ewc_penalty_grad_(params, anchors, grads, coef), expected)
    assert_tensors_close(grads, expected_grads)


def test_lerp_endpoints_and_aliasing(emu):
    a = rand_like_list(SIZES, FLOATS, "cpu", seed=12)
    b = perturbed(a, FLOATS, seed=13)
    w = torch.linspace(0, 1, len(SIZES))
    w[1] = 0.0  # tensor 0 is empty: the weight-0 endpoint is checked on tensor 1
    expected = [torch.empty_like(x) for x in a]
    reference.lerp_(expected, a, b, w)
    dst = [torch.empty_like(x) for x in a]
    emu.lerp_(dst, a, b, w)
    assert_tensors_close(dst, expected)
    assert torch.equal(dst[1], a[1]) and torch.equal(dst[-1], b[-1].to(dst[-1].dtype))  # weights 0 and 1
    in_a = [x.clone() for x in a]
    emu.lerp_(in_a, in_a, b, w)  # dst is a
    assert_tensors_close(in_a, expected)
    in_b = [x.to(y.dtype) for x, y in zip(b, a)]  # dst is b (same dtype as dst)
    expected_b = [torch.empty_like(x) for x in a]
    reference.lerp_(expected_b, a, [x.clone() for x in in_b], w)
    emu.lerp_(in_b, a, in_b, w)
    assert_tensors_close(in_b, expected_b)


def _views(buffer_dtype, sizes, offsets, seed):
    """Tensors that start `offset` elements into a larger buffer (not 16-byte aligned), with guard elements."""
    gen = torch.Generator().manual_seed(seed)
    buffers, views = [], []
    for n, off in zip(sizes, offsets):
        buf = torch.randn(n + off + 9, generator=gen).to(buffer_dtype)
        buffers.append(buf)
        views.append(buf[off:off + n])
    return buffers, views


@pytest.mark.parametrize("same_offsets", [True, False], ids=["shared-head", "incompatible"])
def test_misaligned_views_use_head_or_scalar_path_within_bounds(emu, same_offsets):
    sizes = [5, 17, 4099, 70001]
    p_off = [1, 3, 5, 7]
    a_off = p_off if same_offsets else [2, 2, 2, 2]
    p_bufs, params = _views(torch.bfloat16, sizes, p_off, seed=14)
    a_bufs, anchors = _views(torch.bfloat16, sizes, a_off, seed=15)
    g_bufs, grads = _views(torch.bfloat16, sizes, p_off, seed=16)
    guards = [g.clone() for g in g_bufs]
    coef = _coef(len(sizes), 17)
    expected, expected_grads = _reference_ewc_penalty_grad(params, anchors, grads, coef)
    got = emu.ewc_penalty_grad_(params, anchors, grads, coef)  # raises on an out-of-bounds or misaligned access
    assert_sums_close(got, expected)
    assert_tensors_close(grads, expected_grads)
    for i, (buf, before, off, n) in enumerate(zip(g_bufs, guards, p_off, sizes)):
        assert torch.equal(buf[:off], before[:off]) and torch.equal(buf[off + n:], before[off + n:]), f"guard {i}"
    if same_offsets:
        assert emu.stats["vector_accesses"] > 0
    else:
        # no common 16-byte head: scalar loads only
        assert emu.stats["vector_accesses"] == 0 and emu.stats["scalar_accesses"] > 0


def test_many_tiny_tensors(emu):
    sizes = torch.randint(0, 40, (1200,), generator=torch.Generator().manual_seed(18)).tolist()
    params = rand_like_list(sizes, FLOATS, "cpu", seed=19)
    refs = perturbed(params, (torch.float32, torch.bfloat16), seed=20)
    assert_sums_close(emu.squared_change(params, refs), reference.squared_change(params, refs))


def test_only_empty_tensors(emu):
    xs = [torch.empty(0), torch.empty(0, 3, dtype=torch.bfloat16)]
    assert emu.squared_change(xs, [x.clone() for x in xs]).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("num_sms", [1, 132])
def test_bit_identical_repeats_and_any_grid(lib, num_sms):
    emu = emulator.EmulatedCuda(lib, num_sms=num_sms)
    params, anchors, grads, coef = _penalty_inputs(SIZES, FLOATS, (torch.float32,), FLOATS, seed=21)
    g1, g2 = [g.clone() for g in grads], [g.clone() for g in grads]
    r1 = emu.ewc_penalty_grad_(params, anchors, g1, coef)
    r2 = emu.ewc_penalty_grad_(params, anchors, g2, coef)
    assert torch.equal(r1, r2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    expected, expected_grads = _reference_ewc_penalty_grad(params, anchors, grads, coef)
    assert_sums_close(r1, expected)
    assert_tensors_close(g1, expected_grads)


def test_nan_and_inf_propagate(emu):
    params = [torch.ones(50), torch.ones(70), torch.ones(9)]
    anchors = [torch.zeros_like(p) for p in params]
    params[0][13] = float("nan")
    anchors[1][5] = float("inf")
    grads = [torch.zeros_like(p) for p in params]
    out = emu.ewc_penalty_grad_(params, anchors, grads, torch.ones(3))
    assert torch.isnan(out[0]) and torch.isinf(out[1]) and out[2].item() == 9.0  # the kernel's raw sum
    assert torch.isnan(grads[0][13]) and torch.isinf(grads[1][5])


def test_every_dtype_combination_of_ewc_penalty_grad(emu):
    sizes = [1, 33, 4100]
    for dx, dy, dz in itertools.product(FLOATS, repeat=3):
        params, anchors, grads, coef = _penalty_inputs(sizes, (dx,), (dy,), (dz,), seed=25)
        expected, expected_grads = _reference_ewc_penalty_grad(params, anchors, grads, coef)
        assert_sums_close(emu.ewc_penalty_grad_(params, anchors, grads, coef), expected)
        assert_tensors_close(grads, expected_grads)


def test_offsets_past_2_to_31_elements(lib):
    # one tensor of 2**31 + 12345 elements in reserved address space; only its last chunks run and only
    # their memory is registered, so an offset that wrapped at 32 bits would fault
    numel = 2**31 + 12345
    try:
        result = emulator.huge_tensor_tail(lib, numel, tail_chunks=3, coef=0.75)
    except MemoryError as exc:
        pytest.skip(f"{exc} (this machine does not overcommit)")
    chunk = result["chunk_size"]
    tail_begin = (-(-numel // chunk) - 3) * chunk
    assert tail_begin < 2**31 < numel and numel % chunk != 0  # the tail crosses 2**31 and ends in a partial chunk
    assert result["wrong_grads"] == 0
    torch.testing.assert_close(torch.tensor(result["partials"]), torch.tensor(result["exact"]), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------- adamw_ewc_step_
@pytest.mark.parametrize("param_dtypes,anchor_dtypes", [
    ((torch.float32,), (torch.float32,)),
    ((torch.bfloat16,), (torch.float32,)),
    (FLOATS, (torch.bfloat16, torch.float16)),
], ids=["fp32", "bf16", "mixed"])
def test_adamw_ewc_step(emu, param_dtypes, anchor_dtypes):
    check_steps(emu.adamw_ewc_step_, make_case(SIZES, param_dtypes, anchor_dtypes, steps=2, seed=30))
    assert emu.stats["vector_accesses"] > 0


@pytest.mark.parametrize("same_offsets", [True, False], ids=["shared-head", "incompatible"])
def test_adamw_ewc_step_on_misaligned_views(emu, same_offsets):
    case = make_case([5, 17, 4099, 70001], (torch.bfloat16,), steps=1, seed=31)
    offsets = [1, 3, 5, 7]
    buffers = []

    def view_of(t, off, dtype):  # t's values, `off` elements into a buffer with guard elements
        buf = torch.full((t.numel() + off + 9,), 7.0, dtype=dtype)
        buf[off:off + t.numel()] = t
        buffers.append((buf, off, t.numel(), buf.clone()))
        return buf[off:off + t.numel()]

    case.params = [view_of(p, o, torch.bfloat16) for p, o in zip(case.params, offsets)]
    case.grads = [[view_of(g, o, torch.bfloat16) for g, o in zip(case.grads[0], offsets)]]
    # fp32 lists at the same offsets share the bf16 lists' head (h = -offset mod 8); 2 fp32 elements in is 8 bytes
    # into 16, which no odd head aligns
    state_offsets = offsets if same_offsets else [2, 2, 2, 2]
    case.exp_avg = [view_of(m, o, torch.float32) for m, o in zip(case.exp_avg, state_offsets)]
    case.exp_avg_sq = [view_of(v, o, torch.float32) for v, o in zip(case.exp_avg_sq, state_offsets)]
    case.anchors = [view_of(a, o, torch.float32) for a, o in zip(case.anchors, offsets)]
    check_steps(emu.adamw_ewc_step_, case)  # raises on an out-of-bounds or misaligned access
    for i, (buf, off, n, before) in enumerate(buffers):
        assert torch.equal(buf[:off], before[:off]) and torch.equal(buf[off + n:], before[off + n:]), f"guard {i}"
    if same_offsets:
        assert emu.stats["vector_accesses"] > 0
    else:
        assert emu.stats["vector_accesses"] == 0 and emu.stats["scalar_accesses"] > 0


@pytest.mark.parametrize("num_sms", [1, 132])
def test_adamw_ewc_step_bit_identical_for_any_grid(lib, num_sms):
    emu = emulator.EmulatedCuda(lib, num_sms=num_sms)
    checked, repeated = make_case(SIZES, FLOATS, steps=2, seed=32), make_case(SIZES, FLOATS, steps=2, seed=32)
    check_steps(emu.adamw_ewc_step_, checked)
    run_steps(emu.adamw_ewc_step_, repeated)
    for name in ("params", "exp_avg", "exp_avg_sq"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(checked, name), getattr(repeated, name))), name


def test_hybrid_adamw_on_the_emulated_kernels(emu, monkeypatch):
    """hbat.optim.HybridAdamW with every op on the emulated CUDA kernels equals torch AdamW + ewc.apply_()."""
    import hbat.ops.prepare

    calls = []

    class Recorded:  # the emulator's ops, recording which ran
        def __getattr__(self, name):
            calls.append(name)
            return getattr(emu, name)

    resolve = hbat.ops.prepare.resolve_traceable
    monkeypatch.setattr(hbat.ops.prepare, "resolve_traceable", lambda backend, device: ("cpu", Recorded())
                        if backend == "reference" else resolve(backend, device))
    ref, mine = two_setups("reference", "cpu")
    run_stages([ref[:3], mine[:3]], stages=STAGES[:3], steps=2)
    assert {"adamw_ewc_step_", "ewc_penalty_grad_", "snapshot_"} <= set(calls)
