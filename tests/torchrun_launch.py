"""Start a test worker on 2 CPU ranks with torchrun (gloo, ``DS_ACCELERATOR=cpu``), as the DeepSpeed tests do."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: Path | str, args: list[str], *, nproc: int = 2, timeout: int) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` of ``worker`` (a script, or ``-m module``) on ``nproc`` local ranks;
    output captured as text."""
    # PYTHONFAULTHANDLER: a rank that aborts prints the Python stacks of its threads into the captured output
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *str(worker).split(" ", 1), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
