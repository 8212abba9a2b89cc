"""The shared pieces of the trainer tests: tiny Hugging Face models, tokenizers and user data, made here (no
download), and stand-ins.

- ``char_tokenizer()`` / ``tiny_llama(tokenizer)``: a character tokenizer and an untrained 2-layer Llama for the
  stage tests (SFT, DPO, reward model, PPO, evaluation);
- ``train_tokenizer()``: a byte-level BPE tokenizer trained locally on the embedded task's text, with BOS, EOS,
  pad and a chat template (``CHAT_TEMPLATE``);
- ``save_causal_lm(folder, tokenizer, kind)``: a tiny ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` (tied
  embeddings) built from a config and saved with ``save_pretrained``, with its tokenizer;
- ``save_reward_model(folder, tokenizer)``: a tiny one-label ``LlamaForSequenceClassification`` (an
  ``AutoModelForSequenceClassification`` checkpoint), with or without a tokenizer of its own;
- ``write_user_data(folder, n_rows)``: SFT and preference JSONL of the embedded task's rows;
- ``user_run(folder, tokenizer)``: a model and the data in ``folder``, and the overrides of a tiny run on them;
  ``write_user_run(folder)``: the same with the embedded model and a ``run.yaml`` (the CLI tests);
- ``TINY``: the overrides of a tiny run on the embedded task; ``RecordingEWC``: stands in for HybridEWC.
"""
from __future__ import annotations

from pathlib import Path

import torch

# the tiny embedded-task run of the trainer tests
TINY = ["model.size=tiny", "model.pretrain_steps=0", "sft.batch_size=8", "sft.max_steps=2", "dpo.batch_size=8",
        "dpo.max_steps=2", "reward.batch_size=8", "eval.kl_samples=4", "eval.max_new_tokens=6", "eval.batch_size=8",
        "save_model=false", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.max_steps=1", "ppo.max_new_tokens=6",
        "ppo.cold_start_steps=0"]
# the same on a user's model (user_run): every stage a few steps, one small evaluation
TINY_USER = [o for o in TINY if not o.startswith(("model.", "eval."))] + [
    "reward.max_steps=2", "eval.kl_samples=2", "eval.max_new_tokens=3", "eval.batch_size=4", "data.val_size=4",
    "data.max_val=4", "ppo.max_new_tokens=3"]

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONTEXT = 256  # every token budget of the tiny runs fits (evaluation: 128 prompt tokens + new tokens)


# --- the stage tests --------------------------------------------------------------------------------------------

def char_tokenizer():
    """A character-level tokenizer made locally (no download): <pad>=0, <s>=1 (prepended), </s>=2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?\n"))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


class RecordingEWC:
    """Stands in for hbat.HybridEWC: records each apply_ call, then adds a known gradient to one tensor."""

    def __init__(self, model, add=0.0):
        self.model, self.add, self.calls = model, add, []

    def apply_(self):
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad.clone() for p in params]
        next(self.model.parameters()).grad.add_(self.add)
        norm_after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        self.calls.append({"grads": grads, "norm_after": norm_after.item()})
        return torch.tensor(0.5)


# --- saved models and user data ---------------------------------------------------------------------------------

def task_rows(n_rows: int, n_pretrain: int = 0):
    from hbat.task import make_task

    return make_task(seed=1, n_sft=n_rows, n_pref=n_rows, n_prompts=0, n_val=0, n_pretrain=n_pretrain)


def train_tokenizer(vocab_size: int = 300):
    """Byte-level BPE trained on the task's text: lossless decoding, ``<s>`` prepended, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    task = task_rows(64, n_pretrain=16)
    texts = task.pretrain_texts + [r["prompt"] + r["response"] for r in task.sft_train]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="right")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(kind: str, tokenizer, **overrides):
    """A 2-layer, 32-wide config of ``kind`` ("llama" or "qwen2", tied embeddings) for ``tokenizer``."""
    from transformers import LlamaConfig, Qwen2Config

    settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    settings.update(overrides)
    if kind == "llama":
        return LlamaConfig(tie_word_embeddings=False, **settings)
    if kind == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **settings)
    raise ValueError(f"unknown kind {kind!r}")


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def save_causal_lm(folder, tokenizer, kind: str = "llama", seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    _seeded(lambda: AutoModelForCausalLM.from_config(tiny_config(kind, tokenizer)), seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_reward_model(folder, tokenizer, kind: str = "llama", seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A one-label sequence classifier for ``tokenizer``; saved with it unless ``with_tokenizer`` is False."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(folder)
    config = tiny_config(kind, tokenizer, num_labels=1)
    _seeded(lambda: AutoModelForSequenceClassification.from_config(config), seed).save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return folder


def write_user_data(folder, n_rows: int) -> tuple[Path, Path]:
    """``folder/sft.jsonl`` and ``folder/pref.jsonl``: ``n_rows`` rows each of the embedded task."""
    from hbat.data import write_jsonl

    folder = Path(folder)
    task = task_rows(n_rows)
    write_jsonl(task.sft_train, folder / "sft.jsonl")
    write_jsonl(task.pref_train, folder / "pref.jsonl")
    return folder / "sft.jsonl", folder / "pref.jsonl"


def user_run(folder, tokenizer, *, kind: str = "llama", n_rows: int = 24, extra=()) -> list[str]:
    """A model of ``kind`` (``folder/model``) and JSONL data saved in ``folder``; the overrides of a tiny run on
    them, output in ``folder/out``."""
    folder = Path(folder)
    model = save_causal_lm(folder / "model", tokenizer, kind)
    sft, pref = write_user_data(folder, n_rows)
    return TINY_USER + [f"model.path={model}", f"data.sft={sft}", f"data.preference={pref}",
                        f"output_dir={folder / 'out'}", *extra]


def write_user_run(folder, *, n_rows: int, val_size: float) -> Path:
    """A user's run in ``folder``: SFT and preference JSONL, the embedded tiny model saved with its tokenizer,
    and run.yaml (method hbat, output in ``folder/out``). Returns the config's path."""
    from hbat.task import build_model, build_tokenizer

    sft, pref = write_user_data(folder, n_rows)
    tokenizer = build_tokenizer()
    build_model(tokenizer, size="tiny").save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    config = folder / "run.yaml"
    config.write_text(f"method: hbat\noutput_dir: {folder / 'out'}\nmodel:\n  path: {folder / 'model'}\n"
                      f"data:\n  sft: {sft}\n  preference: {pref}\n  val_size: {val_size}\n")
    return config


def param_bytes(module) -> int:
    """Bytes of the parameters of ``module`` (a tied tensor once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
