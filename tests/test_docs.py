"""The documentation: README.md (the front page) and docs/*.md.

Every relative link resolves (to a file, and to a heading where it has an ``#anchor``), the front page stays
short, and every generated block lives on exactly one page (the scripts that regenerate a block write to
that page).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 12 * 1024
GENERATED_BLOCKS = ("quality", "large", "distributed", "methods", "keywords", "recovery", "families", "compensation")

FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title"; text may hold `code` (with brackets inside).
LINK = re.compile(r"!?\[(?:[^\[\]]|`[^`]*`)*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """``text`` without fenced code blocks (links and headings inside them are not links or headings)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lowercased, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of ``page``, with GitHub's ``-1``, ``-2`` ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(_prose(page.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    """The targets of every Markdown link on ``page`` that is not a URL (http, https, mailto, ...)."""
    # Inline code is no link (`[a](b)` in backticks is literal); a link text in backticks leaves "[](target)".
    text = INLINE_CODE.sub("", _prose(page.read_text(encoding="utf-8")))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


def test_slug_follows_github():
    assert slug("Self-calibration: `--method selfcal`") == "self-calibration---method-selfcal"
    assert slug("The paper's algorithm") == "the-papers-algorithm"
    assert slug("Large models: streaming compression") == "large-models-streaming-compression"
    assert slug("`make cuda-check`") == "make-cuda-check"
    assert slug("snake_case and [a link](x.md)") == "snake_case-and-a-link"


def test_link_pattern_finds_what_it_should():
    page = '[a](x.md) ![plot](p.png) [`code` b](y.md#z "title") [web](https://e.org) `[lit](no.md)`\n'
    page += "```\n[no](in-code.md)\n```\n"
    assert [m.group(1) for m in LINK.finditer(INLINE_CODE.sub("", _prose(page)))] == [
        "x.md", "p.png", "y.md#z", "https://e.org"
    ]  # fmt: skip


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not Markdown")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_docs_pages_exist_and_are_linked_from_the_front_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    pages = PAGES[1:]
    assert pages, "docs/*.md is empty"
    assert not [p.name for p in pages if p.resolve() not in linked], "docs pages the README does not link to"


def test_readme_is_a_short_front_page():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (at most {README_MAX_BYTES}): move detail to docs/"


@pytest.mark.parametrize("name", GENERATED_BLOCKS)
def test_each_generated_block_is_on_exactly_one_page(name):
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    holders = {p: p.read_text(encoding="utf-8") for p in PAGES}
    begins = {p: t.splitlines().count(begin) for p, t in holders.items() if begin in t}
    ends = {p: t.splitlines().count(end) for p, t in holders.items() if end in t}
    where = ", ".join(str(p.relative_to(ROOT)) for p in begins) or "nowhere"
    assert sum(begins.values()) == 1 and sum(ends.values()) == 1, (
        f"'{begin}' / '{end}' must each appear once, on a line of its own, in README.md + docs/*.md; found in {where}"
    )
    (page,) = begins
    assert page in ends, f"{name}: begin in {page.relative_to(ROOT)}, end elsewhere"
    text = holders[page]
    assert text.index(begin) < text.index(end), f"{name}: end before begin in {page.relative_to(ROOT)}"


def test_generated_blocks_match_the_code():
    """docs/methods.md's method table is the selector registry's (regenerate: python tools/gen_docs.py)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_makefile_installs_the_gguf_extras_requirement():
    """``make test`` installs the ``[gguf]`` extra by its requirement (not the editable package again, which
    would rebuild the native extension): the two must name the same one."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gguf"]
    makefile = re.search(r"^LLAMA_CPP := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert makefile is not None and extra == [makefile.group(1).strip()]
