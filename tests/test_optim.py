"""hbat.optim.HybridAdamW against torch.optim.AdamW + ewc.apply_() (no clipping), step by step over several stages,
on every backend that runs here; state_dict round trip and resume; param groups; a scheduler; a transformers
Trainer run; bad input. (On the emulated CUDA kernels: tests/test_cuda_emulated.py.)"""
from __future__ import annotations

import copy
import io

import pytest
import torch

from hbat import HybridAdamW, HybridEWC
from ops_cases import backend_cases
from optim_cases import STAGES, hybrid, loss_of, run_stages, tiny_model, two_setups

BACKENDS = backend_cases(("reference", "cpu", "triton", "cuda"))


# ----------------------------------------------------------------------------------------- equals AdamW + apply_()
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_equals_torch_adamw_plus_apply_over_stages(backend, device):
    ref, mine = two_setups(backend, device)
    steps = 2 if backend == "triton" else 3  # the interpreter is slow
    run_stages([ref[:3], mine[:3]], stages=STAGES[:3] if backend == "triton" else STAGES, steps=steps)
    opt = mine[3]
    assert float(opt.last_penalty) > 0
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_penalty_matters_so_the_comparison_can_fail():
    (ref_model, *_), (model, _, step, opt) = two_setups("reference", "cpu")
    plain_model = copy.deepcopy(model)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    ewc = opt.ewc
    for k, objective in enumerate(STAGES[:3]):
        ewc.begin_stage(objective)
        for j in range(3):
            step(3 * k + j)
            loss_of(plain_model, 3 * k + j).backward()
            plain.step()
            plain.zero_grad()
    with torch.no_grad():
        moved = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), plain_model.parameters()))
    assert moved > 1e-3


def test_param_groups_with_their_own_lr_and_weight_decay():
    def groups(model):
        first, *rest = model.children()
        return [{"params": first.parameters(), "lr": 3e-2, "weight_decay": 0.2},
                {"params": [p for m in rest for p in m.parameters()], "lr": 5e-3, "weight_decay": 0.0}]

    ref, mine = two_setups("cpu" if _cpu_ok() else "reference", "cpu", groups=groups)
    assert [g["lr"] for g in mine[3].param_groups] == [3e-2, 5e-3]
    run_stages([ref[:3], mine[:3]], stages=STAGES[:3])


def test_lr_scheduler():
    ref, mine = two_setups("reference", "cpu")
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k)) for opt in (ref[3], mine[3])]
    run_stages([ref[:3], mine[:3]], stages=STAGES[:3], schedulers=schedulers)
    assert mine[3].param_groups[0]["lr"] == pytest.approx(1e-2 / 10)


@pytest.mark.parametrize("backend,device", backend_cases(("reference", "cpu")))
def test_bf16_params_keep_fp32_moments(backend, device):
    model = tiny_model(dtype=torch.bfloat16)
    fp32 = tiny_model()
    ewc, ewc32 = HybridEWC(model, backend=backend), HybridEWC(fp32, backend=backend)
    opt = HybridAdamW(model, ewc, lr=1e-2)
    opt32 = HybridAdamW(fp32, ewc32, lr=1e-2)
    run_steps = [hybrid(model, ewc, opt), hybrid(fp32, ewc32, opt32)]
    for k, objective in enumerate(STAGES[:3]):
        ewc.begin_stage(objective), ewc32.begin_stage(objective)
        for j in range(2):
            for step in run_steps:
                step(2 * k + j)
    for p, q in zip(model.parameters(), fp32.parameters()):
        assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(p.float(), q, rtol=0.05, atol=0.03)


def _cpu_ok():
    from hbat import ops

    return ops.backend_status("cpu", "cpu")[0]


# ----------------------------------------------------------------------------------------- checkpoints
def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_and_resume_equal_an_uninterrupted_run(dtype):
    backend = "cpu" if _cpu_ok() else "reference"

    def setup():
        model = tiny_model(dtype=dtype)
        ewc = HybridEWC(model, backend=backend)
        return model, ewc, HybridAdamW(model, ewc, lr=1e-2)

    model, ewc, opt = setup()
    schedule = [(objective, k) for k, objective in enumerate(("ifa", "hpa", "ifa")) for _ in range(3)]
    for i, (objective, k) in enumerate(schedule):
        if i % 3 == 0:
            ewc.begin_stage(objective)
        hybrid(model, ewc, opt)(i)
        if i == 4:  # mid-stage: save everything
            saved = _round_trip({"model": model.state_dict(), "ewc": ewc.state_dict(), "opt": opt.state_dict()})
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, ewc, opt = setup()
    model.load_state_dict(saved["model"])
    ewc.load_state_dict(saved["ewc"])
    opt.load_state_dict(saved["opt"])
    for p in model.parameters():
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["step"].device.type == "cpu"
        assert float(state["step"]) == 5
    for i, (objective, k) in enumerate(schedule[5:], start=5):
        if i % 3 == 0:
            ewc.begin_stage(objective)
        hybrid(model, ewc, opt)(i)
    for p, q in zip(model.parameters(), uninterrupted):
        assert torch.equal(p, q)


def test_loads_a_torch_adamw_state():
    model = tiny_model()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_of(model, 0).backward()
    torch_opt.step()
    opt = HybridAdamW(model, HybridEWC(model), lr=1e-2)
    opt.load_state_dict(torch_opt.state_dict())
    for p in model.parameters():
        assert torch.equal(opt.state[p]["exp_avg"], torch_opt.state[p]["exp_avg"])
        assert float(opt.state[p]["step"]) == 1


# ----------------------------------------------------------------------------------------- bad input
def test_refuses_a_step_after_apply():
    model = tiny_model()
    ewc = HybridEWC(model)
    opt = HybridAdamW(model, ewc)
    ewc.begin_stage("ifa")
    loss_of(model, 0).backward()
    ewc.apply_()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"apply_\(\) was called since HybridAdamW's last step"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(lr=-1.0), ValueError, "Invalid learning rate"),
    (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1"),
    (dict(eps=-1e-8), ValueError, "Invalid epsilon value"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value"),
    (dict(lr=torch.tensor(0.1)), TypeError, "lr as a float"),
])
def test_refuses_bad_hyperparameters(kwargs, error, message):
    model = tiny_model()
    with pytest.raises(error, match=message):
        HybridAdamW(model, HybridEWC(model), **kwargs)


def test_refuses_what_is_not_a_hybrid_ewc_and_groups_it_does_not_implement():
    model = tiny_model()
    with pytest.raises(TypeError, match="ewc must be a hbat.HybridEWC"):
        HybridAdamW(model, object())
    with pytest.raises(ValueError, match="does not implement amsgrad=True"):
        HybridAdamW([{"params": model.parameters(), "amsgrad": True}], HybridEWC(model))


def test_load_state_dict_refuses_a_bad_state_and_changes_nothing():
    model = tiny_model()
    opt = HybridAdamW(model, HybridEWC(model), lr=1e-2)
    loss_of(model, 0).backward()
    opt.step()
    good = opt.state_dict()
    for change, message in [
        (lambda s: s["state"][1].__setitem__("exp_avg", torch.zeros(3)), r"parameter 1: exp_avg must be a tensor "
                                                                         r"of the parameter's shape \(7,\)"),
        (lambda s: s["state"][0].__setitem__("step", torch.tensor(-1.0)), r"parameter 0: step must be a whole"),
        (lambda s: s["param_groups"][0].__setitem__("maximize", True), r"maximize=True"),
    ]:
        bad = copy.deepcopy(good)
        change(bad)
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(bad)
        assert opt.state_dict()["state"][1]["exp_avg"].shape == (7,)


def test_parameters_outside_the_ewc_get_plain_adamw():
    model = tiny_model()
    ewc = HybridEWC(model, exclude=["0.*"])  # the first Linear is not penalised
    opt = HybridAdamW(model, ewc, lr=1e-2, weight_decay=0.0)
    plain_first = copy.deepcopy(model[0])
    plain = torch.optim.AdamW(plain_first.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    for k, objective in enumerate(STAGES[:3]):
        ewc.begin_stage(objective)
        for j in range(2):
            loss_of(model, 2 * k + j).backward()
            for p, q in zip(plain_first.parameters(), model[0].parameters()):
                p.grad = q.grad.clone()
            opt.step(), plain.step()
            opt.zero_grad(), plain.zero_grad()
    assert ewc.active
    for p, q in zip(model[0].parameters(), plain_first.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- transformers.Trainer
def test_transformers_trainer_with_hybrid_adamw(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from hf_fixtures import char_tokenizer
    from hf_trainer_cases import PenaltyInLossTrainer, lm_dataset, model_after_ifa, params, training_args
    from transformers import Trainer

    tokenizer = char_tokenizer()
    data = lm_dataset(tokenizer)
    args = dict(max_grad_norm=0.0, learning_rate=3e-3, weight_decay=0.0)  # no clipping: the two must agree

    model, ewc = model_after_ifa(tokenizer)
    ewc.begin_stage("hpa")
    optimizer = HybridAdamW(model, ewc, lr=3e-3, weight_decay=0.0)
    trainer = Trainer(model=model, args=training_args(tmp_path / "hybrid", **args), train_dataset=data,
                      optimizers=(optimizer, None))
    trainer.train()
    assert float(optimizer.last_penalty) > 0 and ewc.apply_count == 0
    assert {float(s["step"]) for s in optimizer.state.values()} == {4.0}

    ref_model, ref_ewc = model_after_ifa(tokenizer)
    ref_ewc.begin_stage("hpa")
    PenaltyInLossTrainer(model=ref_model, args=training_args(tmp_path / "ref", **args), train_dataset=data,
                         ewc=ref_ewc).train()
    got, want = params(model), params(ref_model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_callback_with_hybrid_adamw_keeps_stages_logs_and_checkpoints_but_adds_no_penalty(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from hf_fixtures import char_tokenizer
    from hf_trainer_cases import lm_dataset, model_after_ifa, params, training_args
    from transformers import Trainer

    from hbat.integrations.transformers import STATE_FILE, HybridEWCCallback

    tokenizer = char_tokenizer()
    data = lm_dataset(tokenizer)
    args = dict(max_grad_norm=0.0, learning_rate=3e-3, weight_decay=0.0, logging_steps=1, save_strategy="steps",
                save_steps=2)

    def run(folder, callback: bool):
        model, ewc = model_after_ifa(tokenizer)
        if not callback:
            ewc.begin_stage("hpa")
        optimizer = HybridAdamW(model, ewc, lr=3e-3, weight_decay=0.0)
        trainer = Trainer(model=model, args=training_args(tmp_path / folder, **args), train_dataset=data,
                          optimizers=(optimizer, None),
                          callbacks=[HybridEWCCallback(ewc, objective="hpa")] if callback else [])
        trainer.train()
        return model, ewc, trainer

    model, ewc, trainer = run("callback", callback=True)
    assert ewc.objective == "hpa" and ewc.apply_count == 0  # the callback began the stage and applied nothing
    logged = [log["ewc/penalty"] for log in trainer.state.log_history if "ewc/penalty" in log]
    assert len(logged) == 4 and logged[0] == 0 and all(p > 0 for p in logged[1:])  # step 1 starts at the anchor
    assert (tmp_path / "callback" / "checkpoint-2" / STATE_FILE).is_file()

    by_hand, _, _ = run("by_hand", callback=False)
    got, want = params(model), params(by_hand)
    for name in want:  # a penalty gradient counted twice would move the weights differently
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)

    other = HybridAdamW(model, model_after_ifa(tokenizer)[1], lr=1e-3)  # another HybridEWC than the callback's
    with pytest.raises(ValueError, match="another HybridEWC"):
        Trainer(model=model, args=training_args(tmp_path / "other", **args), train_dataset=data,
                optimizers=(other, None), callbacks=[HybridEWCCallback(ewc, objective="ifa")]).train()


# ----------------------------------------------------------------------------------------- kept between steps
def _twin_run(backend, actions, stages=STAGES[:3], steps=3, **kwargs):
    """torch AdamW + apply_() and HybridAdamW through the same stages and batches; ``actions(k, ref, mine)`` runs
    before step k on both setups (each a (model, ewc, step, optimizer)). Asserts the params agree after every step."""
    ref, mine = two_setups(backend, "cpu", **kwargs)
    k = 0
    for objective in stages:
        ref[1].begin_stage(objective), mine[1].begin_stage(objective)
        for _ in range(steps):
            actions(k, ref, mine)
            ref[2](k), mine[2](k)
            for (name, p), q in zip(mine[0].named_parameters(), ref[0].parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {k}, {name}: {m}")
            k += 1
    return ref, mine


SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def test_lists_are_built_once_per_stage_and_a_step_reads_nothing_back(monkeypatch):
    builds = []
    build = HybridAdamW._build_calls
    monkeypatch.setattr(HybridAdamW, "_build_calls", lambda self, grads: builds.append(1) or build(self, grads))

    def refuse(name):
        def sync(*args, **kwargs):
            raise AssertionError(f"Tensor.{name}() in a HybridAdamW step")
        return sync

    def step_without_syncs(step):
        def run(*args, **kwargs):
            with monkeypatch.context() as patch:
                for name in SYNCS:
                    patch.setattr(torch.Tensor, name, refuse(name))
                return step(*args, **kwargs)
        return run

    def actions(k, ref, mine):
        for opt in (ref[3], mine[3]):  # a scheduler's lr is read at the next step, without a rebuild
            opt.param_groups[0]["lr"] = 1e-2 / (1 + k)
        opt = mine[3]
        if k % 3 == 1:  # the lists are built at a stage's first step; the steps after it read nothing back
            opt.step = step_without_syncs(type(opt).step.__get__(opt))
        elif k % 3 == 0:
            opt.__dict__.pop("step", None)

    _twin_run("cpu" if _cpu_ok() else "reference", actions, stages=STAGES, steps=3)
    assert len(builds) == len(STAGES)  # one per stage: begin_stage changed the anchors and the importance


def test_add_param_group_between_steps_is_stepped_like_torch_adamw():
    def add_group(k, ref, mine):
        if k == 4:
            for model, _, _, opt in (ref, mine):
                opt.add_param_group({"params": model[2].parameters(), "lr": 3e-2, "weight_decay": 0.1})

    def groups(model):
        return [{"params": [p for m in (model[0], model[3]) for p in m.parameters()]}]

    ref, mine = _twin_run("cpu" if _cpu_ok() else "reference", add_group, groups=groups)
    assert len(mine[3].param_groups) == 2 and all(p in mine[3].state for p in mine[0][2].parameters())


def test_load_state_dict_between_steps_replaces_the_kept_step_counts():
    # a stale cache would keep stepping the replaced step counts: the bias correction would drift
    def reload(k, ref, mine):
        if k in (2, 5):
            mine[3].load_state_dict(_round_trip(mine[3].state_dict()))

    _, mine = _twin_run("cpu" if _cpu_ok() else "reference", reload)
    assert {float(s["step"]) for s in mine[3].state.values()} == {9.0}


def test_parameters_without_a_gradient_are_skipped_like_torch_adamw():
    def drop_grad(k, ref, mine):  # the first Linear's bias has no gradient in steps 3 and 4
        if k in (3, 4):
            for model, _, _, _ in (ref, mine):
                model[0].bias.requires_grad_(False)
        else:
            for model, _, _, _ in (ref, mine):
                model[0].bias.requires_grad_(True)

    _, mine = _twin_run("cpu" if _cpu_ok() else "reference", drop_grad)
    assert float(mine[3].state[mine[0][0].bias]["step"]) == 7 and float(mine[3].state[mine[0][0].weight]["step"]) == 9


def test_changed_betas_and_eps_are_used_at_the_next_step():
    def momentum(k, ref, mine):
        for _, _, _, opt in (ref, mine):
            opt.param_groups[0]["betas"] = (0.9 - 0.05 * (k % 3), 0.999)
            opt.param_groups[0]["eps"] = 1e-8 * (1 + k)

    _twin_run("cpu" if _cpu_ok() else "reference", momentum)


# ----------------------------------------------------------------------------------------- as strict as torch
BAD_GROUP_SETTINGS = {
    "lr=-1": ("lr", -1.0, ValueError, "Invalid learning rate: -1.0"),
    "lr=nan": ("lr", float("nan"), ValueError, "Invalid learning rate: nan"),
    "lr=tensor": ("lr", torch.tensor(0.1), TypeError, "lr as a float"),
    "lr=str": ("lr", "0.1", TypeError, "lr must be a real number"),
    "betas=(1.5,0.9)": ("betas", (1.5, 0.9), ValueError, "Invalid beta parameter at index 0: 1.5"),
    "betas=(0.9,1)": ("betas", (0.9, 1.0), ValueError, "Invalid beta parameter at index 1"),
    "betas=(0.9,)": ("betas", (0.9,), TypeError, "betas must be a pair"),
    "eps=-1": ("eps", -1.0, ValueError, "Invalid epsilon value: -1.0"),
    "weight_decay=inf": ("weight_decay", float("inf"), ValueError, "Invalid weight_decay value: inf"),
    "amsgrad": ("amsgrad", True, ValueError, "does not implement amsgrad=True"),
}


@pytest.mark.parametrize("key,value,error,message", BAD_GROUP_SETTINGS.values(), ids=BAD_GROUP_SETTINGS.keys())
def test_load_state_dict_refuses_a_bad_group_setting_before_changing_anything(key, value, error, message):
    model = tiny_model()
    opt = HybridAdamW(model, HybridEWC(model), lr=1e-2)
    loss_of(model, 0).backward()
    opt.step()
    saved = _round_trip(opt.state_dict())
    loss_of(model, 1).backward()
    opt.step()  # the optimizer's state moves on: the refused load must leave this one in place
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(saved)
    bad["param_groups"][0][key] = value
    with pytest.raises(error, match=rf"param_groups\[0\]: .*{message}"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][index][name], value), (index, name)
    params = [p.detach().clone() for p in model.parameters()]
    loss_of(model, 2).backward()
    opt.step()  # and it still steps, with its own settings
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), params))


@pytest.mark.parametrize("key,value,error,message", BAD_GROUP_SETTINGS.values(), ids=BAD_GROUP_SETTINGS.keys())
def test_add_param_group_with_a_bad_setting_keeps_nothing(key, value, error, message):
    model = tiny_model()
    opt = HybridAdamW(model[0].parameters(), HybridEWC(model), lr=1e-2)
    with pytest.raises(error, match=message):
        opt.add_param_group({"params": model[2].parameters(), key: value})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": model[2].parameters(), "lr": 3e-2})  # a retry with good settings works
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 3e-2
    loss_of(model, 0).backward()
    opt.step()
    assert all(p in opt.state for p in model[2].parameters())


def conv_model(seed=0):
    """A channels_last convolution and a transposed nn.Parameter: parameters torch's AdamW steps as they are."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    model = model.to(memory_format=torch.channels_last)
    model[2].weight = torch.nn.Parameter(torch.randn(144, 2).t() * 0.1)
    assert not model[0].weight.is_contiguous() and not model[2].weight.is_contiguous()
    return model


@pytest.mark.parametrize("backend,device", backend_cases(("reference", "cpu")))
def test_channels_last_and_transposed_parameters_are_stepped_like_torch_adamw(backend, device):
    ref_model, model = conv_model(), conv_model()
    ref_ewc, ewc = HybridEWC(ref_model, backend=backend), HybridEWC(model, backend=backend)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    opt = HybridAdamW(model, ewc, lr=1e-2, weight_decay=0.05)
    for k, objective in enumerate(STAGES[:3]):
        ref_ewc.begin_stage(objective), ewc.begin_stage(objective)
        for j in range(3):
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10 * k + j))
            x = x.to(memory_format=torch.channels_last)
            for m in (ref_model, model):
                m(x).square().mean().backward()
            ref_ewc.apply_()
            ref_opt.step(), opt.step()
            ref_opt.zero_grad(), opt.zero_grad()
            for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {k}.{j} {name}: {m}")
    assert ewc.active and float(opt.last_penalty) > 0
    assert opt.state[model[0].weight]["exp_avg"].stride() == model[0].weight.stride()
