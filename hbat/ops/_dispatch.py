"""Backend selection: which implementation runs an op for tensors on a given device.

Backends are modules with the functions of the backend contract (see reference.py). They are imported
lazily, so `import hbat` needs torch alone; a backend that cannot load reports why.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType

import torch

from .validate import NATIVE_DTYPES, REFERENCE_DTYPES

BACKENDS = ("reference", "cpu", "triton", "cuda")
# auto picks the first available backend in this order for each device type
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
# device types each backend runs on
DEVICE_TYPES = {
    "reference": None,  # any
    "cpu": ("cpu",),
    "cuda": ("cuda",),
    # Triton compiles for GPUs; on the CPU it runs only under its interpreter (TRITON_INTERPRET=1, tests)
    "triton": ("cuda", "cpu"),
}


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[ModuleType | None, str]:
    """Import the backend module; return (module, "") or (None, why it is unavailable)."""
    try:
        module = importlib.import_module(f"hbat.ops.{name}_backend" if name != "reference" else "hbat.ops.reference")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available", with its reason
        return None, f"{type(exc).__name__}: {exc}"
    why_not = getattr(module, "unavailable_reason", lambda: "")()
    if why_not:
        return None, why_not
    _MODULES[name] = module
    return module, ""


_MODULES: dict[str, ModuleType] = {}  # the backends that loaded


def backend_status(name: str, device: torch.device | str) -> tuple[bool, str]:
    """(available, reason) of backend ``name`` for tensors on ``device``."""
    device = torch.device(device)
    if name not in BACKENDS:
        return False, f"unknown backend {name!r}; choose from {', '.join(('auto',) + BACKENDS)}"
    types = DEVICE_TYPES[name]
    if types is not None and device.type not in types:
        return False, f"backend {name!r} does not run on {device.type} tensors"
    if name == "triton" and device.type == "cpu" and not triton_interpreter_on():
        return False, "Triton runs on CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before importing triton)"
    module, why = _load(name)
    return module is not None, why


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run ops on tensors on ``device``, fastest first."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("reference",))
    names = list(order) + [b for b in BACKENDS if b not in order]
    return [b for b in names if backend_status(b, device)[0]]


def resolve(backend: str, device: torch.device | None) -> tuple[str, ModuleType]:
    """Pick the backend module for an op on tensors on ``device`` (None: an empty op, use the reference)."""
    if device is None:
        return "reference", _load("reference")[0]
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if backend_status(name, device)[0]:
                return name, _load(name)[0]
        return "reference", _load("reference")[0]
    ok, why = backend_status(backend, device)
    if not ok:
        raise RuntimeError(
            f"backend {backend!r} is not available for {device} tensors: {why}. "
            f"Available here: {', '.join(available_backends(device)) or 'none'} (see `python -m hbat.info`)"
        )
    return backend, _load(backend)[0]


def resolve_traceable(backend: str, device: torch.device | None) -> tuple[str, ModuleType]:
    """``resolve``, also while torch.compile traces the caller: the choice is then made once, at trace time
    (it imports modules, which dynamo cannot trace) and is a constant of the graph."""
    if torch.compiler.is_compiling():
        from ._compile import backend_name  # imported only while tracing: torch._dynamo is loaded then

        name = backend_name(backend, device)
        return name, _MODULES[name]
    return resolve(backend, device)


def accepted_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    return REFERENCE_DTYPES if backend == "reference" else NATIVE_DTYPES
