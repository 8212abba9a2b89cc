"""The examples run end to end (as a user would start them) with a few steps."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args, cwd):
    # one thread: tiny models run fastest so, and steadily when other processes load the cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_plain_pytorch_example(tmp_path):
    out = run_example("plain_pytorch.py", "--rounds", "2", "--steps", "3", cwd=tmp_path)
    lines = re.findall(r"round (\d) (ifa|hpa): loss ([\d.]+) +ewc/penalty mean ([-\d.e+]+)", out)
    assert [(r, o) for r, o, _, _ in lines] == [("1", "ifa"), ("1", "hpa"), ("2", "ifa"), ("2", "hpa")]
    assert float(lines[0][3]) == 0.0  # the first stage is not penalised
    assert all(float(penalty) > 0 for *_, penalty in lines[1:])


def test_trl_dpo_example(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = run_example("trl_dpo.py", "--rounds", "1", "--steps", "2", "--output-dir", str(tmp_path / "run"),
                      cwd=tmp_path)
    assert re.search(r"round 1 sft: .*ewc/penalty 0\.000e\+00", out)
    penalty = re.search(r"round 1 dpo: .*ewc/penalty ([-\d.e+]+)", out)
    assert penalty and float(penalty.group(1)) > 0
    assert (tmp_path / "run" / "round1-dpo" / "checkpoint-2" / "hbat_ewc.pt").is_file()


def test_trl_dpo_example_under_deepspeed_zero3(tmp_path):
    """The multi-process recipe of docs/drop-in.md as written: torchrun, 2 CPU ranks, examples/ds_zero3.json."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("trl")
    from torchrun_launch import torchrun

    run = tmp_path / "run"
    proc = torchrun(ROOT / "examples" / "trl_dpo.py", ["--deepspeed", str(ROOT / "examples" / "ds_zero3.json"),
                                                        "--rounds", "1", "--steps", "2", "--output-dir", str(run)],
                    nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    penalty = re.search(r"round 1 dpo: .*ewc/penalty ([-\d.e+]+)", proc.stdout)
    assert penalty and float(penalty.group(1)) > 0
    assert len(re.findall(r"round 1 (?:sft|dpo):", proc.stdout)) == 2  # printed by rank 0 only
    for rank in (0, 1):  # each rank's anchor partition
        assert (run / "round1-dpo" / "checkpoint-2" / f"hbat_ewc-rank{rank}.pt").is_file()


def docs_block(after: str, page: str = "docs/drop-in.md") -> str:
    """The first ```python block of ``page`` after the line that starts with ``after``, as written."""
    text = (ROOT / page).read_text()
    start = text.index("\n```python\n", text.index("\n" + after)) + len("\n```python\n")
    return text[start:text.index("\n```\n", start) + 1]


# what the TRL snippet of docs/drop-in.md leaves to the reader: a model, its tokenizer and the N parts of each data set
TRL_SNIPPET_NAMES = """
import sys
sys.path.insert(0, {tests!r})
from datasets import Dataset
from hf_fixtures import char_tokenizer, tiny_llama
tokenizer = char_tokenizer()
model = tiny_llama(tokenizer)
sft_parts = [Dataset.from_list([{{"prompt": f"q{{i}}:", "completion": " yes"}} for i in range(8)])] * 2
pref_parts = [Dataset.from_list([{{"prompt": f"q{{i}}:", "chosen": " a", "rejected": " b"}} for i in range(8)])] * 2
"""


def test_the_docs_trl_snippet_runs_as_written(tmp_path):
    """On this machine's CPU (TRL's configs default to bf16, which a CPU refuses unless told)."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    snippet = docs_block("With TRL, one trainer run is one stage.")
    script = TRL_SNIPPET_NAMES.format(tests=str(ROOT / "tests")) + snippet + "print('stages', ewc.stages_done)\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "stages {'ifa': 2, 'hpa': 1}" in result.stdout  # the last stage ends with the next begin_stage
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0-dpo", "0-sft", "1-dpo", "1-sft"]
