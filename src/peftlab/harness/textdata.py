"""Byte-level text corpora that every Python installation has offline, and batches drawn
from them.

Explained in the chapter *LoRA rank and alpha* (book/chapters/rank_alpha.md).

Real texts shipped with CPython, so nothing is downloaded:

- **pretraining text**, one of two corpora (:data:`PRETRAINING_CORPORA`):
  ``"help_topics"``, the CPython language reference help topics in
  :mod:`pydoc_data.topics` (English prose with code examples, about 0.45 MB), or
  ``"stdlib"``, those topics plus every standard-library source file outside the test
  suites and :data:`PRETRAINING_EXCLUDED_FILES` (about 12 MB of Python with English
  docstrings);
- **downstream text**: CPython's C headers (``Include/``, installed with every CPython for
  building extensions): a language the pretraining text does not contain, from the same
  project, with its English comments;
- **outside texts** (:func:`outside_text`): English licence texts and third-party Python
  source shipped in ``peftlab/data/held_out/``, of the same kinds as the pretraining text
  but from outside it.

Each corpus is split into train and held-out parts by *whole documents* (groups of topics
that share text, or files), so no held-out paragraph is ever seen in training. Text is
encoded as raw UTF-8 bytes: the vocabulary is the 256 byte values, so there is no
tokenizer to download.

Note: both texts change slightly between Python versions; :func:`corpus_info` records the
version so captions can name it.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256
"""One token per byte value."""

SEPARATOR = b"\n\n"
"""Bytes placed between documents when a corpus is concatenated."""

HELD_OUT_EVERY = 10
"""Pretraining: topic group number ``i`` (groups sorted by first topic name) is held out
when
``i % 10 == 0`` (about 10 % of the bytes); see :func:`topic_groups`."""

SHARED_PARAGRAPH = 60
"""Two topics sharing a paragraph at least this many characters long belong to one group."""

PRETRAINING_EXCLUDED_FILES: tuple[str, ...] = (
    "difflib.py",
    "fractions.py",
    "statistics.py",
    "calendar.py",
    "csv.py",
    "shlex.py",
    "string.py",
    "pprint.py",
    "contextlib.py",
    "random.py",
    "json/decoder.py",
    "json/encoder.py",
    "fnmatch.py",
    "glob.py",
    "copy.py",
    "colorsys.py",
    "sched.py",
    "graphlib.py",
    "base64.py",
    "gettext.py",
    "operator.py",
    "bisect.py",
    "textwrap.py",
    "heapq.py",
    "queue.py",
)
"""Standard-library files (relative to ``Lib/``) left out of the ``"stdlib"`` corpus: an
earlier edition of the book finetuned on them, and the shipped checkpoint was pretrained
without them (its record holds the corpus's hash)."""

DOWNSTREAM_EVERY = 10
"""Downstream split of the C headers, sorted by path: header ``i`` is *validation* when
``i % 10 == 3``, *held out* when ``i % 10 == 7``, else training text."""

_SPLITS = ("train", "held_out")
_DOWNSTREAM_SPLITS = ("train", "validation", "held_out")
_DOWNSTREAM_SLOT = {"validation": 3, "held_out": 7}

PRETRAINING_CORPORA = ("help_topics", "stdlib")
"""Names accepted by :func:`pretraining_text`'s ``corpus``."""

STDLIB_HELD_OUT_EVERY = 20
"""``"stdlib"`` corpus: source file number ``i`` (sorted by path) is held out when
``i % 20 == 0`` (about 5 % of the files)."""

STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages"})
"""Folders of the standard library left out of the ``"stdlib"`` corpus: test suites (large,
repetitive, and not what a user's code looks like) and installed third-party packages."""

OUTSIDE_DIR = Path(__file__).resolve().parents[1] / "data" / "held_out"
"""Texts never trained on, of the kinds the model was trained on (see its SOURCES.md)."""

OUTSIDE_KINDS = ("english", "python")
"""Names accepted by :func:`outside_text`."""


@dataclass(frozen=True)
class CorpusInfo:
    """Where a corpus comes from, for captions and provenance."""

    name: str
    source: str
    python_version: str
    train_bytes: int
    held_out_bytes: int
    train_documents: tuple[str, ...]
    held_out_documents: tuple[str, ...]


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def topic_groups() -> list[list[str]]:
    """The help topics grouped so that no paragraph is shared between groups, sorted by
    first name.

    Note: many topics repeat others verbatim (``customization`` is a section of
    ``specialnames``, ``for`` of ``compound``: about a quarter of the text is repeated).
    Splitting by topic would leak held-out text into training, so the split is by
    connected groups of topics that share a paragraph of at least :data:`SHARED_PARAGRAPH`
    characters.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    first_seen: dict[str, str] = {}
    for name in names:
        for paragraph in topics[name].split("\n\n"):
            if len(paragraph) < SHARED_PARAGRAPH:
                continue
            if paragraph in first_seen:
                parent[root(name)] = root(first_seen[paragraph])
            else:
                first_seen[paragraph] = name
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(root(name), []).append(name)
    return sorted(groups.values(), key=lambda g: g[0])


def _check_corpus(corpus: str) -> None:
    if corpus not in PRETRAINING_CORPORA:
        raise ValueError(f"corpus must be one of {PRETRAINING_CORPORA}, got {corpus!r}")


def _help_topic_documents(split: str) -> list[tuple[str, bytes]]:
    from pydoc_data.topics import topics

    groups = topic_groups()
    held = {n for i, g in enumerate(groups) if i % HELD_OUT_EVERY == 0 for n in g}
    keep = [n for n in sorted(topics) if (n in held) == (split == "held_out")]
    return [(n, topics[n].encode("utf-8")) for n in keep]


def stdlib_sources() -> list[str]:
    """The standard-library ``.py`` files of the ``"stdlib"`` corpus, relative to ``Lib/``
    and sorted: all but those under :data:`STDLIB_EXCLUDED_DIRS` and
    :data:`PRETRAINING_EXCLUDED_FILES`."""
    root = _stdlib_dir()
    downstream = set(PRETRAINING_EXCLUDED_FILES)
    found = []
    for folder, dirs, files in os.walk(root):
        # pruned while walking, not filtered after: site-packages alone can hold ten times
        # the files of the standard library, and listing them took minutes on a busy disk
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        here = Path(folder).relative_to(root)
        found += [
            rel
            for rel in (
                (here / name).as_posix() for name in files if name.endswith(".py")
            )
            if rel not in downstream
        ]
    return sorted(found)


def _pretraining_documents(
    split: str, corpus: str = "stdlib"
) -> list[tuple[str, bytes]]:
    _check_corpus(corpus)
    docs = _help_topic_documents(split)
    if corpus == "stdlib":
        root = _stdlib_dir()
        files = [
            rel
            for i, rel in enumerate(stdlib_sources())
            if (i % STDLIB_HELD_OUT_EVERY == 0) == (split == "held_out")
        ]
        docs += [(rel, (root / rel).read_bytes()) for rel in files]
    return docs


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _include_dir() -> Path:
    return Path(sysconfig.get_paths()["include"])


def downstream_headers() -> list[str]:
    """CPython's C headers, relative to its include folder and sorted: the downstream
    corpus (``FileNotFoundError`` where they are not installed)."""
    root = _include_dir()
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.h"))
    if not found:
        raise FileNotFoundError(
            f"CPython's C headers (the downstream text) not found in {root}; install "
            "Python's development headers (on Debian: python3-dev)"
        )
    return found


def _downstream_split(index: int) -> str:
    slot = index % DOWNSTREAM_EVERY
    return next((s for s, n in _DOWNSTREAM_SLOT.items() if n == slot), "train")


def downstream_files(split: str) -> list[str]:
    """The headers of one downstream split (``"train"``, ``"validation"``, ``"held_out"``):
    see :data:`DOWNSTREAM_EVERY`."""
    if split not in _DOWNSTREAM_SPLITS:
        raise ValueError(f"split must be one of {_DOWNSTREAM_SPLITS}, got {split!r}")
    headers = downstream_headers()
    return [r for i, r in enumerate(headers) if _downstream_split(i) == split]


def _downstream_documents(split: str) -> list[tuple[str, bytes]]:
    root = _include_dir()
    return [(rel, (root / rel).read_bytes()) for rel in downstream_files(split)]


def _join(docs: list[tuple[str, bytes]]) -> torch.Tensor:
    data = SEPARATOR.join(text for _, text in docs)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def pretraining_text(split: str = "train", corpus: str = "stdlib") -> torch.Tensor:
    """A pretraining corpus (:data:`PRETRAINING_CORPORA`) as a 1-D uint8 tensor of UTF-8
    bytes.

    ``split`` is ``"train"`` or ``"held_out"``; held-out topics and files are never in
    ``"train"``.
    """
    _check_split(split)
    return _join(_pretraining_documents(split, corpus))


def outside_text(kind: str) -> torch.Tensor:
    """Held-out text from outside every pretraining corpus, as a 1-D uint8 tensor:
    ``"english"`` (two licence texts) or ``"python"`` (three third-party modules).

    The files ship in ``peftlab/data/held_out/``; their SOURCES.md names origin and
    licence.
    """
    if kind not in OUTSIDE_KINDS:
        raise ValueError(f"kind must be one of {OUTSIDE_KINDS}, got {kind!r}")
    files = sorted(OUTSIDE_DIR.glob(f"{kind}_*.txt"))
    if not files:
        raise FileNotFoundError(
            f"no {kind} texts in {OUTSIDE_DIR} (package data missing)"
        )
    return _join([(f.name, f.read_bytes()) for f in files])


def downstream_text(split: str = "train", max_bytes: int | None = None) -> torch.Tensor:
    """CPython's C headers as a 1-D uint8 tensor of bytes (the downstream task).

    ``split`` is ``"train"``, ``"validation"`` (for choosing settings) or ``"held_out"``
    (the test text, reported but never used to choose). ``max_bytes`` keeps only the
    first bytes of the split: a small downstream set for the overfitting experiment.
    """
    if split not in _DOWNSTREAM_SPLITS:
        raise ValueError(f"split must be one of {_DOWNSTREAM_SPLITS}, got {split!r}")
    data = _join(_downstream_documents(split))
    if max_bytes is not None:
        if (
            not isinstance(max_bytes, int)
            or isinstance(max_bytes, bool)
            or max_bytes < 2
        ):
            raise ValueError(
                f"max_bytes must be an int >= 2 or None, got {max_bytes!r}"
            )
        data = data[:max_bytes]
    return data


def corpus_info(name: str, corpus: str = "stdlib") -> CorpusInfo:
    """Provenance of ``"pretraining"`` (the given ``corpus``) or ``"downstream"``: source,
    Python version, sizes, documents."""
    if name == "pretraining":
        _check_corpus(corpus)
        fetch = lambda split: _pretraining_documents(split, corpus)  # noqa: E731
        source = {
            "help_topics": "CPython help topics (pydoc_data.topics)",
            "stdlib": "CPython help topics and standard-library source files",
        }[corpus]
    elif name == "downstream":
        fetch, source = _downstream_documents, "CPython's C headers (Include/)"
    else:
        raise ValueError(f"name must be 'pretraining' or 'downstream', got {name!r}")
    train, held = fetch("train"), fetch("held_out")
    size = lambda docs: len(SEPARATOR.join(t for _, t in docs))  # noqa: E731
    return CorpusInfo(
        name=name,
        source=source,
        python_version=".".join(map(str, sys.version_info[:3])),
        train_bytes=size(train),
        held_out_bytes=size(held),
        train_documents=tuple(n for n, _ in train),
        held_out_documents=tuple(n for n, _ in held),
    )


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a 1-D int64 tensor of token ids (0..255)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Inverse of :func:`encode`; invalid UTF-8 (a model may emit it) becomes U+FFFD."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if any(not 0 <= v < VOCAB_SIZE for v in values):
        raise ValueError("ids must all be byte values in [0, 255]")
    return bytes(values).decode("utf-8", errors="replace")


def _check_data(data: torch.Tensor, seq_len: int) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise TypeError(
            "data must be a 1-D tensor of byte values (see pretraining_text)"
        )
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if data.numel() < seq_len + 1:
        raise ValueError(
            f"data has {data.numel()} bytes; seq_len={seq_len} needs at least {seq_len + 1}"
        )


def random_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows at random offsets: inputs ``x`` and next-byte targets ``y``
    (int64).

    ``x[b] = data[i : i + seq_len]`` and ``y[b] = data[i + 1 : i + seq_len + 1]``. The
    offsets come from ``generator`` only, so a seeded generator gives the same batches on
    every machine.
    """
    _check_data(data, seq_len)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator (seed it for reproducible batches)"
        )
    starts = torch.randint(
        0, data.numel() - seq_len, (batch_size,), generator=generator
    )
    idx = starts[:, None] + torch.arange(seq_len + 1)
    windows = data[idx].long()
    return windows[:, :-1], windows[:, 1:]


def eval_batches(
    data: torch.Tensor, batch_size: int, seq_len: int, max_windows: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows from the start of ``data``, grouped into batches, for
    held-out loss.

    Deterministic (no randomness). ``max_windows`` caps the number of windows, to keep
    evaluation cheap; ``None`` uses the whole text.

    Note: every target byte is predicted from at most ``seq_len`` bytes of context, and
    the first bytes of each window from very little, so the loss is a little higher than
    with a sliding window.
    """
    _check_data(data, seq_len)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = (data.numel() - 1) // seq_len
    if max_windows is not None:
        if not isinstance(max_windows, int) or max_windows < 1:
            raise ValueError(
                f"max_windows must be a positive int or None, got {max_windows!r}"
            )
        n = min(n, max_windows)
    x = data[: n * seq_len].long().view(n, seq_len)
    y = data[1 : n * seq_len + 1].long().view(n, seq_len)
    return [
        (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)
    ]


def spaced_windows(
    data: torch.Tensor, n_windows: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_windows`` windows spread evenly over the whole of ``data``: inputs ``x``,
    targets ``y``.

    A cheap, deterministic sample of a text for repeated evaluation during training.

    Note: evenly spaced rather than the first windows, so a short evaluation still covers
    every document of the split instead of only the first one.
    """
    _check_data(data, seq_len)
    if not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive int, got {n_windows!r}")
    last = data.numel() - seq_len - 1
    starts = torch.linspace(0, last, n_windows).round().long()
    idx = starts[:, None] + torch.arange(seq_len + 1)
    windows = data[idx].long()
    return windows[:, :-1], windows[:, 1:]
