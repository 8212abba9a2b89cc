"""Triton kernels of hbat (this folder installs as the package ``hbat.kernels``).

    plan.py           host side of the multi-tensor launches: chunk table, dtype groups, plan cache (torch only)
    ewc.py            the one generic multi-tensor kernel and its launcher (imports triton): every op of the op
                      table (hbat/ops/table.py) as a function of that name; one launch per dtype group plus one
                      per-tensor reduction
    op_math.py        each op's math, one ``@triton.jit`` function per op (the C++ twin: csrc/ops/<op>.h)
    compile_check.py  ``python -m hbat.kernels.compile_check``: compile every kernel variant for sm_80 / sm_90
                      without a GPU and count the 16-byte vector loads in the PTX

Importing this package does not import triton; ``hbat.ops.triton_backend`` imports ``hbat.kernels.ewc``.
"""
