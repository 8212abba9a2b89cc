"""The EMA anchor of DPO stages (ema_anchor): anchor <- (1 - r) anchor + r theta after every step, and the stage
ends on the anchor; refused where it is not supported."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from hbat.trainer import algorithm  # noqa: E402
from hbat.trainer.config import load_config  # noqa: E402
from hbat.trainer.ds_config import check_supported  # noqa: E402
from hbat.trainer.ema import EMAAnchor  # noqa: E402
from hbat.trainer.memory import plan_memory  # noqa: E402

from hf_fixtures import TINY  # noqa: E402  (tests/ is on sys.path under pytest)
from trainer_ds_worker import tiny_workspace  # noqa: E402


def _cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"output_dir={tmp_path}", "method=two_stage", "n_parts=1", "eval.kl_samples=0",
                                     *extra])


def test_the_anchor_is_the_moving_average_of_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    expected = [p.detach().clone() for p in model.parameters()]
    anchor = EMAAnchor(model, 0.25)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        anchor.update()
        expected = [0.75 * e + 0.25 * p.detach() for e, p in zip(expected, model.parameters())]
    anchor.finish()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_a_dpo_stage_ends_on_its_anchor(tmp_path, monkeypatch):
    ws = tiny_workspace()
    start, steps, sft_end = {}, [], {}  # the weights when the DPO stage starts and after each of its steps
    real_loop = algorithm.train_loop

    def recording_loop(model, objective, *args, after_step=None, **kwargs):
        if objective.desc != "dpo":
            assert after_step is None  # no anchor in SFT stages
            result = real_loop(model, objective, *args, after_step=after_step, **kwargs)
            sft_end.update({k: v.detach().clone() for k, v in model.named_parameters()})
            return result
        start.update({k: v.detach().clone() for k, v in model.named_parameters()})

        def record():
            steps.append({k: v.detach().clone() for k, v in model.named_parameters()})
            after_step()
        return real_loop(model, objective, *args, after_step=record, **kwargs)

    monkeypatch.setattr(algorithm, "train_loop", recording_loop)
    result = algorithm.run_method(ws, _cfg(tmp_path, "ema_anchor=0.5", "keep=last"), progress=False)
    assert result["status"] == "ok" and len(steps) == 2  # dpo.max_steps=2
    final = torch.load(tmp_path / "two_stage" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(start[k], v) for k, v in sft_end.items())  # the SFT stage ended on its last step
    moved = 0
    for name, s0 in start.items():  # rate 0.5: anchor = 0.25 start + 0.25 step 1 + 0.5 step 2
        torch.testing.assert_close(final[name], 0.25 * s0 + 0.25 * steps[0][name] + 0.5 * steps[1][name])
        moved += not torch.equal(final[name], steps[1][name])
    assert moved  # the stage did not end on its last step


def test_refused_where_not_supported(tmp_path):
    with pytest.raises(ValueError, match="ema_anchor"):
        _cfg(tmp_path, "ema_anchor=1.5")
    with pytest.raises(ValueError, match="ema_anchor.*DPO stages"):
        _cfg(tmp_path, "ema_anchor=0.1", "hpa=ppo")
    with pytest.raises(ValueError, match="ema_anchor.*DPO stages"):
        _cfg(tmp_path, "ema_anchor=0.1", "method=sft_only")
    with pytest.raises(ValueError, match="ema_anchor.*LoRA"):
        _cfg(tmp_path, "ema_anchor=0.1", "model.lora_r=4")
    with pytest.raises(ValueError, match="ema_anchor.*float32"):
        _cfg(tmp_path, "ema_anchor=0.1", "model.dtype=bfloat16")
    with pytest.raises(NotImplementedError, match="ema_anchor"):
        check_supported(_cfg(tmp_path, "ema_anchor=0.1"), "hbat")
    names = [item.name for item in plan_memory(_cfg(tmp_path, "ema_anchor=0.1")).items]
    assert any(name.startswith("EMA anchor") for name in names)
    assert not any(item.name.startswith("EMA anchor") for item in plan_memory(_cfg(tmp_path)).items)
