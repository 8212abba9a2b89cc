"""Write docs/results/seeds.md: the seeds table (each seed's rows of `hbat compare` and their means) followed
by the compare.md of every seed but the first.

    python docs/results/seeds_table.py 0=docs/results/compare-run 1=runs/seed-1 2=runs/seed-2 \
        --date 2026-11-30 > docs/results/seeds.md
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch

METHODS = ("sft_only", "two_stage", "no_ewc", "hbat")  # docs/results/seeds.yaml
COLUMNS = (("exact match", "eval/exact_match", 3), ("preference", "eval/preference", 3),
           ("reward", "eval/reward", 2), ("win vs SFT", "eval/win_rate", 3), ("KL to SFT", "eval/kl_to_sft", 2))


def read_rows(folder: str) -> dict[str, dict]:
    with open(os.path.join(folder, "compare.csv"), newline="") as fh:
        return {row["method"]: row for row in csv.DictReader(fh)}


def table(runs: dict[int, dict[str, dict]]) -> list[str]:
    lines = ["| method | seed | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for method in METHODS:
        values = {seed: [float(rows[method][key]) for _, key, _ in COLUMNS] for seed, rows in runs.items()}
        for seed, row in values.items():
            lines.append(f"| {method} | {seed} | " + " | ".join(f"{v:.{d}f}" for v, (_, _, d) in zip(row, COLUMNS))
                         + " |")
        means = [sum(col) / len(col) for col in zip(*values.values())]
        lines.append(f"| **{method}** | mean | " + " | ".join(f"**{v:.{d}f}**" for v, (_, _, d) in zip(means, COLUMNS))
                     + " |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="SEED=FOLDER of one `hbat compare` output each; the first is seed 0's")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = parser.parse_args(argv)
    folders = dict(item.split("=", 1) for item in args.runs)
    runs = {int(seed): read_rows(folder) for seed, folder in folders.items()}
    first, *others = folders
    out = ["# The demo pair and the no-EWC ablation on three seeds", "",
           f"Seed {first}: `hbat compare` (docs/results/compare-run/compare.md). Seeds {' and '.join(others)}:", "",
           "```bash"]
    out += [f"hbat compare docs/results/seeds.yaml --set seed={seed} --out {folders[seed]}" for seed in others]
    out += ["```", "", f"{args.date}, {os.cpu_count()}-core CPU, torch {torch.__version__}. "
            f"Means are over the {len(runs)} seeds (python docs/results/seeds_table.py "
            f"{' '.join(args.runs)}).", ""]
    out += table(runs)
    for seed in others:
        with open(os.path.join(folders[seed], "compare.md")) as fh:
            text = fh.read()
        out.append(f"## seed {seed}: compare.md")
        out.append(text.split("\n", 1)[1].rstrip("\n"))  # without its own title
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
