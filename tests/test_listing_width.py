"""Every line the book shows in a code block fits the page: a code block holds
:data:`COLUMN` characters (format_chapters.COLUMN) before it scrolls sideways.

Two kinds of code are shown: the chapters' code cells, and package code shown with
``{literalinclude}``. The listing lines are read as Sphinx reads them
(``sphinx.directives.code.LiteralIncludeReader``, as scripts/make_twins.py does), so a
``:pyobject:`` shows exactly the lines the page shows, whatever else the file holds.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sphinx.directives.code import LiteralIncludeReader

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "format_chapters", ROOT / "scripts" / "format_chapters.py"
)
format_chapters = importlib.util.module_from_spec(_spec)
sys.modules["format_chapters"] = format_chapters
_spec.loader.exec_module(format_chapters)

COLUMN = format_chapters.COLUMN
CHAPTERS = sorted((ROOT / "book" / "chapters").glob("*.md"))
PAGES = CHAPTERS + sorted((ROOT / "book" / "reference").glob("*.md"))
# the filters Sphinx applies to what a literalinclude shows (make_twins.py passes the same)
FILTERS = (
    "pyobject",
    "lines",
    "start-after",
    "end-before",
    "start-at",
    "end-at",
    "dedent",
)
DIRECTIVE = re.compile(
    r"^ {0,3}(?P<fence>`{3,}|~{3,}|:{3,})\{literalinclude\}\s*(?P<arg>\S+)"
)
OPTION = re.compile(r"^:(?P<key>[\w-]+):(?:\s+(?P<value>.*))?$")


def literalincludes(page: Path) -> list[tuple[int, Path, dict[str, object]]]:
    """(line in the page, included file, Sphinx filter options) of each literalinclude."""
    out = []
    lines = page.read_text().split("\n")
    for number, line in enumerate(lines, 1):
        match = DIRECTIVE.match(line)
        if not match:
            continue
        options: dict[str, object] = {}
        if lines[number].strip() == "---":  # options as a YAML block
            end = lines.index("---", number + 1)
            found = yaml.safe_load("\n".join(lines[number + 1 : end])) or {}
            options = {k: str(v) for k, v in found.items() if k in FILTERS}
        for body in lines[number:]:
            option = OPTION.match(body)
            if not option:
                break
            if option["key"] in FILTERS:
                options[option["key"]] = (option["value"] or "").strip()
        if "dedent" in options:
            options["dedent"] = int(options["dedent"]) if options["dedent"] else None
        out.append((number, (page.parent / match["arg"]).resolve(), options))
    return out


def shown_lines(path: Path, options: dict[str, object]) -> list[tuple[int, str]]:
    """(line number in ``path``, text) of each line the literalinclude shows."""
    config = SimpleNamespace(source_encoding="utf-8-sig")
    try:  # contiguous excerpts: Sphinx itself knows where they start
        reader = LiteralIncludeReader(
            str(path), {**options, "lineno-match": True}, config
        )
        text, _ = reader.read()
        return list(enumerate(text.splitlines(), reader.lineno_start))
    except ValueError:  # disjoint :lines: cannot match line numbers; find each in turn
        text, _ = LiteralIncludeReader(str(path), options, config).read()
    source = path.read_text().splitlines()
    out, at = [], 0
    for shown in text.splitlines():
        while at < len(source) and source[at].strip() != shown.strip():
            at += 1
        out.append((at + 1, shown))
        at += 1
    return out


LISTINGS = [
    pytest.param(path, options, id=f"{page.relative_to(ROOT)}:{number}")
    for page in PAGES
    for number, path, options in literalincludes(page)
]


def test_listings_found():
    assert LISTINGS, "no literalinclude found: has the directive's spelling changed?"


@pytest.mark.parametrize(("path", "options"), LISTINGS)
def test_listing_fits_a_code_block(path, options):
    wide = [
        f"{path.relative_to(ROOT)}:{number}: {len(line)} > {COLUMN}"
        for number, line in shown_lines(path, options)
        if len(line) > COLUMN
    ]
    assert not wide, "listing lines wider than a code block:\n" + "\n".join(wide)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_code_cells_fit_a_code_block(chapter):
    # Exercises included: no "## Exercises" section needs leaving out (none has a wide line).
    wide = [
        f"{chapter.relative_to(ROOT)}:{number}: {len(line)} > {COLUMN}"
        for number, line in format_chapters.too_wide(chapter.read_text())
    ]
    assert not wide, "code-cell lines wider than a code block:\n" + "\n".join(wide)
