"""The backend ops as torch operators: torch.library.opcheck, fake (meta) implementations, one schema
table, and a loss with ops.ewc_penalty under torch.compile(fullgraph=True), on every backend that runs here.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hbat import ops
from hbat.ops import _library
from ops_cases import backend_cases

BACKENDS = backend_cases(("reference", "cpu", "triton"))
NAMESPACE = {"reference": "hbat_reference", "cpu": "hbat", "cuda": "hbat", "triton": "hbat_triton"}


def _namespace(backend, device):
    ops.backend_status(backend, device)  # loads the backend: its operators are registered then
    return getattr(torch.ops, NAMESPACE[backend])


def _inputs(device, dtypes=(torch.float32, torch.bfloat16, torch.float32), shapes=((3,), (2, 5), (1,)), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(d).to(device) for s, d in zip(shapes, dtypes)]


def _samples(device):
    """(op name, args) for every op of the contract, mixed dtypes; squared_change also with inputs that require grad."""
    p, a, g = _inputs(device, seed=1), _inputs(device, seed=2), _inputs(device, seed=3)
    coef = torch.tensor([0.5, 2.0, 1.0], device=device)
    leaves = [t.detach().requires_grad_(True) for t in _inputs(device, dtypes=(torch.float32,) * 3, seed=4)]
    return [
        ("squared_change", (p, a)),
        ("squared_change", (leaves, a)),
        ("snapshot_", (p, a)),
        ("ewc_penalty_grad_", (p, a, g, coef)),
        ("scaled_diff", (p, a, coef)),
        ("lerp_", (g, p, a, coef)),
        ("adamw_ewc_step_", (p, _inputs(device, seed=5), _inputs(device, dtypes=(torch.float32,) * 3, seed=6),
                             [m.abs() for m in _inputs(device, dtypes=(torch.float32,) * 3, seed=7)], a,
                             coef, coef * 0.01, coef * 0.1, coef * 0.1, coef * 0.01, 0.9, 0.999, 1e-8)),
    ]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_passes_for_every_op(backend, device):
    namespace = _namespace(backend, device)
    samples = _samples(device)
    assert {name for name, _ in samples} == set(_library.SCHEMAS), "every op of the table needs a sample here"
    for name, args in samples:
        # schema (declared mutations), autograd registration, fake tensor, AOT dispatch with dynamic shapes
        torch.library.opcheck(getattr(namespace, name).default, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_every_op_has_a_meta_implementation(backend, device):
    namespace = _namespace(backend, device)
    p = [torch.empty(3, device="meta"), torch.empty(2, 5, dtype=torch.bfloat16, device="meta")]
    a = [torch.empty(3, device="meta"), torch.empty(2, 5, device="meta")]
    coef = torch.empty(2, device="meta")
    for name, args in [("squared_change", (p, a)), ("snapshot_", (p, a)), ("ewc_penalty_grad_", (p, a, a, coef))]:
        out = getattr(namespace, name)(*args)
        assert (out.device.type, out.shape, out.dtype) == ("meta", (2,), torch.float32), name
    diffs = namespace.scaled_diff(p, a, coef)
    assert [(d.shape, d.dtype, d.device.type) for d in diffs] == [((3,), torch.float32, "meta"),
                                                                   ((2, 5), torch.bfloat16, "meta")]
    assert namespace.lerp_(a, p, a, coef) is None


def test_every_namespace_has_the_schemas_of_the_cpp_library():
    namespaces = ["hbat_reference", "hbat_triton"]
    if ops.backend_status("cpu", "cpu")[0]:
        namespaces.append("hbat")  # defined by csrc/bindings/library.cpp
    from hbat.ops import reference, triton_backend  # noqa: F401 - define their namespaces

    for ns in namespaces:
        for name, schema in _library.SCHEMAS.items():
            assert str(getattr(getattr(torch.ops, ns), name).default._schema) == f"{ns}::{schema}"


def _penalty_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = (3, 17, 64, 1)
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in sizes]
    anchors = [torch.randn(s, generator=gen) for s in sizes]
    F = torch.rand(len(sizes), generator=gen).requires_grad_(True)
    return params, anchors, F


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_loss_with_ewc_penalty_compiles_fullgraph_and_matches_eager(backend, device, compiler):
    params, anchors, F = _penalty_case()
    penalty = ops.EWCPenalty(0.7, backend=backend)

    def loss_fn(params, anchors, F):
        task = sum((p.sin() * p).sum() for p in params)
        return task + ops.ewc_penalty(params, anchors, F, 1.3, backend=backend) + penalty(params, anchors, F.detach())

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend=compiler, fullgraph=True)
    got = compiled(params, anchors, F)
    got.backward()
    got_grads = [t.grad.clone() for t in (*params, F)]
    for t in (*params, F):
        t.grad = None
    expected = loss_fn(params, anchors, F)
    expected.backward()
    torch.testing.assert_close(got, expected)
    for i, (g, t) in enumerate(zip(got_grads, (*params, F))):
        torch.testing.assert_close(g, t.grad, msg=lambda m: f"gradient {i}: {m}")
    assert got.grad_fn is not None and all(g.abs().sum() > 0 for g in got_grads)


def test_import_needs_torch_alone_and_the_first_call_may_be_compiled():
    # without triton and the compiled extension, `import hbat` imports neither them nor torch._dynamo; the
    # reference backend is then chosen (and imported) while dynamo traces the first call
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['hbat._C'] = None; sys.modules['hbat._C_cuda'] = None\n"
        "import torch, hbat\n"
        "from hbat import ops\n"
        "assert 'torch._dynamo' not in sys.modules, 'import hbat imported torch._dynamo'\n"
        "p = [torch.ones(3, requires_grad=True)]\n"
        "loss = lambda p: ops.ewc_penalty(p, [torch.zeros(3)], [2.0], 1.0)\n"
        "torch.compile(loss, backend='aot_eager', fullgraph=True)(p).backward()\n"
        "assert p[0].grad.tolist() == [2.0, 2.0, 2.0]\n"
        "assert ops.available_backends('cpu') == ['reference'], ops.available_backends('cpu')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
