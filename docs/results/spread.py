"""The seed-to-seed spread of exact match of two methods, as docs/results/spread.md reports it.

    python docs/results/spread.py runs/spread-before/seed-{0,1,2,3,4}   # one compare.csv per seed (one seed each)
    python docs/results/spread.py runs/compare                        # a multi-seed `hbat compare` (compare.csv)

Prints, for each method and for their difference seed by seed: the values, the mean, the standard deviation over
seeds and the half-width of the 95% Student t-interval (hbat.trainer.stats), and whether a difference of 0.05
would lie outside that interval.
"""
from __future__ import annotations

import argparse
import csv
import math
import os

from hbat.trainer.stats import mean_interval, paired_difference


def read(folders: list[str], key: str) -> dict[str, dict[int, float]]:
    values: dict[str, dict[int, float]] = {}
    for i, folder in enumerate(folders):
        with open(os.path.join(folder, "compare.csv"), newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("status", "ok") != "ok" or not row.get(key):
                    continue
                seed = int(row["seed"]) if row.get("seed") else i
                values.setdefault(row["method"], {})[seed] = float(row[key])
    return values


def sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--methods", default="two_stage,hbat")
    parser.add_argument("--key", default="eval/exact_match")
    args = parser.parse_args(argv)
    a, b = args.methods.split(",")
    values = read(args.folders, args.key)
    seeds = sorted(set(values[a]) & set(values[b]))
    print(f"| {args.key} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd | 95% half-width | "
          "0.05 outside? |")
    print("|---|" + "---|" * (len(seeds) + 4))
    rows = [(a, [values[a][s] for s in seeds]), (b, [values[b][s] for s in seeds]),
            (f"{b} − {a}", [values[b][s] - values[a][s] for s in seeds])]
    for name, xs in rows:
        iv = paired_difference([values[b][s] for s in seeds], [values[a][s] for s in seeds]) \
            if "−" in name else mean_interval(xs)
        half = iv.half_width
        print(f"| {name} | " + " | ".join(f"{x:+.3f}" if "−" in name else f"{x:.3f}" for x in xs)
              + (f" | {iv.mean:+.3f}" if "−" in name else f" | {iv.mean:.3f}")
              + f" | {sd(xs):.3f} | {half:.3f} | {'yes' if half < 0.05 else 'no'} |")


if __name__ == "__main__":
    main()
