"""Algorithm 1: the alternating IFA / HPA loop, shared by HBAT and every baseline.

    ws = prepare(cfg)                   # tokenizer, base model, data, SFT reference, reward model (cached)
    result = run_method(ws, cfg)        # the stages of cfg.method, checkpointed after every stage
      -> run_stage(...)                 # one stage: the regulariser's boundary, then the stage's objective
        -> train_loop(trainee, objective, stage_cfg, penalty=...)   # hbat.trainer.step (PPO: run_ppo)

For each stage of the plan (``stage_plan``): the regulariser's stage boundary (HybridEWC: change of the stage
that ended, importance of the other objective, anchor refresh), then SFT (IFA) or DPO / PPO (HPA) on this part
of the data with the regulariser's penalty. After each completed part the policy is evaluated on the validation
sets; the best by validation reward (or the last) is kept. Every stage is seeded from (cfg.seed, stage index),
and a checkpoint after every stage holds all the loop's state (hbat.trainer.runstate), so ``resume=True``
continues from the last completed stage and ends with the same weights. A stage whose loss or weights turn
non-finite stops the run (TrainingDiverged) before anything of it is evaluated or saved.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace

import torch

from ..data import split_parts
from . import checkpoint as ckpt
from . import procgroup as pg
from .config import TrainConfig
from .dpo import dpo_mix_loss, dpo_objective
from .ema import EMAAnchor
from .ds_config import check_supported
from .engine import full_state_dict
from .forgetting import with_forgetting_meter
from .guards import TrainingDiverged, check_weights
from .lock import run_lock
from .methods import spec
from .critic import new_critic
from .ppo import run_ppo
from .runstate import RunState
from .sft import sft_objective
from .step import train_loop
from .workspace import Workspace


def stage_plan(method: str, n_parts: int) -> list[tuple[str, int]]:
    """The (objective, part) sequence of a run: Algorithm 1 for alternating methods."""
    s = spec(method)
    if not s.hpa:
        return [("ifa", part) for part in range(n_parts)]
    if s.alternate:
        return [(objective, part) for part in range(n_parts) for objective in ("ifa", "hpa")]
    return [("ifa", part) for part in range(n_parts)] + [("hpa", part) for part in range(n_parts)]


def run_method(ws: Workspace, cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
               run_name: str | None = None) -> dict:
    """Run ``cfg.method`` from the workspace's base model; returns the kept model's metrics and run facts.

    The run folder is locked for the run (hbat.trainer.lock) and cleared of the temporary files killed runs
    left. A non-finite loss or weight raises TrainingDiverged naming the method, stage and step: nothing of
    that stage is saved or evaluated, checkpoint.pt and best.pt stay those of the last good stage, and
    result.json says ``"status": "diverged"``.
    """
    if cfg.deepspeed is not None:
        check_supported(cfg, spec(cfg.method).regularizer)  # before any work
        pg.init_distributed()
    main = pg.is_main()  # under DeepSpeed only rank 0 prints, logs and writes (hbat.trainer.engine)
    name = run_name or cfg.method
    folder = os.path.join(cfg.output_dir, name)
    os.makedirs(folder, exist_ok=True)  # every rank: each writes its own anchor partition there
    with run_lock(folder) if main else contextlib.nullcontext():
        if main:
            ckpt.remove_stale_temp_files(folder)
        plan = stage_plan(cfg.method, cfg.n_parts)
        parts = {"sft": split_parts(ws.sft_train, cfg.n_parts, seed=cfg.seed),
                 "pref": split_parts(ws.pref_train, cfg.n_parts, seed=cfg.seed + 1),
                 "prompts": split_parts(ws.prompts_train, cfg.n_parts, seed=cfg.seed + 2)}
        run = RunState(ws, cfg, name, folder, len(plan), resume=resume, main=main)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            for i in range(run.start, len(plan)):
                objective, part = plan[i]
                run.log.context = {"method": name, "stage": i, "objective": objective, "part": part}
                started = time.perf_counter()
                try:
                    weights = run_stage(ws, cfg, plan, i, parts, run, progress and main)
                except TrainingDiverged as exc:
                    raise run.diverged(exc, i, objective, part) from None
                run.elapsed += time.perf_counter() - started
                if i == len(plan) - 1 or plan[i + 1][0] == "ifa" and objective != "ifa" or not spec(cfg.method).hpa:
                    run.evaluate(i, part, weights)  # a part is complete
                run.save(i, weights)
                weights = None
        finally:
            run.log.close()
        return run.finish()


def run_stage(ws: Workspace, cfg: TrainConfig, plan, i: int, parts: dict, run: RunState, progress: bool) -> dict | None:
    """Stage ``i`` of the plan, seeded from (cfg.seed, i): the regulariser's boundary, then IFA (SFT) or HPA (DPO
    or PPO) on this part's rows, trained on ``run.trainee`` (the DeepSpeed engine, or the model) with the
    regulariser's penalty. Returns the stage's weights on the CPU (None where this rank does not hold them).
    TrainingDiverged if a loss or weight is not finite."""
    objective, part = plan[i]
    method, seed, model = spec(cfg.method), cfg.seed * 1000 + i, run.trainee
    torch.manual_seed(seed)
    previous_rows = None
    if i:  # the rows of the stage that ended, as {prompt, response} (preference rows give their chosen answer)
        rows = parts["sft" if plan[i - 1][0] == "ifa" else "pref"][plan[i - 1][1]]
        previous_rows = [r if "response" in r else {"prompt": r["prompt"], "response": r["chosen"]} for r in rows]
    boundary = run.regularizer.begin_stage(objective, previous_rows)
    if boundary:
        run.log(boundary)
    penalty, task = run.regularizer.penalty, None
    if objective == "ifa":
        stage_cfg, mix = replace(cfg.sft, seed=seed), None
        if method.mix == "hpa_in_sft":  # SFT+hpa: the DPO loss of the same part mixed into SFT
            mix = dpo_mix_loss(model, None, ws.tokenizer, parts["pref"][part], coef=cfg.mix_coef,
                               batch_size=cfg.dpo.batch_size // cfg.dpo.grad_accum_steps, beta=cfg.dpo.beta,
                               max_len=cfg.dpo.max_len, seed=seed)
        task = sft_objective(model, ws.tokenizer, parts["sft"][part], stage_cfg, mix_loss=mix)
    elif cfg.hpa == "ppo":
        if run.critic is None:  # initialised from the reward model, then carried from one HPA stage to the next
            run.critic = new_critic(ws, cfg)
        run_ppo(model, None, ws.reward_model, run.critic, ws.tokenizer, parts["prompts"][part], cfg.ppo,
                penalty=penalty, log=run.log, seed=seed, progress=progress)
    else:
        stage_cfg, sft_rows = replace(cfg.dpo, seed=seed), None
        if method.mix == "sft_in_hpa":  # RLHF+pt
            stage_cfg, sft_rows = replace(stage_cfg, sft_coef=cfg.mix_coef), parts["sft"][part]
        reference = ws.sft_model if cfg.dpo_reference == "sft" else None  # frozen already: shared, not copied
        task = dpo_objective(model, reference, ws.tokenizer, parts["pref"][part], stage_cfg, sft_rows=sft_rows)
    if task is not None:
        meter_rows = ws.sft_val if objective == "ifa" else ws.pref_val  # held out, of this stage's task
        log = with_forgetting_meter(model, ws.tokenizer, meter_rows, cfg, run.log, max_len=stage_cfg.max_len)
        ema = EMAAnchor(model, cfg.ema_anchor) if cfg.ema_anchor and objective == "hpa" else None
        train_loop(model, task, stage_cfg, penalty=penalty, log=log, progress=progress,
                   after_step=ema.update if ema is not None else None)
        if ema is not None:
            ema.finish()  # the stage ends on its EMA anchor
    # the stage's weights on the CPU, once, for best.pt and checkpoint.pt (ZeRO-3: gathered on every rank, which
    # also evaluates them); checked before anything is evaluated or saved (every rank sees the same full weights)
    weights = full_state_dict(run.model, run.engine) if run.main or run.zero3 else None
    check_weights(weights if weights is not None else run.model.state_dict(), "at the end of the stage")
    return weights
