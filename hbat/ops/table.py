"""The one definition of hbat's fused multi-tensor ops: every layer takes its numbering and roles from here.

An op streams over n tensors in each of its tensor lists (entry i of every list has the same number of
elements), element by element, with a few per-tensor float32 vectors (entry i belongs to tensor i) and a
few per-call scalars; a reducing op also returns, per tensor, a float32 sum over its elements.

Generated from it by ``python -m hbat.ops.table --write`` (``--check``: exit 1 if one is stale or an orphan is
left; tests/test_op_table.py runs that check), each with a first line that says so:

    csrc/op_table.h            X-macros for the C++ CPU kernels, the CUDA planner and kernels, and both torch
                               bindings (the torch.ops.hbat schemas are ``OpDef.schema``)
    csrc/ops/all.h             the include of every op's math (csrc/ops/<op>.h) for the CPU kernels
    csrc/cuda/<op>.cu          one per op: its CUDA kernels instantiated (the ops compile in parallel)

Read at run time: kernels/ewc.py (the Triton launches: lists, roles and dtype rules; the math:
kernels/op_math.py), kernels/compile_check.py (the variants it compiles), hbat/ops/_library.py (the schemas of
every namespace), tests/cuda_emulator (the op codes of the emulated CUDA backend), tests/ops_cases.py (the
per-op test inputs) and the benchmarks (their ops and bytes per element).

Adding an op: see CONTRIBUTING.md. This module imports nothing but the standard library.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

# ------------------------------------------------------------------------------------------------ roles
#: loaded, never written
READ = "read"
#: loaded, then written in place
UPDATE = "update"
#: written in place; its old values are never read
WRITE = "write"
#: new tensors the op allocates and returns
RETURN = "return"
ROLES = (READ, UPDATE, WRITE, RETURN)

# ------------------------------------------------------------------------------------------- dtype rules
#: float32, bfloat16 or float16, chosen per tensor
ANY_FLOAT = "float"
#: float32 only (optimizer states)
FLOAT32 = "float32"
# any other value is the name of an earlier list of the op: tensor i has that list's tensor i's dtype

#: bytes of one element in the byte counts (``OpDef.min_bytes``: everything float32)
FP32_BYTES = 4


@dataclass(frozen=True)
class TensorList:
    """One tensor list of an op: its argument name, its role and which dtypes its tensors may have."""

    name: str
    role: str
    dtype: str = ANY_FLOAT

    @property
    def loaded(self) -> bool:
        return self.role in (READ, UPDATE)

    @property
    def stored(self) -> bool:
        return self.role in (UPDATE, WRITE, RETURN)

    @property
    def written_in_place(self) -> bool:
        """The caller's tensors are modified (they must be writable, and not overlap other lists)."""
        return self.role in (UPDATE, WRITE)


@dataclass(frozen=True)
class OpDef:
    """One op. ``code`` is its position in ``OPS`` (the number every layer uses)."""

    name: str  # the torch.ops.hbat schema name and the backend modules' function name
    lists: tuple  # of TensorList, in argument order; RETURN lists are not arguments
    reduces: bool  # returns float32 [n]: per tensor, the sum over its elements named in ``doc``
    vectors: tuple = ()  # names of the per-tensor float32 [n] vectors, in argument order after the lists
    scalars: tuple = ()  # names of the per-call float scalars, in argument order after the vectors
    may_alias: tuple = ()  # (list, list) pairs whose tensor i may be the very same tensor
    doc: str = ""

    def __post_init__(self):
        names = [t.name for t in self.lists]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate list names {names}")
        for i, t in enumerate(self.lists):
            if t.role not in ROLES:
                raise ValueError(f"{self.name}.{t.name}: unknown role {t.role!r}")
            if t.dtype not in (ANY_FLOAT, FLOAT32) and t.dtype not in names[:i]:
                raise ValueError(f"{self.name}.{t.name}: dtype {t.dtype!r} is neither a rule nor an earlier list")
        if sum(t.role == RETURN for t in self.lists) > 1 or (self.returned is not None and self.reduces):
            raise ValueError(f"{self.name}: an op returns either per-tensor sums or one list of new tensors")
        if self.lists[0].role == RETURN:
            raise ValueError(f"{self.name}: the first list (the shapes) must be an argument")
        if self.returned is not None and self.returned.dtype == ANY_FLOAT:
            raise ValueError(f"{self.name}.{self.returned.name}: new tensors need a dtype (float32 or another list's)")
        for a, b in self.may_alias:
            if a not in names or b not in names:
                raise ValueError(f"{self.name}: may_alias names an unknown list ({a!r}, {b!r})")

    @property
    def code(self) -> int:
        return OPS.index(self)

    @property
    def arguments(self) -> tuple:
        """The tensor lists the caller passes (all but the RETURN list), in argument order."""
        return tuple(t for t in self.lists if t.role != RETURN)

    @property
    def returned(self):
        """The RETURN list, or None."""
        return next((t for t in self.lists if t.role == RETURN), None)

    def tensor_list(self, name: str) -> TensorList:
        for t in self.lists:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor list {name!r}")

    def index(self, name: str) -> int:
        return [t.name for t in self.lists].index(name)

    @property
    def min_bytes(self) -> int:
        """Bytes moved per element when every tensor is float32: each loaded list read once, each stored
        list written once (../shared/HBAT.md section 7)."""
        return FP32_BYTES * sum(int(t.loaded) + int(t.stored) for t in self.lists)

    @property
    def schema(self) -> str:
        """The torch.ops.hbat schema string (csrc/bindings/library.cpp defines exactly this)."""
        args, alias = [], iter("abcdefghijklmnopqrstuvwxyz")
        for t in self.arguments:
            args.append(f"Tensor({next(alias)}!)[] {t.name}" if t.written_in_place else f"Tensor[] {t.name}")
        args += [f"Tensor {v}" for v in self.vectors] + [f"float {s}" for s in self.scalars]
        result = "Tensor" if self.reduces else ("Tensor[]" if self.returned is not None else "()")
        return f"{self.name}({', '.join(args)}) -> {result}"


def _lists(*specs) -> tuple:
    return tuple(TensorList(*spec) for spec in specs)


OPS: tuple = (
    OpDef(
        "squared_change",
        _lists(("params", READ), ("refs", READ)),
        reduces=True,
        doc="per tensor sum_j (params - refs)^2",
    ),
    OpDef(
        "snapshot_",
        _lists(("params", READ), ("anchors", UPDATE)),
        reduces=True,
        doc="per tensor sum_j (params - anchors)^2 against the anchors' old values; then anchors <- params",
    ),
    OpDef(
        "ewc_penalty_grad_",
        _lists(("params", READ), ("anchors", READ), ("grads", UPDATE)),
        reduces=True,
        vectors=("coef",),
        doc="per tensor sum_j (params - anchors)^2; grads += coef_i (params - anchors)",
    ),
    OpDef(
        "scaled_diff",
        _lists(("params", READ), ("anchors", READ), ("out", RETURN, "params")),
        reduces=False,
        vectors=("coef",),
        doc="new tensors out_i = coef_i (params - anchors) in params' dtype (the backward of squared_change)",
    ),
    OpDef(
        "lerp_",
        _lists(("dst", WRITE), ("a", READ), ("b", READ)),
        reduces=False,
        vectors=("weights",),
        may_alias=(("dst", "a"), ("dst", "b")),
        doc="dst <- (1 - weights_i) a + weights_i b",
    ),
    OpDef(
        "adamw_ewc_step_",
        _lists(
            ("params", UPDATE),
            ("grads", READ, "params"),
            ("exp_avg", UPDATE, FLOAT32),
            ("exp_avg_sq", UPDATE, FLOAT32),
            ("anchors", READ),
        ),
        reduces=True,
        vectors=("coef", "lr", "weight_decay", "bias_correction1", "bias_correction2"),
        scalars=("beta1", "beta2", "eps"),
        # a tensor without an anchor (not in the HybridEWC, coef 0) passes itself: d = p - p = 0
        may_alias=(("params", "anchors"),),
        doc="per tensor sum_j (params - anchors)^2 before the step; then one torch.optim.AdamW step with the "
        "gradient grads + coef_i (params - anchors) (grads itself is not modified)",
    ),
)

BY_NAME: dict = {op.name: op for op in OPS}


def op(name: str) -> OpDef:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no op {name!r}; the ops are {', '.join(BY_NAME)}") from None


#: the largest list, vector and scalar counts of any op (the C++ layers size arrays with them)
MAX_LISTS = max(len(o.lists) for o in OPS)
MAX_VECTORS = max(len(o.vectors) for o in OPS)
MAX_SCALARS = max(len(o.scalars) for o in OPS)


# ------------------------------------------------------------------------------------ generated files
ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "csrc" / "op_table.h"
OPS_INCLUDE = ROOT / "csrc" / "ops" / "all.h"
CUDA_DIR = ROOT / "csrc" / "cuda"
REGENERATE = "python -m hbat.ops.table --write"
#: the first line of every generated file (an orphan .cu file, of an op no longer in the table, is found by it)
MARK = f"// Generated from hbat/ops/table.py by `{REGENERATE}`: do not edit."
_CPP_ROLES = {READ: "kRead", UPDATE: "kUpdate", WRITE: "kWrite", RETURN: "kReturn"}


def stem(o: OpDef) -> str:
    """The file name of the op's C++ sources: csrc/ops/<stem>.h (its math, by hand), csrc/cuda/<stem>.cu."""
    return o.name.rstrip("_")


def _cpp_dtype(o: OpDef, t: TensorList) -> int:
    return {ANY_FLOAT: -1, FLOAT32: -2}[t.dtype] if t.dtype in (ANY_FLOAT, FLOAT32) else o.index(t.dtype)


def cpp_header() -> str:
    """The text of csrc/op_table.h."""
    lines = [
        MARK,
        "// The op table as X-macros: edit the table, then regenerate (tests/test_op_table.py fails while this",
        "// file is out of date).",
        "#pragma once",
        "",
        "// HBAT_OPS(X): X(name, code, reduces, num_lists, num_vectors, num_scalars, schema)",
        "#define HBAT_OPS(X) \\",
    ]
    for o in OPS:
        lines.append(f'  X({o.name}, {o.code}, {int(o.reduces)}, {len(o.lists)}, {len(o.vectors)}, '
                     f'{len(o.scalars)}, "{o.schema}") \\')
    lines += [
        "",
        "// HBAT_OP_LISTS(X): X(op, index, name, role, dtype)",
        "//   role: kRead, kUpdate (read, then written in place), kWrite (written in place, never read),",
        "//         kReturn (new tensors the op returns); see hbat::Role",
        "//   dtype: -1 float32, bfloat16 or float16; -2 float32 only; i >= 0 the dtype of list i",
        "#define HBAT_OP_LISTS(X) \\",
    ]
    for o in OPS:
        for i, t in enumerate(o.lists):
            lines.append(f"  X({o.name}, {i}, {t.name}, {_CPP_ROLES[t.role]}, {_cpp_dtype(o, t)}) \\")
    lines += [
        "",
        f"#define HBAT_NUM_OPS {len(OPS)}",
        f"#define HBAT_MAX_LISTS {MAX_LISTS}",
        f"#define HBAT_MAX_VECTORS {MAX_VECTORS}",
        f"#define HBAT_MAX_SCALARS {max(MAX_SCALARS, 1)}",
        "",
    ]
    return "\n".join(lines)


def ops_include() -> str:
    """The text of csrc/ops/all.h: every op's math, for the CPU kernels (csrc/cpu/multi_tensor_cpu.cpp)."""
    lines = [MARK, "// The math of every op of the table (OpMath<Op::name>, one header per op).", "#pragma once", ""]
    return "\n".join(lines + [f'#include "ops/{stem(o)}.h"' for o in OPS] + [""])


def cuda_unit(o: OpDef) -> str:
    """The text of csrc/cuda/<stem>.cu: the op's CUDA kernels, one instantiation per dtype combination its lists
    allow (one file per op, so that the ops compile in parallel)."""
    return "\n".join([
        MARK,
        f"// The CUDA kernels of {o.name}: its math (csrc/ops/{stem(o)}.h) over the generic multi-tensor apply.",
        '#include "cuda/multi_tensor_apply.cuh"',
        f'#include "ops/{stem(o)}.h"',
        "",
        f"HBAT_CUDA_OP({o.name})",
        "",
    ])


def generated_files() -> dict:
    """Path -> text of every file generated from the table."""
    files = {HEADER: cpp_header(), OPS_INCLUDE: ops_include()}
    files.update({CUDA_DIR / f"{stem(o)}.cu": cuda_unit(o) for o in OPS})
    return files


def orphans(files: dict) -> list:
    """Generated .cu files (their first line is MARK) of no op of the table: an op removed or renamed."""
    return sorted(p for p in CUDA_DIR.glob("*.cu")
                  if p not in files and p.read_text().startswith(MARK))


def stale(files: dict) -> list:
    """The generated files that are missing or differ from the table's text, and the orphans."""
    return [p for p, text in files.items() if not p.exists() or p.read_text() != text] + orphans(files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write or check the files generated from the op table "
                                     "(csrc/op_table.h, csrc/ops/all.h, csrc/cuda/<op>.cu).")
    parser.add_argument("--write", action="store_true", help="write them (and delete orphan .cu files)")
    parser.add_argument("--check", action="store_true", help="exit 1 if one is out of date or an orphan is left")
    args = parser.parse_args(argv)
    files = generated_files()
    if args.write:
        for path in stale(files):
            if path in files:
                path.write_text(files[path])
                print(f"wrote {path.relative_to(ROOT)}")
            else:
                path.unlink()
                print(f"deleted {path.relative_to(ROOT)} (no op of the table)")
        return 0
    if args.check:
        bad = stale(files)
        for path in bad:
            print(f"{path.relative_to(ROOT)} is out of date: run `{REGENERATE}`", file=sys.stderr)
        return 1 if bad else 0
    sys.stdout.write(cpp_header())
    return 0


if __name__ == "__main__":
    sys.exit(main())
