"""Every layer's view of the op table (hbat/ops/table.py) agrees with the table.

The C++ layers read csrc/op_table.h (generated from the table) through csrc/op_traits.h; Triton, compile_check,
the CUDA emulator and the benchmarks import the table. These tests fail when a copy is stale or an op is
missing from a layer.
"""
from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hbat.ops import table

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
    # bytes per fp32 element of ../shared/HBAT.md section 7
    assert {op.name: op.min_bytes for op in table.OPS} == {
        "squared_change": 8, "snapshot_": 12, "ewc_penalty_grad_": 16, "scaled_diff": 12, "lerp_": 12,
        "adamw_ewc_step_": 32}
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


@pytest.mark.parametrize("op", table.OPS, ids=lambda op: op.name)
def test_every_layer_has_the_op(op):
    stem = table.stem(op)
    functor = CSRC / "ops" / f"{stem}.h"
    assert f"OpMath<Op::{op.name}>" in functor.read_text(), f"{functor} must specialise OpMath<Op::{op.name}>"
    for name in ("reference", "cpu_backend", "cuda_backend", "triton_backend"):
        module = importlib.import_module(f"hbat.ops.{name}")
        assert callable(getattr(module, op.name)), f"{module.__name__}.{op.name}"


def test_triton_layers_take_the_table():
    pytest.importorskip("triton")
    from hbat.kernels import compile_check, ewc, op_math

    assert set(op_math.MATH) == set(table.BY_NAME)
    assert compile_check.OP_NAMES == tuple(table.BY_NAME)
    for op in table.OPS:
        assert callable(getattr(ewc, op.name))
        c = ewc.op_constexprs(op)
        assert [bool(c["LOADS"] >> i & 1) for i in range(len(op.lists))] == [t.loaded for t in op.lists]
        assert [bool(c["STORES"] >> i & 1) for i in range(len(op.lists))] == [t.stored for t in op.lists]


def test_emulator_and_benchmarks_take_the_table(monkeypatch):
    from cuda_emulator import emulator

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchlib import op_providers

    emu = emulator.EmulatedCuda(lib=None)
    for op in table.OPS:
        assert callable(getattr(emu, op.name))
    assert op_providers.MIN_BYTES["ewc_penalty_grad_"] == table.op("ewc_penalty_grad_").min_bytes
