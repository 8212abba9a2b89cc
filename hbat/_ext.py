"""Loading the compiled extensions, remembering why one could not be loaded."""
from __future__ import annotations

import importlib
from functools import lru_cache

_HINT = {
    "hbat._C": "the C++ CPU extension was not built; reinstall with `pip install --no-build-isolation .`",
    "hbat._C_cuda": "the CUDA extension was not built (it needs a CUDA build of torch and nvcc at install time; "
    "HBAT_FORCE_CPU must be unset); reinstall with `pip install --no-build-isolation .`",
}


@lru_cache(maxsize=None)
def load_extension(name: str):
    """Import extension ``name`` once. Returns (module, "") or (None, reason)."""
    if name == "hbat._C_cuda":
        cpu, why = load_extension("hbat._C")  # the CUDA kernels register into the schemas defined by hbat._C
        if cpu is None:
            return None, why
    try:
        return importlib.import_module(name), ""
    except ImportError as exc:
        return None, f"{_HINT.get(name, name)} ({exc})"
