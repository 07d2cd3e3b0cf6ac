"""Format the code cells of the book's chapters to the width of the page's text column.

    python scripts/format_chapters.py [book/chapters/lora.md ...]   # default: every chapter
    python scripts/format_chapters.py --check                        # list what is too wide

A code cell is shown in a column about :data:`COLUMN` characters wide (measured on the
rendered page at 1,400 px: the monospace font fits 88 characters before a code block
scrolls sideways). This runs ``ruff format`` on each ``{code-cell}`` at that width. Ruff
leaves comments and string literals as they are, so ``--check`` lists the lines still too
wide, to be shortened by hand; tests/test_book.py fails on any.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMN = 88
CELL = re.compile(
    r"^(```\{code-cell\}[^\n]*\n)((?::[^\n]*\n)*)(.*?)(^```[ \t]*$)", re.M | re.S
)


def ruff_format(code: str) -> str | None:
    """``code`` formatted by ruff at :data:`COLUMN`, or None if ruff cannot parse it
    (IPython syntax such as ``%time``)."""
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run(
        [
            str(ruff),
            "format",
            f"--line-length={COLUMN}",
            "--stdin-filename=cell.py",
            "-",
        ],
        input=code,
        capture_output=True,
        text=True,
    )
    return done.stdout if done.returncode == 0 else None


def format_text(text: str) -> str:
    def cell(match: re.Match) -> str:
        head, options, code, fence = match.groups()
        formatted = ruff_format(code)
        return head + options + (formatted if formatted is not None else code) + fence

    return CELL.sub(cell, text)


def too_wide(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every code-cell line wider than :data:`COLUMN`."""
    out = []
    for match in CELL.finditer(text):
        first = text.count("\n", 0, match.start(3)) + 1
        for i, line in enumerate(match.group(3).split("\n")):
            if len(line) > COLUMN:
                out.append((first + i, line))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", type=Path)
    parser.add_argument("--check", action="store_true", help="only list lines too wide")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.chapters] or sorted(
        (ROOT / "book" / "chapters").glob("*.md")
    )
    wide = 0
    for path in paths:
        text = path.read_text()
        if not args.check:
            new = format_text(text)
            if new != text:
                path.write_text(new)
                text = new
        for number, line in too_wide(text):
            wide += 1
            print(
                f"{path.relative_to(ROOT)}:{number}: {len(line)} > {COLUMN}: {line.strip()[:60]}"
            )
    return 1 if (args.check and wide) else 0


if __name__ == "__main__":
    sys.exit(main())
