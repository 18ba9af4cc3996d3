"""Every Python example in README.md and docs/ runs, so the docs cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def examples():
    for page in PAGES:
        for i, block in enumerate(FENCE.findall(page.read_text())):
            yield pytest.param(block, id=f"{page.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", list(examples()))
def test_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save files write here
    exec(compile(code, "<example>", "exec"), {"__name__": "__docs__"})
    keras.utils.clear_session()


def test_every_architecture_has_a_page_with_an_example():
    import vitkit

    for name in vitkit.list_models():
        page = ROOT / "docs" / "models" / f"{name}.md"
        assert page.exists(), f"no docs page for {name}"
        text = page.read_text()
        assert FENCE.search(text), f"{page.name} has no runnable example"
        assert "arxiv.org" in text or "http" in text, f"{page.name} does not link its paper"


def test_readme_table_lists_every_architecture():
    import vitkit

    readme = (ROOT / "README.md").read_text()
    rows = {
        line.split("|")[1].strip(): line for line in readme.splitlines() if line.startswith("| `")
    }
    for name in vitkit.list_models():
        assert f"`{name}`" in rows, f"README's model table lacks {name}"
        gaps = rows[f"`{name}`"].rstrip(" |").rsplit("|", 1)[-1].strip()
        expected = ", ".join(sorted(vitkit.get_spec(name).export_gaps)) or "none"
        assert gaps == expected, f"README's export-gaps cell for {name}: {gaps!r}, not {expected!r}"


def test_mkdocs_nav_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").rglob("*.md")):
        rel = page.relative_to(ROOT / "docs").as_posix()
        assert rel in nav, f"mkdocs.yml's nav lacks {rel}"
