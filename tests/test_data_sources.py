"""hbat.data sources and formats: parquet / JSON / save_to_disk / load_dataset folders and names (offline), splits,
TRL's standard and conversational formats rendered with a chat template, the labels of a row by hand, errors."""
import json
import pathlib
import shutil

import pytest

from chat_tokenizer import chat_tokenizer
from hbat.data import (IGNORE_INDEX, DataError, SourceUnreadable, SplitError, encode_preference, encode_prompts,
                       encode_sft, load_preference, load_prompts, load_sft)
from hbat.data.sources import looks_like_dataset_name

datasets = pytest.importorskip("datasets")


def turn(role, content):
    return {"role": role, "content": content}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """datasets' cache in tmp_path, offline (no hub)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_as_hub_dataset(cache: pathlib.Path, name: str, splits: dict, scratch: pathlib.Path):
    """Put ``splits`` into datasets' cache as the hub data set ``owner/name`` would be after one online
    load_dataset: <cache>/<owner>___<name>/default/0.0.0/<hash>/ with its arrow files and dataset_info.json."""
    files = {}
    for split, rows in splits.items():
        files[split] = str(scratch / f"{split}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(files[split])
    builder = datasets.load_dataset_builder("parquet", data_files=files, cache_dir=str(scratch / "build"))
    builder.download_and_prepare()
    owner, short = name.split("/")
    target = cache / f"{owner}___{short}" / "default" / "0.0.0" / ("0" * 8)
    target.mkdir(parents=True)
    for arrow in pathlib.Path(builder.cache_dir).glob("*.arrow"):
        shutil.copy(arrow, target / arrow.name.replace("parquet-", f"{short}-"))
    info = json.loads((pathlib.Path(builder.cache_dir) / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "dataset_name": short}))


SFT_ROWS = [{"prompt": "p0", "response": "r0"}, {"prompt": "p1", "response": "r1"}]


# --- sources ------------------------------------------------------------------------------------------------------

def test_parquet_file_with_conversations_and_row_errors(tmp_path):
    rows = [{"messages": [turn("user", "hi"), turn("assistant", "yo")]},
            {"messages": [turn("system", "s"), turn("user", "q"), turn("assistant", "a")]}]
    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    tokenizer = chat_tokenizer()
    assert [r["response"] for r in load_sft(path, tokenizer=tokenizer)] == ["yo<|end|>\n", "a<|end|>\n"]
    datasets.Dataset.from_list([*rows, {"messages": [turn("user", "no answer")]}]).to_parquet(str(path))
    with pytest.raises(DataError, match=rf"^{path}, row 2: field 'messages' must end with an assistant turn"):
        load_sft(str(path), tokenizer=tokenizer)
    with pytest.raises(SplitError, match=r"has no split 'test'; its splits: 'train'$"):
        load_sft(path, split="test")  # a file holds one split


@pytest.mark.parametrize("damage, reason", [  # its last 208 bytes (a cut download); a footer of zeros
    (lambda data: data[-208:], "ArrowInvalid: Parquet file size is 208 bytes, smaller than the size reported by "),
    (lambda data: b"PAR1" + bytes(len(data) - 8) + b"PAR1", "OSError: "),
])
def test_a_damaged_parquet_file_is_named(tmp_path, damage, reason):
    path = tmp_path / "sft.parquet"
    datasets.Dataset.from_list(SFT_ROWS * 64).to_parquet(str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SourceUnreadable) as error:
        load_sft(str(path))
    assert str(error.value).startswith(f"{path}: cannot be read as a parquet file ({reason}")
    assert error.value.source == str(path) and "\n" not in str(error.value)


def test_json_file_in_datasets_orient(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(SFT_ROWS))
    assert load_sft(path) == SFT_ROWS
    path.write_text("\n".join(json.dumps(r) for r in SFT_ROWS))  # JSON lines under a .json name
    assert load_sft(path) == SFT_ROWS


def test_save_to_disk_folders_dataset_and_dataset_dict(tmp_path):
    ds = datasets.Dataset.from_list(SFT_ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert load_sft(tmp_path / "one") == SFT_ROWS
    with pytest.raises(SplitError, match=r"one has no split 'test'; its splits: 'train'$"):
        load_sft(tmp_path / "one", split="test")
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert load_sft(tmp_path / "dict") == SFT_ROWS
    assert load_sft(tmp_path / "dict", split="test") == SFT_ROWS[1:]
    with pytest.raises(SplitError, match=r"dict has no split 'validation'; its splits: 'test', 'train'$"):
        load_sft(tmp_path / "dict", split="validation")
    bad = datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "p", "response": " "}])})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=rf"^{tmp_path / 'bad'} \(split 'test'\), row 0: field 'response' is empty$"):
        load_sft(tmp_path / "bad", split="test")


def test_folder_of_data_files_through_load_dataset(tmp_path, offline_cache):
    folder = tmp_path / "files"
    folder.mkdir()
    datasets.Dataset.from_list(SFT_ROWS).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_list(SFT_ROWS[:1]).to_parquet(str(folder / "test.parquet"))
    assert load_sft(folder) == SFT_ROWS
    assert load_sft(folder, split="test") == SFT_ROWS[:1]


def test_data_set_name_from_the_offline_cache(tmp_path, offline_cache):
    cache_as_hub_dataset(offline_cache, "someone/tiny-sft", {"train": SFT_ROWS, "test": SFT_ROWS[:1]}, tmp_path)
    assert load_sft("someone/tiny-sft") == SFT_ROWS
    assert load_prompts("someone/tiny-sft", split="test") == [{"prompt": "p0"}]
    with pytest.raises(SplitError, match=r"someone/tiny-sft has no split 'dev'; its splits: 'test', 'train'$"):
        load_sft("someone/tiny-sft", split="dev")
    with pytest.raises(FileNotFoundError, match=r"data set 'someone/missing' is no file or folder, and "
                                                r"datasets.load_dataset cannot load it \(ConnectionError"):
        load_sft("someone/missing")


def test_what_counts_as_a_data_set_name():
    assert looks_like_dataset_name("trl-lib/ultrafeedback_binarized") and looks_like_dataset_name("imdb")
    for path in ("data/sft.jsonl", "x.parquet", "/abs/folder", "./rel", "a/b/c", ""):
        assert not looks_like_dataset_name(path), path


# --- TRL's formats --------------------------------------------------------------------------------------------------

def test_standard_formats():
    assert load_sft([{"prompt": "The sky is", "completion": " blue."}, {"text": "All text."},
                     {"prompt": "p", "response": "r", "completion": "ignored"}]) == [
        {"prompt": "The sky is", "response": " blue."}, {"prompt": "", "response": "All text."},
        {"prompt": "p", "response": "r"}]
    pairs = load_preference([
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},  # implicit prompt: TRL's rule
        {"chosen": "\n\nHuman: Hi\n\nAssistant: I can help.\n\nHuman: Thanks\n\nAssistant: Glad to.",  # Anthropic HH
         "rejected": "\n\nHuman: Hi\n\nAssistant: I can help.\n\nHuman: Thanks\n\nAssistant: Go away."},
    ])
    assert pairs[0] == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert pairs[1] == pairs[0]
    assert pairs[2] == {"prompt": "\n\nHuman: Hi\n\nAssistant: I can help.\n\nHuman: Thanks\n\nAssistant:",
                        "chosen": " Glad to.", "rejected": " Go away."}
    assert load_prompts([{"prompt": "a"}, {"chosen": "x y", "rejected": "x z"}, {"prompt": "q", "completion": "c"}]) \
        == [{"prompt": "a"}, {"prompt": "x"}, {"prompt": "q"}]


def test_conversational_formats_are_rendered_with_the_chat_template():
    tokenizer = chat_tokenizer()
    user, answer = [turn("user", "hi")], [turn("assistant", "yo")]
    prompt = "<|user|>hi<|end|>\n<|assistant|>"  # the template's BOS is left out: the tokenizer adds it
    rows = [{"messages": user + answer}, {"prompt": user, "completion": answer},
            {"prompt": "hi", "messages": user + answer}]  # (UltraChat's text prompt beside the conversation)
    assert load_sft(rows, tokenizer=tokenizer) == [{"prompt": prompt, "response": "yo<|end|>\n"}] * 3
    assert load_prompts(rows, tokenizer=tokenizer) == [{"prompt": prompt}] * 3
    # multi-turn: every turn before the last assistant turn is the prompt (earlier answers are context)
    [row] = load_sft([{"messages": [turn("system", "S"), *user, turn("assistant", "a1"), turn("user", "u2"),
                                    turn("assistant", "a2")]}], tokenizer=tokenizer)
    assert row == {"prompt": "<|system|>S<|end|>\n<|user|>hi<|end|>\n<|assistant|>a1<|end|>\n<|user|>u2<|end|>\n"
                             "<|assistant|>", "response": "a2<|end|>\n"}
    expected = {"prompt": prompt, "chosen": "yo<|end|>\n", "rejected": "no<|end|>\n"}
    no = [turn("assistant", "no")]
    assert load_preference([
        {"prompt": user, "chosen": answer, "rejected": no},
        {"chosen": user + answer, "rejected": user + no},  # implicit prompt: the shared turns
        {"prompt": "hi", "chosen": user + answer, "rejected": user + no},  # a text prompt beside conversations
    ], tokenizer=tokenizer) == [expected] * 3
    prompt_rows = [{"prompt": user}, {"messages": user + answer}, {"chosen": user + answer, "rejected": user + no}]
    assert load_prompts(prompt_rows, tokenizer=tokenizer) == [{"prompt": prompt}] * 3


def test_a_prefilled_assistant_turn_is_continued():
    [row] = load_sft([{"prompt": [turn("user", "hi"), turn("assistant", "Sure")], "completion": [turn("assistant",
                                                                                                     "!")]}],
                     tokenizer=chat_tokenizer(chat_template="{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                                                            "{% endfor %}{% if add_generation_prompt %}[assistant]"
                                                            "{% endif %}"))
    assert row == {"prompt": "[user]hi[assistant]Sure", "response": "[assistant]!"}


def test_labels_of_a_conversational_row_by_hand():
    """Only the assistant's tokens (and EOS) are labelled; the ids are those apply_chat_template gives."""
    tokenizer = chat_tokenizer()
    conversation = [turn("user", "hi"), turn("assistant", "yo")]
    [row] = encode_sft(tokenizer, load_sft([{"messages": conversation}], tokenizer=tokenizer), max_len=64)
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert tokens == ["<s>", "<|user|>", "h", "i", "<|end|>", "\n", "<|assistant|>", "y", "o", "<|end|>", "\n", "</s>"]
    assert row["labels"] == [IGNORE_INDEX] * 7 + row["input_ids"][7:]
    assert row["input_ids"][:-1] == tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"]
    assert row["input_ids"][:7] == tokenizer.apply_chat_template(conversation[:1], tokenize=True,
                                                                 add_generation_prompt=True)["input_ids"]
    assert encode_prompts(tokenizer, load_prompts([{"prompt": conversation[:1]}], tokenizer=tokenizer), 64) == \
        [row["input_ids"][:7]]
    # DPO / reward model: the same boundary, chosen and rejected labelled from the assistant's first token
    [pair] = encode_preference(tokenizer, load_preference([{"chosen": conversation, "rejected": conversation[:1] + [
        turn("assistant", "no way")]}], tokenizer=tokenizer), max_len=64)
    assert pair["chosen_input_ids"] == row["input_ids"] and pair["chosen_labels"] == row["labels"]
    assert pair["rejected_labels"][:7] == [IGNORE_INDEX] * 7
    assert tokenizer.decode(pair["rejected_input_ids"][7:]) == "no way<|end|>\n</s>"


def test_a_template_that_ends_with_the_eos_gets_no_second_eos():
    tokenizer = chat_tokenizer(eos="<|end|>")
    [row] = load_sft([{"messages": [turn("user", "hi"), turn("assistant", "yo")]}], tokenizer=tokenizer)
    assert row["response"] == "yo<|end|>"  # the newline after the final EOS is dropped
    [encoded] = encode_sft(tokenizer, [row], max_len=64)
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"])[-3:] == ["y", "o", "<|end|>"]


def test_turns_from_parquet_lose_the_keys_other_turns_had(tmp_path):
    """Arrow gives every turn every key of the column (absent ones null): those nulls are dropped."""
    tokenizer = chat_tokenizer(chat_template="{% for m in messages %}{{ m | length }}:{{ m['content'] }};{% endfor %}"
                                             "{% if add_generation_prompt %}>{% endif %}")
    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "q", "name": "ann"},
                                              turn("assistant", "a")]}]).to_parquet(str(path))
    # (the prompt is what the generation prompt "3:q;>" and the whole conversation "3:q;2:a;" share)
    assert load_sft(path, tokenizer=tokenizer) == [{"prompt": "3:q;", "response": "2:a;"}]


@pytest.mark.parametrize("row, tokenizer_kind, message", [
    ({"messages": [turn("user", "hi"), turn("assistant", "yo")]}, "none",
     "field 'messages' is a conversation (a list of turns), but the tokenizer has no chat template"),
    ({"messages": [turn("user", "hi"), turn("assistant", "yo")]}, "absent",
     "field 'messages' is a conversation (a list of turns): rendering it needs a tokenizer with a chat template"),
    ({"question": "q", "answer": "a"}, "chat",
     "not SFT data: its fields ('question', 'answer') match no SFT format; accepted: {prompt, response}, "
     "{prompt, completion}, {messages}, {text}"),
    ({"prompt": "q", "completion": [turn("assistant", "a")]}, "chat",
     "field 'prompt' is a string but 'completion' is a list of turns: give both as text or both as conversations"),
    ({"messages": [turn("assistant", "a")]}, "chat", "field 'messages' has only the assistant's turn: no prompt"),
    ({"messages": [{"role": "user"}]}, "chat",
     "field 'messages' must be a string or a list of turns {\"role\": str, \"content\": str}; messages[0] is a dict "
     "with keys ['role']"),
    ({"messages": []}, "chat", "field 'messages' is an empty list"),
    ({"messages": "text"}, "chat", "field 'messages' must be a list of turns {role, content}, got a string"),
])
def test_bad_rows_name_the_file_row_and_key(tmp_path, row, tokenizer_kind, message):
    tokenizer = {"none": chat_tokenizer(chat_template=None), "absent": None, "chat": chat_tokenizer()}[tokenizer_kind]
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response": "ok"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_sft(path, tokenizer=tokenizer)
    assert str(info.value).startswith(f"{path}, line 2: {message}")


def test_bad_preference_and_prompt_rows():
    tokenizer = chat_tokenizer()
    with pytest.raises(DataError, match=r"^list, row 0: not preference data: its fields \('question', 'answer'\)") \
            as info:
        load_preference([{"question": "p", "answer": "a", "prompt": None}])  # (null fields are not listed)
    assert info.value.field is None
    with pytest.raises(DataError, match=r"^list, row 0: field 'chosen' is empty$"):
        load_preference([{"chosen": "x y", "rejected": "x y"}])  # identical: nothing after the shared prompt
    with pytest.raises(DataError, match=r"^list, row 0: field 'chosen' is a string but 'rejected' is a list of turns"):
        load_preference([{"chosen": "x", "rejected": [turn("assistant", "y")]}], tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"^list, row 0: missing field 'prompt', and 'chosen' and 'rejected' do not "
                                        r"start with a shared prompt"):
        load_preference([{"chosen": [turn("user", "a")], "rejected": [turn("user", "b")]}], tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"^list, row 0: not prompt data: its fields \('text'\)"):
        load_prompts([{"text": "t"}])
