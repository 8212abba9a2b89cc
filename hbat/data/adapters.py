"""Adapters from the field names of the paper's data sets to hbat's formats (hbat.data.formats).

Each adapter maps one source row to one hbat row; a missing or bad source field raises ``FieldProblem``
naming the source field (dotted for nested ones, e.g. ``info.post``), which the loader turns into a
DataError with the file and line.

``"tldr_sft"``: the filtered Reddit TL;DR set of Stiennon et al. (2020) ("summarize_from_feedback",
    tldr_3_filtered; rows ``{id, subreddit, title, post, summary}``) -> SFT row. The prompt is the OpenAI
    query format ``"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"`` and the
    response is ``" " + summary.strip()`` (one space after "TL;DR:", as in the reference summaries). Also
    works as a PPO prompt source (load_prompts keeps the prompt only).
``"tldr_comparisons"``: the human comparisons of summarize_from_feedback (rows ``{info: {post, title,
    subreddit, ...}, summaries: [{text, ...}, {text, ...}], choice: 0|1, ...}``) -> preference row with the
    same prompt format; chosen = ``summaries[choice].text``, rejected = the other, each ``" " + text.strip()``.
    ``subreddit`` may be missing or null in ``info`` (then the SUBREDDIT line is left out).
``"alpacafarm_sft"``: AlpacaFarm instruction data (rows ``{instruction, input, output}``) -> SFT row; the
    prompt is the Alpaca template (with the "### Input:" block only when ``input`` is non-empty) ending in
    ``"### Response:"``; response = ``output``.
``"alpacafarm_preferences"``: AlpacaFarm preference data (rows ``{instruction, input, output_1, output_2,
    preference}``, preference 1 or 2 naming the preferred output) -> preference row with the same prompt.
``"alpacafarm_prompts"``: AlpacaFarm unlabeled instructions (rows ``{instruction, input}``) -> PPO row.
"""
from __future__ import annotations

from typing import Any, Callable

from .errors import FieldProblem


def _get(row: dict, dotted: str, kind: type | tuple = str, *, optional: bool = False) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``, checked for presence and type."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value or value[part] is None:
            if optional:
                return None
            raise FieldProblem(dotted, f"missing field {dotted!r}")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise FieldProblem(dotted, f"field {dotted!r} must be {getattr(kind, '__name__', kind)}, "
                                   f"got {type(value).__name__}")
    return value


# --- Reddit TL;DR (Stiennon et al., 2020) --------------------------------------------------------------

TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
TLDR_PROMPT_NO_SUBREDDIT = "TITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def tldr_prompt(subreddit: str | None, title: str, post: str) -> str:
    """The OpenAI TL;DR query text for one post."""
    if subreddit:
        return TLDR_PROMPT.format(subreddit=subreddit, title=title.strip(), post=post.strip())
    return TLDR_PROMPT_NO_SUBREDDIT.format(title=title.strip(), post=post.strip())


def _summary(text: str) -> str:
    return " " + text.strip()


def tldr_sft(row: dict) -> dict:
    prompt = tldr_prompt(_get(row, "subreddit", optional=True), _get(row, "title"), _get(row, "post"))
    return {"prompt": prompt, "response": _summary(_get(row, "summary"))}


def tldr_comparisons(row: dict) -> dict:
    prompt = tldr_prompt(_get(row, "info.subreddit", optional=True), _get(row, "info.title"), _get(row, "info.post"))
    summaries = _get(row, "summaries", list)
    if len(summaries) != 2:
        raise FieldProblem("summaries", f"field 'summaries' must hold 2 summaries, got {len(summaries)}")
    choice = _get(row, "choice", int)
    if choice not in (0, 1):
        raise FieldProblem("choice", f"field 'choice' must be 0 or 1, got {choice}")
    texts = []
    for index, summary in enumerate(summaries):
        name = f"summaries[{index}].text"
        text = summary.get("text") if isinstance(summary, dict) else None
        if text is None:
            raise FieldProblem(name, f"missing field {name!r}")
        if not isinstance(text, str):
            raise FieldProblem(name, f"field {name!r} must be str, got {type(text).__name__}")
        texts.append(text)
    return {"prompt": prompt, "chosen": _summary(texts[choice]), "rejected": _summary(texts[1 - choice])}


# --- AlpacaFarm (Dubois et al., 2023; the Alpaca template) ---------------------------------------------

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca / AlpacaFarm prompt for one instruction (and optional input)."""
    if input and input.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _alpaca_row_prompt(row: dict) -> str:
    return alpaca_prompt(_get(row, "instruction"), _get(row, "input", optional=True))


def alpacafarm_sft(row: dict) -> dict:
    return {"prompt": _alpaca_row_prompt(row), "response": _get(row, "output")}


def alpacafarm_preferences(row: dict) -> dict:
    prompt = _alpaca_row_prompt(row)
    outputs = (_get(row, "output_1"), _get(row, "output_2"))
    preference = _get(row, "preference", int)
    if preference not in (1, 2):
        raise FieldProblem("preference", f"field 'preference' must be 1 or 2, got {preference}")
    return {"prompt": prompt, "chosen": outputs[preference - 1], "rejected": outputs[2 - preference]}


def alpacafarm_prompts(row: dict) -> dict:
    return {"prompt": _alpaca_row_prompt(row)}


ADAPTERS: dict[str, Callable[[dict], dict]] = {
    "tldr_sft": tldr_sft,
    "tldr_comparisons": tldr_comparisons,
    "alpacafarm_sft": alpacafarm_sft,
    "alpacafarm_preferences": alpacafarm_preferences,
    "alpacafarm_prompts": alpacafarm_prompts,
}
