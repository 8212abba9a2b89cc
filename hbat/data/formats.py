"""The three data kinds, the row formats each accepts (hbat's and TRL's), and loading them from any source.

Every loaded row is text, ready to tokenise (extra fields dropped unless ``keep_extra=True``):

- SFT (instruction following, eq. 2):  ``{"prompt": str, "response": str}``; response non-empty.
- preference (DPO, reward model):      ``{"prompt": str, "chosen": str, "rejected": str}``; both non-empty.
- PPO prompts:                          ``{"prompt": str}``; non-empty.

The prompt is the exact text the model is conditioned on and the completion follows it directly: ``prompt +
response`` is the full text. The tokenisation helpers (hbat.data.tokenization) tokenise the two parts separately
so the boundary between them is exact.

Row formats accepted (TRL's names; a field is text, or a conversation: a list of ``{"role", "content"}`` turns,
rendered with the tokenizer's chat template by hbat.data.chat, which needs ``tokenizer=``):

- SFT: ``{prompt, response}`` (hbat's), ``{prompt, completion}`` (prompt-completion; both text or both
  conversations), ``{messages}`` (a conversation: its last turn, the assistant's, is the response, every turn
  before it the prompt; earlier assistant turns are context, not trained; a text ``prompt`` beside it, as
  UltraChat has, is ignored), ``{text}`` (language modeling: the whole text is the response, the prompt is
  empty);
- preference: ``{prompt, chosen, rejected}`` (all text, or all conversations; a text prompt beside conversations
  is ignored, as TRL does, since those conversations hold the prompt), or ``{chosen, rejected}`` with an implicit
  prompt: the turns both conversations start with, or for text the raw Anthropic HH format (the prompt runs to
  the last ``"\\n\\nAssistant:"`` both share) or else the characters both start with (TRL's rule: a space
  before the first differing character goes to the completions);
- prompts: ``{prompt}`` (text or a conversation), the prompt of any preference or SFT row; that of
  ``{messages}`` is every turn before a final assistant turn.

Sources: hbat.data.sources (JSONL / JSON / parquet files, ``save_to_disk`` folders, folders and data set names
``datasets.load_dataset`` reads, lists, ``datasets`` objects); ``split`` picks the split where there are several.
Errors name the source, the place (line, item or row) and the field; a row that matches no format lists the
fields it has and the formats accepted.

``adapter`` maps a source row to one of the formats before it is recognised: a name in ``hbat.data.ADAPTERS``
or any callable ``row -> row``. A ``KeyError`` raised by the adapter becomes a DataError naming the missing key.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable

from .adapters import ADAPTERS
from .chat import ChatTemplate, Turns, common_prefix_length
from .errors import DataError, FieldProblem
from .sources import SINGLE_FILE_SPLIT, iter_source
from .tokenization import TOKEN_IDS

SFT_FIELDS = ("prompt", "response")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt",)
HH_ASSISTANT = "\n\nAssistant:"

Adapter = Callable[[dict], dict]
Normalizer = Callable[[dict, ChatTemplate], dict]


def load_sft(source, *, adapter: str | Adapter | None = None, keep_extra: bool = False, tokenizer=None,
             split: str = SINGLE_FILE_SPLIT) -> list[dict]:
    """Rows ``{"prompt", "response"}`` from ``source`` (see the module docstring)."""
    return _load(source, adapter, sft_fields, keep_extra, tokenizer, split)


def load_preference(source, *, adapter: str | Adapter | None = None, keep_extra: bool = False, tokenizer=None,
                    split: str = SINGLE_FILE_SPLIT) -> list[dict]:
    """Rows ``{"prompt", "chosen", "rejected"}`` from ``source``."""
    return _load(source, adapter, preference_fields, keep_extra, tokenizer, split)


def load_prompts(source, *, adapter: str | Adapter | None = None, keep_extra: bool = False, tokenizer=None,
                 split: str = SINGLE_FILE_SPLIT) -> list[dict]:
    """Rows ``{"prompt"}`` from ``source``. SFT or preference rows are accepted too (their prompt is kept)."""
    return _load(source, adapter, prompt_fields, keep_extra, tokenizer, split)


def _resolve_adapter(adapter) -> Adapter | None:
    if adapter is None or callable(adapter):
        return adapter
    if isinstance(adapter, str):
        if adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r}; known adapters: {sorted(ADAPTERS)}")
        return ADAPTERS[adapter]
    raise TypeError(f"adapter must be None, a name in hbat.data.ADAPTERS or a callable, got {type(adapter).__name__}")


def _load(source, adapter, normalize: Normalizer, keep_extra: bool, tokenizer, split: str) -> list[dict]:
    adapt = _resolve_adapter(adapter)
    chat = ChatTemplate(tokenizer)
    rows = []
    for source_name, where, raw in iter_source(source, split):
        if not isinstance(raw, dict):
            raise DataError(source_name, where, None, f"expected a JSON object (dict), got {type(raw).__name__}")
        try:
            row = _adapted(adapt, raw) if adapt is not None else raw
            fields = normalize(row, chat)
        except FieldProblem as problem:
            raise DataError(source_name, where, problem.field, str(problem)) from None
        if keep_extra:
            fields = {**{k: v for k, v in row.items() if k != TOKEN_IDS}, **fields}
        rows.append(fields)
    return rows


def _adapted(adapt: Adapter, raw: dict) -> dict:
    try:
        row = adapt(raw)
    except FieldProblem:  # (a KeyError too) the adapter's own precise problem
        raise
    except KeyError as missing:
        key = missing.args[0] if missing.args else "?"
        raise FieldProblem(str(key), f"missing field {key!r}") from None
    if not isinstance(row, dict):
        raise FieldProblem(None, f"the adapter returned {type(row).__name__}, not a dict")
    return row


# --- the formats of each kind ----------------------------------------------------------------------------------

ACCEPTED = {  # for the error of a row that matches no format
    "SFT": "{prompt, response}, {prompt, completion}, {messages}, {text}",
    "preference": "{prompt, chosen, rejected}, {chosen, rejected} (an implicit prompt, e.g. Anthropic HH)",
    "prompt": "{prompt}, {messages}, or a preference or SFT row (its prompt)",
}


def sft_fields(row: dict, chat: ChatTemplate) -> dict:
    """``{prompt, response}`` text of one SFT row in any accepted format."""
    if not _given(row, "response", "completion"):
        if _given(row, "messages"):  # a text prompt beside it (UltraChat) repeats its first turn: ignored
            prompt, answer = _split_last_answer(_conversation(row, "messages"))
            text, completions = chat.render("messages", prompt, {"messages": answer})
            return {"prompt": text, "response": _non_empty(completions["messages"], "messages")}
        if _given(row, "text") and not _given(row, "prompt"):
            return {"prompt": "", "response": _non_empty(_text(row, "text"), "text")}
        if not _given(row, "prompt"):
            raise _unrecognised(row, "SFT")
    key = "completion" if _given(row, "completion") and not _given(row, "response") else "response"
    prompt, completion = _value(row, "prompt"), _value(row, key)
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "response": _non_empty(completion, key)}
    if isinstance(prompt, list) and isinstance(completion, list):
        text, completions = chat.render("prompt", prompt, {key: completion})
        return {"prompt": text, "response": _non_empty(completions[key], key)}
    raise _mixed("prompt", prompt, key)


def preference_fields(row: dict, chat: ChatTemplate) -> dict:
    """``{prompt, chosen, rejected}`` text of one preference row in any accepted format."""
    if not _given(row, "prompt", "chosen", "rejected"):
        raise _unrecognised(row, "preference")
    chosen, rejected = _value(row, "chosen"), _value(row, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _mixed("chosen", chosen, "rejected")
    prompt = _value(row, "prompt") if _given(row, "prompt") else None
    if prompt is None or isinstance(prompt, str) and isinstance(chosen, list):
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    if isinstance(prompt, str) != isinstance(chosen, str):
        raise _mixed("prompt", prompt, "chosen")
    if isinstance(prompt, list):
        prompt, completions = chat.render("prompt", prompt, {"chosen": chosen, "rejected": rejected})
        chosen, rejected = completions["chosen"], completions["rejected"]
    return {"prompt": prompt, "chosen": _non_empty(chosen, "chosen"), "rejected": _non_empty(rejected, "rejected")}


def prompt_fields(row: dict, chat: ChatTemplate) -> dict:
    """``{prompt}`` text of one prompt row, or the prompt of a preference or SFT row."""
    if _given(row, "chosen") and _given(row, "rejected"):
        return {"prompt": _non_empty(preference_fields(row, chat)["prompt"], "prompt")}
    if _given(row, "messages") and not _given(row, "response", "completion"):
        turns = _conversation(row, "messages")
        if turns[-1]["role"] == "assistant":
            turns = _split_last_answer(turns)[0]
        return {"prompt": _non_empty(chat.prompt("messages", turns), "messages")}
    if _given(row, "prompt"):
        prompt = _value(row, "prompt")
        return {"prompt": _non_empty(prompt if isinstance(prompt, str) else chat.prompt("prompt", prompt), "prompt")}
    raise _unrecognised(row, "prompt")


# --- fields ------------------------------------------------------------------------------------------------------

def _given(row: dict, *keys: str) -> bool:
    return any(row.get(key) is not None for key in keys)


def _value(row: dict, key: str) -> str | Turns:
    """``row[key]`` as text or as a checked conversation."""
    value = row.get(key)
    if value is None:
        raise FieldProblem(key, f"missing field {key!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _turns(key, value)
    raise FieldProblem(key, f"field {key!r} must be a string, got {type(value).__name__}")


def _text(row: dict, key: str) -> str:
    value = _value(row, key)
    if not isinstance(value, str):
        raise FieldProblem(key, f"field {key!r} must be a string, got a list of turns")
    return value


def _conversation(row: dict, key: str) -> Turns:
    value = _value(row, key)
    if isinstance(value, str):
        raise FieldProblem(key, f"field {key!r} must be a list of turns {{role, content}}, got a string")
    return value


def _turns(key: str, value: list) -> Turns:
    if not value:
        raise FieldProblem(key, f"field {key!r} is an empty list")
    turns = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or \
                not isinstance(turn.get("content"), str):
            got = type(turn).__name__ if not isinstance(turn, dict) else f"a dict with keys {sorted(turn)}"
            raise FieldProblem(key, f"field {key!r} must be a string or a list of turns {{\"role\": str, "
                                    f"\"content\": str}}; {key}[{index}] is {got}")
        turns.append({k: v for k, v in turn.items() if v is not None})  # a parquet column fills absent keys with null
    return turns


def _non_empty(text: str, key: str) -> str:
    if not text.strip():
        raise FieldProblem(key, f"field {key!r} is empty")
    return text


def _split_last_answer(turns: Turns) -> tuple[Turns, Turns]:
    """(the turns before the last, [the last]): the last must be the assistant's, after at least one other turn."""
    if turns[-1]["role"] != "assistant":
        raise FieldProblem("messages", f"field 'messages' must end with an assistant turn (the response), but its "
                                       f"last turn has role {turns[-1]['role']!r}")
    if len(turns) < 2:
        raise FieldProblem("messages", "field 'messages' has only the assistant's turn: no prompt")
    return turns[:-1], turns[-1:]


def _implicit_prompt(chosen, rejected):
    """(prompt, chosen, rejected) of a preference pair whose prompt starts both ``chosen`` and ``rejected``."""
    shared = common_prefix_length(chosen, rejected)
    if isinstance(chosen, str):
        hh = chosen.rfind(HH_ASSISTANT, 0, shared)
        if hh >= 0:  # Anthropic HH: the prompt is the dialogue up to the last shared "Assistant:"
            shared = hh + len(HH_ASSISTANT)
        elif 0 < shared < min(len(chosen), len(rejected)) and chosen[shared - 1] == " ":
            shared -= 1  # TRL's rule: the space before the first differing character starts the completions
    if shared == 0:
        raise FieldProblem("prompt", "missing field 'prompt', and 'chosen' and 'rejected' do not start with a shared "
                                     "prompt (an implicit prompt)")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _mixed(key: str, value, other_key: str) -> FieldProblem:
    """``row[key]`` is ``value`` and ``row[other_key]`` the other kind (text / conversation)."""
    kinds = ["a string", "a list of turns"] if isinstance(value, str) else ["a list of turns", "a string"]
    return FieldProblem(other_key, f"field {key!r} is {kinds[0]} but {other_key!r} is {kinds[1]}: give both as text "
                                   "or both as conversations")


def _unrecognised(row: dict, kind: str) -> FieldProblem:
    found = ", ".join(repr(k) for k in row if row.get(k) is not None) or "none"
    return FieldProblem(None, f"not {kind} data: its fields ({found}) match no {kind} format; accepted: "
                              f"{ACCEPTED[kind]}, each field text or a list of {{role, content}} turns (or set an "
                              "adapter)")


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """Write rows as JSONL atomically (temp file + os.replace)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
