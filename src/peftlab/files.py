"""Writing files so that a reader never finds one half-written: temp file beside it, then one rename.

Used by everything in the package that writes to disk (adapters, checkpoints, run caches, figures, records).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, shared: bool = True) -> Path:
    """Create or replace ``path`` with what ``write(tmp)`` writes to a temporary file; return ``path``.

    The temporary file sits in ``path``'s folder, so the final ``os.replace`` is atomic: ``path`` holds
    either its old content or the new one, never a part. If ``write`` raises, the temporary file is removed
    and ``path`` is untouched. With ``shared`` the file gets the ordinary permissions of a new file (the
    umask's), not ``mkstemp``'s owner-only ones: these files are meant to be read by others.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if shared:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
