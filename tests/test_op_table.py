"""The op table (hbat/ops/table.py) and what is made from it: generated files that are current, roles that are
what the reference does, and every op covered where a person has to write something for it.

Generated from the table (``python -m hbat.ops.table --write``): csrc/op_table.h (read through csrc/op_traits.h),
csrc/ops/all.h and csrc/cuda/<op>.cu; these tests fail while one is stale. Written by hand for each op, and
checked here for every op of the table: its math (csrc/ops/<op>.h, kernels/op_math.py), its reference kernel,
its test samples (tests/ops_cases.py: the opcheck, reference, Triton and emulator tests run over them), its
plain-PyTorch benchmark providers (benchmarks/benchlib/op_providers.py) and, for a public op, its row in docs/ops.md.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import ops_cases
from hbat import ops
from hbat.ops import reference, table

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def test_generated_files_are_up_to_date():
    files = table.generated_files()
    assert {table.HEADER, table.OPS_INCLUDE} | {CSRC / "cuda" / f"{table.stem(op)}.cu" for op in table.OPS} == set(files)
    assert table.stale(files) == [], f"run `{table.REGENERATE}`"
    assert table.main(["--check"]) == 0
    for path, text in files.items():
        assert text.startswith(table.MARK + "\n"), path


def test_the_check_finds_a_stale_or_orphan_file(tmp_path, monkeypatch):
    monkeypatch.setattr(table, "CUDA_DIR", tmp_path)
    unit = tmp_path / "lerp.cu"
    files = {unit: table.cuda_unit(table.op("lerp_"))}
    unit.write_text(files[unit].replace("HBAT_CUDA_OP", "HBAT_CUDA_0P"))  # edited by hand
    (tmp_path / "gone.cu").write_text(table.MARK + "\n")  # generated for an op the table no longer has
    (tmp_path / "launch.cu").write_text("// written by hand\n")
    assert table.stale(files) == [unit, tmp_path / "gone.cu"]
    unit.write_text(files[unit])
    assert table.stale(files) == [tmp_path / "gone.cu"]


def test_table_invariants():
    assert [op.code for op in table.OPS] == list(range(len(table.OPS)))
    with pytest.raises(ValueError, match="neither a rule nor an earlier list"):
        table.OpDef("bad", (table.TensorList("x", table.READ, "y"), table.TensorList("y", table.READ)), reduces=True)
    with pytest.raises(KeyError, match="no op 'nope'"):
        table.op("nope")


@pytest.mark.parametrize("op", table.OPS, ids=lambda op: op.name)
def test_schema_roles_match_the_lists(op):
    schema = torch._C.parse_schema(op.schema)
    names = [a.name for a in schema.arguments]
    assert names == [t.name for t in op.arguments] + list(op.vectors) + list(op.scalars)
    for arg, spec in zip(schema.arguments, op.arguments):
        assert bool(arg.alias_info and arg.alias_info.is_write) == spec.written_in_place, spec.name


@pytest.mark.skipif(importlib.util.find_spec("hbat._C") is None, reason="the C++ extension is not built")
def test_registered_schemas_are_the_tables():
    import hbat._C  # noqa: F401  (defines torch.ops.hbat)

    for op in table.OPS:
        assert str(getattr(torch.ops.hbat, op.name).default._schema) == f"hbat::{op.schema}"


CPP_DUMP = r"""
#include <cstdio>
#include "op_traits.h"
using namespace hbat;
template <Op kOp, int L> void list_traits() {
  using T = ListTraits<kOp, L>;
  std::printf("  %d %d %d %d\n", static_cast<int>(T::kRole), T::kDType, T::kLoads, T::kStores);
}
int main() {
  for (int c = 0; c < kNumOps; ++c) {
    const OpInfo& o = op_info(static_cast<Op>(c));
    std::printf("%d %s %d %d %d %d %d|%s\n", c, o.name, o.reduces, o.num_lists, o.num_vectors, o.num_scalars,
                o.returned(), o.schema);
    for (int l = 0; l < o.num_lists; ++l)
      std::printf("  %s %d %d\n", o.list_names[l], static_cast<int>(o.roles[l]), o.dtypes[l]);
  }
#define HBAT_X(op, index, ...) list_traits<Op::op, index>();
  HBAT_OP_LISTS(HBAT_X)
  std::printf("%d %d %d %d\n", kNumOps, kMaxLists, kMaxVectors, kMaxScalars);
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_cpp_op_traits_match_the_table(tmp_path):
    source, exe = tmp_path / "dump.cpp", tmp_path / "dump"
    source.write_text(CPP_DUMP)
    build = subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", f"-I{CSRC}", str(source), "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    lines = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    roles = {r: i for i, r in enumerate(table.ROLES)}  # hbat::Role's order

    def rule(op, t):  # the header's dtype codes
        return {table.ANY_FLOAT: -1, table.FLOAT32: -2}[t.dtype] if t.dtype in (table.ANY_FLOAT, table.FLOAT32) \
            else op.index(t.dtype)

    expected = []
    for op in table.OPS:
        returned = op.index(op.returned.name) if op.returned is not None else -1
        expected.append(f"{op.code} {op.name} {int(op.reduces)} {len(op.lists)} {len(op.vectors)} "
                        f"{len(op.scalars)} {returned}|{op.schema}")
        expected += [f"  {t.name} {roles[t.role]} {rule(op, t)}" for t in op.lists]
    for op in table.OPS:
        expected += [f"  {roles[t.role]} {rule(op, t)} {int(t.loaded)} {int(t.stored)}" for t in op.lists]
    expected.append(f"{len(table.OPS)} {table.MAX_LISTS} {table.MAX_VECTORS} {max(table.MAX_SCALARS, 1)}")
    assert lines == expected


def _run_reference(op: table.OpDef, args) -> tuple:
    """What the reference gives on copies of ``args``: its result and every argument list afterwards."""
    lists = [[t.clone() for t in ts] for ts in args[:len(op.arguments)]]
    result = getattr(reference, op.name)(*lists, *args[len(op.arguments):])
    return result, lists


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return x == y


@pytest.mark.parametrize("op", table.OPS, ids=lambda op: op.name)
def test_roles_and_bytes_are_what_the_reference_does(op):
    """Each list's role against what the float64 reference does with it: stored if the op writes it in place (or
    returns it), loaded if other values in it change what the op gives. min_bytes (4 B per loaded or stored
    fp32 list: the benchmarks' bandwidths, the bytes of docs/ops.md) is then what the op moves."""
    args = ops_cases.sample_args(op.name, [5, 3, 8], (torch.float32,), seed=1)
    result, after = _run_reference(op, args)
    stored = {t.name: not _same(after[k], args[k]) for k, t in enumerate(op.arguments)}
    written = [k for k, t in enumerate(op.arguments) if stored[t.name]]
    loaded = {}
    for k, t in enumerate(op.arguments):
        changed = list(args)
        changed[k] = [x + 0.5 for x in args[k]]  # stays >= 0 where the sample is (exp_avg_sq)
        other, other_after = _run_reference(op, changed)
        # what the op returns or leaves in a list it writes (this one included: read, then written) depends on it
        loaded[t.name] = not _same(other, result) or any(not _same(other_after[i], after[i]) for i in written)
    if op.returned is not None:
        loaded[op.returned.name], stored[op.returned.name] = False, True
    assert stored == {t.name: t.stored for t in op.lists}
    assert loaded == {t.name: t.loaded for t in op.lists}
    assert op.min_bytes == 4 * sum(loaded[t.name] + stored[t.name] for t in op.lists)


@pytest.mark.parametrize("op", table.OPS, ids=lambda op: op.name)
def test_every_op_has_its_math_and_reference(op):
    """The hand-written pieces of every op: the C++/CUDA functor, the Triton math and the reference kernel."""
    functor = CSRC / "ops" / f"{table.stem(op)}.h"
    assert functor.exists() and f"OpMath<Op::{op.name}>" in functor.read_text(), \
        f"{functor} must specialise OpMath<Op::{op.name}>"
    assert callable(getattr(reference, f"_{op.name}", None)), f"hbat/ops/reference.py needs _{op.name}"
    op_math = ROOT / "kernels" / "op_math.py"
    assert re.search(rf"@triton\.jit\ndef {re.escape(op.name)}\(e, v, s\):", op_math.read_text()), \
        f"kernels/op_math.py needs @triton.jit def {op.name}(e, v, s)"


def test_every_op_has_samples():
    """tests/ops_cases.py: a sample for every op (each test that runs every op is parametrised over them), with
    a value for each of its vectors and scalars."""
    assert set(ops_cases.SAMPLES) == set(table.BY_NAME), "add the op's Sample to tests/ops_cases.py SAMPLES"
    for name, sample in ops_cases.SAMPLES.items():
        op = table.op(name)
        assert set(sample.vectors) == set(op.vectors) and set(sample.scalars) == set(op.scalars), name
        assert set(sample.nonnegative) <= {t.name for t in op.arguments}, name


def test_every_op_has_benchmark_providers(monkeypatch):
    """benchmarks/benchlib/op_providers.py: every op of the table has the plain-PyTorch providers it is measured
    against (naive and foreach, written by hand; the hbat providers come from the table)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchlib import op_providers

    for op in table.OPS:
        assert {"naive", "foreach"} <= set(op_providers.BASELINES.get(op.name, {})), \
            f"benchmarks/benchlib/op_providers.py BASELINES needs the naive and foreach providers of {op.name}"
        assert op.name in op_providers.OPS and op_providers.MIN_BYTES[op.name] == op.min_bytes


def docs_op_rows(text: str) -> dict:
    """The rows of the op table of docs/ops.md (section "The ops"): function name -> its bytes / element cell."""
    section = text.split("\n## The ops\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([A-Za-z_]\w*)\(.*\| ([^|]*) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_public_op_has_a_docs_row():
    """docs/ops.md's op table has a row for every op of the table that hbat.ops exports, and its bytes per element
    is the table's; an op hbat.ops does not export (scaled_diff, the backward of squared_change) needs none."""
    rows = docs_op_rows((ROOT / "docs" / "ops.md").read_text())
    assert {"squared_change", "importance", "ewc_penalty"} <= set(rows)  # the parse finds the table
    for op in table.OPS:
        if op.name not in ops.__all__:
            continue
        assert op.name in rows, f"docs/ops.md's op table (## The ops) has no row for {op.name}"
        assert re.match(rf"{op.min_bytes}\b", rows[op.name]), \
            f"docs/ops.md gives {op.name} {rows[op.name]!r} bytes per element; the table says {op.min_bytes}"
