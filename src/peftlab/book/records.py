"""Measurements made once on a GPU, kept with their provenance, and rendered by every
build of the book.

The book builds on a CPU, so nothing a GPU measures could otherwise reach it. A chapter's
``# GPU:`` cell measures, plots for the reader who ran it, and calls :func:`save_record`.
When ``bash scripts/gpu-check.sh`` runs the chapters on a CUDA machine it points
:data:`RECORD_DIR_ENV` at the repository's ``results/gpu`` folder, so the records are
committed; every later build reads the latest one back with :func:`load_record` and draws
it in the chapter's *Measured on a GPU* paragraph (:func:`gpu_section`), with the device, CUDA, library versions
and date in the caption (the memory, rank/α, NF4 and paged chapters).

Note: a record is plain JSON (no pickle): a file a reader may receive and open safely.
Note: unlike the recorded CPU studies (:mod:`peftlab.harness.recorded`), a record is not
re-run by every build: a CPU cannot re-run a GPU, and timings and memory peaks are not
bit-reproducible. The build checks its shape and provenance; each GPU check re-measures.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.checks import stable_name
from peftlab.files import atomic_write
from peftlab.book.runtime import book_root, output_dir, versions

__all__ = [
    "RECORD_DIR_ENV",
    "RESULTS_FOLDER",
    "Record",
    "gpu_provenance",
    "gpu_section",
    "load_record",
    "save_record",
]

#: Environment variable naming the folder :func:`save_record` writes to (set by scripts/gpu-check.sh).
RECORD_DIR_ENV = "PEFTLAB_RECORD_DIR"

#: Where the committed GPU records live, relative to the repository root.
RESULTS_FOLDER = Path("results") / "gpu"

_PROVENANCE_KEYS = (
    "device",
    "capability",
    "cuda",
    "torch",
    "bitsandbytes",
    "peftlab",
    "python",
    "date",
)


@dataclass(frozen=True)
class Record:
    """What one GPU cell measured (``data``), and where and when (``provenance``)."""

    name: str
    data: dict[str, Any]
    provenance: dict[str, str]

    @property
    def device(self) -> str:
        """The GPU's name, e.g. ``"NVIDIA H200"``."""
        return self.provenance["device"]

    def caption(self) -> str:
        """One sentence for a figure caption: device, compute capability, CUDA, versions
        and date."""
        p = self.provenance
        libs = [f"peftlab {p['peftlab']}", f"torch {p['torch']}"]
        if p.get("bitsandbytes", "-") != "-":
            libs.append(f"bitsandbytes {p['bitsandbytes']}")
        return (
            f"Measured on {p['device']} (compute capability {p['capability']}, CUDA {p['cuda']}) "
            f"on {p['date']} with {', '.join(libs)}."
        )


def gpu_provenance() -> dict[str, str]:
    """The provenance of a measurement on this machine's first CUDA device (a
    ``RuntimeError`` without one)."""
    if not torch.cuda.is_available():
        raise RuntimeError("a GPU record needs a CUDA device, and torch sees none")
    v = versions()
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "capability": f"{major}.{minor}",
        "cuda": str(torch.version.cuda),
        "torch": v["torch"].split("+")[0],
        "bitsandbytes": v["bitsandbytes"],
        "peftlab": v["peftlab"],
        "python": v["python"],
        "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
    }


def save_record(
    name: str, data: dict[str, Any], *, provenance: dict[str, str] | None = None
) -> Path:
    """Write ``data`` (JSON-serialisable) with its provenance as ``<name>.json``; return
    the file's path.

    The folder is ``$PEFTLAB_RECORD_DIR`` when set (scripts/gpu-check.sh sets it to
    ``results/gpu``, whose records the book renders), else
    :func:`peftlab.book.runtime.output_dir` ``("gpu-records")``, e.g.
    ``./peftlab-output/gpu-records`` on Colab. ``provenance`` defaults to
    :func:`gpu_provenance`; pass one only to write a record measured elsewhere (or a
    synthetic one in a test).
    """
    stable_name(name, "name")
    if not isinstance(data, dict):
        raise TypeError(
            f"data must be a dict of JSON values, got {type(data).__name__}"
        )
    provenance = gpu_provenance() if provenance is None else provenance
    missing = [k for k in _PROVENANCE_KEYS if k not in provenance]
    if missing:
        raise ValueError(
            f"provenance lacks {missing}; it needs {list(_PROVENANCE_KEYS)}"
        )
    try:
        text = json.dumps(
            {"name": name, "provenance": provenance, "data": data},
            indent=1,
            sort_keys=True,
            allow_nan=False,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"data must hold only finite numbers, strings, lists and dicts: {err}"
        ) from None
    env = os.environ.get(RECORD_DIR_ENV)
    folder = Path(env) if env else output_dir("gpu-records")
    folder.mkdir(parents=True, exist_ok=True)
    path = atomic_write(
        folder / f"{name}.json", lambda tmp: Path(tmp).write_text(text + "\n")
    )
    print(f"recorded {name} to {path}")
    return path


def load_record(name: str, folder: str | os.PathLike | None = None) -> Record | None:
    """The record ``<name>.json`` in ``folder``, or None if there is none.

    ``folder`` defaults to ``$PEFTLAB_RECORD_DIR`` when set (so a GPU check reads what it
    just wrote), else the book's ``results/gpu``.

    A file that exists but is not a record raises a ``ValueError`` naming it: a broken
    record must not quietly turn into "nothing measured".
    """
    stable_name(name, "name")
    if folder is None and os.environ.get(RECORD_DIR_ENV):
        folder = os.environ[RECORD_DIR_ENV]
    if folder is None:
        root = book_root()
        if root is None:
            return None
        folder = root / RESULTS_FOLDER
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        record = Record(
            name=raw["name"], data=raw["data"], provenance=raw["provenance"]
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a GPU record (name, data, provenance): {err}"
        ) from None
    missing = [k for k in _PROVENANCE_KEYS if k not in record.provenance]
    if record.name != name or not isinstance(record.data, dict) or missing:
        raise ValueError(
            f"{path} is not a GPU record for {name!r} (provenance lacks {missing})"
        )
    return record


def gpu_section(record: Record | None, body: str = "") -> str:
    """The Markdown of a chapter's *Measured on a GPU* paragraph: one line while no record
    is stored, else a lead-in that says where the record came from, followed by ``body``
    (the figure and the sentences the chapter draws from the record).

    A book built on a CPU has nothing to show there until a GPU has run; one line says so
    and how to fill it, rather than a section that promises a measurement.
    """
    if record is None:
        return (
            "*Measured on a GPU:* no run is stored with this version of the book; "
            "`bash scripts/gpu-check.sh` on a CUDA machine records one, drawn here."
        )
    if not isinstance(body, str):
        raise TypeError(f"body must be Markdown text (str), got {type(body).__name__}")
    return (
        f"**Measured on a GPU.** The {record.device} ran the cell above with "
        "`bash scripts/gpu-check.sh`; its record is stored with the book in `results/gpu/`, "
        "with the device, CUDA and library versions in the caption.\n\n" + body
    )
