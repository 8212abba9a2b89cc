"""Input checks for the multi-tensor ops.

Every op validates all of its inputs before any kernel runs, so a bad input never leaves a tensor half
updated. Messages name the argument, the index and both shapes / dtypes / devices (both tensors of an
overlap). The list checks read metadata and addresses only (no device sync, O(n log n) for n tensors);
checking the values of a per-tensor vector that lives on a device costs one sync. Under torch.compile the
checks that read values or addresses are skipped (they cannot be traced); the others run at trace time.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

#: dtypes the native backends (cpu, triton, cuda) accept for every tensor role.
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the reference backend also runs in float64 (it is the ground truth of the tests).
REFERENCE_DTYPES = NATIVE_DTYPES + (torch.float64,)
#: the kernels compute in float32: a scalar or coefficient beyond this is inf there
FLOAT32_MAX = torch.finfo(torch.float32).max


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def as_list(name: str, seq) -> list:
    """``seq`` (any iterable, a generator too: it is read once) as a list; a list as it is (never modified)."""
    if isinstance(seq, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of tensors (a list or tuple), not a single tensor")
    if type(seq) is list:
        return seq
    try:
        return list(seq)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of tensors, not {type(seq).__name__}") from None


def as_tensor_list(name: str, seq) -> list[torch.Tensor]:
    """``seq`` (any iterable, a generator too: it is read once) as a list of tensors."""
    items = list(as_list(name, seq))
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a torch.Tensor")
    return items


def check_lists(
    lists: Mapping[str, Sequence[torch.Tensor]],
    *,
    dtypes: tuple[torch.dtype, ...],
    need_dense: bool,
    writable: Sequence[str] = (),
    may_alias: Mapping[str, Sequence[str]] | None = None,
    rules: Mapping[str, str] | None = None,
) -> tuple[list[list[torch.Tensor]], torch.device | None]:
    """Check parallel tensor lists; return them as lists and the common device (None when empty).

    ``lists`` maps argument name -> sequence; the first entry is the one the others are compared to.
    ``need_dense`` (the native backends, which stream over each tensor's memory): every tensor dense (its
    elements fill one block of memory: contiguous, channels_last, a transposed matrix...) and laid out like
    the first list's tensor at its index; the tensors at an index that is not contiguous are returned as
    contiguous views of the same memory (the same permutation of dimensions for every list), so the kernels
    pair the same elements.
    ``writable`` names the lists that the op updates in place: none of their tensors may share memory
    with itself (an ``expand()``ed view) or with any other tensor of the call, except that ``may_alias``
    (written list -> lists) lets a written tensor BE the tensor at the same index of those lists
    (``lerp_``'s ``dst`` may be ``a`` or ``b``). Read-only lists may overlap each other freely. ``rules`` (list
    name -> "float32" or the name of another list) narrows a list's dtypes: float32 only, or tensor i has the
    dtype of that list's tensor i (the op table's dtype rules).
    """
    names = list(lists)
    converted = [as_tensor_list(name, lists[name]) for name in names]
    by_name = dict(zip(names, converted))
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
            if rules and name in rules:
                _check_rule(name, i, t, rules[name], by_name)
            if t.shape != ref.shape:
                raise ValueError(f"{name}[{i}] has shape {_shape(t)} but {lead_name}[{i}] has shape {_shape(ref)}")
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device} but {lead_name}[0] is on {device}")
            if need_dense and not (t.is_contiguous() and ref.is_contiguous()):
                _check_layout(name, i, t, lead_name, ref)
        for name, items in zip(names, converted):
            if name in writable:
                _check_writable(name, i, items[i])
    if writable and not torch.compiler.is_compiling():
        check_no_overlap(by_name, writable, may_alias or {})
    if need_dense:
        for i, ref in enumerate(lead):
            if not ref.is_contiguous():
                order = dense_order(ref)
                for items in converted:
                    items[i] = items[i].permute(order)
    return converted, device


def dense_order(t: torch.Tensor) -> list[int] | None:
    """The dimensions of ``t`` from the slowest to the fastest in memory when ``t`` is dense (its elements fill
    numel consecutive slots: ``t.permute(order)`` is contiguous), else None."""
    if t.numel() == 0:
        return list(range(t.dim()))
    moving = sorted((d for d in range(t.dim()) if t.shape[d] != 1), key=t.stride)
    expected = 1
    for d in moving:
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return moving[::-1] + [d for d in range(t.dim()) if t.shape[d] == 1]


def _same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    return all(a == b for a, b, n in zip(t.stride(), ref.stride(), ref.shape) if n != 1)


def _check_layout(name: str, i: int, t: torch.Tensor, lead_name: str, ref: torch.Tensor) -> None:
    """A tensor of a native backend's call that is not contiguous: dense, and laid out like ``ref`` (lead's)."""
    if dense_order(t) is None:
        raise ValueError(
            f"{name}[{i}] (shape {_shape(t)}, strides {tuple(t.stride())}) is not dense in memory (a slice with "
            f"gaps or an expand()ed view); this backend streams over each tensor's memory (use backend='reference')")
    if t.numel() and not _same_layout(t, ref):
        raise ValueError(
            f"{name}[{i}] (strides {tuple(t.stride())}) is laid out unlike {lead_name}[{i}] (strides "
            f"{tuple(ref.stride())}); this backend needs the tensors at one index in one memory layout (use "
            f"backend='reference', or lay {name}[{i}] out like {lead_name}[{i}]: torch.empty_like({lead_name}[{i}]))")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_rule(name: str, i: int, t: torch.Tensor, rule: str, lists) -> None:
    if rule == "float32":
        if t.dtype != torch.float32:
            raise TypeError(f"{name}[{i}] has dtype {_dtype_name(t.dtype)}; {name} must be float32")
    elif t.dtype != lists[rule][i].dtype:
        raise TypeError(f"{name}[{i}] has dtype {_dtype_name(t.dtype)} but {rule}[{i}] has "
                        f"{_dtype_name(lists[rule][i].dtype)}; {name} must have the dtype of {rule}")


def _check_writable(name: str, i: int, t: torch.Tensor) -> None:
    if t.requires_grad and t.is_leaf:
        raise ValueError(f"{name}[{i}] is a leaf that requires grad and cannot be updated in place")
    if _overlaps_itself(t):
        raise ValueError(
            f"{name}[{i}] (shape {_shape(t)}, strides {tuple(t.stride())}) has elements that share memory "
            f"(an expand()ed view?); {name} is written in place, so pass a .contiguous() copy"
        )


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: in order of stride, each dimension must step past
    everything the smaller ones reach (exact for expand()ed and dense views; conservative otherwise)."""
    if t.is_contiguous():
        return False
    reach = 0
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def _same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (x.data_ptr(), x.shape, x.stride(), x.dtype) == (y.data_ptr(), y.shape, y.stride(), y.dtype)


def check_no_overlap(lists: Mapping[str, list[torch.Tensor]], writable: Sequence[str],
                     may_alias: Mapping[str, Sequence[str]]) -> None:
    """Refuse a tensor of a ``writable`` list whose memory span (first to last byte) overlaps that of any
    other tensor of the call (see ``check_lists``). One sort of the spans, then one sweep that remembers
    the span reaching furthest so far, and the written one reaching furthest: O(n log n) for n tensors."""
    allowed = {(r, i) for w, readers in may_alias.items() for r in readers
               for i, (x, y) in enumerate(zip(lists[w], lists[r])) if _same_view(x, y)}
    spans = []  # (first byte, end byte, written, name, index)
    for name, items in lists.items():
        written = name in writable
        for i, t in enumerate(items):
            n = t.numel()
            if n == 0 or t.is_meta or (allowed and (name, i) in allowed):
                continue
            # torch strides are never negative: the last element is at sum (size - 1) * stride
            last = n - 1 if t.is_contiguous() else sum((size - 1) * st for size, st in zip(t.shape, t.stride()))
            start = t.data_ptr()
            spans.append((start, start + (last + 1) * t.element_size(), written, name, i))
    spans.sort()
    furthest = furthest_written = (0, 0)
    for span in spans:
        other = furthest if span[2] else furthest_written
        if span[0] < other[1]:
            _raise_overlap(lists, span, other, may_alias)
        if span[1] > furthest[1]:
            furthest = span
        if span[2] and span[1] > furthest_written[1]:
            furthest_written = span


def _raise_overlap(lists, span, other, may_alias) -> None:
    order = list(lists)
    (_, _, _, name, i), (_, _, _, other_name, j) = sorted(
        (span, other), key=lambda s: (not s[2], order.index(s[3]), s[4]))  # the written one first
    x, y = lists[name][i], lists[other_name][j]
    what = ("are the same tensor (listed twice? e.g. tied weights from named_parameters(remove_duplicate=False))"
            if _same_view(x, y) else "overlap in memory")
    exception = ""
    if name in may_alias:
        exception = f" ({name}[i] may be {' or '.join(f'{r}[i]' for r in may_alias[name])} itself)"
    raise ValueError(
        f"{name}[{i}] and {other_name}[{j}] {what}; {name} is written in place, so its tensors must not "
        f"share memory with any other tensor of the call{exception}"
    )


def as_vector(name: str, vec) -> torch.Tensor:
    """A tensor as it is; a sequence or other iterable of numbers (read once) as a float64 tensor."""
    if isinstance(vec, torch.Tensor):
        return vec
    try:
        return torch.as_tensor(vec if isinstance(vec, Sequence) else list(vec), dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor or a sequence of floats, not {type(vec).__name__}") from None


def check_vector(name: str, vec, n: int, device: torch.device | None, *, lam: float | None = None) -> torch.Tensor:
    """A per-tensor vector (importance, weights): 1-D, length n, floating, every entry finite as a float32
    and, with ``lam``, ``lam * vec[i]`` too (the penalty's coefficient). Returned as float32 on ``device``.

    The values are checked before the move to ``device``: a CPU tensor or a sequence costs no device sync,
    a vector already on the device one (skipped under torch.compile)."""
    vec = as_vector(name, vec)
    if not vec.is_floating_point():
        raise TypeError(f"{name} has dtype {vec.dtype}; it must be a floating tensor")
    if vec.dim() != 1 or vec.numel() != n:
        raise ValueError(f"{name} has shape {_shape(vec)} but there are {n} tensors; it must have shape ({n},)")
    if n and not torch.compiler.is_compiling():
        _check_values(name, vec.detach(), lam)
    if device is not None and vec.device != device:
        vec = vec.to(device)
    return vec.detach().to(torch.float32).contiguous()


def _check_values(name: str, vec: torch.Tensor, lam: float | None) -> None:
    v = vec.to(torch.float64)
    limit = v.abs() if lam is None else torch.maximum(v.abs(), (lam * v).abs())
    if not bool((limit <= FLOAT32_MAX).all()):  # NaN fails the comparison too
        bad = int((~(limit <= FLOAT32_MAX)).nonzero()[0, 0])
        value = v[bad].item()
        if value != value or abs(value) == float("inf"):
            raise ValueError(f"{name}[{bad}] is {value}; every entry must be finite")
        if abs(value) > FLOAT32_MAX:
            raise ValueError(f"{name}[{bad}] is {value:g}, beyond float32's range (+-{FLOAT32_MAX:.4g})")
        raise ValueError(
            f"lam * {name}[{bad}] = {lam:g} * {value:g} overflows float32 (+-{FLOAT32_MAX:.4g}): the penalty "
            f"and its gradient would be inf or NaN; lower lam or the importance"
        )


def check_scalar(name: str, value, *, float32: bool = False) -> float:
    """A real, finite number (a 1-element tensor is read with .item(): one sync if on a device); with
    ``float32``, also within float32's range (the kernels compute in float32)."""
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
    if float32 and abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} is {value:g}, beyond float32's range (+-{FLOAT32_MAX:.4g})")
    return value
