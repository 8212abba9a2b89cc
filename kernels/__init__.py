"""Triton kernels of hbat (this folder installs as the package ``hbat.kernels``).

    plan.py           host side of the multi-tensor launches: chunk table, dtype groups, plan cache (torch only)
    ewc.py            the kernels and their launchers (imports triton): sum_sq_diff, snapshot_, penalty_grad_,
                      scaled_diff, lerp_; one launch per dtype group plus one per-tensor reduction
    compile_check.py  ``python -m hbat.kernels.compile_check``: compile every kernel variant for sm_80 / sm_90
                      without a GPU and count the 16-byte vector loads in the PTX

Importing this package does not import triton; ``hbat.ops.triton_backend`` imports ``hbat.kernels.ewc``.
"""
