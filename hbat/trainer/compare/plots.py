"""The plots of `hbat compare`: compare.png, the trade-off plane (each run's mean over seeds with its interval, the
runs of a sweep joined in value order, the averaging curve), and curves.png, the metrics over training of every
run; drawn by hbat.trainer.plots from the report (``report.build_report``) and the runs' metrics.jsonl."""
from __future__ import annotations

import os
import sys

from ..plots import Point, Series, training_curves, tradeoff_plot
from .plan import Plan


def tradeoff_series(report: dict):
    """The series of the trade-off plot: each run that is not a sweep point, with its sweep points (in value
    order), then the averaging curve."""
    x, y = report["axes"]

    def point(stats: dict, label: str = ""):
        mx, my = stats.get(x), stats.get(y)
        if mx is None or my is None:
            return None
        err = lambda iv: None if iv["low"] is None else (iv["high"] - iv["low"]) / 2  # noqa: E731
        return Point(mx["mean"], my["mean"], err(mx), err(my), label)

    series = []
    for run in report["runs"]:
        if run["sweep"]:
            continue
        members = [run] + [r for r in report["runs"] if (r["sweep"] or {}).get("of") == run["name"]]
        pts = []
        for member in members:
            value = (member["sweep"] or member.get("sweep_value") or {}).get("value")
            key = (member["sweep"] or member.get("sweep_value") or {}).get("key", "")
            p = point(member["mean"], f"{key.split('.')[-1]}={value}" if len(members) > 1 else "")
            if p is not None:
                pts.append((value if isinstance(value, (int, float)) else 0, p))
        pts.sort(key=lambda vp: vp[0])
        name = run["name"] + (f" ({members[1]['sweep']['key']})" if len(members) > 1 else "")
        series.append(Series(name, [p for _, p in pts]))
    if report["curve"]:
        pts = [point(p, f"α={p['alpha']:g}") for p in report["curve"]]
        hma = report["hma"]
        series.append(Series(f"averaging {hma['pre'] or 'SFT'}/{hma['aligned']}", [p for p in pts if p],
                             kind="average"))
    return series


def write_plots(plan: Plan, report: dict, out: str) -> None:
    """compare.png (the trade-off plane; its Pareto front goes into ``report``) and curves.png, in ``out``; none
    without matplotlib."""
    x, y = plan.axes
    n = len(plan.seeds)
    try:
        front = tradeoff_plot(tradeoff_series(report), os.path.join(out, "compare.png"), x=x, y=y,
                              title=f"trade-off over {n} seed{'s' * (n > 1)}: {y[5:]} vs {x[5:]}",
                              note=("mean over seeds, bars: 95% t-interval" if n > 1 else "one seed"))
        report["pareto_front"] = front
        runs = [(job.run["name"], os.path.join(job.folder, "metrics.jsonl")) for job in plan.jobs
                if not job.run.get("sweep") and os.path.exists(os.path.join(job.folder, "metrics.jsonl"))]
        if runs:
            training_curves(runs, os.path.join(out, "curves.png"),
                            title=f"metrics over training, {len(plan.seeds)} seed{'s' * (n > 1)} per run")
    except ImportError:
        print("hbat compare: no plots (pip install matplotlib)", file=sys.stderr)
