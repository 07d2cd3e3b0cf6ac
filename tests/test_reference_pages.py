"""What a plain test can check of the reference pages and the site's plumbing (book/_ext/peftlab_pages.py,
_static/, _config.yml). The pages as a browser draws them are checked by ``scripts/check_pages.py``."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import pytest
import yaml
from docutils import nodes

from peftlab.book import plotting

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
SPHINX = CONFIG["sphinx"]["config"]

sys.path.insert(0, str(ROOT / "book" / "_ext"))
import peftlab_pages  # noqa: E402


def test_mathjax_is_shipped_with_the_book_and_small():
    path = SPHINX["mathjax_path"]
    assert "://" not in path, "MathJax from a CDN: a downloaded copy of the book shows raw TeX offline"
    static = ROOT / "_static"
    assert (static / path).is_file()
    fonts = static / Path(path).parent / "output" / "chtml" / "fonts" / "woff-v2"
    assert (fonts / "MathJax_Main-Regular.woff").is_file()
    size = sum(p.stat().st_size for p in (static / Path(path).parent).rglob("*") if p.is_file())
    assert size < 3 * 2**20


def test_the_favicon_is_a_file_of_the_book():
    assert (ROOT / CONFIG["html"]["favicon"]).is_file()


def test_the_pages_extension_is_loaded():
    assert CONFIG["sphinx"]["local_extensions"]["peftlab_pages"] == "book/_ext"


def test_one_citation_style_author_year_in_the_text_and_the_bibliography():
    from pybtex.database import parse_file
    from pybtex.plugin import find_plugin

    assert SPHINX["bibtex_default_style"] == SPHINX["bibtex_reference_style"] == peftlab_pages.BIB_STYLE
    peftlab_pages._register_bibliography_style()
    style = find_plugin("pybtex.style.formatting", peftlab_pages.BIB_STYLE)()
    entries = parse_file(str(ROOT / "book" / "references.bib")).entries
    labels = {e.key: e.label for e in style.format_entries(entries.values())}
    assert len(set(labels.values())) == len(labels), "two entries share a label"
    assert labels["hu2021lora"] == "Hu et al., 2022"
    assert labels["kalajdzievski2023rslora"] == "Kalajdzievski, 2023"
    assert {labels["dettmers2022optimizers"], labels["dettmers2022llmint8"]} == {
        "Dettmers et al., 2022a",
        "Dettmers et al., 2022b",
    }
    for label in labels.values():
        assert re.fullmatch(r".+, (\d{4}[a-z]?|n\.d\.)", label), label


def _app(tmp_path, pages):
    """A stand-in for Sphinx's app: pages (docname -> source) under tmp_path."""
    return SimpleNamespace(
        env=SimpleNamespace(all_docs=dict.fromkeys(pages), doc2path=lambda name: str(tmp_path / pages[name])),
        srcdir=str(tmp_path),
    )


def test_a_launch_button_only_on_a_page_with_a_notebook_twin(tmp_path):
    (tmp_path / "ch.md").write_text("")
    (tmp_path / "ch.ipynb").write_text("{}")
    (tmp_path / "ref.md").write_text("")
    app = _app(tmp_path, {"ch": "ch.md", "ref": "ref.md"})
    for page, kept in (("ch", True), ("ref", False)):
        context = {"header_buttons": [{"label": "launch-buttons"}, {"label": "download-buttons"}]}
        peftlab_pages._launch_only_with_a_twin(app, page, "page.html", context, None)
        labels = [b["label"] for b in context["header_buttons"]]
        assert ("launch-buttons" in labels) == kept and "download-buttons" in labels


def test_a_chapter_figure_links_to_its_full_size_file_with_its_caption_as_alt(tmp_path):
    (tmp_path / "_static" / "figures").mkdir(parents=True)
    (tmp_path / "_static" / "figures" / "demo-x.png").write_bytes(b"")
    uri = "../../_images/0123456789abcdef0123456789abcdef.png"
    figure = nodes.figure(ids=["fig-demo-x"])
    figure += nodes.image(uri=uri, alt=uri)
    figure += nodes.caption(
        "", "The levels on the density. Produced on CPU (x86_64) with peftlab 0.1.0, seed 0."
    )
    doctree = nodes.document(None, None)
    doctree += figure
    peftlab_pages._figures_read_well(_app(tmp_path, {}), doctree, "book/chapters/demo")
    (image,) = figure.findall(nodes.image)
    assert image["alt"] == "The levels on the density."
    assert isinstance(image.parent, nodes.reference)
    assert image.parent["refuri"] == "../../_static/figures/demo-x.png"


def test_the_figures_page_thumbnail_is_wide_enough_linked_and_described(book):
    fig, ax = plotting.new_figure()
    ax.plot([0, 1], [1, 0])
    plotting.save_figure(fig, "demo-thumb", "A falling line. Second sentence.")
    header, _, row = plotting.figures_markdown().splitlines()
    assert all(cell.strip() for cell in header.strip("|").split("|")), "a blank header cell"
    img = re.search(r'<a href="([^"]+)"><img ([^>]+)>', row)
    assert img.group(1).endswith("/demo-thumb.png")
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', img.group(2)))
    assert "figure-thumbnail" in attrs["class"] and int(attrs["width"]) >= 120
    assert attrs["alt"] == "A falling line."


def test_the_css_keeps_thumbnails_wide_in_their_table_cell():
    css = (ROOT / "_static" / "peftlab.css").read_text()
    rule = re.search(r"img\.figure-thumbnail\s*\{([^}]*)\}", css).group(1)
    assert "max-width: none" in rule
    assert int(re.search(r"width:\s*(\d+)px", rule).group(1)) >= 120


@pytest.mark.parametrize("page", sorted((ROOT / "book" / "reference").glob("*.md")), ids=lambda p: p.stem)
def test_no_reference_page_draws_a_table_with_a_blank_header(page):
    blank = re.compile(r"\|(\s*\|)+\s*\"?\s*,?\s*$")
    for line in page.read_text().splitlines():
        header = re.search(r'"(\|[^"]*\|)"', line)
        assert not (header and blank.fullmatch(header.group(1))), f"{page.name}: {line.strip()}"


def test_every_bibliography_entry_has_the_stable_anchor_the_twins_link_to():
    # scripts/make_twins.py links a citation to references.html#cite-<key>
    assert SPHINX["bibtex_cite_id"] == "cite-{key}"
