"""The `hbat` command line dispatches to its subcommands."""
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
    assert code != 0
