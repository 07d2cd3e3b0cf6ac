"""Putting LoRA layers into a whole model, finding them, switching them off, merging them
and counting parameters.

Explained in the chapter *LoRA* (book/chapters/lora.md).

The layer itself is :class:`peftlab.lora.LoRALinear`; which modules of a model get one is
:mod:`peftlab.targets` (PEFT's ``target_modules``). Names and behaviour follow Hugging Face
PEFT: :func:`add_lora` is ``get_peft_model``, :func:`disable_adapter` its context of the
same name, :func:`merge_lora` ``merge_and_unload``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from peftlab import dora
from peftlab.lora import LoRALinear, check_lora_hyperparameters
from peftlab.targets import find_targets

__all__ = [
    "ParameterCount",
    "add_lora",
    "add_lora_layers",
    "count_parameters",
    "disable_adapter",
    "lora_layers",
    "merge_lora",
]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_layers(
    model: nn.Module, *, required: bool = False
) -> list[tuple[str, LoRALinear]]:
    """Every :class:`LoRALinear` of ``model`` with its qualified name, in module order.

    ``required``: a model without any is a ValueError (for functions that rewrite the
    adapters, such as PiSSA's and LoftQ's in the chapter *LoRA variants*).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if required and not layers:
        raise ValueError(
            "model has no LoRA layer; call peftlab.adapters.add_lora() first"
        )
    return layers


def check_lora_pairs(layers: Iterable[object]) -> list[tuple[str, LoRALinear]]:
    """``layers`` as a list, checked to be the non-empty ``(name, LoRALinear)`` pairs that
    :func:`add_lora_layers` returns (``TypeError`` or ``ValueError`` otherwise): what the
    adapter initialisations of PiSSA and LoftQ start from."""
    pairs = list(layers)
    if not all(
        isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], LoRALinear)
        for pair in pairs
    ):
        raise TypeError(
            "layers must be (name, LoRALinear) pairs, as "
            "peftlab.adapters.add_lora_layers returns them"
        )
    if not pairs:
        raise ValueError("layers must not be empty: there is no LoRA layer to start")
    return pairs


def add_lora_layers(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
    use_dora: bool = False,
    *,
    exclude_modules: str | Iterable[str] | None = None,
) -> list[tuple[str, LoRALinear]]:
    """:func:`add_lora` (the same arguments), returning the layers it added with their
    names: the ones an initialisation such as PiSSA or LoftQ then rewrites, leaving any
    LoRA layers the model had before alone."""
    check_lora_hyperparameters(r, alpha, dropout, rslora, use_dora)
    names = find_targets(model, target_modules, exclude_modules=exclude_modules)
    if use_dora:
        # every check before the first change to the model
        refused = [
            n for n in names if not dora.has_dense_weight(model.get_submodule(n))
        ]
        if refused:
            kind = type(model.get_submodule(refused[0])).__name__
            raise TypeError(
                f"use_dora=True needs dense base weights; {refused[:3]} ({kind}) are "
                "neither nn.Linear nor have dequantize()"
            )
    model.requires_grad_(False)
    added = []
    for name in names:
        base = model.get_submodule(name)
        layer = LoRALinear(base, r, alpha, dropout, rslora, use_dora)
        _set_submodule(model, name, layer)
        added.append((name, layer))
    return added


def add_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
    use_dora: bool = False,
    *,
    exclude_modules: str | Iterable[str] | None = None,
) -> nn.Module:
    """Wrap every targeted linear layer in a :class:`LoRALinear` and freeze everything
    else (in place).

    ``target_modules``: a list of names, each matching a module whose qualified name
    equals it or ends with ``"." + name``; or one str, a regex that must match the whole
    qualified name (PEFT's rules); or ``"all-linear"``, every linear layer but the output
    head (PEFT's shorthand). ``exclude_modules``: names left out, matched the same way
    (PEFT's field). ``use_dora``: DoRA layers (PEFT's ``use_dora``; see
    :class:`LoRALinear`). Returns ``model`` (:func:`add_lora_layers` returns the new
    layers instead).
    """
    add_lora_layers(
        model,
        target_modules,
        r,
        alpha,
        dropout,
        rslora,
        use_dora,
        exclude_modules=exclude_modules,
    )
    return model


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """A context in which ``model`` computes its base outputs: every :class:`LoRALinear`
    skips its update (PEFT's ``model.disable_adapter()``). Yields ``model``.

    Note: a merged layer is unmerged on entry (PEFT's disabled forward unmerges too) and
    merged again on exit; every layer's state is restored on exit, also after an
    exception. PEFT leaves such a layer unmerged; the outputs agree to rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("model has no LoRA layer to disable; call add_lora() first")
    previous = [(m, m.disabled) for m in layers]
    unmerged = []
    try:
        for m in layers:
            if m.merged:
                m.unmerge()
                unmerged.append(m)
            m.disabled = True
        yield model
    finally:
        for m, disabled in previous:
            m.disabled = disabled
        for m in unmerged:
            m.merge()


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by a plain ``nn.Linear`` holding ``W0 + scaling ·
    B A`` (in place); for a DoRA layer, ``m / ‖W0 + scaling · B A‖ ⊙ (W0 + scaling · B A)``.

    Returns ``model`` (or the new ``nn.Linear`` if ``model`` itself is a LoRALinear).
    Note: the new weight is computed before anything is replaced; a non-finite result
    raises ValueError.
    """
    if isinstance(model, LoRALinear):
        return _merged_linear(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    # all checks before the first replacement
    merged = [(n, _merged_linear(m)) for n, m in layers]
    for name, linear in merged:
        _set_submodule(model, name, linear)
    return model


def _merged_linear(layer: LoRALinear) -> nn.Linear:
    if not isinstance(layer.base, nn.Linear):
        raise ValueError(
            f"cannot merge into a {type(layer.base).__name__} base: dequantize it to an nn.Linear first"
        )
    base = layer.base
    linear = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=base.bias is not None,
        device=base.weight.device,
        dtype=base.weight.dtype,
    )
    with torch.no_grad():
        if layer.merged:
            weight = base.weight.detach().clone()
        else:
            # merge()'s sum, formed in float32 or wider, rounded once to the base's dtype
            weight = layer.merged_weight().to(base.weight.dtype)
        if not torch.isfinite(weight).all():
            raise ValueError(
                "merging would put non-finite values into the weight; model left unchanged"
            )
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    linear.requires_grad_(base.weight.requires_grad)
    return linear


class ParameterCount(NamedTuple):
    """Trainable and total parameters of a model (4-bit layers counted by their logical
    size)."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable: {self.trainable:,} of {self.total:,} parameters ({100 * self.fraction:.4g}%)"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable vs total parameters, each shared parameter once.

    Note: a module that keeps frozen weights packed (e.g. two 4-bit values per byte)
    defines ``extra_parameter_count() -> int``, the logical parameters it holds outside
    nn.Parameters; they are added to ``total``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for p in model.parameters():  # parameters() yields a shared parameter once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for module in model.modules():
        extra = getattr(module, "extra_parameter_count", None)
        if callable(extra):
            total += int(extra())
    return ParameterCount(trainable, total)
