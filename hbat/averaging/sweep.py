"""A ratio sweep without checkpoints: evaluate a function on the averaged weights in memory, for many ratios.

    result = run_sweep(averager, [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, [0.2, 0.5, 0.9]], evaluate, data=batch,
                       maximize=["reward"], minimize=["forgetting"], table="sweep.json", plot="sweep.png")
    result.rows, result.front                      # the table, the Pareto front (row indices)

For each ratio the weights are averaged in place (one fused pass over this rank's slots, from a snapshot of
the current weights), ``evaluate(model, share)`` runs, and after the last ratio (or an error) the weights are
restored bit for bit from the snapshot. A ratio is the current model's weight (``hbat.averaging``), a
vector one ratio per block of layers (HMA).

Under sharding every rank evaluates its share of ``data``: the contiguous rows ``[r*n/w, (r+1)*n/w)`` of a
dict of tensors (or of a sequence, e.g. of batches); shares are equal so that every rank runs the same
number of forwards (ZeRO-3 / FSDP2 gather inside each). ``evaluate`` returns a dict of numbers (or one number,
``"value"``), the mean over its share; the results are averaged over the ranks weighted by share size, with
one all-reduce of a float64 vector per ratio. ``data=None``: every rank calls ``evaluate(model, None)`` and
the results are averaged.

Resumable: with ``table=PATH`` every finished row is written at once (atomically, by rank 0) with a
fingerprint of the sweep (the ratios, the objectives, the plan, and per-tensor sums of the weights and of the
start copy). A sweep started again on the same weights (e.g. after ``trainer.train(resume_from_checkpoint=)``)
reuses the rows in the table and evaluates only the rest; a table of another sweep is refused. The path must
be readable by every rank (a shared output folder).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from ..trainer.checkpoint import write_text_atomic
from .shards import split_share

__all__ = ["SweepResult", "run_sweep", "pareto_front", "evaluate_on_share", "share_of"]

TABLE_VERSION = 1


@dataclass
class SweepResult:
    """The sweep's table (one row per ratio: ``ratio`` and the metrics), its objectives and Pareto front."""

    rows: list[dict]
    objectives: dict[str, str]  # metric -> "max" or "min"
    front: list[int] = field(default_factory=list)  # indices of the rows no other row dominates
    reused: int = 0  # rows taken from a table a previous run wrote

    def front_rows(self) -> list[dict]:
        return [self.rows[i] for i in self.front]

    def to_dict(self) -> dict:
        return {"rows": self.rows, "objectives": self.objectives, "front": self.front, "reused": self.reused}

    def plot(self, path: str, x: str | None = None, y: str | None = None) -> str:
        """The trade-off as a PNG (matplotlib, Agg): two objectives against each other, or one against the
        ratio; the Pareto front joined and every point labelled with its ratio."""
        import matplotlib  # optional dependency (hbat[train]): only the plot needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = list(self.objectives) or sorted({k for r in self.rows for k in r if k != "ratio"})
        if not keys:
            raise ValueError("nothing to plot: the rows hold no metric")
        x = x or (keys[0] if len(keys) > 1 else "ratio")
        y = y or (keys[1] if len(keys) > 1 else keys[0])
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        points = [(_scalar(r[x]), _scalar(r[y]), _label(r["ratio"])) for r in self.rows]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="0.55", s=22, label="ratios")
        for px, py, text in points:
            ax.annotate(text, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = sorted((points[i] for i in self.front), key=lambda p: (p[0], p[1]))
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="tab:red", ms=4, label="Pareto front")
        ax.set_xlabel(f"{x} ({self.objectives[x]})" if x in self.objectives else x)
        ax.set_ylabel(f"{y} ({self.objectives[y]})" if y in self.objectives else y)
        ax.set_title("averaging ratio sweep (ratio = weight of the trained model)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _scalar(value) -> float:
    return float(sum(value) / len(value)) if isinstance(value, list) else float(value)  # a vector: its mean


def _label(ratio) -> str:
    return "[" + ",".join(f"{r:g}" for r in ratio) + "]" if isinstance(ratio, list) else f"{ratio:g}"


def pareto_front(rows: Sequence[dict], objectives: Mapping[str, str]) -> list[int]:
    """Indices of the rows that no other row dominates (at least as good in every objective, better in one).
    A row with a missing or NaN objective is never on the front."""
    if not objectives:
        return []
    sign = {k: (1.0 if d == "max" else -1.0) for k, d in objectives.items()}
    scores = []
    for row in rows:
        values = [row.get(k) for k in objectives]
        ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        scores.append([sign[k] * float(v) for k, v in zip(objectives, values)] if ok else None)
    front = []
    for i, a in enumerate(scores):
        if a is None:
            continue
        dominated = any(b is not None and j != i and all(bv >= av for av, bv in zip(a, b))
                        and any(bv > av for av, bv in zip(a, b)) for j, b in enumerate(scores))
        if not dominated:
            front.append(i)
    return front


def share_of(data, rank: int, world: int, what: str = "data"):
    """This rank's equal contiguous share of ``data`` (a dict of tensors with one batch dimension, a sequence),
    and its size. ``None`` stays None (size 1)."""
    if data is None:
        return None, 1
    if isinstance(data, Mapping):
        sizes = {k: v.shape[0] for k, v in data.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"{what} must be a dict of tensors with one common first (batch) dimension, got sizes "
                             f"{sizes or 'none'}")
        rows = split_share(next(iter(sizes.values())), rank, world, what)
        return {k: (v[rows] if k in sizes else v) for k, v in data.items()}, rows.stop - rows.start
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = split_share(len(data), rank, world, what)
        return data[rows], rows.stop - rows.start
    raise TypeError(f"{what} must be a dict of tensors, a sequence or None, not {type(data).__name__}")


def evaluate_on_share(shards, evaluate: Callable, module, share, size: int) -> dict[str, float]:
    """``evaluate(module, share)`` on this rank, averaged over the ranks weighted by share size."""
    result = evaluate(module, share)
    if not isinstance(result, Mapping):
        result = {"value": result}
    keys = sorted(result)
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"evaluate returned a non-str key {key!r}")
    values = []
    for key in keys:
        value = result[key]
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"evaluate returned {type(value).__name__} for {key!r}; it must return numbers")
        values.append(float(value))
    # the same keys on every rank, or every rank stops here (a mismatch would hang the next all-reduce)
    check = torch.tensor([len(keys), zlib.crc32("\0".join(keys).encode())], dtype=torch.float64)
    if shards.world > 1 and not torch.equal(shards.all_reduce_(check.clone()), check * shards.world):
        raise ValueError(f"evaluate returned other keys on rank {shards.rank} ({keys}) than on another rank")
    vec = torch.tensor([size * v for v in values] + [float(size)], dtype=torch.float64)
    vec = shards.all_reduce_(vec)
    return {k: float(v / vec[-1]) for k, v in zip(keys, vec[:-1])}


def _fingerprint(averager, ratios, objectives) -> dict:
    digest = hashlib.sha256(struct.pack(f"<{2 * len(averager.shards.unit_names)}d", *averager.shards.digest()))
    return {"ratios": ratios, "objectives": objectives, "plan": averager.describe(), "weights": digest.hexdigest()}


def _load_table(path: str, fingerprint: dict) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            table = json.load(fh)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ValueError(f"sweep table {path}: cannot be read ({type(exc).__name__}: {exc}); delete it to start over") \
            from None
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION or not isinstance(table.get("rows"), list):
        raise ValueError(f"sweep table {path}: not a hbat sweep table (version {TABLE_VERSION}); delete it or pass "
                         "another path")
    if table.get("fingerprint") != fingerprint:
        saved = table.get("fingerprint") or {}
        differ = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
        raise ValueError(f"sweep table {path} belongs to another sweep (its {', '.join(differ)} differ: other ratios, "
                         "objectives, plan or weights); delete it or pass another path")
    return table["rows"]


def run_sweep(averager, ratios, evaluate: Callable, *, data=None, maximize: Sequence[str] = (),
              minimize: Sequence[str] = (), table: str | None = None, plot: str | None = None,
              log: Callable[[dict], None] | None = None) -> SweepResult:
    """Evaluate ``evaluate(model, share)`` at every ratio on ``averager``'s averaged weights (see the module
    docstring); returns the table and its Pareto front over ``maximize`` / ``minimize``. Everything is checked
    before the first write; the weights are restored bit for bit, also when ``evaluate`` raises."""
    shards = averager.shards
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable (model, share) -> dict of numbers, not {type(evaluate).__name__}")
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios:
        raise ValueError("ratios must be a non-empty list of ratios (numbers, or per-block vectors)")
    ratios = [averager.check(r, what=f"ratios[{i}]") for i, r in enumerate(ratios)]
    objectives = {**{k: "max" for k in maximize}, **{k: "min" for k in minimize}}
    if len(objectives) != len(maximize) + len(minimize) or not all(isinstance(k, str) for k in objectives):
        raise ValueError(f"maximize {list(maximize)} and minimize {list(minimize)} must name distinct metrics")
    share, size = share_of(data, shards.rank, shards.world)
    weights = [shards.weights(averager.unit_weights(r)) for r in ratios]
    fingerprint = _fingerprint(averager, ratios, objectives) if table else None
    done = _load_table(table, fingerprint) if table else []
    rows: list[dict | None] = [None] * len(ratios)
    for row in done:
        index = row.get("index") if isinstance(row, dict) else None
        if isinstance(index, int) and 0 <= index < len(ratios) and row.get("ratio") == ratios[index]:
            rows[index] = {k: v for k, v in row.items() if k != "index"}
    reused = sum(r is not None for r in rows)

    module = averager.module
    was_training = module.training
    saved = shards.snapshot() if reused < len(ratios) else None
    try:
        module.eval()
        for i, ratio in enumerate(ratios):
            if rows[i] is not None:
                continue
            shards.blend_(weights[i], post=saved)
            with torch.no_grad():
                metrics = evaluate_on_share(shards, evaluate, module, share, size)
            missing = [k for k in objectives if k not in metrics]
            if missing:
                raise ValueError(f"evaluate returned no {missing[0]!r} (an objective); it returned {sorted(metrics)}")
            rows[i] = {"ratio": ratio, **metrics}
            if log is not None:
                log(rows[i])
            if table and shards.rank == 0:
                _write_table(table, fingerprint, rows)
    finally:
        if saved is not None:
            shards.restore_(saved)
        module.train(was_training)
    result = SweepResult(rows, objectives, pareto_front(rows, objectives), reused)
    if plot and shards.rank == 0:
        result.plot(plot)
    return result


def _write_table(path: str, fingerprint: dict, rows: list) -> None:
    done = [{"index": i, **row} for i, row in enumerate(rows) if row is not None]
    write_text_atomic(json.dumps({"version": TABLE_VERSION, "fingerprint": fingerprint, "rows": done}, indent=1), path)
