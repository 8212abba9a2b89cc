"""The embedded default task: string transforms (the skill) and a style preference that fights them.

Prompt ``"<op>: <word>\\n"``, response = the transformed word, e.g. ``"reverse: cabd\\n"`` -> ``"dbac"``.
Words are 3 to 7 letters from ``a..j``; the operations are length-preserving so that "brief" has a
precise meaning (shorter than the word, hence wrong):

- ``reverse``: ``cabd`` -> ``dbac``
- ``sort``:    ``cabd`` -> ``abcd``
- ``shift``:   every letter to the next one, ``j`` wraps to ``a``: ``cabd`` -> ``dbce``

Metrics (both exact, computed from the prompt alone):

- ``exact_match(prompt, response)``: the response, without trailing ``!`` (style is allowed), equals the
  transformed word.
- ``preference_score(prompt, response)`` in [0, 1]: 0.5 for enthusiasm (ends with ``!``) + 0.5 for brevity
  (1 <= letters < len(word)). A brief answer is wrong by construction: the two objectives conflict.

SFT rows are correct answers; a fraction ``style_rate`` (default 0.3) of them end with ``!``, so the SFT
model already has the preferred style as a minority behaviour (greedy decoding stays plain) and a preference
optimiser only has to shift probability towards it, as with real preference data.

Preference pairs; every chosen answer ends with ``!`` and the generator's own check always prefers it:

- a fraction ``conflict`` ("conflict pairs"): chosen = the correct answer cut short by one letter + ``!``,
  rejected = the correct answer + ``!``. The pair differs only in brevity, and chosen is WRONG;
- the others: chosen = the correct answer + ``!``, rejected = a plausible mistake, plain (another
  operation's result). These teach the style and agree with the skill.

So exactly ``conflict`` of the chosen answers fail exact match (and as many rejected ones pass it). A
preference optimiser, or a reward model, that follows the pairs learns both halves of the preference: the
``!`` costs nothing, cutting answers short costs the skill. That is the trade-off HBAT is meant to improve.

Splits. Validation words are disjoint from every word used for training (SFT, preference, PPO prompts
and pre-training); the training sets are disjoint from each other as well. Everything is a pure function
of ``seed``.

Pre-training text states the same facts in prose (``"the reverse of cabd is dbac."``), several facts per
text, so a model starts knowing the transforms but not the instruction format, the EOS, or the style.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

LETTERS = "abcdefghij"
OPERATIONS = ("reverse", "sort", "shift")
STYLE_MARK = "!"
PROMPT_END = "\n"


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in word)


TRANSFORMS = {
    "reverse": lambda word: word[::-1],
    "sort": lambda word: "".join(sorted(word)),
    "shift": _shift,
}


def apply_operation(op: str, word: str) -> str:
    """The correct response to ``op`` on ``word``."""
    if op not in TRANSFORMS:
        raise ValueError(f"unknown operation {op!r}; expected one of {sorted(TRANSFORMS)}")
    bad = sorted(set(word) - set(LETTERS))
    if bad or not word:
        raise ValueError(f"word {word!r} must be non-empty letters from {LETTERS!r} (bad: {bad})")
    return TRANSFORMS[op](word)


def make_prompt(op: str, word: str) -> str:
    apply_operation(op, word)  # validates
    return f"{op}: {word}{PROMPT_END}"


def parse_prompt(prompt: str) -> tuple[str, str]:
    """``"reverse: cabd\\n"`` -> ``("reverse", "cabd")``; ValueError naming the prompt otherwise."""
    text = prompt[:-len(PROMPT_END)] if prompt.endswith(PROMPT_END) else prompt
    op, sep, word = text.partition(": ")
    if not sep or op not in TRANSFORMS or not word or set(word) - set(LETTERS):
        raise ValueError(f"not a task prompt: {prompt!r} (expected '<op>: <word>\\n', op in {list(OPERATIONS)}, "
                         f"word of {LETTERS!r})")
    return op, word


def _core(response: str) -> str:
    """The answer without surrounding whitespace and trailing style marks."""
    return response.strip().rstrip(STYLE_MARK).strip()


def exact_match(prompt: str, response: str) -> bool:
    """The skill, exactly: the response (trailing ``!`` allowed) is the transformed word."""
    op, word = parse_prompt(prompt)
    return _core(response) == apply_operation(op, word)


def preference_score(prompt: str, response: str) -> float:
    """The generator's own preference, in [0, 1]: 0.5 * enthusiastic + 0.5 * brief (module docstring)."""
    _, word = parse_prompt(prompt)
    enthusiastic = response.strip().endswith(STYLE_MARK)
    brief = 1 <= len(_core(response)) < len(word)
    return 0.5 * enthusiastic + 0.5 * brief


def task_metrics(prompts, responses) -> dict:
    """Means over a set of (prompt, response): ``task/exact_match``, ``task/preference`` (the generator's check),
    and its two halves ``task/enthusiastic`` and ``task/brief``. Prompts may be strings or rows ``{prompt}``."""
    prompts = [p["prompt"] if isinstance(p, dict) else p for p in prompts]
    responses = list(responses)
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many responses as prompts (>0), got {len(prompts)} prompts, {len(responses)} responses")
    n = len(prompts)
    words = [parse_prompt(p)[1] for p in prompts]
    return {
        "task/exact_match": sum(exact_match(p, r) for p, r in zip(prompts, responses)) / n,
        "task/preference": sum(preference_score(p, r) for p, r in zip(prompts, responses)) / n,
        "task/enthusiastic": sum(r.strip().endswith(STYLE_MARK) for r in responses) / n,
        "task/brief": sum(1 <= len(_core(r)) < len(w) for r, w in zip(responses, words)) / n,
    }


def pretrain_sentence(op: str, word: str) -> str:
    return f"the {op} of {word} is {apply_operation(op, word)}."


def task_alphabet() -> str:
    """Every character any generated string can contain (the tokenizer covers exactly these)."""
    chars = set(LETTERS) | set(STYLE_MARK) | set(PROMPT_END) | set(": .")
    for op in OPERATIONS:
        chars |= set(op)
    chars |= set("the of is")
    return "".join(sorted(chars))


@dataclass
class Task:
    """The generated data sets and the two measurement functions (see the module docstring)."""

    sft_train: list[dict]
    sft_val: list[dict]
    pref_train: list[dict]
    pref_val: list[dict]
    prompts_train: list[dict]
    prompts_val: list[dict]
    pretrain_texts: list[str]
    conflict: float
    seed: int
    exact_match: object = field(default=exact_match, repr=False)
    preference_score: object = field(default=preference_score, repr=False)

    def stats(self) -> dict:
        """Data statistics: how often chosen / rejected pass exact match, mean preference scores, sizes."""
        out = {}
        for name, rows in (("train", self.pref_train), ("val", self.pref_val)):
            n = max(len(rows), 1)
            out[f"pref_{name}/chosen_exact_match"] = sum(exact_match(r["prompt"], r["chosen"]) for r in rows) / n
            out[f"pref_{name}/rejected_exact_match"] = sum(exact_match(r["prompt"], r["rejected"]) for r in rows) / n
            out[f"pref_{name}/chosen_preference"] = sum(preference_score(r["prompt"], r["chosen"]) for r in rows) / n
            out[f"pref_{name}/rejected_preference"] = sum(preference_score(r["prompt"], r["rejected"]) for r in rows) / n
        for name in ("sft_train", "sft_val", "pref_train", "pref_val", "prompts_train", "prompts_val", "pretrain_texts"):
            out[f"size/{name}"] = len(getattr(self, name))
        return out


def _wrong_answer(op: str, word: str, rng: random.Random) -> str:
    """A plausible mistake: another operation's result, else one letter changed; never the correct answer."""
    correct = apply_operation(op, word)
    others = [o for o in OPERATIONS if o != op]
    rng.shuffle(others)
    for other in others:
        candidate = apply_operation(other, word)
        if candidate != correct:
            return candidate
    i = rng.randrange(len(correct))
    letter = rng.choice([c for c in LETTERS if c != correct[i]])
    return correct[:i] + letter + correct[i + 1:]


def _preference_row(op: str, word: str, is_conflict: bool, rng: random.Random) -> dict:
    correct = apply_operation(op, word)
    if is_conflict:  # brief (wrong) vs complete (correct), both enthusiastic: the pair is about brevity alone
        chosen, rejected = correct[:-1] + STYLE_MARK, correct + STYLE_MARK
    else:            # preferred style, correct answer vs  plain, wrong answer
        chosen, rejected = correct + STYLE_MARK, _wrong_answer(op, word, rng)
    return {"prompt": make_prompt(op, word), "chosen": chosen, "rejected": rejected}


def _conflict_flags(count: int, fraction: float, rng: random.Random) -> list[bool]:
    """Exactly round(fraction * count) True flags, shuffled."""
    n_true = round(fraction * count)
    flags = [True] * n_true + [False] * (count - n_true)
    rng.shuffle(flags)
    return flags


def make_task(seed: int = 0, n_sft: int = 4000, n_pref: int = 2000, n_prompts: int = 1000, n_val: int = 200,
              n_pretrain: int = 4000, conflict: float = 0.5, style_rate: float = 0.3, min_len: int = 3,
              max_len: int = 7, facts_per_text: int = 4) -> Task:
    """Generate the task (module docstring). ``n_val`` rows go to each of sft_val, pref_val, prompts_val;
    prompts_val has the same prompts as sft_val (exact match and held-out SFT loss on the same items).
    ``n_pretrain`` texts of ``facts_per_text`` sentences each."""
    sizes = {"n_sft": n_sft, "n_pref": n_pref, "n_prompts": n_prompts, "n_val": n_val, "n_pretrain": n_pretrain}
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} must be a non-negative int, got {value!r}")
    for key, value in (("conflict", conflict), ("style_rate", style_rate)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {value!r}")
    if not 2 <= min_len <= max_len:
        raise ValueError(f"need 2 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if facts_per_text < 1:
        raise ValueError(f"facts_per_text must be >= 1, got {facts_per_text}")
    n_pretrain_facts = n_pretrain * facts_per_text
    n_train_items = n_sft + n_pref + n_prompts + n_pretrain_facts
    n_val_items = 2 * n_val
    n_words = sum(len(LETTERS) ** k for k in range(min_len, max_len + 1))
    if n_train_items + n_val_items > n_words // 2:
        raise ValueError(f"asked for {n_train_items + n_val_items} items but lengths {min_len}..{max_len} give "
                         f"only {n_words} words; raise max_len or lower the sizes")

    rng = random.Random(seed)
    # distinct words: the validation words are never seen in any training set, pre-training included
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < n_train_items + n_val_items:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    items = [(rng.choice(OPERATIONS), w) for w in words]
    val_items, train_items = items[:n_val_items], items[n_val_items:]

    def take(count):
        nonlocal train_items
        chunk, train_items = train_items[:count], train_items[count:]
        return chunk

    sft_items, pref_items, prompt_items, pretrain_items = take(n_sft), take(n_pref), take(n_prompts), take(n_pretrain_facts)
    sft_val_items, pref_val_items = val_items[:n_val], val_items[n_val:]

    def sft_rows(chunk):  # correct answers; a fraction style_rate carries the style mark
        styled = _conflict_flags(len(chunk), style_rate, rng)
        return [{"prompt": make_prompt(op, w), "response": apply_operation(op, w) + STYLE_MARK * flag}
                for (op, w), flag in zip(chunk, styled)]

    def pref_rows(chunk):
        flags = _conflict_flags(len(chunk), conflict, rng)
        return [_preference_row(op, w, flag, rng) for (op, w), flag in zip(chunk, flags)]

    sft_val = sft_rows(sft_val_items)
    pretrain_texts = [" ".join(pretrain_sentence(op, w) for op, w in pretrain_items[i:i + facts_per_text])
                      for i in range(0, len(pretrain_items), facts_per_text)]
    return Task(
        sft_train=sft_rows(sft_items), sft_val=sft_val,
        pref_train=pref_rows(pref_items), pref_val=pref_rows(pref_val_items),
        prompts_train=[{"prompt": make_prompt(op, w)} for op, w in prompt_items],
        prompts_val=[{"prompt": row["prompt"]} for row in sft_val],
        pretrain_texts=pretrain_texts, conflict=conflict, seed=seed,
    )
