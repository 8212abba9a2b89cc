"""The process group of a multi-process run: joining it, who this rank is, waiting for the others, leaving.

One process (no ``deepspeed`` in the config) never joins a group: ``rank()`` is 0, ``world_size()`` 1,
``barrier()`` does nothing. Under DeepSpeed every rank joins the group torchrun (or the deepspeed launcher)
set up (gloo on CPUs), writes its own files (``rank_file``) and ends with ``finish`` / ``exit_process``.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

from .checkpoint import save_atomic

_JOINED_HERE = False  # whether init_distributed created the process group (so shutdown_distributed may end it)
_LEFT_GROUP = False  # whether shutdown_distributed ended a group (then finish ends the process with exit_process)


def init_distributed() -> None:
    """Join the process group torchrun / the deepspeed launcher set up (gloo on CPU), once; ValueError, saying
    how to launch, outside a launcher."""
    global _JOINED_HERE
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # else DeepSpeed would try MPI (mpi4py)
        raise ValueError("deepspeed is set, so every rank is its own process: start them with a launcher, e.g. "
                         "`torchrun --nproc_per_node N -m hbat.cli train CONFIG --set deepspeed=ds.json` (docs/distributed.md: "
                         "Multi-process training under DeepSpeed)")
    try:
        import deepspeed  # optional (hbat[deepspeed]) and heavy: only a DeepSpeed run imports it
    except ImportError as exc:
        raise ValueError(f"deepspeed is set but the deepspeed package does not import ({exc}); "
                         "pip install deepspeed") from None
    from deepspeed.accelerator import get_accelerator  # optional: as above

    backend = None
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before any NCCL call (prepare's barrier)
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed would first compile its shared-memory all-reduce op (about a minute); gloo does the job
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    _JOINED_HERE = True


def shutdown_distributed() -> None:
    """Leave the process group init_distributed joined (a group the caller made is left alone): every rank
    waits for the others, then the group is destroyed."""
    global _JOINED_HERE, _LEFT_GROUP
    if _JOINED_HERE and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _LEFT_GROUP = True
    _JOINED_HERE = False


def finish(code: int) -> int:
    """The end of a CLI command: ``code``, or, in a worker that left its process group, exit_process(code)."""
    if _LEFT_GROUP:
        exit_process(code)
    return code


def exit_process(code: int) -> NoReturn:
    """End a worker that finished and left its process group, without Python's finalization.

    DeepSpeed keeps references to its gloo groups (e.g. ``deepspeed.utils.groups._WORLD_GROUP``) past
    destroy_process_group, so their threads still run when the interpreter tears down, and a rank can abort
    there ("terminate called without an active exception", pytorch/pytorch#190489; rare, but seen twice in CI
    here) after a run that wrote everything. Output is flushed first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_rank_file(obj, folder: str, position: int) -> None:
    """This rank's part of the checkpoint after ``position`` stages (its HybridEWC anchor partition)."""
    save_atomic(obj, rank_file(folder, rank(), position))


def rank_file(folder: str, rank_index: int, position: int) -> str:
    return os.path.join(folder, f"checkpoint-rank{rank_index}-stage{position}.pt")
