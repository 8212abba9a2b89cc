"""Which process owns a file: the run folder's lock, and temporary files named after their writer.

One run per run folder: ``<folder>/hbat.lock`` names the process writing it.

    with run_lock(folder):      # FolderLocked if a live process holds it; a dead one's lock is taken over
        ...

The lock file is created atomically (a hard link, which fails if it exists) and holds JSON ``{"pid", "host",
"started", "since"}`` (``started``: the process's start time on Linux, so a reused pid does not look alive).
A lock is stale when its host is this host and that process no longer runs, or when it is not a lock file
hbat wrote; a lock from another host is never taken over (whether its process runs cannot be known here):
delete it by hand when that run is gone. Taking the lock again in the process that holds it is a no-op, so
``hbat train`` can lock every method's folder up front and ``run_method`` locks its own.

Temporary files (``temp_path``) are named ``.tmp-<pid>-<random>@<host>~<target name>``, so a later start can
tell a file a killed process left (``stale_temp``: this host, that pid no longer runs) from one being
written now, by this or another process.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time

from ..errors import UserError, writing

LOCK_NAME = "hbat.lock"
HOST = socket.gethostname()
_HELD: set[str] = set()  # run folders this process holds
_TEMP_NAME = re.compile(r"^\.tmp-(\d+)-[0-9a-f]{8}@(.+?)~")


class FolderLocked(UserError):
    """Another live hbat process writes the run folder."""


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (and, when ``started`` is given and known, is that process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    now = process_start(pid)
    return started is None or now is None or now == started


def temp_path(path: str) -> str:
    """A fresh temporary file name beside ``path`` that names this process."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}@{HOST}~{name}")


def stale_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file of hbat's whose writer (a process of this host) is gone."""
    match = _TEMP_NAME.match(name)
    return bool(match) and match.group(2) == HOST and not pid_alive(int(match.group(1)))


@contextlib.contextmanager
def run_lock(folder: str):
    """Hold ``<folder>/hbat.lock`` for the ``with`` block (module docstring); FolderLocked if a live run holds it."""
    folder = os.path.abspath(folder)
    if folder in _HELD:
        yield
        return
    path = os.path.join(folder, LOCK_NAME)
    _acquire(path)
    _HELD.add(folder)
    try:
        yield
    finally:
        _HELD.discard(folder)
        if (_read(path) or {}).get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _acquire(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    me = {"pid": os.getpid(), "host": HOST, "started": process_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        if _create(path, json.dumps(me)):
            return
        holder = _read(path)
        if holder is not None and (holder.get("host") != HOST or pid_alive(holder["pid"], holder.get("started"))):
            raise FolderLocked(
                f"{os.path.dirname(path)} is in use by another hbat run (pid {holder['pid']} on host "
                f"{holder.get('host')}, since {holder.get('since', '?')}); wait for it, or use another output_dir "
                f"or --name. If that process is gone, delete {path}")
        if _read(path) == holder:  # stale (its process is gone), and not replaced meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    raise FolderLocked(f"{path}: could not take the lock (other processes keep replacing it)")


def _create(path: str, text: str) -> bool:
    """Create ``path`` holding ``text`` if it does not exist, atomically (never half-written); False if it does."""
    tmp = temp_path(path)
    with writing(path), open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    try:
        os.link(tmp, path)  # fails if path exists
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: an exclusive create, the content written at once
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return True
    finally:
        os.unlink(tmp)


def _read(path: str) -> dict | None:
    """The lock's holder, or None for a file that is not one hbat wrote (treated as stale)."""
    try:
        with open(path, encoding="utf-8") as fh:
            holder = json.load(fh)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
