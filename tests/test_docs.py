"""The README and docs/ as a reader uses them: every relative link and image resolves (files
and #anchors), and the run-config table lists exactly pyproject's keys with their defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    slugs = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


def links(path: Path) -> list[str]:
    """Relative link targets outside code blocks."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return [t for t in LINK.findall(text) if not t.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target} (no file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading)")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_docs_index_lists_every_page():
    readme = (ROOT / "README.md").read_text()
    assert all(f"(docs/{page.name})" in readme for page in PAGES[1:])


def test_config_table_matches_pyproject_keys_and_defaults():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| `([^`]*)` \|", (ROOT / "docs" / "configuration.md").read_text(), re.M)
    table = {key: tomllib.loads(f"v = {default}")["v"] for key, default in rows}
    assert list(table) == list(config)  # every key, once, in pyproject's order
    assert table == config
