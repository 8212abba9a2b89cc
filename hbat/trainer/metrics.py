"""Where metrics go: ``metrics.jsonl`` in the output folder, TensorBoard when installed, and the console."""
from __future__ import annotations

import json
import math
import os
import time

from ..errors import writing
from .checkpoint import write_text_atomic


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends one JSON object per call to ``<folder>/metrics.jsonl``; context keys (method, stage, part)
    are added to every record. ``step`` counts logged optimizer steps over the whole run.

    A fresh logger (``resume_step=None``) empties the file. A resumed one keeps the records up to
    ``resume_step`` (the checkpoint's) and drops the rest, which the resumed run logs again, and a line a
    kill cut short. TensorBoard is told to purge the events after that step (all of them for a fresh one)."""

    def __init__(self, folder: str, *, tensorboard: bool = True, console: bool = False,
                 resume_step: int | None = None):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "metrics.jsonl")
        self.context: dict = {}
        self.step = resume_step or 0
        self.console = console
        kept = _records_up_to(self.path, resume_step) if resume_step is not None else []
        write_text_atomic("".join(line + "\n" for line in kept), self.path)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

                self.writer = SummaryWriter(os.path.join(folder, "tensorboard"), purge_step=self.step + 1)
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.writer = None

    def __call__(self, metrics: dict) -> None:
        self.step += 1
        record = {"time": round(time.time(), 3), "step": self.step, **self.context,
                  **{k: _plain(v) for k, v in metrics.items()}}
        with writing(self.path), open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step"):
                    self.writer.add_scalar(key, value, self.step)
        if self.console:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _records_up_to(path: str, step: int) -> list[str]:
    """The lines of ``path`` that are whole records with ``step <= step``."""
    kept = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                    kept.append(line.rstrip("\n"))
    except FileNotFoundError:
        pass
    return kept


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def markdown_table(rows: list[dict], columns: list[str], *, floatfmt: str = ".4f") -> str:
    """A GitHub markdown table of ``rows`` (dicts) restricted to ``columns``; missing values show as "-"."""
    def cell(value):
        if isinstance(value, float):
            return format(value, floatfmt)
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
