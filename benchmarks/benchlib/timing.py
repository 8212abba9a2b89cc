"""The benchmark clock and interleaved timing: every callable once per round, so that machine noise hits all alike;
and the streaming ``copy_`` the op bandwidths are measured against."""
from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


#: the clock of ``timed``: wall time, or with ``--clock cpu`` (one torch thread) the calling thread's CPU time, which
#: does not count the time a shared machine gives to other jobs (set_clock)
_CLOCK = {"now": time.perf_counter}


def set_clock(name: str, threads: int) -> None:
    if name == "cpu" and threads != 1:
        raise ValueError("--clock cpu needs --threads 1: the thread's CPU time misses other threads' work")
    _CLOCK["now"] = time.thread_time if name == "cpu" else time.perf_counter


def counts_cpu_time() -> bool:
    """The clock is the thread's CPU time (``--clock cpu``)."""
    return _CLOCK["now"] is time.thread_time


def now() -> float:
    """The benchmark clock's reading (seconds): wall time, or the thread's CPU time under ``--clock cpu``."""
    return _CLOCK["now"]()


def timed(fn: Callable[[], object], device) -> float:
    now = _CLOCK["now"]
    synchronize(device)
    start = now()
    fn()
    synchronize(device)
    return now() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], device, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every callable once per round, ``warmup + repeats`` rounds, so that machine noise hits all alike; the
    order rotates from round to round (no callable always follows the same one). Returns the ``repeats`` timed
    samples (seconds) of each."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = timed(fns[name], device)
            if round_index >= warmup:
                samples[name].append(elapsed)
    return samples


class StreamingCopy:
    """``dst.copy_(src)`` of ``numel`` fp32 elements: one streaming read and one streaming write (8 B per element),
    what every op here does at least. Called in the benchmark rounds, it measures the device's copy bandwidth."""

    def __init__(self, numel: int, device):
        self.src = torch.ones(numel, device=device)
        self.dst = torch.empty(numel, device=device)
        self.dst.copy_(self.src)  # touch the pages once

    def __call__(self) -> torch.Tensor:
        return self.dst.copy_(self.src)
