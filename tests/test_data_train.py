"""Data in the trainer: token ids carried by rows (tokenised once, cached next to the run, reused), the data keys'
checks, and `hbat train` end to end on conversational parquet data and a save_to_disk folder."""
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")
datasets = pytest.importorskip("datasets")

from chat_tokenizer import chat_tokenizer, tiny_llama  # noqa: E402
from hbat.data import (TOKEN_IDS, attach_token_ids, encode_preference, encode_prompts, encode_sft,  # noqa: E402
                       load_sft, token_cache_key, tokenize_rows)
from hbat.trainer.checks import ConfigError  # noqa: E402
from hbat.trainer.config import load_config  # noqa: E402
from hbat.trainer.run import EXIT_ERROR, main  # noqa: E402


def turn(role, content):
    return {"role": role, "content": content}


# --- token ids carried by rows ---------------------------------------------------------------------------------

def test_rows_with_token_ids_encode_as_their_text_and_use_the_ids():
    tokenizer = chat_tokenizer()
    sft = [{"prompt": "a long prompt " * 4, "response": "the answer " * 5}, {"prompt": "", "response": "x"}]
    pref = [{"prompt": "pick one: ", "chosen": "yes " * 9, "rejected": "no"}]
    prompts = [{"prompt": "say something " * 3}, {"prompt": "hi"}]
    plain = {max_len: (encode_sft(tokenizer, sft, max_len), encode_preference(tokenizer, pref, max_len),
                       encode_prompts(tokenizer, prompts, max_len)) for max_len in (8, 17, 200)}
    for rows in (sft, pref, prompts):
        attach_token_ids(rows, tokenize_rows(tokenizer, rows))
    assert set(sft[0][TOKEN_IDS]) == {"prompt", "response"} and set(pref[0][TOKEN_IDS]) == {"prompt", "chosen",
                                                                                               "rejected"}
    for max_len, (sft_ids, pref_ids, prompt_ids) in plain.items():
        assert encode_sft(tokenizer, sft, max_len) == sft_ids
        assert encode_preference(tokenizer, pref, max_len) == pref_ids
        assert encode_prompts(tokenizer, prompts, max_len) == prompt_ids
    sft[0]["response"] = "changed text"  # the carried ids are what is encoded
    assert encode_sft(tokenizer, sft, 200) == plain[200][0]


def test_an_eos_the_response_ends_with_is_not_doubled():
    tokenizer = chat_tokenizer()
    [row] = encode_sft(tokenizer, [{"prompt": "p", "response": "r</s>"}], max_len=16)
    assert tokenizer.convert_ids_to_tokens(row["input_ids"]) == ["<s>", "p", "r", "</s>"]


def test_the_token_cache_key_follows_the_text_and_the_tokenizer():
    rows = {"sft_train": [{"prompt": "p", "response": "r"}], "sft_val": [{"prompt": "q", "response": "s"}]}
    key = token_cache_key(chat_tokenizer(), rows)
    assert key == token_cache_key(chat_tokenizer(), json.loads(json.dumps(rows)))
    assert key != token_cache_key(chat_tokenizer(eos="<|end|>"), rows)
    assert key != token_cache_key(chat_tokenizer(), {**rows, "sft_val": [{"prompt": "q", "response": "t"}]})
    assert key != token_cache_key(chat_tokenizer(), {"sft_train": rows["sft_val"], "sft_val": rows["sft_train"]})


# --- config ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["data.sft_split=''"], "config.data.sft_split must be a split name (e.g. train), got ''"),
    (["data.prompts_split=3"], "config.data.prompts_split must be a string, got 3"),
    (["data.preference_split=test"], "config.model.path is null (the embedded task), but data.preference_split is "
                                     "set and would be ignored"),
])
def test_the_split_keys_are_checked(overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_data_sources_are_checked_when_the_config_is_loaded(tmp_path):
    tokenizer = chat_tokenizer()
    tiny_llama(tokenizer, tmp_path / "model")
    (tmp_path / "sft.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    base = [f"model.path={tmp_path / 'model'}", f"data.sft={tmp_path / 'sft.jsonl'}"]
    cfg = load_config(None, base + ["data.preference=someone/prefs", "data.prompts_split=train"])
    assert cfg.data.preference == "someone/prefs"  # a data set name: resolved when the data is read
    with pytest.raises(ConfigError, match=rf"config.data.preference is not a file: {tmp_path / 'p.parquet'}$"):
        load_config(None, base + [f"data.preference={tmp_path / 'p.parquet'}"])
    with pytest.raises(ConfigError, match=rf"config.data.preference is not a file, a folder or a data set name: "
                                          rf"{tmp_path / 'nothing'}$"):
        load_config(None, base + [f"data.preference={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match=r"config.data.prompts_split = 'test' is set but data.prompts is null"):
        load_config(None, base + [f"data.preference={tmp_path / 'sft.jsonl'}", "data.prompts_split=test"])


# --- hbat train ------------------------------------------------------------------------------------------------

WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "jam", "kit", "log", "mud"]
TINY_RUN = ["n_parts=2", "data.val_size=0.25", "sft.batch_size=4", "sft.max_steps=2", "sft.max_len=32",
            "dpo.batch_size=4", "dpo.max_steps=2", "dpo.max_len=32", "reward.batch_size=4", "reward.max_len=32",
            "eval.max_new_tokens=4", "eval.batch_size=4", "eval.kl_samples=2", "save_model=false"]


def write_chat_run(folder, tokenizer):
    """A tiny Llama with ``tokenizer``, conversational SFT rows as parquet and preference rows (prompt, chosen,
    rejected as turns) as a save_to_disk DatasetDict with a train and a test split; returns --set overrides."""
    tiny_llama(tokenizer, folder / "model")
    sft = [{"messages": [turn("user", f"say {w}"), turn("assistant", w)]} for w in WORDS]
    pref = [{"prompt": [turn("user", f"say {w}")], "chosen": [turn("assistant", f"{w}!")],
             "rejected": [turn("assistant", w)]} for w in WORDS]
    datasets.Dataset.from_list(sft).to_parquet(str(folder / "sft.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pref),
                          "test": datasets.Dataset.from_list(pref[:2])}).save_to_disk(str(folder / "pref"))
    return [f"model.path={folder / 'model'}", f"data.sft={folder / 'sft.parquet'}",
            f"data.preference={folder / 'pref'}", f"output_dir={folder / 'out'}", *TINY_RUN]


def hbat_train(capsys, overrides, *flags):
    capsys.readouterr()  # (the progress bars of writing the data)
    code = main(["--no-progress", *flags] + [a for o in overrides for a in ("--set", o)])
    return code, capsys.readouterr()


def test_train_on_conversational_parquet_and_a_save_to_disk_folder(tmp_path, capsys, monkeypatch):
    import hbat.data
    from hbat.trainer.workspace import load_data

    overrides = write_chat_run(tmp_path, chat_tokenizer())
    data = load_data(load_config(None, overrides))
    assert all(r["prompt"].endswith("<|assistant|>") and r["response"].endswith("<|end|>\n")
               for r in data.splits["sft_train"])
    assert {r["prompt"] for r in data.splits["prompts_train"]} <= {r["prompt"] for r in data.splits["pref_train"]}
    assert len(data.splits["pref_train"]) + len(data.splits["pref_val"]) == len(WORDS)  # the train split

    code, out = hbat_train(capsys, overrides + ["method=hbat"])
    assert code == 0, out.err[-3000:]
    assert "| hbat |" in out.out
    tokens = tmp_path / "out" / "shared" / "tokens"
    [cache] = [name for name in os.listdir(tokens) if name.endswith(".pt")]
    assert os.path.exists(tokens / f"{cache}.sha256")
    written = os.stat(tokens / cache).st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(hbat.data, "tokenize_rows", no_tokenizing)  # another method of the run reuses the cache
    code, out = hbat_train(capsys, overrides + ["method=sft_only"])
    assert code == 0, out.err[-3000:]
    assert [name for name in os.listdir(tokens) if name.endswith(".pt")] == [cache]
    assert os.stat(tokens / cache).st_mtime_ns == written
    with open(tokens / cache, "ab") as fh:  # a changed cache file is an error naming it, never used or replaced
        fh.write(b"x")
    code, out = hbat_train(capsys, overrides + ["method=sft_only"])
    assert code == EXIT_ERROR
    assert f"{tokens / cache}: the checksum does not match" in out.err and "delete it (the data is tokenised" in out.err


def test_data_errors_of_a_run_come_before_any_model_is_built(tmp_path, capsys):
    overrides = write_chat_run(tmp_path, chat_tokenizer(chat_template=None))

    def error(*more):
        code, out = hbat_train(capsys, overrides + list(more))
        assert code == EXIT_ERROR and "Traceback" not in out.err
        assert not (tmp_path / "out" / "shared").exists()
        [line] = [line for line in out.err.splitlines() if line.strip()]
        return line

    assert error() == (f"hbat train: {tmp_path / 'sft.parquet'}, row 0: field 'messages' is a conversation (a list "
                       "of turns), but the tokenizer has no chat template to render it: give the tokenizer one "
                       "(chat_template.jinja or tokenizer_config.json in its folder), or the data as text")
    chat_tokenizer().save_pretrained(tmp_path / "model")  # now with its template
    assert error("data.preference_split=dev") == (
        f"hbat train: config.data.preference_split = 'dev', but {tmp_path / 'pref'} has no split 'dev'; its splits: "
        "'test', 'train'")
    assert error(f"data.sft={tmp_path / 'pref'}").startswith(
        f"hbat train: {tmp_path / 'pref'} (split 'train'), row 0: missing field 'response'")
    damaged = tmp_path / "sft.parquet"  # a damaged file: named, with the key (pyarrow's message names neither)
    damaged.write_bytes(damaged.read_bytes()[-208:])
    assert error().startswith(f"hbat train: config.data.sft = {damaged}: cannot be read as a parquet file "
                              "(ArrowInvalid: Parquet file size is 208 bytes, smaller than ")
