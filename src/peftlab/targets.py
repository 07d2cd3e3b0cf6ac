"""Which modules an adapter targets, by PEFT's rules: ``target_modules`` as a list of
names, a regex or ``"all-linear"``, less ``exclude_modules``.

Explained in the chapter *LoRA* (book/chapters/lora.md).

A list entry selects every module whose qualified name equals it or ends with ``"." +
entry``; a str is a regex that must match the whole qualified name; ``"all-linear"`` (any
case) is every linear layer but the output head, as PEFT resolves it. :data:`LLAMA_LINEARS`
names the seven linear layers of a LLaMA block. :func:`find_targets` applies the rules to a
model for :func:`peftlab.adapters.add_lora`; :mod:`peftlab.adapter_io` and
:func:`peftlab.qlora.quantize_model` use them too.

Note: a LoRA layer is recognised by its class declaring ``peftlab_lora = True``
(:class:`peftlab.lora.LoRALinear` does), as a linear-like layer is by ``peftlab_linear``:
:mod:`peftlab.lora` and :mod:`peftlab.adapters` import this module, so this one cannot
import them back.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

from torch import nn

__all__ = [
    "ALL_LINEAR",
    "LLAMA_LINEARS",
    "find_targets",
    "is_linear_like",
    "matches_target",
    "modules_outside_lora",
    "normalize_excludes",
    "normalize_targets",
    "resolve_targets",
]

LLAMA_LINEARS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""The seven linear layers of a LLaMA block (attention, then MLP): QLoRA's "all linear
layers", never ``lm_head``."""


ALL_LINEAR = "all-linear"
"""PEFT's shorthand target (any case): every linear layer but the output head."""

# PEFT's SEQ_CLS_HEAD_NAMES (peft.utils.constants): a classifier head left out of
# "all-linear" for task_type "SEQ_CLS" when the model has no output embeddings.
_SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def is_linear_like(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` or a module whose class declares ``peftlab_linear =
    True`` (e.g. 4-bit)."""
    return isinstance(module, nn.Linear) or (
        getattr(type(module), "peftlab_linear", False) is True
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def _is_lora_layer(module: nn.Module) -> bool:
    """True for a LoRA layer: its class declares ``peftlab_lora = True``
    (:class:`peftlab.lora.LoRALinear`, and its subclasses)."""
    return getattr(type(module), "peftlab_lora", False) is True


def normalize_targets(target_modules: object) -> str | list[str]:
    """``target_modules`` checked: a non-empty str (a regex), or non-empty names."""
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules must not be empty")
        return target_modules
    if not isinstance(target_modules, Iterable):
        raise TypeError(
            f"target_modules must be a str or a list of str, got {type(target_modules).__name__}"
        )
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules must not be empty")
    for t in targets:
        if not isinstance(t, str) or not t:
            raise TypeError(f"target_modules must hold non-empty str, got {t!r}")
    return targets


def _transformers_class(module: str, name: str) -> type | None:
    """A transformers class if transformers is already imported (a model built with it
    has imported it), else None; never imports transformers."""
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) else None


def _all_linear_names(model: nn.Module, task_type: str | None = None) -> list[str]:
    """What PEFT's ``"all-linear"`` selects (``_maybe_include_all_linear_layers`` in
    ``peft.tuners.tuners_utils``): the names of every ``nn.Linear`` (4-bit subclasses
    included), transformers ``Conv1D`` and linear-like layer (peftlab's 4-bit layer, a
    LoRALinear but not its children), less the output head.

    Note: as in PEFT, the head is excluded only for a transformers ``PreTrainedModel``: the
    module that ``get_output_embeddings()`` returns, or, when there is none and
    ``task_type`` is ``"SEQ_CLS"``, the first of ``score`` / ``classifier`` the model has.
    """
    conv1d = _transformers_class("transformers.pytorch_utils", "Conv1D")
    linear_classes = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    names = [
        name
        for name, module in modules_outside_lora(model)
        if name
        and (
            isinstance(module, linear_classes)
            or is_linear_like(module)
            or _is_lora_layer(module)
        )
    ]
    pretrained = _transformers_class("transformers.modeling_utils", "PreTrainedModel")
    exclude = set()
    if pretrained is not None and isinstance(model, pretrained):
        head = model.get_output_embeddings()
        if head is None and task_type == "SEQ_CLS":
            head = next(
                (
                    getattr(model, n)
                    for n in _SEQ_CLS_HEAD_NAMES
                    if getattr(model, n, None) is not None
                ),
                None,
            )
        if head is not None:
            exclude |= {name for name, m in model.named_modules() if m is head}
    return [n for n in names if n not in exclude]


def resolve_targets(
    model: nn.Module, target_modules: object, task_type: str | None = None
) -> str | list[str]:
    """``target_modules`` checked, with PEFT's ``"all-linear"`` (any case) replaced by the
    names it selects in ``model`` (see :func:`_all_linear_names`)."""
    targets = normalize_targets(target_modules)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return _all_linear_names(model, task_type)
    return targets


def normalize_excludes(exclude_modules: object) -> str | list[str] | None:
    """``exclude_modules`` checked; None (or empty, as PEFT treats it) for no exclusion."""
    if exclude_modules is None or (
        isinstance(exclude_modules, (str, list, tuple, set)) and not exclude_modules
    ):
        return None
    if isinstance(exclude_modules, str):
        return exclude_modules
    if not isinstance(exclude_modules, Iterable):
        raise TypeError(
            "exclude_modules must be None, a str or a list of str, got "
            f"{type(exclude_modules).__name__}"
        )
    names = list(exclude_modules)
    for t in names:
        if not isinstance(t, str) or not t:
            raise TypeError(f"exclude_modules must hold non-empty str, got {t!r}")
    return names


def matches_target(name: str, targets: str | list[str]) -> bool:
    """Whether the module ``name`` is selected by ``targets`` (PEFT's rule)."""
    # PEFT's rule (check_target_module_exists): a str is a regex that must match the
    # whole name; a list matches a name equal to an entry or ending in "." + entry.
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def modules_outside_lora(model: nn.Module):
    """(name, module) pairs, not descending into LoRA layers such as
    :class:`peftlab.lora.LoRALinear` (their ``base`` is not a target)."""
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        yield name, module
        if _is_lora_layer(module):
            continue
        for child_name, child in reversed(list(module.named_children())):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def find_targets(
    model: nn.Module,
    target_modules: str | Iterable[str],
    task_type: str | None = None,
    *,
    exclude_modules: str | Iterable[str] | None = None,
) -> list[str]:
    """Qualified names of the linear layers of ``model`` that ``target_modules`` selects
    (PEFT's matching; ``"all-linear"``: every linear layer but the output head, as PEFT
    resolves it; ``task_type`` matters only there, as in PEFT).

    ``exclude_modules`` (PEFT's field of that name, matched as a target is) removes names
    from the selection.

    Raises ValueError when nothing matches, or a match is not linear or already has LoRA.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = resolve_targets(model, target_modules, task_type)
    if not targets:
        raise ValueError(
            f"target_modules {target_modules!r} match no module of the model"
        )
    exclude = normalize_excludes(exclude_modules)
    names = []
    for name, module in modules_outside_lora(model):
        if not name or not matches_target(name, targets):
            continue
        if exclude is not None and matches_target(name, exclude):
            continue  # PEFT checks exclude_modules first: an excluded match never errs
        if _is_lora_layer(module):
            raise ValueError(
                f"module {name!r} already has LoRA; merge_lora() or use a fresh model"
            )
        if not is_linear_like(module):
            raise TypeError(
                f"target_modules selects {name!r}, a {type(module).__name__}; only nn.Linear "
                "(or peftlab_linear) layers can get LoRA"
            )
        names.append(name)
    if not names:
        raise ValueError(f"target_modules {targets!r} match no module of the model")
    return names
