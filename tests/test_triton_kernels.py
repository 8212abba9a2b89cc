"""The Triton kernels themselves (hbat.kernels): chunk tables, launches, dtypes, determinism, GPU compilation.

tests/test_ops.py checks the triton backend through the public API; this file checks what is specific to
the multi-tensor kernels. Without a CUDA GPU it runs under Triton's interpreter on CPU tensors, with tiny
blocks (block=16: chunks of 256 elements) so that small tensors still span several chunks and the
interpreter stays fast.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of triton (conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import ops_cases  # noqa: E402
from adamw_steps import check_steps, make_case, run_steps  # noqa: E402
from hbat.kernels import ewc  # noqa: E402
from hbat.kernels.plan import LaunchGroup, MultiTensorPlan, PlanCache, build_plan  # noqa: E402
from hbat.ops import reference, table  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not ewc.interpreter_on():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SMALL = dict(block=16)  # chunks of 16 * ITERS_PER_CHUNK = 256 elements
SIZES = [0, 1, 3, 16, 17, 255, 256, 257, 1000, 777]


def randn_list(sizes, dtypes, *, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(d).to(DEVICE)
        for n, d in zip(sizes, itertools.cycle(dtypes))
    ]


def cpu(tensors):
    return [t.cpu() for t in tensors]


def assert_sums_close(actual, expected):
    assert actual.dtype == torch.float32 and actual.device.type == DEVICE
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=1e-5, atol=1e-6)


def assert_lists_close(actual, expected):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        torch.testing.assert_close(a.cpu(), e.cpu(), msg=lambda m: f"tensor {i}: {m}")


class CountLaunches:
    """Wraps a Triton kernel to count its launches (kernel[grid](...) calls)."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    chunk, partials = CountLaunches(ewc._multi_tensor_kernel), CountLaunches(ewc._sum_partials_kernel)
    monkeypatch.setattr(ewc, "_multi_tensor_kernel", chunk)
    monkeypatch.setattr(ewc, "_sum_partials_kernel", partials)
    return chunk, partials


# ----------------------------------------------------------------------------------------- the chunk table
class FakeTensor:
    """What build_plan reads from a tensor, without allocating it (for > 2**31 elements)."""

    def __init__(self, numel, dtype=torch.float16, address=1 << 40):
        self._numel, self.dtype, self._address, self.device = numel, dtype, address, torch.device("cpu")

    def numel(self):
        return self._numel

    def data_ptr(self):
        return self._address


def test_plan_chunks_slots_and_dtype_groups():
    sizes = [5, 0, 40, 16, 17]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float32, torch.bfloat16]
    xs = [torch.zeros(n, dtype=d) for n, d in zip(sizes, dtypes)]
    ys = [torch.zeros(n) for n in sizes]
    plan = build_plan([xs, ys], chunk_size=16)
    chunks = plan.chunks.view(-1, 3).tolist()
    # fp32 tensors (0, 3) first, then fp16 (1: empty, no chunk), then bf16 (2, 4); a tensor's chunks are contiguous
    assert chunks == [[0, 0, 5], [3, 0, 16], [2, 0, 16], [2, 16, 32], [2, 32, 40], [4, 0, 16], [4, 16, 17]]
    assert plan.slots.view(-1, 2).tolist() == [[0, 1], [2, 0], [2, 3], [1, 1], [5, 2]]
    assert [(g.chunk_begin, g.chunk_end) for g in plan.groups] == [(0, 2), (2, 7)]  # no launch for fp16
    assert plan.groups[0].dtypes == (torch.float32, torch.float32)
    addresses = plan.addresses.view(-1, 2)
    assert addresses[:, 0].tolist() == [t.data_ptr() for t in xs]
    assert addresses[:, 1].tolist() == [t.data_ptr() for t in ys]


def test_plan_offsets_are_int64_beyond_2_31():
    n = 2**31 + 1000
    plan = build_plan([[FakeTensor(n)], [FakeTensor(n)]], chunk_size=2**20)
    chunks = plan.chunks.view(-1, 3)
    assert chunks.dtype == torch.int64 and len(chunks) == 2049
    assert chunks[-1].tolist() == [0, 2048 * 2**20, n]
    assert plan.slots.tolist() == [0, 2049]


def test_plan_marks_unaligned_groups():
    base = torch.zeros(100)
    unaligned = build_plan([[base[:50]], [base[50:]]], chunk_size=16)  # 200 bytes in: not 16-byte aligned
    assert not unaligned.groups[0].aligned
    assert build_plan([[base[:48]], [base[52:]]], chunk_size=16).groups[0].aligned


def test_plan_cache_hits_on_same_tensors_and_misses_on_new_ones():
    cache = PlanCache(max_entries=2)
    xs, ys = [torch.zeros(10), torch.zeros(3)], [torch.zeros(10), torch.zeros(3)]
    first = cache.get([xs, ys], 16)
    assert cache.get([xs, ys], 16) is first and (cache.hits, cache.misses) == (1, 1)
    assert cache.get([xs, ys], 32) is not first  # chunk size is part of the key
    assert cache.get([[xs[0], xs[1].half()], ys], 16) is not first  # dtype and address are too
    assert len(cache) == 2  # bounded: the oldest entry was evicted


# ----------------------------------------------------------------------------------------- each op vs reference
@pytest.mark.parametrize("case", ops_cases.DTYPE_CASES)
@pytest.mark.parametrize("name", ops_cases.NAMES)
def test_every_op_matches_reference(name, case):
    """Every op of the table through the kernel (ops_cases.SAMPLES), tiny blocks: many chunks per tensor."""
    args = ops_cases.sample_args(name, SIZES, ops_cases.DTYPE_CASES[case], DEVICE, seed=50 + ops_cases.NAMES.index(name))
    ops_cases.check_against_reference(lambda *a: ewc.call(name, *a, **SMALL), name, args)


DTYPE_CASES = {
    "fp32": ((torch.float32,), (torch.float32,), (torch.float32,)),
    "mixed": (FLOATS, (torch.bfloat16, torch.float32), (torch.float16, torch.float32, torch.bfloat16)),
}


@pytest.mark.parametrize("case", DTYPE_CASES)
def test_squared_change_and_snapshot_match_reference(case):
    p_dt, a_dt, _ = DTYPE_CASES[case]
    params = randn_list(SIZES, p_dt, seed=1)
    anchors = randn_list(SIZES, a_dt, seed=2)
    assert_sums_close(ewc.squared_change(params, anchors, **SMALL), reference.squared_change(cpu(params), cpu(anchors)))
    expected = reference.squared_change(cpu(params), cpu(anchors))
    assert_sums_close(ewc.snapshot_(params, anchors, **SMALL), expected)
    for i, (p, a) in enumerate(zip(params, anchors)):
        assert torch.equal(a, p.to(a.dtype)), f"anchor {i} was not overwritten with the params"


@pytest.mark.parametrize("case", DTYPE_CASES)
def test_lerp_matches_reference_including_in_place(case):
    a_dt, b_dt, d_dt = DTYPE_CASES[case]
    a, b = randn_list(SIZES, a_dt, seed=8), randn_list(SIZES, b_dt, seed=9)
    dst = randn_list(SIZES, d_dt, seed=10)
    w = torch.linspace(0.0, 1.0, len(SIZES), device=DEVICE)
    expected = [d.clone().cpu() for d in dst]
    reference.lerp_(expected, cpu(a), cpu(b), w.cpu())
    ewc.lerp_(dst, a, b, w, **SMALL)
    assert_lists_close(dst, expected)
    for alias in ("a", "b"):  # dst may be a or b
        a2, b2 = [t.clone() for t in a], [t.clone() for t in b]
        target = a2 if alias == "a" else b2
        expected = [t.clone().cpu() for t in target]
        reference.lerp_(expected, cpu(a), cpu(b), w.cpu())
        ewc.lerp_(target, a2, b2, w, **SMALL)
        assert_lists_close(target, expected)


def test_default_block_size_matches_reference():
    """The production configuration (BLOCK elements per step, unmasked main loop + masked tail)."""
    sizes = [ewc.BLOCK - 1, ewc.BLOCK, 2 * ewc.BLOCK + 5, 1]
    params, anchors = randn_list(sizes, FLOATS, seed=11), randn_list(sizes, (torch.float32,), seed=12)
    grads = randn_list(sizes, (torch.float32,), seed=13)
    coef = torch.full((len(sizes),), 0.25, device=DEVICE)
    expected_grads = [g.clone().cpu() for g in grads]
    expected = reference.ewc_penalty_grad_(cpu(params), cpu(anchors), expected_grads, coef.cpu())
    assert_sums_close(ewc.ewc_penalty_grad_(params, anchors, grads, coef), expected)
    assert_lists_close(grads, expected_grads)


def test_unaligned_views_use_the_unhinted_kernel_and_stay_correct():
    storage = torch.randn(2 * 700 + 2, device=DEVICE)
    params, anchors = [storage[1:700]], [storage[701:1400]]  # 4-byte offsets: not 16-byte aligned
    plan = build_plan([params, anchors], chunk_size=256)
    assert not plan.groups[0].aligned
    assert_sums_close(ewc.squared_change(params, anchors, **SMALL), reference.squared_change(cpu(params), cpu(anchors)))


def shifted_plan(lists, shift, chunk_size):
    """A plan in which tensor i starts ``shift`` elements before its real data and its chunks cover elements
    [shift, shift + numel): the kernel finds the data only if it indexes past 2**31 with int64 offsets."""
    xs = lists[0]
    addresses = [[t.data_ptr() - shift * t.element_size() for t in row] for row in zip(*lists)]
    assert min(min(a) for a in addresses) > 0
    chunks, slots = [], []
    for i, x in enumerate(xs):
        starts = range(shift, shift + x.numel(), chunk_size)
        slots.append([len(chunks), len(starts)])
        chunks += [[i, s, min(s + chunk_size, shift + x.numel())] for s in starts]
    words = torch.tensor(sum(addresses + chunks + slots, []), dtype=torch.int64, device=DEVICE)
    group = LaunchGroup(tuple(role[0].dtype for role in lists), 0, len(chunks), aligned=True)
    return MultiTensorPlan(words, len(xs), len(lists), len(chunks), chunk_size, (group,))


def test_offsets_beyond_2_31_elements_are_int64():
    """The > 2**31-element case without allocating 8 GiB: element offsets are shifted past 2**31."""
    sizes, shift = [300, 1000], 2**31 + 2**20  # a multiple of every block: the aligned path is valid
    params, anchors = randn_list(sizes, (torch.float16,), seed=30), randn_list(sizes, (torch.bfloat16,), seed=31)
    grads = randn_list(sizes, (torch.float32,), seed=32)
    coef = torch.tensor([0.5, 2.0], device=DEVICE)
    expected_grads = [g.clone().cpu() for g in grads]
    expected = reference.ewc_penalty_grad_(cpu(params), cpu(anchors), expected_grads, coef.cpu())
    block = 16 if DEVICE == "cpu" else ewc.BLOCK
    plan = shifted_plan([params, anchors, grads], shift, chunk_size=block * 16)
    assert_sums_close(ewc.launch(table.op("ewc_penalty_grad_"), plan, [coef], (), block), expected)
    assert_lists_close(grads, expected_grads)


# ----------------------------------------------------------------------------------------- adamw_ewc_step_
@pytest.mark.parametrize("param_dtypes,anchor_dtypes", [((torch.float32,), (torch.float32,)),
                                                        (FLOATS, (torch.bfloat16, torch.float32))], ids=["fp32", "mixed"])
def test_adamw_ewc_step_matches_reference(param_dtypes, anchor_dtypes):
    case = make_case(SIZES, param_dtypes, anchor_dtypes, steps=2, seed=40, device=DEVICE)
    check_steps(lambda *args: ewc.adamw_ewc_step_(*args, **SMALL), case)


def test_adamw_ewc_step_default_block_and_bit_identical_repeats():
    """The production configuration (BLOCK elements per step), and the same state twice gives the same bits."""
    sizes = [ewc.BLOCK - 1, ewc.BLOCK, 2 * ewc.BLOCK + 5, 1, 0]
    check_steps(ewc.adamw_ewc_step_, make_case(sizes, (torch.bfloat16, torch.float32), steps=2, seed=41,
                                                device=DEVICE))
    runs = []
    for _ in range(2):
        ewc.PLANS.clear()
        case = make_case(sizes, (torch.float32,), steps=2, seed=42, device=DEVICE)
        runs.append((run_steps(ewc.adamw_ewc_step_, case), case.params, case.exp_avg, case.exp_avg_sq))
    for a, b in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------- launches, edge cases
def test_one_launch_per_dtype_group_plus_one_reduction(launches):
    chunk, partials = launches
    params = randn_list([7] * 1000, (torch.float32,), seed=14)
    anchors = randn_list([7] * 1000, (torch.float32,), seed=15)
    got = ewc.squared_change(params, anchors, **SMALL)
    assert len(chunk.grids) == 1 and len(partials.grids) == 1
    assert_sums_close(got, reference.squared_change(cpu(params), cpu(anchors)))
    chunk.grids.clear(), partials.grids.clear()
    mixed = [p.to(d) for p, d in zip(params[:30], itertools.cycle(FLOATS))]
    ewc.squared_change(mixed, anchors[:30], **SMALL)
    assert len(chunk.grids) == 3 and len(partials.grids) == 1  # fp32, bf16, fp16 params
    chunk.grids.clear(), partials.grids.clear()
    ewc.lerp_(params[:5], params[:5], anchors[:5], torch.ones(5, device=DEVICE), **SMALL)
    assert len(chunk.grids) == 1 and not partials.grids  # no reduction for lerp_


def test_many_tiny_tensors_with_empty_ones():
    gen = torch.Generator().manual_seed(16)
    sizes = torch.randint(0, 20, (1000,), generator=gen).tolist()
    params, anchors = randn_list(sizes, FLOATS, seed=17), randn_list(sizes, (torch.float32, torch.bfloat16), seed=18)
    got = ewc.squared_change(params, anchors)
    assert_sums_close(got, reference.squared_change(cpu(params), cpu(anchors)))
    assert (got[[i for i, n in enumerate(sizes) if n == 0]] == 0).all()


def test_only_empty_tensors_give_zeros_without_chunk_launches(launches):
    chunk, partials = launches
    params, anchors = [torch.zeros(0, device=DEVICE)] * 3, [torch.zeros(0, device=DEVICE)] * 3
    assert ewc.squared_change(params, anchors).tolist() == [0.0, 0.0, 0.0]
    assert not chunk.grids and len(partials.grids) == 1
    assert ewc.scaled_diff(params, anchors, torch.ones(3, device=DEVICE))[0].shape == (0,)


def test_results_are_bit_identical_run_to_run():
    sizes = [1000, 3, 513, 0, 999]
    params, anchors = randn_list(sizes, FLOATS, seed=19), randn_list(sizes, (torch.float32,), seed=20)
    grads = randn_list(sizes, (torch.float32,), seed=21)
    coef = torch.rand(len(sizes), generator=torch.Generator().manual_seed(22)).to(DEVICE)
    g1, g2 = [g.clone() for g in grads], [g.clone() for g in grads]
    r1 = ewc.ewc_penalty_grad_(params, anchors, g1, coef, **SMALL)
    ewc.PLANS.clear()  # a freshly built table gives the same order too
    r2 = ewc.ewc_penalty_grad_(params, anchors, g2, coef, **SMALL)
    assert torch.equal(r1, r2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_repeated_calls_reuse_the_cached_table():
    params, anchors = randn_list([33, 5], FLOATS, seed=23), randn_list([33, 5], FLOATS, seed=24)
    ewc.PLANS.clear()
    ewc.squared_change(params, anchors, **SMALL)
    ewc.squared_change(params, anchors, **SMALL)
    assert (ewc.PLANS.hits, ewc.PLANS.misses) == (1, 1)


def test_nan_and_inf_propagate_in_every_op():
    params = [torch.ones(300, device=DEVICE), torch.ones(20, device=DEVICE), torch.ones(9, device=DEVICE)]
    anchors = [torch.zeros_like(p) for p in params]
    params[0][280] = float("nan")  # in the second chunk, in the masked tail
    anchors[1][5] = float("inf")
    grads = [torch.zeros_like(p) for p in params]
    coef = torch.ones(3, device=DEVICE)
    sums = ewc.ewc_penalty_grad_(params, anchors, grads, coef, **SMALL)
    assert torch.isnan(sums[0]) and torch.isinf(sums[1]) and sums[2].item() == 9.0
    assert torch.isnan(grads[0][280]) and torch.isinf(grads[1][5]) and grads[2].eq(1).all()
    assert torch.isnan(ewc.squared_change(params, anchors, **SMALL)[0])
    assert torch.isnan(ewc.scaled_diff(params, anchors, coef, **SMALL)[0][280])
    dst = [torch.empty_like(p) for p in params]
    ewc.lerp_(dst, params, anchors, torch.full((3,), 0.5, device=DEVICE), **SMALL)
    assert torch.isnan(dst[0][280]) and torch.isinf(dst[1][5])


def test_chunk_size_must_be_a_multiple_of_the_block():
    x = [torch.zeros(4, device=DEVICE)]
    with pytest.raises(ValueError, match=r"chunk_size \(100\) must be a multiple of block \(16\)"):
        ewc.squared_change(x, x, chunk_size=100, block=16)


def test_backend_reports_available_here():
    from hbat.ops import triton_backend

    assert triton_backend.unavailable_reason() == ""


# ----------------------------------------------------------------------------------------- GPU compilation
def test_kernels_compile_for_sm80_and_sm90_with_vector_loads(tmp_path):
    """Ahead-of-time compilation to PTX/cubin (no GPU needed): no interpreter-only constructs, and the
    aligned main loop uses 16-byte vector loads. Runs in a subprocess because the interpreter is on here."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-m", "hbat.kernels.compile_check", "--arch", "80", "--arch", "90", "--quick"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "_sum_partials_kernel compiled" in result.stdout
