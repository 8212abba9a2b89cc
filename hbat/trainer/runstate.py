"""What a run keeps across the stages of Algorithm 1 (hbat.trainer.algorithm), and on disk.

    run = RunState(ws, cfg, name, folder, stages, resume=..., main=...)  # model, engine, regulariser, log
    run.evaluate(i, part, weights)        # after a part: the validation metrics; best.pt if they are the best
    run.save(i, weights)                  # after every stage: checkpoint.pt, all the loop's state
    result = run.finish()                 # the kept model (keep=best / last), result.json

``resume=True`` continues from checkpoint.pt (the last completed stage) and ends with the same weights: it holds
the weights and their fp32 masters, the regulariser, the PPO critic, the evaluations, the metrics step and the
RNG state. Under DeepSpeed only rank 0 logs and writes; every rank keeps its own anchor partition in a rank file
next to the checkpoint, and under ZeRO-3 the model's parameters are partitioned: evaluation and checkpoints
gather them (hbat.trainer.engine).
"""
from __future__ import annotations

import copy
import json
import os

import torch

from ..errors import writing
from . import checkpoint as ckpt
from . import procgroup as pg
from .config import TrainConfig, to_dict
from .engine import build_engine, full_state_dict, is_zero3, plain_copy
from .evaluate import evaluate_run
from .guards import TrainingDiverged
from .memory import plan_memory
from .methods import spec
from .metrics import MetricsLogger
from .models import deepspeed_unimported, is_lora
from .critic import new_critic
from .regularizers import make_regularizer
from .optimizer import load_master_state, master_state
from .workspace import Workspace

RESUME_IGNORED = ("output_dir", "save_model")  # settings that may differ between a run and its resumption
RESUME_REMEDY = "delete it, or run without --resume"
CHECKPOINT_KEYS = ("position", "model", "masters", "regularizer", "critic", "evals", "best", "elapsed", "log_step",
                   "rng", "config")


class RunState:
    """The model (and its DeepSpeed engine), the regulariser, the PPO critic, the evaluations and the best of them,
    the metrics log and the training time of a run of ``stages`` stages; from checkpoint.pt with ``resume``."""

    def __init__(self, ws: Workspace, cfg: TrainConfig, name: str, folder: str, stages: int, *, resume: bool,
                 main: bool):
        self.ws, self.cfg, self.name, self.folder, self.stages, self.main = ws, cfg, name, folder, stages, main
        self.distributed = cfg.deepspeed is not None
        self.state_path, self.best_path = os.path.join(folder, "checkpoint.pt"), os.path.join(folder, "best.pt")
        self.model = ws.build()
        state = None
        if resume and os.path.exists(self.state_path):
            state = _load_checkpoint(self.state_path)
            _check_resume_config(state["config"], cfg)
            self.model.load_state_dict(state["model"])  # before the engine copies the weights into its partitions
            load_master_state(self.model, state["masters"]["policy"])  # bf16 weights: their fp32 masters (optimizer)
        self.engine = build_engine(self.model, cfg) if self.distributed else None
        self.trainee = self.engine if self.distributed else self.model  # what the stages step; ``model`` stays plain
        # ZeRO-3: ``model``'s parameters are partitioned now; evaluation and checkpoints gather them (engine docstring)
        self.zero3 = is_zero3(self.engine)
        self.regularizer = make_regularizer(spec(cfg.method).regularizer, self.trainee, cfg.ewc, ws.tokenizer,
                                            cfg.sft.max_len)
        self.critic, self.start, self.evals, self.best, self.elapsed = None, 0, [], None, 0.0
        # a fresh run starts a fresh metrics file; a resumed one drops what was logged after its checkpoint
        resume_step = None if state is None else state["log_step"]
        self.log = MetricsLogger(folder, tensorboard=True, resume_step=resume_step) if main else _NoLogger()
        if state is not None:
            self._resume(state)

    def _resume(self, state: dict) -> None:
        if self.distributed:  # each rank resumes its own anchor partition
            own = pg.rank_file(self.folder, pg.rank(), state["position"])
            if not os.path.exists(own):
                raise ValueError(f"cannot resume: {own} is missing (was the run made with another number of ranks?)")
            self.regularizer.load_state_dict(ckpt.load(own, remedy=RESUME_REMEDY))
        else:
            self.regularizer.load_state_dict(state["regularizer"])
        if state["critic"] is not None:
            self.critic = new_critic(self.ws, self.cfg)
            self.critic.load_state_dict(state["critic"])
            load_master_state(self.critic, state["masters"]["critic"])
        self.start, self.evals, self.best, self.elapsed = state["position"], state["evals"], state["best"], \
            state["elapsed"]
        self.log.step = state["log_step"]
        ckpt.set_rng_state(state["rng"])
        if self.main:
            print(f"[{self.name}] resuming after stage {self.start}/{self.stages}")

    def diverged(self, exc: TrainingDiverged, i: int, objective: str, part: int) -> TrainingDiverged:
        """The error to raise for stage ``i``: naming the method and stage, its result written as result.json."""
        error = exc.within(f"method {self.name}, stage {i} ({objective}, part {part + 1} of {self.cfg.n_parts})")
        error.result = {"method": self.name, "status": "diverged", "error": str(error), "stage": i,
                        "train_seconds": self.elapsed, "stages": self.stages, "folder": self.folder}
        if self.main:
            _write_result(self.folder, error.result)
        return error

    def evaluate(self, i: int, part: int, weights) -> None:
        """The validation metrics after stage ``i`` (logged, printed); best.pt gets ``weights`` if they are kept."""
        policy = plain_copy(self.ws.build, weights, self.model) if self.zero3 else self.model
        metrics = {**evaluate_run(self.ws, policy, self.cfg), "part": part + 1, "stage": i}  # every rank, identically
        del policy
        self.evals.append(metrics)
        self.log({f"{k}": v for k, v in metrics.items() if k.startswith("eval/")})
        if self.main:
            print(f"[{self.name}] part {part + 1}/{self.cfg.n_parts}: " +
                  ", ".join(f"{k[5:]}={v:.4f}" for k, v in metrics.items() if k.startswith("eval/")))
        if self.best is None or self.cfg.keep == "last" or metrics["eval/reward"] > self.best["eval/reward"]:
            self.best = metrics
            if self.main:
                ckpt.save_atomic(weights, self.best_path)

    def save(self, i: int, weights) -> None:
        """checkpoint.pt after stage ``i`` (``weights``: the stage's, on the CPU; None on ranks that hold none)."""
        distributed, regularizer, critic = self.distributed, self.regularizer, self.critic
        if distributed:  # every rank's anchor partition first, then rank 0 marks the stage complete
            pg.save_rank_file(regularizer.state_dict(), self.folder, i + 1)
            pg.barrier()
        if self.main:
            ckpt.save_atomic({
                "position": i + 1, "model": weights,
                "masters": {"policy": master_state(self.model),
                            "critic": {} if critic is None else master_state(critic)},
                "regularizer": None if distributed else regularizer.state_dict(),
                "critic": None if critic is None else critic.state_dict(),
                "evals": self.evals, "best": self.best, "elapsed": self.elapsed, "log_step": self.log.step,
                "rng": ckpt.rng_state(), "config": to_dict(self.cfg),
            }, self.state_path)
        if distributed:
            pg.barrier()
            if i:
                ckpt.remove(pg.rank_file(self.folder, pg.rank(), i))  # superseded by the checkpoint just written

    def finish(self) -> dict:
        """The kept model (best.pt for keep=best) in ``model``, saved with ``save_model``; the run's result."""
        cfg, ws, model, main, best = self.cfg, self.ws, self.model, self.main, self.best
        if self.distributed:
            pg.barrier()  # best.pt is complete
        final = model
        if self.zero3 and cfg.save_model:
            # a plain copy of the kept weights: best.pt holds them for keep=best and keep=last alike (the last stage
            # is always evaluated), so nothing is gathered again; only rank 0 reads it and saves the model
            if best is None:
                weights = full_state_dict(model, self.engine)  # every rank: a collective
            else:
                weights = ckpt.load(self.best_path, remedy=RESUME_REMEDY) if main else None
            final = plain_copy(ws.build, weights, model) if main else None
        elif not self.zero3 and best is not None and cfg.keep == "best" and os.path.exists(self.best_path):
            model.load_state_dict(ckpt.load(self.best_path, remedy=RESUME_REMEDY))
        if cfg.save_model and main:
            save_model(final, ws, cfg, os.path.join(self.folder, "model"))
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        rss = peak_rss_bytes()
        result = {"method": self.name, "status": "ok", **(best or {}), "train_seconds": self.elapsed,
                  "peak_memory_bytes": peak, "peak_rss_bytes": rss, "memory_plan": plan_memory(cfg).as_dict(),
                  "stages": self.stages, "folder": self.folder}
        if main:
            _write_result(self.folder, result)
        if self.distributed:
            pg.barrier()
        return result


def _check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    current = to_dict(cfg)
    differ = [k for k in current if k not in RESUME_IGNORED and saved.get(k) != current[k]]
    if differ:
        raise ValueError(f"cannot resume: the checkpoint was made with different settings for {differ}; "
                         "use the same configuration (or a new output_dir)")


def _load_checkpoint(path: str) -> dict:
    state = ckpt.load(path, remedy=RESUME_REMEDY)
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ckpt.CheckpointError(f"{path}: has no {missing[0]!r} (made by another version of hbat?); "
                                   f"{RESUME_REMEDY}")
    return state


def _write_result(folder: str, result: dict) -> None:
    ckpt.write_text_atomic(json.dumps(result, indent=2, default=str), os.path.join(folder, "result.json"))


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
