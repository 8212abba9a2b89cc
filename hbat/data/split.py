"""Seeded splitting of a data set into the N disjoint parts of Algorithm 1, and a held-out split."""
from __future__ import annotations

import random
from typing import Sequence, TypeVar

Row = TypeVar("Row")


def split_parts(rows: Sequence[Row], n: int, *, seed: int) -> list[list[Row]]:
    """Shuffle ``rows`` with ``seed`` and cut them into ``n`` disjoint parts covering all rows.

    Part sizes differ by at most one (the first ``len(rows) % n`` parts get the extra row). The rows
    themselves are not copied. The same (rows, n, seed) always gives the same parts.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of parts) must be a positive int, got {n!r}")
    if len(rows) < n:
        raise ValueError(f"cannot split {len(rows)} rows into {n} non-empty parts")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    base, extra = divmod(len(rows), n)
    parts, start = [], 0
    for index in range(n):
        size = base + (1 if index < extra else 0)
        parts.append([rows[i] for i in order[start:start + size]])
        start += size
    return parts


def train_val_split(rows: Sequence[Row], val_size: int | float, *, seed: int) -> tuple[list[Row], list[Row]]:
    """Seeded split into (train, validation); ``val_size`` is a row count or a fraction in (0, 1)."""
    if isinstance(val_size, float) and val_size >= 1.0 and val_size.is_integer():
        val_size = int(val_size)  # a count that went through a float-typed config field
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size as a fraction must be in (0, 1), got {val_size}")
        val_size = max(1, round(len(rows) * val_size))
    if not 0 < val_size < len(rows):
        raise ValueError(f"val_size must leave both parts non-empty: {val_size} of {len(rows)} rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[val_size:]], [rows[i] for i in order[:val_size]]
