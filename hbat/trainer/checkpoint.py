"""The files hbat writes and reads back: atomic writes, sha256 checksums, loading that runs no code.

Every file is written to a temporary file beside it (named after the writing process, hbat.trainer.lock),
fsynced, then renamed over the target, with the mode a plain ``open()`` gives under the umask. A tensor
file (``save_atomic``) gets its checksum beside it, ``<file>.sha256`` (sha256sum's ``<hex>  <name>`` lines,
written atomically too). While a new version replaces an old one the checksum file lists both digests,
then only the new one, so a kill at any moment leaves a file that verifies.

``load`` checks the digest, then ``torch.load(weights_only=True)``: tensors and plain Python values only,
never code. A missing checksum, a mismatch or a file that does not load raises CheckpointError naming
the file and what to do (``remedy``); hbat never replaces such a file by itself.

``remove_stale_temp_files(folder)`` deletes the temporary files killed hbat processes of this host left.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re

import torch

from ..errors import UserError, writing
from .lock import stale_temp, temp_path

CHECKSUM_SUFFIX = ".sha256"
_DIGEST_LINE = re.compile(r"^([0-9a-f]{64})  (.+)$")


class CheckpointError(UserError):
    """A file hbat wrote that cannot be trusted or read; the message names it and what to do."""


def _write_temp(path: str, write) -> str:
    """``write(binary file)`` into a new temporary file beside ``path``, fsynced; returns its name. A failed write
    (a full disk: an OSError, or torch.save's RuntimeError "unexpected pos" an OSError caused) is a UserError
    naming ``path`` (hbat.errors.writing); the temporary file is removed."""
    with writing(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = temp_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            _unlink(tmp)
            raise
    return tmp


def _commit(tmp: str, path: str) -> None:
    try:
        with writing(path):
            os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_text_atomic(text: str, path: str) -> None:
    """``path`` holds either its old content or ``text`` (UTF-8), never a part."""
    _commit(_write_temp(path, lambda fh: fh.write(text.encode("utf-8"))), path)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed_digests(path: str) -> list[str]:
    """Digests the checksum file of ``path`` accepts; FileNotFoundError if it has none."""
    with open(path + CHECKSUM_SUFFIX, encoding="utf-8", errors="replace") as fh:
        return [m.group(1) for m in map(_DIGEST_LINE.match, fh.read().splitlines()) if m]


def _write_digests(digests: list[str], path: str) -> None:
    name = os.path.basename(path)
    write_text_atomic("".join(f"{d}  {name}\n" for d in digests), path + CHECKSUM_SUFFIX)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` so that ``path`` holds the old or the new complete file, and its checksum matches it."""
    tmp = _write_temp(path, lambda fh: torch.save(obj, fh))
    try:
        digest = sha256_of(tmp)
        try:
            current = _listed_digests(path)
        except FileNotFoundError:
            current = []
        _write_digests([digest] + [d for d in current if d != digest], path)  # the old and the new file verify
    except BaseException:
        _unlink(tmp)
        raise
    _commit(tmp, path)
    _write_digests([digest], path)


def load(path: str, *, remedy: str = "delete it"):
    """The content of a file ``save_atomic`` wrote, after checking its checksum; tensors on the CPU."""
    try:
        accepted = _listed_digests(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checksum file {os.path.basename(path)}{CHECKSUM_SUFFIX} beside it (not "
                              f"written by this version of hbat); {remedy}") from None
    if sha256_of(path) not in accepted:
        raise CheckpointError(f"{path}: the checksum does not match (the file is damaged or was changed after hbat "
                              f"wrote it); {remedy}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - e.g. an UnpicklingError for anything but tensors and plain values
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {reason}); {remedy}") from None


def remove(path: str) -> None:
    """Delete a file ``save_atomic`` wrote, and its checksum."""
    _unlink(path)
    _unlink(path + CHECKSUM_SUFFIX)


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the temporary files in ``folder`` that killed hbat processes of this host left; returns them."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    stale = [os.path.join(folder, n) for n in names if stale_temp(n)]
    for path in stale:
        _unlink(path)
    return stale


def rng_state() -> dict:
    """The RNG states as plain values (loadable with weights_only=True): python's tuple, torch's ByteTensors."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
