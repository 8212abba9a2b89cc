"""The models of a run: precision, gradient checkpointing, LoRA, and the user's own SFT and reward models.

Precision (``model.dtype``): every model the run holds (the policy, the SFT model, the reward model, the PPO
critic and reference) is built or loaded in that dtype. ``auto`` is bfloat16 on a CUDA device that supports
it and float32 on the CPU (bf16 matrix products are slow on most CPUs); under DeepSpeed it follows the JSON's
``bf16`` section. Trained bf16 weights are stepped through fp32 master copies (hbat.trainer.optimizer). The
EWC anchor keeps ``ewc.anchor_dtype``.

Gradient checkpointing (``model.gradient_checkpointing``): transformers' own, non-reentrant, on every model
a stage trains. transformers recomputes only in train mode, so PPO (which runs its models in eval mode, dropout
off) puts a checkpointed model in train mode for its updates with dropout disabled (``no_dropout``).

LoRA (``model.lora_r > 0``, peft): the policy is the base with fresh adapters (seeded; peft keeps them in fp32
when the base is bf16), and only the adapters train, so the EWC units are the adapters. The reference of DPO
(``dpo_reference: stage``) and of PPO is the base with the adapters disabled (``base_of``): no second copy of
the model. The shared SFT model and reward model are trained with adapters too, then merged
(``merge_and_unload``); the PPO critic trains adapters on a copy of the reward model's backbone (its head
trains whole). The saved result is the adapter (``PeftModel.from_pretrained`` loads it onto the base).

Loading (``load_pretrained``): a user's model folder must hold exactly the weights its config.json describes.
transformers would initialise a missing or size-mismatched weight at random and only log it; here any missing,
unexpected or size-mismatched weight stops the run before anything trains, naming the keys. The heads the
trainer adds itself (the reward model's score head on the SFT model, a PPO critic's value head) are built in
Python on a loaded model (hbat.trainer.reward, hbat.trainer.ppo), never left to transformers to invent.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys

import torch
from torch import nn

from ..errors import UserError, reading
from .ds_config import bf16_enabled, load_ds_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
NAMED_KEYS = 3  # keys a weight-mismatch error names, then a count


def pick_device() -> torch.device:
    """The device of this process: its rank's GPU under a launcher, the GPU, or the CPU."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:  # one GPU per rank (torchrun / deepspeed)
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(cfg) -> torch.dtype:
    """``model.dtype`` of a TrainConfig as a torch dtype (``auto`` resolved as the module docstring says)."""
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    if cfg.deepspeed is not None:
        return torch.bfloat16 if bf16_enabled(load_ds_config(cfg.deepspeed)) else torch.float32
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_causal_lm(path: str, dtype, *, key: str = "model.path") -> nn.Module:
    """The causal LM of the folder ``path`` (named ``key`` in errors), its weights checked (``load_pretrained``)."""
    return load_pretrained("AutoModelForCausalLM", path, dtype, key=key, what="a causal LM")


def load_pretrained(auto_class: str, path: str, dtype, *, key: str, what: str) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(path, dtype=dtype)``, whose weights must match its config.json.

    Anything transformers cannot load (a pickle that is not weights, a broken config.json, a truncated file) and
    any missing, unexpected or size-mismatched weight (read from transformers' ``output_loading_info``) is a
    UserError naming ``key``, ``path`` and the first keys of each kind (then their count), before any training.
    transformers' own loading report (a table on stderr) is not printed: the error says what it would.
    """
    import transformers  # heavy, optional (hbat[train])

    with reading(what, path, key), _quiet("transformers.modeling_utils"):
        model, info = getattr(transformers, auto_class).from_pretrained(
            path, dtype=dtype, ignore_mismatched_sizes=True, output_loading_info=True)  # mismatches: in ``info``
    problems = []
    for kind, keys in (("missing from the weights", sorted(info.get("missing_keys") or ())),
                       ("unexpected (not in config.json's model)", sorted(info.get("unexpected_keys") or ()))):
        if keys:
            problems.append(f"{kind}: {_some(keys)}")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        problems.append("of another size: " + _some([f"{name} (weights {list(saved)}, config.json {list(wanted)})"
                                                     for name, saved, wanted in mismatched]))
    if problems:
        raise UserError(f"{key} = {path}: the weights do not match its config.json; {'; '.join(problems)} "
                        "(transformers would initialise these at random); use the config.json the weights were "
                        "saved with")
    return model


def _some(items: list[str]) -> str:
    """The first ``NAMED_KEYS`` items, then how many more."""
    named = ", ".join(items[:NAMED_KEYS])
    return named + (f" and {len(items) - NAMED_KEYS} more" if len(items) > NAMED_KEYS else "")


@contextlib.contextmanager
def _quiet(logger_name: str):
    """No record below ERROR from the logger ``logger_name`` inside. A filter, not a level: transformers reads its
    logger's level to decide what else to check and log (``verify_tp_plan`` runs when it is WARNING or more)."""
    logger = logging.getLogger(logger_name)

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    logger.addFilter(errors_only)
    try:
        yield
    finally:
        logger.removeFilter(errors_only)


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def load_tokenizer(folder: str, *, key: str):
    """``AutoTokenizer.from_pretrained(folder)``; whatever fails is a UserError naming ``key`` and the folder."""
    from transformers import AutoTokenizer  # heavy, optional (hbat[train])

    with reading("a tokenizer", folder, key):
        return AutoTokenizer.from_pretrained(folder)


def tokenizer_size(tokenizer) -> int:
    """How many token ids ``tokenizer`` can produce: its length, or its largest id + 1 if that is more."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


@contextlib.contextmanager
def deepspeed_unimported():
    """``save_pretrained`` inside, without importing DeepSpeed when nothing imported it yet (a run without
    DeepSpeed): transformers unwraps the model with accelerate's ``extract_model_from_parallel``, which imports
    DeepSpeed whenever it is installed, only to test ``isinstance(model, DeepSpeedEngine)``, and DeepSpeed's
    import prints "Setting accelerator to CPU" (and takes seconds). A model no DeepSpeed made is no engine."""
    try:
        from accelerate.utils import other  # optional (comes with hbat[trl]): see the docstring
    except ImportError:
        other = None
    if "deepspeed" in sys.modules or other is None or not hasattr(other, "is_deepspeed_available"):
        yield
        return
    available = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = available


# --- gradient checkpointing ---------------------------------------------------------------------------------------

def enable_gradient_checkpointing(module: nn.Module) -> nn.Module:
    """transformers' gradient (activation) checkpointing, non-reentrant (frozen inputs need no grad), on the
    outermost transformers model inside ``module``."""
    for sub in module.modules():
        if getattr(sub, "supports_gradient_checkpointing", False):
            if hasattr(sub, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
                sub.activation_checkpointing_enable({"use_reentrant": False})
            else:
                sub.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return module
    raise ValueError(f"{type(module).__name__} holds no transformers model that supports gradient checkpointing")


def is_checkpointed(module: nn.Module) -> bool:
    """Whether a layer of ``module`` recomputes its activations in backward."""
    return any(getattr(sub, "gradient_checkpointing", False) is True for sub in module.modules())


@contextlib.contextmanager
def no_dropout(*modules: nn.Module):
    """Every dropout of ``modules`` at 0 (restored after): ``nn.Dropout`` modules and the ``attention_dropout``
    rates attention layers read in train mode. Train mode that computes like eval mode."""
    saved = [(m, "p", m.p) for module in modules for m in module.modules() if isinstance(m, nn.Dropout)]
    saved += [(m, "attention_dropout", m.attention_dropout) for module in modules for m in module.modules()
              if isinstance(getattr(m, "attention_dropout", None), float)]
    for m, name, _ in saved:
        setattr(m, name, 0.0)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


# --- LoRA ---------------------------------------------------------------------------------------------------------

def is_lora(module) -> bool:
    """Whether ``module`` is a peft model (the LoRA policy or a LoRA backbone)."""
    return hasattr(module, "peft_config") and hasattr(module, "disable_adapter")


def with_lora(module: nn.Module, model_cfg, *, seed: int, task_type: str | None = "CAUSAL_LM") -> nn.Module:
    """``module`` with fresh LoRA adapters (``model.lora_*``; seeded, the global RNG is left as it was); its
    own weights are frozen. The module's layers are replaced in place."""
    from peft import LoraConfig, get_peft_model  # optional: hbat[lora], for model.lora_r > 0

    config = LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                        target_modules=model_cfg.lora_target_modules, task_type=task_type)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return get_peft_model(module, config)


def merge_lora(module: nn.Module) -> nn.Module:
    """The plain model of a peft model with its adapters merged into the weights."""
    return module.merge_and_unload() if is_lora(module) else module


class AdaptersDisabled(nn.Module):
    """The base model of a LoRA model: its forward runs with the adapters disabled (no copy of any weight)."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with no trainable parameter (a reference that must not follow it)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def base_of(policy: nn.Module) -> nn.Module | None:
    """The reference a stage uses instead of a copy of ``policy``: its base with the adapters disabled for a
    LoRA policy, else None (the caller's default: the policy itself, or a frozen copy)."""
    return AdaptersDisabled(policy) if is_lora(policy) else None


# --- the trained models of a run ----------------------------------------------------------------------------------

def prepare_trainee(module: nn.Module, model_cfg, *, seed: int, task_type: str | None = "CAUSAL_LM") -> nn.Module:
    """``module`` as a stage trains it: gradient checkpointing and LoRA adapters where the config asks."""
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    if model_cfg.lora_r:
        module = with_lora(module, model_cfg, seed=seed, task_type=task_type)
    return module
