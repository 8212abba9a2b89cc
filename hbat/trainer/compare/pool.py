"""Running a plan: each run an `hbat train` process (or a worker for a seed's shared pieces and averaging curve),
through a pool that starts the first ready task of a dependency graph; finished runs are recognised for reuse."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from ..checkpoint import write_text_atomic
from ..run import EXIT_DIVERGED
from .plan import Job, Plan


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
