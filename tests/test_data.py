"""hbat.data: loading, every bad-data error (source + line/row + field), adapters, splitting, tokenising."""
import json

import pytest
import torch

from hbat.data import (ADAPTERS, IGNORE_INDEX, DataError, SplitError, collate, collate_preference, encode_preference,
                       encode_prompts, encode_sft, load_preference, load_prompts, load_sft, position_ids_from_mask,
                       split_parts, train_val_split, truncate_pair)


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# --- loading ------------------------------------------------------------------------------------------------

def test_load_sft_jsonl_skips_blank_lines_and_drops_extra_fields(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [{"prompt": "p1", "response": "r1", "id": 7}, "", "   ",
                                                 {"prompt": "", "response": "r2"}])
    assert load_sft(path) == [{"prompt": "p1", "response": "r1"}, {"prompt": "", "response": "r2"}]
    assert load_sft(str(path), keep_extra=True)[0]["id"] == 7


def test_load_preference_and_prompts_from_lists():
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    assert load_preference(rows) == rows
    assert load_prompts(rows) == [{"prompt": "p"}]
    assert load_prompts([{"prompt": "x", "response": "y"}]) == [{"prompt": "x"}]


def test_load_from_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "p", "response": "r"}, {"prompt": "q", "response": None}])
    with pytest.raises(DataError, match=r"row 1: missing field 'response'"):
        load_sft(ds)
    assert load_sft(ds.select([0])) == [{"prompt": "p", "response": "r"}]
    splits = datasets.DatasetDict({"train": ds.select([0]), "test": ds})
    assert load_sft(splits) == [{"prompt": "p", "response": "r"}]  # split="train"
    with pytest.raises(DataError, match=r"\(split 'test'\), row 1: missing field 'response'"):
        load_sft(splits, split="test")
    with pytest.raises(SplitError, match=r"has no split 'val'; its splits: 'test', 'train'$"):
        load_sft(splits, split="val")


@pytest.mark.parametrize("line, field, message", [
    ({"prompt": "p"}, "response", "missing field 'response'"),
    ({"response": "r"}, "prompt", "missing field 'prompt'"),
    ({"prompt": "p", "response": None}, "response", "missing field 'response'"),
    ({"prompt": 3, "response": "r"}, "prompt", "field 'prompt' must be a string, got int"),
    ({"prompt": "p", "response": ["r"]}, "response",
     "field 'response' must be a string or a list of turns {\"role\": str, \"content\": str}; response[0] is str"),
    ({"prompt": "p", "response": "  "}, "response", "field 'response' is empty"),
])
def test_bad_sft_rows_name_file_line_and_field(tmp_path, line, field, message):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "ok"}, "", line])
    with pytest.raises(DataError) as info:
        load_sft(path)
    error = info.value
    assert str(error) == f"{path}, line 3: {message}"
    assert (error.source, error.where, error.field) == (str(path), "line 3", field)


@pytest.mark.parametrize("line, field", [
    ({"prompt": "p", "chosen": "c"}, "rejected"),
    ({"prompt": "p", "rejected": "r"}, "chosen"),
    ({"chosen": "c", "rejected": "r"}, "prompt"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen"),
])
def test_bad_preference_rows(tmp_path, line, field):
    path = write_lines(tmp_path / "pref.jsonl", [line])
    with pytest.raises(DataError, match=rf"pref.jsonl, line 1: .*'{field}'") as info:
        load_preference(path)
    assert info.value.field == field


def test_bad_prompt_rows_and_list_rows_are_named_by_index():
    with pytest.raises(DataError, match=r"^list, row 1: field 'prompt' is empty$"):
        load_prompts([{"prompt": "a"}, {"prompt": ""}])
    with pytest.raises(DataError, match=r"^list, row 0: expected a JSON object \(dict\), got str$"):
        load_sft(["not a dict"])


def test_invalid_json_and_non_object_lines(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl", [{"prompt": "p", "response": "r"}, '{"prompt": "p", '])
    with pytest.raises(DataError, match=r"broken.jsonl, line 2: invalid JSON") as info:
        load_sft(path)
    assert info.value.field is None
    path = write_lines(tmp_path / "scalar.jsonl", [{"prompt": "p", "response": "r"}, '"text"'])
    with pytest.raises(DataError, match=r"scalar.jsonl, line 2: expected a JSON object \(dict\), got str"):
        load_sft(path)


def test_json_array_files_name_the_item(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "p", "response": "r"}, {"prompt": "p"}]))
    with pytest.raises(DataError, match=r"rows.json, item 1: missing field 'response'"):
        load_sft(path)
    path.write_text(json.dumps([{"prompt": "p", "response": "r"}], indent=1))
    assert load_sft(path) == [{"prompt": "p", "response": "r"}]
    path.write_text('[{"prompt": "p",\n "response": }]')
    with pytest.raises(DataError, match=r"rows.json, line 2: invalid JSON"):
        load_sft(path)
    path.write_text("[1]")
    with pytest.raises(DataError, match=r"rows.json, item 0: expected a JSON object \(dict\), got int"):
        load_sft(path)


def test_bad_sources_and_adapters(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sft(tmp_path / "nope.jsonl")
    with pytest.raises(TypeError, match="data source"):
        load_sft(42)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        load_sft([], adapter="nope")


def test_custom_callable_adapter_and_its_missing_key():
    adapter = lambda row: {"prompt": row["question"], "response": row["answer"]}  # noqa: E731
    assert load_sft([{"question": "q", "answer": "a"}], adapter=adapter) == [{"prompt": "q", "response": "a"}]
    with pytest.raises(DataError, match=r"^list, row 0: missing field 'answer'$") as info:
        load_sft([{"question": "q"}], adapter=adapter)
    assert info.value.field == "answer"


# --- adapters of the paper's data sets ----------------------------------------------------------------------

def test_tldr_sft_adapter(tmp_path):
    row = {"id": "t3_x", "subreddit": "relationships", "title": "My title ", "post": "The post.\n", "summary": "short"}
    path = write_lines(tmp_path / "tldr.jsonl", [row])
    assert load_sft(path, adapter="tldr_sft") == [{
        "prompt": "SUBREDDIT: r/relationships\n\nTITLE: My title\n\nPOST: The post.\n\nTL;DR:",
        "response": " short"}]
    assert load_prompts([row], adapter="tldr_sft")[0]["prompt"].endswith("TL;DR:")
    with pytest.raises(DataError, match=r"tldr.jsonl, line 1: missing field 'post'"):
        load_sft(write_lines(tmp_path / "tldr.jsonl", [{"title": "t", "summary": "s"}]), adapter="tldr_sft")


def test_tldr_comparisons_adapter(tmp_path):
    row = {"info": {"id": "1", "post": "P", "title": "T", "subreddit": "AskReddit"},
           "summaries": [{"text": " first", "policy": "a"}, {"text": "second ", "policy": "b"}], "choice": 1}
    [out] = load_preference([row], adapter="tldr_comparisons")
    assert out == {"prompt": "SUBREDDIT: r/AskReddit\n\nTITLE: T\n\nPOST: P\n\nTL;DR:",
                   "chosen": " second", "rejected": " first"}
    bad = [
        ({**row, "info": {"title": "T", "subreddit": "s"}}, "info.post"),
        ({**row, "choice": 2}, "choice"),
        ({**row, "choice": "1"}, "choice"),
        ({**row, "summaries": [{"text": "a"}]}, "summaries"),
        ({**row, "summaries": [{"text": "a"}, {"policy": "x"}]}, "summaries[1].text"),
    ]
    for bad_row, field in bad:
        with pytest.raises(DataError) as info:
            load_preference(write_lines(tmp_path / "c.jsonl", [row, "", bad_row]), adapter="tldr_comparisons")
        assert (info.value.where, info.value.field) == ("line 3", field)
        assert str(info.value).startswith(f"{tmp_path / 'c.jsonl'}, line 3: ") and repr(field) in str(info.value)
    no_subreddit = {**row, "info": {"post": "P", "title": "T", "subreddit": None}}
    assert load_preference([no_subreddit], adapter="tldr_comparisons")[0]["prompt"] == "TITLE: T\n\nPOST: P\n\nTL;DR:"


def test_alpacafarm_adapters():
    [with_input, without_input] = load_sft([
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Say hi.", "input": "", "output": "hi"}], adapter="alpacafarm_sft")
    assert with_input["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1 2"
        "\n\n### Response:")
    assert with_input["response"] == "3"
    assert without_input["prompt"].endswith("### Instruction:\nSay hi.\n\n### Response:")
    assert "### Input:" not in without_input["prompt"]

    row = {"instruction": "Pick.", "input": "", "output_1": "one", "output_2": "two", "preference": 2}
    [pref] = load_preference([row], adapter="alpacafarm_preferences")
    assert (pref["chosen"], pref["rejected"]) == ("two", "one")
    assert load_preference([{**row, "preference": 1}], adapter="alpacafarm_preferences")[0]["chosen"] == "one"
    with pytest.raises(DataError, match=r"row 0: field 'preference' must be 1 or 2, got 0"):
        load_preference([{**row, "preference": 0}], adapter="alpacafarm_preferences")
    with pytest.raises(DataError, match=r"row 0: missing field 'output_2'"):
        load_preference([{k: v for k, v in row.items() if k != "output_2"}], adapter="alpacafarm_preferences")
    assert load_prompts([{"instruction": "Go."}], adapter="alpacafarm_prompts")[0]["prompt"].endswith("Response:")
    assert set(ADAPTERS) >= {"tldr_sft", "tldr_comparisons", "alpacafarm_sft", "alpacafarm_preferences"}


# --- splitting -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count, n", [(10, 3), (7, 7), (100, 10), (5, 1)])
def test_split_parts_disjoint_covering_balanced_seeded(count, n):
    rows = [{"id": i} for i in range(count)]
    parts = split_parts(rows, n, seed=3)
    ids = [row["id"] for part in parts for row in part]
    assert len(parts) == n
    assert sorted(ids) == list(range(count))  # covering and disjoint
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert split_parts(rows, n, seed=3) == parts
    if count > n > 1:
        assert split_parts(rows, n, seed=4) != parts


def test_split_parts_errors_and_train_val_split():
    with pytest.raises(ValueError, match="3 rows into 4"):
        split_parts([1, 2, 3], 4, seed=0)
    with pytest.raises(ValueError, match="positive int"):
        split_parts([1, 2, 3], 0, seed=0)
    train, val = train_val_split(list(range(10)), 0.2, seed=1)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert train_val_split(list(range(10)), 3, seed=1)[1] == train_val_split(list(range(10)), 3, seed=1)[1]


# --- tokenising -----------------------------------------------------------------------------------------------

class CharTokenizer:
    """Minimal stand-in for a HF tokenizer: one id per character, BOS=1 added with special tokens, EOS=2."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] + ids) if add_special_tokens else ids}


def test_encode_sft_labels_only_on_response():
    [row] = encode_sft(CharTokenizer(), [{"prompt": "ab", "response": "xy"}], max_len=16)
    assert row["input_ids"] == [1, 97, 98, 120, 121, 2]
    assert row["labels"] == [IGNORE_INDEX] * 3 + [120, 121, 2]


def test_truncation_keeps_response_start_and_bos():
    assert truncate_pair([1, 5, 6, 7, 8], [9, 10], 5, bos_id=1) == ([1, 7, 8], [9, 10])
    # long response: it keeps max_len // 2 tokens from its start, the prompt its end
    assert truncate_pair([1, 5, 6, 7, 8], list(range(20, 30)), 6, bos_id=1) == ([1, 7, 8], [20, 21, 22])
    assert truncate_pair([5, 6], list(range(20, 30)), 6) == ([5, 6], [20, 21, 22, 23])
    [row] = encode_sft(CharTokenizer(), [{"prompt": "abcdef", "response": "xyz"}], max_len=6)
    assert row["input_ids"] == [1, ord("e"), ord("f"), ord("x"), ord("y"), ord("z")]
    assert row["labels"][:3] == [IGNORE_INDEX] * 3
    assert encode_prompts(CharTokenizer(), [{"prompt": "abcdef"}, "ab"], max_len=3) == [[1, 101, 102], [1, 97, 98]]


def test_collate_right_and_left_padding():
    rows = encode_sft(CharTokenizer(), [{"prompt": "a", "response": "b"}, {"prompt": "aa", "response": "bb"}], 16)
    right = collate(rows, pad_id=0)
    assert right["input_ids"].tolist() == [[1, 97, 98, 2, 0, 0], [1, 97, 97, 98, 98, 2]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert right["labels"].tolist()[0] == [IGNORE_INDEX, IGNORE_INDEX, 98, 2, IGNORE_INDEX, IGNORE_INDEX]
    left = collate(rows, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist()[0] == [0, 0, 1, 97, 98, 2]
    assert left["labels"].tolist()[0][:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert position_ids_from_mask(left["attention_mask"]).tolist()[0] == [0, 0, 0, 1, 2, 3]
    assert all(t.dtype == torch.long for t in left.values())


def test_encode_and_collate_preference_to_one_length():
    rows = encode_preference(CharTokenizer(), [{"prompt": "p", "chosen": "long answer", "rejected": "no"}], 64)
    batch = collate_preference(rows, pad_id=0)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (1, 2 + 11 + 1)
    assert batch["rejected_attention_mask"].sum() == 2 + 2 + 1
    assert (batch["rejected_labels"] != IGNORE_INDEX).sum() == 3
