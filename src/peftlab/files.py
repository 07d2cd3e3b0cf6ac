"""Writing files so that a reader never finds one half-written: temporary files beside
them, then renames.

The one way the package writes to disk: adapters (*LoRA*, book/chapters/lora.md), the
pretrained checkpoint, run caches, figures and GPU records.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_all"]

Writer = Callable[[str], object]


def atomic_write_all(
    writes: Mapping[str | os.PathLike, Writer], *, shared: bool = True
) -> list[Path]:
    """Create or replace each ``path`` with what ``writes[path](tmp)`` writes to a
    temporary file.

    Every file is written (and flushed to disk) under a temporary name in its own folder
    before any is renamed into place, so an error in any writer leaves every target
    untouched and no temporary file behind. The renames are atomic one by one: a crash
    between two of them can pair a new file with an old one, which readers of file pairs
    (adapters, checkpoints) check for. With ``shared`` the files get the ordinary
    permissions of a new file (the umask's), not ``mkstemp``'s owner-only ones.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, write in writes.items():
            path = Path(path)
            fd, tmp = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
            )
            os.close(fd)
            temps.append((tmp, path))
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if shared:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return [path for _, path in temps]


def atomic_write(
    path: str | os.PathLike, write: Writer, *, shared: bool = True
) -> Path:
    """Create or replace ``path`` with what ``write(tmp)`` writes to a temporary file;
    return ``path``.

    ``path`` holds either its old content or the new one, never a part; if ``write``
    raises, ``path`` is untouched (see :func:`atomic_write_all`).
    """
    return atomic_write_all({path: write}, shared=shared)[0]
