"""Field checks of the config dataclasses, run by their ``__post_init__``.

A failed check raises ``ConfigError`` naming the field (``SFTConfig.lr must be ...``); ``load_config``
re-raises it with the dotted key of the resolved config (``config.sft.lr must be ...``).
"""
from __future__ import annotations

import math

from ..errors import UserError

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the trainer computes in float32
ADAMW_BETA1 = 0.9  # torch.optim.AdamW's default: its first step moves a weight by up to lr / (1 - beta1)


class ConfigError(UserError):
    """A bad config value. ``key`` is what the message names, ``field`` the dataclass field, ``problem`` the rest."""

    def __init__(self, key: str, problem: str, field: str | None = None):
        self.key, self.problem, self.field = key, problem, field or key.rsplit(".", 1)[-1]
        super().__init__(f"{key} {problem}")


def fail(obj, name: str, problem: str):
    raise ConfigError(f"{type(obj).__name__}.{name}", problem, name)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integers(obj, minimum: int, *names: str, optional: bool = False, maximum: int | None = None) -> None:
    """Each field is an integer in [minimum, maximum] (or None when ``optional``)."""
    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        if not _is_int(value):
            fail(obj, name, f"must be an integer{' or null' if optional else ''}, got {value!r}")
        if value < minimum:
            fail(obj, name, f"must be >= {minimum}{' or null' if optional else ''}, got {value}")
        if maximum is not None and value > maximum:
            fail(obj, name, f"must be <= {maximum}, got {value}")


def numbers(obj, *names: str, minimum: float = 0.0, strict: bool = False, maximum: float | None = None,
            optional: bool = False) -> None:
    """Each field is a finite number that fits float32, >= minimum (> minimum when ``strict``) and <= maximum."""
    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        if not _is_number(value) or not math.isfinite(value):
            fail(obj, name, f"must be a finite number{' or null' if optional else ''}, got {value!r}")
        if abs(value) > FLOAT32_MAX:
            fail(obj, name, f"must fit float32 (at most {FLOAT32_MAX:.4g} in size), got {value!r}")
        if value < minimum or strict and value == minimum:
            fail(obj, name, f"must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            fail(obj, name, f"must be <= {maximum:g}, got {value!r}")


def learning_rates(obj, *names: str) -> None:
    """Each field (a number, checked by ``numbers``) is an AdamW learning rate whose first step, lr / (1 - beta1),
    fits float32: a larger one is refused here rather than by torch at the first step ("value cannot be
    converted to type float without overflow")."""
    limit = FLOAT32_MAX * (1 - ADAMW_BETA1)
    for name in names:
        value = getattr(obj, name)
        if value > limit:
            fail(obj, name, f"must be at most {limit:.4g} (AdamW's first step, lr / (1 - beta1) = "
                            f"{value / (1 - ADAMW_BETA1):.4g}, must fit float32), got {value!r}")


def booleans(obj, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(obj, name), bool):
            fail(obj, name, f"must be true or false, got {getattr(obj, name)!r}")


def choice(obj, name: str, options, *, optional: bool = False) -> None:
    value = getattr(obj, name)
    if optional and value is None:
        return
    if value not in tuple(options):
        fail(obj, name, f"must be one of {tuple(options)}{' or null' if optional else ''}, got {value!r}")


def paths(obj, *names: str) -> None:
    """Each field is None or a non-empty string (whether the path exists is checked with the whole config)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            fail(obj, name, f"must be a path or null, got {value!r}")


def patterns(obj, *names: str) -> None:
    """Each field is None or a non-empty list of non-empty strings (fnmatch patterns)."""
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            fail(obj, name, f"must be null or a non-empty list of name patterns, got {value!r}")
