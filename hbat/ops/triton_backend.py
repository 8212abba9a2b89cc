"""The Triton backend: kernels in the repository's kernels/ folder (installed as hbat.kernels)."""
from __future__ import annotations


def unavailable_reason() -> str:
    return "the Triton backend is not implemented yet"
