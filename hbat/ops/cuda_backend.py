"""The CUDA backend (csrc/cuda): multi-tensor kernels registered for the CUDA dispatch key; one function per op
of the table, each running torch.ops.hbat.<op> (the dispatcher picks the CUDA kernel for CUDA tensors)."""
from __future__ import annotations

import torch

from . import _library, _native

_library.export_ops("hbat", globals())


def unavailable_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return _native.unavailable_reason("hbat._C", "hbat._C_cuda")  # the CUDA kernels register into hbat._C's schemas
