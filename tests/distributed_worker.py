"""Shared pieces of the DeepSpeed tests, and the per-rank program they launch with torchrun.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \
        tests/distributed_worker.py --stage 3 --out DIR [--driver hybrid|view]

Every rank trains the same tiny Llama (odd parameter count, odd tensor sizes, so tensors straddle ZeRO
partitions and ZeRO-3 pads the last rank) through three alternating stages with the EWC penalty, and
rank 0 writes DIR/result.pt. ``reference_run`` is the same training in one process with plain PyTorch and
the formulas of the paper written out, which the test compares against.
"""
from __future__ import annotations

import argparse
import os

import torch
from view_ewc import ViewEWC  # tests/ is on sys.path: the script's folder, or pytest's rootdir

WORLD = 2
MICRO_BATCH = 2
GRAD_ACCUM = 2
SEQ = 9
VOCAB = 61
PLAN = (("ifa", 2), ("hpa", 3), ("ifa", 2))  # (objective, optimizer steps)
F_MAX, LAM, SCALE = 50.0, 1.0, 2e3
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 2e-2, (0.9, 0.99), 1e-8, 0.01, 0.5


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=13, intermediate_size=24, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=32, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    # break the symmetry of the freshly initialised norms (all ones) so every unit moves differently
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def global_batch(step: int) -> torch.Tensor:
    """The token ids of optimizer step ``step``: WORLD * GRAD_ACCUM * MICRO_BATCH rows."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (WORLD * GRAD_ACCUM * MICRO_BATCH, SEQ), generator=g)


def micro_batch(step: int, rank: int, micro: int) -> torch.Tensor:
    start = (rank * GRAD_ACCUM + micro) * MICRO_BATCH
    return global_batch(step)[start : start + MICRO_BATCH]


def ds_config(stage: int, offload: bool = False) -> dict:
    # the less common layouts: several ZeRO-3 sub-groups, ZeRO-2 bucketed/overlapped/round-robin reduction
    extra = {
        1: {},
        2: {"overlap_comm": True, "contiguous_gradients": True, "round_robin_gradients": True},
        3: {"sub_group_size": 800},
    }[stage]
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": GRAD_ACCUM,
        "gradient_clipping": CLIP,
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 500,  # several buckets even for this tiny model
            "allgather_bucket_size": 500,
            "stage3_param_persistence_threshold": 0,  # partition every tensor, however small
            "stage3_max_live_parameters": 0,
            "stage3_prefetch_bucket_size": 0,
            **extra,
            **({"offload_optimizer": {"device": "cpu", "pin_memory": False}} if offload else {}),
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def make_optimizer(params):
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


# ---------------------------------------------------------------------- single-process reference
def reference_run() -> dict:
    """Plain PyTorch, one process, the whole global batch per step, the paper's formulas written out."""
    model = build_model()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    opt = make_optimizer(params)
    anchors = [p.detach().clone() for p in params]
    acc = {"ifa": torch.zeros(len(params), dtype=torch.float64), "hpa": torch.zeros(len(params), dtype=torch.float64)}
    seen = {"ifa": False, "hpa": False}
    changes, importances, penalties = [], [], []
    previous = None
    step = 0

    def boundary(objective):
        nonlocal previous
        change = torch.stack([((p.detach() - a) ** 2).sum() / p.numel() for p, a in zip(params, anchors)])
        for p, a in zip(params, anchors):
            a.copy_(p.detach())
        if previous is not None:
            acc[previous] += change.double()
            seen[previous] = True
            changes.append(change.clone())
        other = "hpa" if objective == "ifa" else "ifa"
        F = F_MAX * torch.softmax(SCALE * acc[other], 0).float() if seen[other] else torch.zeros(len(params))
        importances.append(F.clone())
        previous = objective
        return F

    for objective, steps in PLAN:
        F = boundary(objective)
        for _ in range(steps):
            out = model(input_ids=global_batch(step), labels=global_batch(step))
            out.loss.backward()
            with torch.no_grad():
                penalty = sum(LAM / 2 * F[i] * ((p - a) ** 2).sum() for i, (p, a) in enumerate(zip(params, anchors)))
                for i, (p, a) in enumerate(zip(params, anchors)):
                    p.grad.add_(LAM * F[i] * (p - a))
            penalties.append(float(penalty))
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
    boundary("hpa")
    return {
        "names": names,
        "changes": torch.stack(changes),
        "importances": torch.stack(importances),
        "penalties": torch.tensor(penalties),
        "params": {n: p.detach().clone() for n, p in zip(names, params)},
    }


# ---------------------------------------------------------------------- the per-rank DeepSpeed program
def make_ewc(engine, driver: str):
    if driver == "hybrid":
        from hbat import HybridEWC

        return HybridEWC(engine, f_max=F_MAX, lam=LAM, importance_mode="paper", importance_scale=SCALE)
    from hbat.distributed import ZeroParamView

    return ViewEWC(ZeroParamView(engine), f_max=F_MAX, lam=LAM, importance_scale=SCALE)


def current_change(ewc):
    for attr in ("last_change", "change"):
        value = getattr(ewc, attr, None)
        if isinstance(value, torch.Tensor):
            return value.detach().float().clone()
    raise AttributeError("the EWC object exposes no per-unit change of the last stage")


def worker_main(stage: int, out_dir: str, driver: str, offload: bool = False) -> None:
    import deepspeed

    from hbat.distributed import GATHERS, GatherForbiddenError, ZeroParamView, record_collectives

    # DeepSpeed would compile its shared-memory all-reduce op first (about a minute on a fresh machine);
    # gloo alone does the work here
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = build_model()
    names = [n for n, _ in model.named_parameters()]
    optimizer = make_optimizer(model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage, offload))
    ewc = make_ewc(engine, driver)
    view = ZeroParamView(engine)
    partial = ZeroParamView(engine, include="model.*", exclude=["*embed_tokens*", "*norm*"])
    comm = []  # (where, [(collective, numel)]) of every EWC call

    def guarded(where, fn, *args):
        with record_collectives(forbid=GATHERS) as log:
            result = fn(*args)
        comm.append((where, list(log.calls)))
        return result

    changes, importances, penalties = [], [], []
    train_comm = set()
    step = 0
    for n_stage, (objective, steps) in enumerate(PLAN):
        guarded("begin_stage", ewc.begin_stage, objective)
        if n_stage > 0:
            changes.append(current_change(ewc))
        importances.append(ewc.importance.detach().float().clone())
        for _ in range(steps):
            for micro in range(GRAD_ACCUM):
                ids = micro_batch(step, rank, micro)
                # the guard sees DeepSpeed's own parameter all-gathers (ZeRO-3 forward, ZeRO-1/2 step):
                # proof that it would catch one on the EWC path
                with record_collectives() as train_log:
                    loss = engine(input_ids=ids, labels=ids).loss
                    engine.backward(loss)
                train_comm.update(train_log.names())
                penalty = guarded("apply_", ewc.apply_)
                if engine.is_gradient_accumulation_boundary():
                    penalties.append(float(penalty))
                with record_collectives() as train_log:
                    engine.step()
                train_comm.update(train_log.names())
            step += 1
    guarded("begin_stage", ewc.begin_stage, "hpa")
    changes.append(current_change(ewc))
    importances.append(ewc.importance.detach().float().clone())

    # the guard refuses a gather before any data moves (so a forbidden path fails instead of hanging)
    refused = []
    probe = torch.zeros(1)
    for name, call in (
        ("all_gather_into_tensor", lambda: torch.distributed.all_gather_into_tensor(torch.zeros(WORLD), probe)),
        ("all_gather", lambda: torch.distributed.all_gather([torch.zeros(1) for _ in range(WORLD)], probe)),
        ("deepspeed.comm.all_gather_into_tensor",
         lambda: deepspeed.comm.all_gather_into_tensor(torch.zeros(WORLD), probe)),
        ("GatheredParameters", lambda: deepspeed.zero.GatheredParameters(list(engine.module.parameters())[:1])),
    ):
        try:
            with record_collectives(forbid=GATHERS):
                call()
        except GatherForbiddenError:
            refused.append(name)

    # verification only (outside the guarded EWC calls): the full parameters. fp32 training, so the module's
    # parameters equal the fp32 masters after the step's all-gather (ZeRO-3: gathered here). Not
    # safe_get_full_fp32_param: DeepSpeed 0.19.8's _hp_mapping is wrong under round_robin_gradients.
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        full = {n: p.detach().clone() for n, p in params}
    owned = torch.tensor([view.owned_numel], dtype=torch.long)
    torch.distributed.all_reduce(owned)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        result = {
            "names": names,
            "unit_names": list(ewc.unit_names),
            "changes": torch.stack(changes),
            "importances": torch.stack(importances),
            "penalties": torch.tensor(penalties),
            "params": full,
            "comm": comm,
            "train_comm": sorted(train_comm),
            "refused": refused,
            "owned_numel_total": int(owned),
            "unit_numel": list(view.unit_numel),
            "fragments_rank0": list(view.fragment_names),
            "partial_units": list(partial.unit_names),
        }
        tmp = os.path.join(out_dir, "result.pt.tmp")
        torch.save(result, tmp)
        os.replace(tmp, os.path.join(out_dir, "result.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def fsdp2_main(out_dir: str, driver: str) -> None:
    """The same training with PyTorch FSDP2 (fully_shard per decoder layer and at the root)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hbat.distributed import GATHERS, FSDPParamView, record_collectives

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (WORLD,))
    model = build_model()
    names = [n for n, _ in model.named_parameters()]
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model.parameters())
    view = FSDPParamView(model)
    if driver == "hybrid":
        from hbat import HybridEWC

        ewc = HybridEWC(model, f_max=F_MAX, lam=LAM, importance_mode="paper", importance_scale=SCALE)
    else:
        ewc = ViewEWC(view, f_max=F_MAX, lam=LAM, importance_scale=SCALE)
    comm = []

    def guarded(where, fn, *args):
        with record_collectives(forbid=GATHERS) as log:
            result = fn(*args)
        comm.append((where, list(log.calls)))
        return result

    changes, importances, penalties = [], [], []
    step = 0
    rows = GRAD_ACCUM * MICRO_BATCH  # this rank's share of the global batch, in one micro-step
    for n_stage, (objective, steps) in enumerate(PLAN):
        guarded("begin_stage", ewc.begin_stage, objective)
        if n_stage > 0:
            changes.append(current_change(ewc))
        importances.append(ewc.importance.detach().float().clone())
        for _ in range(steps):
            ids = global_batch(step)[rank * rows : (rank + 1) * rows]
            model(input_ids=ids, labels=ids).loss.backward()
            penalties.append(float(guarded("apply_", ewc.apply_)))
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
    guarded("begin_stage", ewc.begin_stage, "hpa")
    changes.append(current_change(ewc))
    importances.append(ewc.importance.detach().float().clone())

    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}  # verification only
    owned = torch.tensor([view.owned_numel], dtype=torch.long)
    dist.all_reduce(owned)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        result = {
            "names": names, "unit_names": list(ewc.unit_names), "changes": torch.stack(changes),
            "importances": torch.stack(importances), "penalties": torch.tensor(penalties), "params": full,
            "comm": comm, "owned_numel_total": int(owned), "unit_numel": list(view.unit_numel),
            "fragments_rank0": list(view.fragment_names),
        }
        tmp = os.path.join(out_dir, "result.pt.tmp")
        torch.save(result, tmp)
        os.replace(tmp, os.path.join(out_dir, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", required=True, choices=("1", "2", "3", "fsdp2"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--driver", default="view", choices=("view", "hybrid"))
    parser.add_argument("--offload", action="store_true", help="ZeRO optimizer offload to the CPU")
    args = parser.parse_args()
    if args.stage == "fsdp2":
        fsdp2_main(args.out, args.driver)
    else:
        worker_main(int(args.stage), args.out, args.driver, args.offload)
    from hbat.trainer.engine import exit_process

    exit_process(0)  # no interpreter finalization: DeepSpeed's gloo groups outlive destroy_process_group
