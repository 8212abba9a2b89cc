"""The Triton backend: multi-tensor kernels in the repository's kernels/ folder (installed as hbat.kernels),
as the torch operators torch.ops.hbat_triton.* (see _library.py), one per op of the table.

Each op is one kernel launch per dtype combination present in the call (usually one) plus, for the
per-tensor sums, one small deterministic reduction launch; see kernels/ewc.py. On CPU tensors it runs only
under Triton's interpreter (TRITON_INTERPRET=1 set before triton is first imported), which the tests use.
"""
from __future__ import annotations

import torch

from . import _library, table
from ._dispatch import triton_interpreter_on


def unavailable_reason() -> str:
    """"" when the kernels can run here (a CUDA GPU, or the interpreter); otherwise why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means unavailable
        return f"triton is not installed or failed to import ({type(exc).__name__}: {exc}); pip install triton"
    try:
        from hbat.kernels import ewc  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"hbat.kernels.ewc failed to import ({type(exc).__name__}: {exc})"
    if triton_interpreter_on():
        return ""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch and TRITON_INTERPRET is not set (Triton's CPU interpreter)"
    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as exc:  # noqa: BLE001
        return f"triton has no usable GPU driver ({type(exc).__name__}: {exc})"
    return ""


def _kernels():
    from hbat.kernels import ewc  # imports triton: only when a kernel runs

    return ewc


def _kernel(name: str):
    def run(*args):
        return _kernels().call(name, *args)

    run.__name__ = run.__qualname__ = name
    return run


_library.define("hbat_triton", {op.name: _kernel(op.name) for op in table.OPS})
_library.export_ops("hbat_triton", globals())
