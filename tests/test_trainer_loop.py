"""The alternating loop: method plans, config loading, which penalty is active when, resume, the CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from hbat.trainer import algorithm  # noqa: E402
from hbat.trainer.config import TrainConfig, load_config  # noqa: E402
from hbat.trainer.algorithm import stage_plan  # noqa: E402
from hbat.trainer.methods import SPECS  # noqa: E402
from hbat.trainer.metrics import read_metrics  # noqa: E402

from hf_fixtures import TINY, write_user_run  # noqa: E402  (tests/ is on sys.path under pytest)


def test_stage_plans():
    assert stage_plan("hbat", 2) == [("ifa", 0), ("hpa", 0), ("ifa", 1), ("hpa", 1)]
    assert stage_plan("two_stage", 1) == [("ifa", 0), ("hpa", 0)]
    assert stage_plan("no_alternation", 2) == [("ifa", 0), ("ifa", 1), ("hpa", 0), ("hpa", 1)]
    assert stage_plan("sft_only", 1) == [("ifa", 0)]
    assert load_config(None, ["method=two_stage"]).n_parts == 1  # preset
    assert load_config(None, ["method=two_stage", "n_parts=3"]).n_parts == 3  # explicit wins
    with pytest.raises(ValueError, match="unknown method 'dpo_only'"):
        stage_plan("dpo_only", 1)


def test_config_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: hbat\nn_parts: 3\newc:\n  f_max: 50\n  include: ['model.layers.*']\nsft:\n  lr: 0.001\n")
    cfg = load_config(str(path), ["sft.lr=3e-4", "ewc.importance_mode=paper", "keep=last"])
    assert isinstance(cfg, TrainConfig) and cfg.n_parts == 3 and cfg.ewc.f_max == 50.0
    assert cfg.sft.lr == 3e-4 and cfg.ewc.importance_mode == "paper" and cfg.keep == "last"
    assert cfg.ewc.include == ["model.layers.*"] and cfg.sft.batch_size == 32
    with pytest.raises(ValueError, match=r"unknown key config.sft.learning_rate; valid keys of config.sft: lr"):
        load_config(None, ["sft.learning_rate=1"])
    with pytest.raises(ValueError, match=r"config.n_parts must be an integer"):
        load_config(None, ["n_parts=two"])
    with pytest.raises(ValueError, match="hpa must be one of"):
        load_config(None, ["hpa=rlhf"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["sft.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(str(bad))
    from hbat.trainer.config import METHODS
    assert set(SPECS) == set(METHODS)


def _accepts(impl, proto) -> bool:
    """Whether the method ``impl`` can be called as the protocol's ``proto`` is (same positional parameters, by
    name and order; extra ones only with defaults)."""
    import inspect

    mine = [p for p in inspect.signature(impl).parameters.values() if p.kind != p.VAR_KEYWORD]
    theirs = list(inspect.signature(proto).parameters.values())
    if [p.name for p in mine[:len(theirs)]] != [p.name for p in theirs]:
        return False
    return all(p.default is not p.empty for p in mine[len(theirs):])


def _check_protocol(obj, protocol):
    assert isinstance(obj, protocol), type(obj).__name__
    for name, member in vars(protocol).items():
        if callable(member) and not name.startswith("_"):
            assert _accepts(getattr(type(obj), name), member), f"{type(obj).__name__}.{name}"


def test_every_regularizer_and_penalty_keeps_the_contract():
    """hbat.trainer.regularizers: the stage loop's Regularizer (all four methods' regularisers) and the
    optimizer step's Penalty (HybridEWC, FisherEWC), checked by isinstance and by signature."""
    from hbat import HybridEWC
    from hbat.baselines import FisherEWC
    from hbat.trainer.regularizers import Penalty, Regularizer, make_regularizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    cfg = load_config(None, []).ewc
    kinds = sorted({s.regularizer for s in SPECS.values()})
    assert kinds == ["fisher", "freeze", "hbat", "none"]
    for kind in kinds:
        regularizer = make_regularizer(kind, model, cfg, tokenizer=None, max_len=16)
        _check_protocol(regularizer, Regularizer)
        assert (regularizer.penalty is None) == (kind in ("none", "freeze"))
        if regularizer.penalty is not None:
            _check_protocol(regularizer.penalty, Penalty)
    for penalty in (HybridEWC(model), FisherEWC(model)):
        _check_protocol(penalty, Penalty)
    assert not isinstance(object(), Regularizer) and not isinstance(object(), Penalty)


@pytest.fixture(scope="module")
def workspace():
    """A tiny workspace built directly (no pre-training, untrained reward model): fast. Shared with the
    DeepSpeed worker, whose runs are compared with single-process ones."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from trainer_ds_worker import tiny_workspace

    return tiny_workspace()


def _cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"output_dir={tmp_path}", *extra])


def test_hbat_loop_order_and_penalty(workspace, tmp_path):
    cfg = _cfg(tmp_path, "method=hbat", "n_parts=2")
    result = algorithm.run_method(workspace, cfg, progress=False)
    records = read_metrics(os.path.join(tmp_path, "hbat", "metrics.jsonl"))
    stages = [(r["stage"], r["objective"], r["part"]) for r in records if "ewc/active" in r]
    assert stages == [(0, "ifa", 0), (1, "hpa", 0), (2, "ifa", 1), (3, "hpa", 1)]
    active = [r["ewc/active"] for r in records if "ewc/active" in r]
    assert active == [0.0, 1.0, 1.0, 1.0]  # IFA1 unpenalised, then every stage penalised (eq. 5 and 8)
    step_penalty = {}
    for r in records:
        if "ewc/penalty" in r:
            step_penalty.setdefault(r["stage"], []).append(r["ewc/penalty"])
    assert max(step_penalty[0]) == 0.0 and max(step_penalty[3]) > 0.0
    assert any("rewards/margins" in r for r in records) and any("sft/loss" in r for r in records)
    evals = [r for r in records if "eval/reward" in r]
    assert len(evals) == 2  # after each part
    for key in ("eval/exact_match", "eval/sft_loss", "eval/preference", "eval/reward", "eval/kl_to_sft"):
        assert key in result
    assert os.path.exists(os.path.join(tmp_path, "hbat", "checkpoint.pt"))


@pytest.mark.parametrize("method, hpa", [("two_stage", "dpo"), ("freeze", "dpo"), ("fisher", "dpo"),
                                         ("rlhf_pt", "dpo"), ("sft_hpa", "dpo"), ("hbat", "ppo")])
def test_methods_run_end_to_end(workspace, tmp_path, method, hpa):
    cfg = _cfg(tmp_path, f"method={method}", f"hpa={hpa}", "eval.kl_samples=0")
    result = algorithm.run_method(workspace, cfg, progress=False)
    assert result["method"] == method and "eval/reward" in result
    records = read_metrics(os.path.join(tmp_path, method, "metrics.jsonl"))
    if method == "freeze":
        assert any(r.get("freeze/tensors", 0) > 0 for r in records)
    if method == "fisher":
        assert any(r.get("fisher/active") == 1.0 for r in records)
    if hpa == "ppo":
        assert any(any(k.startswith("ppo/") for k in r) for r in records)


@pytest.mark.parametrize("hpa, dtype", [("dpo", "float32"), ("ppo", "float32"), ("dpo", "bfloat16")])
def test_resume_equals_uninterrupted_run(workspace, tmp_path, monkeypatch, hpa, dtype):
    """A crash in the second HPA stage, then --resume: the weights (and PPO's critic) of an uninterrupted run;
    in bf16 too (the checkpoint carries the fp32 master weights)."""
    from trainer_ds_worker import tiny_workspace

    if dtype == "bfloat16":
        workspace = tiny_workspace(torch.bfloat16)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    algorithm.run_method(workspace, _cfg(full_dir, "keep=last", f"hpa={hpa}", f"model.dtype={dtype}"), progress=False)
    real_loop, real_ppo, hpa_calls = algorithm.train_loop, algorithm.run_ppo, []

    def crash_in_second_hpa(real):  # inside the stage's training: after its boundary and its first records
        def wrapped(model, objective, *args, **kwargs):
            if real is real_ppo or objective.desc == "dpo":
                hpa_calls.append(1)
                if len(hpa_calls) == 2:
                    raise KeyboardInterrupt("simulated crash")
            return real(model, objective, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(algorithm, "train_loop", crash_in_second_hpa(real_loop))
    monkeypatch.setattr(algorithm, "run_ppo", crash_in_second_hpa(real_ppo))
    with pytest.raises(KeyboardInterrupt):
        algorithm.run_method(workspace, _cfg(cut_dir, "keep=last", f"hpa={hpa}", f"model.dtype={dtype}"), progress=False)
    monkeypatch.setattr(algorithm, "train_loop", real_loop)
    monkeypatch.setattr(algorithm, "run_ppo", real_ppo)
    assert torch.load(cut_dir / "hbat" / "checkpoint.pt", weights_only=False)["position"] == 3
    with pytest.raises(ValueError, match="different settings for \\['seed'\\]"):
        algorithm.run_method(workspace, _cfg(cut_dir, "keep=last", f"hpa={hpa}", f"model.dtype={dtype}", "seed=1"),
                        resume=True, progress=False)
    algorithm.run_method(workspace, _cfg(cut_dir, "keep=last", f"hpa={hpa}", f"model.dtype={dtype}"), resume=True,
                    progress=False)
    full = torch.load(full_dir / "hbat" / "checkpoint.pt", weights_only=False)
    cut = torch.load(cut_dir / "hbat" / "checkpoint.pt", weights_only=False)
    for name, value in full["model"].items():
        assert torch.equal(value, cut["model"][name]), name
    assert full["regularizer"]["ewc"]["accumulated"]["hpa"].equal(cut["regularizer"]["ewc"]["accumulated"]["hpa"])
    if dtype == "bfloat16":
        assert full["masters"]["policy"] and all(v.dtype == torch.float32 for v in full["masters"]["policy"].values())
        assert all(torch.equal(v, cut["masters"]["policy"][k]) for k, v in full["masters"]["policy"].items())
    if hpa == "ppo":
        assert full["critic"]["steps_trained"] == 2
        for name, value in full["critic"].items():
            assert torch.equal(value, cut["critic"][name]), name
        base = workspace.base_state
        assert any(not torch.equal(full["model"][k], base[k]) for k in base)  # the policy moved


def test_cli_train_on_user_jsonl(tmp_path):
    """`hbat train CONFIG` on a user's JSONL data and a local transformers model folder."""
    config = write_user_run(tmp_path, n_rows=40, val_size=0.2)
    args = [sys.executable, "-m", "hbat.cli", "train", str(config), "--no-progress"]
    args += [a for o in TINY if not o.startswith("model.") for a in ("--set", o)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| hbat |" in proc.stdout and "eval/reward" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary[0]["method"] == "hbat" and "eval/exact_match" not in summary[0]  # user data: no exact check
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000  # the run's metrics over training, drawn
    # a bad row names the file and line
    (tmp_path / "pref.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    proc = subprocess.run(args + ["--set", "output_dir=" + str(tmp_path / "out2")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "pref.jsonl" in proc.stderr and "2" in proc.stderr, proc.stderr[-2000:]


def test_l2sp_penalises_from_the_first_stage(workspace, tmp_path):
    """ewc.importance_mode=l2sp: F_i = 1 for every tensor from the first stage on (L2-SP: decay toward the anchor),
    where HBAT's first IFA stage has no penalty."""
    algorithm.run_method(workspace, _cfg(tmp_path, "method=hbat", "n_parts=1", "ewc.importance_mode=l2sp",
                                         "eval.kl_samples=0"), progress=False)
    records = read_metrics(os.path.join(tmp_path, "hbat", "metrics.jsonl"))
    assert [r["ewc/active"] for r in records if "ewc/active" in r] == [1.0, 1.0]
    assert max(r["ewc/penalty"] for r in records if r.get("stage") == 0 and "ewc/penalty" in r) > 0.0
    with pytest.raises(ValueError, match="ewc.importance_mode"):
        _cfg(tmp_path, "method=freeze", "ewc.importance_mode=l2sp")
