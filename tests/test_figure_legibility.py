"""Figures read at the size a chapter shows them: every text at least MIN_TEXT_PX CSS pixels, images at twice
their displayed resolution.

A chapter's figure is shown ``min(width_in * DISPLAY_DPI, COLUMN_PX)`` CSS pixels wide (COLUMN_PX: the widest a
figure draws in the text column of a 1,400 px window, measured with ``scripts/check_pages.py``), so text of
``s`` points in a figure ``width_in`` inches wide reads ``s / 72 * displayed / width_in`` pixels. The tests derive
that from the saved files (size in inches = pixels / dpi) and the figures' font sizes, not from the numbers
save_figure records, and check the records of the last build's figures where one exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
from matplotlib.text import Text

from peftlab.book import plotting

ROOT = Path(__file__).resolve().parents[1]

#: Figure specs like the chapters' (width, height in inches, panels) with the small sizes they ask for.
SPECS = {
    "one-panel": dict(ncols=1, width=5.2, height=3.0, small=7),
    "two-panels": dict(ncols=2, width=8.8, height=3.4, small=7),
    "three-panels": dict(ncols=3, width=11.0, height=3.4, small=7),
    "five-panels": dict(ncols=5, width=12.0, height=4.0, small=6),
    "grid": dict(ncols=2, nrows=2, width=9.0, height=6.4, small=7),
}


def displayed_px(points: float, width_in: float) -> float:
    """CSS pixels of text of ``points`` in a figure ``width_in`` wide, as a chapter shows it."""
    shown = min(width_in * plotting.DISPLAY_DPI, plotting.COLUMN_PX)
    return points / 72 * shown / width_in


def _draw(spec: dict) -> object:
    spec = dict(spec)
    small = spec.pop("small")
    fig, axes = plotting.new_figure(**spec)
    flat = list(getattr(axes, "flat", [axes]))
    for k, ax in enumerate(flat):
        ax.plot([0, 1, 2], [2, 0, 1], label=f"series {k}")
        ax.set_xlabel("step")
        ax.set_title(f"panel {k}", fontsize=small + 2)
        ax.legend(fontsize=small)
        ax.annotate("note", (1, 0), xytext=(4, 4), textcoords="offset points", fontsize=small)
        ax.tick_params(labelsize=small)
    plotting.grouped_bars(flat[0].twinx(), {"a": {"x": 1.0, "y": 2.0}}, "ms")
    return fig


@pytest.fixture
def glued(book, monkeypatch):
    """What save_figure glues for the prose, by name."""
    out = {}
    monkeypatch.setattr(plotting, "glue", lambda name, value, display=False: out.__setitem__(name, value))
    return out


@pytest.mark.parametrize("spec", SPECS, ids=list(SPECS))
def test_every_text_reads_at_the_threshold_from_an_image_twice_its_displayed_size(book, glued, spec):
    fig = _draw(SPECS[spec])
    plotting.save_figure(fig, f"demo-{spec}", "A figure.")
    # the smallest text, from the saved file's size in inches and the font sizes left in the figure
    full = book / "_static" / "figures" / f"demo-{spec}.png"
    width_in = plotting.png_size(full.read_bytes())[0] / matplotlib.rcParams["savefig.dpi"]
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    smallest = displayed_px(min(sizes), width_in)
    assert smallest >= plotting.MIN_TEXT_PX - 0.05, (
        f"{spec}: smallest text {min(sizes)} pt reads {smallest:.1f} px in a figure {width_in:.2f} in wide"
    )
    # the image the chapter shows: at most the column wide, twice as many pixels as it is shown
    data, meta = glued[f"demo-{spec}"]._repr_mimebundle_()
    width, _ = plotting.png_size(data["image/png"])
    shown = meta["image/png"]["width"]
    assert shown <= plotting.COLUMN_PX and abs(shown - min(width_in * plotting.DISPLAY_DPI, plotting.COLUMN_PX)) < 2
    assert width >= plotting.DENSITY * shown
    # and what save_figure recorded agrees
    record = json.loads((book / "_build" / ".peftlab" / "figure-records" / f"demo-{spec}.json").read_text())
    assert abs(record["legibility"]["smallest_px"] - smallest) < 0.1


def test_the_figures_thumbnail_holds_twice_its_displayed_pixels(book, glued):
    plotting.save_figure(_draw(SPECS["two-panels"]), "demo-thumb", "A figure.")
    thumb = book / "_static" / "figures" / "thumbnails" / "demo-thumb.png"
    assert plotting.png_size(thumb.read_bytes())[0] >= plotting.DENSITY * plotting.THUMBNAIL_PX - 2


def test_text_already_large_enough_is_left_as_the_chapter_set_it(book, glued):
    fig, ax = plotting.new_figure(width=5.0, height=3.0)
    title = ax.set_title("big", fontsize=14)
    ax.plot([0, 1], [0, 1])
    plotting.save_figure(fig, "demo-big", "A figure.")
    assert title.get_fontsize() == 14


def test_enlarging_is_recorded_with_what_the_chapter_asked_for(book, glued):
    fig, ax = plotting.new_figure(width=10.0, height=3.0)
    ax.plot([0, 1], [0, 1])
    ax.text(0.5, 0.5, "tiny", fontsize=5)
    plotting.save_figure(fig, "demo-tiny", "A figure.")
    legible = json.loads((book / "_build" / ".peftlab" / "figure-records" / "demo-tiny.json").read_text())[
        "legibility"
    ]
    assert legible["requested_pt"] == 5 and legible["enlarged"] >= 1
    assert legible["smallest_pt"] > 5


def _build_records() -> list[dict]:
    folder = ROOT / "_build" / ".peftlab" / "figure-records"
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [r for r in records if "legibility" in r]


@pytest.mark.skipif(not _build_records(), reason="no build with legibility records (jupyter-book build .)")
def test_the_last_builds_figures_read_at_the_threshold():
    small = []
    for record in _build_records():
        legible = record["legibility"]
        px = displayed_px(legible["smallest_pt"], legible["width_in"])
        if px < plotting.MIN_TEXT_PX - 0.05 or legible["dpi"] * legible["width_in"] < (
            plotting.DENSITY * legible["display_px"] - 1
        ):
            small.append(f"{record['name']}: {px:.1f} px, {legible['dpi']} dpi")
    assert not small, "figures that do not read at their displayed size:\n" + "\n".join(small)
