"""The documentation holds together: README.md stays a front page, every page under docs/ is linked from it
and opens with a one-line purpose, every relative link resolves (to a file, and to a heading where it names
one), and docs/layout.md describes every module of the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 10_000  # bytes: the front page; the guide lives in docs/

# Pages written on other branches that README.md and docs/ already link to. Delete each entry when its page
# lands (the test then checks the link like any other); delete the list when it is empty.
COMING_FROM_ANOTHER_BRANCH = {}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """Link targets outside code blocks that point into the repository (not URLs, not mail)."""
    text = FENCE.sub("", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_pages_found():
    assert len(pages()) > 5, "no docs/*.md found: is this the repository root?"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if rel in COMING_FROM_ANOTHER_BRANCH:
            continue
        if not dest.exists():
            broken.append(f"{target}: no such file {rel}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: {rel} has no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links (fix the target or the link):\n" + "\n".join(broken)


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size < README_LIMIT, (
        f"README.md is {size} bytes, over {README_LIMIT}: move the detail into a page under docs/ and link it"
    )
    text = README.read_text()
    for command in ("make run", "make test", "## The answer"):
        assert command in text, f"README.md lost {command!r}"


def test_every_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    docs = sorted((ROOT / "docs").glob("*.md"))
    missing = [p.relative_to(ROOT).as_posix() for p in docs if p.resolve() not in linked]
    missing += [p for p in sorted(COMING_FROM_ANOTHER_BRANCH) if (ROOT / p).resolve() not in linked]
    assert not missing, f"pages not linked from README.md's documentation table: {missing}"


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_page_opens_with_a_one_line_purpose(page: Path):
    lines = page.read_text().split("\n")
    assert lines[0].startswith("# ") and lines[1] == "", f"{page.name}: start with '# Title' and a blank line"
    assert lines[2].strip() and lines[3] == "", (
        f"{page.name}: the line after the title says in one line what the page is for, then a blank line"
    )


def test_layout_lists_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    listed = set(re.findall(r"^(\S+\.py)\s", layout, re.M))
    package = ROOT / "src" / "ordermerge"
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.stat().st_size}
    assert not modules - listed, (
        f"docs/layout.md lacks a line for {sorted(modules - listed)}: add one line each, saying what the module is for"
    )
    assert not listed - modules, f"docs/layout.md lists modules that do not exist: {sorted(listed - modules)}"
