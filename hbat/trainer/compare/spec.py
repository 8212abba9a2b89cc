"""The spec and the plan of `hbat compare`: the default comparison, the spec's checks, every run of every seed
with its config and command (checked before anything runs), and the code fingerprint a reused run must match."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field



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


# reporting only (and the demo's note): not in the code fingerprint, so a changed table or plot reuses every run
REPORT_MODULES = ("trainer/compare/", "trainer/stats.py", "trainer/plots.py", "demo.py")


def load_spec(path: str | None) -> dict:
    if path is None:
        return json.loads(json.dumps(DEFAULT_SPEC))
    from ..config import read_yaml_file

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
    from ..methods import spec as method_spec

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


def evaluated_metrics(cfg, data) -> list[str]:
    """The eval/* metrics a run of ``cfg`` on ``data`` (hbat.trainer.workspace.RunData) reports (evaluate.evaluate_run):
    exact match and preference only where the data has the task's checks (the embedded task), the KL only with
    ``eval.kl_samples``."""
    have = {"eval/sft_loss", "eval/reward", "eval/win_rate"}
    if data.exact_match is not None:
        have.add("eval/exact_match")
    if data.preference_score is not None:
        have.add("eval/preference")
    if cfg.eval.kl_samples:
        have.add("eval/kl_to_sft")
    return [k for k, _, _ in METRICS if k in have]


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



@dataclass
class Job:
    seed: int
    run: dict
    overrides: list[str]
    config: str                       # the resolved config (dump_config): the reuse key, with threads and code
    folder: str
    command: list[str]
    result: dict | None = None
    wall: float | None = None
    reused: bool = False



@dataclass
class Plan:
    out: str
    seeds: list[int]
    runs: list[dict]
    jobs: list[Job]
    seed_overrides: dict[int, list[str]]
    metrics: list[str]
    axes: tuple[str, str]
    baseline: str
    hma: dict | None
    threads: int
    code: str
    run_metrics: dict[str, list[str]] = field(default_factory=dict)


def seed_folder(out: str, seed: int) -> str:
    return os.path.join(out, f"seed-{seed}")


def make_plan(spec: dict, extra: list[str], out_dir: str | None, *, seeds: int | None = None,
              threads: int = 1) -> Plan:
    """Every run of every seed, with its config and command, checked before anything runs: the spec, every run's
    config, the data against each config, the hma section and the plotted metrics (one-line errors)."""
    from ..config import dump_config, load_config
    from ..validate import check_data
    from ..workspace import load_data

    runs = normalise_runs(spec)
    names = [r["name"] for r in runs]
    shared = spec.get("set") or []
    if isinstance(shared, str) or not isinstance(shared, list) or not all(isinstance(o, str) for o in shared):
        raise ValueError(f"set must be a list of key=value strings, got {shared!r}")
    shared = list(shared) + list(extra)  # output_dir here is the default --out; seed the first seed
    base = load_config(None, shared)
    out = out_dir or base.output_dir
    seed_list = resolve_seeds(spec, seeds, base.seed)
    baseline = spec.get("baseline") or ("two_stage" if "two_stage" in names else names[0])
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the runs")
    hma = spec.get("hma")
    if hma is not None:  # checked before anything runs
        if not isinstance(hma, dict) or set(hma) - {"pre", "aligned", "alphas"}:
            raise ValueError(f"hma must be a mapping with pre, aligned and alphas, got {hma!r}")
        hma = {"aligned": hma.get("aligned", "two_stage"), "pre": hma.get("pre"),
               "alphas": [float(a) for a in hma.get("alphas", [0.0, 0.5, 1.0])]}
        for key in ("aligned", "pre"):
            if hma[key] is not None and hma[key] not in names:
                raise ValueError(f"hma.{key} {hma[key]!r} is not one of the runs")
        if any(not 0.0 <= a <= 1.0 for a in hma["alphas"]):
            raise ValueError(f"hma.alphas must be in [0, 1], got {hma['alphas']}")
    jobs, seed_overrides, run_metrics = [], {}, {}
    first_configs: dict[str, str] = {}
    dropped: set[str] = set()
    for seed in seed_list:
        folder = seed_folder(out, seed)
        seed_overrides[seed] = shared + [f"output_dir={folder}", f"seed={seed}"]
        seed_base = load_config(None, seed_overrides[seed])
        data = load_data(seed_base)
        for run in runs:
            overrides = seed_overrides[seed] + [f"method={run['method']}"] + run["set"]
            try:
                cfg = load_config(None, overrides)  # every run's config is valid before anything runs
            except ValueError as exc:
                raise ValueError(f"run {run['name']!r}: {exc}") from None
            check_data(data.splits, cfg, data.sources)  # and so is its data (e.g. enough rows for its n_parts)
            config = dump_config(cfg)
            if seed == seed_list[0]:
                first_configs[run["name"]] = config
                run_metrics[run["name"]] = evaluated_metrics(cfg, data)
                sweep = run.get("sweep")
                if sweep and first_configs.get(sweep["of"]) == config:  # the value the run has anyway: that run
                    dropped.add(run["name"])
                    _of = next(r for r in runs if r["name"] == sweep["of"])
                    _of["sweep_value"] = {"key": sweep["key"], "value": sweep["value"]}
            if run["name"] in dropped:
                continue
            command = ["hbat", "train", "--no-progress", "--name", run["name"]]
            for override in overrides:
                command += ["--set", override]
            jobs.append(Job(seed, run, overrides, config, os.path.join(folder, run["name"]), command))
        if seed == seed_list[0]:  # what the runs report, and so what can be plotted: known from the first seed on
            runs = [r for r in runs if r["name"] not in dropped]
            metrics = [k for k, _, _ in METRICS if all(k in run_metrics[r["name"]] for r in runs)]
            axes = plot_axes(spec, metrics)
    for run in runs:  # a swept run's own point on its curve: the value its config has
        if any((r.get("sweep") or {}).get("of") == run["name"] for r in runs) and "sweep_value" not in run:
            key = next(r["sweep"]["key"] for r in runs if (r.get("sweep") or {}).get("of") == run["name"])
            cfg = load_config(None, seed_overrides[seed_list[0]] + [f"method={run['method']}"] + run["set"])
            run["sweep_value"] = {"key": key, "value": _config_value(cfg, key)}
    return Plan(out, seed_list, runs, jobs, seed_overrides, metrics, axes, baseline, hma, threads, code_fingerprint(),
                run_metrics)


def _config_value(cfg, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


def code_fingerprint() -> str:
    """A hash of what decides a run's numbers besides its config: hbat's code (its Python files but the
    reporting ones, and the compiled extension), and the versions of torch, transformers and numpy."""
    import importlib.metadata

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hbat/
    digest = hashlib.sha256()
    for package in ("torch", "transformers", "numpy"):
        try:
            digest.update(f"{package}={importlib.metadata.version(package)}\n".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package}=-\n".encode())
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if rel.replace(os.sep, "/").startswith(REPORT_MODULES):
                continue
            if name.endswith((".py", ".so", ".pyd")):
                files.append((rel, path))
    for rel, path in sorted(files):
        with open(path, "rb") as fh:
            digest.update(rel.encode() + b"\0" + hashlib.sha256(fh.read()).digest())
    return digest.hexdigest()[:16]
