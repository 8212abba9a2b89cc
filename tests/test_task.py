"""The embedded default task: generator (determinism, splits, metrics, conflict), tokenizer, model, pre-training."""
import pytest
import torch

from hbat.task import (LETTERS, OPERATIONS, Task, apply_operation, exact_match, make_prompt, make_task, parse_prompt,
                       preference_score, task_alphabet, task_metrics)
from hbat.task.generator import _wrong_answer

SMALL = dict(n_sft=300, n_pref=200, n_prompts=100, n_val=50, n_pretrain=100)


@pytest.fixture(scope="module")
def task() -> Task:
    return make_task(seed=3, **SMALL)


def all_strings(task):
    rows = task.sft_train + task.sft_val + task.pref_train + task.pref_val + task.prompts_train + task.prompts_val
    return [value for row in rows for value in row.values()] + list(task.pretrain_texts)


def word_of(prompt):
    return parse_prompt(prompt)[1]


# --- generator -------------------------------------------------------------------------------------------

def test_same_seed_same_task_other_seed_other_task(task):
    again = make_task(seed=3, **SMALL)
    for name in ("sft_train", "sft_val", "pref_train", "pref_val", "prompts_train", "prompts_val", "pretrain_texts"):
        assert getattr(again, name) == getattr(task, name), name
    assert make_task(seed=4, **SMALL).sft_train != task.sft_train


def test_sizes(task):
    assert task.stats()["size/sft_train"] == 300 and len(task.pref_train) == 200 and len(task.prompts_train) == 100
    assert len(task.sft_val) == len(task.pref_val) == len(task.prompts_val) == 50
    assert len(task.pretrain_texts) == 100


def test_validation_words_never_appear_in_training(task):
    val_words = {word_of(r["prompt"]) for r in task.sft_val + task.pref_val}
    train_words = {word_of(r["prompt"]) for r in task.sft_train + task.pref_train + task.prompts_train}
    pretrain_words = {fact.split(" of ")[1].split(" is ")[0] for text in task.pretrain_texts for fact in text.split(". ")}
    assert len(val_words) == 100
    assert not val_words & train_words
    assert not val_words & pretrain_words
    # the training sets are disjoint from each other too, and prompts_val is sft_val's prompts
    sft, pref, ppo = ({word_of(r["prompt"]) for r in rows} for rows in (task.sft_train, task.pref_train, task.prompts_train))
    assert not sft & pref and not sft & ppo and not pref & ppo
    assert [r["prompt"] for r in task.prompts_val] == [r["prompt"] for r in task.sft_val]


def test_sft_responses_are_the_transform_some_with_the_style_mark(task):
    assert all(exact_match(r["prompt"], r["response"]) for r in task.sft_train + task.sft_val)
    styled = sum(r["response"].endswith("!") for r in task.sft_train) / len(task.sft_train)
    assert styled == pytest.approx(0.3, abs=0.01)
    assert all(preference_score(r["prompt"], r["response"]) <= 0.5 for r in task.sft_train)  # never brief
    plain = make_task(seed=3, style_rate=0.0, **SMALL)
    assert not any(r["response"].endswith("!") for r in plain.sft_train)
    assert {parse_prompt(r["prompt"])[0] for r in task.sft_train} == set(OPERATIONS)


def test_transforms_and_prompt_parsing_on_hand_examples():
    assert apply_operation("reverse", "cabd") == "dbac"
    assert apply_operation("sort", "cabd") == "abcd"
    assert apply_operation("shift", "cabj") == "dbca"  # j wraps to a
    assert make_prompt("sort", "cab") == "sort: cab\n"
    assert parse_prompt("reverse: cabd\n") == ("reverse", "cabd")
    for bad in ("reverse cabd\n", "upper: cab\n", "sort: \n", "sort: xyz\n"):
        with pytest.raises(ValueError, match="not a task prompt"):
            parse_prompt(bad)
    with pytest.raises(ValueError, match="unknown operation"):
        apply_operation("upper", "abc")


def test_exact_match_and_preference_score_on_hand_examples():
    p = "reverse: cabd\n"
    assert exact_match(p, "dbac") and exact_match(p, "dbac!") and exact_match(p, " dbac!! ")
    assert not exact_match(p, "dba!") and not exact_match(p, "abcd") and not exact_match(p, "")
    assert preference_score(p, "dbac") == 0.0       # correct, plain
    assert preference_score(p, "dbac!") == 0.5      # correct, enthusiastic
    assert preference_score(p, "dba") == 0.5        # brief (hence wrong), plain
    assert preference_score(p, "dba!") == 1.0       # brief and enthusiastic: preferred, and wrong
    assert preference_score(p, "!") == 0.5          # an empty answer is not "brief"
    with pytest.raises(ValueError, match="not a task prompt"):
        exact_match("hello", "x")
    metrics = task_metrics([p, {"prompt": p}, p, p], ["dbac", "dbac!", "dba", "dba!"])
    assert metrics == {"task/exact_match": 0.5, "task/preference": 0.5, "task/enthusiastic": 0.5, "task/brief": 0.5}
    with pytest.raises(ValueError, match="as many responses"):
        task_metrics([p], [])


@pytest.mark.parametrize("conflict", [0.0, 0.3, 0.5, 1.0])
def test_conflict_fraction_and_pairs_agree_with_the_generators_preference(conflict):
    t = make_task(seed=1, conflict=conflict, **SMALL)
    for rows in (t.pref_train, t.pref_val):
        chosen_wrong = sum(not exact_match(r["prompt"], r["chosen"]) for r in rows) / len(rows)
        assert chosen_wrong == pytest.approx(conflict, abs=0.5 / len(rows) + 1e-9)
        for r in rows:
            assert preference_score(r["prompt"], r["chosen"]) > preference_score(r["prompt"], r["rejected"])
            # exactly one of the two answers is correct
            assert exact_match(r["prompt"], r["chosen"]) != exact_match(r["prompt"], r["rejected"])
    assert t.stats()["pref_train/chosen_exact_match"] == pytest.approx(1 - conflict, abs=0.01)


def test_wrong_answer_is_never_correct():
    import random
    rng = random.Random(0)
    for op in OPERATIONS:
        for word in ("aaa", "abc", "aba", "jjj", "abcdefg", "ba"):
            assert _wrong_answer(op, word, rng) != apply_operation(op, word)


def test_bad_arguments_raise_before_generating():
    with pytest.raises(ValueError, match="conflict"):
        make_task(conflict=1.5)
    with pytest.raises(ValueError, match="style_rate"):
        make_task(style_rate=-0.1)
    with pytest.raises(ValueError, match="n_sft"):
        make_task(n_sft=-1)
    with pytest.raises(ValueError, match="min_len"):
        make_task(min_len=5, max_len=4)
    with pytest.raises(ValueError, match="only"):
        make_task(min_len=2, max_len=2)


# --- tokenizer, model, pre-training -------------------------------------------------------------------

from hbat.data import collate, encode_sft, pad_token_id  # noqa: E402
from hbat.task import build_model, build_tokenizer, pretrain  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return build_tokenizer()


def test_tokenizer_special_ids_and_alphabet(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert len(tokenizer) == 4 + len(task_alphabet())
    assert tokenizer.padding_side == "right"
    assert set(LETTERS) <= set(task_alphabet())
    assert tokenizer("ab")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(c) for c in "ab"]


def test_tokenizer_round_trips_every_generated_string(task, tokenizer):
    unk = tokenizer.unk_token_id
    for text in all_strings(task):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids and len(ids) == len(text), text
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_encoded_rows_work_with_hbat_data(task, tokenizer):
    rows = encode_sft(tokenizer, task.sft_train[:4], max_len=64)
    batch = collate(rows, pad_token_id(tokenizer))
    assert batch["input_ids"][:, 0].eq(tokenizer.bos_token_id).all()
    assert (batch["labels"] != -100).sum(1).tolist() == [len(r["response"]) + 1 for r in task.sft_train[:4]]


def test_tiny_model_forward_and_seeded_init(tokenizer):
    model = build_model(tokenizer, "tiny", seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    assert 30_000 < n_params < 100_000
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id == 0
    ids = torch.tensor([tokenizer("sort: cab\n")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    same = build_model(tokenizer, "tiny", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    with pytest.raises(ValueError, match="unknown model size"):
        build_model(tokenizer, "huge")


def test_pretrain_decreases_the_loss(task, tokenizer):
    model = build_model(tokenizer, "tiny", seed=0)
    logged = []
    result = pretrain(model, tokenizer, task.pretrain_texts, steps=30, batch_size=8, lr=3e-3, seed=0,
                      progress=False, log=logged.append)
    assert result["pretrain/steps"] == 30 and len(logged) == 30
    assert logged[0]["pretrain/loss"] == result["pretrain/first_loss"]
    assert result["pretrain/loss"] < 0.8 * result["pretrain/first_loss"]
    assert {"pretrain/loss", "pretrain/lr", "pretrain/step"} <= set(logged[-1])
    with pytest.raises(ValueError, match="pretrain text 1"):
        pretrain(model, tokenizer, ["ok", ""], steps=1, progress=False)
