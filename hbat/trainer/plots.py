"""Pictures of runs: the trade-off plane of `hbat compare` and the metric curves over training of `hbat train`.

    tradeoff_plot(series, path, x="eval/reward", y="eval/exact_match")   # compare.png
    training_curves([("hbat", "runs/hbat/hbat/metrics.jsonl")], path)      # curves.png

``tradeoff_plot`` draws each series (a method's sweep, or the averaging curve) as points with error bars (the
95% interval over seeds in both directions), joined in sweep order, and marks the Pareto front of all points
(no other point is better in both metrics, each in its own direction: higher exact match, reward, preference,
win rate; lower SFT loss and KL). ``training_curves`` reads each run's ``metrics.jsonl`` and draws one panel per
quantity: the training losses, the EWC penalty and every ``eval/*`` metric (one point per evaluated part), against
the logged step. Both need matplotlib; ``write_training_curves`` is what `hbat train` calls after its summary: it
never fails a finished run (no matplotlib, or an unreadable file: a note instead of the plot).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field

LOWER_IS_BETTER = ("eval/sft_loss", "eval/kl_to_sft")
LABELS = {"eval/exact_match": "exact match (instruction following, validation)",
          "eval/sft_loss": "SFT loss (validation; lower is better)", "eval/preference": "preference score",
          "eval/reward": "reward (reward model, validation)", "eval/win_rate": "win rate vs SFT",
          "eval/kl_to_sft": "KL(model || SFT) (lower: closer to SFT)"}
# the training panels of the curves plot, in this order; then every eval/* metric
TRAIN_PANELS = (("loss", ("sft/loss", "dpo/loss", "ppo/policy_loss", "rm/loss")), ("ewc/penalty", ("ewc/penalty",)),
                ("train/grad_norm", ("train/grad_norm",)))


@dataclass
class Point:
    x: float
    y: float
    xerr: float | None = None         # half-width of the 95% interval (None: one seed)
    yerr: float | None = None
    label: str = ""                   # the sweep value, alpha, ... written beside the point


@dataclass
class Series:
    name: str
    points: list[Point] = field(default_factory=list)
    kind: str = "run"                 # "run" (a method, or its sweep) or "average" (the averaging curve)


def _pyplot():
    import matplotlib  # optional and heavy: hbat[train]; only writing a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def better(metric: str) -> int:
    """+1 where a higher value is better, -1 where lower is."""
    return -1 if metric in LOWER_IS_BETTER else 1


def pareto_front(points: list[tuple[float, float]], x: str, y: str) -> list[int]:
    """Indices of the points no other point dominates (at least as good in both metrics, better in one), sorted
    by x."""
    sx, sy = better(x), better(y)
    keep = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(sx * xj >= sx * xi and sy * yj >= sy * yi and (sx * xj > sx * xi or sy * yj > sy * yi)
                        for j, (xj, yj) in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def tradeoff_plot(series: list[Series], path: str, *, x: str = "eval/reward", y: str = "eval/exact_match",
                  title: str | None = None, note: str = "") -> list[str]:
    """The trade-off plane (module docstring); returns the names of the points on the Pareto front."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 6))
    runs = [s for s in series if s.kind == "run"]
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    everything, names = [], []
    for k, s in enumerate(series):
        pts = [p for p in s.points if math.isfinite(p.x) and math.isfinite(p.y)]
        if not pts:
            continue
        average = s.kind == "average"
        color = "0.45" if average else cmap(runs.index(s) % cmap.N)
        ax.errorbar([p.x for p in pts], [p.y for p in pts],
                    xerr=[p.xerr or 0.0 for p in pts] if any(p.xerr for p in pts) else None,
                    yerr=[p.yerr or 0.0 for p in pts] if any(p.yerr for p in pts) else None,
                    fmt="--s" if average else ("-o" if len(pts) > 1 else "o"), ms=4, lw=1, capsize=2,
                    color=color, elinewidth=0.8, alpha=0.9, label=s.name)
        for p in pts:
            if p.label:
                ax.annotate(p.label, (p.x, p.y), fontsize=6, xytext=(3, -8), textcoords="offset points", color=color)
            everything.append((p.x, p.y))
            names.append(f"{s.name}{' ' + p.label if p.label else ''}")
    front = pareto_front(everything, x, y) if everything else []
    if front:
        fx, fy = [everything[i][0] for i in front], [everything[i][1] for i in front]
        ax.plot(fx, fy, ":", color="k", lw=1, zorder=0)
        ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="k", linewidths=1, zorder=5,
                   label="Pareto front (circled)")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.set_title(title or f"trade-off: {y.split('/')[-1]} vs {x.split('/')[-1]}", fontsize=10)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="0.3")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    _save(fig, plt, path)
    return [names[i] for i in front]


def read_records(path: str) -> list[dict]:
    """The whole records of a metrics.jsonl (a line a kill cut short is skipped)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


def curve_panels(records_by_run: dict[str, list[dict]]) -> list[tuple[str, dict[str, dict[str, list]]]]:
    """[(panel title, {run: {series key: [(step, value), ...]}})] with the panels that have data: the training
    losses, the penalty, the gradient norm, then each eval/* metric."""
    seen = {k for records in records_by_run.values() for r in records for k in r if k.startswith("eval/")}
    evals = [k for k in LABELS if k in seen] + sorted(seen - set(LABELS))
    panels = list(TRAIN_PANELS) + [(k, (k,)) for k in evals]
    out = []
    for title, keys in panels:
        data = {}
        for run, records in records_by_run.items():
            lines = {}
            for key in keys:
                pts = [(r["step"], float(r[key])) for r in records
                       if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                       and isinstance(r.get("step"), int)]
                if pts:
                    lines[key] = pts
            if lines:
                data[run] = lines
        if data:
            out.append((title, data))
    return out


def training_curves(runs: list[tuple[str, str]], path: str, *, title: str = "metrics over training") -> list[str]:
    """One panel per quantity (module docstring) for the runs ``[(label, metrics.jsonl path)]``; several runs
    with the same label (seeds) share a colour. Returns the panel titles drawn."""
    plt = _pyplot()
    records_by_run: dict[str, list[dict]] = {}
    labels: dict[str, str] = {}
    for i, (label, metrics_path) in enumerate(runs):
        key = f"{label}#{i}"
        records_by_run[key] = read_records(metrics_path)
        labels[key] = label
    panels = curve_panels(records_by_run)
    if not panels:
        raise ValueError(f"no metrics to plot in {', '.join(p for _, p in runs)}")
    distinct = list(dict.fromkeys(labels.values()))
    cmap = plt.get_cmap("tab10" if len(distinct) <= 10 else "tab20")
    colors = {label: cmap(i % cmap.N) for i, label in enumerate(distinct)}
    styles = {"sft/loss": "-", "dpo/loss": "--", "ppo/policy_loss": "-.", "rm/loss": ":"}
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    height = 2.6 * rows + 0.9  # the panels, then the title and the legend above them
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, height), squeeze=False)
    single = len(records_by_run) == 1
    for ax, (panel, data) in zip(axes.flat, panels):
        for run, lines in data.items():
            for key, pts in lines.items():
                evaluated = panel.startswith("eval/")
                ax.plot([s for s, _ in pts], [v for _, v in pts], styles.get(key, "-"),
                        marker="o" if evaluated else None, ms=3, lw=0.8 if not single else 1.0, alpha=0.8, color=colors[labels[run]])
        if single:  # one run: its stages, shaded by objective
            records = next(iter(records_by_run.values()))
            _shade_stages(ax, records)
        ax.set_title(panel, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[label], label=label) for label in distinct]
    handles += [plt.Line2D([], [], color="0.3", ls=styles[k], label=k) for k in styles
                if any(k in lines for _, data in panels for lines in data.values())]
    fig.suptitle(title + "  (x: logged step; shaded: IFA blue, HPA orange)" if single else
                 title + "  (x: logged step)", fontsize=10, y=1 - 0.12 / height)
    fig.legend(handles=handles, fontsize=7, loc="upper center", ncol=min(8, len(handles)), frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.35 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / height))
    _save(fig, plt, path)
    return [panel for panel, _ in panels]


def _shade_stages(ax, records: list[dict]) -> None:
    spans: list[list] = []  # [objective, first step, last step]
    for r in records:
        if "objective" not in r or not isinstance(r.get("step"), int):
            continue
        if spans and spans[-1][0] == r["objective"] and spans[-1][3] == r.get("stage"):
            spans[-1][2] = r["step"]
        else:
            spans.append([r["objective"], r["step"], r["step"], r.get("stage")])
    for objective, first, last, _ in spans:
        ax.axvspan(first - 0.5, last + 0.5, color="tab:blue" if objective == "ifa" else "tab:orange", alpha=0.06, lw=0)


def _save(fig, plt, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def write_training_curves(results: list[dict], path: str) -> str | None:
    """`hbat train`'s curves plot of its runs (``results``: their result dicts, with ``folder``). A finished run
    is never failed by its picture: without matplotlib, or with nothing to plot, a note on stderr instead."""
    runs = [(r["method"], os.path.join(r["folder"], "metrics.jsonl")) for r in results
            if r.get("folder") and os.path.exists(os.path.join(r["folder"], "metrics.jsonl"))]
    if not runs:
        return None
    try:
        training_curves(runs, path, title=f"metrics over training: {', '.join(label for label, _ in runs)}")
    except ImportError:
        print("hbat train: no curves plot (pip install matplotlib)", file=sys.stderr)
        return None
    except (ValueError, OSError) as exc:
        print(f"hbat train: no curves plot ({exc})", file=sys.stderr)
        return None
    return path
