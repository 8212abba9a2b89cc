"""Checks of a HybridEWC state dict against the object it is loaded into, with messages saying what differs."""
from __future__ import annotations

import torch

_KEYS = ("version", "unit_names", "unit_numel", "fragment_names", "objectives", "objective", "accumulated",
         "stages_done", "importance", "last_change", "history", "anchors")


def _diff_names(kind: str, saved: list[str], current: list[str]) -> str:
    missing = [n for n in current if n not in set(saved)]
    unexpected = [n for n in saved if n not in set(current)]
    parts = []
    if missing:
        parts.append(f"missing in the state: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"not in this model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if not parts:
        parts.append("same names in a different order")
    return f"{kind} differ ({len(saved)} saved, {len(current)} here): " + "; ".join(parts)


def check_state(state, version: int, *, names, numel, fragment_names, anchors, objectives) -> None:
    if not isinstance(state, dict):
        raise TypeError(f"HybridEWC state must be a dict, not {type(state).__name__}")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise KeyError(f"HybridEWC state lacks keys {missing}")
    if state["version"] != version:
        raise ValueError(f"HybridEWC state has version {state['version']}, this hbat reads version {version}")
    if list(state["unit_names"]) != list(names):
        raise ValueError(_diff_names("importance units", list(state["unit_names"]), list(names)))
    for name, a, b in zip(names, state["unit_numel"], numel):
        if int(a) != int(b):
            raise ValueError(f"unit {name!r} has {a} elements in the state but {b} in this model")
    if list(state["fragment_names"]) != list(fragment_names):
        raise ValueError(_diff_names("parameter tensors", list(state["fragment_names"]), list(fragment_names)))
    if list(state["objectives"]) != list(objectives):
        raise ValueError(f"state objectives {list(state['objectives'])} != this HybridEWC's {list(objectives)}")
    if state["objective"] is not None and state["objective"] not in objectives:
        raise ValueError(f"state's current objective {state['objective']!r} is not one of {list(objectives)}")
    for key in ("accumulated", "stages_done"):
        absent = [o for o in objectives if o not in state[key]]
        if absent:
            raise KeyError(f"state[{key!r}] lacks objectives {absent}")
    n = len(names)
    for o in objectives:
        if tuple(state["accumulated"][o].shape) != (n,):
            raise ValueError(f"state['accumulated'][{o!r}] has shape {tuple(state['accumulated'][o].shape)}, "
                             f"expected ({n},)")
    for key in ("importance", "last_change"):
        if tuple(state[key].shape) != (n,):
            raise ValueError(f"state[{key!r}] has shape {tuple(state[key].shape)}, expected ({n},)")
    if len(state["anchors"]) != len(anchors):
        raise ValueError(f"state has {len(state['anchors'])} anchors, this model {len(anchors)}")
    for name, saved, here in zip(fragment_names, state["anchors"], anchors):
        if not isinstance(saved, torch.Tensor) or saved.shape != here.shape:
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"anchor of {name!r} has shape {shape} in the state but {tuple(here.shape)} here")
        if not saved.is_floating_point() or not bool(torch.isfinite(saved).all()):
            raise ValueError(f"anchor of {name!r} in the state is not a finite floating tensor")
