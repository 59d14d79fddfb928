"""The README and docs/ stay honest: the README stays short enough to read top to bottom, and every relative link,
heading anchor and repository path they name exists. Docs drift when code moves; these checks make a move that
leaves a dead reference fail here instead of in a reader's browser."""

from __future__ import annotations

import glob
import os
import pathlib
import re
import unicodedata

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 250
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Top-level folders whose paths, written in backticks, must exist (`disagg/kv/framing.py`, `benchmarks/results/`).
TOP_LEVEL = ("protos", "gateway", "prefill_worker", "decode_worker", "disagg", "benchmarks", "deploy", "docs", "tests")
REPO_PATH = re.compile(rf"^(?:{'|'.join(TOP_LEVEL)})/[\w./*-]*$")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks (a `# comment` in a shell block is no heading, `[x](y)` there no
    link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    """Every heading anchor of a markdown page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(page.read_text()):
        if (match := HEADING.match(line)) is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: pathlib.Path) -> list[str]:
    """The relative link targets of a page (external links and mail addresses left out)."""
    targets = []
    for line in prose_lines(page.read_text()):
        without_code = CODE_SPAN.sub("", line)
        for target in LINK.findall(without_code):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                targets.append(target)
    return targets


def broken_links(page: pathlib.Path) -> list[str]:
    """Each relative link of `page` whose file, or whose #anchor in a markdown file, does not exist."""
    broken = []
    for target in links(page):
        path_part, _, fragment = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{fragment} in {os.path.relpath(resolved, page.parent)}")
    return broken


def missing_paths(page: pathlib.Path) -> list[str]:
    """Each repository path written in backticks (`disagg/kv/framing.py`) that matches no file or folder."""
    missing = []
    for line in prose_lines(page.read_text()):
        for _, code in CODE_SPAN.findall(line):
            code = code.strip()
            if REPO_PATH.match(code) and not glob.glob(str(ROOT / code)):
                missing.append(code)
    return missing


def _name(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_reads_top_to_bottom() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; design and reference go to docs/"


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in links(README)}
    unlinked = [_name(page) for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page: pathlib.Path) -> None:
    assert not broken_links(page)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_named_repository_paths_exist(page: pathlib.Path) -> None:
    assert not missing_paths(page)


def test_the_checks_catch_what_they_are_for(tmp_path: pathlib.Path) -> None:
    """A dead file link, a dead anchor and a dead path are reported; code blocks and external links are not."""
    (tmp_path / "other.md").write_text("# Real heading\n\n## The `KV` handoff (layout)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#real-heading) [ok](other.md#the-kv-handoff-layout) [ok](#top)\n"
        "# Top\n"
        "[gone](missing.md) [gone](other.md#no-such-heading) [web](https://example.com/x.md)\n"
        "`disagg/kv/framing.py` `disagg/no_such_module.py` `wire.chunk_message`\n"
        "```\n[in code](nowhere.md) `disagg/also_missing.py`\n# not a heading\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#no-such-heading: no heading with anchor #no-such-heading in other.md",
    ]
    assert missing_paths(page) == ["disagg/no_such_module.py"]
    assert anchors(page) == {"top"}
