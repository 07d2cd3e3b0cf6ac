"""Execute one chapter top to bottom, as the book build does, and report how long it took.

    python scripts/run_chapter.py book/chapters/lora.md [--timeout 600]

Runs in the chapter's folder with the python3 kernel; exits 1 on the first failing cell. Useful for
checking a chapter against its time budget without building the whole book.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jupytext
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapter", type=Path)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    if not args.chapter.is_file():
        parser.error(f"no such chapter: {args.chapter}")
    nb = jupytext.read(args.chapter)
    client = NotebookClient(
        nb, timeout=args.timeout, kernel_name="python3",
        resources={"metadata": {"path": str(args.chapter.resolve().parent)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        print(f"FAILED after {time.perf_counter() - start:.1f} s:\n{err}", file=sys.stderr)
        return 1
    print(f"{args.chapter}: executed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
