"""The configuration of a training run: nested dataclasses, loadable from YAML, overridable with key=value.

    cfg = load_config("run.yaml", overrides=["method=hbat", "sft.lr=3e-4", "ewc.f_max=50"])

Every field has its default here, with a comment saying what it does; ``hbat train --print-config`` shows the
resolved configuration. Unknown keys and duplicate YAML keys are errors naming the key; every field is checked
(type, range, choice) by its dataclass and the whole resolved config by ``hbat.trainer.validate`` when it is
loaded, each error naming the dotted key (``config.eval.batch_size must be >= 1, got 0``). Reading the YAML and
the overrides, and turning them into these dataclasses: ``hbat.trainer.config_io``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..baselines.freeze import FREEZE_BY
from ..data import ADAPTERS
from ..ewc import L2SP
from ..importance import IMPORTANCE_MODES
from ..task import MODEL_SIZES
from .checks import FLOAT32_MAX, booleans, choice, fail, integers, learning_rates, numbers, paths, patterns
from .config_io import apply_overrides, from_dict, read_yaml_file
from .dpo import DPOConfig
from .methods import SPECS, preset
from .ppo import PPOConfig
from .reward import RewardConfig
from .sft import SFTConfig
from .validate import check_config

METHODS = tuple(SPECS)  # the method names: one table, hbat.trainer.methods.SPECS
HPA_KINDS = ("dpo", "ppo")
KEEP = ("best", "last")
DPO_REFERENCES = ("stage", "sft")
ANCHOR_DTYPES = ("float32", "bfloat16")
MODEL_DTYPES = ("float32", "bfloat16", "auto")
GROUP_BY = ("layer",)
SEED_LIMIT = 2**32  # stage seeds are seed * 1000 + stage: they stay in every RNG's range


@dataclass
class ModelConfig:
    path: str | None = None           # local transformers causal-LM folder; None: the embedded task's tiny Llama
    tokenizer: str | None = None      # tokenizer folder (None: same as path, or the embedded task's tokenizer)
    size: str = "small"               # embedded model: "tiny" (tests), "small" (~0.22M, the demo), "base" (~0.8M)
    pretrain_steps: int = 2000        # embedded only: pre-training on generated text before anything else (600 left
    #                                   the SFT model's skill at 0.81 to 1.0 depending on the seed: docs/results/spread.md)
    pretrain_lr: float = 3e-3         # embedded only
    pretrain_batch_size: int = 32     # embedded only
    # precision and memory (hbat.trainer.models; the memory plan: hbat.trainer.memory)
    dtype: str = "float32"            # of every model held: float32, bfloat16, or auto (bfloat16 on a CUDA device
    #                                   that supports it, float32 on the CPU; under DeepSpeed: the JSON's bf16)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    lora_r: int = 0                   # LoRA rank through peft (0: off): only the adapters train
    lora_alpha: float = 32.0          # LoRA scaling alpha / r
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # module names to adapt (None: peft's default for the model)
    # bring your own models (need model.path)
    sft_path: str | None = None       # an SFT causal-LM folder: the KL / win-rate reference and the reward model's
    #                                   start (no SFT model is trained)
    reward_path: str | None = None    # an AutoModelForSequenceClassification folder (one label), with its own
    #                                   tokenizer or the policy's (no reward model is trained)

    def __post_init__(self):
        paths(self, "path", "tokenizer", "sft_path", "reward_path")
        choice(self, "size", MODEL_SIZES)
        choice(self, "dtype", MODEL_DTYPES)
        integers(self, 0, "pretrain_steps", "lora_r")
        integers(self, 1, "pretrain_batch_size")
        numbers(self, "pretrain_lr", "lora_alpha", strict=True)
        learning_rates(self, "pretrain_lr")
        numbers(self, "lora_dropout")
        if self.lora_dropout >= 1:
            fail(self, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        booleans(self, "gradient_checkpointing")
        patterns(self, "lora_target_modules")


@dataclass
class DataConfig:
    # each of sft / preference / prompts: a JSONL, JSON or parquet file, a save_to_disk folder, another folder or a
    # data set name that datasets.load_dataset reads; rows in hbat's or TRL's formats (docs/trainer.md, "Data")
    sft: str | None = None            # SFT rows, e.g. {prompt, response} or {messages}; None: the embedded task
    preference: str | None = None     # preference rows, e.g. {prompt, chosen, rejected}
    prompts: str | None = None        # PPO prompts, e.g. {prompt} (None: the preference prompts)
    sft_split: str = "train"          # the split of data.sft to use (where it has several)
    preference_split: str = "train"
    prompts_split: str = "train"
    sft_adapter: str | None = None    # hbat.data.ADAPTERS name mapping other field names (e.g. "tldr_sft")
    preference_adapter: str | None = None
    prompts_adapter: str | None = None
    val_size: float = 0.1             # share (or count, if >= 1) of each data set held out for validation
    max_val: int = 200                # at most this many validation rows per set (evaluation time)
    # embedded task (hbat.task.make_task)
    task_n_sft: int = 3000
    task_n_pref: int = 2000
    task_n_val: int = 2000            # validation prompts: exact match to +-0.01 (200: +-0.03; docs/results/spread.md)
    task_conflict: float = 0.5        # share of preference pairs whose chosen answer fails the skill

    def __post_init__(self):
        paths(self, "sft", "preference", "prompts")
        for name in ("sft_split", "preference_split", "prompts_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                fail(self, name, f"must be a split name (e.g. train), got {getattr(self, name)!r}")
        for name in ("sft_adapter", "preference_adapter", "prompts_adapter"):
            choice(self, name, sorted(ADAPTERS), optional=True)
        numbers(self, "val_size", strict=True)
        if self.val_size >= 1 and not float(self.val_size).is_integer():
            fail(self, "val_size", f"must be a fraction in (0, 1) or a whole number of rows, got {self.val_size}")
        integers(self, 1, "max_val", "task_n_sft", "task_n_val")
        integers(self, 2, "task_n_pref")  # half of it are the PPO prompts
        numbers(self, "task_conflict", maximum=1.0)


@dataclass
class EWCConfig:
    f_max: float = 100.0              # F_max of eq. (6)/(9) (paper: 50 summarization, 100 dialogue)
    lam: float = 1.0                  # lambda of eq. (5)/(8)
    importance_mode: str = "normalized"  # normalized | paper | released | proportional | uniform (hbat.importance),
    #                                      or l2sp (F_i = 1 from the first stage: decay toward the anchor, hbat.ewc)
    importance_scale: float = 1.0     # temperature of the importance mode
    anchor_dtype: str = "float32"     # float32 or bfloat16
    include: list[str] | None = None  # fnmatch patterns of parameter names to penalise (None: all trainable)
    exclude: list[str] | None = None
    group_by: str | None = None       # None: one unit per tensor; "layer": one per transformer block
    freeze_fraction: float = 0.2      # method "freeze": share of tensors frozen instead of the penalty
    freeze_by: str = "tensors"        # "tensors" (paper) or "params"
    fisher_samples: int = 64          # method "fisher": samples of the previous stage for the Fisher estimate
    fisher_scale: float = 1.0         # method "fisher": multiplies the empirical Fisher

    def __post_init__(self):
        numbers(self, "f_max", "lam")
        if self.lam * self.f_max > FLOAT32_MAX:  # the penalty gradient lam * F * (p - a) is float32, F <= f_max
            fail(self, "lam", f"* f_max = {self.lam * self.f_max:.3g} overflows float32 (at most {FLOAT32_MAX:.3g}); "
                              "lower ewc.lam or ewc.f_max")
        numbers(self, "freeze_fraction", maximum=1.0)
        numbers(self, "importance_scale", "fisher_scale", strict=True)
        choice(self, "importance_mode", IMPORTANCE_MODES + (L2SP,))
        choice(self, "anchor_dtype", ANCHOR_DTYPES)
        choice(self, "group_by", GROUP_BY, optional=True)
        choice(self, "freeze_by", FREEZE_BY)
        patterns(self, "include", "exclude")
        integers(self, 1, "fisher_samples")


@dataclass
class EvalConfig:
    max_new_tokens: int = 12          # greedy decoding length for exact match / reward / preference
    max_prompt_len: int = 128         # prompt tokens kept (the last ones) for the evaluation's generation
    batch_size: int = 32
    kl_samples: int = 64              # prompts sampled for the KL-to-SFT estimate (0: skip)
    kl_to_start_every: int = 0        # forgetting meter: ewc/kl_to_start every N optimizer steps (0: off)
    kl_to_start_rows: int = 16        # held-out rows of the stage's task it is measured on

    def __post_init__(self):
        integers(self, 1, "max_new_tokens", "max_prompt_len", "batch_size", "kl_to_start_rows")
        integers(self, 0, "kl_samples", "kl_to_start_every")


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
    ema_anchor: float = 0.0           # EMA anchor of each DPO stage (rate per step; it ends on the anchor; 0: off)
    save_model: bool = True           # write the kept model with save_pretrained at the end
    deepspeed: str | None = None      # path to a DeepSpeed JSON config (multi-process runs, see docs/distributed.md)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(lr=1e-3, batch_size=32, epochs=12, max_len=64))
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(lr=3e-5, batch_size=32, epochs=1, max_len=64))
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(lr=1e-3, batch_size=32, epochs=1, max_len=64))
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        paths(self, "output_dir", "deepspeed")
        if self.output_dir is None:
            fail(self, "output_dir", "must be a folder path, got null")
        integers(self, 0, "seed", maximum=SEED_LIMIT - 1)
        integers(self, 1, "n_parts")
        for key, allowed in (("method", METHODS), ("hpa", HPA_KINDS), ("keep", KEEP),
                             ("dpo_reference", DPO_REFERENCES)):
            choice(self, key, allowed)
        numbers(self, "mix_coef")
        numbers(self, "ema_anchor", maximum=1.0)
        if self.ema_anchor and (self.hpa == "ppo" or not SPECS[self.method].hpa):
            fail(self, "ema_anchor", f"needs DPO stages (hpa=dpo and a method with HPA stages; method {self.method}, "
                 f"hpa {self.hpa}): the EMA anchor follows DPO's optimizer steps")
        if self.ema_anchor and self.model.lora_r:
            fail(self, "ema_anchor", "is not supported with LoRA (model.lora_r > 0): the average of the adapter "
                 "factors is not the average of their product")
        booleans(self, "save_model")
        if self.method == "freeze" and self.ewc.importance_mode == L2SP:  # F_i = 1 everywhere ranks nothing
            fail(self, "ewc.importance_mode", "l2sp gives every tensor the same importance; method freeze needs a "
                 "ranking (use normalized, paper, released or proportional)")
        if self.method == "rlhf_pt" and self.hpa == "ppo":  # run_ppo has no SFT-loss mixing yet
            fail(self, "hpa", "must be dpo with method rlhf_pt (mixing the SFT loss into PPO is not implemented)")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | None = None, overrides=None) -> TrainConfig:
    """TrainConfig from a YAML file (or the defaults when path is None) plus ``key=value`` overrides.

    A ``method`` preset (hbat.trainer.methods) is applied first; explicit keys of the file and the overrides
    win over the preset. The result is validated whole (``hbat.trainer.validate.check_config``): every error
    names its dotted key, and comes before anything is built or trained.
    """
    data: dict = {}
    if path is not None:
        loaded = read_yaml_file(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping of config keys")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    method = data.get("method", TrainConfig.method)
    # sections given partially keep the run's defaults (TrainConfig()) for the keys they leave out
    merged = _deep_merge(_deep_merge(to_dict(TrainConfig()), preset(method) if isinstance(method, str) else {}), data)
    cfg = from_dict(TrainConfig, merged)
    check_config(cfg)
    return cfg


def _deep_merge(base: dict, top: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_config(cfg: TrainConfig) -> str:
    import yaml  # optional: pyyaml comes with hbat[train]

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
