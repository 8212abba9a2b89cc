"""The "Your own model and data" section of docs/own-model-and-data.md, run as written: its config (own.yaml) and
command on tiny models and data (tests/hf_fixtures.py), its peft snippet on the result, and its memory-plan snippet
against the plan and the error it shows. The config and commands are read from that page, so it cannot drift from
what works. The config's run needs the data sources of hbat.data (parquet, save_to_disk folders, data set names)."""
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
from test_data_sources import offline_cache  # noqa: E402,F401  (the fixture: datasets' cache in tmp_path, offline)

import hf_fixtures as H  # noqa: E402  (tests/ is on sys.path under pytest)
from hbat.trainer import workspace  # noqa: E402
from hbat.trainer.config import load_config  # noqa: E402
from hbat.trainer.models import is_checkpointed, is_lora  # noqa: E402
from hbat.trainer.run import main  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "own-model-and-data.md"
# smaller batches and budgets for the tiny models (the page's are for a 7B model)
TINY_BUDGET = H.TINY_USER + ["save_model=true", "sft.max_len=64", "sft.grad_accum_steps=2", "dpo.max_len=64",
                             "dpo.grad_accum_steps=2", "reward.max_len=64"]


def section() -> str:
    text = PAGE.read_text()
    start = text.index("\n## Your own model and data\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def blocks(language: str) -> list[str]:
    """The section's fenced code blocks of ``language`` ("" for a plain block), in order."""
    found, current, fence = [], None, None
    for line in section().splitlines(keepends=True):
        if current is None and line.startswith("```"):
            current, fence = [], line[3:].strip()
        elif current is not None and line.startswith("```"):
            if fence == language:
                found.append("".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return found


def turn(role, content):
    return {"role": role, "content": content}


def write_models_and_data(root: Path, models: Path, offline_cache: Path, tokenizer) -> None:
    """The page's models under ``models`` (/models on the page) and its data under ``root`` (the working
    folder): conversational SFT rows as parquet, preference rows as a save_to_disk folder, prompts as a data
    set name in datasets' offline cache."""
    from test_data_sources import cache_as_hub_dataset

    H.save_causal_lm(models / "my-base", tokenizer)
    H.save_causal_lm(models / "my-sft", tokenizer, seed=1)
    H.save_reward_model(models / "my-reward", tokenizer)
    task = H.task_rows(24)
    (root / "data").mkdir()
    datasets.Dataset.from_list([{"messages": [turn("user", r["prompt"]), turn("assistant", r["response"])]}
                                for r in task.sft_train]).to_parquet(str(root / "data" / "sft.parquet"))
    datasets.Dataset.from_list([{"prompt": [turn("user", r["prompt"])], "chosen": [turn("assistant", r["chosen"])],
                                 "rejected": [turn("assistant", r["rejected"])]}
                                for r in task.pref_train]).save_to_disk(str(root / "data" / "preference"))
    cache_as_hub_dataset(offline_cache, "my-org/my-prompts",
                         {"train": [{"prompt": [turn("user", r["prompt"])]} for r in task.pref_train[:12]]},
                         root / "scratch")


def test_the_readme_config_and_command_run(tmp_path, monkeypatch, capsys, offline_cache):
    # the data sources of #15 (parquet, save_to_disk folders, data set names) come with the data part
    pytest.importorskip("hbat.data.sources")
    [config] = blocks("yaml")
    [install, command] = [line.split("#")[0].split() for line in blocks("bash")[0].strip().splitlines()]
    assert install[:2] == ["pip", "install"] and command[:3] == ["hbat", "train", "own.yaml"]
    root, models = tmp_path / "work", tmp_path / "models"
    root.mkdir()
    monkeypatch.chdir(root)  # the config's relative paths (data/..., runs/own) as a reader's
    write_models_and_data(root, models, offline_cache, H.train_tokenizer())
    (root / "own.yaml").write_text(config.replace("/models/", f"{models}/"))

    built = []  # every model a stage trains, as the workspace prepares it

    def recording(module, *args, **kwargs):
        built.append(prepare(module, *args, **kwargs))
        return built[-1]

    prepare = workspace.prepare_trainee
    monkeypatch.setattr(workspace, "prepare_trainee", recording)
    capsys.readouterr()
    code = main(command[2:] + ["--no-progress"] + [a for o in TINY_BUDGET for a in ("--set", o)])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]

    # the settings took effect: bf16 LoRA policies with gradient checkpointing, nothing else trained
    assert built and all(is_lora(m) and is_checkpointed(m) for m in built)
    assert all({p.dtype for n, p in m.named_parameters() if "lora_" not in n} == {torch.bfloat16} for m in built)
    shared = root / "runs" / "own" / "shared"
    assert not list(shared.glob("*/sft.pt")) and not list(shared.glob("*/reward_model.pt"))
    assert list((shared / "tokens").glob("*.pt"))  # the data tokenised once and cached
    for method in ("two_stage", "hbat"):
        result = json.loads((root / "runs" / "own" / method / "result.json").read_text())
        assert result["status"] == "ok", method
        items = {item["name"]: item["dtype"] for item in result["memory_plan"]["items"]}
        assert items["policy weights (frozen base)"] == "bfloat16" and "policy LoRA adapters" in items

    # the data: conversations rendered with the chat template, the prompts from the data set name
    data = workspace.load_data(load_config(str(root / "own.yaml"), TINY_BUDGET))
    assert all(r["prompt"].endswith("<|assistant|>") for r in data.splits["sft_train"] + data.splits["pref_train"])
    assert len(data.splits["prompts_train"]) + len(data.splits["prompts_val"]) == 12

    # the peft snippet loads the saved adapter onto the base
    [snippet, _] = blocks("python")
    scope = {}
    exec(snippet.replace("/models/", f"{models}/"), scope)
    from peft import PeftModel

    assert isinstance(scope["model"], PeftModel)


def test_the_readme_memory_plan_is_what_the_snippet_prints(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the page's plan is that of a machine without CUDA (unknown free memory)")
    [_, snippet] = blocks("python")
    shown = blocks("")[-1]  # the plain block after the snippet: its output
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})
    assert printed.getvalue() == shown


def test_the_readme_memory_plan_error_is_what_the_fp32_run_raises(tmp_path, monkeypatch):
    from hbat.trainer import memory

    [_, snippet] = blocks("python")
    [error, _] = blocks("")
    scope = {}
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(snippet, scope)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(20.90 * memory.GIB))  # the page's machine
    with pytest.raises(memory.MemoryPlanError) as raised:
        memory.plan_memory(load_config(None, scope["run"]), device=torch.device("cpu")).check()
    assert f"hbat train: {raised.value}\n" == error
