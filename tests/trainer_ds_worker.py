"""The trainer under DeepSpeed: the per-rank program ``tests/test_trainer_deepspeed.py`` launches, and the shared
tiny workspace and config of the DeepSpeed run and its single-process reference.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/trainer_ds_worker.py \
        --out DIR --deepspeed DS.json [--set key=value ...] [--crash-in-hpa N] [--resume]

Every rank builds the same tiny workspace (deterministic, no cache needed) and runs ``run_method``; rank 0
writes the checkpoint and metrics under DIR.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

# the global batch of each stage does not split evenly over 2 ranks x 2 micro-batches in DPO (6 pairs: one
# rank runs a zero-weighted micro-batch), and does in SFT (8 rows)
OVERRIDES = ["model.size=tiny", "model.pretrain_steps=0", "method=hbat", "n_parts=2", "keep=last",
             "save_model=false", "sft.batch_size=8", "sft.grad_accum_steps=2", "sft.max_steps=3",
             "dpo.batch_size=6", "dpo.grad_accum_steps=2", "dpo.max_steps=3", "ewc.lam=50",
             "eval.kl_samples=0", "eval.max_new_tokens=4", "eval.batch_size=8"]
SIMULATED_CRASH = "trainer_ds_worker: simulated crash"  # printed before the crash, so a test can tell it apart


def ds_config(stage: int, bf16: bool = False) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000}
    if stage == 3:  # partition every parameter of the tiny model (by default small ones stay whole on each rank)
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=2000)
    return {"zero_optimization": zero, **({"bf16": {"enabled": True}} if bf16 else {})}


def tiny_workspace(dtype: torch.dtype = torch.float32):
    """The tiny workspace of these tests and tests/test_trainer_loop.py: no pre-training, an untrained reward model,
    every model in ``dtype`` (as ``prepare`` makes them for ``model.dtype``)."""
    from hbat.task import build_model, build_tokenizer, make_task
    from hbat.trainer.reward import RewardModel
    from hbat.trainer.workspace import Workspace

    task = make_task(seed=0, n_sft=48, n_pref=48, n_prompts=16, n_val=8, n_pretrain=0)
    tokenizer = build_tokenizer()
    base = build_model(tokenizer, size="tiny", seed=0).to(dtype)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    def build():
        model = build_model(tokenizer, size="tiny", seed=0).to(dtype)
        model.load_state_dict(base_state)
        return model

    sft_model = build().eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # the same (untrained) judge in every process
        torch.manual_seed(0)
        rm = RewardModel.from_causal_lm(sft_model).eval().requires_grad_(False)
    return Workspace(tokenizer=tokenizer, base_state=base_state, build=build, sft_train=task.sft_train,
                     sft_val=task.sft_val, pref_train=task.pref_train, pref_val=task.pref_val,
                     prompts_train=task.prompts_train, prompts_val=task.prompts_val, sft_model=sft_model,
                     reward_model=rm, device=torch.device("cpu"), exact_match=task.exact_match,
                     preference_score=task.preference_score, info=task.stats())


def make_config(out: str, extra=(), deepspeed: str | None = None):
    from hbat.trainer.config import load_config

    overrides = OVERRIDES + [f"output_dir={out}", *extra]
    if deepspeed is not None:
        overrides.append(f"deepspeed={deepspeed}")
    return load_config(None, overrides)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--crash-in-hpa", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hbat.trainer import algorithm, engine
    from hbat.trainer.models import resolve_dtype

    if args.crash_in_hpa:  # simulate a crash (every rank) at the start of the N-th HPA stage
        real_loop, calls = algorithm.train_loop, []

        def crashing_loop(model, objective, *a, **kw):  # inside the HPA stage, after its boundary
            if objective.desc == "dpo":
                calls.append(1)
                if len(calls) == args.crash_in_hpa:
                    print(SIMULATED_CRASH, flush=True)
                    raise SystemExit(3)
            return real_loop(model, objective, *a, **kw)

        algorithm.train_loop = crashing_loop
    cfg = make_config(args.out, args.extra, args.deepspeed)
    algorithm.run_method(tiny_workspace(resolve_dtype(cfg)), cfg, progress=False, resume=args.resume)
    engine.shutdown_distributed()
    engine.exit_process(0)  # no interpreter finalization: DeepSpeed's gloo groups outlive the shutdown


if __name__ == "__main__":
    main()
