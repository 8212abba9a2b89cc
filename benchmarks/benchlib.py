"""Shared pieces of the hbat benchmarks: tensor layouts, providers, interleaved timing, peak memory, output.

A *provider* is one way to compute an op: ``hbat-<backend>`` (the fused ops), ``naive`` (a Python loop with
autograd, what the released HBAT code does), ``foreach`` (the best plain PyTorch with ``torch._foreach_*``)
and ``fisher`` (the original EWC: one importance float per parameter element, penalty through autograd).

Peak memory above the inputs: on a GPU ``torch.cuda.max_memory_allocated`` after the inputs exist; on the CPU
the peak RSS of a fresh child process (a ``forkserver`` with torch preloaded) that builds the inputs, resets
its peak RSS (``/proc/self/clear_refs``), runs the provider once and reports ``VmHWM - RSS before the run``.
"""
from __future__ import annotations

import argparse
import csv
import gc
import math
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hbat import ops
from hbat.ops import table as op_table
from hbat.importance import compute_importance
from hbat.trainer.checkpoint import write_text_atomic

OPS = ("squared_change", "snapshot_", "ewc_penalty_grad_", "ewc_penalty", "lerp_")
LAYOUTS = ("llama", "small")
#: minimum bytes moved per fp32 element, from the op table (hbat/ops/table.py; ../shared/HBAT.md section 7);
#: ewc_penalty is forward (read p, a) plus a backward into .grad (read p, a, g; write g)
MIN_BYTES = {
    "squared_change": op_table.op("squared_change").min_bytes,
    "snapshot_": op_table.op("snapshot_").min_bytes,
    "ewc_penalty_grad_": op_table.op("ewc_penalty_grad_").min_bytes,
    "ewc_penalty": op_table.op("squared_change").min_bytes + op_table.op("ewc_penalty_grad_").min_bytes,
    "lerp_": op_table.op("lerp_").min_bytes,
}
PENALTY_OPS = ("ewc_penalty_grad_", "ewc_penalty")
LAM = 1.0
F_MAX = 100.0
#: the reference backend computes in float64: only worth timing on small inputs
REFERENCE_MAX_SIZE = 1_000_000
SMALL_TENSOR_SHAPE = (64, 64)
LLAMA_LAYERS = 33  # 33 * 9 + 3 = 300 tensors, the issue-2 layout


# ----------------------------------------------------------------------------------------------- layouts
def llama_shapes_for(hidden: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama model: embed, per layer q/k/v/o, gate/up/down and 2 norms, norm, lm_head."""
    inter = max(8, int(hidden * 8 / 3) // 8 * 8)
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def llama_shapes(total: int, layers: int = LLAMA_LAYERS) -> list[tuple[int, ...]]:
    """A Llama-shaped list of ``9 * layers + 3`` tensors with about ``total`` elements (vocab = 16 * hidden)."""
    # elements ~= layers * (4 + 3 * 8/3) * h^2 + 2 * 16 h^2 = (12 * layers + 32) h^2
    hidden = max(8, round(math.sqrt(total / (12 * layers + 32)) / 8) * 8)
    return llama_shapes_for(hidden, layers, 16 * hidden)


def small_shapes(total: int) -> list[tuple[int, ...]]:
    """Many small tensors (64 x 64 = 4096 elements each): the per-tensor overhead regime."""
    return [SMALL_TENSOR_SHAPE] * max(1, round(total / math.prod(SMALL_TENSOR_SHAPE)))


def layout_shapes(layout: str, total: int) -> list[tuple[int, ...]]:
    if layout == "llama":
        return llama_shapes(total)
    if layout == "small":
        return small_shapes(total)
    raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated numbers like 1e6,1e7, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"--sizes needs positive sizes, got {text!r}")
    return sizes


def parse_choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"{flag}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return items


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    """Everything the providers of one op read, built once and shared (in-place results do not change cost)."""

    params: list[torch.Tensor]
    anchors: list[torch.Tensor]
    grads: list[torch.Tensor]
    importance: torch.Tensor  # [n] float32
    leaves: list[torch.Tensor] = field(default_factory=list)  # params as autograd leaves, .grad = grads
    fisher: list[torch.Tensor] = field(default_factory=list)  # per-element importance (fisher provider)
    dst: list[torch.Tensor] = field(default_factory=list)  # lerp_ output

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def _filled(shape, device, generator, scale=1.0, offset=0.0) -> torch.Tensor:
    # rand is several times cheaper than randn on the CPU; the values do not change the cost
    t = torch.empty(shape, device=device, dtype=torch.float32)
    return t.uniform_(-scale + offset, scale + offset, generator=generator)


def build_inputs(op: str, shapes, device, *, with_fisher: bool = False, seed: int = 0, random: bool = True) -> Inputs:
    """The op's inputs; ``random=False`` fills constants instead (several times faster to build; the memory
    children use it, since no op's cost or allocations depend on the values)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def filled(shape, scale=1.0, offset=0.0):
        return _filled(shape, device, gen, scale, offset) if random else torch.full(shape, offset + scale / 2, device=device)

    params = [filled(s, 0.02) for s in shapes]
    anchors = [p + filled(s, 1e-3) for p, s in zip(params, shapes)]
    grads = [torch.zeros_like(p) for p in params] if op in PENALTY_OPS else []
    if random:
        # an importance vector like one of a real stage boundary (HybridEWC's default mode)
        change = torch.stack([((p - a) ** 2).mean() for p, a in zip(params, anchors)])
        importance = compute_importance(change, F_MAX).to(device)
    else:
        importance = torch.full((len(shapes),), F_MAX / max(len(shapes), 1), device=device)
    inputs = Inputs(params, anchors, grads, importance)
    if op in PENALTY_OPS:
        inputs.leaves = [p.detach().requires_grad_(True) for p in params]  # same storage
        for leaf, g in zip(inputs.leaves, grads):
            leaf.grad = g
        if with_fisher:
            inputs.fisher = [filled(s, 0.5, 0.5) for s in shapes]
    if op == "lerp_":
        # zeros, not empty: untouched pages would be faulted in by the first write and count as the op's memory
        inputs.dst = [torch.zeros_like(p) for p in params]
    return inputs


# --------------------------------------------------------------------------------------------- providers
def autograd_penalty(leaves, anchors, coefs, lam):
    """sum_i (lam/2) (F_i * (p_i - a_i)**2).sum() as a loss, by a Python loop: the released code's penalty
    when ``coefs`` holds one float per tensor, the original EWC when it holds a per-element Fisher tensor."""
    total = 0.0
    for p, a, f in zip(leaves, anchors, coefs):
        total = total + (lam / 2) * (f * (p - a) ** 2).sum()
    return total


def _penalty_backward(leaves, anchors, coefs, lam):
    total = autograd_penalty(leaves, anchors, coefs, lam)
    total.backward()
    return total.detach()


def _foreach_squares(params, refs) -> torch.Tensor:
    diffs = torch._foreach_sub(params, refs)
    return torch.stack(torch._foreach_norm(diffs)) ** 2


def make_provider(op: str, provider: str, x: Inputs) -> Callable[[], object]:
    """A no-argument callable that runs ``op`` the way ``provider`` does on the inputs ``x``."""
    p, a, g, F = x.params, x.anchors, x.grads, x.importance
    numels = torch.tensor([max(t.numel(), 1) for t in p], dtype=torch.float32, device=F.device)
    coefs = F.tolist()  # python floats, as the released code holds them
    lam_coefs = [LAM * c for c in coefs]
    weights = torch.linspace(0.2, 0.8, len(p), device=F.device)
    weight_list = weights.tolist()

    if provider.startswith("hbat-"):
        be = provider[len("hbat-"):]
        table = {
            "squared_change": lambda: ops.squared_change(p, a, backend=be),
            "snapshot_": lambda: ops.snapshot_(p, a, backend=be),
            "ewc_penalty_grad_": lambda: ops.ewc_penalty_grad_(p, a, g, F, LAM, backend=be),
            "ewc_penalty": lambda: ops.ewc_penalty(x.leaves, a, F, LAM, backend=be).backward(),
            "lerp_": lambda: ops.lerp_(x.dst, p, a, weights, backend=be),
        }
        return table[op]

    if provider == "naive":
        def squared_change():
            return torch.stack([((pi - ai) ** 2).mean() for pi, ai in zip(p, a)])

        def snapshot_():
            change = squared_change()
            for pi, ai in zip(p, a):
                ai.copy_(pi)
            return change

        def lerp_():
            for d, ai, bi, w in zip(x.dst, p, a, weight_list):
                d.copy_((1 - w) * ai + w * bi)

        penalty = lambda: _penalty_backward(x.leaves, a, coefs, LAM)  # noqa: E731
        table = {"squared_change": squared_change, "snapshot_": snapshot_, "ewc_penalty_grad_": penalty,
                 "ewc_penalty": penalty, "lerp_": lerp_}
        return table[op]

    if provider == "foreach":
        def penalty_grad_():
            diffs = torch._foreach_sub(p, a)
            sums = torch.stack(torch._foreach_norm(diffs)) ** 2
            torch._foreach_mul_(diffs, lam_coefs)
            torch._foreach_add_(g, diffs)
            return (0.5 * LAM) * F * sums

        def penalty():
            diffs = torch._foreach_sub(x.leaves, a)  # foreach ops are differentiable
            sums = torch.stack(torch._foreach_norm(diffs)) ** 2
            ((0.5 * LAM) * (F * sums).sum()).backward()

        def squared_change():
            return _foreach_squares(p, a) / numels

        def snapshot_():
            change = squared_change()
            torch._foreach_copy_(a, p)
            return change

        def lerp_():
            torch._foreach_copy_(x.dst, p)
            torch._foreach_lerp_(x.dst, a, weight_list)

        table = {"squared_change": squared_change, "snapshot_": snapshot_,
                 "ewc_penalty_grad_": penalty_grad_, "ewc_penalty": penalty, "lerp_": lerp_}
        return table[op]

    if provider == "fisher" and op in PENALTY_OPS:
        return lambda: _penalty_backward(x.leaves, a, x.fisher, LAM)
    raise ValueError(f"provider {provider!r} does not implement {op!r}")


def providers_for(op: str, size: int, device, only: list[str] | None = None) -> list[str]:
    names = [f"hbat-{b}" for b in ops.available_backends(device) if b != "reference" or size <= REFERENCE_MAX_SIZE]
    names += ["naive", "foreach"] + (["fisher"] if op in PENALTY_OPS else [])
    return [n for n in names if only is None or n in only or n.split("-")[0] in only]


# ------------------------------------------------------------------------------------------------ timing
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


# ------------------------------------------------------------------------------------------------ memory
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


# ------------------------------------------------------------------------------------------------ threads
_START: dict = {}  # when the run started and the machine's load then (set by apply_threads)


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark script's parser, with the --device every script takes first."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def add_output_flags(parser) -> None:
    """--out, --no-memory, --note and --threads: where results go and how the run behaves, in every script."""
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--note", default="", help="a line for the markdown, e.g. what else ran on the machine")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default 0: torch's default). On a CPU shared with other jobs, "
                             "1 avoids the stalls of a multi-threaded op waiting for a descheduled thread")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what the timings count (default wall); cpu: the calling thread's CPU time, with "
                             "--threads 1 (every kernel then runs on it): what a job waits for others is not counted")


def parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """parse_args, keeping the arguments as given for the command line in the markdown (command_line)."""
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def command_line(script: str, args) -> str:
    """The markdown line that reruns a result: `python benchmarks/<script> <args as given>`."""
    return f"`{' '.join(['python', 'benchmarks/' + os.path.basename(script)] + args.argv)}`  "


def apply_threads(n: int) -> None:
    """Use ``n`` torch threads here and in the memory children (they read OMP_NUM_THREADS when they start)."""
    if n < 0:
        raise ValueError(f"--threads must be >= 0, got {n}")
    _START.update(time=time.gmtime(), load=os.getloadavg()[0])
    if n:
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ output
def machine_line(device, short: bool = False) -> str:
    """When (the run's start, UTC), on what, with which torch; on the CPU the thread count and the load average."""
    device = torch.device(device)
    when = time.strftime("%Y-%m-%d %H:%M UTC", _START.get("time") or time.gmtime())
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        if _CLOCK["now"] is time.thread_time:
            what += ", times are the thread's CPU time"
        if not short:
            load = _START.get("load", os.getloadavg()[0])
            what += f", load average {load:.1f} at the start (other jobs share this CPU)"
    return f"{when}; {what}; torch {torch.__version__}"


def device_tag(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace(" ", "-")
    return device.type


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    for row in rows[1:]:
        keys += [k for k in row if k not in keys]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_size(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


class _NoBar:
    def update(self, n=1): pass
    def set_postfix_str(self, text): pass
    def close(self): pass


def progress(total: int, desc: str):
    """A tqdm bar to ``update()`` by hand (a silent stand-in without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc)


def run_and_write(args, tag: str, run, markdown, plot=None) -> None:
    """The main() of every benchmark script: threads, run, then <out>/<device>-<tag>.csv, .md (and .png)."""
    apply_threads(args.threads)
    set_clock(getattr(args, "clock", "wall"), args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = run(args)
    stem = os.path.join(args.out, f"{device_tag(args.device)}-{tag}")
    write_csv(stem + ".csv", rows)
    text = markdown(rows, args)
    write_text_atomic(text, stem + ".md")
    plotted = plot is not None and plot(rows, stem + ".png", args)
    print(text)
    print(f"wrote {stem}.csv, {stem}.md" + (f", {stem}.png" if plotted else ""))
