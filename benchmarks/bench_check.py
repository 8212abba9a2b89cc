"""The benchmark gate: every op of the op table and the fused optimizer step against a committed baseline.

    python benchmarks/bench_check.py                    # exit 0: every figure within the margin; 1: a figure fell
    python benchmarks/bench_check.py --write-baseline   # measure and write benchmarks/results/bench-check-baseline.json

On the CPU backend, one torch thread, on a Llama-shaped list of fp32 tensors of ELEMENTS elements in all (each
op's data is several times the caches). Figures, each "higher is better":

    <op> of copy bw          the op's bandwidth (its minimum bytes per element, hbat/ops/table.py, over its
                             time) as a fraction of a streaming copy_'s of the same elements (8 B per element)
    adamw_ewc_step_ vs fused torch's fused AdamW step (torch._fused_adamw_) time / adamw_ewc_step_'s time

Every callable runs once per round, ROUNDS rounds in a rotating order after a warm-up round, and each keeps its
best (least) time: a figure is a ratio of two best times taken in the same rounds. Times are the calling thread's
CPU time (time.thread_time; with one torch thread every kernel runs on it), not wall time: on a shared machine a
round that loses the CPU to another job does not count the time it waited. A figure fails when it falls below
its baseline by more than MARGIN (a fraction of the baseline) in the first measurement and in CONFIRMATIONS more
measurements of the whole set (each figure keeps its best): a slower kernel fails every time, a noisy moment rarely
three times in a row.

Why these numbers: a healthy build's figures stayed within 5% of the baseline in ten runs on the 2-core development
machine at load average 9-12, two of them beside a second gate (benchmarks/results/bench-check.md); a 1.3x slowdown
of a kernel takes its figure 23% below the baseline. MARGIN = 0.12 sits between. The baseline is this machine's
(the median of three runs): on another machine (CI), regenerate it there once. On 2026-12-05 the same build gave
scaled_diff 1.02-1.10 in eight runs (baseline 1.170, floor 1.029), hence the confirmations.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchlib import layouts, report

from hbat import ops
from hbat.ops import table

ELEMENTS = 32_000_000  # 128 MB per fp32 list: a copy_ of it streams at the memory's speed here (16M already does)
ROUNDS = 12
MARGIN = 0.12
CONFIRMATIONS = 2  # further measurements while a figure fails; a figure fails only if it fails in all of them
BASELINE_RUNS = 3
BASELINE = Path(__file__).resolve().parent / "results" / "bench-check-baseline.json"
REGENERATE = "python benchmarks/bench_check.py --write-baseline"
FUSED = "adamw_ewc_step_ vs fused"
# per-tensor vectors and scalars by name (any other vector: 0.5); values do not change the cost
VECTORS = {"lr": 1e-3, "weight_decay": 0.01, "bias_correction1": 0.1, "bias_correction2": 1e-3}
SCALARS = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


class Inputs:
    """table.MAX_LISTS flat fp32 buffers, cut into the same Llama-shaped tensors: an op's k-th list is buffer k's
    tensors (ops run one at a time, so they share the buffers; their writes keep every value finite, and no op's
    cost depends on the values)."""

    def __init__(self, elements: int):
        self.shapes = layouts.llama_shapes(elements)
        sizes = [torch.Size(s).numel() for s in self.shapes]
        self.numel = sum(sizes)
        fill = (1.0, 0.999, 1e-3, 1e-6, 0.998)  # params, anchors / refs, grads / moments: finite, no denormals
        self.flat = [torch.full((self.numel,), fill[k % len(fill)]) for k in range(table.MAX_LISTS)]
        self.lists = [[t.view(s) for t, s in zip(flat.split(sizes), self.shapes)] for flat in self.flat]
        self.steps = [torch.tensor(1.0) for _ in self.shapes]

    def op_call(self, op: table.OpDef):
        """torch.ops.hbat.<op> on these buffers: its argument lists, per-tensor vectors and scalars."""
        n = len(self.shapes)
        vectors = [torch.full((n,), VECTORS.get(name, 0.5)) for name in op.vectors]
        args = [self.lists[k] for k in range(len(op.arguments))] + vectors + [SCALARS[s] for s in op.scalars]
        kernel = getattr(torch.ops.hbat, op.name)
        return lambda: kernel(*args)

    def copy(self):
        src, dst = self.flat[0], self.flat[1]
        return lambda: dst.copy_(src)

    def torch_fused_adamw(self):
        """One torch AdamW(fused=True) step of the same tensors (params, grads, both moments: 28 B per element)."""
        p, g, m, v = self.lists[:4]
        return lambda: torch._fused_adamw_(p, g, m, v, [], self.steps, lr=1e-3, beta1=0.9, beta2=0.999,
                                           weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)


def best_times(fns: dict, rounds: int) -> dict:
    """The least thread CPU time of each callable over ``rounds`` rounds (order rotating) after one warm-up."""
    best = {name: float("inf") for name in fns}
    names = list(fns)
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.thread_time()
            fns[name]()
            elapsed = time.thread_time() - start
            if r:
                best[name] = min(best[name], elapsed)
    return best


def measure(elements: int, rounds: int) -> tuple[dict, dict]:
    """(figures, best times in seconds) of the ops and the fused step."""
    x = Inputs(elements)
    fns = {"copy_": x.copy(), "torch fused AdamW": x.torch_fused_adamw()}
    fns.update({op.name: x.op_call(op) for op in table.OPS})
    t = best_times(fns, rounds)
    figures = {f"{op.name} of copy bw": op.min_bytes * t["copy_"] / (8 * t[op.name]) for op in table.OPS}
    figures[FUSED] = t["torch fused AdamW"] / t["adamw_ewc_step_"]
    return figures, t


def check(figures: dict, baseline: dict, margin: float) -> list[tuple[str, float, float | None, bool]]:
    """(figure, value, baseline, passes) for every figure measured or in the baseline."""
    rows = []
    for name in list(figures) + [k for k in baseline if k not in figures]:
        value, base = figures.get(name), baseline.get(name)
        ok = value is not None and (base is None or value >= base * (1 - margin))
        rows.append((name, value, base, ok))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-baseline", action="store_true", help=f"write the figures to {BASELINE.name}")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="baseline file (default %(default)s)")
    parser.add_argument("--elements", type=float, default=ELEMENTS, help="elements in all (default %(default)d)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds (default %(default)d)")
    parser.add_argument("--margin", type=float, default=MARGIN, help="allowed fall below the baseline, a fraction "
                        "of it (default %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ok, why = ops.backend_status("cpu", "cpu")
    if not ok:
        print(f"bench_check: the cpu backend is not available: {why}", file=sys.stderr)
        return 1
    started = time.time()
    if args.write_baseline:  # the median of BASELINE_RUNS measurements: a typical run, not a lucky one
        runs = [measure(int(args.elements), args.rounds) for _ in range(BASELINE_RUNS)]
        figures = {name: statistics.median(run[0][name] for run in runs) for name in runs[0][0]}
        times = {name: statistics.median(run[1][name] for run in runs) for name in runs[0][1]}
    else:
        try:
            baseline = json.loads(args.baseline.read_text())["figures"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"bench_check: cannot read the baseline {args.baseline} ({exc}); write one with `{REGENERATE}`",
                  file=sys.stderr)
            return 1
        figures, times = measure(int(args.elements), args.rounds)
        for _ in range(CONFIRMATIONS):
            failing = [name for name, _, _, passes in check(figures, baseline, args.margin) if not passes]
            if not failing:
                break
            print(f"bench_check: below the floor, measuring again: {', '.join(failing)}")
            again, _ = measure(int(args.elements), args.rounds)
            figures = {name: max(value, again.get(name, value)) for name, value in figures.items()}
    elapsed = time.time() - started
    where = (f"{report.machine_line('cpu')}; hbat from {Path(ops.__file__).parents[1]}; {int(args.elements):,} elements, "
             f"best of {args.rounds} rounds, {elapsed:.0f} s")
    if args.write_baseline:
        where += f"; the median of {BASELINE_RUNS} runs"
        payload = {"regenerate": REGENERATE, "measured": where,
                   "figures": {name: round(value, 4) for name, value in figures.items()},
                   "best_ms": {name: round(t * 1e3, 2) for name, t in times.items()}}
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        args.baseline.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"bench_check: wrote {args.baseline} ({where})")
        for name, value in figures.items():
            print(f"  {name:32s} {value:7.3f}")
        return 0
    rows = check(figures, baseline, args.margin)
    print(f"bench_check: {where}; a figure fails below baseline x {1 - args.margin:.2f}")
    for name, value, base, passes in rows:
        shown = "missing" if value is None else f"{value:7.3f}"
        floor = "-" if base is None else f"{base * (1 - args.margin):7.3f}"
        print(f"  {name:32s} {shown}  baseline {'-' if base is None else f'{base:7.3f}'}  at least {floor}  "
              f"{'ok' if passes else 'FAIL'}")
    failed = [name for name, _, _, passes in rows if not passes]
    print(f"bench_check: {'FAILED: ' + ', '.join(failed) if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
