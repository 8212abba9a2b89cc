"""`hbat compare [SPEC]`: several methods on the same data, seeds and budget, as the paper's Tables 1 and 4.

A SPEC is a YAML file (default: the embedded comparison, ``DEFAULT_SPEC`` below):

    set: [model.size=small]                 # overrides shared by every run (hbat train --set ...)
    runs:                                   # a method name, or a mapping with its own name and overrides
      - two_stage
      - {name: hbat-paper, method: hbat, set: [ewc.importance_mode=paper]}
    seeds: 5                                # every run on 5 seeds (the config's seed, +1, ...), or a list [0, 1, 2]
    baseline: two_stage                     # paired differences against this run (default: two_stage, else the first)
    sweep: {key: ewc.lam, values: [0.1, 10, 100], runs: [hbat]}   # trade-off curves (optional; or a list of them)
    hma: {pre: sft_only, aligned: two_stage, alphas: [0.0, 0.25, 0.5, 0.75, 1.0]}   # averaging curve (optional)
    plot: {x: eval/reward, y: eval/exact_match}   # the trade-off plane (default y: exact match, or the SFT loss)

Each seed has its own folder ``<out>/seed-<S>/``: the data, base model, SFT reference and reward model of that
seed (built once, cached in ``shared/``), then every run of the seed, each its own ``hbat train --name`` process
(its wall time and peak memory are its own). The runs of all seeds go through a pool of ``--jobs`` processes
(default: as many as the machine has cores), each with ``--threads`` threads (default 1), so the cores are used
without oversubscribing them and a run's numbers do not depend on how many runs share the machine.

``hma.pre`` names the run whose model is the aligned run's starting point (``sft_only`` runs exactly the SFT
stage of ``two_stage``: same data, order and seed); without it, the shared SFT reference is used. Its alphas
are the averaging-ratio sweep. A ``sweep`` adds, for each run it names (default: every run), one run per value
of the config key (``hbat@ewc.lam=10``); a value that gives the run's own config is the run itself.

A rerun reuses every run (and averaging curve) whose folder holds a result made with the same config, the
same thread count and the same hbat code and library versions (``code_fingerprint``); ``--fresh`` retrains.

Outputs in the output folder: compare.md (the table of means with 95% t-intervals over seeds, paired
differences from the baseline, the averaging curve, per-seed values, the commands), compare.csv (one row
per run and seed), compare.json (everything the tables are made from), compare.png (the trade-off plane) and
curves.png (the metrics over training of every run).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .run import DIVERGED, EXIT_DIVERGED

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
REPORT_MODULES = ("trainer/compare.py", "trainer/stats.py", "trainer/plots.py", "demo.py")


# --- the spec ---------------------------------------------------------------------------------------------------

def load_spec(path: str | None) -> dict:
    if path is None:
        return json.loads(json.dumps(DEFAULT_SPEC))
    from .config import read_yaml_file

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
    from .methods import spec as method_spec

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
    """The eval/* metrics a run of ``cfg`` on ``data`` (hbat.trainer.workspace.RunData) reports (loop.evaluate):
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


# --- the plan: one job per (seed, run) --------------------------------------------------------------------------

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
    from .config import dump_config, load_config
    from .validate import check_data
    from .workspace import load_data

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

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # hbat/
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
            if rel.replace(os.sep, "/") in REPORT_MODULES:
                continue
            if name.endswith((".py", ".so", ".pyd")):
                files.append((rel, path))
    for rel, path in sorted(files):
        with open(path, "rb") as fh:
            digest.update(rel.encode() + b"\0" + hashlib.sha256(fh.read()).digest())
    return digest.hexdigest()[:16]


# --- running ----------------------------------------------------------------------------------------------------

def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return env


def _facts_path(folder: str) -> str:
    return os.path.join(folder, "compare-run.json")


def _reusable(job: Job, plan: Plan) -> dict | None:
    """The facts of a finished run with the same config, thread count and code, or None."""
    name = job.run["name"]
    paths = [os.path.join(job.folder, "result.json"), _facts_path(job.folder),
             os.path.join(os.path.dirname(job.folder), f"config-{name}.yaml")]
    if not all(os.path.exists(p) for p in paths):
        return None
    with open(paths[2], encoding="utf-8") as fh:
        if fh.read() != job.config:
            return None
    try:
        with open(paths[1], encoding="utf-8") as fh:
            facts = json.load(fh)
    except ValueError:
        return None
    return facts if facts.get("threads") == plan.threads and facts.get("code") == plan.code else None


def _run_job(job: Job, plan: Plan) -> None:
    from .checkpoint import write_text_atomic

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hbat.cli", *job.command[1:]], capture_output=True, text=True,
                          env=child_env(plan.threads))
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, EXIT_DIVERGED):  # a diverged run is a row; any other failure stops
        raise RuntimeError(f"run {job.run['name']!r} (seed {job.seed}) failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    write_text_atomic(json.dumps({"wall_seconds": wall, "threads": plan.threads, "code": plan.code,
                                  "seed": job.seed}), _facts_path(job.folder))
    job.wall = wall


def _worker(kind: str, args: dict, threads: int) -> None:
    """Start ``python -m hbat.trainer.compare KIND ARGS``: prepare a seed's shared pieces, or its averaging curve."""
    proc = subprocess.run([sys.executable, "-m", "hbat.trainer.compare", kind, json.dumps(args)],
                          capture_output=True, text=True, env=child_env(threads))
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} ({args.get('what', '')}) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


@dataclass
class Task:
    """One process of the pool: ``run()``, after the tasks ``needs`` (indices) finished; ``done()`` then reports."""

    run: object
    needs: tuple = ()
    done: object = None


def run_graph(tasks: list[Task], workers: int) -> None:
    """Run ``tasks`` on ``workers`` threads (each waits on its own process), always the first ready task in list
    order, a task once every task it needs has finished. The first failure stops new starts and is raised once
    the tasks running have finished (their runs are complete, and reused on the next invocation)."""
    import threading

    state = ["waiting"] * len(tasks)
    errors: list[BaseException] = []
    cond = threading.Condition()

    def take():
        while True:
            if errors:
                return None
            ready = next((i for i, task in enumerate(tasks) if state[i] == "waiting"
                          and all(state[n] == "done" for n in task.needs)), None)
            if ready is not None:
                state[ready] = "running"
                return ready
            if "running" not in state:  # nothing runs, nothing can start: finished
                return None
            cond.wait()

    def worker():
        while True:
            with cond:
                i = take()
            if i is None:
                return
            try:
                tasks[i].run()
            except BaseException as exc:  # noqa: BLE001 - raised by the main thread
                with cond:
                    errors.append(exc)
                    state[i] = "failed"
                    cond.notify_all()
                return
            with cond:
                state[i] = "done"
                if tasks[i].done is not None:
                    tasks[i].done()
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(workers, len(tasks))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def hma_curve(ws, cfg, aligned_folder: str, alphas, pre_folder: str | None = None) -> list[dict]:
    """Uniform averaging (1 - alpha) * pre + alpha * aligned, evaluated at each alpha (hbat.averaging); pre is
    the kept model of ``pre_folder``, or the shared SFT reference."""
    from ..averaging import average
    from .checkpoint import load as load_checkpoint
    from .loop import evaluate
    from .models import merge_lora

    def load(folder):
        model = ws.build()
        model.load_state_dict(load_checkpoint(os.path.join(folder, "best.pt"), remedy="delete the run's folder and "
                                              "run hbat compare again"))
        return merge_lora(model)  # LoRA: the plain model holding the adapters, as the SFT reference is

    aligned = load(aligned_folder)
    pre = load(pre_folder) if pre_folder else ws.sft_model
    points = []
    for alpha in alphas:
        merged = average(pre, aligned, float(alpha))
        points.append({"alpha": float(alpha), **evaluate(ws, merged, cfg)})
    return points


def _curve_key(plan: Plan, seed: int, jobs_by_name: dict) -> str:
    hma = plan.hma
    parts = [jobs_by_name[hma["aligned"]].config, jobs_by_name[hma["pre"]].config if hma["pre"] else "shared SFT",
             json.dumps(hma["alphas"]), str(plan.threads), plan.code]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def compare(spec: dict, extra: list[str], out_dir: str | None, *, progress=True, reuse=True, seeds: int | None = None,
            jobs: int | None = None, threads: int = 1) -> list[dict]:
    """Run the comparison (module docstring); returns one row per (seed, run), as in compare.csv."""
    from .checkpoint import write_text_atomic

    started = time.perf_counter()
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    plan = make_plan(spec, extra, out_dir, seeds=seeds, threads=threads)
    todo = []
    for job in plan.jobs:
        facts = _reusable(job, plan) if reuse else None
        if facts is not None:
            job.reused, job.wall = True, facts["wall_seconds"]
        else:
            todo.append(job)
    workers = max(1, min(jobs or max(1, machine_cores() // threads), max(1, len(todo))))
    order = {r["name"]: i for i, r in enumerate(plan.runs)}
    todo.sort(key=lambda job: (order[job.run["name"]], job.seed))  # every seed of a run, then the next run
    print(f"hbat compare: {len(plan.runs)} runs x {len(plan.seeds)} seed{'s' * (len(plan.seeds) > 1)} "
          f"({', '.join(map(str, plan.seeds))}) -> {plan.out}; {len(todo)} to train, {len(plan.jobs) - len(todo)} "
          f"reused; {workers} at a time, {threads} thread{'s' * (threads > 1)} each", flush=True)
    for job in plan.jobs:
        if job.reused:
            print(f"    reusing {job.folder}", flush=True)
    # one graph: each seed's shared pieces (data, base model, SFT reference, reward model), built once; every run
    # of the seed after them; the seed's averaging curve after its two runs
    tasks: list[Task] = []
    prepared = {}
    for seed in sorted({job.seed for job in todo}):
        prepared[seed] = len(tasks)
        tasks.append(Task(lambda s=seed: _worker("prepare", {"overrides": plan.seed_overrides[s], "what": f"seed {s}",
                                                             "threads": threads}, threads),
                          done=lambda s=seed: print(f"    seed {s}: shared pieces ready", flush=True)))
    count, where = [0], {}

    def finished(job):
        count[0] += 1
        print(f"[{count[0]}/{len(todo)}] seed {job.seed} {job.run['name']}: {_brief(_read_result(job))}, "
              f"{job.wall:.0f} s", flush=True)

    for job in todo:
        where[(job.seed, job.run["name"])] = len(tasks)
        tasks.append(Task(lambda j=job: _run_job(j, plan), (prepared[job.seed],), lambda j=job: finished(j)))
    curves: dict[int, list[dict]] = {}
    tasks += _curve_tasks(plan, reuse, curves, prepared, where)
    run_graph(tasks, workers)
    for job in plan.jobs:
        job.result = _read_result(job)
    curves = dict(sorted(curves.items()))
    rows = [_row(job, plan.threads) for job in plan.jobs]
    report = build_report(plan, rows, curves)
    out = plan.out
    os.makedirs(out, exist_ok=True)
    wall = time.perf_counter() - started
    write_text_atomic(markdown(report, wall), os.path.join(out, "compare.md"))
    write_text_atomic(json.dumps(report, indent=1, default=str), os.path.join(out, "compare.json"))
    _write_csv(rows, plan, os.path.join(out, "compare.csv"))
    _plots(plan, report, out)
    print("\n" + main_table(report))
    return rows


def _read_result(job: Job) -> dict:
    with open(os.path.join(job.folder, "result.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _brief(result: dict) -> str:
    if result.get("status") == "diverged":
        return f"diverged: {result.get('error')}"
    return ", ".join(f"{k[5:]}={v:.4f}" for k, v in result.items() if k.startswith("eval/") and isinstance(v, float))


def _row(job: Job, threads: int) -> dict:
    result = job.result
    row = {**result, "seed": job.seed, "method": job.run["name"], "wall_seconds": round(job.wall),
           "command": f"OMP_NUM_THREADS={threads} {shlex.join(job.command)}"}
    if result.get("status") != "diverged":
        row["peak_rss_mib"] = round(result["peak_rss_bytes"] / 2**20)
    return row


def _curve_tasks(plan: Plan, reuse: bool, curves: dict, prepared: dict, where: dict) -> list[Task]:
    """The tasks that fill ``curves`` ({seed: averaging points}): a saved curve with the same key (configs of the
    two runs, alphas, threads, code) is read now; the others are computed after the seed's two runs, except
    where one of them diverged."""
    if not plan.hma:
        return []
    hma, tasks = plan.hma, []
    for seed in plan.seeds:
        by_name = {job.run["name"]: job for job in plan.jobs if job.seed == seed}
        used = [by_name[hma["aligned"]]] + ([by_name[hma["pre"]]] if hma["pre"] else [])
        path = os.path.join(seed_folder(plan.out, seed), "averaging.json")
        key = _curve_key(plan, seed, by_name)
        if reuse and os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                saved = json.load(fh)
            if saved.get("key") == key:
                curves[seed] = saved["points"]
                continue

        def run(seed=seed, path=path, key=key, used=used):
            diverged = [j.run["name"] for j in used if _read_result(j).get("status") == "diverged"]
            if diverged:
                print(f"no averaging curve on seed {seed}: {', '.join(diverged)} diverged", flush=True)
                return
            _worker("curve", {"overrides": plan.seed_overrides[seed], "what": f"averaging curve, seed {seed}",
                              "aligned": used[0].folder, "pre": used[1].folder if len(used) > 1 else None,
                              "alphas": hma["alphas"], "path": path, "key": key, "threads": plan.threads},
                    plan.threads)
            with open(path, encoding="utf-8") as fh:
                curves[seed] = json.load(fh)["points"]
            print(f"    seed {seed}: averaging curve done", flush=True)

        needs = tuple(where[(seed, j.run["name"])] for j in used if (seed, j.run["name"]) in where)
        tasks.append(Task(run, needs + ((prepared[seed],) if seed in prepared else ())))
    return tasks


# --- the report -------------------------------------------------------------------------------------------------

def build_report(plan: Plan, rows: list[dict], curves: dict[int, list[dict]]) -> dict:
    """Everything compare.md, the plots and the README's tables are made from: per run and metric, the values by
    seed, the mean with its t-interval, and the paired difference from the baseline."""
    from .stats import mean_interval, paired_difference

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
    import torch

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
    from .metrics import markdown_table

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
    from .metrics import markdown_table

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
    from .metrics import markdown_table

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
    from .metrics import markdown_table

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


def tradeoff_series(report: dict):
    """The series of the trade-off plot: each run that is not a sweep point, with its sweep points (in value
    order), then the averaging curve."""
    from .plots import Point, Series

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


def _plots(plan: Plan, report: dict, out: str) -> None:
    try:
        from .plots import training_curves, tradeoff_plot
    except ImportError:
        return
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


# --- command line -----------------------------------------------------------------------------------------------

def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("spec", nargs="?", help="compare spec YAML (default: the embedded comparison)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every run (after the spec's own)")
    parser.add_argument("--out", help="output folder (default: the spec's output_dir)")
    parser.add_argument("--seeds", type=int, help="run every method on this many seeds (default: the spec's "
                        "seeds, else 1): the config's seed and the ones after it")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: the machine's cores / --threads)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each run (default 1; part of what a reused run must match)")
    parser.add_argument("--fresh", action="store_true", help="retrain every run (default: reuse finished runs "
                        "with the same config, thread count and code)")
    parser.add_argument("--reuse", action="store_true", help="(the default; kept for old command lines)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(args) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    rows = compare(load_spec(args.spec), args.overrides, args.out, progress=not args.no_progress,
                   reuse=not args.fresh, seeds=args.seeds, jobs=args.jobs, threads=args.threads)
    return EXIT_DIVERGED if any(r.get("status") == "diverged" for r in rows) else 0


def _worker_main(kind: str, payload: str) -> int:
    """The processes of the pool besides `hbat train`: ``prepare`` (a seed's shared pieces) and ``curve`` (its
    averaging curve, written to ``path`` with its ``key``)."""
    import torch

    from .checkpoint import write_text_atomic
    from .config import load_config
    from .workspace import prepare

    args = json.loads(payload)
    torch.set_num_threads(int(args["threads"]))
    cfg = load_config(None, args["overrides"])
    ws = prepare(cfg, progress=False)
    if kind == "curve":
        points = hma_curve(ws, cfg, args["aligned"], args["alphas"], args["pre"])
        clean = [{k: v for k, v in p.items() if isinstance(v, (int, float)) and math.isfinite(v) or k == "alpha"}
                 for p in points]
        write_text_atomic(json.dumps({"key": args["key"], "points": clean}), args["path"])
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1], sys.argv[2]))
