"""The cost of hbat train's forgetting meter (eval.kl_to_start_every): training time with the meter off and on,
measured side by side (interleaved repeats, one thread) on the tests' tiny model: 20 SFT + 20 DPO steps of 8 rows,
16 held-out rows per measurement.

    python benchmarks/bench_forgetting.py [--repeats 3]

Prints the median ``train_seconds`` of each setting and its ratio to the meter off.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from hf_fixtures import TINY  # noqa: E402  (the tests' tiny settings and workspace)
from trainer_ds_worker import tiny_workspace  # noqa: E402

from hbat.trainer import algorithm  # noqa: E402
from hbat.trainer.config import load_config  # noqa: E402

SETTINGS = (0, 10, 1)  # eval.kl_to_start_every


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ws = tiny_workspace()
    seconds: dict[int, list[float]] = {every: [] for every in SETTINGS}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for every in SETTINGS:
                cfg = load_config(None, TINY + [f"output_dir={folder}/{repeat}-{every}", "method=two_stage", "n_parts=1",
                                                "eval.kl_samples=0", "sft.max_steps=20", "dpo.max_steps=20",
                                                f"eval.kl_to_start_every={every}"])
                seconds[every].append(algorithm.run_method(ws, cfg, progress=False)["train_seconds"])
    base = statistics.median(seconds[0])
    print("| eval.kl_to_start_every | train_seconds (median) | ratio to off |\n|---|---|---|")
    for every in SETTINGS:
        median = statistics.median(seconds[every])
        print(f"| {every or 'off'} | {median:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
