"""`hbat compare [SPEC]`: several methods on the same data, seeds and budget, as the paper's Tables 1 and 4.

A SPEC is a YAML file (default: the embedded comparison, ``DEFAULT_SPEC`` below):

    set: [model.size=small]                 # overrides shared by every run (hbat train --set ...)
    runs:                                   # a method name, or a mapping with its own name and overrides
      - two_stage
      - {name: hbat-paper, method: hbat, set: [ewc.importance_mode=paper]}
    hma: {pre: sft_only, aligned: two_stage, alphas: [0.0, 0.25, 0.5, 0.75, 1.0]}   # averaging curve (optional)

``hma.pre`` names the run whose model is the aligned run's starting point (``sft_only`` runs exactly the SFT
stage of ``two_stage``: same data, order and seed); without it, the shared SFT reference is used, which was
trained separately and is not on the aligned model's path. ``--reuse`` keeps every run whose folder holds a
result made with the same config (a comparison can be resumed, or the table and curve redone, without
retraining).

The shared pieces (base model, SFT reference, reward model) are built once; then every run is its own
``hbat train`` process (so its wall time and peak memory are its own), and its command line is written next
to its row. Outputs in the output folder: compare.md (the table and the commands), compare.csv, compare.png
(instruction following against reward, one point per method, the uniform-averaging curve as a line).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time

from .run import DIVERGED, EXIT_DIVERGED

DEFAULT_SPEC = {
    "set": ["output_dir=runs/compare"],
    "runs": ["sft_only", "two_stage", "rlhf_pt", "sft_hpa", "no_ewc", "no_alternation", "hbat",
             {"name": "hbat-paper", "method": "hbat", "set": ["ewc.importance_mode=paper"]},
             {"name": "hbat-released", "method": "hbat", "set": ["ewc.importance_mode=released"]},
             {"name": "hbat-proportional", "method": "hbat", "set": ["ewc.importance_mode=proportional"]},
             {"name": "hbat-uniform", "method": "hbat", "set": ["ewc.importance_mode=uniform"]},
             {"name": "hbat-lam100", "method": "hbat", "set": ["ewc.lam=100"]},
             # the same pair with twice the DPO learning rate: a larger alignment tax
             {"name": "two_stage-dpo6e-5", "method": "two_stage", "set": ["dpo.lr=6e-5"]},
             {"name": "hbat-dpo6e-5", "method": "hbat", "set": ["dpo.lr=6e-5"]},
             "freeze", "fisher"],
    "hma": {"pre": "sft_only", "aligned": "two_stage", "alphas": [0.0, 0.25, 0.5, 0.75, 1.0]},
}
COLUMNS = [("method", "method"), ("eval/exact_match", "exact match"), ("eval/sft_loss", "SFT loss (val)"),
           ("eval/preference", "preference"), ("eval/reward", "reward"), ("eval/win_rate", "win vs SFT"),
           ("eval/kl_to_sft", "KL to SFT"), ("wall_seconds", "wall s"), ("peak_rss_mib", "peak RSS MiB")]


def load_spec(path: str | None) -> dict:
    if path is None:
        return json.loads(json.dumps(DEFAULT_SPEC))
    from .config import read_yaml_file

    spec = read_yaml_file(path) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the compare spec must be a mapping with 'runs'")
    unknown = set(spec) - {"set", "runs", "hma"}
    if unknown:
        raise ValueError(f"{path}: unknown key {sorted(unknown)[0]!r}; valid keys: set, runs, hma")
    return spec


def normalise_runs(spec: dict) -> list[dict]:
    from .methods import spec as method_spec

    runs, names = [], set()
    for i, item in enumerate(spec.get("runs") or []):
        run = {"name": item, "method": item, "set": []} if isinstance(item, str) else dict(item)
        if not isinstance(run, dict) or "method" not in run:
            raise ValueError(f"runs[{i}] must be a method name or a mapping with 'method' (and 'name', 'set')")
        run.setdefault("name", run["method"])
        run.setdefault("set", [])
        method_spec(run["method"])  # unknown methods fail before anything runs
        if run["name"] in names:
            raise ValueError(f"runs[{i}]: the name {run['name']!r} is used twice")
        names.add(run["name"])
        runs.append(run)
    if not runs:
        raise ValueError("the compare spec has no runs")
    return runs


def run_command(run: dict, shared: list[str], extra: list[str]) -> list[str]:
    args = ["hbat", "train", "--no-progress", "--name", run["name"]]
    for override in list(shared) + list(extra) + [f"method={run['method']}"] + list(run["set"]):
        args += ["--set", override]
    return args


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


def plot(rows: list[dict], curve: list[dict], path: str, x="eval/reward", y="eval/exact_match") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    if curve:
        ax.plot([p[x] for p in curve], [p[y] for p in curve], "-o", color="0.6", ms=3,
                label="uniform averaging SFT/aligned (alpha 0..1)")
    points: dict[tuple, list[str]] = {}  # runs that land on the same point share one label
    for row in rows:
        if x in row and y in row:
            points.setdefault((round(row[x], 3), round(row[y], 3)), []).append(row["method"])
    for (px, py), names in points.items():
        ax.scatter(px, py, s=30)
        ax.annotate(" = ".join(names), (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("reward (reward model, validation)")
    ax.set_ylabel("exact match (instruction following, validation)")
    ax.set_title("alignment tax: instruction following vs reward")
    if curve:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(spec: dict, extra: list[str], out_dir: str | None, *, progress=True, reuse=False) -> list[dict]:
    from .checkpoint import write_text_atomic
    from .config import dump_config, load_config
    from .metrics import markdown_table
    from .validate import check_data
    from .workspace import load_data, prepare

    runs = normalise_runs(spec)
    hma = spec.get("hma")
    aligned, pre = None, None
    if hma:  # checked before anything runs
        aligned, pre = hma.get("aligned", "two_stage"), hma.get("pre")
        for key, value in (("aligned", aligned), ("pre", pre)):
            if value is not None and value not in [r["name"] for r in runs]:
                raise ValueError(f"hma.{key} {value!r} is not one of the runs")
    shared = list(spec.get("set") or [])
    if out_dir:
        shared.append(f"output_dir={out_dir}")
    base = load_config(None, shared + list(extra))
    run_configs = {run["name"]: load_config(None, shared + list(extra) + [f"method={run['method']}"] + list(run["set"]))
                   for run in runs}  # every run's config is valid before anything runs
    configs = {name: dump_config(cfg) for name, cfg in run_configs.items()}
    data = load_data(base)
    for cfg in run_configs.values():  # and so is its data (e.g. enough rows for its n_parts)
        check_data(data.splits, cfg, data.sources)
    print(f"hbat compare: {len(runs)} runs -> {base.output_dir}")
    started = time.perf_counter()
    ws = prepare(base, progress=progress, data=data)  # built once, cached for every run
    rows = []
    for i, run in enumerate(runs, 1):
        command = run_command(run, shared, extra)
        folder = os.path.join(base.output_dir, run["name"])
        wall_path = os.path.join(folder, "compare-wall.json")
        if reuse and _finished_with(base.output_dir, run["name"], configs[run["name"]], wall_path):
            print(f"[{i}/{len(runs)}] reusing {folder}", flush=True)
            with open(wall_path, encoding="utf-8") as fh:
                wall = json.load(fh)["wall_seconds"]
        else:
            print(f"[{i}/{len(runs)}] {shlex.join(command)}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "hbat.cli", *command[1:]], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode not in (0, EXIT_DIVERGED):  # a diverged run is a row; any other failure stops
                raise RuntimeError(f"run {run['name']!r} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            write_text_atomic(json.dumps({"wall_seconds": wall}), wall_path)
        with open(os.path.join(folder, "result.json"), encoding="utf-8") as fh:
            result = json.load(fh)
        row = {**result, "method": run["name"], "wall_seconds": round(wall), "command": shlex.join(command)}
        if result.get("status") == "diverged":
            print(f"    diverged: {result['error']}, {wall:.0f} s")
        else:
            row["peak_rss_mib"] = round(result["peak_rss_bytes"] / 2**20)
            print("    " + ", ".join(f"{k[5:]}={row[k]:.4f}" for k in row if k.startswith("eval/")) + f", {wall:.0f} s")
        rows.append(row)
    curve = []
    diverged = {r["method"] for r in rows if r.get("status") == "diverged"}
    if hma and diverged & {aligned, pre}:
        print(f"no averaging curve: {', '.join(sorted(diverged & {aligned, pre}))} diverged")
    elif hma:
        curve = hma_curve(ws, base, os.path.join(base.output_dir, aligned), hma.get("alphas", [0, 0.5, 1]),
                          os.path.join(base.output_dir, pre) if pre else None)
    out = base.output_dir
    table = markdown_table([_table_row(r) for r in rows], [c[1] for c in COLUMNS])
    curve_table = markdown_table([{"alpha": p["alpha"], **{k: p.get(k) for k in
                                   ("eval/exact_match", "eval/reward", "eval/win_rate", "eval/kl_to_sft")}}
                                  for p in curve], ["alpha", "eval/exact_match", "eval/reward", "eval/win_rate",
                                                    "eval/kl_to_sft"]) if curve else ""
    commands = "\n".join(f"- `{r['method']}`: `{r['command']}`" for r in rows)
    text = (f"# hbat compare\n\nAll runs: same seed, data, parts and step budget; each row is one `hbat train` "
            f"process. The runs took {sum(r['wall_seconds'] for r in rows):.0f} s of wall time in all "
            f"(this invocation: {time.perf_counter() - started:.0f} s).\n\n{table}\n\n"
            + (f"Uniform averaging of `{hma.get('pre') or 'the shared SFT model'}` and "
               f"`{hma.get('aligned', 'two_stage')}` (alpha = weight of the aligned model):\n\n{curve_table}\n\n"
               if curve else "")
            + f"Commands (run from the repository root):\n\n{commands}\n")
    write_text_atomic(text, os.path.join(out, "compare.md"))
    with open(os.path.join(out, "compare.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[c[0] for c in COLUMNS] + ["status", "command"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, curve, os.path.join(out, "compare.png"))
    print("\n" + table)
    return rows


def _table_row(row: dict) -> dict:
    """A row of compare.md: a diverged run shows "diverged" in its metric columns."""
    cells = {label: row.get(key) for key, label in COLUMNS}
    if row.get("status") == "diverged":
        cells.update({label: DIVERGED for key, label in COLUMNS if key.startswith("eval/")})
    return cells


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("spec", nargs="?", help="compare spec YAML (default: the embedded comparison)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every run (after the spec's own)")
    parser.add_argument("--out", help="output folder (default: the spec's output_dir)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs already finished in the output folder with the same config")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _finished_with(out_dir: str, name: str, config: str, wall_path: str) -> bool:
    """A run can be reused when its result, its wall time and a config identical to ``config`` are on disk."""
    paths = [os.path.join(out_dir, name, "result.json"), wall_path, os.path.join(out_dir, f"config-{name}.yaml")]
    if not all(os.path.exists(p) for p in paths):
        return False
    with open(paths[2], encoding="utf-8") as fh:
        return fh.read() == config


def run(args) -> int:
    rows = compare(load_spec(args.spec), args.overrides, args.out, progress=not args.no_progress, reuse=args.reuse)
    return EXIT_DIVERGED if any(r.get("status") == "diverged" for r in rows) else 0
