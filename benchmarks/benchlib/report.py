"""What every benchmark script shares around its measurements: the command line (--device, --out, --threads,
--clock, ...), the torch threads, the line that says when and on what a result was measured, and the output:
<out>/<device>-<tag>.csv, .md and a plot, tables, sizes, a progress bar."""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time

import torch

from . import timing


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


_START: dict = {}  # when the run started and the machine's load then (set by apply_threads)


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark script's parser, with the --device every script takes first."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def add_output_flags(parser) -> None:
    """--out, --no-memory, --note and --threads: where results go and how the run behaves, in every script."""
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results"))
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


def machine_line(device, short: bool = False) -> str:
    """When (the run's start, UTC), on what, with which torch; on the CPU the thread count and the load average."""
    device = torch.device(device)
    when = time.strftime("%Y-%m-%d %H:%M UTC", _START.get("time") or time.gmtime())
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        if timing.counts_cpu_time():
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


def write_text(path: str, text: str) -> None:
    """Write through a temporary file and a rename: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


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
    timing.set_clock(getattr(args, "clock", "wall"), args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = run(args)
    stem = os.path.join(args.out, f"{device_tag(args.device)}-{tag}")
    write_csv(stem + ".csv", rows)
    text = markdown(rows, args)
    write_text(stem + ".md", text)
    plotted = plot is not None and plot(rows, stem + ".png", args)
    print(text)
    print(f"wrote {stem}.csv, {stem}.md" + (f", {stem}.png" if plotted else ""))
