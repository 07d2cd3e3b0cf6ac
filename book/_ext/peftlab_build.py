"""A Sphinx extension that tells the chapters' kernels they run inside the book's build.

Jupyter starts each chapter's kernel with this process's environment, so a variable set here reaches the
chapter's code: ``peftlab.book.runtime.in_book_build()`` reads it. In the book a figure is placed once, by the
prose's ``{glue:figure}``; in a Colab twin or a reader's Jupyter it is displayed under the cell that drew it.
"""

from __future__ import annotations

import os
from typing import Any

from peftlab.book.runtime import BOOK_BUILD_ENV


def setup(app: Any) -> dict[str, Any]:
    os.environ[BOOK_BUILD_ENV] = "1"
    return {"parallel_read_safe": True, "parallel_write_safe": True}
