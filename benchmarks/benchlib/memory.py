"""Peak memory above the inputs: on a GPU ``torch.cuda.max_memory_allocated`` after the inputs exist; on the CPU
the peak RSS of a fresh child process (a ``forkserver`` with torch preloaded) that builds the inputs, resets its
peak RSS (``/proc/self/clear_refs``), runs the provider once and reports ``VmHWM - RSS before the run``."""
from __future__ import annotations

import gc
import multiprocessing
from typing import Callable

import torch

from .layouts import layout_shapes
from .op_providers import build_inputs, make_provider


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Make VmHWM (peak RSS) equal the current RSS; Linux >= 4.0. False where it is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Hand the C heap's free memory back to the OS (glibc), so that later allocations show up in the RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fixed_mmap_threshold() -> None:
    """Serve every allocation above 1 MiB by mmap (glibc), returned to the OS when freed: stops the dynamic
    threshold from recycling freed tensors out of the heap, which would hide them from the peak RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.bytes``: peak bytes above what existed on entry.

    CPU: peak RSS of this process (meaningful in a fresh child, see ``run_in_child``); GPU: allocator peak."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes = float("nan")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            release_free_memory()
            self.base = rss_bytes()
            self.ok = reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        elif self.ok:
            self.bytes = max(0, peak_rss_bytes() - self.base)
        return False


_CHILD_CONTEXT = None


def run_in_child(fn: Callable, *args):
    """Run the module-level ``fn(*args)`` in a fresh process forked from a torch-preloaded server.

    A fresh process per measurement keeps the allocator's cache of earlier runs out of the peak RSS. (A plain
    fork of this process would deadlock in OpenMP once torch has used its thread pool.)"""
    global _CHILD_CONTEXT
    if _CHILD_CONTEXT is None:
        _CHILD_CONTEXT = multiprocessing.get_context("forkserver")
        _CHILD_CONTEXT.set_forkserver_preload(["torch", "hbat.ops", fn.__module__])
    with _CHILD_CONTEXT.Pool(1, initializer=fixed_mmap_threshold) as pool:
        return pool.apply(fn, args)


def child_op_memory(op: str, provider: str, layout: str, size: int, device: str) -> float:
    """Peak bytes above the inputs of one call of ``op`` by ``provider`` (runs in a child process on CPU)."""
    # a tiny warm-up first: loads the extension, starts the thread pool, fills autograd's caches
    tiny = build_inputs(op, layout_shapes(layout, 4096 * 4), device, with_fisher=provider == "fisher")
    make_provider(op, provider, tiny)()
    del tiny
    x = build_inputs(op, layout_shapes(layout, size), device, with_fisher=provider == "fisher", random=False)
    fn = make_provider(op, provider, x)
    with PeakMemory(device) as peak:
        fn()
    return float(peak.bytes)


def peak_memory_of(fn: Callable, device, *args) -> float:
    """``fn(*args)`` returns peak bytes measured with ``PeakMemory``: on the CPU it runs in a fresh child."""
    if torch.device(device).type == "cuda":
        return fn(*args)
    return run_in_child(fn, *args)


def op_peak_memory(op: str, provider: str, layout: str, size: int, device) -> float:
    return peak_memory_of(child_op_memory, device, op, provider, layout, size, str(device))
