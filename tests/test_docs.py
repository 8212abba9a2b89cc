"""The README and the docs pages: the README stays a short first page, every relative link of the README, of
CONTRIBUTING.md and of docs/ names a file that exists (and an anchor a heading of that page), every page is in
the site's navigation, and `make docs` (mkdocs build --strict) builds the site without a warning."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# what docs/results/make_results.py copies into docs/results/compare-run/: a link to one of them may precede the
# run that writes it (the blocks of the README and docs/compare.md are filled by the same run)
MADE_BY_MAKE_RESULTS = {"compare.md", "compare.csv", "compare.json", "compare.png", "curves.png"}

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def pages() -> list[Path]:
    return [README, ROOT / "CONTRIBUTING.md"] + sorted(DOCS.rglob("*.md"))


def prose(text: str) -> str:
    """``text`` without its fenced code blocks and inline code spans (links there are not links)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def headings(text: str) -> list[str]:
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            kept.append(m.group(1))
    return kept


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lowercase, punctuation but '-' and '_' dropped, each space a '-'."""
    text = re.sub(r"<[^>]+>", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """mkdocs' (Python-Markdown toc's) anchor: the same, but runs of spaces and '-' become one '-'."""
    text = re.sub(r"<[^>]+>", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path: Path) -> set[str]:
    """The anchors that work on GitHub and in the mkdocs site alike (the first heading of each name)."""
    found = set()
    for heading in headings(path.read_text(encoding="utf-8")):
        if github_slug(heading) == mkdocs_slug(heading):
            found.add(github_slug(heading))
    return found


def test_slugs_follow_github_and_mkdocs():
    assert github_slug("A DPO training step (`benchmarks/bench_step.py`, the paper's Table 7)") == \
        "a-dpo-training-step-benchmarksbench_steppy-the-papers-table-7"
    assert github_slug("Multi-GPU: the callback under DDP, DeepSpeed ZeRO and FSDP2") == \
        "multi-gpu-the-callback-under-ddp-deepspeed-zero-and-fsdp2"
    assert github_slug("a — b") == "a--b" and mkdocs_slug("a — b") == "a-b"  # works on one of the two only


def test_the_readme_is_a_short_first_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300, "README.md is over 300 lines: move the detail into a docs/ page"
    quick_start = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in quick_start and "make test" in quick_start
    for page in ("docs/drop-in.md", "docs/optimizer.md", "docs/trainer.md", "docs/compare.md", "docs/status.md"):
        assert f"]({page}" in text, f"the README does not link {page}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            pending = file.parent == DOCS / "results" / "compare-run" and file.name in MADE_BY_MAKE_RESULTS
            if not pending:
                broken.append(f"{target}: no file {os.path.relpath(file, ROOT)}")
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: {os.path.relpath(file, ROOT)} has no heading with the anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section\n\n[ok](#a-section) [no](#nothing) [gone](missing.md)\n"
                    "`[code](not-a-link.md)`\n```\n[fenced](not-a-link-either.md)\n```\n")
    targets = LINK.findall(prose(page.read_text()))
    assert targets == ["#a-section", "#nothing", "missing.md"]
    assert anchors(page) == {"title", "a-section"}


def test_every_docs_page_is_in_the_site_navigation():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs" and config["strict"] is True

    def walk(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from walk(value)
            else:
                yield value

    in_nav = set(walk(config["nav"]))
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert on_disk == in_nav, f"pages not in mkdocs.yml's nav: {sorted(on_disk - in_nav)}; " \
                              f"in the nav but not on disk: {sorted(in_nav - on_disk)}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (the docs extra)")
def test_mkdocs_builds_the_site_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                          "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "WARNING" not in log, log[-4000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "drop-in" / "index.html").is_file()
