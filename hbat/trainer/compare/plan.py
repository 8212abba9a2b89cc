"""The plan of `hbat compare`: every run of every seed with its config and command, checked before anything runs
(``make_plan``: the spec, every run's config, the data against each config), the metrics each run reports, and
the fingerprint of the code (``code_fingerprint``) that a reused run must match."""
from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
from dataclasses import dataclass, field

from ..config import dump_config, load_config
from ..rundata import load_data
from ..validate import check_data
from .spec import METRICS, normalise_runs, plot_axes, resolve_seeds

# reporting only (and the demo's note): not in the code fingerprint, so a changed table or plot reuses every run
REPORT_MODULES = ("trainer/compare/", "trainer/stats.py", "trainer/plots.py", "demo.py")


def evaluated_metrics(cfg, data) -> list[str]:
    """The eval/* metrics a run of ``cfg`` on ``data`` (hbat.trainer.rundata.RunData) reports
    (evaluate.evaluate_run): exact match and preference only where the data has the task's checks (the embedded
    task), the KL only with ``eval.kl_samples``."""
    have = {"eval/sft_loss", "eval/reward", "eval/win_rate"}
    if data.exact_match is not None:
        have.add("eval/exact_match")
    if data.preference_score is not None:
        have.add("eval/preference")
    if cfg.eval.kl_samples:
        have.add("eval/kl_to_sft")
    return [k for k, _, _ in METRICS if k in have]


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
        if any(not (a >= 0.0 and math.isfinite(a)) for a in hma["alphas"]):
            raise ValueError(f"hma.alphas must be finite and >= 0 (above 1: ExPO, past the aligned model), got "
                             f"{hma['alphas']}")
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
