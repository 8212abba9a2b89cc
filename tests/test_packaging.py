"""The repository as a user's working directory: nothing in its root hides an installed package, and the
environment is the locked one.

`python -m pytest`, `python -c ...`, a notebook or a torchrun worker started in the root put the root first on
`sys.path`; a top-level folder with an `__init__.py` named like an installed distribution (`kernels/` against
Hugging Face's `kernels`, which transformers imports) would then be imported instead of it.
"""
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def _top_level_folders():
    return sorted(p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
                  and p.name not in ("build", "dist", "runs", "out") and not p.name.endswith(".egg-info"))


def _installed_import_names():
    """Every top-level import name an installed distribution provides, and every distribution's own name."""
    names = set(importlib.metadata.packages_distributions())
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            names.add(re.sub(r"[-.]+", "_", name).lower())
    return names


def _resolve_in_root(name):
    """Where `import name` lands in a fresh interpreter whose sys.path starts with the repository root."""
    code = ("import importlib.util, sys; s = importlib.util.find_spec(sys.argv[1]); "
            "print(s.origin if s and s.origin else (list(s.submodule_search_locations) if s else ''))")
    out = subprocess.run([sys.executable, "-c", code, name], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_no_top_level_folder_is_a_regular_package_except_hbat():
    # a regular package at the root wins over any installed one of that name, now or after a future install
    offenders = [p.name for p in _top_level_folders() if (p / "__init__.py").exists() and p.name != "hbat"]
    assert offenders == [], f"top-level folders with __init__.py (they shadow installed packages): {offenders}"


def test_no_top_level_folder_hides_an_installed_distribution():
    installed = _installed_import_names()
    clashes = [p.name for p in _top_level_folders() if p.name in installed and p.name != "hbat"]
    for name in clashes:
        where = _resolve_in_root(name)
        assert str(ROOT) not in where or str(ROOT / ".venv") in where, (
            f"`import {name}` in the repository root finds the repository's {name}/ ({where}), "
            "not the installed distribution")


def test_the_check_above_can_fail(tmp_path):
    # the mechanism the two tests guard against, caused on purpose: a folder with __init__.py beats site-packages
    (tmp_path / "pytest").mkdir()
    (tmp_path / "pytest" / "__init__.py").write_text("PLANTED = True\n")
    out = subprocess.run([sys.executable, "-c", "import pytest; print(getattr(pytest, 'PLANTED', False))"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True"


def test_hbat_kernels_is_the_repository_kernels_folder():
    spec = importlib.util.find_spec("hbat.kernels.plan")
    assert spec is not None and Path(spec.origin).name == "plan.py"
    assert (Path(spec.origin).parent / "op_math.py").exists()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_imports_from_the_repository_root():
    code = "from transformers import Trainer, LlamaForCausalLM; import hbat.kernels.plan; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def _lock_pins():
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def test_the_lock_pins_every_installed_dependency_of_hbat():
    # what `make setup` installs is exactly the lock: every requirement of hbat[test], recursively, is pinned
    assert LOCK.exists(), "requirements/lock.txt is missing (make lock)"
    pins = _lock_pins()
    for name in ("torch", "transformers", "trl", "accelerate", "deepspeed", "peft", "datasets", "triton",
                 "numpy", "pytest", "kernels", "huggingface-hub", "setuptools"):
        assert name in pins, f"requirements/lock.txt does not pin {name}"
    assert pins["torch"].startswith("2.13.0")


@pytest.mark.skipif(os.environ.get("HBAT_UNLOCKED") == "1", reason="make test-latest / test-oldest: not the lock")
def test_the_environment_is_the_lock():
    # `make setup` installed exactly what CI tested: every locked distribution at its locked version
    # (the distribution an import finds first: setuptools appends its own vendored copies of packaging and wheel
    # to sys.path once imported, and those are not what the environment holds)
    wrong = []
    for name, pinned in _lock_pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            wrong.append(f"{name} {installed} (lock: {pinned})")
    assert not wrong, "installed versions differ from requirements/lock.txt (run make setup): " + ", ".join(wrong)
