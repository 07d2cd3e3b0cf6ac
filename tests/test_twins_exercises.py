"""Exercises in the Colab twins (scripts/make_twins.py): sphinx-exercise's ``{exercise}`` and gated
``{solution-start}`` ... ``{solution-end}`` become plain markdown headings, numbered as the book numbers them, and
each solution folded: no MyST markup is left for a reader of the notebook to see."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
if "make_twins" in sys.modules:  # tests/test_twins.py loaded it in this process already
    make_twins = sys.modules["make_twins"]
else:
    _spec = importlib.util.spec_from_file_location("make_twins", ROOT / "scripts" / "make_twins.py")
    make_twins = importlib.util.module_from_spec(_spec)
    sys.modules["make_twins"] = make_twins  # dataclasses look their module up while the class is made
    _spec.loader.exec_module(make_twins)

# What MyST leaves behind if the converter missed it (outside code blocks), and sphinx-exercise's names anywhere.
LEFTOVERS = {
    "role": re.compile(r"\{[a-zA-Z][\w:.-]*\}`"),
    "directive": re.compile(r"^\s*(`{3,}|~{3,}|:{3,})\s*\{", re.M),
    "label line": re.compile(r"^\s*\([^)\s]+\)=\s*$", re.M),
    "directive option": re.compile(r"^\s*:[\w-]+:(\s|$)", re.M),
    "exercise markup": re.compile(r"\{(exercise|solution)(-start|-end)?\}"),
}
CODE_BLOCK = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?^ {0,3}\1\s*$", re.M | re.S)

CHAPTER = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
(chapter-x)=
# A chapter

```{code-cell} python
x = 1
```

## Exercises

```{exercise}
:label: x-ex-1

Predict {glue:text}`x-k:.1f` before running anything.
```

```{solution-start} x-ex-1
:class: dropdown
```

First the reasoning.

```{code-cell} python
y = x + 1
```

Then the answer.

```{solution-end}
```

```{exercise} With a title
:label: x-ex-2

Read {ref}`x-ex-1` again.
```

```{solution} x-ex-2
:class: dropdown

A plain solution.
```

```{exercise}
:nonumber:

Not counted.
```

```{exercise}
:label: x-ex-3

The last one.
```

```{solution-start} x-ex-3
:class: dropdown
```

```{code-cell} python
z = x + 2
```

```{solution-end}
```

Prose that follows the last solution.
"""


@pytest.fixture
def chapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A chapter with exercises in a copy of the book's root (the setup cell reads _config.yml and
    requirements.txt), with make_twins pointed at it."""
    for name in ("_config.yml", "requirements.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    md = tmp_path / "book" / "chapters" / "x.md"
    md.parent.mkdir(parents=True)
    md.write_text(CHAPTER)
    monkeypatch.setattr(make_twins, "ROOT", tmp_path)
    return md


def book(md: Path, before: int = 0) -> make_twins.Book:
    site = "https://owner.github.io/repo/"
    page = f"{site}book/chapters/x.html"
    exercises = {f"x-ex-{i}": (f"Exercise {before + n}", f"{page}#x-ex-{i}") for i, n in ((1, 1), (2, 2), (3, 3))}
    return make_twins.Book(site=site, sections={}, figures={}, citations={}, references_url=site,
                           exercises=exercises, exercises_before={page: before})


def leftovers(nb: nbformat.NotebookNode) -> list[str]:
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            prose = CODE_BLOCK.sub("", cell.source)
            found += [f"cell {i}: {what}: {m.group(0)!r}" for what, p in LEFTOVERS.items() for m in p.finditer(prose)]
    return found


def make(md: Path, before: int = 0) -> nbformat.NotebookNode:
    values = {"x-k": {"text/plain": "2.5"}}
    return nbformat.reads(make_twins.twin(md, values, book(md, before)), as_version=4)


def test_exercises_become_numbered_headings_without_markup(chapter: Path):
    nb = make(chapter, before=4)  # four exercises on the pages before this one
    assert not leftovers(nb), leftovers(nb)
    text = "\n\n".join(cell.source for cell in nb.cells)
    headings = re.findall(r"^#### (Exercise.*)$", text, re.M)
    assert headings == ["Exercise 5", "Exercise 6 (With a title)", "Exercise", "Exercise 7"]
    assert "Predict 2.5 before running anything." in text
    assert "Read [Exercise 5](https://owner.github.io/repo/book/chapters/x.html#x-ex-1) again." in text
    assert "<details>\n<summary>Solution to Exercise 6</summary>\n\nA plain solution.\n\n</details>" in text


def test_a_gated_solution_is_a_folded_section_that_ends_at_the_next_exercise(chapter: Path):
    nb = make(chapter)
    (i,) = [i for i, c in enumerate(nb.cells) if c.source.startswith("##### Solution to Exercise 1")]
    heading, inside, after = nb.cells[i], nb.cells[i + 1:i + 3], nb.cells[i + 3]
    assert heading.source == "##### Solution to Exercise 1\n\nFirst the reasoning."
    assert heading.metadata["jp-MarkdownHeadingCollapsed"] is True  # JupyterLab, Notebook 7
    assert heading.metadata["id"] == heading.id
    assert nb.metadata["colab"]["collapsed_sections"] == [heading.id]  # Colab
    assert [c.cell_type for c in inside] == ["code", "markdown"]
    assert inside[0].source == "y = x + 1" and inside[0].metadata["tags"] == [make_twins.SOLUTION_TAG]
    assert inside[1].source == "Then the answer."
    assert after.source.startswith("#### Exercise 2")  # a heading of a level that ends the solution's section


def test_a_solution_followed_by_prose_folds_its_cells_instead_of_a_section(chapter: Path):
    """A section would run on over the prose after it: the solution gets a bold line and hidden code."""
    nb = make(chapter)
    (i,) = [i for i, c in enumerate(nb.cells) if "Solution to Exercise 3" in c.source]
    assert nb.cells[i].source == "**Solution to Exercise 3**"
    assert "jp-MarkdownHeadingCollapsed" not in nb.cells[i].metadata
    assert nb.cells[i].id not in nb.metadata["colab"]["collapsed_sections"]
    code = nb.cells[i + 1]
    assert code.source == "z = x + 2"
    assert code.metadata["jupyter"] == {"source_hidden": True, "outputs_hidden": True}
    assert nb.cells[i + 2].source == "Prose that follows the last solution."


def test_the_twin_keeps_every_code_cell_in_order(chapter: Path):
    nb = make(chapter)
    ours = [c.source for c in nb.cells if c.cell_type == "code"][1:]  # after the setup cell
    assert ours == [c.source for c in jupytext.read(chapter).cells if c.cell_type == "code"]


def test_the_book_numbers_exercises_through_its_pages():
    text = ("```{exercise}\n:label: a\n\nOne.\n```\n\n```{exercise}\n:nonumber:\n\nUncounted.\n```\n\n"
            "```{exercise-start} Gated\n:label: b\n```\n\nTwo.\n\n```{exercise-end}\n```\n\n"
            "```{exercise}\n\nUnlabelled.\n```\n")
    assert make_twins.exercise_labels(text) == ["a", "b", ""]


def test_unbalanced_solutions_are_refused(chapter: Path):
    chapter.write_text(CHAPTER.replace("```{solution-end}\n```\n\n```{exercise} With", "```{exercise} With", 1))
    with pytest.raises(make_twins.TwinError, match="solution-start"):
        make(chapter)


# The book's chapters (in _toc.yml: a page not yet in the book may name labels the book does not have yet).
EXERCISED = [md for md in (ROOT / f"{doc}.md" for doc in make_twins.toc_documents())
             if md.parent.name == "chapters" and "{solution-start}" in md.read_text()]


class AnyValue(dict):
    """Every glue key has a value: the twin's syntax is checked without a build's numbers."""

    def get(self, key, default=None):
        return {"text/plain": "1", "text/markdown": "text"}


@pytest.mark.parametrize("md", EXERCISED, ids=lambda p: p.stem)
def test_every_chapter_with_exercises_makes_a_twin_without_exercise_markup(md: Path):
    nb = nbformat.reads(make_twins.twin(md, AnyValue(), make_twins.Book.load()), as_version=4)
    assert not leftovers(nb), leftovers(nb)
    text = "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert len(re.findall(r"^#### Exercise", text, re.M)) == len(re.findall(r"^`{3,}\{exercise", md.read_text(), re.M))
    starts = len(re.findall(r"^`{3,}\{solution-start\}", md.read_text(), re.M))
    assert len(re.findall(r"Solution to Exercise \d+", text)) >= starts
