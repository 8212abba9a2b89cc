"""The memory plan of a run: what each model and state it holds costs per device, before anything is loaded.

``plan_memory(cfg)`` sizes every piece from the models' configs alone (built on the "meta" device, no weight
read): the policy (its weights, gradients, AdamW state and, for bf16 weights, the fp32 master copies of
hbat.trainer.optimizer), the SFT model, the reward model, the PPO critic and reference, the EWC anchor (or the
Fisher baseline's state), the host copy of the base weights every method starts from (CPU runs), and the
activations of the largest micro-batch of the method's stages. That is what is alive together while a
method trains (the shared SFT and reward models are trained earlier, holding less). ``MemoryPlan.check()``
raises ``MemoryPlanError`` when the total exceeds what the device has free (CPU: MemAvailable, shared by
the ranks of this node; CUDA: ``torch.cuda.mem_get_info``), naming the biggest items and the settings that
would shrink them.

Estimates: weights, gradients, optimizer state and anchors are exact element counts times their dtype's
bytes. Activations are a model: per token, each decoder layer keeps ``ACTIVATION_FACTORS`` values of its
width (hidden and intermediate) in the model's dtype (with gradient checkpointing, one hidden state per layer
plus one layer's set), and the language-model head keeps ``LOGIT_BYTES`` per token and vocabulary entry (the
logits, their fp32 copy, the log-softmax and their gradients). ``benchmarks/bench_step.py`` compares the
total with the measured peak.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from ..errors import UserError, reading
from ..param_view import LocalParamView
from ..task import build_model, build_tokenizer
from .ds_config import bf16_enabled, load_ds_config, zero_stage
from .methods import spec
from .models import pick_device, resolve_dtype, with_lora

GIB = 1024 ** 3
ACTIVATION_FACTORS = (8, 3)   # values kept per token and layer: x hidden size, x intermediate size
LOGIT_BYTES = 16              # per token and vocabulary entry, training (besides the logits in the model dtype)
LOGIT_BYTES_FORWARD = 8       # the same in a forward without gradients (logits' fp32 copy, log-softmax)


class MemoryPlanError(UserError):
    """The memory plan does not fit the device; the message names the biggest items and what shrinks them."""


@dataclass
class Item:
    name: str
    dtype: str
    bytes: int
    shrink: str = ""  # the settings that make it smaller


@dataclass
class MemoryPlan:
    device: str
    items: list[Item] = field(default_factory=list)
    available: int | None = None  # bytes free on the device (None: unknown)

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    def add(self, name: str, dtype, numel: float, *, shrink: str = "", bytes_per: float | None = None) -> None:
        size = bytes_per if bytes_per is not None else torch.tensor([], dtype=dtype).element_size()
        if numel:
            self.items.append(Item(name, str(dtype).replace("torch.", ""), int(math.ceil(numel * size)), shrink))

    def as_dict(self) -> dict:
        return {"device": self.device, "total_bytes": self.total, "available_bytes": self.available,
                "items": [asdict(item) for item in self.items]}

    def table(self) -> str:
        rows = [f"  {item.name:<44} {item.dtype:>9} {_gib(item.bytes):>10}" for item in self.items]
        free = "unknown" if self.available is None else _gib(self.available)
        return "\n".join([f"memory plan per device ({self.device}; {free} free):", *rows,
                          f"  {'total':<44} {'':>9} {_gib(self.total):>10}"])

    def check(self) -> None:
        if self.available is None or self.total <= self.available:
            return
        biggest = sorted(self.items, key=lambda item: -item.bytes)[:3]
        parts = [f"{item.name} {_gib(item.bytes)}" + (f" ({item.shrink})" if item.shrink else "") for item in biggest]
        raise MemoryPlanError(f"memory plan: the run needs {_gib(self.total)} per device but {self.device} has "
                              f"{_gib(self.available)} free; the biggest items: {'; '.join(parts)}")


def _gib(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# --- model shapes, from configs on the meta device ----------------------------------------------------------------

@dataclass
class Shape:
    """Element counts of a causal LM: all, its backbone (no LM head), and its decoder's widths."""

    params: int
    backbone: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shape(model) -> Shape:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    return Shape(params=_count(model), backbone=_count(model.base_model), hidden=hidden,
                 intermediate=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
                 layers=getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer"),
                 vocab=getattr(text, "vocab_size"))


def meta_policy(cfg):
    """The run's causal LM on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        if cfg.model.path is None:
            return build_model(build_tokenizer(), size=cfg.model.size)
    return _meta_from(cfg.model.path, "AutoModelForCausalLM", "config.model.path")


def _meta_from(path: str, auto_class: str, key: str) -> object:
    import transformers  # heavy, optional (hbat[train])

    with torch.device("meta"), reading(f"a transformers model config ({auto_class})", path, key):
        return getattr(transformers, auto_class).from_config(transformers.AutoConfig.from_pretrained(path))


def lora_numel(model, model_cfg, task_type: str | None = "CAUSAL_LM") -> tuple[int, int]:
    """(elements of the LoRA adapters ``model.lora_*`` would add to ``model``, the summed input width of the
    layers they adapt), from a copy built on the meta device."""
    with torch.device("meta"):
        wrapped = with_lora(copy.deepcopy(model), model_cfg, seed=0, task_type=task_type)
    adapted = [m for m in wrapped.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    return (sum(p.numel() for p in wrapped.parameters() if p.requires_grad),
            sum(getattr(m.base_layer, "in_features", 0) for m in adapted))


# --- the plan -----------------------------------------------------------------------------------------------------

def plan_memory(cfg, *, device: torch.device | None = None, world: int | None = None) -> MemoryPlan:
    """The memory plan of ``cfg`` (module docstring) on ``device`` (default: the run's), per rank of ``world``."""
    device = device or pick_device()
    method = spec(cfg.method)
    m = cfg.model
    dtype = resolve_dtype(cfg)
    zero, world = 0, world or int(os.environ.get("WORLD_SIZE", "1"))
    trained_dtype = dtype
    if cfg.deepspeed is not None:
        raw = load_ds_config(cfg.deepspeed)
        zero = zero_stage(raw)

        trained_dtype = torch.bfloat16 if bf16_enabled(raw) else torch.float32
    plan = MemoryPlan(device=str(device), available=available_bytes(device))

    meta = meta_policy(cfg)
    shape = _shape(meta)
    trainable, lora_width = lora_numel(meta, m) if m.lora_r else (shape.params, 0)
    lora_hint = "model.lora_r > 0 trains adapters only"
    half_hint = "model.dtype: bfloat16 halves it" if dtype == torch.float32 else ""
    shard = {"weights": world if zero == 3 else 1, "grads": world if zero >= 2 else 1,
             "optimizer": world if zero >= 1 else 1}
    zero_hint = "" if cfg.deepspeed is None else f"ZeRO-{min(zero + 1, 3)} partitions it over the ranks"

    # the policy: frozen base + adapters with LoRA (peft keeps them in fp32), else every weight trained
    if m.lora_r:
        plan.add("policy weights (frozen base)", dtype, shape.params, shrink=half_hint)
        plan.add("policy LoRA adapters", torch.float32, trainable)
    else:
        plan.add("policy weights", trained_dtype, shape.params / shard["weights"], shrink=half_hint)
    _trained_state(plan, "policy", trainable, torch.float32 if m.lora_r else trained_dtype, shard,
                   lora_hint if not m.lora_r else "", zero_hint, deepspeed=cfg.deepspeed is not None)

    # the frozen models every method holds: the SFT model (KL / win-rate reference) and the reward model
    sft_params = shape.params
    if m.sft_path:
        sft_params = _count(_meta_from(m.sft_path, "AutoModelForCausalLM", "config.model.sft_path"))
    plan.add("SFT model (frozen)", dtype, sft_params, shrink=half_hint)
    if m.reward_path:
        reward = _count(_meta_from(m.reward_path, "AutoModelForSequenceClassification", "config.model.reward_path"))
    else:
        reward = shape.backbone + shape.hidden + 1
    plan.add("reward model (frozen)", dtype, reward, shrink=half_hint)
    if device.type == "cpu":  # Workspace.base_state: fresh policies start from it (on the host)
        plan.add("base weights (host copy)", dtype, shape.params, shrink=half_hint)

    ppo = method.hpa and cfg.hpa == "ppo"
    if ppo:
        critic = lora_numel(meta.base_model, m, task_type=None)[0] + shape.hidden + 1 if m.lora_r else reward
        plan.add("PPO critic weights", dtype, reward, shrink=half_hint)
        _trained_state(plan, "PPO critic", critic, torch.float32 if m.lora_r else dtype, {"grads": 1, "optimizer": 1},
                       lora_hint if not m.lora_r else "", "", deepspeed=False)
        if not m.lora_r:
            plan.add("PPO reference (copy of the policy)", dtype, shape.params, shrink=lora_hint + " (the base is the "
                     "reference)")
    elif method.hpa and not cfg.dpo.precompute_ref_logprobs and cfg.dpo_reference == "stage" and not m.lora_r:
        plan.add("DPO reference (copy of the policy)", dtype, shape.params,
                 shrink="dpo.precompute_ref_logprobs: true holds none")

    selected = _ewc_numel(meta, cfg, trainable) / shard["optimizer"]
    if method.regularizer in ("hbat", "freeze"):
        plan.add("EWC anchor", {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.ewc.anchor_dtype], selected,
                 shrink="ewc.anchor_dtype: bfloat16 halves it" if cfg.ewc.anchor_dtype == "float32" else "")
    elif method.regularizer == "fisher":
        plan.add("Fisher EWC anchor and per-element Fisher", torch.float32, 2 * selected)

    if cfg.ema_anchor:  # hbat.trainer.ema
        plan.add("EMA anchor (a copy of the trained weights)", torch.float32 if m.lora_r else trained_dtype, trainable,
                 shrink="ema_anchor: 0 holds none")
    if cfg.eval.kl_to_start_every:  # hbat.trainer.forgetting: the stage's start weights
        plan.add("forgetting meter (start copy of the trained weights)", torch.float32 if m.lora_r else trained_dtype,
                 trainable, shrink="eval.kl_to_start_every: 0 holds none")
    plan.add("activations (largest micro-batch)", dtype,
             _activation_bytes(cfg, shape, dtype, world, ppo, method, lora_width),
             bytes_per=1, shrink="model.gradient_checkpointing: true, more *.grad_accum_steps or a shorter *.max_len")
    return plan


def _trained_state(plan: MemoryPlan, who: str, numel: int, dtype, shard: dict, lora_hint: str, zero_hint: str, *,
                   deepspeed: bool) -> None:
    """Gradients, AdamW moments and (bf16 weights) fp32 master copies of ``numel`` trained elements."""
    hint = "; ".join(h for h in (lora_hint, zero_hint) if h)
    # a bf16 gradient becomes fp32 at the step (TorchStepper): 4 bytes an element at the peak either way
    plan.add(f"{who} gradients", dtype if deepspeed else torch.float32, numel / shard["grads"], shrink=hint)
    plan.add(f"{who} AdamW state (2 x fp32)", torch.float32, 2 * numel / shard["optimizer"], shrink=hint)
    if dtype != torch.float32:
        plan.add(f"{who} fp32 master weights", torch.float32, numel / shard["optimizer"], shrink=hint)


def _ewc_numel(meta, cfg, trainable: int) -> int:
    if cfg.model.lora_r or not (cfg.ewc.include or cfg.ewc.exclude):
        return trainable

    view = LocalParamView(meta.named_parameters(), include=cfg.ewc.include, exclude=cfg.ewc.exclude)
    return sum(view.unit_numel)


def _activation_bytes(cfg, shape: Shape, dtype, world: int, ppo: bool, method, lora_width: int) -> float:
    """Bytes of the largest micro-batch's forward and backward (module docstring), over the method's stages.
    ``lora_width``: the summed input width of the LoRA layers, whose inputs peft keeps again (cast to the fp32
    adapters' dtype, and after the adapter dropout with its mask)."""
    width = torch.tensor([], dtype=dtype).element_size()
    per_layer = ACTIVATION_FACTORS[0] * shape.hidden + ACTIVATION_FACTORS[1] * shape.intermediate
    lora = lora_width * (4 * (dtype != torch.float32) + 5 * (cfg.model.lora_dropout > 0))
    if cfg.model.gradient_checkpointing:  # the layer inputs, and one layer recomputed at a time
        per_token = (shape.layers * shape.hidden + per_layer) * width + lora / max(shape.layers, 1)
    else:
        per_token = shape.layers * per_layer * width + lora
    head = shape.vocab * (width + LOGIT_BYTES)  # logits, their fp32 copy, the log-softmax and the gradients

    def train(rows: float, length: int) -> float:
        return math.ceil(rows) * length * (per_token + head)

    def forward(rows: float, length: int) -> float:  # no gradients: one layer's values and the logits
        return math.ceil(rows) * length * (per_layer * width + shape.vocab * (width + LOGIT_BYTES_FORWARD))

    s, d, p = cfg.sft, cfg.dpo, cfg.ppo
    candidates = [train(s.batch_size / (world * s.grad_accum_steps), s.max_len)]
    if method.hpa and not ppo or method.mix == "hpa_in_sft":
        candidates += [train(2 * d.batch_size / (world * d.grad_accum_steps), d.max_len),
                       forward(2 * d.eval_batch_size, d.max_len)]
    if ppo:
        length = p.max_prompt_len + p.max_new_tokens
        candidates += [train(p.mini_batch_size, length), forward(p.batch_size, length)]
    return max(candidates)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's free bytes, or the host's MemAvailable shared by this node's ranks;
    None where it cannot be known (e.g. a CUDA plan made on a machine without one)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except OSError:
        pass
    return None
