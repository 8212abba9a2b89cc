"""The spec of `hbat compare`: the default comparison, the spec file and its checks (its runs and sweeps, seeds,
the plotted metrics), and the metrics the tables report. What the spec becomes, every run of every seed with its
config and command: ``plan``."""
from __future__ import annotations

import json
import re

from ..config_io import read_yaml_file
from ..methods import spec as method_spec


DEFAULT_SPEC = {
    "set": ["output_dir=runs/compare"],
    # the baselines (SFT alone, SFT -> DPO), HBAT, its ablation without the penalty, the penalty without the
    # importance (every tensor alike: L2-SP) and Fisher EWC; the other ablations are docs/results/ablations.yaml
    "runs": ["sft_only", "two_stage", "hbat", "no_ewc",
             {"name": "hbat-uniform", "method": "hbat", "set": ["ewc.importance_mode=uniform"]},
             "fisher"],
    "baseline": "two_stage",
    # the penalty's strength: HBAT's curve in the trade-off plane (lam = 1, the paper's, is the run `hbat`)
    "sweep": {"key": "ewc.lam", "values": [10, 100], "runs": ["hbat"]},
    "hma": {"pre": "sft_only", "aligned": "two_stage", "alphas": [0.0, 0.25, 0.5, 0.75, 1.0]},
}


SPEC_KEYS = ("set", "runs", "seeds", "baseline", "sweep", "hma", "plot")


# (key, column label, decimals of a mean over seeds)
METRICS = [("eval/exact_match", "exact match", 3), ("eval/sft_loss", "SFT loss (val)", 3),
           ("eval/preference", "preference", 3), ("eval/reward", "reward", 2), ("eval/win_rate", "win vs SFT", 3),
           ("eval/kl_to_sft", "KL to SFT", 2)]


FACTS = [("wall_seconds", "wall s", 0), ("peak_rss_mib", "peak RSS MiB", 0)]


COLUMNS = [("method", "method")] + [(k, label) for k, label, _ in METRICS + FACTS]


LEVEL = 0.95


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@=+-]*")


RESERVED = ("output_dir", "seed")  # set by hbat compare itself: --out and seeds


def load_spec(path: str | None) -> dict:
    if path is None:
        return json.loads(json.dumps(DEFAULT_SPEC))
    spec = read_yaml_file(path) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the compare spec must be a mapping with 'runs'")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {sorted(unknown)[0]!r}; valid keys: {', '.join(SPEC_KEYS)}")
    return spec


def _check_overrides(items, where: str) -> list[str]:
    if items is None:
        return []
    if isinstance(items, str) or not isinstance(items, list) or not all(isinstance(o, str) for o in items):
        raise ValueError(f"{where} must be a list of key=value strings, got {items!r}")
    for text in items:
        if text.split("=", 1)[0].strip() in RESERVED:
            raise ValueError(f"{where}: {text!r}: {' and '.join(RESERVED)} are set by hbat compare "
                             "(use --out and the spec's seeds)")
    return list(items)


def normalise_runs(spec: dict) -> list[dict]:
    """The spec's runs as ``{name, method, set}`` mappings, then the sweep's runs (each with ``sweep``: key,
    value, and the run it varies); errors name the entry."""
    runs, names = [], set()
    for i, item in enumerate(spec.get("runs") or []):
        run = {"name": item, "method": item, "set": []} if isinstance(item, str) else item
        if not isinstance(run, dict) or "method" not in run:
            raise ValueError(f"runs[{i}] must be a method name or a mapping with 'method' (and 'name', 'set')")
        run = dict(run)
        unknown = set(run) - {"name", "method", "set"}
        if unknown:
            raise ValueError(f"runs[{i}]: unknown key {sorted(unknown)[0]!r}; valid keys: name, method, set")
        run.setdefault("name", run["method"])
        run["set"] = _check_overrides(run.get("set"), f"runs[{i}].set")
        method_spec(run["method"])  # unknown methods fail before anything runs
        if not isinstance(run["name"], str) or not NAME.fullmatch(run["name"]):
            raise ValueError(f"runs[{i}]: the name {run['name']!r} must be letters, digits and ._@=+- "
                             "(it names a folder)")
        if run["name"] in names:
            raise ValueError(f"runs[{i}]: the name {run['name']!r} is used twice")
        names.add(run["name"])
        runs.append(run)
    if not runs:
        raise ValueError("the compare spec has no runs")
    sweeps = spec.get("sweep") or []
    sweeps = [sweeps] if isinstance(sweeps, dict) else sweeps
    if not isinstance(sweeps, list):
        raise ValueError(f"sweep must be a mapping {{key, values, runs}} or a list of them, got {sweeps!r}")
    base = list(runs)
    for i, sweep in enumerate(sweeps):
        where = "sweep" if len(sweeps) == 1 else f"sweep[{i}]"
        if not isinstance(sweep, dict) or set(sweep) - {"key", "values", "runs"} or "key" not in sweep:
            raise ValueError(f"{where} must be a mapping with key, values and (optionally) runs, got {sweep!r}")
        key, values = sweep["key"], sweep.get("values")
        if not isinstance(key, str) or not key or key.split(".")[0] in RESERVED:
            raise ValueError(f"{where}.key must be a config key such as ewc.lam (not output_dir or seed), got {key!r}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.values must be a non-empty list, got {values!r}")
        targets = sweep.get("runs", [r["name"] for r in base])
        if isinstance(targets, str):
            targets = [targets]
        for target in targets:
            if target not in [r["name"] for r in base]:
                raise ValueError(f"{where}.runs: {target!r} is not one of the runs")
            of = next(r for r in base if r["name"] == target)
            for value in values:
                text = value if isinstance(value, str) else json.dumps(value)
                name = f"{target}@{key}={text}"
                if name in names:
                    raise ValueError(f"{where}: the run {name!r} is made twice")
                names.add(name)
                runs.append({"name": name, "method": of["method"], "set": of["set"] + [f"{key}={text}"],
                             "sweep": {"key": key, "value": value, "of": target}})
    return runs


def resolve_seeds(spec: dict, cli: int | None, base_seed: int) -> list[int]:
    """``--seeds N`` (or the spec's ``seeds``: a count, or a list) -> the seeds; a count N gives the config's seed
    and the N - 1 after it."""
    value = cli if cli is not None else spec.get("seeds", 1)
    if isinstance(value, bool):
        raise ValueError(f"seeds must be a number of seeds or a list of seeds, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"seeds must be >= 1, got {value}")
        return [base_seed + k for k in range(value)]
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                 for s in value) and len(set(value)) == len(value):
        return list(value)
    raise ValueError(f"seeds must be a number of seeds or a list of distinct seeds >= 0, got {value!r}")


def plot_axes(spec: dict, metrics: list[str]) -> tuple[str, str]:
    """The trade-off plane: the spec's ``plot`` (checked against what the runs report) or the default."""
    plot = spec.get("plot") or {}
    if not isinstance(plot, dict) or set(plot) - {"x", "y"}:
        raise ValueError(f"plot must be a mapping with x and y (metric names such as eval/reward), got {plot!r}")
    default_y = "eval/exact_match" if "eval/exact_match" in metrics else "eval/sft_loss"
    axes = (plot.get("x", "eval/reward"), plot.get("y", default_y))
    known = [k for k, _, _ in METRICS]
    for axis, metric in zip("xy", axes):
        if metric not in known:
            raise ValueError(f"plot.{axis} = {metric!r} is not a metric; metrics: {', '.join(known)}")
        if metric not in metrics:
            why = (" (exact match and preference need the embedded task's checks)" if metric in
                   ("eval/exact_match", "eval/preference") else " (the KL needs eval.kl_samples > 0)")
            raise ValueError(f"plot.{axis} = {metric}, but the runs on this data do not report it{why}; they "
                             f"report: {', '.join(metrics)}")
    return axes
