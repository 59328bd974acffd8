"""The documentation stays navigable: every link resolves inside the repository, anchors name
real headings, the README stays short, and the API tables the README shares with docs/api.md
are the same text.

A link that leaves the repository (`../shared/...`, `https://...`) breaks for everyone reading a
clone or a release archive, so none is allowed; name outside things in plain text instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 220
SHARED_BLOCKS = ("api-params", "api-headers", "api-status")

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
_HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=\"([^\"]+)\"", re.I)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text with fenced blocks and code spans removed: links inside code are examples."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    prose = _prose(text)
    return [*_INLINE_LINK.findall(prose), *_REFERENCE_LINK.findall(prose), *_HTML_LINK.findall(prose)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            problems.append(f"{target}: points outside the repository")
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_relative_to(root):
            problems.append(f"{target}: leaves the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with the anchor #{anchor}")
    return problems


def block(text: str, name: str) -> str | None:
    found = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    return found.group(1) if found else None


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_no_page_names_a_path_in_the_sibling_shared_workspace(page):
    # The shared harness and corpus live beside the repository on the build machine only; a
    # `../shared/...` path in the docs means nothing to anyone else.
    assert "../shared" not in page.read_text()


def test_the_checker_catches_escaping_missing_external_and_anchorless_links(tmp_path):
    # A page in a throwaway repository, so the checker is seen failing on each kind of link.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "api.md").write_text("# API\n\n## Responses\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n[a](../../outside.md) [b](missing.md) [c](https://example.com/) "
        "[d](api.md#no-such-heading) [ok](api.md#responses) [self](#page)\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "../../outside.md: leaves the repository",
        "missing.md: no such file",
        "https://example.com/: points outside the repository",
        "api.md#no-such-heading: no heading with the anchor #no-such-heading",
    ]


def test_links_inside_code_are_not_links():
    assert links("`[x](../y.md)`\n```\n[z](../w.md)\n```\n[real](README.md)") == ["README.md"]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Cache and deduplication", "cache-and-deduplication"),
        ("`make chaos` results", "make-chaos-results"),
        ("Quality: the AVIF quality map", "quality-the-avif-quality-map"),
        ("16-bit and other modes", "16-bit-and-other-modes"),
    ],
)
def test_anchor_slugs_follow_github(heading, anchor):
    assert slug(heading) == anchor


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("name", SHARED_BLOCKS)
def test_readme_api_tables_equal_the_api_reference(name):
    readme = block((ROOT / "README.md").read_text(), name)
    reference = block((ROOT / "docs" / "api.md").read_text(), name)
    assert readme is not None and reference is not None, f"both pages must hold <!-- {name}:begin -->"
    assert readme == reference, f"README.md and docs/api.md disagree in {name}; change both"
