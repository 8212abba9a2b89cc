"""The CPU kernels' two compiled element loops (baseline SSE and AVX2, csrc/cpu/multi_tensor_cpu.cpp) give
bit-identical results: every op of the table, every dtype, sizes across the chunk boundary, run here (AVX2
where the CPU has it) and in a subprocess with HBAT_CPU_NO_AVX2=1 (the baseline loop).

Run as a script (``python tests/test_cpu_dispatch.py OUT``) it writes every op's outputs to OUT.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from hbat.ops import table

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (1, 17, 1000, 70001)  # 70001: two chunks of csrc/cpu (kChunk = 65536) and a tail
NUM_TENSORS = 27  # every float32 / bfloat16 / float16 combination of up to three ANY_FLOAT lists


def _dtype(op, list_index, tensor_index):
    spec = op.lists[list_index]
    if spec.dtype == table.FLOAT32:
        return torch.float32
    if spec.dtype != table.ANY_FLOAT:
        return _dtype(op, op.index(spec.dtype), tensor_index)
    free = [i for i, t in enumerate(op.lists) if t.dtype == table.ANY_FLOAT].index(list_index)
    return DTYPES[(tensor_index // 3**free) % 3]


def every_op_outputs(seed=0):
    """{op name: [the tensors it returned or wrote]} for fresh random inputs (the same for the same seed)."""
    import hbat._C  # noqa: F401  (defines torch.ops.hbat)

    gen = torch.Generator().manual_seed(seed)
    outputs = {}
    for op in table.OPS:
        lists = [
            [torch.rand(SIZES[i % len(SIZES)], generator=gen).to(_dtype(op, j, i)) for i in range(NUM_TENSORS)]
            for j, t in enumerate(op.lists) if t.role != table.RETURN
        ]
        vectors = [torch.rand(NUM_TENSORS, generator=gen) * 0.5 + 0.25 for _ in op.vectors]
        scalars = [0.9, 0.999, 1e-8][: len(op.scalars)]
        result = getattr(torch.ops.hbat, op.name)(*lists, *vectors, *scalars)
        written = [t for spec, ts in zip(op.arguments, lists) if spec.written_in_place for t in ts]
        returned = [result] if isinstance(result, torch.Tensor) else list(result or [])
        outputs[op.name] = written + returned
    return outputs


def _has_avx2():
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.skipif(importlib.util.find_spec("hbat._C") is None, reason="the C++ extension is not built")
@pytest.mark.skipif(not _has_avx2(), reason="this CPU has no AVX2: only the baseline loop runs")
def test_avx2_and_baseline_loops_agree_bit_for_bit(tmp_path):
    out = tmp_path / "baseline.pt"
    env = {**os.environ, "HBAT_CPU_NO_AVX2": "1"}
    subprocess.run([sys.executable, __file__, str(out)], env=env, check=True, timeout=300)
    baseline = torch.load(out, weights_only=True)
    here = every_op_outputs()
    assert set(baseline) == set(here) == {op.name for op in table.OPS}
    for name, tensors in here.items():
        assert len(tensors) == len(baseline[name]), name
        for k, (a, b) in enumerate(zip(tensors, baseline[name])):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, k)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{name}: output tensor {k} differs"


if __name__ == "__main__":
    torch.save(every_op_outputs(), sys.argv[1])
