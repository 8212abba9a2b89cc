"""Helpers shared by the tests of hbat.ops: the backends to run, each with the device it runs on here."""
from __future__ import annotations

import pytest
import torch

from hbat import ops


def backend_device(name: str) -> str:
    """cuda needs a GPU; Triton runs on one if there is one, else under its interpreter on the CPU."""
    return "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"


def backend_cases(names=("reference", "cpu", "triton", "cuda")) -> list:
    """pytest params (backend, device), skipped with the reason where a backend cannot run here."""
    cases = []
    for name in names:
        device = backend_device(name)
        ok, why = ops.backend_status(name, device)
        cases.append(pytest.param(name, device, id=name, marks=pytest.mark.skipif(not ok, reason=why)))
    return cases
