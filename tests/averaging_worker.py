"""AveragingCallback in transformers.Trainer under DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 on 2 CPU ranks: the
per-rank program of ``tests/test_averaging_sharded.py`` and the one-process reference it is compared with.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/averaging_worker.py --out DIR SETUP...

Every setup trains the tiny Llama of ``callback_worker`` (odd sizes: ZeRO-1/2 fragments straddle the ranks) for
STEPS optimizer steps with an AveragingCallback (its method per setup; averaging after step EVERY and at the end;
the forgetting meter every KL_EVERY steps; checkpoints every SAVE_STEPS) and a sweep at the end of training that
crashes at its ratio CRASH_AT. Then, still in the same processes:

* the weights after the crash are compared bit for bit with the weights before the sweep (exact restore);
* with the callback still bound, ``start_weights()`` gives the start model (the EMA anchor with method "ema"),
  ``averaged(r)`` for a uniform ratio, an ExPO ratio and a per-block vector is compared with the same ``lerp_``
  on the gathered full tensors in one process, and the weights after each block with those before (exact
  restores);
* a new Trainer resumes from the last checkpoint (0 steps left): the sweep reuses the rows of its table, finishes,
  and the final averaging runs.

Every write to the weights (``WeightShards`` blend_ / restore_ / swap_ / ema_ / snapshot) runs inside
``record_collectives(forbid=GATHERS)``: a gather raises; the log of what they communicated is returned. Rank 0
writes DIR/<setup>.pt. ``refused`` (in the same launch): DeepSpeed without ZeRO fails at train() start.
"""
from __future__ import annotations

import argparse
import os

import torch

import callback_worker as W  # the shared tiny model, data and gathering helpers (tests/ is on sys.path)

WORLD, MICRO_BATCH, GRAD_ACCUM, STEPS = 2, 2, 2, 4
EVERY, KL_EVERY, SAVE_STEPS, CRASH_AT = 3, 2, 2, 2
ROWS = WORLD * MICRO_BATCH * GRAD_ACCUM * STEPS
SWEEP = [0.0, 0.5, 1.0, 1.5, [0.2, 0.8]]  # the last: one ratio per block (2 blocks of 1 layer)
CHECKS = [0.5, 1.5, [0.2, 0.8]]  # uniform, ExPO, per block
PERSIST = {"stage3_param_persistence_threshold": 100000}  # DeepSpeed's default: every tensor of the tiny model persists
SETUPS = {  # name: (callback keyword arguments, sharding)
    "ddp": ({"method": "expo", "alpha": 0.5}, {}),
    "fsdp2": ({"method": "hma", "ratios": [0.3, 0.9]}, {"fsdp": "full_shard", "fsdp_config": {
        "version": 2, "auto_wrap_policy": "NO_WRAP", "state_dict_type": "SHARDED_STATE_DICT"}}),
    "zero1": ({"method": "hma", "ratios": [0.3, 0.9]}, {"deepspeed": {"stage": 1}}),
    "zero2": ({"method": "uniform", "alpha": 0.4}, {"deepspeed": {"stage": 2}}),
    "zero2-offload": ({"method": "expo", "alpha": 0.5},
                      {"deepspeed": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}),
    "zero3": ({"method": "ema", "alpha": 0.5}, {"deepspeed": {"stage": 3}}),
    "zero3-persist": ({"method": "uniform", "alpha": 0.4}, {"deepspeed": {"stage": 3, **PERSIST}}),
}
WRITES = ("blend_", "restore_", "swap_", "ema_", "snapshot")


def data(seed: int, rows: int = ROWS) -> torch.Tensor:
    g = torch.Generator().manual_seed(300 + seed)
    return torch.randint(4, 4 + len(W.ALPHABET), (rows, 9), generator=g)


def kl_batch() -> dict:
    ids = data(7, 4)
    return {"input_ids": ids, "labels": ids}


def sweep_data() -> dict:
    return {"new": data(0, 8), "old": data(9, 8)}  # the task's rows and rows of "another task"


def make_evaluate(crash_at=None):
    calls = []

    def evaluate(model, share):
        calls.append(len(calls))
        if crash_at is not None and len(calls) == crash_at + 1:
            raise RuntimeError("planned crash in the middle of the sweep")
        new = model(input_ids=share["new"], labels=share["new"]).loss
        old = model(input_ids=share["old"], labels=share["old"]).loss
        return {"loss_new": float(new), "loss_old": float(old)}

    return evaluate, calls


def training_args(out: str, world: int, sharding: dict, **overrides):
    from transformers import TrainingArguments

    common = dict(output_dir=out, per_device_train_batch_size=MICRO_BATCH * WORLD // world,
                  gradient_accumulation_steps=GRAD_ACCUM, max_steps=STEPS, learning_rate=W.LR,
                  lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=W.CLIP, adam_epsilon=1e-6,
                  logging_steps=1, save_strategy="steps", save_steps=SAVE_STEPS, report_to="none", use_cpu=True,
                  disable_tqdm=True, seed=0, train_sampling_strategy="sequential", dataloader_num_workers=0,
                  bf16=False)
    common.update(overrides)
    if world > 1 and "deepspeed" in sharding:
        common["deepspeed"] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                               "train_batch_size": "auto", "gradient_clipping": "auto",
                               "zero_optimization": {**W.ZERO, **sharding["deepspeed"]},
                               "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    elif world > 1:
        common.update(sharding)
    return TrainingArguments(**common)


def make_callback(kwargs: dict, table: str, evaluate, record=None):
    from hbat import AveragingCallback

    class Guarded(AveragingCallback):
        def on_train_begin(self, *args, **kw):
            super().on_train_begin(*args, **kw)
            shards = self.prepared.shards
            for name in WRITES if record is not None else ():
                setattr(shards, name, record(name, getattr(shards, name)))

    return Guarded(**kwargs, blocks=2, every=EVERY, kl_batch=kl_batch(), kl_every=KL_EVERY,
                   sweep=dict(ratios=SWEEP, evaluate=evaluate, data=sweep_data(), minimize=["loss_new", "loss_old"],
                              table=table))


class BeforeSweep:
    """A callback (placed before the AveragingCallback) that keeps the gathered weights at on_train_end."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Keep(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                outer.params = W.full_params(model)

        self.callback, self.params = Keep(), None


def expected(base: dict, params: dict, prepared, ratio) -> dict:
    """``ratio`` applied to the gathered full tensors in one process, with the same op."""
    from hbat import ops

    weights = prepared.averager.unit_weights(ratio)
    index = {name: i for i, name in enumerate(prepared.shards.unit_names)}
    out = {n: p.clone() for n, p in params.items()}
    names = [n for n in params if n in index]
    ops.lerp_([out[n] for n in names], [base[n] for n in names], [params[n] for n in names],
              weights[[index[n] for n in names]])
    return out


def run(setup: str, out: str, *, world: int, record=None) -> dict:
    """Train with the crash in the sweep, check the restores, resume; with world=1 the uninterrupted reference."""
    from transformers import Trainer

    from hbat.integrations.transformers import release_trainer

    kwargs, sharding = SETUPS[setup]
    folder = os.path.join(out, f"{setup}-w{world}")
    table = os.path.join(folder, "sweep.json")
    base = W.load_model(os.path.join(out, "base"))
    rows = [{"input_ids": r, "labels": r} for r in data(1)]
    evaluate, calls = make_evaluate(CRASH_AT if world > 1 else None)
    callback = make_callback(kwargs, table, evaluate, record)
    keep = BeforeSweep()
    trainer = Trainer(model=base, args=training_args(folder, world, sharding), train_dataset=rows,
                      callbacks=[keep.callback, callback])
    try:
        trainer.train()
        crashed = None
    except RuntimeError as error:
        crashed = str(error)
    result = {"shards": W.sharding_of(trainer.model) if world > 1 else "full"}
    logs = [{k: e[k] for k in ("loss", "ewc/kl_to_start", "ewc/kl_to_start_reverse", "ewc/kl_to_anchor",
                                 "ewc/kl_to_anchor_reverse") if k in e} for e in trainer.state.log_history]
    result.update(crashed=crashed, logs=logs, start_bytes=callback.prepared.shards.start_bytes,
                  kind=callback.prepared.shards.kind,
                  files=sorted(f for f in os.listdir(os.path.join(folder, f"checkpoint-{STEPS}")) if "average" in f))
    if world == 1:  # the reference: uninterrupted
        shards = callback.prepared.shards
        result.update(table=callback.sweep_result.rows, front=callback.sweep_result.front, calls=len(calls),
                      params=W.full_params(trainer.model), final_logs=callback.final_metrics,
                      start={n: t.clone() for n, t in zip(shards.unit_names, shards.start)})
        return result
    prepared = callback.prepared
    after_crash = W.full_params(trainer.model)
    result["restored_after_crash"] = all(torch.equal(after_crash[n], p) for n, p in keep.params.items())
    with prepared.averager.start_weights():  # the start model (with method "ema": the EMA anchor)
        start = W.full_params(trainer.model)
    restored = W.full_params(trainer.model)
    result.update(start=start, restored_after_swap=all(torch.equal(restored[n], after_crash[n]) for n in after_crash))
    checks = []
    for ratio in CHECKS:
        with prepared.averager.averaged(ratio):
            got = W.full_params(trainer.model)
        want = expected(start, after_crash, prepared, ratio)
        restored = W.full_params(trainer.model)
        checks.append({"ratio": ratio, "max_error": max(float((got[n] - want[n]).abs().max()) for n in want),
                       "exact": all(torch.equal(got[n], want[n]) for n in want),
                       "restored": all(torch.equal(restored[n], after_crash[n]) for n in after_crash)})
    result["checks"] = checks
    release_trainer(trainer)
    _reset_accelerate()

    # a fresh model, callback and Trainer resume from the last checkpoint: no step left, the sweep finishes
    model = W.load_model(os.path.join(out, "base"))
    evaluate, calls = make_evaluate()
    callback = make_callback(kwargs, table, evaluate, record)
    trainer = Trainer(model=model, args=training_args(folder, world, sharding), train_dataset=rows,
                      callbacks=[callback])
    trainer.train(resume_from_checkpoint=os.path.join(folder, f"checkpoint-{STEPS}"))
    result.update(table=callback.sweep_result.rows, front=callback.sweep_result.front, calls=len(calls),
                  reused=callback.sweep_result.reused, params=W.full_params(trainer.model),
                  final_logs=callback.final_metrics)
    release_trainer(trainer)
    return result


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state()
    GradientState._reset_state()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def refusal(out: str) -> dict:
    """DeepSpeed without ZeRO fails at train() start, before any step or change."""
    from transformers import Trainer

    from hbat import AveragingCallback
    from hbat.integrations.transformers import release_trainer

    args = training_args(os.path.join(out, "refused"), WORLD, {"deepspeed": {"stage": 0}}, save_strategy="no")
    model = W.load_model(os.path.join(out, "base"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = AveragingCallback("uniform", 0.5)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in data(1)],
                      callbacks=[callback])
    try:
        trainer.train()
        message = None
    except NotImplementedError as error:
        message = str(error)
    unchanged = all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    release_trainer(trainer)
    return {"message": message, "unchanged": unchanged, "steps": trainer.state.global_step,
            "prepared": callback.prepared is not None}


def main(out: str, setups: list[str]) -> None:
    import deepspeed

    from hbat.distributed import GATHERS, record_collectives

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo alone (no minute-long op build)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    for setup in setups:
        comm = []

        def record(name, fn):
            def guarded(*args, **kwargs):
                with record_collectives(forbid=GATHERS) as log:  # a gather raises, on every rank
                    value = fn(*args, **kwargs)
                comm.append((name, list(log.calls)))
                return value

            return guarded

        restore = W.force_fsdp_on_cpu() if setup == "fsdp2" else (lambda: None)
        try:
            result = run(setup, out, world=WORLD, record=record)
        finally:
            restore()
            _reset_accelerate()
        total = torch.tensor([result["start_bytes"]], dtype=torch.long)
        torch.distributed.all_reduce(total)
        result.update(comm=comm, start_bytes_total=int(total))
        if rank == 0:
            torch.save(result, os.path.join(out, f"{setup}.pt"))
        torch.distributed.barrier()
    refused = refusal(out)
    if rank == 0:
        torch.save(refused, os.path.join(out, "refused.pt"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("setups", nargs="+", choices=sorted(SETUPS))
    cli = parser.parse_args()
    main(cli.out, cli.setups)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    from hbat.trainer.engine import exit_process

    exit_process(0)  # no interpreter finalization: DeepSpeed's gloo groups outlive destroy_process_group
