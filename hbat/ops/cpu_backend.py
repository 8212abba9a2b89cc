"""The C++ CPU backend (csrc/cpu): ATen parallel loops, one pass over the data per call; one function per op of
the table, each running torch.ops.hbat.<op>."""
from __future__ import annotations

from . import _library, _native

_library.export_ops("hbat", globals())


def unavailable_reason() -> str:
    return _native.unavailable_reason("hbat._C")
