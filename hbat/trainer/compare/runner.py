"""`hbat compare` itself: the plan, the graph of runs and curves, the report; its command line and the workers' entry
point (`python -m hbat.trainer.compare KIND ARGS`)."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import time

import torch

from ...averaging import average
from ..checkpoint import load as load_checkpoint
from ..checkpoint import write_text_atomic
from ..config import load_config
from ..evaluate import evaluate_run as evaluate
from ..models import merge_lora
from ..run import EXIT_DIVERGED
from ..workspace import prepare
from .plan import Job, Plan, make_plan, seed_folder
from .plots import write_plots
from .pool import Task, _reusable, _run_job, _worker, machine_cores, run_graph
from .report import _write_csv, build_report, main_table, markdown
from .spec import load_spec


def hma_curve(ws, cfg, aligned_folder: str, alphas, pre_folder: str | None = None) -> list[dict]:
    """Uniform averaging (1 - alpha) * pre + alpha * aligned, evaluated at each alpha (hbat.averaging; alpha above 1
    extrapolates past the aligned model: ExPO); pre is the kept model of ``pre_folder``, or the shared SFT
    reference."""
    def load(folder):
        model = ws.build()
        model.load_state_dict(load_checkpoint(os.path.join(folder, "best.pt"), remedy="delete the run's folder and "
                                              "run hbat compare again"))
        return merge_lora(model)  # LoRA: the plain model holding the adapters, as the SFT reference is

    aligned = load(aligned_folder)
    pre = load(pre_folder) if pre_folder else ws.sft_model
    points = []
    for alpha in alphas:
        merged = average(pre, aligned, float(alpha), extrapolate=True)
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
    write_plots(plan, report, out)
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
