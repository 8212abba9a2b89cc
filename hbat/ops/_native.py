"""The compiled backends (C++ CPU and CUDA) share one set of operators, torch.ops.hbat.*, defined in
csrc/bindings/library.cpp from the op table; the dispatcher runs the kernel registered for the tensors' device.
Their fakes and the backward of squared_change are registered from Python (_library.py) as soon as the extension
is loaded; the version bumps of written tensors by the extension itself, in C++ (cheaper per call)."""
from __future__ import annotations

from hbat._ext import load_extension

from . import _library


def unavailable_reason(*extensions: str) -> str:
    """"" once every extension named loaded (and the ops are registered); otherwise why one did not."""
    for name in extensions:
        why = load_extension(name)[1]
        if why:
            return why
    _library.register("hbat", version_bumps=False)  # hbat._C registers its version bumps in C++
    return ""
