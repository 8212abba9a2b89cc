"""The backend ops as torch operators: torch.library.opcheck, fake (meta) implementations, one schema
table, and a loss with ops.ewc_penalty under torch.compile(fullgraph=True), on every backend that runs here.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hbat import ops
from hbat.ops import _library, reference
from ops_cases import NAMES, backend_cases, sample_args

BACKENDS = backend_cases(("reference", "cpu", "triton"))
NAMESPACE = {"reference": "hbat_reference", "cpu": "hbat", "cuda": "hbat", "triton": "hbat_triton"}


def _namespace(backend, device):
    ops.backend_status(backend, device)  # loads the backend: its operators are registered then
    return getattr(torch.ops, NAMESPACE[backend])


SIZES = [3, 10, 1]  # some 2-D
MIXED = (torch.float32, torch.bfloat16)


def _samples(device) -> list:
    """(op name, args): every op of the table (ops_cases.SAMPLES, mixed dtypes), and squared_change with params
    that require grad (its autograd registration)."""
    samples = [(name, sample_args(name, SIZES, MIXED, device, seed=k)) for k, name in enumerate(NAMES)]
    params, refs = sample_args("squared_change", SIZES, (torch.float32,), device, seed=len(NAMES))
    return samples + [("squared_change", ([p.requires_grad_(True) for p in params], refs))]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_passes_for_every_op(backend, device):
    namespace = _namespace(backend, device)
    for name, args in _samples(device):
        # schema (declared mutations), autograd registration, fake tensor, AOT dispatch with dynamic shapes
        torch.library.opcheck(getattr(namespace, name).default, args)


def _meta(x):
    if isinstance(x, (list, tuple)):
        return [_meta(t) for t in x]
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


def _described(out):
    if out is None:
        return None
    if isinstance(out, torch.Tensor):
        return (tuple(out.shape), out.dtype)
    return [_described(t) for t in out]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_every_op_has_a_meta_implementation(backend, device):
    """On meta tensors each op gives what it gives on real ones: the shapes and dtypes of its per-tensor sums or
    new tensors, or None."""
    namespace = _namespace(backend, device)
    for name, args in _samples(device)[:len(NAMES)]:
        real = getattr(reference, name)(*[[t.clone() for t in a] if isinstance(a, list) else a
                                                          for a in args])
        out = getattr(namespace, name)(*_meta(args))
        assert out is None or all(t.device.type == "meta" for t in ([out] if isinstance(out, torch.Tensor) else out))
        assert _described(out) == _described(real), name


def test_every_namespace_has_the_schemas_of_the_cpp_library():
    namespaces = ["hbat_reference", "hbat_triton"]
    if ops.backend_status("cpu", "cpu")[0]:
        namespaces.append("hbat")  # defined by csrc/bindings/library.cpp
    from hbat.ops import triton_backend  # noqa: F401 - defines its namespace

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
