"""The book's figure style: a colour-blind-safe palette and matplotlib settings that draw
the same
bytes on every machine. Applied by every chapter's first cell
(``peftlab.book.runtime.start_chapter``) and by :func:`peftlab.book.plotting.new_figure`.
"""

from __future__ import annotations

from typing import Any

import matplotlib

__all__ = ["PALETTE", "use_style"]

#: Okabe & Ito's colour-blind-safe palette (blue, orange, green, vermillion, purple, sky, yellow, black).
PALETTE = [
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
]

_STYLE: dict[str, Any] = {
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    # ships with matplotlib: the same glyphs on every machine
    "font.family": "DejaVu Sans",
    "figure.dpi": 110,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "svg.hashsalt": "peftlab",  # fixed ids in SVG output
    "svg.fonttype": "path",
    "pdf.fonttype": 42,
    "image.cmap": "viridis",
}


def use_style() -> None:
    """Apply the book's style to matplotlib (called by
    :func:`peftlab.book.runtime.start_chapter`)."""
    matplotlib.rcParams.update(_STYLE)
