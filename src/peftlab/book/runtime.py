"""Where a chapter runs, and what it says about it: device, seeds, provenance, glue,
output folders.

Used by every chapter's first cell (see *Build status*, book/reference/status.md, for what
a build saw).

Note: chapters run in three places — the offline book build, a reader's laptop and Google
Colab — so nothing here needs the build tools: :func:`glue` falls back to a no-op when
myst-nb is not installed.
"""

from __future__ import annotations

import os
import platform
import random
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from peftlab.book.style import use_style
from peftlab.devices import make_deterministic, native_bf16

__all__ = [
    "BOOK_BUILD_ENV",
    "book_root",
    "device",
    "describe_environment",
    "glue",
    "in_book_build",
    "output_dir",
    "provenance",
    "report_gpu_skipped",
    "seed_everything",
    "start_chapter",
    "versions",
]

#: The chapter that is running (set by :func:`start_chapter`); figures and claims are filed under it.
_state: dict[str, Any] = {"chapter": None, "seed": None, "figures": 0}


#: Set to "1" in the book's build (by book/_ext/peftlab_build.py), for the kernels it starts.
BOOK_BUILD_ENV = "PEFTLAB_BOOK_BUILD"


def in_book_build() -> bool:
    """True while the book's own build executes the chapter; False on Colab, in Jupyter or
    a script."""
    return os.environ.get(BOOK_BUILD_ENV) == "1"


def report_gpu_skipped(message: str) -> None:
    """What a ``# GPU:`` cell says when there is no CUDA device: printed in a notebook (Colab,
    Jupyter, a script), where the reader needs to know which part ran; silent in the book's
    own build, whose pages are all built on a CPU (the introduction says so once)."""
    if not isinstance(message, str) or not message:
        raise TypeError(f"message must be a non-empty str, got {message!r}")
    if not in_book_build():
        print(message)


def device() -> torch.device:
    """The device a chapter's GPU cells use: CUDA when present, else the CPU.

    Note: only for cells marked ``# GPU:`` (and switches such as the rank/α chapter's
    ``LARGE``); every other cell, and every function default in the package, runs on the
    CPU unless told otherwise, so the numbers the prose and the claims quote are the CPU's
    wherever the book runs.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """A human name for :func:`device`, e.g. ``"NVIDIA H200"`` or ``"CPU (x86_64)"``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()})"


def versions() -> dict[str, str]:
    """Versions of Python and the libraries the book checks itself against (``"-"`` where
    missing)."""
    out = {"python": platform.python_version()}
    for name in ("peftlab", "torch", "bitsandbytes", "peft", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def provenance(seed: int | None = None) -> str:
    """One sentence saying what produced a result: device, seed and package versions."""
    v = versions()
    seed = _state["seed"] if seed is None else seed
    parts = [f"peftlab {v['peftlab']}", f"torch {v['torch'].split('+')[0]}"]
    if v["bitsandbytes"] != "-":
        parts.append(f"bitsandbytes {v['bitsandbytes']}")
    text = f"Produced on {device_name()} with {', '.join(parts)}"
    if seed is not None:
        text += f", seed {seed}"
    return text + "."


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so two runs of a chapter agree."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    _state["seed"] = seed


def start_chapter(name: str, seed: int = 0) -> None:
    """First call of every chapter: names it (for figures and claims), seeds it, makes
    torch deterministic, applies the plot style, and turns a deprecation raised by the
    book's own package into an error (a chapter must use current names)."""
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"name must be a non-empty str (the chapter's file stem), got {name!r}"
        )
    _state["chapter"] = name
    _state["figures"] = 0
    make_deterministic()
    seed_everything(seed)
    use_style()
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("error", category=category, module="peftlab")


def current_chapter() -> str | None:
    """The name given to :func:`start_chapter`, or None outside a chapter."""
    return _state["chapter"]


def next_figure_index() -> int:
    """0, 1, 2, ... for the figures of the running chapter, in the order they are saved."""
    _state["figures"] += 1
    return _state["figures"] - 1


def chapter_order() -> list[str]:
    """The chapters' file stems in the order of ``_toc.yml`` (empty outside the book)."""
    root = book_root()
    if root is None:
        return []
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    parts = toc.get("parts", [{"chapters": toc.get("chapters", [])}])
    return [
        Path(entry["file"]).name for part in parts for entry in part.get("chapters", [])
    ]


def book_root(start: Path | None = None) -> Path | None:
    """The repository root (the folder with ``_config.yml`` and ``_toc.yml``) above
    ``start``, if any."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_config.yml").is_file() and (folder / "_toc.yml").is_file():
            return folder
    return None


def output_dir(kind: str) -> Path:
    """Where generated material of ``kind`` goes, created if needed.

    Inside the book: figures under ``_static/figures`` (Sphinx copies them into the site)
    and records under ``_build/.peftlab/<kind>``. Elsewhere (Colab, a laptop):
    ``./peftlab-output/<kind>``.
    """
    root = book_root()
    if root is None:
        path = Path.cwd() / "peftlab-output" / kind
    elif kind == "figures":
        path = root / "_static" / "figures"
    else:
        path = root / "_build" / ".peftlab" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def glue(name: str, value: Any, display: bool = False) -> None:
    """Store ``value`` under ``name`` for the prose (``{glue:text}`name:.2f```).

    Uses myst-nb's ``glue`` in the book build; a no-op where myst-nb is missing, so
    chapters run on Colab unchanged.
    """
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return
    _glue(name, value, display=display)


def describe_environment() -> dict[str, str]:
    """Print and return what this run has: Python, torch, bitsandbytes, the device and
    native bf16 support."""
    v = versions()
    info = {
        "python": v["python"],
        "torch": v["torch"],
        "bitsandbytes": v["bitsandbytes"],
        "peftlab": v["peftlab"],
        "device": device_name(),
        # computed natively: sm80+, not the emulation a T4 offers
        "bf16": str(native_bf16()),
    }
    if not torch.cuda.is_available():
        info["note"] = (
            "no CUDA GPU: GPU cells are skipped and say so; the PyTorch path runs everywhere"
        )
    for key, value in info.items():
        print(f"{key:>12}: {value}", file=sys.stdout)
    return info
