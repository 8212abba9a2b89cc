"""The trainer's layout as CONTRIBUTING.md states it: modules a newcomer reads in one sitting, and the dependency
graph in plain sight (imports of hbat modules at the top of each module, never inside a function)."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINER = sorted((ROOT / "hbat" / "trainer").rglob("*.py"))
MAX_LINES = 300


@pytest.mark.parametrize("path", TRAINER, ids=lambda p: str(p.relative_to(ROOT)))
def test_trainer_module_is_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}: split it by job)"


def _nested_hbat_imports(tree: ast.Module) -> list[int]:
    """Line numbers of imports of hbat modules (relative or absolute) below the module's top level."""
    top = set(map(id, tree.body))
    lines = []
    for node in ast.walk(tree):
        if id(node) in top:
            continue
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] == "hbat"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "hbat" for a in node.names):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", TRAINER + [ROOT / "hbat" / "cli.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_hbat_imports_sit_at_the_top(path):
    nested = _nested_hbat_imports(ast.parse(path.read_text()))
    assert not nested, f"{path.relative_to(ROOT)}: hbat imported inside a function or block at lines {nested}"


def test_the_check_sees_a_nested_import():
    tree = ast.parse("import os\n\ndef f():\n    from .config import load_config\n    import hbat.ops\n")
    assert _nested_hbat_imports(tree) == [4, 5]
    assert _nested_hbat_imports(ast.parse("from . import config\nimport torch\n")) == []


# hbat.averaging's CLI reads models through the trainer, whose meter and EMA anchor use hbat.averaging's parts:
# each of these must import first, in a fresh process (a cycle through a package __init__ fails only there)
FIRST_IMPORTS = ["hbat", "hbat.averaging", "hbat.trainer", "hbat.cli", "hbat.integrations.averaging",
                 "hbat.trainer.forgetting", "hbat.trainer.ema", "hbat.trainer.compare"]


@pytest.mark.parametrize("module", FIRST_IMPORTS)
def test_module_imports_first_in_a_fresh_process(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
