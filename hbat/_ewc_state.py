"""Checks of a HybridEWC state dict against the object it is loaded into: every field, before anything changes."""
from __future__ import annotations

import math
import numbers

import torch

_KEYS = ("version", "unit_names", "unit_numel", "fragment_names", "objectives", "objective", "accumulated",
         "stages_done", "importance", "last_change", "history", "anchors")
_SETTINGS = ("f_max", "lam", "importance_mode", "importance_scale")


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


def _names(state, key: str) -> list[str]:
    value = state[key]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"state[{key!r}] must be a list of str, not {type(value).__name__}")
    return list(value)


def _vector(where: str, value, n: int, *, nonnegative: bool) -> None:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"{where} must be a floating tensor, not {type(value).__name__}")
    if tuple(value.shape) != (n,):
        raise ValueError(f"{where} has shape {tuple(value.shape)}, expected ({n},)")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{where} holds NaN or inf")
    if nonnegative and bool((value < 0).any()):
        raise ValueError(f"{where} holds negative values (a squared change or an importance is >= 0)")


def _count(where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{where} must be an integer >= 0, got {value!r}")
    return int(value)


def _check_history(history, objectives) -> None:
    if not isinstance(history, list):
        raise ValueError(f"state['history'] must be a list, not {type(history).__name__}")
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise ValueError(f"state['history'][{i}] must be a dict, not {type(entry).__name__}")
        for key, value in entry.items():
            where = f"state['history'][{i}][{key!r}]"
            if key in ("ended", "began"):
                if value is not None and value not in objectives:
                    raise ValueError(f"{where} is {value!r}, not one of {list(objectives)} or None")
            elif not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number under a str key, got {value!r}")


def _check_settings(saved, current: dict) -> None:
    if not isinstance(saved, dict):
        raise ValueError(f"state['settings'] must be a dict, not {type(saved).__name__}")
    differ = [f"{k}={saved[k]!r} (here {current[k]!r})" for k in _SETTINGS if k in saved and saved[k] != current[k]]
    if differ:
        raise ValueError("the state was saved with other settings: " + ", ".join(differ) + ". Its importance and "
                         "anchors belong to them: build the HybridEWC with the saved settings (to change them on "
                         "purpose, edit state['settings'] before loading)")


def check_state(state, version: int, *, names, numel, fragment_names, fragment_shapes, objectives, settings) -> None:
    """Raise unless ``state`` fits this HybridEWC: ValueError naming the field (KeyError for a missing key,
    TypeError when ``state`` is not a dict)."""
    if not isinstance(state, dict):
        raise TypeError(f"HybridEWC state must be a dict, not {type(state).__name__}")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise KeyError(f"HybridEWC state lacks keys {missing}")
    if state["version"] != version:
        raise ValueError(f"HybridEWC state has version {state['version']}, this hbat reads version {version}")
    if "settings" in state:
        _check_settings(state["settings"], settings)
    if _names(state, "unit_names") != list(names):
        raise ValueError(_diff_names("importance units", _names(state, "unit_names"), list(names)))
    if not isinstance(state["unit_numel"], (list, tuple)) or len(state["unit_numel"]) != len(names):
        raise ValueError(f"state['unit_numel'] must list {len(names)} sizes")
    for name, a, b in zip(names, state["unit_numel"], numel):
        if _count(f"state['unit_numel'] of {name!r}", a) != int(b):
            raise ValueError(f"unit {name!r} has {a} elements in the state but {b} in this model")
    if _names(state, "fragment_names") != list(fragment_names):
        raise ValueError(_diff_names("parameter tensors", _names(state, "fragment_names"), list(fragment_names)))
    if _names(state, "objectives") != list(objectives):
        raise ValueError(f"state objectives {list(state['objectives'])} != this HybridEWC's {list(objectives)}")
    if state["objective"] is not None and state["objective"] not in objectives:
        raise ValueError(f"state's current objective {state['objective']!r} is not one of {list(objectives)}")
    for key in ("accumulated", "stages_done"):
        if not isinstance(state[key], dict):
            raise ValueError(f"state[{key!r}] must be a dict, not {type(state[key]).__name__}")
        absent = [o for o in objectives if o not in state[key]]
        if absent:
            raise KeyError(f"state[{key!r}] lacks objectives {absent}")
    n = len(names)
    for o in objectives:
        _vector(f"state['accumulated'][{o!r}]", state["accumulated"][o], n, nonnegative=True)
        _count(f"state['stages_done'][{o!r}]", state["stages_done"][o])
    _vector("state['importance']", state["importance"], n, nonnegative=True)
    _vector("state['last_change']", state["last_change"], n, nonnegative=True)
    _check_history(state["history"], objectives)
    anchors = state["anchors"]
    if not isinstance(anchors, (list, tuple)) or len(anchors) != len(fragment_shapes):
        count = len(anchors) if isinstance(anchors, (list, tuple)) else type(anchors).__name__
        raise ValueError(f"state has {count} anchors, this model {len(fragment_shapes)}")
    for name, saved, shape in zip(fragment_names, anchors, fragment_shapes):
        if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != tuple(shape):
            got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"anchor of {name!r} has shape {got} in the state but {tuple(shape)} here")
        if not saved.is_floating_point() or not bool(torch.isfinite(saved).all()):
            raise ValueError(f"anchor of {name!r} in the state is not a finite floating tensor")
