"""The documentation keeps each measured figure in one file, and its links lead somewhere."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIGURE = re.compile(r"(?<![\w.])\d+\.\d{2,}(?![\w.])")  # a decimal with two or more digits after the point
VERSIONS = {"3.10", "3.11", "3.12", "3.13"}  # Python versions, not figures
LINK = re.compile(r"\]\(([^)#\s]+\.md)?(?:#([^)\s]+))?\)")


def _prose(page: Path, inline_code: bool = False) -> str:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # commands and their output may repeat
    return text if inline_code else re.sub(r"`[^`\n]+`", "", text)  # so may settings in inline code


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", _prose(page, inline_code=True), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


def _text_lines(text: str) -> str:
    """The page's sentences: its lines outside tables."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("|"))


def test_each_figure_lives_in_one_file() -> None:
    """A figure is quoted in the text of one page only, and README quotes none that a page under docs/
    measures. Two results tables may share a value by chance (hundreds of three-decimal AUROCs)."""
    in_text: dict[str, set[str]] = defaultdict(set)
    anywhere: dict[str, set[str]] = defaultdict(set)
    for page in PAGES:
        prose, name = _prose(page), page.relative_to(ROOT).as_posix()
        for figure in set(FIGURE.findall(prose)) - VERSIONS:
            anywhere[figure].add(name)
        for figure in set(FIGURE.findall(_text_lines(prose))) - VERSIONS:
            in_text[figure].add(name)
    repeated = {
        figure: sorted(anywhere[figure])
        for figure, pages in in_text.items()
        if len(pages) > 1 or ("README.md" in pages and len(anywhere[figure]) > 1)
    }
    assert not repeated, f"figures in more than one file (keep each where it is measured, link to it): {repeated}"


def test_links_between_pages_lead_to_a_page_and_heading() -> None:
    broken = []
    for page in PAGES:
        for target, anchor in LINK.findall(_prose(page)):
            if target.startswith("http"):
                continue
            linked = (page.parent / target).resolve() if target else page
            if not linked.is_file():
                broken.append(f"{page.name} -> {target}")
            elif anchor and anchor not in _anchors(linked):
                broken.append(f"{page.name} -> {target}#{anchor}")
    assert not broken, f"links to no page or heading: {broken}"
