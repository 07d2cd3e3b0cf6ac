"""scripts/build_book.py: chapters executed ahead of Jupyter Book land in its cache under
the key Jupyter Book looks them up by, and a failing chapter is reported, not cached."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from jupyter_cache import get_cache

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
build_book = importlib.util.module_from_spec(_spec)
sys.modules["build_book"] = build_book
_spec.loader.exec_module(build_book)

PAGE = """---
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
# A page

```{code-cell} python
:tags: [remove-input]
import os
print(os.environ["PEFTLAB_BOOK_BUILD"], os.environ["OMP_NUM_THREADS"])
```
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(build_book, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(build_book, "KERNEL_LOGS", tmp_path / "logs")
    return tmp_path / "cache"


def test_an_executed_page_is_found_by_the_hash_of_its_unexecuted_source(tmp_path, cache):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    path, seconds, error = build_book.execute(page, timeout=120)
    assert error is None and seconds > 0
    record = get_cache(str(cache)).match_cache_notebook(build_book.read_page(page))
    executed = get_cache(str(cache)).get_cache_bundle(record.pk).nb
    out = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    # the kernel ran as the book's build runs it: flagged, and on one thread
    assert out[0]["text"] == "1 1\n"


def test_a_failing_page_is_reported_and_not_cached(tmp_path, cache):
    page = tmp_path / "page.md"
    page.write_text(PAGE.replace('print(os.environ["PEFTLAB_BOOK_BUILD"]', "print(1 / 0"))
    _, _, error = build_book.execute(page, timeout=120)
    assert "ZeroDivisionError" in error
    with pytest.raises(KeyError):
        get_cache(str(cache)).match_cache_notebook(build_book.read_page(page))
