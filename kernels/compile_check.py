"""Compile every kernel variant for an NVIDIA GPU without needing one (ahead of time, to PTX and cubin).

    python -m hbat.kernels.compile_check [--arch 90] [--arch 80]

Run with TRITON_INTERPRET unset (the interpreter replaces the compiler). It proves the kernels contain no
interpreter-only constructs, and reports how many 16-byte vector loads/stores (``ld.global.v4`` /
``st.global.v4``) each aligned variant gets, which is what streaming at memory bandwidth needs.
Exit status 1 if anything fails to compile or an aligned variant has no vector loads.
"""
from __future__ import annotations

import argparse
import re
import sys

from hbat.ops import table

from .ewc import (
    BLOCK,
    PARTIALS_BLOCK,
    _multi_tensor_kernel,
    _sum_partials_kernel,
    interpreter_on,
    num_warps_for,
    op_constexprs,
    tl,
)

#: every op of the table, by name
OP_NAMES = tuple(op.name for op in table.OPS)
# The element types of the float32 / bfloat16 / float16 lists of each case (the k-th such list of an op gets
# the k-th entry, cyclically; float32-only lists are float32, "like" lists copy theirs): all fp32, bf16 params
# with fp32 anchors / grads, fp16 / bf16 mixed
DTYPE_CASES = [
    (tl.float32, tl.float32, tl.float32),
    (tl.bfloat16, tl.float32, tl.float32),
    (tl.float16, tl.bfloat16, tl.float16),
]


def list_dtypes(op: table.OpDef, case) -> tuple:
    """The element type of each of ``op``'s lists in dtype case ``case``, following the lists' dtype rules."""
    dtypes, free = [], 0
    for t in op.lists:
        if t.dtype == table.ANY_FLOAT:
            dtypes.append(case[free % len(case)])
            free += 1
        elif t.dtype == table.FLOAT32:
            dtypes.append(tl.float32)
        else:
            dtypes.append(dtypes[op.index(t.dtype)])
    return tuple(dtypes)


def _compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    # the tables and buffers come from torch allocations: 16-byte aligned (as the JIT would specialise them);
    # an element of a tuple argument is addressed by (argument, element)
    attrs = {}
    for name, ty in signature.items():
        index = fn.arg_names.index(name)
        for path, t in [((index,), ty)] if isinstance(ty, str) else [((index, k), t) for k, t in enumerate(ty)]:
            if t.startswith("*"):
                attrs[path] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps})


def chunk_kernel_variants(quick: bool = False):
    """(op name, dtypes, aligned, block): every op and dtype case at BLOCK, aligned or not, and the tiny block
    of the tests; ``quick``: the first two dtype cases, aligned, and one tiny-block variant."""
    for name in OP_NAMES:
        for case in DTYPE_CASES[:2] if quick else DTYPE_CASES:
            for aligned in (True,) if quick else (True, False):
                yield name, list_dtypes(table.op(name), case), aligned, BLOCK
    for name in ("ewc_penalty_grad_",) if quick else OP_NAMES:
        yield name, list_dtypes(table.op(name), DTYPE_CASES[2]), True, 16


def compile_chunk_kernel(name: str, dtypes, aligned: bool, arch: int, block: int = BLOCK):
    op = table.op(name)
    signature = {
        "addresses_ptr": "*i64",
        "chunks_ptr": "*i64",
        "vector_ptrs": tuple("*fp32" for _ in op.vectors),
        "partials_ptr": "*fp32",
        "chunk_begin": "i32",  # what the JIT passes for a Python int below 2**31 (the kernel widens it)
        "scalar_bits": tuple("i64" for _ in op.scalars),  # launch's scalar_bits
    }
    constexprs = {**op_constexprs(op), "DTYPES": tuple(dtypes), "BLOCK": block, "ALIGNED": aligned}
    return _compile(_multi_tensor_kernel, signature, constexprs, arch, num_warps_for(block))


def compile_partials_kernel(arch: int):
    signature = {"partials_ptr": "*fp32", "slots_ptr": "*i64", "out_ptr": "*fp32"}
    return _compile(_sum_partials_kernel, signature, {"BLOCK": PARTIALS_BLOCK}, arch, 1)


def vector_counts(ptx: str) -> tuple[int, int]:
    loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx))
    stores = len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx))
    return loads, stores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 80 and 90)")
    parser.add_argument("--quick", action="store_true", help="fewer variants (see chunk_kernel_variants)")
    args = parser.parse_args(argv)
    if interpreter_on():
        print("TRITON_INTERPRET is set: unset it to compile for a GPU", file=sys.stderr)
        return 2
    failures = 0
    for arch in args.arch or [80, 90]:
        compile_partials_kernel(arch)
        print(f"sm_{arch}: _sum_partials_kernel compiled")
        for op_name, dtypes, aligned, block in chunk_kernel_variants(args.quick):
            name = (f"sm_{arch} {op_name:<16} {'/'.join(d.name for d in dtypes):<20} "
                    f"aligned={aligned!s:<5} block={block:<5}")
            try:
                kernel = compile_chunk_kernel(op_name, dtypes, aligned, arch, block)
            except Exception as exc:  # noqa: BLE001 - report every failing variant
                failures += 1
                print(f"{name} FAILED: {type(exc).__name__}: {exc}")
                continue
            loads, stores = vector_counts(kernel.asm["ptx"])
            ok = loads > 0 or not aligned or block < 256  # a 16-element block has too few lanes to vectorise
            failures += not ok
            print(f"{name} {'ok' if ok else 'BAD'}  v4 loads={loads} v4 stores={stores}"
                  f"{'' if ok else '  <- no vector loads'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
