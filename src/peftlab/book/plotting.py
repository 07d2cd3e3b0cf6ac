"""The book's figure style and the one way a citable figure leaves a chapter.

Every figure a reader may cite is drawn with :func:`new_figure` and saved with
:func:`save_figure`, which exports it under a stable file name (SVG, PDF, PNG), glues it
for the prose and records it for the *Figures* page (book/reference/figures.md).

Note: the files are byte-for-byte reproducible — no dates or random ids in the metadata, a
fixed SVG hash salt — so two clean builds on the same machine produce identical downloads.

Legible at the size it is shown: a chapter shows a figure at :data:`DISPLAY_DPI` CSS
pixels per inch, or squeezed to the text column (:data:`COLUMN_PX`) when wider; the
image the page embeds holds :data:`DENSITY` image pixels per displayed pixel, and
:func:`save_figure` enlarges any text that would draw smaller than :data:`MIN_TEXT_PX`
at that size (recording what it enlarged, see :func:`legibility`). A figure drawn wide
for many panels therefore gets large type relative to its panels: give it fewer columns
(more rows) or a smaller width.
"""

from __future__ import annotations

import html
import io
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.text import Text

from peftlab.book.style import PALETTE, use_style
from peftlab.checks import stable_name
from peftlab.files import atomic_write
from peftlab.book.runtime import (
    chapter_order,
    current_chapter,
    glue,
    in_book_build,
    next_figure_index,
    output_dir,
    provenance,
)

if TYPE_CHECKING:
    from peftlab.book.records import Record

__all__ = [
    "COLUMN_PX",
    "DENSITY",
    "DISPLAY_DPI",
    "Legibility",
    "MIN_TEXT_PX",
    "PALETTE",
    "FORMATS",
    "legibility",
    "figure_markdown",
    "figures_markdown",
    "grouped_bars",
    "load_figure_records",
    "new_figure",
    "save_figure",
    "use_style",
]

#: The formats every citable figure is exported in.
FORMATS = ("svg", "pdf", "png")

#: Width in CSS pixels of the text column a chapter's figure is drawn in on a desktop:
#: at a 1,400 px window a figure's image is at most 768 px wide (``python
#: scripts/check_pages.py`` prints it).
COLUMN_PX = 768

#: CSS pixels per inch of a figure narrower than the column (a 6.4-inch figure shows 704
#: px wide).
DISPLAY_DPI = 110

#: Image pixels per displayed CSS pixel of the image a chapter embeds (sharp on a high-
#: density screen).
DENSITY = 2

#: The smallest text a figure may show, in CSS pixels at its displayed size: the page's
#: small print (its body text is 16 px, code and footer 14 px).
MIN_TEXT_PX = 12.0

#: Width in CSS pixels of a thumbnail on the Figures page (its PNG holds DENSITY times
#: as many pixels).
THUMBNAIL_PX = 160

#: Where the chapters (book/chapters/*.md) find the exported figures, as a relative
#: link.
FIGURES_FROM_CHAPTER = "../../_static/figures"


# Metadata that would otherwise carry the date or the software build into the files.
_METADATA = {
    "svg": {"Date": None, "Creator": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None},
    "png": {"Software": None},
}


def new_figure(
    ncols: int = 1,
    nrows: int = 1,
    width: float = 6.4,
    height: float = 3.6,
    **kwargs: Any,
) -> tuple[Figure, Any]:
    """A figure in the book's style: ``fig, ax = new_figure()`` (``ax`` is an array for
    several panels)."""
    use_style()
    kwargs.setdefault("layout", "constrained")
    return plt.subplots(nrows=nrows, ncols=ncols, figsize=(width, height), **kwargs)


def grouped_bars(
    ax: Any, groups: dict[str, dict[str, float]], ylabel: str, fmt: str = "{:.2f}"
) -> None:
    """Bars side by side: one cluster per group (``groups[group][series] = value``), one
    colour per series,
    each bar labelled with its value. Used for the GPU timings the chapters record (ours beside the reference)."""
    series = list(dict.fromkeys(name for values in groups.values() for name in values))
    width = 0.8 / len(series)
    for k, name in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        heights = [values.get(name, float("nan")) for values in groups.values()]
        bars = ax.bar(xs, heights, width, label=name, color=PALETTE[k % len(PALETTE)])
        ax.bar_label(bars, labels=[fmt.format(h) for h in heights], padding=2)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.legend()


def _export(fig: Figure, path: Path, fmt: str, dpi: float | None = None) -> None:
    extra = {} if dpi is None else {"dpi": dpi}
    atomic_write(
        path, lambda tmp: fig.savefig(tmp, format=fmt, metadata=_METADATA[fmt], **extra)
    )


def _png(fig: Figure, dpi: float) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata=_METADATA["png"])
    return buffer.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height in pixels of a PNG image (read from its header)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG image")
    return struct.unpack(">II", data[16:24])


def _drawn_texts(fig: Figure) -> list[Text]:
    """The texts of ``fig`` that are drawn: visible, not empty, tick labels only for
    ticks in view."""
    ticks: set[int] = set()
    shown: set[int] = set()
    hidden: set[int] = set()
    for ax in fig.axes:
        axes_texts = {id(t) for t in ax.findobj(Text)}
        if not ax.get_visible():
            hidden |= axes_texts
            continue
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks |= {id(tick.label1), id(tick.label2)}
            shown |= {id(t) for t in axis.get_ticklabels(which="both")}
            if not ax.axison or not axis.get_visible():
                hidden |= {id(t) for t in axis.findobj(Text)}
    texts = []
    for text in fig.findobj(Text):
        if id(text) in hidden or (id(text) in ticks and id(text) not in shown):
            continue
        if text.get_visible() and text.get_text().strip():
            texts.append(text)
    return texts


@dataclass(frozen=True)
class Legibility:
    """How a saved figure reads in a chapter (recorded by :func:`save_figure` for each
    figure).

    ``width_in`` and ``height_in`` are the saved (tight) figure's size; it is shown
    ``display_px`` CSS pixels wide, ``px_per_inch`` CSS pixels per inch, from an image
    of ``dpi`` pixels per inch. Its smallest text is ``smallest_pt`` points,
    ``smallest_px`` CSS pixels as shown; ``requested_pt`` is the smallest size the
    chapter asked for, before the texts below ``MIN_TEXT_PX`` were enlarged
    (``enlarged`` of them).
    """

    width_in: float
    height_in: float
    display_px: float
    px_per_inch: float
    dpi: float
    smallest_pt: float
    smallest_px: float
    requested_pt: float
    enlarged: int
    min_text_px: float = MIN_TEXT_PX
    column_px: float = COLUMN_PX


def display_width(width_in: float) -> float:
    """CSS pixels a figure ``width_in`` inches wide is drawn at in a chapter."""
    return min(width_in * DISPLAY_DPI, COLUMN_PX)


def smallest_font_px(smallest_pt: float, width_in: float) -> float:
    """The displayed size in CSS pixels of text of ``smallest_pt`` points in a figure
    ``width_in`` wide."""
    return smallest_pt / 72 * display_width(width_in) / width_in


def _saved_width(fig: Figure, dpi: float = 50.0) -> tuple[float, float]:
    width, height = png_size(_png(fig, dpi))
    return width / dpi, height / dpi


def _enlarge_tick_labels(fig: Figure, floor_pt: float, size: float) -> set[int]:
    """Tick labels below ``floor_pt`` set to ``size`` through their axis's tick
    parameters (a label set one by one would be redrawn from them); returns the ids of
    every tick label."""
    labels_seen: set[int] = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for which in ("major", "minor"):
                ticks = (
                    axis.get_major_ticks()
                    if which == "major"
                    else axis.get_minor_ticks()
                )
                labels = [
                    label for tick in ticks for label in (tick.label1, tick.label2)
                ]
                labels_seen |= {id(label) for label in labels}
                if any(label.get_fontsize() < floor_pt - 1e-9 for label in labels):
                    axis.set_tick_params(which=which, labelsize=size)
    return labels_seen


def legibility(fig: Figure, enlarge: bool = True) -> Legibility:
    """Measure (and with ``enlarge``, fix) how ``fig`` reads at the size a chapter shows
    it.

    Any drawn text smaller than :data:`MIN_TEXT_PX` at the displayed size is set to that
    size; as larger text can widen the saved figure (a legend outside the axes), this
    repeats until nothing changes.
    """
    texts = _drawn_texts(fig)
    requested = min((t.get_fontsize() for t in texts), default=float("nan"))
    enlarged: set[str] = set()
    for _ in range(4):
        width_in, height_in = _saved_width(fig)
        floor_pt = MIN_TEXT_PX * 72 / (display_width(width_in) / width_in)
        small = [t for t in texts if t.get_fontsize() < floor_pt - 1e-9]
        if not enlarge or not small:
            break
        size = round(floor_pt + 0.05, 1)  # a tenth above the floor, never below it
        enlarged |= {f"{t.get_text()}@{id(t.axes)}" for t in small}
        tick_labels = _enlarge_tick_labels(fig, floor_pt, size)
        for text in small:
            if id(text) not in tick_labels:
                text.set_fontsize(size)
        texts = _drawn_texts(fig)
    smallest = min((t.get_fontsize() for t in texts), default=float("nan"))
    display = display_width(width_in)
    return Legibility(
        width_in=round(width_in, 3),
        height_in=round(height_in, 3),
        display_px=round(display, 1),
        px_per_inch=round(display / width_in, 2),
        dpi=round(DENSITY * display / width_in, 2),
        smallest_pt=smallest,
        smallest_px=round(smallest_font_px(smallest, width_in), 2),
        requested_pt=requested,
        enlarged=len(enlarged),
    )


class FigureImage:
    """The image a chapter shows for a figure: a PNG of :data:`DENSITY` pixels per
    displayed pixel, with the displayed width and height in its metadata (myst-nb sizes
    the page's ``<img>`` from them)."""

    def __init__(self, png: bytes, width: float, height: float, name: str) -> None:
        self.png, self.width, self.height, self.name = png, width, height, name

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None
    ) -> tuple[dict, dict]:
        data = {"image/png": self.png, "text/plain": f"<Figure {self.name}>"}
        meta = {
            "image/png": {"width": round(self.width)}
        }  # height follows: phones narrow it
        return data, meta

    def __repr__(self) -> str:
        return f"<Figure {self.name}: {round(self.width)}x{round(self.height)} px>"


def _show(fig: Any) -> None:
    """Display ``fig`` (the figure's :class:`FigureImage`) as the cell's output in
    Jupyter or Colab; in the book's build, leave it to the glue.

    Note: the book places each figure once, where the prose's ``{glue:figure}`` puts it;
    everywhere else (a Colab twin, a reader's Jupyter) the figure appears under the cell
    that drew it.
    """
    if in_book_build():
        return
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # plain Python: nothing to render
        return
    if get_ipython() is not None:
        display(fig)


def save_figure(
    fig: Figure,
    name: str,
    caption: str,
    seed: int | None = None,
    record: Record | None = None,
) -> None:
    """Export ``fig`` as ``<name>.svg/.pdf/.png``, show it, glue it, and record it for the
    Figures page.

    First any text that would read smaller than :data:`MIN_TEXT_PX` at the size the
    chapter shows the figure is enlarged to it (:func:`legibility`, recorded with the
    figure). The glued image is a PNG at :data:`DENSITY` times its displayed
    resolution, sized for the column.

    The prose shows it with::

        ```{glue:figure} <name>
        :name: fig-<name>

        {glue:md}`<name>-caption`
        ```

    ``<name>-caption`` is ``caption`` followed by :func:`~peftlab.book.runtime.provenance`
    (device, seed, versions), so the caption always says what produced the figure. A
    figure drawn from a GPU measurement passes its :class:`~peftlab.book.records.Record`,
    whose provenance (device, CUDA, versions, date) then ends the caption instead. Outside
    the book's build the figure is also displayed under the cell. Returns None, so a cell
    that ends with it shows nothing twice; :func:`load_figure_records` reads the records
    back.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    stable_name(name, "name")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("caption must be a non-empty str saying what the figure shows")
    folder = output_dir("figures")
    legible = legibility(fig)
    for fmt in FORMATS:
        _export(fig, folder / f"{name}.{fmt}", fmt)
    (folder / "thumbnails").mkdir(exist_ok=True)
    _export(
        fig,
        folder / "thumbnails" / f"{name}.png",
        "png",
        dpi=DENSITY * THUMBNAIL_PX / legible.width_in,
    )
    png = _png(fig, legible.dpi)
    width_px, height_px = png_size(png)
    shown = min(width_px // DENSITY, COLUMN_PX)  # the tight box may round a pixel wider
    image = FigureImage(png, shown, height_px * shown / width_px, name)
    made_by = provenance(seed) if record is None else record.caption()
    full_caption = f"{caption.strip()} {made_by}"
    entry = {
        "name": name,
        "label": f"fig-{name}",
        "caption": full_caption,
        "chapter": current_chapter(),
        "index": next_figure_index(),
        "files": [f"{name}.{fmt}" for fmt in FORMATS],
        "gpu": None if record is None else record.device,
        "legibility": asdict(legible),
    }
    entries = output_dir("figure-records")
    (entries / f"{name}.json").write_text(json.dumps(entry, indent=1, sort_keys=True))
    _show(image)
    glue(name, image, display=False)
    try:
        from IPython.display import Markdown
    except ImportError:  # plain Python: nothing to render
        Markdown = str  # type: ignore[assignment,misc]
    glue(f"{name}-caption", Markdown(full_caption), display=False)
    plt.close(fig)  # free it: it has been shown, exported and glued


def load_figure_records() -> list[dict[str, Any]]:
    """Every figure saved by this build, in the book's order: chapters as in ``_toc.yml``,
    then saved order."""
    records = [
        json.loads(p.read_text()) for p in output_dir("figure-records").glob("*.json")
    ]
    order = {name: i for i, name in enumerate(chapter_order())}
    return sorted(
        records,
        key=lambda r: (
            order.get(r["chapter"], len(order)),
            r["chapter"] or "",
            r.get("index", 0),
        ),
    )


def figures_markdown(static_prefix: str = FIGURES_FROM_CHAPTER) -> str:
    """The Figures page's table (MyST): thumbnail, number, caption and downloads for every
    figure.

    The thumbnail links to the full-size PNG; a figure drawn from a GPU record is marked
    with its device.
    """
    records = load_figure_records()
    if not records:
        return "*No figures were recorded by this build.*"
    rows = ["| Preview | Figure | Caption | Files |", "|---|---|---|---|"]
    for r in records:
        name = r["name"]
        alt = html.escape(_first_sentence(r["caption"]), quote=True).replace(
            "|", "&#124;"
        )
        thumb = (
            f'<a href="{static_prefix}/{name}.png">'
            f'<img src="{static_prefix}/thumbnails/{name}.png" class="figure-thumbnail" '
            f'alt="{alt}" width="{THUMBNAIL_PX}" '
            'loading="lazy"></a>'
        )
        files = " ".join(
            f'<a href="{static_prefix}/{f}" download>{f.rsplit(".", 1)[1].upper()}</a>'
            for f in r["files"]
        )
        number = f"{{numref}}`{r['label']}`"
        if r.get("gpu"):
            number += f"<br>**GPU**: {r['gpu']}"
        caption = r["caption"].replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {thumb} | {number} | {caption} | {files} |")
    return "\n".join(rows)


def _first_sentence(caption: str) -> str:
    text = " ".join(caption.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def figure_markdown(name: str, static_prefix: str = FIGURES_FROM_CHAPTER) -> str:
    """A MyST ``{figure}`` block for a figure saved by this run, for prose that exists
    only sometimes.

    A chapter's *Measured on a GPU* section is glued as MyST (``{glue:md}`` with
    ``:format: myst``) because it depends on whether a GPU record exists; its figures are
    numbered and captioned like the others, from the record :func:`save_figure` wrote.
    """
    path = output_dir("figure-records") / f"{name}.json"
    if not path.is_file():
        raise ValueError(
            f"no figure named {name!r} was saved by this run (save_figure first)"
        )
    entry = json.loads(path.read_text())
    width = entry.get("legibility", {}).get("display_px")
    size = (
        "" if width is None else f":width: {int(width)}px\n"
    )  # as wide as the glued figures
    return (
        f"```{{figure}} {static_prefix}/{name}.svg\n:name: {entry['label']}\n{size}\n"
        f"{entry['caption']}\n```"
    )
