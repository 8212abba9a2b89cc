"""Algorithm 1: the alternating IFA / HPA loop, shared by HBAT and every baseline.

    ws = prepare(cfg)                   # tokenizer, base model, data, SFT reference, reward model (cached)
    result = run_method(ws, cfg)        # the stages of cfg.method, checkpointed after every stage

For each stage of the plan (hbat.trainer.methods.stage_plan): the regulariser's stage boundary (HybridEWC:
change of the stage that ended, importance of the other objective, anchor refresh), then SFT (IFA) or
DPO / PPO (HPA) on this part of the data with the regulariser's penalty. After each completed part the policy is
evaluated on the validation sets; the best by validation reward (or the last) is kept. Every stage is
seeded from (cfg.seed, stage index), and a checkpoint after every stage holds all the loop's state, so
``resume=True`` continues from the last completed stage and ends with the same weights. A stage whose loss
or weights turn non-finite stops the run (TrainingDiverged) before anything of it is evaluated or saved.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import replace

import torch

from ..data import split_parts
from ..errors import writing
from . import checkpoint as ckpt
from . import procgroup as pg
from .common import eval_mode
from .config import TrainConfig, to_dict
from .dpo import dpo_mix_loss, run_dpo
from .ds_config import check_supported
from .engine import build_engine, full_state_dict, is_zero3, plain_copy
from .evaluate import evaluate_policy, greedy_generate
from .guards import TrainingDiverged, check_weights
from .lock import run_lock
from .memory import plan_memory
from .methods import spec, stage_plan
from .metrics import MetricsLogger
from .models import deepspeed_unimported, is_lora, prepare_trainee
from .ppo import Critic, run_ppo
from .regularizers import make_regularizer
from .reward import RetokenizedRewardModel, RewardModel, score_responses
from .sft import run_sft
from .steppers import load_master_state, master_state
from .workspace import Workspace

RESUME_IGNORED = ("output_dir", "save_model")  # settings that may differ between a run and its resumption
RESUME_REMEDY = "delete it, or run without --resume"
CHECKPOINT_KEYS = ("position", "model", "masters", "regularizer", "critic", "evals", "best", "elapsed", "log_step",
                   "rng", "config")


def evaluate(ws: Workspace, model, cfg: TrainConfig) -> dict:
    """Validation metrics of ``model``: held-out SFT loss, exact match, preference, reward, KL to SFT."""
    e = cfg.eval
    metrics = evaluate_policy(model, ws.tokenizer, sft_rows=ws.sft_val, prompts=ws.prompts_val,
                              reward_model=ws.reward_model, exact_match=ws.exact_match,
                              preference_score=ws.preference_score, max_new_tokens=e.max_new_tokens,
                              max_prompt_len=e.max_prompt_len, batch_size=e.batch_size, max_len=cfg.sft.max_len,
                              seed=cfg.seed)
    if ws.sft_model is not None and ws.reward_model is not None:
        metrics["eval/win_rate"] = win_rate_vs_sft(ws, model, cfg)
    if e.kl_samples:
        kl = evaluate_policy(model, ws.tokenizer, prompts=ws.prompts_val[: e.kl_samples], ref_model=ws.sft_model,
                             max_new_tokens=e.max_new_tokens, max_prompt_len=e.max_prompt_len,
                             batch_size=e.batch_size, seed=cfg.seed)
        metrics.update(kl)
    return metrics


@torch.no_grad()
def _greedy_scores(ws: Workspace, model, cfg: TrainConfig) -> torch.Tensor:
    prompts = [p["prompt"] for p in ws.prompts_val]
    responses = []
    with eval_mode(model):
        for start in range(0, len(prompts), cfg.eval.batch_size):
            rollout = greedy_generate(model, ws.tokenizer, prompts[start:start + cfg.eval.batch_size],
                                      max_new_tokens=cfg.eval.max_new_tokens, max_prompt_len=cfg.eval.max_prompt_len)
            responses += ws.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
    return score_responses(ws.reward_model, ws.tokenizer, prompts, responses, batch_size=cfg.eval.batch_size,
                           max_len=cfg.sft.max_len)


def win_rate_vs_sft(ws: Workspace, model, cfg: TrainConfig) -> float:
    """Share of validation prompts where the reward model prefers the model's greedy answer to the SFT
    model's (ties count one half), as the paper's win rate against SFT."""
    cache = ws.__dict__.setdefault("_sft_scores", {})
    key = (cfg.eval.max_new_tokens, cfg.eval.max_prompt_len, cfg.eval.batch_size)
    if key not in cache:
        cache[key] = _greedy_scores(ws, ws.sft_model, cfg)
    mine, theirs = _greedy_scores(ws, model, cfg), cache[key]
    if not len(mine):
        return float("nan")
    return float(((mine > theirs).float() + 0.5 * (mine == theirs).float()).mean())


def _parts(ws: Workspace, cfg: TrainConfig) -> dict[str, list[list[dict]]]:
    n = cfg.n_parts
    return {"sft": split_parts(ws.sft_train, n, seed=cfg.seed),
            "pref": split_parts(ws.pref_train, n, seed=cfg.seed + 1),
            "prompts": split_parts(ws.prompts_train, n, seed=cfg.seed + 2)}


def _as_sft_rows(rows: list[dict]) -> list[dict]:
    """Rows of the stage that ended, as {prompt, response} (preference rows give their chosen answer)."""
    return [r if "response" in r else {"prompt": r["prompt"], "response": r["chosen"]} for r in rows]


def _check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    current = to_dict(cfg)
    differ = [k for k in current if k not in RESUME_IGNORED and saved.get(k) != current[k]]
    if differ:
        raise ValueError(f"cannot resume: the checkpoint was made with different settings for {differ}; "
                         "use the same configuration (or a new output_dir)")


def run_method(ws: Workspace, cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
               run_name: str | None = None) -> dict:
    """Run ``cfg.method`` from the workspace's base model; returns the kept model's metrics and run facts.

    The run folder is locked for the run (hbat.trainer.lock) and cleared of the temporary files killed runs
    left. A non-finite loss or weight raises TrainingDiverged naming the method, stage and step: nothing of
    that stage is saved or evaluated, checkpoint.pt and best.pt stay those of the last good stage, and
    result.json says ``"status": "diverged"``.
    """
    distributed = cfg.deepspeed is not None
    if distributed:
        check_supported(cfg, spec(cfg.method).regularizer)  # before any work
        pg.init_distributed()
    main = pg.is_main()  # under DeepSpeed only rank 0 prints, logs and writes (hbat.trainer.engine)
    name = run_name or cfg.method
    folder = os.path.join(cfg.output_dir, name)
    os.makedirs(folder, exist_ok=True)  # every rank: each writes its own anchor partition there
    with run_lock(folder) if main else contextlib.nullcontext():
        if main:
            ckpt.remove_stale_temp_files(folder)
        return _run_stages(ws, cfg, name, folder, resume=resume, progress=progress and main, main=main)


def _run_stages(ws: Workspace, cfg: TrainConfig, name: str, folder: str, *, resume: bool, progress: bool,
                main: bool) -> dict:
    method = spec(cfg.method)
    state_path, best_path = os.path.join(folder, "checkpoint.pt"), os.path.join(folder, "best.pt")
    plan = stage_plan(cfg.method, cfg.n_parts)
    parts = _parts(ws, cfg)
    distributed = cfg.deepspeed is not None
    model = ws.build()
    state = None
    if resume and os.path.exists(state_path):
        state = _load_checkpoint(state_path)
        _check_resume_config(state["config"], cfg)
        model.load_state_dict(state["model"])  # before the engine copies the weights into its partitions
        load_master_state(model, state["masters"]["policy"])  # bf16 weights: their fp32 masters (steppers)
    engine = build_engine(model, cfg) if distributed else None
    trainee = engine if distributed else model  # what the stages step; ``model`` stays the plain module
    # ZeRO-3: ``model``'s parameters are partitioned now; evaluation and checkpoints gather them (engine docstring)
    zero3 = is_zero3(engine)
    regularizer = make_regularizer(method.regularizer, trainee, cfg.ewc, ws.tokenizer, cfg.sft.max_len)
    critic, start, evals, best, elapsed = None, 0, [], None, 0.0

    # a fresh run starts a fresh metrics file; a resumed one drops what was logged after its checkpoint
    resume_step = None if state is None else state["log_step"]
    log = MetricsLogger(folder, tensorboard=True, resume_step=resume_step) if main else _NoLogger()
    if state is not None:
        if distributed:  # each rank resumes its own anchor partition
            own = pg.rank_file(folder, pg.rank(), state["position"])
            if not os.path.exists(own):
                raise ValueError(f"cannot resume: {own} is missing (was the run made with another number of ranks?)")
            regularizer.load_state_dict(ckpt.load(own, remedy=RESUME_REMEDY))
        else:
            regularizer.load_state_dict(state["regularizer"])
        if state["critic"] is not None:
            critic = _new_critic(ws, cfg)
            critic.load_state_dict(state["critic"])
            load_master_state(critic, state["masters"]["critic"])
        start, evals, best, elapsed = state["position"], state["evals"], state["best"], state["elapsed"]
        log.step = state["log_step"]
        ckpt.set_rng_state(state["rng"])
        if main:
            print(f"[{name}] resuming after stage {start}/{len(plan)}")

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(start, len(plan)):
            objective, part = plan[i]
            log.context = {"method": name, "stage": i, "objective": objective, "part": part}
            started = time.perf_counter()
            try:
                critic, weights = _run_stage(ws, cfg, plan, i, parts, model, engine, regularizer, critic, log,
                                             progress, gather=main or zero3)
            except TrainingDiverged as exc:
                error = exc.within(f"method {name}, stage {i} ({objective}, part {part + 1} of {cfg.n_parts})")
                error.result = {"method": name, "status": "diverged", "error": str(error), "stage": i,
                                "train_seconds": elapsed, "stages": len(plan), "folder": folder}
                if main:
                    _write_result(folder, error.result)
                raise error from None
            elapsed += time.perf_counter() - started
            if i == len(plan) - 1 or plan[i + 1][0] == "ifa" and objective != "ifa" or not method.hpa:
                policy = plain_copy(ws.build, weights, model) if zero3 else model
                metrics = {**evaluate(ws, policy, cfg), "part": part + 1, "stage": i}  # every rank, identically
                del policy
                evals.append(metrics)
                log({f"{k}": v for k, v in metrics.items() if k.startswith("eval/")})
                if main:
                    print(f"[{name}] part {part + 1}/{cfg.n_parts}: " +
                          ", ".join(f"{k[5:]}={v:.4f}" for k, v in metrics.items() if k.startswith("eval/")))
                if best is None or cfg.keep == "last" or metrics["eval/reward"] > best["eval/reward"]:
                    best = metrics
                    if main:
                        ckpt.save_atomic(weights, best_path)
            if distributed:  # every rank's anchor partition first, then rank 0 marks the stage complete
                pg.save_rank_file(regularizer.state_dict(), folder, i + 1)
                pg.barrier()
            if main:
                ckpt.save_atomic({
                    "position": i + 1, "model": weights,
                    "masters": {"policy": master_state(model), "critic": {} if critic is None else master_state(critic)},
                    "regularizer": None if distributed else regularizer.state_dict(),
                    "critic": None if critic is None else critic.state_dict(),
                    "evals": evals, "best": best, "elapsed": elapsed, "log_step": log.step, "rng": ckpt.rng_state(),
                    "config": to_dict(cfg),
                }, state_path)
            weights = None
            if distributed:
                pg.barrier()
                if i:
                    ckpt.remove(pg.rank_file(folder, pg.rank(), i))  # superseded by the checkpoint just written
    finally:
        log.close()

    if distributed:
        pg.barrier()  # best.pt is complete
    final = model
    if zero3 and cfg.save_model:
        # a plain copy of the kept weights: best.pt holds them for keep=best and keep=last alike (the last stage
        # is always evaluated), so nothing is gathered again; only rank 0 reads it and saves the model
        if best is None:
            weights = full_state_dict(model, engine)  # every rank: a collective
        else:
            weights = ckpt.load(best_path, remedy=RESUME_REMEDY) if main else None
        final = plain_copy(ws.build, weights, model) if main else None
    elif not zero3 and best is not None and cfg.keep == "best" and os.path.exists(best_path):
        model.load_state_dict(ckpt.load(best_path, remedy=RESUME_REMEDY))
    if cfg.save_model and main:
        save_model(final, ws, cfg, os.path.join(folder, "model"))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    rss = peak_rss_bytes()
    result = {"method": name, "status": "ok", **(best or {}), "train_seconds": elapsed, "peak_memory_bytes": peak,
              "peak_rss_bytes": rss, "memory_plan": plan_memory(cfg).as_dict(), "stages": len(plan),
              "folder": folder}
    if main:
        _write_result(folder, result)
    if distributed:
        pg.barrier()
    return result


def _run_stage(ws, cfg, plan, i, parts, model, engine, regularizer, critic, log, progress, *, gather: bool):
    """Stage ``i`` of the plan, seeded from (cfg.seed, i): the regulariser's boundary, then IFA or HPA on
    ``engine`` (DeepSpeed) or ``model``. Returns (critic, the stage's weights on the CPU, or None where this
    rank does not ``gather`` them). TrainingDiverged if a loss or weight is not finite."""
    objective, part = plan[i]
    seed = cfg.seed * 1000 + i
    torch.manual_seed(seed)
    previous = plan[i - 1] if i else None
    previous_rows = None
    if previous is not None:
        previous_rows = _as_sft_rows(parts["sft" if previous[0] == "ifa" else "pref"][previous[1]])
    boundary = regularizer.begin_stage(objective, previous_rows)
    if boundary:
        log(boundary)
    run = _run_ifa if objective == "ifa" else _run_hpa
    trainee = model if engine is None else engine  # what the stage steps; ``model`` stays the plain module
    critic = run(ws, cfg, trainee, parts, part, seed, regularizer.penalty, log, progress, critic)
    # the stage's weights on the CPU, once, for best.pt and checkpoint.pt (ZeRO-3: gathered on every rank, which
    # also evaluates them); checked before anything is evaluated or saved (every rank sees the same full weights)
    weights = full_state_dict(model, engine) if gather else None
    check_weights(weights if weights is not None else model.state_dict(), "at the end of the stage")
    return critic, weights


def _write_result(folder: str, result: dict) -> None:
    ckpt.write_text_atomic(json.dumps(result, indent=2, default=str), os.path.join(folder, "result.json"))


def _load_checkpoint(path: str) -> dict:
    state = ckpt.load(path, remedy=RESUME_REMEDY)
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ckpt.CheckpointError(f"{path}: has no {missing[0]!r} (made by another version of hbat?); "
                                   f"{RESUME_REMEDY}")
    return state


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which restarts at exec; ru_maxrss would carry the
    parent's peak into a child started by ``hbat compare`` (it survives fork + exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # optional: POSIX only (no such module on Windows); the fallback of /proc

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux KiB (macOS reports bytes)


class _NoLogger:
    """The metrics logger of ranks other than 0 under DeepSpeed: they compute, rank 0 writes."""

    path, step, context = None, 0, {}

    def __call__(self, metrics: dict) -> None:
        self.step += 1

    def close(self) -> None:
        pass


def save_model(model, ws: Workspace, cfg: TrainConfig, folder: str) -> None:
    """``save_pretrained`` of the kept model and the tokenizer. A LoRA model saves its adapter, which
    ``peft.PeftModel.from_pretrained(base, folder)`` loads onto the base: ``model.path``, or for the embedded
    model the base saved beside it in ``<folder>/base``. A failed write (a full disk) is a UserError naming the
    folder."""
    with writing(folder), deepspeed_unimported():
        if is_lora(model) and cfg.model.path is None:  # the embedded base is on no disk: saved beside (it is tiny)
            base = os.path.join(folder, "base")
            copy.deepcopy(model).unload().save_pretrained(base)
            ws.tokenizer.save_pretrained(base)
            model.peft_config["default"].base_model_name_or_path = base
        model.save_pretrained(folder)
        ws.tokenizer.save_pretrained(folder)


def _new_critic(ws: Workspace, cfg: TrainConfig):
    """The PPO critic: the reward model's backbone and head (copies), or, for a reward model with a tokenizer
    of its own, the SFT model's backbone with a fresh head; gradient checkpointing and LoRA as configured."""
    start = ws.reward_model
    if isinstance(start, RetokenizedRewardModel):  # its token ids are not the policy's
        start = RewardModel.from_causal_lm(ws.sft_model)
    critic = Critic.from_reward_model(start).to(ws.device).requires_grad_(True)
    critic.backbone = prepare_trainee(critic.backbone, cfg.model, seed=cfg.seed, task_type=None)
    return critic


def _run_ifa(ws, cfg, model, parts, part, seed, penalty, log, progress, critic):
    rows = parts["sft"][part]
    mix = None
    if spec(cfg.method).mix == "hpa_in_sft":  # SFT+hpa: the DPO loss of the same part mixed into SFT
        mix = dpo_mix_loss(model, None, ws.tokenizer, parts["pref"][part], coef=cfg.mix_coef,
                           batch_size=cfg.dpo.batch_size // cfg.dpo.grad_accum_steps, beta=cfg.dpo.beta,
                           max_len=cfg.dpo.max_len, seed=seed)
    run_sft(model, ws.tokenizer, rows, replace(cfg.sft, seed=seed), penalty=penalty, log=log, progress=progress,
            mix_loss=mix)
    return critic


def _run_hpa(ws, cfg, model, parts, part, seed, penalty, log, progress, critic):
    if cfg.hpa == "ppo":
        if critic is None:  # initialised from the reward model, then carried from one HPA stage to the next
            critic = _new_critic(ws, cfg)
        run_ppo(model, None, ws.reward_model, critic, ws.tokenizer, parts["prompts"][part], cfg.ppo, penalty=penalty,
                log=log, seed=seed, progress=progress)
        return critic

    dpo_cfg = replace(cfg.dpo, seed=seed)
    sft_rows = None
    if spec(cfg.method).mix == "sft_in_hpa":  # RLHF+pt
        dpo_cfg = replace(dpo_cfg, sft_coef=cfg.mix_coef)
        sft_rows = parts["sft"][part]
    reference = ws.sft_model if cfg.dpo_reference == "sft" else None  # frozen already: shared, not copied
    run_dpo(model, reference, ws.tokenizer, parts["pref"][part], dpo_cfg, penalty=penalty, log=log, progress=progress,
            sft_rows=sft_rows)
    return critic
