"""Conversations (lists of ``{"role", "content"}`` turns) rendered to prompt and completion text with a
tokenizer's chat template, so that the prompt / completion boundary is exact.

As TRL does (``trl.apply_chat_template``): the prompt turns are rendered with ``add_generation_prompt=True``
(or, when the last prompt turn is the assistant's, ``continue_final_message=True``), each prompt + completion
conversation is rendered whole, the prompt text is the part all of these renderings share (a no-op for
most templates), and each completion is the rest of its conversation.

Two adjustments make the text tokenise as hbat tokenises every row (hbat.data.tokenization: the prompt with
the tokenizer's special tokens, the completion without, EOS appended unless it is already there):

- a BOS the template writes is removed from the front of the prompt text when the tokenizer adds that BOS
  itself, so it is not doubled;
- whitespace after a completion's final EOS (e.g. the newline after Qwen's ``<|im_end|>`` where that is the
  EOS) is removed, so the completion ends with the EOS and none is added.
"""
from __future__ import annotations

import functools

from .errors import FieldProblem

Turns = list[dict]


class ChatTemplate:
    """Renders conversations with ``tokenizer``'s chat template; errors name the field being rendered."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def prompt(self, key: str, turns: Turns) -> str:
        """The prompt text of ``turns`` (field ``key``), ending where the assistant's answer starts."""
        return self._strip_bos(self._apply(key, turns, prompt=True))

    def render(self, key: str, prompt: Turns, completions: dict[str, Turns]) -> tuple[str, dict[str, str]]:
        """(prompt text, {completion field: completion text}) of ``prompt`` (field ``key``) and each completion."""
        prompt_text = self._apply(key, prompt, prompt=True)
        whole = {field: self._apply(field, prompt + turns, prompt=False) for field, turns in completions.items()}
        shared = len(prompt_text)
        for text in whole.values():
            shared = common_prefix_length(prompt_text[:shared], text)
        return self._strip_bos(prompt_text[:shared]), {field: self._end(text[shared:]) for field, text in whole.items()}

    def _apply(self, key: str, turns: Turns, *, prompt: bool) -> str:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise FieldProblem(key, f"field {key!r} is a conversation (a list of turns): rendering it needs a "
                                    "tokenizer with a chat template (pass tokenizer=...)")
        if not getattr(tokenizer, "chat_template", None):
            raise FieldProblem(key, f"field {key!r} is a conversation (a list of turns), but the tokenizer has no chat "
                                    "template to render it: give the tokenizer one (chat_template.jinja or "
                                    "tokenizer_config.json in its folder), or the data as text")
        continues = prompt and turns[-1]["role"] == "assistant"  # a prefilled answer is continued, not restarted
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt and not continues,
                                                 continue_final_message=continues)
        except Exception as exc:  # noqa: BLE001 - a template's own error (e.g. raise_exception): named with the row
            reason = " ".join(str(exc).split())[:300]
            raise FieldProblem(key, f"the tokenizer's chat template cannot render field {key!r} "
                                    f"({type(exc).__name__}: {reason})") from None
        if not isinstance(text, str):
            raise FieldProblem(key, f"the tokenizer's chat template rendered field {key!r} as "
                                    f"{type(text).__name__}, not text")
        return text

    def _strip_bos(self, text: str) -> str:
        bos = self._bos_the_tokenizer_adds
        return text[len(bos):] if bos and text.startswith(bos) else text

    @functools.cached_property
    def _bos_the_tokenizer_adds(self) -> str | None:
        tokenizer = self.tokenizer
        bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
        adds = bos and bos_id is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos_id]
        return bos if adds else None

    def _end(self, completion: str) -> str:
        eos = getattr(self.tokenizer, "eos_token", None)
        return completion.rstrip() if eos and completion.rstrip().endswith(eos) else completion


def common_prefix_length(a, b) -> int:
    """Length of the longest common prefix of two strings or two lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
