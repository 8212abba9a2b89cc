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

from .ewc import (
    BLOCK,
    OP_LERP,
    OP_PENALTY_GRAD,
    OP_SCALED_DIFF,
    OP_SNAPSHOT,
    OP_SUM_SQ_DIFF,
    PARTIALS_BLOCK,
    _ewc_chunk_kernel,
    _sum_partials_kernel,
    interpreter_on,
    num_warps_for,
    tl,
)

OP_NAMES = {
    OP_SUM_SQ_DIFF: "sum_sq_diff",
    OP_SNAPSHOT: "snapshot_",
    OP_PENALTY_GRAD: "penalty_grad_",
    OP_SCALED_DIFF: "scaled_diff",
    OP_LERP: "lerp_",
}
# (x, y, z) dtype combinations compiled for every op: all fp32, bf16 params with fp32 anchor / grads, fp16 all
DTYPE_CASES = [
    (tl.float32, tl.float32, tl.float32),
    (tl.bfloat16, tl.float32, tl.float32),
    (tl.float16, tl.bfloat16, tl.float16),
]


def _compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    # the tables and buffers come from torch allocations: 16-byte aligned (as the JIT would specialise them)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items() if ty.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps})


def chunk_kernel_variants(quick: bool = False):
    """(op, dtypes, aligned, block): every op and dtype case at BLOCK, aligned or not, and the tiny block
    of the tests; ``quick``: the first two dtype cases, aligned, and one tiny-block variant."""
    for op in OP_NAMES:
        for dtypes in DTYPE_CASES[:2] if quick else DTYPE_CASES:
            for aligned in (True,) if quick else (True, False):
                yield op, dtypes, aligned, BLOCK
    for op in (OP_PENALTY_GRAD,) if quick else OP_NAMES:
        yield op, DTYPE_CASES[2], True, 16


def compile_chunk_kernel(op: int, dtypes, aligned: bool, arch: int, block: int = BLOCK):
    x, y, z = dtypes
    signature = {
        "addresses_ptr": "*i64",
        "chunks_ptr": "*i64",
        "coef_ptr": "*fp32",
        "partials_ptr": "*fp32",
        "chunk_begin": "i32",  # what the JIT passes for a Python int below 2**31 (the kernel widens it)
    }
    constexprs = {"OP": op, "X_DTYPE": x, "Y_DTYPE": y, "Z_DTYPE": z, "BLOCK": block, "ALIGNED": aligned}
    return _compile(_ewc_chunk_kernel, signature, constexprs, arch, num_warps_for(block))


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
        for op, dtypes, aligned, block in chunk_kernel_variants(args.quick):
            name = (f"sm_{arch} {OP_NAMES[op]:<14} {'/'.join(d.name for d in dtypes):<12} "
                    f"aligned={aligned!s:<5} block={block:<5}")
            try:
                kernel = compile_chunk_kernel(op, dtypes, aligned, arch, block)
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
