"""The DeepSpeed JSON of a run: read, checked against the stage configs, completed with the batch settings.

``run_ds_config(cfg)`` is the config the engine is built with (hbat.trainer.engine): the user's JSON plus
``train_batch_size``, ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps`` and
``gradient_clipping`` derived from the first stage (SFT); a value the JSON sets itself must agree with every
stage ("auto" means unset). A ``scheduler`` section and fp16 are refused; ``check_supported`` refuses, before
any work, what the trainer does not do under DeepSpeed.

Precision: the JSON's ``bf16`` section decides the trained model's precision (DeepSpeed keeps fp32 master
partitions); ``model.dtype: bfloat16`` needs it enabled, ``model.dtype: auto`` follows it.
"""
from __future__ import annotations

import json
import warnings

from .checks import ConfigError
from .common import StageConfig
from .methods import spec
from .procgroup import world_size

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping")


def load_ds_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"deepspeed config {path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"deepspeed config {path}: the top level must be a JSON object")
    return config


def zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def bf16_enabled(config: dict) -> bool:
    return (config.get("bf16") or config.get("bfloat16") or {}).get("enabled") is True


def _stage_batch(cfg: StageConfig, world: int) -> dict:
    micro = max(1, cfg.batch_size // (world * cfg.grad_accum_steps))
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": cfg.grad_accum_steps,
            "train_batch_size": micro * cfg.grad_accum_steps * world,
            "gradient_clipping": float(cfg.max_grad_norm or 0.0)}


def resolve_ds_config(raw: dict, stages: dict[str, StageConfig], world: int, *, source: str = "deepspeed") -> dict:
    """The DeepSpeed config of a run: ``raw`` plus the batch settings derived from the stages (module docstring).

    ``stages`` maps a stage name (e.g. "sft", "dpo") to its config, in run order; the first one sets the
    engine's nominal batch settings. Raises ValueError naming the key and the stage on a conflict.
    """
    if "scheduler" in raw:
        raise ValueError(f"{source}: remove the 'scheduler' section; the stage configs set the lr schedule "
                         "(lr, warmup_ratio, lr_scheduler_type), restarted at every stage")
    if raw.get("fp16", {}).get("enabled") is True:
        raise NotImplementedError(f"{source}: fp16 is not supported by the trainer (overflow-skipped steps would "
                                  "desynchronise the per-stage lr schedule); use bf16")
    if zero_stage(raw) not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization.stage={zero_stage(raw)}; use 0, 1, 2 or 3")
    for name, cfg in stages.items():
        derived = _stage_batch(cfg, world)
        exact = cfg.batch_size % (world * cfg.grad_accum_steps) == 0
        for key in BATCH_KEYS:
            value = raw.get(key, "auto")
            if value == "auto":
                continue
            if key == "train_batch_size":
                want = cfg.batch_size
            elif key == "train_micro_batch_size_per_gpu":
                want = derived[key] if exact else None
            else:
                want = derived[key]
            if want is None or float(value) != float(want):
                raise ValueError(
                    f"{source}: {key}={value!r} disagrees with {name} (batch_size={cfg.batch_size}, "
                    f"grad_accum_steps={cfg.grad_accum_steps}, max_grad_norm={cfg.max_grad_norm}, {world} ranks); "
                    f"remove {key} from the DeepSpeed config (the stage configs set it) or make them agree")
        if not exact:
            warnings.warn(f"{name}.batch_size={cfg.batch_size} is not a multiple of {world} ranks x "
                          f"{cfg.grad_accum_steps} micro-batches: micro-batches differ in size (the gradient is "
                          "still the one of the whole batch)", stacklevel=2)
    first = next(iter(stages.values()))
    config = {**raw, **_stage_batch(first, world)}
    config.setdefault("zero_allow_untested_optimizer", True)  # torch.optim.AdamW, as in one process
    config.setdefault("steps_per_print", 10**9)
    try:
        from deepspeed.accelerator import get_accelerator  # optional, heavy: not for runs without it

        if get_accelerator().device_name() == "cpu":
            config.setdefault("zero_force_ds_cpu_optimizer", False)
    except ImportError:
        pass
    return config


def run_ds_config(cfg) -> dict:
    """The resolved DeepSpeed config of a TrainConfig (errors name the file and the key; call it early)."""
    config = resolve_ds_config(load_ds_config(cfg.deepspeed), {"sft": cfg.sft, "dpo": cfg.dpo}, world_size(),
                               source=cfg.deepspeed)
    if cfg.model.dtype == "bfloat16" and not bf16_enabled(config):
        raise ConfigError("config.model.dtype", f"= bfloat16 needs bf16 in the DeepSpeed config ({cfg.deepspeed}: "
                          'add "bf16": {"enabled": true}, so DeepSpeed keeps fp32 master weights), or use auto')
    return config


def check_supported(cfg, regularizer_kind: str) -> None:
    """Refuse, before any work, what the DeepSpeed path does not do (module docstring)."""
    if cfg.hpa == "ppo" and spec(cfg.method).hpa:
        raise NotImplementedError("deepspeed: PPO stages are not supported under DeepSpeed yet; use hpa=dpo")
    if regularizer_kind not in ("hbat", "none"):
        raise NotImplementedError(f"deepspeed: method {cfg.method!r} (regulariser {regularizer_kind!r}) is not "
                                  "supported under DeepSpeed; HBAT-Freeze and the Fisher baseline need full, "
                                  "unsharded parameters")
    if cfg.model.lora_r:
        raise NotImplementedError("deepspeed: LoRA (model.lora_r > 0) is not supported under DeepSpeed yet; set "
                                  "model.lora_r=0 or run in one process")
    if cfg.ema_anchor:
        raise NotImplementedError("deepspeed: the EMA anchor (ema_anchor > 0) is not supported under DeepSpeed yet; "
                                  "set ema_anchor=0")
    if cfg.eval.kl_to_start_every:
        raise NotImplementedError("deepspeed: the forgetting meter (eval.kl_to_start_every > 0) is not supported "
                                  "under DeepSpeed yet; set eval.kl_to_start_every=0")
    if not cfg.dpo.precompute_ref_logprobs:
        raise NotImplementedError("deepspeed: dpo.precompute_ref_logprobs=false is not supported (the policy "
                                  "copy would be a copy of the engine)")


