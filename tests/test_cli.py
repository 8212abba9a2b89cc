"""The `hbat` command line dispatches to its subcommands; DeepSpeed is imported only by a run that uses it."""
import os
import subprocess
import sys

import pytest

from hbat.cli import main


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "auto on cpu" in out


def test_unknown_subcommand_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fly"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_average_refuses_a_missing_model(tmp_path, capsys):
    code = main(["average", "--pre", str(tmp_path / "nope"), "--post", str(tmp_path / "nope2"), "--alpha", "0.5",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"hbat average: {tmp_path / 'nope'} is not a folder (expected a save_pretrained model folder)" in err
    assert not (tmp_path / "out").exists()


# --- DeepSpeed is imported only by a run that uses it -------------------------------------------------------------

DEEPSPEED_LINE = "Setting accelerator to CPU"  # what DeepSpeed's import prints on a machine without a GPU
NOT_IMPORTED = "; import sys; assert 'deepspeed' not in sys.modules, 'deepspeed was imported'"


def run_python(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert DEEPSPEED_LINE not in proc.stdout + proc.stderr, args
    return proc


@pytest.mark.parametrize("command", [["info"], ["train", "--help"], ["compare", "--help"], ["average", "--help"],
                                     ["ops-demo", "--help"]])
def test_commands_print_no_deepspeed_line(tmp_path, command):
    pytest.importorskip("deepspeed")  # installed: its import would print the line
    script = f"import contextlib\nfrom hbat.cli import main\nwith contextlib.suppress(SystemExit):\n    main({command!r})\n"
    proc = run_python("-c", script + NOT_IMPORTED.lstrip("; "), cwd=tmp_path)
    assert proc.stdout.strip()  # the command ran (its report or help)


def test_importing_hbat_and_a_run_without_deepspeed_import_no_deepspeed(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("peft")
    run_python("-c", "import hbat, hbat.trainer, hbat.cli, hbat.averaging, hbat.integrations.transformers; "
                     "from hbat.trainer import algorithm, compare, run, workspace" + NOT_IMPORTED, cwd=tmp_path)
    # a whole run that saves its model (save_pretrained: accelerate imports DeepSpeed to unwrap a model), with LoRA
    from hf_fixtures import TINY

    overrides = TINY + ["data.task_n_sft=32", "data.task_n_pref=16", "data.task_n_val=4", "reward.max_steps=1",
                        "method=sft_only", "save_model=true", "model.lora_r=4", f"output_dir={tmp_path / 'out'}"]
    argv = ["--no-progress"] + [a for o in overrides for a in ("--set", o)]
    run_python("-c", f"from hbat.trainer.run import main; assert main({argv!r}) == 0" + NOT_IMPORTED, cwd=tmp_path)
    assert (tmp_path / "out" / "sft_only" / "model" / "adapter_config.json").is_file()


def test_the_default_comparison_writes_under_runs():
    """`hbat compare` (`make compare`) without --out writes under runs/, not into the committed results."""
    from hbat.trainer.compare import load_spec
    from hbat.trainer.config import load_config

    output_dir = load_config(None, load_spec(None)["set"]).output_dir
    assert output_dir.startswith("runs/") and "docs" not in output_dir
