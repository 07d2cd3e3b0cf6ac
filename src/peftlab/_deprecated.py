"""Old names kept working for one release, each with a ``DeprecationWarning`` that names
its new home.

Modules moved when the package was split into science, harness (:mod:`peftlab.harness`)
and the book's machinery (:mod:`peftlab.book`); a few functions were renamed so that each
name has one meaning. Nothing here is used by the package itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

#: Old module path -> new module path.
MOVED_MODULES = {
    "peftlab.runtime": "peftlab.book.runtime",
    "peftlab.plotting": "peftlab.book.plotting",
    "peftlab.claims": "peftlab.book.claims",
    "peftlab.pretrained": "peftlab.harness.pretrained",
    "peftlab.textdata": "peftlab.harness.textdata",
    "peftlab.experiments": "peftlab.harness.experiments",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated and will be removed; use {new}",
        DeprecationWarning,
        stacklevel=3,
    )


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: Any) -> Any:
        _warn(spec.name, self.new)
        # the module itself: one state, one set of functions
        return importlib.import_module(self.new)

    def exec_module(self, module: Any) -> None:
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name in MOVED_MODULES:
            return importlib.util.spec_from_loader(
                name, _MovedModuleLoader(MOVED_MODULES[name])
            )
        return None


def install_module_aliases() -> None:
    """Let ``import peftlab.runtime`` (and the other old paths) import the moved module,
    with a warning."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def renamed(
    module: str, names: dict[str, str | Callable[..., Any]]
) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module`` that serves each old name with a
    warning.

    ``names`` maps an old name to ``"new.module.name"`` (imported when first asked for) or
    to a function that adapts an old signature.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new = names[name]
        if callable(new):
            _warn(
                f"{module}.{name}",
                f"{new.__module__}.{new.__name__}".replace("._deprecated.", "."),
            )
            return new
        _warn(f"{module}.{name}", new)
        owner, _, attr = new.rpartition(".")
        return getattr(importlib.import_module(owner), attr)

    return __getattr__


def keyword(old: str, old_value: Any, new: str, new_value: Any) -> Any:
    """The value of a renamed keyword argument: the old one's, with a warning, when a
    caller still passes it."""
    if old_value is None:
        return new_value
    _warn(f"the keyword {old}=", f"{new}=")
    return old_value


def qlora_finetune(
    method: str,
    *,
    progress: bool = True,
    device: Any = "cpu",
    lr: float | None = None,
    dropout: float = 0.1,
    **settings: Any,
) -> dict[str, Any]:
    """``peftlab.qlora.finetune(method, ...)``: now
    ``experiments.finetune(experiments.qlora_recipe(...))``."""
    experiments = importlib.import_module("peftlab.harness.experiments")
    if lr is not None:
        settings["lr"] = lr
    config = experiments.qlora_recipe(
        method, device=str(device), dropout=dropout, **settings
    )
    return experiments.finetune(config, progress=progress)


qlora_finetune.__module__, qlora_finetune.__name__ = (
    "peftlab.harness.experiments",
    "finetune(qlora_recipe(...))",
)


def quantize_blockwise_8bit(
    A: Any, blocksize: int = 256, code: Any = None, *, shift: Any = None
) -> Any:
    """``peftlab.double_quant.quantize_blockwise(A, blocksize, code)``: now
    ``quantize_8bit(A, code, blocksize)``."""
    return importlib.import_module("peftlab.double_quant").quantize_8bit(
        A, code, blocksize, shift=shift
    )


def dequantize_blockwise_8bit(
    codes: Any, absmax: Any, blocksize: int = 256, code: Any = None, dtype: Any = None
) -> Any:
    """``peftlab.double_quant.dequantize_blockwise(codes, absmax, blocksize, code,
    dtype)``: now ``dequantize_8bit``
    with ``code`` before ``blocksize``."""
    import torch

    module = importlib.import_module("peftlab.double_quant")
    return module.dequantize_8bit(
        codes, absmax, code, blocksize, torch.float32 if dtype is None else dtype
    )


for _f, _new in (
    (quantize_blockwise_8bit, "quantize_8bit"),
    (dequantize_blockwise_8bit, "dequantize_8bit"),
):
    _f.__module__, _f.__name__ = "peftlab.double_quant", _new
