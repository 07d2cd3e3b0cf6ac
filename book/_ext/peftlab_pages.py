"""A Sphinx extension for how the book's pages behave in a reader's browser.

- The Colab launch button only on a page with a notebook twin (``book/chapters/<name>.ipynb``): the reference
  pages are MyST notebooks too, but Colab cannot open their ``.md``.
- MathJax from the book's own ``_static/mathjax`` (``mathjax_path``), loaded once.
- Thebe off: the book has no live-code button, so its script and configuration are not included (they were,
  twice).
- One search box on a desktop: the primary sidebar's (the theme's header otherwise repeats it in a bar of its
  own); on a phone the article header's search button.
- One citation style, author-year, the same in the text and in the bibliography: each entry's label is
  "Hu et al., 2022" (``bibtex_default_style: peftlab``; two entries that would share one get 2022a and 2022b) and
  a citation in the text is its label, several joined by "; " (``bibtex_reference_style: peftlab``). Entries are
  sorted by author, year and title.
- A chapter's figure links to its full-size file (``_static/figures/<name>.png``) and its alt text is its
  caption (not the image's hashed file name).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docutils import nodes

from peftlab.book.citations import labels

#: The pybtex formatting style the book's bibliography uses (``bibtex_default_style``).
BIB_STYLE = "peftlab"

#: Where save_figure exports a figure's files, relative to the book's root (see peftlab.book.plotting).
FIGURES = "_static/figures"

# The provenance sentence that ends every figure's caption (peftlab.book.runtime.provenance, Record.caption).
_PROVENANCE = re.compile(r"\s+(Produced|Measured|Recorded) on .*$", re.S)


def _register_bibliography_style() -> None:
    from pybtex.plugin import register_plugin
    from pybtex.style.formatting.plain import Style as PlainStyle
    from pybtex.style.labels import BaseLabelStyle

    from sphinxcontrib.bibtex.plugin import register_plugin as register_reference_style
    from sphinxcontrib.bibtex.style.referencing import BracketStyle
    from sphinxcontrib.bibtex.style.referencing.label import LabelReferenceStyle

    class AuthorYearLabels(BaseLabelStyle):
        def format_labels(self, sorted_entries: Any) -> Any:
            yield from labels(list(sorted_entries))

    class Style(PlainStyle):  # plain: sorted by author, year, title
        default_label_style = AuthorYearLabels

    @dataclass
    class References(LabelReferenceStyle):
        """In the text, a reference is its label: [Hu et al., 2022; Kalajdzievski, 2023]."""

        bracket_parenthetical: BracketStyle = field(
            default_factory=lambda: BracketStyle(sep="; ")
        )

    register_plugin("pybtex.style.formatting", BIB_STYLE, Style, force=True)
    register_reference_style(
        "sphinxcontrib.bibtex.style.referencing", BIB_STYLE, References, force=True
    )


def _drop_thebe(app: Any) -> None:
    """Disconnect sphinx-thebe (jupyter-book loads it whatever the configuration) and drop its stylesheet."""
    for listeners in list(app.events.listeners.values()):
        for listener in list(listeners):
            if getattr(listener.handler, "__module__", "").startswith("sphinx_thebe"):
                app.disconnect(listener.id)
    app.registry.css_files = [(f, a) for f, a in app.registry.css_files if "thebe" not in (f or "")]


def _mathjax_once(app: Any) -> None:
    """jupyter-book lists every ``.js`` under ``_static`` in ``html_js_files``, which would load the shipped
    MathJax on every page a second time (and without ``defer``); sphinx.ext.mathjax loads it where needed."""
    folder = posixpath.dirname(app.config.mathjax_path)
    if "://" in app.config.mathjax_path or not folder:
        return

    def name(entry: Any) -> str:
        return entry[0] if isinstance(entry, (tuple, list)) else entry

    app.config.html_js_files = [
        f for f in app.config.html_js_files if not name(f).startswith(folder + "/")
    ]


def _one_search_box(app: Any) -> None:
    """No header bar holding a second search box (pydata-sphinx-theme's default ``navbar_persistent``)."""
    app.config.html_theme_options.setdefault("navbar_persistent", [])


def _twin(app: Any, pagename: str) -> Path:
    return Path(app.env.doc2path(pagename)).with_suffix(".ipynb")


def _launch_only_with_a_twin(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Drop the launch (Colab) button of a page that has no notebook twin beside its source."""
    if pagename not in app.env.all_docs or _twin(app, pagename).is_file():
        return
    buttons = context.get("header_buttons")
    if buttons:
        buttons[:] = [b for b in buttons if b.get("label") != "launch-buttons"]


def caption_text(figure: nodes.figure) -> str:
    """A figure's caption as plain text, without the number and the provenance sentence (device, versions)."""
    caption = next(iter(figure.findall(nodes.caption)), None)
    if caption is None:
        return ""
    text = " ".join(caption.astext().split())
    return _PROVENANCE.sub("", text).strip()


def _figures_read_well(app: Any, doctree: nodes.document, docname: str) -> None:
    """Alt text from the caption; a link from each chapter figure to its full-size file."""
    root = Path(app.srcdir)
    for figure in doctree.findall(nodes.figure):
        alt = caption_text(figure)
        name = next((i[len("fig-"):] for i in figure["ids"] if i.startswith("fig-")), None)
        for image in list(figure.findall(nodes.image)):
            uri = image.get("uri", "")
            current = image.get("alt", "")
            if alt and (not current or current == uri or current.endswith(posixpath.basename(uri))):
                image["alt"] = alt
            if name is None or isinstance(image.parent, nodes.reference):
                continue
            full = f"{FIGURES}/{name}.png"
            if not (root / full).is_file():
                continue
            link = nodes.reference("", "", refuri=posixpath.relpath(full, posixpath.dirname(docname) or "."),
                                   classes=["image-reference", "figure-full-size"])
            link["reftitle"] = "The full-size figure"
            image.replace_self(link)
            link.append(image)


def setup(app: Any) -> dict[str, Any]:
    _register_bibliography_style()
    _drop_thebe(app)
    app.connect("config-inited", lambda app, config: _one_search_box(app))
    app.connect("config-inited", lambda app, config: _mathjax_once(app))
    # after sphinx-book-theme's add_launch_buttons (priority 501)
    app.connect("html-page-context", _launch_only_with_a_twin, priority=502)
    app.connect("doctree-resolved", _figures_read_well)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
