"""Input checks for the multi-tensor ops.

Every op validates all of its inputs before any kernel runs, so a bad input never leaves a tensor half
updated. Messages name the argument, the index and both shapes / dtypes / devices.
"""
from __future__ import annotations

from typing import Sequence

import torch

#: dtypes the native backends (cpu, triton, cuda) accept for every tensor role.
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the reference backend also runs in float64 (it is the ground truth of the tests).
REFERENCE_DTYPES = NATIVE_DTYPES + (torch.float64,)


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def as_tensor_list(name: str, seq) -> list[torch.Tensor]:
    if isinstance(seq, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of tensors (a list or tuple), not a single tensor")
    try:
        items = list(seq)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of tensors, not {type(seq).__name__}") from None
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a torch.Tensor")
    return items


def check_lists(
    lists: dict[str, Sequence[torch.Tensor]],
    *,
    dtypes: tuple[torch.dtype, ...],
    need_contiguous: bool,
    writable: Sequence[str] = (),
) -> tuple[list[list[torch.Tensor]], torch.device | None]:
    """Check parallel tensor lists; return them as lists and the common device (None when empty).

    ``lists`` maps argument name -> sequence; the first entry is the one the others are compared to.
    ``writable`` names the lists that the op updates in place.
    """
    names = list(lists)
    converted = [as_tensor_list(name, lists[name]) for name in names]
    lead_name, lead = names[0], converted[0]
    for name, items in zip(names[1:], converted[1:]):
        if len(items) != len(lead):
            raise ValueError(f"{lead_name} has {len(lead)} tensors but {name} has {len(items)}")
    device = lead[0].device if lead else None
    for i in range(len(lead)):
        ref = lead[i]
        for name, items in zip(names, converted):
            t = items[i]
            if t.dtype not in dtypes:
                kind = "complex" if t.is_complex() else ("integer/bool" if not t.is_floating_point() else "floating")
                allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
                raise TypeError(
                    f"{name}[{i}] has {kind} dtype {str(t.dtype).replace('torch.', '')}; "
                    f"this backend accepts {allowed}"
                )
            if t.shape != ref.shape:
                raise ValueError(f"{name}[{i}] has shape {_shape(t)} but {lead_name}[{i}] has shape {_shape(ref)}")
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device} but {lead_name}[0] is on {device}")
            if need_contiguous and not t.is_contiguous():
                raise ValueError(
                    f"{name}[{i}] (shape {_shape(t)}, strides {tuple(t.stride())}) is not contiguous; "
                    f"this backend needs contiguous tensors (use backend='reference' or pass .contiguous() copies)"
                )
        for name, items in zip(names, converted):
            if name in writable and items[i].requires_grad and items[i].is_leaf:
                raise ValueError(f"{name}[{i}] is a leaf that requires grad and cannot be updated in place")
    return converted, device


def check_vector(name: str, vec, n: int, device: torch.device | None, *, finite: bool = True) -> torch.Tensor:
    """A per-tensor vector (importance, weights): 1-D, length n, floating, finite; returned as float32."""
    if not isinstance(vec, torch.Tensor):
        try:
            vec = torch.as_tensor(vec, dtype=torch.float32)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a tensor or a sequence of floats, not {type(vec).__name__}") from None
    if not vec.is_floating_point():
        raise TypeError(f"{name} has dtype {vec.dtype}; it must be a floating tensor")
    if vec.dim() != 1 or vec.numel() != n:
        raise ValueError(f"{name} has shape {_shape(vec)} but there are {n} tensors; it must have shape ({n},)")
    if device is not None and vec.device != device:
        vec = vec.to(device)
    if finite and n and not bool(torch.isfinite(vec).all()):
        bad = int((~torch.isfinite(vec)).nonzero()[0, 0])
        raise ValueError(f"{name}[{bad}] is {vec[bad].item()}; every entry must be finite")
    return vec.detach().to(torch.float32).contiguous()


def check_scalar(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {_shape(value)}")
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, not {type(value).__name__}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
