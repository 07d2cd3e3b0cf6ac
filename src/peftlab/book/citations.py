"""How the book cites a reference: an author–year label ("Hu et al., 2022"), the same in
the text, in the bibliography and in the Colab twins.

Used by the book's Sphinx extension (book/_ext/peftlab_pages.py) and by the twins'
generator (scripts/make_twins.py); the References page (book/reference/references.md)
lists every entry under its label.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

__all__ = ["author_year", "bibliography_labels", "labels"]


def author_year(persons: list[Any], year: str) -> str:
    """``Smith, 2020``, ``Smith and Jones, 2020`` or ``Smith et al., 2020`` (pybtex
    persons; ``Anonymous`` without any)."""
    from pybtex.backends.plaintext import Backend
    from pybtex.richtext import Text

    # render(Backend()) is render_as("text") without looking the backend up among every
    # installed package's entry points, which took 0.03 s a name
    plain = Backend()
    names = [
        Text.from_latex(" ".join(p.prelast_names + p.last_names)).render(plain)
        for p in persons
    ]
    if not names:
        who = "Anonymous"
    elif len(names) == 1:
        who = names[0]
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    else:
        who = f"{names[0]} et al."
    return f"{who}, {year}"


def labels(entries: Iterable[Any]) -> list[str]:
    """The labels of pybtex ``entries`` given in the bibliography's order: author–year,
    with a, b, … after the year where two entries would share one (Dettmers et al.,
    2022a and 2022b, in that order)."""
    plain = []
    for entry in entries:
        persons = entry.persons.get("author") or entry.persons.get("editor") or []
        plain.append(author_year(persons, entry.fields.get("year", "n.d.")))
    shared = Counter(plain)
    seen: Counter[str] = Counter()
    out = []
    for label in plain:
        if shared[label] > 1:
            seen[label] += 1
            label += "abcdefghijklmnopqrstuvwxyz"[seen[label] - 1]
        out.append(label)
    return out


def bibliography_labels(bib_data: Any) -> dict[str, str]:
    """Every entry's label (bib key -> label) in a bibliography that lists them all,
    sorted as the book's bibliography sorts them (pybtex's plain style: author, year,
    title)."""
    from pybtex.plugin import find_plugin

    ordered = find_plugin("pybtex.style.sorting", "author_year_title")().sort(
        list(bib_data.entries.values())
    )
    return dict(zip((entry.key for entry in ordered), labels(ordered)))
