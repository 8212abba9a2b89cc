"""The configuration of a training run: nested dataclasses, loadable from YAML, overridable with key=value.

    cfg = load_config("run.yaml", overrides=["method=hbat", "sft.lr=3e-4", "ewc.f_max=50"])

Every field has its default here, with a comment saying what it does; ``hbat train --print-config`` shows the
resolved configuration. Unknown keys are errors that name the key and the section's valid keys.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from .dpo import DPOConfig
from .ppo import PPOConfig
from .reward import RewardConfig
from .sft import SFTConfig

METHODS = ("hbat", "two_stage", "sft_only", "no_ewc", "no_alternation", "rlhf_pt", "sft_hpa", "freeze", "fisher")
HPA_KINDS = ("dpo", "ppo")
KEEP = ("best", "last")


@dataclass
class ModelConfig:
    path: str | None = None           # local transformers causal-LM folder; None: the embedded task's tiny Llama
    tokenizer: str | None = None      # tokenizer folder (None: same as path, or the embedded task's tokenizer)
    size: str = "small"               # embedded model: "tiny" (tests), "small" (~0.22M, the demo), "base" (~0.8M)
    pretrain_steps: int = 600         # embedded only: short pre-training on generated text before anything else
    pretrain_lr: float = 3e-3         # embedded only
    pretrain_batch_size: int = 32     # embedded only


@dataclass
class DataConfig:
    sft: str | None = None            # JSONL of {prompt, response}; None: the embedded task
    preference: str | None = None     # JSONL of {prompt, chosen, rejected}
    prompts: str | None = None        # JSONL of {prompt} for PPO (None: the preference prompts)
    sft_adapter: str | None = None    # hbat.data.ADAPTERS name mapping other field names (e.g. "tldr_sft")
    preference_adapter: str | None = None
    prompts_adapter: str | None = None
    val_size: float = 0.1             # share (or count, if >= 1) of each data set held out for validation
    max_val: int = 200                # at most this many validation rows per set (evaluation time)
    # embedded task (hbat.task.make_task)
    task_n_sft: int = 3000
    task_n_pref: int = 2000
    task_n_val: int = 200
    task_conflict: float = 0.5        # share of preference pairs whose chosen answer fails the skill


@dataclass
class EWCConfig:
    f_max: float = 100.0              # F_max of eq. (6)/(9) (paper: 50 summarization, 100 dialogue)
    lam: float = 1.0                  # lambda of eq. (5)/(8)
    importance_mode: str = "normalized"  # normalized | paper | released | proportional | uniform (hbat.importance)
    importance_scale: float = 1.0     # temperature of the importance mode
    anchor_dtype: str = "float32"     # float32 or bfloat16
    include: list[str] | None = None  # fnmatch patterns of parameter names to penalise (None: all trainable)
    exclude: list[str] | None = None
    group_by: str | None = None       # None: one unit per tensor; "layer": one per transformer block
    freeze_fraction: float = 0.2      # method "freeze": share of tensors frozen instead of the penalty
    freeze_by: str = "tensors"        # "tensors" (paper) or "params"
    fisher_samples: int = 64          # method "fisher": samples of the previous stage for the Fisher estimate
    fisher_scale: float = 1.0         # method "fisher": multiplies the empirical Fisher


@dataclass
class EvalConfig:
    max_new_tokens: int = 12          # greedy decoding length for exact match / reward / preference
    batch_size: int = 32
    kl_samples: int = 64              # prompts sampled for the KL-to-SFT estimate (0: skip)


@dataclass
class TrainConfig:
    output_dir: str = "runs/hbat"     # checkpoints, metrics.jsonl, config.yaml, summary.md, final model
    seed: int = 0
    method: str = "hbat"              # one of METHODS; a preset over the fields below (hbat.trainer.methods)
    hpa: str = "dpo"                  # the human-preference stage: "dpo" or "ppo"
    n_parts: int = 2                  # N of Algorithm 1: disjoint parts of each data set (paper: 2 or 10)
    keep: str = "best"                # "best" by validation reward after each part (paper) or "last"
    dpo_reference: str = "stage"      # DPO reference: "stage" (the model at the start of each HPA stage) or "sft"
    mix_coef: float = 0.5             # rlhf_pt: SFT loss weight in HPA; sft_hpa: DPO loss weight in SFT
    save_model: bool = True           # write the kept model with save_pretrained at the end
    deepspeed: str | None = None      # path to a DeepSpeed JSON config (multi-process runs, see README)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(lr=1e-3, batch_size=32, epochs=12, max_len=64))
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(lr=3e-5, batch_size=32, epochs=1, max_len=64))
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(lr=1e-3, batch_size=32, epochs=1, max_len=64))
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        for key, allowed in (("method", METHODS), ("hpa", HPA_KINDS), ("keep", KEEP),
                             ("dpo_reference", ("stage", "sft"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.n_parts < 1:
            raise ValueError(f"n_parts must be >= 1, got {self.n_parts}")
        if self.method == "rlhf_pt" and self.hpa == "ppo":  # run_ppo has no SFT-loss mixing yet
            raise ValueError("method rlhf_pt needs hpa: dpo (mixing the SFT loss into PPO is not implemented)")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _convert(value: Any, hint, where: str) -> Any:
    """Coerce a YAML / command-line value to the field's type; errors name the key."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, where)
    text = str(hint)
    if value is None:
        if "None" not in text:
            raise ValueError(f"{where} cannot be null")
        return None
    for kind in (bool, int, float, str):
        if hint is kind or text.startswith(kind.__name__ + " |") or text == f"{kind.__name__} | None":
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{where} must be an integer, got {value!r}")
            if kind is float:
                if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
                    try:
                        value = float(value)
                    except ValueError:
                        pass
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{where} must be a number, got {value!r}")
                return float(value)
            if kind is str and not isinstance(value, str):
                raise ValueError(f"{where} must be a string, got {value!r}")
            return value
    if "list" in text:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError(f"{where} must be a list of strings, got {value!r}")
        return list(items)
    return value


def from_dict(cls, data: dict, where: str = "config"):
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown key {where}.{unknown[0]}; valid keys of {where}: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"sft.lr=3e-4"`` -> (["sft", "lr"], 3e-4); the value is parsed as YAML (numbers, true, null, lists)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. sft.lr=3e-4)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ValueError(f"override {text!r} has an empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | None = None, overrides=None) -> TrainConfig:
    """TrainConfig from a YAML file (or the defaults when path is None) plus ``key=value`` overrides.

    A ``method`` preset (hbat.trainer.methods) is applied first; explicit keys of the file and the overrides
    win over the preset.
    """
    import yaml

    from .methods import preset

    data: dict = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping of config keys")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    method = data.get("method", TrainConfig.method)
    # sections given partially keep the run's defaults (TrainConfig()) for the keys they leave out
    merged = _deep_merge(_deep_merge(to_dict(TrainConfig()), preset(method)), data)
    return from_dict(TrainConfig, merged)


def _deep_merge(base: dict, top: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_config(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
