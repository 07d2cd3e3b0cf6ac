"""LoRA+: a larger learning rate for ``lora_B`` than for ``lora_A`` (Hayou et al. 2024).

Explained in the chapter *LoRA variants* (book/chapters/variants.md).

With width ``n`` and both factors at one learning rate, the update of ``B A`` is dominated by
one factor and feature learning is inefficient; LoRA+ (Hayou, Ghosh and Yu 2024, §3) gives
``B`` the rate ``λ · lr`` and ``A`` the rate ``lr``, with ``λ = loraplus_lr_ratio`` (the
paper suggests about 2⁴). Nothing about the model changes, only the optimizer's parameter
groups, which follow Hugging Face PEFT's ``peft.optimizers.create_loraplus_optimizer``
exactly (the same four groups, in the same order, with the same members, learning rates and
weight decays), so that a run crosses between the two.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import nn

__all__ = ["create_loraplus_optimizer", "loraplus_param_groups"]

# PEFT's groups, in the order it hands them to the optimizer.
GROUP_NAMES = ("groupA", "embedding", "groupB", "groupB_no_decay")

# bitsandbytes' 8-bit optimizers, for which PEFT keeps embeddings' states in 32 bits.
_EIGHT_BIT_NAMES = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _real(value: object, name: str, *, positive: bool) -> float:
    """``value`` as a float if it is a finite real number (> 0 with ``positive``, else
    >= 0); the error names ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a real number, got {type(value).__name__} {value!r}"
        )
    bad = value <= 0 if positive else value < 0
    if not math.isfinite(value) or bad:
        raise ValueError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}"
        )
    return float(value)


def _decay_parameter_names(model: nn.Module) -> set[str]:
    """The names transformers' ``get_parameter_names(model, [nn.LayerNorm])`` returns, less
    those containing ``"bias"``: the parameters PEFT lets decay.

    Note: written out rather than imported, so that peftlab's LoRA+ does not need
    transformers. As there, a parameter is left out when any module on its path is an
    ``nn.LayerNorm`` (so LLaMA's RMSNorm weights, not LayerNorms, do decay if trainable),
    and ``"bias"`` is a substring test on the whole name.
    """
    names: set[str] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            if not isinstance(child, nn.LayerNorm):
                walk(child, f"{prefix}{child_name}.")
        names.update(f"{prefix}{k}" for k in module._parameters)

    walk(model, "")
    return {n for n in names if "bias" not in n}


def _peft_embedding_class() -> type | None:
    """PEFT's LoRA ``Embedding`` layer if PEFT is already imported (a PEFT model has
    imported it), else None; never imports PEFT."""
    cls = getattr(sys.modules.get("peft.tuners.lora.layer"), "Embedding", None)
    return cls if isinstance(cls, type) else None


def loraplus_param_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """The trainable parameters of ``model`` by LoRA+ group, name → parameter, in PEFT's
    rule and order (``GROUP_NAMES``).

    - ``"embedding"``: a parameter of a PEFT LoRA ``Embedding`` layer (peftlab's LoRA
      has no embedding layer, so for its models this group is empty, but it is kept so
      that the optimizer's groups line up with PEFT's).
    - ``"groupB"`` / ``"groupB_no_decay"``: a name containing ``"lora_B"``, or any 1-D
      parameter (a trainable bias or norm weight: PEFT gives it B's rate too), split by
      whether it may decay (see :func:`_decay_parameter_names`).
    - ``"groupA"``: everything else (``lora_A`` and any other trainable matrix).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    decay = _decay_parameter_names(model)
    embedding_cls = _peft_embedding_class()
    groups: dict[str, dict[str, nn.Parameter]] = {g: {} for g in GROUP_NAMES}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # PEFT strips the last two parts (a tuner layer keeps its factors in a
        # ModuleDict/ParameterDict: "<layer>.lora_embedding_A.default").
        module_name = ".".join(name.split(".")[:-2])
        module = model.get_submodule(module_name) if module_name else None
        if embedding_cls is not None and isinstance(module, embedding_cls):
            groups["embedding"][name] = param
        elif "lora_B" in name or param.ndim == 1:
            groups["groupB" if name in decay else "groupB_no_decay"][name] = param
        else:
            groups["groupA"][name] = param
    return groups


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float | None = None,
    loraplus_weight_decay: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over ``model``'s trainable parameters with LoRA+'s rates: ``lr``
    for ``lora_A``, ``lr · loraplus_lr_ratio`` for ``lora_B`` (and trainable 1-D
    parameters), ``loraplus_lr_embedding`` for PEFT embedding adapters.

    The four parameter groups are PEFT's (``peft.optimizers.create_loraplus_optimizer``),
    in its order: A (decayed), embedding (decayed), B (decayed), B without decay (biases
    and LayerNorm parameters), empty ones included. ``kwargs`` go to ``optimizer_cls``
    (e.g. ``betas``, ``eps``; ``pool`` for :class:`peftlab.paged.PagedAdamW`).

    ``weight_decay`` (or PEFT's name for it, ``loraplus_weight_decay``; default 0.0) is the
    decay of the decayed groups.
    Note: PEFT also accepts ``weight_decay``, but hands it to the optimizer's defaults,
    which every group then overrides, so there it has no effect; here it is the groups'
    decay. Pass ``loraplus_weight_decay`` for a call that means the same in both.

    Works for peftlab's :class:`peftlab.lora.LoRALinear` (parameters ``lora_A``,
    ``lora_B``) and for PEFT models, with ``torch.optim.AdamW``,
    :class:`peftlab.paged.PagedAdamW` or any optimizer taking parameter groups.

    Raises TypeError/ValueError naming the argument: ``loraplus_lr_ratio`` not a finite
    number > 0, ``lr``, ``loraplus_lr_embedding`` or the weight decay not a finite number
    >= 0, both decay names given with different values; ValueError when the model has no
    trainable LoRA factor (nothing for LoRA+ to act on).
    """
    if not isinstance(optimizer_cls, type) or not issubclass(
        optimizer_cls, torch.optim.Optimizer
    ):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
        )
    lr = _real(lr, "lr", positive=False)
    ratio = _real(loraplus_lr_ratio, "loraplus_lr_ratio", positive=True)
    lr_embedding = _real(loraplus_lr_embedding, "loraplus_lr_embedding", positive=False)
    if (
        weight_decay is not None
        and loraplus_weight_decay is not None
        and weight_decay != loraplus_weight_decay
    ):
        raise ValueError(
            "weight_decay and loraplus_weight_decay name the same setting; got both, "
            f"{weight_decay} and {loraplus_weight_decay}"
        )
    decay_name = "weight_decay" if weight_decay is not None else "loraplus_weight_decay"
    decay_value = weight_decay if weight_decay is not None else loraplus_weight_decay
    decay = (
        0.0 if decay_value is None else _real(decay_value, decay_name, positive=False)
    )

    groups = loraplus_param_groups(model)
    if (
        not groups["embedding"]
        and not any("lora_B" in n for n in groups["groupB"])
        and not any("lora_B" in n for n in groups["groupB_no_decay"])
    ):
        raise ValueError(
            "model has no trainable lora_B (nor PEFT embedding adapter): LoRA+ sets the "
            "factors' learning rates; call peftlab.adapters.add_lora() first"
        )
    param_groups = [
        {"params": list(groups["groupA"].values()), "weight_decay": decay, "lr": lr},
        {
            "params": list(groups["embedding"].values()),
            "weight_decay": decay,
            "lr": lr_embedding,
        },
        {
            "params": list(groups["groupB"].values()),
            "weight_decay": decay,
            "lr": lr * ratio,
        },
        {
            "params": list(groups["groupB_no_decay"].values()),
            "weight_decay": 0.0,
            "lr": lr * ratio,
        },
    ]
    optimizer = optimizer_cls(param_groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT_NAMES:
        # As PEFT does: an embedding's optimizer states stay 32-bit under bitsandbytes'
        # 8-bit optimizers (8-bit states for embeddings are unstable, Dettmers et al. 2022).
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
