"""The report of `hbat compare`: means with t-intervals and paired differences (build_report), the tables of
compare.md and compare.csv (its plots: ``plots``)."""
from __future__ import annotations

import csv
import os

import torch

from ..metrics import markdown_table
from ..run import DIVERGED
from ..stats import mean_interval, paired_difference
from .plan import Plan
from .pool import machine_cores
from .spec import FACTS, LEVEL, METRICS


def build_report(plan: Plan, rows: list[dict], curves: dict[int, list[dict]]) -> dict:
    """Everything compare.md, the plots and the README's tables are made from: per run and metric, the values by
    seed, the mean with its t-interval, and the paired difference from the baseline."""
    def interval(iv):
        return None if iv is None else {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n,
                                        **({"p": iv.p_value} if iv.p_value is not None else {})}

    keys = plan.metrics + [k for k, _, _ in FACTS]
    by_run: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_run.setdefault(row["method"], {})[row["seed"]] = row
    base_rows = by_run[plan.baseline]
    runs = []
    for run in plan.runs:
        seeds = by_run[run["name"]]
        ok = {s: r for s, r in seeds.items() if r.get("status") != "diverged"}
        entry = {"name": run["name"], "method": run["method"], "set": run["set"], "sweep": run.get("sweep"),
                 "sweep_value": run.get("sweep_value"), "seeds": sorted(seeds), "ok_seeds": sorted(ok),
                 "diverged_seeds": sorted(set(seeds) - set(ok)), "values": {}, "mean": {}, "diff": {}}
        for key in keys:
            values = {s: r[key] for s, r in ok.items() if isinstance(r.get(key), (int, float))}
            entry["values"][key] = values
            entry["mean"][key] = interval(mean_interval(list(values.values()), LEVEL)) if values else None
            paired = [s for s in values if s in base_rows and isinstance(base_rows[s].get(key), (int, float))
                      and base_rows[s].get("status") != "diverged"]
            if run["name"] != plan.baseline and key in plan.metrics and paired:
                entry["diff"][key] = interval(paired_difference([values[s] for s in paired],
                                                                [base_rows[s][key] for s in paired], LEVEL))
        runs.append(entry)
    curve = []
    if curves:
        for i, alpha in enumerate(plan.hma["alphas"]):
            point = {"alpha": alpha, "seeds": sorted(curves)}
            for key in plan.metrics:
                values = [curves[s][i][key] for s in curves if key in curves[s][i]]
                point[key] = interval(mean_interval(values, LEVEL)) if values else None
            curve.append(point)
    return {"seeds": plan.seeds, "baseline": plan.baseline, "level": LEVEL, "metrics": plan.metrics,
            "axes": list(plan.axes), "hma": plan.hma, "threads": plan.threads, "code": plan.code,
            "machine": {"cores": machine_cores(), "torch": torch.__version__,
                        "torch_threads_per_run": plan.threads},
            "runs": runs, "curve": curve, "curve_by_seed": {str(s): c for s, c in curves.items()},
            "rows": [{k: v for k, v in r.items() if k != "memory_plan"} for r in rows],
            "commands": {f"{r['seed']}/{r['method']}": r["command"] for r in rows}}


def _decimals(key: str) -> int:
    return next((d for k, _, d in METRICS + FACTS if k == key), 4)


def fmt_interval(iv: dict | None, key: str, *, sign: bool = False) -> str:
    if iv is None:
        return "-"
    d = _decimals(key)
    mean = f"{iv['mean']:+.{d}f}" if sign else f"{iv['mean']:.{d}f}"
    if iv["low"] is None:
        return mean
    return f"{mean} ± {(iv['high'] - iv['low']) / 2:.{d}f}"


def _significant(iv: dict | None) -> int:
    """+1 / -1 where the paired difference's interval lies above / below 0, else 0."""
    if not iv or iv.get("low") is None:
        return 0
    return 1 if iv["low"] > 0 else -1 if iv["high"] < 0 else 0


def main_table(report: dict) -> str:
    """Means with 95% t-intervals; ▲ / ▼: significantly higher / lower than the baseline (paired by seed)."""
    multi = len(report["seeds"]) > 1
    keys = report["metrics"] + [k for k, _, _ in FACTS]
    labels = {k: label for k, label, _ in METRICS + FACTS}
    columns = ["method"] + (["seeds"] if multi else []) + [labels[k] for k in keys]
    rows = []
    for run in report["runs"]:
        cells = {"method": run["name"] + (" (baseline)" if run["name"] == report["baseline"] and multi else "")}
        if multi:
            cells["seeds"] = f"{len(run['ok_seeds'])}" + (f" ({len(run['diverged_seeds'])} diverged)"
                                                           if run["diverged_seeds"] else "")
        for key in keys:
            iv = run["mean"].get(key)
            if iv is None and run["diverged_seeds"] and not run["ok_seeds"]:
                cells[labels[key]] = DIVERGED if key in report["metrics"] else run_fact(run, key)
                continue
            if not multi:
                value = None if iv is None else iv["mean"]
                cells[labels[key]] = "-" if value is None else (f"{value:.4f}" if key.startswith("eval/")
                                                                else f"{value:.0f}")
                continue
            if key not in report["metrics"]:  # wall time and memory: the mean (they depend on the machine's load)
                cells[labels[key]] = run_fact(run, key)
                continue
            mark = {1: " ▲", -1: " ▼", 0: ""}[_significant(run["diff"].get(key))]
            cells[labels[key]] = fmt_interval(iv, key) + mark
        rows.append(cells)
    return markdown_table(rows, columns)


def run_fact(run: dict, key: str) -> str:
    iv = run["mean"].get(key)
    return "-" if iv is None else f"{iv['mean']:.0f}"


def diff_table(report: dict) -> str:
    """The paired differences from the baseline: mean over seeds ± the half-width of its 95% t-interval, and the
    paired t-test's p-value."""
    labels = {k: label for k, label, _ in METRICS}
    columns = ["method"] + [labels[k] for k in report["metrics"]]
    rows = []
    for run in report["runs"]:
        if run["name"] == report["baseline"]:
            continue
        cells = {"method": run["name"]}
        for key in report["metrics"]:
            iv = run["diff"].get(key)
            if iv is None:
                cells[labels[key]] = "-"
                continue
            p = iv.get("p")
            mark = {1: " ▲", -1: " ▼", 0: ""}[_significant(iv)]
            cells[labels[key]] = fmt_interval(iv, key, sign=True) + (f" (p {p:.3f})" if p is not None else "") + mark
        rows.append(cells)
    return markdown_table(rows, columns)


def curve_table(report: dict) -> str:
    labels = {k: label for k, label, _ in METRICS}
    columns = ["alpha"] + [labels[k] for k in report["metrics"]]
    multi = len(report["seeds"]) > 1
    rows = [{"alpha": f"{p['alpha']:.2f}", **{labels[k]: (fmt_interval(p.get(k), k) if multi else
                                                          "-" if p.get(k) is None else f"{p[k]['mean']:.4f}")
                                              for k in report["metrics"]}}
            for p in report["curve"]]
    return markdown_table(rows, columns)


def claims(report: dict) -> str:
    """Each run's differences from the baseline that the intervals support (the t-interval of the paired
    difference excludes 0), as a list; the runs with none are named together."""
    labels = {k: label for k, label, _ in METRICS}
    lines, none = [], []
    for run in report["runs"]:
        if run["name"] == report["baseline"]:
            continue
        found = []
        for key in report["metrics"]:
            iv = run["diff"].get(key)
            if _significant(iv):
                d = _decimals(key)
                found.append(f"{labels[key]} {iv['mean']:+.{d}f} [{iv['low']:+.{d}f}, {iv['high']:+.{d}f}]")
        if found:
            lines.append(f"- `{run['name']}`: " + "; ".join(found))
        elif any(run["diff"].get(k) for k in report["metrics"]):
            none.append(f"`{run['name']}`")
    if none:
        lines.append(f"- no difference the intervals support: {', '.join(none)}")
    return "\n".join(lines) if lines else "- none"


def seeds_table(report: dict) -> str:
    labels = {k: label for k, label, _ in METRICS}
    columns = ["method"] + [f"seed {s}" for s in report["seeds"]]
    out = []
    for key in report["metrics"]:
        rows = []
        for run in report["runs"]:
            cells = {"method": run["name"]}
            for s in report["seeds"]:
                value = run["values"][key].get(s)
                cells[f"seed {s}"] = (DIVERGED if s in run["diverged_seeds"] else
                                      "-" if value is None else f"{value:.{_decimals(key)}f}")
            rows.append(cells)
        out.append(f"{labels[key]} (`{key}`):\n\n" + markdown_table(rows, columns))
    return "\n\n".join(out)


def caption(report: dict) -> str:
    n = len(report["seeds"])
    if n < 2:
        return (f"One seed ({report['seeds'][0]}): no intervals. Every run has the same data, parts and step "
                f"budget; each row is one `hbat train` process.")
    return (f"Mean over {n} seeds ({', '.join(map(str, report['seeds']))}) ± the half-width of the 95% Student "
            f"t-interval over seeds (t with {n - 1} degrees of freedom; a run diverged on a seed counts the seeds "
            f"it finished). ▲ / ▼: higher / lower than `{report['baseline']}` and significant at 5%: the 95% "
            f"t-interval of the difference, seed by seed (paired: both runs share each seed's data, base model, SFT "
            f"model and reward model), excludes 0. Every run of a seed has the same data, parts and step budget; "
            f"each is one `hbat train` process with {report['threads']} thread{'s' * (report['threads'] > 1)}.")


def markdown(report: dict, wall: float) -> str:
    n = len(report["seeds"])
    m = report["machine"]
    seconds = sum(r["wall_seconds"] for r in report["rows"])
    hma = report["hma"]
    parts = [
        "# hbat compare", "",
        f"{caption(report)} Runs: {seconds:.0f} s of wall time in all (this invocation: {wall:.0f} s); "
        f"{m['cores']} cores, torch {m['torch']}, code {report['code']}.", "",
        "<!-- compare:table -->", main_table(report), "<!-- /compare:table -->", ""]
    if n > 1:
        parts += [f"Paired differences from `{report['baseline']}` (run − baseline, seed by seed): mean ± "
                  f"half-width of the 95% t-interval, and the two-sided paired t-test's p-value; ▲ / ▼ where the interval "
                  "excludes 0.", "", "<!-- compare:diff -->", diff_table(report), "<!-- /compare:diff -->", "",
                  f"What the intervals support: differences from `{report['baseline']}` whose 95% interval (paired "
                  "by seed) excludes 0, as mean [low, high]:", "", "<!-- compare:claims -->", claims(report),
                  "<!-- /compare:claims -->", ""]
    if report["curve"]:
        parts += [f"Uniform averaging of `{hma['pre'] or 'the shared SFT model'}` and `{hma['aligned']}`, "
                  "(1 − alpha) · pre + alpha · aligned (alpha = weight of the aligned model), evaluated like the "
                  "runs"
                  + (f"; mean ± 95% t-interval over the seeds {', '.join(map(str, report['curve'][0]['seeds']))}"
                     if n > 1 else "") + ":", "", "<!-- compare:curve -->", curve_table(report),
                  "<!-- /compare:curve -->", ""]
    parts += ["![trade-off](compare.png)", "", "![metrics over training](curves.png)", ""]
    if n > 1:
        parts += ["<details><summary>Every seed</summary>", "", seeds_table(report), "", "</details>", ""]
    commands = "\n".join(f"- `{key}`: `{command}`" for key, command in report["commands"].items())
    parts += ["<details><summary>Commands (run from the repository root)</summary>", "", commands, "",
              "</details>", ""]
    return "\n".join(parts)


def _write_csv(rows: list[dict], plan: Plan, path: str) -> None:
    keys = ["seed", "method"] + [k for k, _, _ in METRICS] + [k for k, _, _ in FACTS] + ["status", "command"]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    os.replace(tmp, path)
