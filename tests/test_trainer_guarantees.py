"""The "Guarantees" of the trainer (docs/ops.md): no code runs from a file, a diverged run never passes as a result,
every setting is checked when the config is loaded, errors are one line naming the key / file / line, a kill
leaves nothing behind, a second run into a folder is refused, every file hbat reads back is checked, a user's
model folder holds the weights its config.json describes and a vocabulary its tokenizer fits, and a full disk
is named.

Tiny configs throughout (seconds each). CLI runs are in-process (``hbat.trainer.run.main``) and start from a
copy of one shared cache (base model, SFT reference, reward model) built once for the module.
"""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from hbat.trainer import checkpoint as ckpt  # noqa: E402
from hbat.trainer import algorithm  # noqa: E402
from hbat.trainer.checks import ConfigError  # noqa: E402
from hbat.trainer.config import TrainConfig, load_config  # noqa: E402
from hbat.trainer.guards import TrainingDiverged  # noqa: E402
from hbat.trainer.lock import HOST, FolderLocked, run_lock  # noqa: E402
from hbat.trainer.metrics import read_metrics  # noqa: E402
from hbat.trainer.run import EXIT_DIVERGED, EXIT_ERROR, main  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from faults import nan_loss  # noqa: E402
from hf_fixtures import (TINY, save_causal_lm, save_reward_model, tiny_config, train_tokenizer, user_run,  # noqa: E402
                         write_user_run)
from trainer_ds_worker import tiny_workspace  # noqa: E402

TASK = ["data.task_n_sft=64", "data.task_n_pref=48", "data.task_n_val=8"]
CLI = TINY + TASK


# --- helpers ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """``<dir>/shared`` of the tiny CLI config, built once (copied into each test's output folder)."""
    from hbat.trainer.workspace import prepare

    out = tmp_path_factory.mktemp("cache")
    prepare(load_config(None, CLI + [f"output_dir={out}"]), progress=False)
    return out / "shared"


def out_dir(tmp_path, shared_cache) -> Path:
    out = tmp_path / "out"
    shutil.copytree(shared_cache, out / "shared")
    return out


def hbat_train(capsys, out, *overrides, flags=()) -> tuple[int, str, str]:
    argv = ["--no-progress", *flags] + [a for o in [*CLI, f"output_dir={out}", *overrides] for a in ("--set", o)]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    """The error output of a failed command: exactly one line ``hbat train: ...``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hbat train: ") and "Traceback" not in err, err
    return lines[0]


class Plant:
    """Unpickling this runs ``open(marker, "w")``: the marker file says whether a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path, *, with_checksum: bool) -> None:
    torch.save({"model": Plant(marker)}, path)
    if with_checksum:  # the attacker also writes a matching checksum: the load itself must refuse
        (path.parent / (path.name + ".sha256")).write_text(f"{ckpt.sha256_of(str(path))}  {path.name}\n")


def shared_folder(out: Path) -> Path:
    (folder,) = (out / "shared").iterdir()
    return folder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1. no code runs from a file ---------------------------------------------------------------------------------

@pytest.mark.parametrize("with_checksum", [False, True], ids=["no-checksum", "forged-checksum"])
def test_a_pickle_planted_in_the_shared_cache_never_runs(tmp_path, shared_cache, capsys, with_checksum):
    out = out_dir(tmp_path, shared_cache)
    target = shared_folder(out) / "reward_model.pt"
    marker = tmp_path / "ran"
    plant(target, marker, with_checksum=with_checksum)
    code, _, err = hbat_train(capsys, out, "method=sft_only")
    assert code == EXIT_ERROR
    line = one_line_error(err)
    assert str(target) in line and "delete it" in line
    assert not marker.exists()
    torch.load(target, weights_only=False)  # the planted file is live: loading it the unsafe way runs it
    assert marker.exists()


def test_a_pickle_planted_as_checkpoint_never_runs_on_resume(tmp_path):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "method=sft_only"])
    folder = tmp_path / "sft_only"
    folder.mkdir()
    marker = tmp_path / "ran"
    plant(folder / "checkpoint.pt", marker, with_checksum=True)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.pt: cannot be loaded .*run without --resume"):
        algorithm.run_method(tiny_workspace(), cfg, resume=True, progress=False)
    assert not marker.exists()


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    random.seed(5)
    torch.manual_seed(5)
    ckpt.save_atomic({"rng": ckpt.rng_state()}, str(tmp_path / "s.pt"))
    expected = (random.random(), torch.rand(3))
    ckpt.set_rng_state(ckpt.load(str(tmp_path / "s.pt"))["rng"])
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


# --- 2. a diverged run never passes as a result ---------------------------------------------------------------

def test_a_diverged_method_fails_named_and_the_others_still_run(tmp_path, shared_cache, capsys, monkeypatch):
    out = out_dir(tmp_path, shared_cache)
    nan_loss(monkeypatch, "hbat.trainer.dpo.dpo_loss")  # only two_stage has a DPO stage
    code, stdout, err = hbat_train(capsys, out, flags=["--methods", "two_stage,sft_only"])
    assert code == EXIT_DIVERGED
    line = one_line_error(err)
    assert "method two_stage, stage 1 (hpa, part 1 of 1)" in line and "training diverged" in line
    summary = {r["method"]: r for r in json.loads((out / "summary.json").read_text())}
    assert summary["two_stage"]["status"] == "diverged" and "eval/reward" not in summary["two_stage"]
    assert summary["sft_only"]["status"] == "ok" and "eval/reward" in summary["sft_only"]
    assert "| two_stage | diverged |" in (out / "summary.md").read_text() and "| two_stage | diverged |" in stdout
    result = json.loads((out / "two_stage" / "result.json").read_text())
    assert result["status"] == "diverged" and result["stage"] == 1
    # the SFT stage's checkpoint is kept, and is finite; nothing of the diverged DPO stage was saved or ranked
    state = ckpt.load(str(out / "two_stage" / "checkpoint.pt"))
    assert state["position"] == 1 and state["best"] is None
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "two_stage" / "best.pt").exists()


def test_a_nan_weight_at_a_stage_end_keeps_the_last_good_checkpoint_and_best(tmp_path, monkeypatch):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "method=hbat", "n_parts=2", "eval.kl_samples=0"])
    folder = tmp_path / "hbat"
    real_loop, saved, sft_stages = algorithm.train_loop, {}, []

    def sft_then_nan(model, objective, *args, **kwargs):
        result = real_loop(model, objective, *args, **kwargs)
        sft_stages.append(objective.desc == "sft")
        if objective.desc == "sft" and sum(sft_stages) == 2:  # the second IFA stage (stage 2): files of 0-1 exist
            saved.update({name: (folder / name).read_bytes() for name in ("checkpoint.pt", "best.pt")})
            with torch.no_grad():
                dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
        return result

    monkeypatch.setattr(algorithm, "train_loop", sft_then_nan)
    with pytest.raises(TrainingDiverged, match=r"method hbat, stage 2 \(ifa, part 2 of 2\): at the end of the "
                                               r"stage: weight model\.layers\.1\.mlp\.up_proj\.weight is not finite"):
        algorithm.run_method(tiny_workspace(), cfg, progress=False)
    for name, content in saved.items():
        assert (folder / name).read_bytes() == content, f"{name} was overwritten"
    assert ckpt.load(str(folder / "checkpoint.pt"))["position"] == 2
    assert json.loads((folder / "result.json").read_text())["status"] == "diverged"


def test_the_loss_check_names_the_step_without_a_sync_per_step(monkeypatch):
    from hbat.trainer.dpo import DPOConfig, run_dpo

    ws = tiny_workspace()
    cfg = DPOConfig(batch_size=8, max_steps=6, logging_steps=3, max_len=32)
    calls = nan_loss(monkeypatch, "hbat.trainer.dpo.dpo_loss", from_call=5)  # step 5: inside the second interval
    with pytest.raises(TrainingDiverged, match=r"steps 4-6: dpo/loss is nan; training diverged \(a smaller "
                                               r"dpo\.lr may help\)"):
        run_dpo(ws.build(), None, ws.tokenizer, ws.pref_train, cfg, progress=False)
    assert calls["n"] == 6  # the check came at the log of step 6, not at the NaN step: no sync per step


def test_ppo_divergence_stops_before_the_next_rollout(monkeypatch):
    from hbat.trainer.ppo import Critic, PPOConfig, run_ppo

    ws = tiny_workspace()
    cfg = PPOConfig(batch_size=4, mini_batch_size=2, max_steps=4, max_new_tokens=4, cold_start_steps=0)
    critic = Critic.from_reward_model(ws.reward_model).requires_grad_(True)
    # two mini-batches per PPO epoch: the 3rd value-loss call is in the second PPO step
    nan_loss(monkeypatch, "hbat.trainer.ppo.value_loss", from_call=cfg.batch_size // cfg.mini_batch_size * cfg.ppo_epochs + 1)
    rollouts = nan_loss(monkeypatch, "hbat.trainer.ppo.generate", from_call=10**9)  # counts the rollouts only
    with pytest.raises(TrainingDiverged, match=r"ppo step 2\b.*ppo/value_loss is nan"):
        run_ppo(ws.build(), None, ws.reward_model, critic, ws.tokenizer, ws.prompts_train, cfg, progress=False)
    assert rollouts["n"] == 2  # no third rollout after the NaN


def test_a_diverged_shared_model_is_not_cached(tmp_path, capsys, monkeypatch):
    nan_loss(monkeypatch, "hbat.trainer.reward.ranking_loss")
    code, _, err = hbat_train(capsys, tmp_path / "out", "method=sft_only")
    assert code == EXIT_DIVERGED
    assert "the shared reward model: step" in one_line_error(err) and "rm/loss is nan" in one_line_error(err)
    assert not list((tmp_path / "out" / "shared").glob("*/reward_model.pt"))


# --- 3-4. every setting is checked when the config is loaded --------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("eval.batch_size=0", "config.eval.batch_size must be >= 1, got 0"),
    ("eval.max_new_tokens=0", "config.eval.max_new_tokens must be >= 1, got 0"),
    ("eval.kl_samples=-1", "config.eval.kl_samples must be >= 0, got -1"),
    ("ewc.f_max=-1", "config.ewc.f_max must be >= 0, got -1.0"),
    ("ewc.lam=nan", "config.ewc.lam must be a finite number, got nan"),
    ("ewc.lam=1e37", "config.ewc.lam * f_max = 1e+39 overflows float32"),
    ("ewc.lam=1e39", "config.ewc.lam must fit float32 (at most 3.403e+38 in size), got 1e+39"),
    ("dpo.lr=1e38", "config.dpo.lr must be at most 3.403e+37 (AdamW's first step, lr / (1 - beta1) = 1e+39, must "
                    "fit float32), got 1e+38"),
    ("ppo.critic_lr=1e38", "config.ppo.critic_lr must be at most 3.403e+37"),
    ("model.pretrain_lr=1e38", "config.model.pretrain_lr must be at most 3.403e+37"),
    ("dpo.beta=1e39", "config.dpo.beta must fit float32"),
    ("ewc.importance_mode=bogus", "config.ewc.importance_mode must be one of"),
    ("ewc.importance_scale=0", "config.ewc.importance_scale must be > 0"),
    ("ewc.anchor_dtype=float16", "config.ewc.anchor_dtype must be one of ('float32', 'bfloat16')"),
    ("ewc.group_by=block", "config.ewc.group_by must be one of ('layer',) or null"),
    ("ewc.include=[]", "config.ewc.include must be null or a non-empty list"),
    ("ewc.include=[encoder.*]", "config.ewc.include ['encoder.*'] selects no parameter of the model"),
    ("ewc.freeze_fraction=1.5", "config.ewc.freeze_fraction must be <= 1"),
    ("ewc.freeze_by=rows", "config.ewc.freeze_by must be one of"),
    ("ewc.fisher_samples=0", "config.ewc.fisher_samples must be >= 1"),
    ("sft.max_len=1", "config.sft.max_len must be >= 2, got 1"),
    ("sft.max_len=300", "config.sft.max_len = 300 tokens exceeds the model's context of 256"),
    ("reward.max_len=257", "config.reward.max_len = 257 tokens exceeds the model's context of 256"),
    ("eval.max_new_tokens=200", "config.eval.max_prompt_len + eval.max_new_tokens = 328 tokens exceeds the model's "
                                "context of 256 (the embedded model's context); lower one of them"),
    ("eval.max_prompt_len=0", "config.eval.max_prompt_len must be >= 1, got 0"),
    ("sft.lr=nan", "config.sft.lr must be a finite number"),
    ("sft.grad_accum_steps=64", "config.sft.grad_accum_steps must be <= batch_size (32), got 64"),
    ("sft.warmup_ratio=1", "config.sft.warmup_ratio must be in [0, 1)"),
    ("sft.lr_scheduler_type=step", "config.sft.lr_scheduler_type must be one of"),
    ("dpo.beta=0", "config.dpo.beta must be > 0"),
    ("dpo.sft_batch_size=0", "config.dpo.sft_batch_size must be >= 1 or null"),
    ("reward.lr=0", "config.reward.lr must be > 0"),
    ("reward.max_grad_norm=-1", "config.reward.max_grad_norm must be >= 0"),
    ("ppo.top_p=0", "config.ppo.top_p must be > 0"),
    ("ppo.gamma=1.5", "config.ppo.gamma must be <= 1"),
    ("ppo.mini_batch_size=16", "config.ppo.mini_batch_size must be <= batch_size (8)"),
    ("ppo.max_prompt_len=1", "config.ppo.max_prompt_len must be >= 2"),
    ("ppo.cold_start_scope=ever", "config.ppo.cold_start_scope must be one of"),
    ("ppo.temperature=0", "config.ppo.temperature must be > 0"),
    ("data.max_val=-1", "config.data.max_val must be >= 1, got -1"),
    ("data.task_n_sft=0", "config.data.task_n_sft must be >= 1, got 0"),
    ("data.task_conflict=2", "config.data.task_conflict must be <= 1"),
    ("data.val_size=1.5", "config.data.val_size must be a fraction in (0, 1) or a whole number of rows"),
    ("data.sft=''", "config.data.sft must be a path or null, got ''"),
    ("data.sft_adapter=csv", "config.data.sft_adapter must be one of"),
    ("data.sft=x.jsonl", "config.model.path is null (the embedded task), but data.sft is set and would be ignored"),
    ("model.size=huge", "config.model.size must be one of ('tiny', 'small', 'base')"),
    ("model.pretrain_lr=0", "config.model.pretrain_lr must be > 0"),
    ("model.path=/nonexistent", "config.model.path is set, so data.sft and data.preference must name JSONL files"),
    ("n_parts=0", "config.n_parts must be >= 1, got 0"),
    ("seed=-1", "config.seed must be >= 0, got -1"),
    ("mix_coef=-1", "config.mix_coef must be >= 0"),
    ("keep=first", "config.keep must be one of ('best', 'last')"),
    ("output_dir=''", "config.output_dir must be a path or null, got ''"),
])
def test_bad_settings_are_refused_when_the_config_is_loaded(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def _fields(cls, prefix=""):
    import dataclasses

    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name) if f.default_factory is dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            yield from _fields(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("key", list(_fields(TrainConfig)))
def test_every_field_is_checked_and_named(key):
    """A value of the wrong kind (a mapping) is refused for every field of every section, naming the key."""
    with pytest.raises(ValueError, match=rf"config\.{re.escape(key)} (must|cannot)"):
        load_config(None, [f"{key}={{a: 1}}"])


def test_a_bad_setting_fails_before_anything_is_trained(tmp_path, capsys):
    for override, message in (("eval.batch_size=0", "config.eval.batch_size must be >= 1, got 0"),
                              ("dpo.lr=1e38", "config.dpo.lr must be at most 3.403e+37"),  # not an error at step 1
                              ("n_parts=40", "config.n_parts = 40 needs at least 40 training rows in each data set, "
                                             "but the embedded task (data.task_n_pref // 2 = 24 prompts) has 24")):
        code, _, err = hbat_train(capsys, tmp_path / "out", override)
        assert code == EXIT_ERROR and message in one_line_error(err)
        assert not (tmp_path / "out" / "shared").exists()  # nothing was built


def test_user_data_and_model_are_checked_before_any_model_is_built(tmp_path, capsys):
    from hbat.task import build_model, build_tokenizer

    config = write_user_run(tmp_path, n_rows=6, val_size=0.25)
    base = [o for o in TINY if not o.startswith("model.")]

    def run(*overrides):
        capsys.readouterr()  # (save_pretrained's progress bars above)
        argv = [str(config), "--no-progress"] + [a for o in [*base, *overrides] for a in ("--set", o)]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == EXIT_ERROR
        assert not (tmp_path / "out" / "shared").exists()
        return one_line_error(err)

    assert "config.n_parts = 5 needs at least 5 training rows" in run("n_parts=5")
    assert f"data.sft ({tmp_path / 'sft.jsonl'}) has 4" in run("n_parts=5")
    assert "config.model.path is set, so data.sft and data.preference must name JSONL files (data.preference is " \
           "null)" in run("data.preference=null")
    nope = tmp_path / "nope.jsonl"
    assert f"config.data.prompts is not a file: {nope}" in run(f"data.prompts={nope}")
    # a model whose context is shorter than max_len: named, with the config.json it comes from
    short = tmp_path / "short"
    tokenizer = build_tokenizer()
    build_model(tokenizer, size="tiny", max_position_embeddings=48).save_pretrained(short)
    tokenizer.save_pretrained(short)
    line = run(f"model.path={short}", "sft.max_len=64")
    assert f"config.sft.max_len = 64 tokens exceeds the model's context of 48 (max_position_embeddings in " \
           f"{short / 'config.json'})" in line
    # data files: an empty file, a non-UTF-8 byte (file and line), and an empty path
    (tmp_path / "empty.jsonl").write_text("")
    assert f"config.data.prompts names a file with no rows: {tmp_path / 'empty.jsonl'}" in \
        run(f"data.prompts={tmp_path / 'empty.jsonl'}")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    assert f"{bad}, line 2: not UTF-8 text (byte 0xe9)" in run(f"data.prompts={bad}")
    assert "config.data.sft must be a path or null, got ''" in run("data.sft=''")


def test_duplicate_yaml_keys_are_refused(tmp_path):
    from hbat.trainer.compare import load_spec

    path = tmp_path / "run.yaml"
    path.write_text("method: hbat\nsft:\n  lr: 0.001\n  epochs: 2\n  lr: 0.01\n")
    with pytest.raises(ValueError, match=rf"{path}, line 5: duplicate key 'lr' \(first at line 3\)"):
        load_config(str(path))
    path.write_text("runs: [hbat]\nset: [sft.lr=1]\nruns: [two_stage]\n")
    with pytest.raises(ValueError, match="line 3: duplicate key 'runs' \\(first at line 1\\)"):
        load_spec(str(path))
    with pytest.raises(ValueError, match="duplicate key 'lr'"):
        load_config(None, ["sft={lr: 1, lr: 2}"])
    path.write_text("sft: [1\n")
    with pytest.raises(ValueError, match=rf"{path}: not valid YAML"):
        load_config(str(path))


# --- 5. errors name the file, line or key, in one line ----------------------------------------------------------

def test_file_errors_are_one_line(tmp_path, shared_cache, capsys, monkeypatch):
    out = out_dir(tmp_path, shared_cache)
    assert hbat_train(capsys, out, "method=sft_only")[0] == 0
    path = out / "sft_only" / "checkpoint.pt"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])  # truncated (e.g. copied while written)
    code, _, err = hbat_train(capsys, out, "method=sft_only", flags=["--resume"])
    assert code == EXIT_ERROR
    assert one_line_error(err) == f"hbat train: {path}: the checksum does not match (the file is damaged or was " \
                                  "changed after hbat wrote it); delete it, or run without --resume"
    state = {"position": 1}  # written by something else, with a valid checksum, but no 'config'
    ckpt.save_atomic(state, str(path))
    code, _, err = hbat_train(capsys, out, "method=sft_only", flags=["--resume"])
    assert code == EXIT_ERROR and f"{path}: has no 'model' (made by another version of hbat?)" in one_line_error(err)
    # deepspeed outside a launcher: how to launch it instead of "No module named 'mpi4py'"
    pytest.importorskip("deepspeed")
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 2}}')
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = hbat_train(capsys, out, f"deepspeed={ds_json}")
    assert code == EXIT_ERROR and "torchrun --nproc_per_node N -m hbat.cli train" in one_line_error(err)


# --- 6. kill leftovers, metrics on resume, one run per folder -------------------------------------------------

KILLED_WRITER = """
import os, signal, sys
from hbat.trainer import checkpoint
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before the rename
checkpoint.save_atomic({"x": 1}, sys.argv[1])
"""


def test_temp_files_of_killed_writers_are_removed_at_start(tmp_path):
    folder = tmp_path / "sft_only"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(folder / "checkpoint.pt")])
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in folder.iterdir())  # the file and its checksum, both unfinished
    assert len(left) == 2 and all(name.startswith(".tmp-") for name in left)
    assert sorted(name.split("~", 1)[1] for name in left) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    live = folder / f".tmp-{os.getpid()}-0123abcd@{HOST}~best.pt"  # a writer that still runs
    other_host = folder / f".tmp-{dead_pid()}-0123abcd@another-host~best.pt"  # cannot tell: kept
    foreign = folder / ".tmp-notes.txt"  # not hbat's
    for path in (live, other_host, foreign):
        path.write_text("x")
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "method=sft_only", "eval.kl_samples=0"])
    algorithm.run_method(tiny_workspace(), cfg, progress=False)
    names = {p.name for p in folder.iterdir()}
    assert not set(left) & names and {live.name, other_host.name, foreign.name} <= names
    assert not [n for n in names - {live.name, other_host.name, foreign.name} if n.startswith(".tmp-")]


def test_resume_keeps_metrics_up_to_the_checkpoint(tmp_path, monkeypatch):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "method=hbat", "n_parts=2", "eval.kl_samples=0"])
    path = tmp_path / "hbat" / "metrics.jsonl"
    algorithm.run_method(tiny_workspace(), cfg, progress=False)
    full = [(r["step"], r["stage"]) for r in read_metrics(path)]
    real_loop, dpo_calls = algorithm.train_loop, []

    def crash_in_second_hpa(model, objective, *args, **kwargs):  # after the stage's boundary record
        if objective.desc == "dpo":
            dpo_calls.append(1)
            if len(dpo_calls) == 2:
                with open(path, "a") as fh:
                    fh.write('{"time": 1.0, "step": 9')  # a line cut short by the kill
                raise KeyboardInterrupt
        return real_loop(model, objective, *args, **kwargs)

    monkeypatch.setattr(algorithm, "train_loop", crash_in_second_hpa)
    with pytest.raises(KeyboardInterrupt):
        algorithm.run_method(tiny_workspace(), cfg, progress=False)
    monkeypatch.setattr(algorithm, "train_loop", real_loop)
    algorithm.run_method(tiny_workspace(), cfg, resume=True, progress=False)
    assert [(r["step"], r["stage"]) for r in read_metrics(path)] == full  # no record twice, none cut short


LOCK_HOLDER = """
import sys, time
from hbat.trainer.lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_into_a_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    folder = tmp_path / "out" / "sft_only"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLocked, match=rf"in use by another hbat run \(pid {holder.pid} on host {HOST},"):
            with run_lock(str(folder)):
                pass
        code, _, err = hbat_train(capsys, tmp_path / "out", "method=sft_only")
        assert code == EXIT_ERROR and f"(pid {holder.pid} on host {HOST}" in one_line_error(err)
        assert not (tmp_path / "out" / "shared").exists()  # refused before anything was built
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is stale and the next run takes it over (and removes it at the end)
    assert json.loads((folder / "hbat.lock").read_text())["pid"] == holder.pid
    with run_lock(str(folder)):
        assert json.loads((folder / "hbat.lock").read_text())["pid"] == os.getpid()
    assert not (folder / "hbat.lock").exists()
    (folder / "hbat.lock").write_text(json.dumps({"pid": dead_pid(), "host": HOST}))
    with run_lock(str(folder)):
        pass
    (folder / "hbat.lock").write_text(json.dumps({"pid": 1, "host": "another-host"}))  # cannot tell: refused
    with pytest.raises(FolderLocked, match="pid 1 on host another-host"):
        with run_lock(str(folder)):
            pass


# --- 7. every file hbat reads back is checked -----------------------------------------------------------------

def _flip_byte(path: Path) -> bytes:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))
    return bytes(content)


def test_a_flipped_byte_is_detected_and_the_file_kept(tmp_path, shared_cache, capsys):
    out = out_dir(tmp_path, shared_cache)
    assert hbat_train(capsys, out, "method=sft_only")[0] == 0
    for path, remedy in ((out / "sft_only" / "checkpoint.pt", "delete it, or run without --resume"),
                         (out / "sft_only" / "best.pt", "delete it, or run without --resume"),
                         (shared_folder(out) / "sft.pt", "delete it (the shared pieces are rebuilt")):
        original = path.read_bytes()
        damaged = _flip_byte(path)
        code, _, err = hbat_train(capsys, out, "method=sft_only", flags=["--resume"])
        assert code == EXIT_ERROR
        assert one_line_error(err).startswith(f"hbat train: {path}: the checksum does not match") and remedy in err
        assert path.read_bytes() == damaged  # never replaced silently
        path.write_bytes(original)
    assert hbat_train(capsys, out, "method=sft_only", flags=["--resume"])[0] == 0


def test_a_kill_between_a_file_and_its_checksum_leaves_a_file_that_verifies(tmp_path, monkeypatch):
    path = str(tmp_path / "state.pt")
    ckpt.save_atomic({"v": torch.tensor(1)}, path)
    real_replace = os.replace

    def killed_at(target_suffix):
        def replace(src, dst):
            if str(dst).endswith(target_suffix):
                raise KeyboardInterrupt
            real_replace(src, dst)
        return replace

    # killed before the new file is renamed into place: the old one stays and verifies
    monkeypatch.setattr(os, "replace", killed_at(".pt"))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"v": torch.tensor(2)}, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert int(ckpt.load(path)["v"]) == 1
    # killed after the rename, before the checksum lists the new file alone: the new one verifies
    calls = []

    def killed_at_last_checksum(src, dst):
        calls.append(dst)
        if str(dst).endswith(".sha256") and len(calls) == 3:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_last_checksum)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"v": torch.tensor(3)}, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert int(ckpt.load(path)["v"]) == 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


# --- 7. a user's model folder, the config file and the disk ----------------------------------------------------

@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A tiny Llama of one's own (``model``), an SFT model and a reward model with the same tokenizer, JSONL data;
    the overrides of a tiny run on them."""
    folder = tmp_path_factory.mktemp("user")
    tokenizer = train_tokenizer()
    overrides = user_run(folder, tokenizer)
    save_causal_lm(folder / "sft", tokenizer, seed=1)
    save_reward_model(folder / "rm", tokenizer)
    return folder, overrides, tokenizer


def edited(source: Path, target: Path, **config) -> Path:
    """A copy of the model folder ``source`` whose config.json has the ``config`` entries changed."""
    shutil.copytree(source, target)
    text = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**text, **config}))
    return target


def train_user(capsys, user, out, *extra) -> tuple[int, str, str]:
    _, overrides, _ = user
    argv = ["--no-progress"] + [a for o in [*overrides, f"output_dir={out}", "method=sft_only", *extra]
                                for a in ("--set", o)]
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def nothing_trained(out: Path) -> bool:
    """No shared model cached, no stage logged: the run stopped before any training."""
    cached = [p for p in out.glob("shared/*/*.pt") if p.parent.name != "tokens"]  # (not the data's token ids)
    return not cached and not [p for p in out.glob("*/metrics.jsonl") if p.read_text()]


MISSING = "missing from the weights: model.layers.2.input_layernorm.weight, model.layers.2.mlp.down_proj.weight, " \
          "model.layers.2.mlp.gate_proj.weight and "


@pytest.mark.parametrize("key, change, extra, problem", [
    ("model.path", {"num_hidden_layers": 4}, [], MISSING + "15 more (transformers would initialise these at random)"),
    ("model.path", {"num_hidden_layers": 4}, ["model.lora_r=4"], MISSING + "15 more"),  # LoRA's base
    ("model.path", {"num_hidden_layers": 1}, [], "unexpected (not in config.json's model): "
                                                 "model.layers.1.input_layernorm.weight, "),
    ("model.path", {"hidden_size": 64, "intermediate_size": 128}, [],  # was a RuntimeError traceback
     "of another size: lm_head.weight (weights [300, 32], config.json [300, 64]), model.embed_tokens.weight "
     "(weights [300, 32], config.json [300, 64]), model.layers.0.input_layernorm.weight (weights [32], config.json "
     "[64]) and 18 more"),
    ("model.sft_path", {"num_hidden_layers": 4}, [], MISSING + "15 more"),
    ("model.reward_path", {"num_hidden_layers": 4}, [], MISSING + "15 more"),  # checked before the SFT model trains
])
def test_weights_that_do_not_match_the_config_stop_the_run_before_training(tmp_path, capsys, user, key, change, extra,
                                                                             problem):
    folder, _, _ = user
    source = {"model.path": "model", "model.sft_path": "sft", "model.reward_path": "rm"}[key]
    broken = edited(folder / source, tmp_path / "broken", **change)
    code, _, err = train_user(capsys, user, tmp_path / "out", f"{key}={broken}", *extra)
    assert code == EXIT_ERROR
    line = one_line_error(err)
    assert line.startswith(f"hbat train: config.{key} = {broken}: the weights do not match its config.json; ")
    assert problem in line
    assert nothing_trained(tmp_path / "out")


def test_the_heads_hbat_creates_are_said_and_a_matching_folder_trains(tmp_path, capsys, user):
    code, out, err = train_user(capsys, user, tmp_path / "out")
    assert code == 0, err[-3000:]
    assert out.count("reward model: the SFT model with a new score head (created by hbat), trained on "
                     "data.preference\n") == 1
    folder, _, _ = user
    code, out, _ = train_user(capsys, user, tmp_path / "own", f"model.reward_path={folder / 'rm'}")
    assert code == 0 and "new score head" not in out  # every weight of it comes from the folder


def test_a_pickle_as_a_model_weights_file_is_one_line_and_never_runs(tmp_path, capsys, user):
    folder, _, _ = user
    planted = tmp_path / "planted"
    shutil.copytree(folder / "model", planted)
    (planted / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": Plant(marker)}, planted / "pytorch_model.bin")
    code, _, err = train_user(capsys, user, tmp_path / "out", f"model.path={planted}")
    assert code == EXIT_ERROR and not marker.exists()
    assert one_line_error(err) == (
        f"hbat train: config.model.path = {planted}: cannot be read as a causal LM (a weights file holds objects "
        "other than tensors, which hbat never loads (no code runs from a file): save the model with safetensors)")
    assert nothing_trained(tmp_path / "out")


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_when_the_config_is_loaded(tmp_path, capsys, user):
    from transformers import AutoModelForCausalLM

    folder, overrides, tokenizer = user
    small = tmp_path / "small"
    AutoModelForCausalLM.from_config(tiny_config("llama", tokenizer, vocab_size=16)).save_pretrained(small)
    tokenizer.save_pretrained(small)
    message = (f"config.model.path has a vocabulary of 16 tokens (vocab_size in {small / 'config.json'}) but its "
               f"tokenizer ({small}) has {len(tokenizer)}: token ids from 16 on have no embedding")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides + [f"model.path={small}"])
    code, _, err = train_user(capsys, user, tmp_path / "out", f"model.path={small}")
    assert code == EXIT_ERROR and message in one_line_error(err)
    assert not (tmp_path / "out" / "shared").exists()  # before the token cache was written
    # model.tokenizer is what the policy is checked against
    with pytest.raises(ConfigError, match=re.escape(f"config.model.path has a vocabulary of {len(tokenizer)} tokens")):
        load_config(None, overrides + [f"model.tokenizer={bigger_tokenizer(tmp_path / 'bigger')}"])
    # a reward model with a tokenizer of its own is checked against it
    rm = save_reward_model(tmp_path / "rm", tokenizer)
    config = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**config, "vocab_size": 16}))
    with pytest.raises(ConfigError, match=re.escape(f"config.model.reward_path has a vocabulary of 16 tokens (vocab_size "
                                                    f"in {rm / 'config.json'}) but its tokenizer ({rm}) has")):
        load_config(None, overrides + [f"model.reward_path={rm}"])


def bigger_tokenizer(folder: Path) -> Path:
    """The fixture's tokenizer with 8 more tokens, saved in ``folder``."""
    tokenizer = train_tokenizer()
    tokenizer.add_tokens([f"<extra{i}>" for i in range(8)])
    tokenizer.save_pretrained(folder)
    return folder


def test_a_missing_config_file_is_named(tmp_path, capsys):
    for path, problem in ((tmp_path / "x.yaml", "no such config file"),
                          (tmp_path, "cannot read the config file (Is a directory)")):
        code = main([str(path)])
        assert code == EXIT_ERROR and one_line_error(capsys.readouterr().err) == f"hbat train: {path}: {problem}"


class FullDisk:
    """A binary file on a disk with room for ``room`` more bytes: a write past it raises ENOSPC, as a full disk."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def fill_the_disk(monkeypatch, room: int) -> None:
    """Every file hbat writes atomically (checkpoint.py opens them with os.fdopen) has room for ``room`` bytes."""
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        fh = real(fd, mode, *args, **kwargs)
        return FullDisk(fh, room) if "w" in mode and "b" in mode else fh

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)


def test_a_full_disk_is_named_with_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    ckpt.save_atomic({"v": torch.tensor(1)}, str(path))
    fill_the_disk(monkeypatch, room=100)  # torch.save fails inside ("unexpected pos"), its cause is the OSError
    with pytest.raises(ValueError, match=re.escape(f"no space left on device writing {path}")):
        ckpt.save_atomic({"v": torch.zeros(1000)}, str(path))
    with pytest.raises(ValueError, match=re.escape(f"no space left on device writing {tmp_path / 'a.md'}")):
        ckpt.write_text_atomic("x" * 1000, str(tmp_path / "a.md"))
    monkeypatch.undo()
    assert int(ckpt.load(str(path))["v"]) == 1 and sorted(os.listdir(tmp_path)) == ["state.pt", "state.pt.sha256"]


def test_a_full_disk_during_a_run_is_one_line_naming_the_file(tmp_path, shared_cache, capsys, monkeypatch):
    out = out_dir(tmp_path, shared_cache)
    fill_the_disk(monkeypatch, room=50_000)  # the config and checksums fit, the model's weights do not
    code, _, err = hbat_train(capsys, out, "method=sft_only")
    assert code == EXIT_ERROR
    assert one_line_error(err) == f"hbat train: no space left on device writing {out / 'sft_only' / 'best.pt'}"
    assert not [p for p in os.listdir(out / "sft_only") if p.startswith(".tmp-")]


# --- 8. edge cases ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    from hbat.trainer.metrics import MetricsLogger

    old = os.umask(umask)
    try:
        ckpt.save_atomic({"x": torch.ones(1)}, str(tmp_path / "a.pt"))
        ckpt.write_text_atomic("text", str(tmp_path / "summary.md"))
        MetricsLogger(str(tmp_path / "run"), tensorboard=False)
        (tmp_path / "plain.txt").write_text("x")  # what open() gives
    finally:
        os.umask(old)
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    for path in (tmp_path / "a.pt", tmp_path / "a.pt.sha256", tmp_path / "summary.md",
                 tmp_path / "run" / "metrics.jsonl"):
        assert path.stat().st_mode & 0o777 == want, path
