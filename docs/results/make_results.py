"""The committed comparison, in one command: run it, copy it here, and put its tables into the README and docs.

    python docs/results/make_results.py            # = hbat compare --seeds 5 --out runs/compare, then publish
    python docs/results/make_results.py --check    # the README's and docs' tables are those of docs/results/compare-run

1. ``hbat compare --seeds 5 --out runs/compare`` on the default spec (extra arguments go to it, e.g. ``--jobs 4``);
   a rerun reuses every finished run (same config, thread count and code), so an interrupted one continues;
2. copies compare.md, compare.csv, compare.json, compare.png and curves.png into docs/results/compare-run/;
3. replaces each block ``<!-- compare:NAME -->`` ... ``<!-- /compare:NAME -->`` of README.md and of every
   docs/*.md page that has such blocks with the block of the same name in compare.md (the table of means with
   intervals, the paired differences, the averaging curve, the significant differences), so the cells of the
   README and of the docs are the command's cells. A block name that compare.md lacks is an error.

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
DOCS = os.path.join(ROOT, "docs")
FILES = ("compare.md", "compare.csv", "compare.json", "compare.png", "curves.png")
BLOCK = re.compile(r"<!-- compare:(?P<name>[a-z]+) -->\n.*?<!-- /compare:(?P=name) -->", re.S)


def blocks(text: str) -> dict[str, str]:
    return {m.group("name"): m.group(0) for m in BLOCK.finditer(text)}


def fill(readme: str, source: str, name: str = "README.md") -> tuple[str, list[str]]:
    """``readme`` (the text of README.md or of a docs page, ``name``) with every compare block replaced by
    ``source``'s; returns the names of the blocks replaced."""
    found = blocks(source)
    wanted = [m.group("name") for m in BLOCK.finditer(readme)]
    missing = [block for block in wanted if block not in found]
    if missing:
        raise SystemExit(f"make_results: compare.md has no block {missing[0]!r} that {name} has")
    return BLOCK.sub(lambda m: found[m.group("name")], readme), wanted


def targets() -> list[str]:
    """README.md and every docs/*.md page that has a compare block (relative to the repository root)."""
    pages = [README] + sorted(os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))
    found = []
    for path in pages:
        with open(path, encoding="utf-8") as fh:
            if path == README or BLOCK.search(fh.read()):
                found.append(os.path.relpath(path, ROOT))
    return found


def check() -> int:
    with open(os.path.join(RESULTS, "compare.md"), encoding="utf-8") as fh:
        source = fh.read()
    stale, done = [], []
    for rel in targets():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
            text = fh.read()
        filled, names = fill(text, source, rel)
        (stale if filled != text else done).append(f"{rel} ({', '.join(names) or 'no blocks'})")
    if stale:
        print(f"make_results --check: the compare blocks of {', '.join(stale)} differ from "
              "docs/results/compare-run/compare.md; run python docs/results/make_results.py", file=sys.stderr)
        return 1
    print(f"the blocks of {', '.join(done)} are those of docs/results/compare-run/compare.md")
    return 0


def publish(source: str) -> list[str]:
    """Fill the blocks of README.md and of every docs page that has them; returns what was filled.
    Every file is checked before any is written, so a missing block changes nothing."""
    filled = {}
    for rel in targets():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
            filled[rel] = fill(fh.read(), source, rel)
    for rel, (text, _) in filled.items():
        with open(os.path.join(ROOT, rel), "w", encoding="utf-8") as fh:
            fh.write(text)
    return [f"{rel} ({', '.join(names)})" for rel, (_, names) in filled.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check the README and docs against the committed results")
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
    with open(os.path.join(RESULTS, "compare.md"), encoding="utf-8") as fh:
        replaced = publish(fh.read())
    print(f"make_results: {', '.join(FILES)} -> docs/results/compare-run/; blocks replaced in "
          f"{', '.join(replaced)} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
