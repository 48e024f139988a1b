"""The user docs: a short README, the reference pages in docs/, links that resolve, and a flag table that matches the settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from safethink_server.settings_table import flag_table

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ["api", "configuration", "proxy", "operations", "scorers", "architecture", "benchmarks", "evaluation", "vllm",
         "guarantee"]
FLAGS_START, FLAGS_END = "<!-- flags:start -->", "<!-- flags:end -->"


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text less fenced code blocks and inline code, where brackets are not links or headings."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub gives a page: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_flag_table_in_the_configuration_page_is_generated_from_the_settings():
    text = (DOCS / "configuration.md").read_text()
    assert text.count(FLAGS_START) == 1 and text.count(FLAGS_END) == 1
    between = text.split(FLAGS_START, 1)[1].split(FLAGS_END, 1)[0]
    assert between.strip("\n") == flag_table(), "regenerate it: python -m safethink_server.settings_table"


def test_the_flag_table_has_one_row_per_setting():
    from safethink_server.config import ServerSettings

    rows = flag_table().splitlines()[2:]
    assert len(rows) == len(ServerSettings.model_fields) + 1  # and --config
    assert any(row.startswith("| `--scorer-warm`, `--no-scorer-warm` |") for row in rows)
    assert any(row.startswith("| `--step-delimiters` |") and "| `\\n\\n` |" in row for row in rows)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES)
def test_reference_page_exists_and_says_what_it_covers(page: str):
    lines = (DOCS / f"{page}.md").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2].strip()


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.name}: {target}"
