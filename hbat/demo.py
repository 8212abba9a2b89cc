"""`make demo` / `python -m hbat.demo`: the embedded default run of the trainer (`hbat train` with no config).

No download, CPU: a generated task whose two objectives conflict, a tiny Llama pre-trained on generated
text, then two-stage SFT -> DPO and HBAT side by side on one seed, ending with the summary table and a note
that one seed carries no claim: the claims rest on the committed multi-seed comparison. It runs with one torch
thread, as every run of `hbat compare` does, so its two rows are seed 0 of that comparison on the same machine.
Extra arguments are those of `hbat train` (e.g. `--set output_dir=runs/x`).
"""
import sys

import torch

from .trainer.run import main

NOTE = """\
One seed, one machine: this pair can come out either way on another seed, thread count or library version (see
the README, "Results on the embedded task"). The README's claims rest on the committed comparison of every method
over 5 seeds with 95% intervals, docs/results/compare-run/compare.md, of which these two rows are seed 0.
Reproduce it (about 45 minutes on 2 cores; a rerun reuses finished runs):

    python docs/results/make_results.py        # = hbat compare --seeds 5 --out runs/compare, then the README tables
"""

if __name__ == "__main__":
    torch.set_num_threads(1)  # as each run of `hbat compare`: the numbers of its seed 0, whatever the core count
    code = main(sys.argv[1:])
    print("\n" + NOTE)
    sys.exit(code)
