"""Errors of the user's input or machine, and the boundaries where hbat turns others' exceptions into them.

``UserError`` is what a config, a model folder, a tokenizer, a data file or the disk can cause: its message
names the path or the config key and what to do, in one line. Every ``hbat`` command prints it as one line
``hbat <command>: <message>`` with exit code 2 (hbat.trainer.run.report_error). An exception of another kind that
escapes a command is a bug of hbat, and keeps its traceback.

Third-party code reports a bad file in its own terms (transformers' ``RuntimeError``, pickle's
``UnpicklingError``, pyarrow's ``ArrowInvalid``, torch.save's ``RuntimeError: ... unexpected pos`` for a full
disk), without the path or the key. The two boundaries below wrap exactly the calls that read or write a
user's files:

- ``reading(what, path, key)``: anything raised while reading ``path`` becomes a UserError naming the key,
  the path, what it should be and the reason (one line);
- ``writing(path)``: a failed write (an ``OSError``, or torch.save's ``RuntimeError`` caused by one) becomes
  a UserError naming the file and the reason (``no space left on device writing runs/x/checkpoint.pt``).
"""
from __future__ import annotations

import contextlib
import errno
import pickle

REASON_CHARS = 300  # the reason quoted from a third-party message, whitespace collapsed


class UserError(ValueError):
    """An error of the user's input or machine; the message names the path or config key (one line)."""


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    """``text`` with its whitespace collapsed, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(exc: BaseException) -> str:
    """``exc`` as a short reason: its type and first words, or what a refused pickle means."""
    if isinstance(exc, pickle.UnpicklingError):
        return ("a weights file holds objects other than tensors, which hbat never loads (no code runs from a "
                "file): save the model with safetensors")
    return f"{type(exc).__name__}: {one_line(exc)}"


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError that caused ``exc`` (``exc`` itself, or one in its ``__cause__`` / ``__context__`` chain); for
    an error of Rust code (safetensors' ``SafetensorError``) that only says so in its message, an ENOSPC."""
    seen, first = set(), exc
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    if "No space left on device" in str(first):
        return OSError(errno.ENOSPC, "No space left on device")
    return None


def _disk_problem(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    if error.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return error.strerror or one_line(error)


@contextlib.contextmanager
def reading(what: str, path, key: str | None = None):
    """Any exception (but a UserError) raised inside: ``UserError("<key> = <path>: cannot be read as <what>
    (<reason>)")``. Wrap only the third-party call that reads the user's file."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers, tokenizers, pyarrow, torch raise many kinds
        where = f"{key} = {path}" if key else f"{path}"
        raise UserError(f"{where}: cannot be read as {what} ({reason(exc)})") from exc


@contextlib.contextmanager
def writing(path):
    """A failed write of ``path`` inside (an OSError, or an exception an OSError caused, as torch.save's
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``): ``UserError("<problem> writing
    <path>")``. Other exceptions pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised unless an OSError caused it
        error = _os_error(exc)
        if error is None:
            raise
        raise UserError(f"{_disk_problem(error)} writing {path}") from exc
