"""Faults the tests cause for certain, instead of hoping for them (a large learning rate no longer makes a tiny
model's loss overflow under every library version).

- ``nan_loss(monkeypatch, "hbat.trainer.dpo.dpo_loss")``: from its ``from_call``-th call on, the loss function
  returns a NaN loss (the graph is kept, so backward and the optimizer step run as they would on a real NaN);
- ``nan_dpo_env(folder)``: the environment of a child process (and of its own children) in which ``dpo_loss``
  returns NaN for every run whose ``dpo.beta`` is ``NAN_BETA``, so one run of a comparison diverges.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

NAN_BETA = 0.0123457  # `dpo.beta` of the run that diverges in a child process (nan_dpo_env)


def _poisoned(out):
    """The loss (a tensor, or the first element of a tuple) times NaN."""
    if isinstance(out, tuple):
        return (out[0] * float("nan"),) + out[1:]
    assert isinstance(out, torch.Tensor), type(out)
    return out * float("nan")


def nan_loss(monkeypatch, target: str, *, from_call: int = 1) -> dict:
    """Patch ``target`` ("package.module.function", looked up by the trainer through the module) so that it
    returns a NaN loss from call ``from_call`` on; the returned dict counts the calls."""
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        return _poisoned(out) if calls["n"] >= from_call else out

    monkeypatch.setattr(module, name, poisoned)
    return calls


SITECUSTOMIZE = f'''\
# written by tests/faults.py: dpo_loss returns NaN for the runs whose dpo.beta is {NAN_BETA}
import hbat.trainer.dpo as _dpo

_real = _dpo.dpo_loss


def _dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, *args, **kwargs):
    out = _real(chosen, rejected, ref_chosen, ref_rejected, beta, *args, **kwargs)
    if abs(float(beta) - {NAN_BETA}) < 1e-12:
        return (out[0] * float("nan"),) + tuple(out[1:])
    return out


_dpo.dpo_loss = _dpo_loss
'''


def nan_dpo_env(folder: Path) -> dict:
    """``os.environ`` plus a ``sitecustomize`` on PYTHONPATH that every child interpreter runs at start."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}
