"""The book's figure style and the one way a citable figure leaves a chapter.

Every figure a reader may cite is drawn with :func:`new_figure` and saved with
:func:`save_figure`, which exports it under a stable file name (SVG, PDF, PNG), glues it
for the prose and records it for the *Figures* page (book/reference/figures.md).

Note: the files are byte-for-byte reproducible — no dates or random ids in the metadata, a
fixed SVG hash salt — so two clean builds on the same machine produce identical downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

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
    "PALETTE",
    "FORMATS",
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

#: Resolution of the small PNG the Figures page shows (``_static/figures/thumbnails/<name>.png``).
THUMBNAIL_DPI = 40

#: Where the chapters (book/chapters/*.md) find the exported figures, as a relative link.
FIGURES_FROM_CHAPTER = "../../_static/figures"


# Metadata that would otherwise carry the date or the software build into the files.
_METADATA = {
    "svg": {"Date": None, "Creator": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None},
    "png": {"Software": None},
}


def new_figure(
    ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 3.6, **kwargs: Any
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
        ax.bar_label(bars, labels=[fmt.format(h) for h in heights], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.legend()


def _export(fig: Figure, path: Path, fmt: str, dpi: float | None = None) -> None:
    extra = {} if dpi is None else {"dpi": dpi}
    atomic_write(
        path, lambda tmp: fig.savefig(tmp, format=fmt, metadata=_METADATA[fmt], **extra)
    )


def _show(fig: Figure) -> None:
    """Display ``fig`` as the cell's output in Jupyter or Colab; in the book's build,
    leave it to the glue.

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
    for fmt in FORMATS:
        _export(fig, folder / f"{name}.{fmt}", fmt)
    (folder / "thumbnails").mkdir(exist_ok=True)
    _export(fig, folder / "thumbnails" / f"{name}.png", "png", dpi=THUMBNAIL_DPI)
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
    }
    entries = output_dir("figure-records")
    (entries / f"{name}.json").write_text(json.dumps(entry, indent=1, sort_keys=True))
    _show(fig)
    glue(name, fig, display=False)
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
    rows = ["| | Figure | Caption | Files |", "|---|---|---|---|"]
    for r in records:
        name = r["name"]
        thumb = (
            f'<a href="{static_prefix}/{name}.png"><img src="{static_prefix}/thumbnails/{name}.png" '
            f'alt="Thumbnail of {name}" width="160" loading="lazy"></a>'
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
    return f"```{{figure}} {static_prefix}/{name}.svg\n:name: {entry['label']}\n\n{entry['caption']}\n```"
