"""HybridEWCCallback in transformers.Trainer and TRL's DPOTrainer, sharded: the per-rank program of
``tests/test_callback_sharded.py`` and the single-process reference it is compared with.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/callback_worker.py \
        --out DIR --phase run|resume SETUP [SETUP ...]

Every setup trains the same tiny Llama (from DIR/base) through Algorithm 1 with one Trainer per stage
(``PLAN``): the callback's ``objective`` starts each stage, clipping bites, gradient accumulation 2, AdamW.
``run`` trains uninterrupted and saves a checkpoint in the middle of the second stage; ``resume`` starts
from that checkpoint in fresh processes and finishes the plan. Rank 0 writes DIR/<setup>-<phase>.pt: the
final weights (gathered for the comparison only), the logged ``ewc/penalty`` / ``grad_norm`` per step, the
collectives of every HybridEWC call (guarded: a gather raises), and how the parameters were sharded; ``run``
also writes DIR/refused.pt (a setting the callback refuses at train() start). ``accelerate-zero2`` is the
accelerate loop of docs/drop-in.md with ``prepare_ewc`` instead of a Trainer.
"""
from __future__ import annotations

import argparse
import os

import torch

WORLD = 2
MICRO_BATCH, GRAD_ACCUM, STEPS = 2, 2, 3  # per rank; a stage is STEPS optimizer steps
ROWS = WORLD * MICRO_BATCH * GRAD_ACCUM * STEPS  # rows of each stage's data
ALPHABET = "ab q:0123456789"
F_MAX, LAM, SCALE, LR, CLIP = 1e2, 1.0, 1.0, 1e-2, 0.05
SAVE_STAGE = 1  # the checkpoint after the first step of this stage is what "resume" starts from
# objective and data of each stage; "hpa" is DPOTrainer in the dpo-* setups, a second LM data set otherwise
PLAN = (("ifa", "lm", 0), ("hpa", "hpa", 1), ("ifa", "lm", 2))
ZERO = {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": 500, "stage3_prefetch_bucket_size": 500}
SETUPS = {  # name: (hpa trainer, sharding); zero3 builds the model under zero.Init (partitioned from the start)
    "ddp": ("lm", {}),
    # NO_WRAP: accelerate 1.15 cannot re-prepare a sharded model with a transformer-class policy (next stage)
    "fsdp2": ("lm", {"fsdp": "full_shard", "fsdp_config": {"version": 2, "auto_wrap_policy": "NO_WRAP",
                                                          "state_dict_type": "SHARDED_STATE_DICT"}}),
    "zero1": ("lm", {"deepspeed": {"stage": 1}}),
    "zero2": ("lm", {"deepspeed": {"stage": 2}}),
    "zero2-offload": ("lm", {"deepspeed": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}),
    "zero3": ("lm", {"deepspeed": {"stage": 3}}),
    "zero3-offload": ("lm", {"deepspeed": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}),
    "dpo-zero2": ("dpo", {"deepspeed": {"stage": 2}}),
    "dpo-zero3": ("dpo", {"deepspeed": {"stage": 3}}),
}


def tokenizer():
    from hbat.task import build_tokenizer

    return build_tokenizer(ALPHABET)


def save_base(path: str) -> None:
    """The shared starting point: a tiny Llama with odd tensor sizes (ZeRO-1/2 fragments straddle ranks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=13, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=4, max_position_embeddings=32,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def load_model(base: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(base, attn_implementation="eager")


def lm_rows(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(4, 4 + len(ALPHABET), (ROWS, 9), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def dpo_rows(seed: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(200 + seed)
    lengths = torch.randint(1, 4, (ROWS, 2), generator=g).tolist()
    return Dataset.from_list([{"prompt": f"q{i % 10}:", "chosen": " " + "a" * c, "rejected": " " + "b" * r}
                              for i, (c, r) in enumerate(lengths)])


def training_args(kind: str, out: str, world: int, sharding: dict, *, save: bool):
    from transformers import TrainingArguments

    common = dict(output_dir=out, per_device_train_batch_size=MICRO_BATCH * WORLD // world,
                  gradient_accumulation_steps=GRAD_ACCUM, max_steps=STEPS, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=CLIP, adam_epsilon=1e-6,
                  logging_steps=1, save_strategy="steps" if save else "no", save_steps=1, report_to="none",
                  use_cpu=True, disable_tqdm=True, seed=0, train_sampling_strategy="sequential",
                  dataloader_num_workers=0, bf16=False)  # TRL configs default to bf16 (DeepSpeed would train in it)
    if world > 1 and "deepspeed" in sharding:
        zero = {**ZERO, **sharding["deepspeed"]}
        common["deepspeed"] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                               "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": zero,
                               "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    elif world > 1:
        common.update(sharding)
    if kind == "dpo":
        from trl import DPOConfig

        return DPOConfig(beta=0.1, max_length=16, **common)
    return TrainingArguments(**common)


def make_trainer(kind: str, model, args, rows, callback, base: str):
    from transformers import Trainer

    if kind == "dpo":
        from trl import DPOTrainer

        # the reference is the shared base model (a fixed reference keeps resume and the comparison simple)
        return DPOTrainer(model=model, ref_model=load_model(base), args=args, train_dataset=rows,
                          processing_class=tokenizer(), callbacks=[callback])
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])


def step_logs(trainer) -> list[dict]:
    keys = ("ewc/penalty", "grad_norm", "loss")
    return [{k: entry[k] for k in keys if k in entry} for entry in trainer.state.log_history if "loss" in entry]


def run_plan(setup: str, out: str, *, world: int, phase: str = "run", record=None) -> dict:
    """Algorithm 1 with one Trainer per stage; ``record(name, fn)`` wraps the HybridEWC calls (guards).

    With ``phase="resume"`` the plan starts from the checkpoint in the middle of stage ``SAVE_STAGE``; the
    zero2 setup then also hands the stages over as separate processes would: the model and the callback's
    per-rank state are saved after a stage, and a new model and HybridEWC continue from them (``load``).
    """
    from hbat import HybridEWC
    from hbat.integrations.transformers import HybridEWCCallback, release_trainer

    hpa_kind, sharding = SETUPS.get(setup, (setup, {}))
    base = os.path.join(out, "base")
    kinds = {"lm": "lm", "hpa": hpa_kind}
    stage_dir = lambda i, ph=phase: os.path.join(out, f"{setup}-{ph}", f"stage{i}")  # noqa: E731
    if setup == "zero3":  # TrainingArguments first: from_pretrained then partitions under zero.Init
        zero_init_args = training_args("lm", stage_dir(0), world, sharding, save=False)

    def new_ewc(model):
        ewc = HybridEWC(model, f_max=F_MAX, lam=LAM, importance_mode="paper", importance_scale=SCALE)
        for name in ("apply_", "begin_stage", "bind", "load_state_dict") if record is not None else ():
            setattr(ewc, name, record(name, getattr(ewc, name)))
        return ewc

    model = load_model(base)
    ewc, handoff = new_ewc(model), None
    logs, shards = [], []
    start = SAVE_STAGE if phase == "resume" else 0
    for i, (objective, data, seed) in enumerate(PLAN[start:], start):
        kind = kinds[data]
        save = phase == "run" and i == SAVE_STAGE
        args = zero_init_args if (i == 0 and setup == "zero3") else training_args(kind, stage_dir(i), world, sharding,
                                                                                    save=save)
        rows = dpo_rows(seed) if kind == "dpo" else lm_rows(seed)
        callback = HybridEWCCallback(ewc, objective=objective)
        if handoff is not None:
            callback.load(handoff)  # a per-rank state: loaded once train() has bound the new HybridEWC
        trainer = make_trainer(kind, model, args, rows, callback, base)
        resume = os.path.join(stage_dir(i, "run"), "checkpoint-1") if (phase == "resume" and i == SAVE_STAGE) else None
        trainer.train(resume_from_checkpoint=resume)
        logs.append(step_logs(trainer))
        shards.append(sharding_of(trainer.model))
        if i == len(PLAN) - 1:
            params = full_params(trainer.model)
        elif phase == "resume" and setup == "zero2":
            handoff = os.path.join(stage_dir(i), "handoff")
            trainer.save_model(handoff)
            callback.save(handoff)
        release_trainer(trainer)
        if handoff is not None and i < len(PLAN) - 1:
            model = load_model(handoff)
            ewc = new_ewc(model)
    return {"params": params, "logs": logs, "shards": shards, "anchor_numel": sum(a.numel() for a in ewc.anchors),
            "unit_names": list(ewc.unit_names)}


def accelerate_loop(out: str, *, world: int, record=None) -> dict:
    """The accelerate loop of docs/drop-in.md (``prepare_ewc``): DeepSpeed ZeRO-2 on 2 ranks, plain in one process."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin

    from hbat import HybridEWC
    from hbat.integrations.accelerate import prepare_ewc

    AcceleratorState._reset_state()  # a Trainer run before (the references) leaves its accumulation state
    GradientState._reset_state()
    plugin = None
    if world > 1:
        # CPU ranks: the process state first, as TrainingArguments(use_cpu=True) makes it (an Accelerator alone
        # would give every CPU rank process_index 0 under DeepSpeed)
        PartialState(cpu=True, backend="gloo")
        plugin = DeepSpeedPlugin(hf_ds_config={
            "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": GRAD_ACCUM,
            "gradient_clipping": CLIP, "zero_optimization": {**ZERO, "stage": 2},
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False})
    accelerator = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=GRAD_ACCUM)
    model = load_model(os.path.join(out, "base"))
    ewc = HybridEWC(model, f_max=F_MAX, lam=LAM, importance_mode="paper", importance_scale=SCALE)
    for name in ("apply_", "begin_stage", "bind") if record is not None else ():
        setattr(ewc, name, record(name, getattr(ewc, name)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-6, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    ewc_step = prepare_ewc(accelerator, ewc, model)
    rank, rows = accelerator.process_index, MICRO_BATCH * WORLD // world
    logs = []
    for objective, _, seed in PLAN:
        ewc.begin_stage(objective)
        data = torch.stack([row["input_ids"] for row in lm_rows(seed)])
        for step in range(STEPS):
            for micro in range(GRAD_ACCUM):  # the rows a Trainer gives this rank (batch i goes to rank i % world)
                first = ((step * GRAD_ACCUM + micro) * world + rank) * rows
                ids = data[first:first + rows]
                with accelerator.accumulate(model):
                    accelerator.backward(model(input_ids=ids, labels=ids).loss)
                    if accelerator.sync_gradients:
                        penalty = ewc_step.apply_()
                        norm = accelerator.clip_grad_norm_(model.parameters(), CLIP)
                        logs.append({"ewc/penalty": float(penalty), "grad_norm": float(norm)})
                    optimizer.step()
                    optimizer.zero_grad()
    ewc_step.close()
    params = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    accelerator.free_memory()
    return {"params": params, "logs": logs, "anchor_numel": sum(a.numel() for a in ewc.anchors)}


def sharding_of(model) -> str:
    """How the trained model's parameters are held: "full", "fsdp2" (DTensor shards) or "zero3" (partitions)."""
    params = list(model.parameters())
    if all(type(p).__name__ == "DTensor" and p.to_local().numel() < p.numel() for p in params):
        return "fsdp2"
    if all(hasattr(p, "ds_tensor") and p.numel() == 0 and p.ds_tensor.numel() < p.ds_numel for p in params):
        return "zero3"
    return "full"


def full_params(model) -> dict:
    """The whole weights (for the comparison only, outside every guarded call)."""
    named = list(model.named_parameters())
    if named and hasattr(named[0][1], "ds_tensor"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().clone() for n, p in named}


def force_fsdp_on_cpu():
    """accelerate makes FSDP only for GPU devices and silently trains MULTI_CPU with DDP instead: test-only patch."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init
    return lambda: setattr(AcceleratorState, "__init__", original)


def main(out: str, phase: str, setups: list[str]) -> None:
    import deepspeed
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from hbat.distributed import GATHERS, record_collectives

    # DeepSpeed would compile its shared-memory all-reduce op first (a minute); gloo alone does the work here
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    for setup in setups:
        comm, views = [], []

        def record(name, fn):
            def guarded(*args, **kwargs):
                with record_collectives(forbid=GATHERS) as log:  # a gather raises, on every rank
                    result = fn(*args, **kwargs)
                comm.append((name, list(log.calls)))
                if name == "bind":
                    views.append(type(result.view).__name__)
                return result

            return guarded

        restore = force_fsdp_on_cpu() if setup == "fsdp2" else (lambda: None)
        try:
            if setup == "accelerate-zero2":
                result = accelerate_loop(out, world=WORLD, record=record)
            else:
                result = run_plan(setup, out, world=WORLD, phase=phase, record=record)
        finally:
            restore()
            unset_hf_deepspeed_config()  # the next setup starts from a clean slate
            AcceleratorState._reset_state()
            GradientState._reset_state()
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        owned = torch.tensor([result["anchor_numel"]], dtype=torch.long)
        torch.distributed.all_reduce(owned)
        result.update(comm=comm, views=views, anchor_numel_total=int(owned))
        if rank == 0:
            path = os.path.join(out, f"{setup}-{phase}.pt")
            torch.save(result, path + ".tmp")
            os.replace(path + ".tmp", path)
        torch.distributed.barrier()
    if phase == "run":
        refused = refusal(out)
        if rank == 0:
            torch.save(refused, os.path.join(out, "refused.pt"))


def refusal(out: str) -> dict:
    """An unsupported setting (DeepSpeed without ZeRO) fails at train() start, before any step or change."""
    from accelerate.state import AcceleratorState

    from hbat import HybridEWC
    from hbat.integrations.transformers import HybridEWCCallback, release_trainer

    args = training_args("lm", os.path.join(out, "refused"), WORLD, {"deepspeed": {"stage": 0}}, save=False)
    model = load_model(os.path.join(out, "base"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ewc = HybridEWC(model)
    trainer = make_trainer("lm", model, args, lm_rows(0), HybridEWCCallback(ewc, objective="ifa"), "")
    try:
        trainer.train()
        message = None
    except NotImplementedError as error:
        message = str(error)
    unchanged = all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    release_trainer(trainer)
    AcceleratorState._reset_state()
    return {"message": message, "unchanged": unchanged, "objective": ewc.objective, "steps": trainer.state.global_step}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--phase", choices=("run", "resume"), required=True)
    parser.add_argument("setups", nargs="+", choices=sorted(SETUPS) + ["accelerate-zero2"])
    cli = parser.parse_args()
    main(cli.out, cli.phase, cli.setups)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    from hbat.trainer.engine import exit_process

    exit_process(0)  # no interpreter finalization: DeepSpeed's gloo groups outlive destroy_process_group
