"""A character-level tokenizer for the embedded task, made locally (no download).

Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then the characters of ``task_alphabet()`` in sorted
order, one token each. The tokenizer prepends ``<s>`` when asked for special tokens (prompts, pre-training
text) and never appends ``</s>``: hbat.data.encode_sft appends EOS to responses itself. ``padding_side`` is
"right" as training uses it; generation pads on the left through ``hbat.data.collate(padding_side="left")``
(or set ``tokenizer.padding_side = "left"`` before calling the tokenizer on a batch).
"""
from __future__ import annotations

from .generator import task_alphabet

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def build_tokenizer(alphabet: str | None = None):
    """A ``transformers.PreTrainedTokenizerFast`` covering exactly ``alphabet`` (default: the task's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(task_alphabet() if alphabet is None else alphabet))
    if not chars:
        raise ValueError("alphabet is empty")
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")
