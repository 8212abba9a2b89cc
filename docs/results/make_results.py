"""The committed comparison, in one command: run it, copy it here, and put its tables into the README.

    python docs/results/make_results.py            # = hbat compare --seeds 5 --out runs/compare, then publish
    python docs/results/make_results.py --check    # the README's tables are those of docs/results/compare-run

1. ``hbat compare --seeds 5 --out runs/compare`` on the default spec (extra arguments go to it, e.g. ``--jobs 4``);
   a rerun reuses every finished run (same config, thread count and code), so an interrupted one continues;
2. copies compare.md, compare.csv, compare.json, compare.png and curves.png into docs/results/compare-run/;
3. replaces each block ``<!-- compare:NAME -->`` ... ``<!-- /compare:NAME -->`` of README.md with the block of
   the same name in compare.md (the table of means with intervals, the paired differences, the averaging
   curve, the significant differences), so the README's cells are the command's cells.

Run it from the repository root, with the .venv's python (or wherever hbat is installed).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "docs", "results", "compare-run")
README = os.path.join(ROOT, "README.md")
FILES = ("compare.md", "compare.csv", "compare.json", "compare.png", "curves.png")
BLOCK = re.compile(r"<!-- compare:(?P<name>[a-z]+) -->\n.*?<!-- /compare:(?P=name) -->", re.S)


def blocks(text: str) -> dict[str, str]:
    return {m.group("name"): m.group(0) for m in BLOCK.finditer(text)}


def fill(readme: str, source: str) -> tuple[str, list[str]]:
    """``readme`` with every compare block replaced by ``source``'s; returns the names of the blocks replaced."""
    found = blocks(source)
    wanted = [m.group("name") for m in BLOCK.finditer(readme)]
    missing = [name for name in wanted if name not in found]
    if missing:
        raise SystemExit(f"make_results: compare.md has no block {missing[0]!r} that README.md has")
    return BLOCK.sub(lambda m: found[m.group("name")], readme), wanted


def check() -> int:
    with open(README, encoding="utf-8") as fh:
        readme = fh.read()
    with open(os.path.join(RESULTS, "compare.md"), encoding="utf-8") as fh:
        source = fh.read()
    filled, names = fill(readme, source)
    if filled != readme:
        print("make_results --check: README.md's compare blocks differ from docs/results/compare-run/compare.md; "
              "run python docs/results/make_results.py", file=sys.stderr)
        return 1
    print(f"README.md's blocks {', '.join(names)} are those of docs/results/compare-run/compare.md")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the README against the committed results")
    parser.add_argument("--out", default="runs/compare", help="where hbat compare runs (default: runs/compare)")
    parser.add_argument("--seeds", type=int, default=5)
    args, extra = parser.parse_known_args(argv)
    if args.check:
        return check()
    command = [sys.executable, "-m", "hbat.cli", "compare", "--seeds", str(args.seeds), "--out", args.out,
               "--no-progress", *extra]
    print("make_results:", " ".join(["hbat"] + command[3:]), flush=True)
    started = time.perf_counter()
    code = subprocess.call(command, cwd=ROOT)
    if code not in (0, 3):  # 3: a run diverged; it is a row of the table
        return code
    out = os.path.join(ROOT, args.out)
    os.makedirs(RESULTS, exist_ok=True)
    for name in FILES:
        shutil.copyfile(os.path.join(out, name), os.path.join(RESULTS, name))
    with open(README, encoding="utf-8") as fh:
        readme = fh.read()
    with open(os.path.join(RESULTS, "compare.md"), encoding="utf-8") as fh:
        filled, names = fill(readme, fh.read())
    with open(README, "w", encoding="utf-8") as fh:
        fh.write(filled)
    print(f"make_results: {', '.join(FILES)} -> docs/results/compare-run/; README.md blocks {', '.join(names)} "
          f"replaced ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
