"""What the tests of hbat.ops share: the backends to run, each op's sample inputs, and the comparisons.

``SAMPLES`` has one entry per op of the op table (hbat/ops/table.py; tests/test_op_table.py fails while an op has
none): the values its per-tensor vectors and scalars take, and which lists must hold non-negative values. From
it ``sample_args`` builds the op's arguments in schema order (lists, vectors, scalars) for any sizes, dtypes
and device, every list's dtype following its rule in the table; ``check_against_reference`` runs a backend's
function on them and the float64 reference on copies, and compares what the op returns and every list it
writes (and that the lists it only reads are unchanged). The opcheck (tests/test_ops_compile.py), every backend
against the reference (tests/test_ops.py), the Triton kernels (tests/test_triton_kernels.py) and the emulated
CUDA kernels (tests/test_cuda_emulated.py) are parametrised over it: a new op's sample is all they need.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch

from hbat import ops
from hbat.ops import reference, table

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
#: dtype cases of the samples: every float list float32, or float32 / bfloat16 / float16 mixed across tensors
#: and lists (list k's tensor i gets FLOATS[(i + k) % 3])
DTYPE_CASES = {"fp32": (torch.float32,), "mixed": FLOATS}
#: odd and empty sizes; some become 2-D (see rand_like_list)
SIZES = [0, 1, 3, 17, 128, 1000, 4097]


# ----------------------------------------------------------------------------------------------- backends
def backend_device(name: str) -> str:
    """cuda needs a GPU; Triton runs on one if there is one, else under its interpreter on the CPU."""
    return "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"


def backend_cases(names=("reference", "cpu", "triton", "cuda")) -> list:
    """pytest params (backend, device), skipped with the reason where a backend cannot run here."""
    cases = []
    for name in names:
        device = backend_device(name)
        ok, why = ops.backend_status(name, device)
        cases.append(pytest.param(name, device, id=name, marks=pytest.mark.skipif(not ok, reason=why)))
    return cases


# ----------------------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class Sample:
    """How an op's arguments are filled: each vector uniform in its (low, high) per tensor, each scalar its
    value; every list standard normal, or its absolute value for the lists in ``nonnegative``."""

    vectors: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)
    nonnegative: tuple = ()


SAMPLES = {
    "squared_change": Sample(),
    "snapshot_": Sample(),
    "ewc_penalty_grad_": Sample(vectors={"coef": (0.0, 3.0)}),
    "scaled_diff": Sample(vectors={"coef": (-2.0, 2.0)}),
    "lerp_": Sample(vectors={"weights": (0.0, 1.0)}),
    "adamw_ewc_step_": Sample(
        vectors={"coef": (0.0, 3.0), "lr": (1e-3, 3e-2), "weight_decay": (0.0, 0.1), "bias_correction1": (0.1, 1.0),
                 "bias_correction2": (1e-3, 1.0)},
        scalars={"beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
        nonnegative=("exp_avg_sq",),
    ),
}
NAMES = list(SAMPLES)


def shape_of(n: int) -> tuple:
    return (n,) if n < 64 or n % 7 else (7, n // 7)  # some 2-D tensors


def rand_like_list(sizes, dtypes, device, *, seed, scale=1.0):
    """Standard normal tensors of the given sizes (some 2-D), the dtypes cycling over them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, dtype in zip(sizes, itertools.cycle(dtypes)):
        out.append((torch.randn(shape_of(n), generator=gen, dtype=torch.float64) * scale).to(dtype).to(device))
    return out


def perturbed(params, dtypes, *, seed):
    """params + 0.1 N(0, 1), the dtypes cycling over the tensors (anchors near their params)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (p.double().cpu() + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(d).to(p.device)
        for p, d in zip(params, itertools.cycle(dtypes))
    ]


def list_dtypes(op: table.OpDef, n: int, dtypes) -> list:
    """Per argument list of ``op``, the dtype of each of its n tensors: its rule in the table; a free ("any
    float") list k takes ``dtypes[(i + k) % len(dtypes)]`` for tensor i."""
    out, free = {}, 0
    for t in op.arguments:
        if t.dtype == table.ANY_FLOAT:
            out[t.name] = [dtypes[(i + free) % len(dtypes)] for i in range(n)]
            free += 1
        elif t.dtype == table.FLOAT32:
            out[t.name] = [torch.float32] * n
        else:
            out[t.name] = list(out[t.dtype])
    return [out[t.name] for t in op.arguments]


def sample_args(name: str, sizes=SIZES, dtypes=FLOATS, device="cpu", *, seed=0) -> tuple:
    """Op ``name``'s arguments in schema order (lists, vectors, scalars), filled as its ``SAMPLES`` entry says."""
    op, sample = table.op(name), SAMPLES[name]
    gen = torch.Generator().manual_seed(seed)
    lists = []
    for t, list_dtype in zip(op.arguments, list_dtypes(op, len(sizes), dtypes)):
        tensors = [torch.randn(shape_of(n), generator=gen, dtype=torch.float64) for n in sizes]
        if t.name in sample.nonnegative:
            tensors = [x.abs() for x in tensors]
        lists.append([x.to(d).to(device) for x, d in zip(tensors, list_dtype)])
    vectors = []
    for v in op.vectors:
        low, high = sample.vectors[v]
        vectors.append((low + (high - low) * torch.rand(len(sizes), generator=gen)).to(device))
    return (*lists, *vectors, *(float(sample.scalars[s]) for s in op.scalars))


# ----------------------------------------------------------------------------------------------- comparisons
def assert_sums_close(actual, expected):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=1e-4, atol=1e-6)


def assert_tensors_close(actual_list, expected_list, what="tensor"):
    """Each tensor in its dtype's tolerance (float32: rtol 1e-5, atol 1e-5: one float32 pass against float64)."""
    assert len(actual_list) == len(expected_list), what
    for i, (a, e) in enumerate(zip(actual_list, expected_list)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{i}]"
        fp32 = a.dtype == torch.float32
        torch.testing.assert_close(a.cpu(), e.cpu(), rtol=1e-5 if fp32 else None, atol=1e-5 if fp32 else None,
                                   msg=lambda m: f"{what}[{i}]: {m}")


def _cpu_copy(args, op: table.OpDef) -> list:
    n = len(op.arguments)
    return [[t.detach().cpu().clone() for t in ts] for ts in args[:n]] + \
        [v.cpu() for v in args[n:n + len(op.vectors)]] + list(args[n + len(op.vectors):])


def check_against_reference(fn, name: str, args):
    """Run ``fn`` (a backend's function of op ``name``) on ``args`` and the float64 reference on CPU copies;
    compare the per-tensor sums or new tensors, every list written in place, and that read lists are unchanged."""
    op = table.op(name)
    want_args, before = _cpu_copy(args, op), _cpu_copy(args, op)
    want = getattr(reference, name)(*want_args)
    got = fn(*args)
    if op.reduces:
        assert got.shape == (len(args[0]),) and got.device == args[0][0].device
        assert_sums_close(got, want)
    elif op.returned is not None:
        assert_tensors_close(got, want, op.returned.name)
        assert all(g.device == p.device for g, p in zip(got, args[0]))
    else:
        assert got is None
    for k, t in enumerate(op.arguments):
        if t.written_in_place:
            assert_tensors_close(args[k], want_args[k], t.name)
        else:
            assert all(torch.equal(a.cpu(), b) for a, b in zip(args[k], before[k])), f"{t.name} was written"
    return got
