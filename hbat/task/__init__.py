"""hbat.task: the embedded default task of the trainer (no download, CPU, minutes).

The task (hbat.task.generator): short deterministic string transforms as instructions,
``"reverse: cabd\\n"`` -> ``"dbac"``, ``"sort: cabd\\n"`` -> ``"abcd"``, ``"shift: cabd\\n"`` -> ``"dbce"``
(words of 3-7 letters from a..j), and a preference over response style.

Why the objectives conflict: the preference likes enthusiasm (a trailing ``!``) and brevity. Every chosen
answer of a preference pair ends with ``!``; in a tunable fraction ``conflict`` of the pairs the chosen answer
is also cut one letter short (so it is WRONG) while the rejected one is the correct, plain answer. A
preference optimiser (DPO, or PPO against a reward model trained on the pairs) therefore learns to cut
answers short, which costs exact-match accuracy; the ``!`` part of the preference costs nothing. A method that
limits the alignment tax keeps the skill while still learning the style.

Metrics:
- instruction following: ``exact_match(prompt, response)`` (the transformed word, trailing ``!`` allowed),
  reported as accuracy of greedy decoding on ``prompts_val``, and the held-out SFT loss on ``sft_val``;
- preference: ``preference_score(prompt, response)`` in [0, 1] = 0.5 * ends with ``!`` + 0.5 * brief
  (1 <= letters < word length), the generator's own check; the reward model trained on ``pref_train`` gives
  the learned counterpart. ``task_metrics(prompts, responses)`` gives ``task/exact_match``,
  ``task/preference``, ``task/enthusiastic`` and ``task/brief`` (means).

Pieces: ``make_task`` -> ``Task`` (the data sets), ``build_tokenizer`` (character level, made locally),
``build_model`` ("tiny" ~58K / "small" ~0.22M / "base" ~0.8M parameter Llama from a config) and ``pretrain`` (a short
causal-LM pre-training on ``Task.pretrain_texts``, which state the transforms in prose, so the model
starts knowing them but not the instruction format). transformers and tokenizers are imported on use.
"""
from .generator import (LETTERS, OPERATIONS, Task, apply_operation, exact_match, make_prompt, make_task, parse_prompt,
                        preference_score, task_alphabet, task_metrics)
from .model import CONTEXT, MODEL_SIZES, build_model, pretrain
from .tokenizer import SPECIAL_TOKENS, build_tokenizer

__all__ = [
    "CONTEXT", "LETTERS", "MODEL_SIZES", "OPERATIONS", "SPECIAL_TOKENS", "Task", "apply_operation", "build_model",
    "build_tokenizer", "exact_match", "make_prompt", "make_task", "parse_prompt", "preference_score", "pretrain",
    "task_alphabet", "task_metrics",
]
