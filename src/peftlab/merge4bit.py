"""Merging a LoRA adapter into a 4-bit base: into the dequantized weight, kept in float,
or re-quantized to NF4.

Explained in the chapter *QLoRA with transformers, PEFT and bitsandbytes*
(book/chapters/stack.md), section "Merging a LoRA into a 4-bit model".

A QLoRA model computes ``dequant(W_nf4) x + s B A x``. Merging forms one weight
``dequant(W_nf4) + s B A``. Kept in float, it computes what the unmerged model computes
(to float rounding) but is no longer 4-bit; quantized again to NF4 (what PEFT's
``merge_and_unload`` does on a bitsandbytes model) it stays 4-bit but loses most of the
small update to rounding. ``LoRALinear.merge()`` refuses a 4-bit base: these functions
are the explicit choice.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.adapters import merge_lora
from peftlab.lora import LoRALinear
from peftlab.qlora import Linear4bit

__all__ = ["merged_weight_4bit", "merge_lora_dequantized", "merge_lora_requantized"]


def merged_weight_4bit(layer: LoRALinear) -> torch.Tensor:
    """``dequant(W_nf4) + scaling · B A`` of a :class:`LoRALinear` on a 4-bit base, in
    the base's compute dtype: the weight the unmerged layer multiplies by, formed once.

    Raises TypeError if ``layer`` is not a LoRALinear on a :class:`Linear4bit`,
    ValueError if the sum is not finite.
    """
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"layer must be a LoRALinear, got {type(layer).__name__}")
    if not isinstance(layer.base, Linear4bit):
        raise TypeError(
            "layer.base must be a peftlab.qlora.Linear4bit, got "
            f"{type(layer.base).__name__} "
            "(use peftlab.adapters.merge_lora for nn.Linear)"
        )
    base = layer.base
    with torch.no_grad():
        # The unmerged forward adds the update in float32 at least (LoRALinear.forward);
        # form the sum there, then round once to the compute dtype.
        wide = torch.promote_types(base.compute_dtype, torch.float32)
        weight = base.dequantize(wide) + layer.delta_weight().to(wide)
    if not torch.isfinite(weight).all():
        raise ValueError("merging would put non-finite values into the weight")
    return weight.to(base.compute_dtype)


def _float_linear(layer: LoRALinear) -> nn.Linear:
    base = layer.base
    weight = merged_weight_4bit(layer)
    linear = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=base.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)


def _requantized(layer: LoRALinear) -> Linear4bit:
    base = layer.base
    # The same format as the base: block size and double quantization (blocks of 256
    # for the constants, bitsandbytes' and QLoRA's), compute dtype, kernels.
    return Linear4bit.from_linear(
        _float_linear(layer),
        blocksize=base.weight.blocksize,
        double_quant=base.weight.double_quant,
        compute_dtype=base.compute_dtype,
        kernels=base.kernels,
        workspace=base.workspace,
    )


def _merge_4bit(model: nn.Module, make, name: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, LoRALinear):
        if not isinstance(model.base, Linear4bit):
            raise ValueError(
                f"{name}: model is a LoRALinear on a {type(model.base).__name__}, not on "
                "a Linear4bit; use peftlab.adapters.merge_lora"
            )
        return make(model)
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, LoRALinear) and isinstance(m.base, Linear4bit)
    ]
    if not layers:
        raise ValueError(
            f"{name}: model has no LoRALinear on a Linear4bit base to merge "
            "(peftlab.adapters.merge_lora merges nn.Linear bases)"
        )
    # Every new layer is built before the first is swapped in: a failure leaves the
    # model as it was.
    new = [(n, make(m)) for n, m in layers]
    for n, layer in new:
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    # Adapters on float bases (layers left unquantized) merge as merge_lora does.
    return merge_lora(model)


def merge_lora_dequantized(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer on a 4-bit base by an ``nn.Linear`` holding
    ``dequant(W_nf4) + scaling · B A`` in the base's compute dtype (in place; adapters on
    ``nn.Linear`` bases are merged as :func:`peftlab.adapters.merge_lora` does).

    The merged model computes what the unmerged one does, to float rounding, but its
    weights are no longer 4-bit. Returns ``model`` (the new layer if ``model`` is itself
    a LoRALinear).
    """
    return _merge_4bit(model, _float_linear, "merge_lora_dequantized")


def merge_lora_requantized(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer on a 4-bit base by a :class:`Linear4bit` holding
    ``NF4(dequant(W_nf4) + scaling · B A)``, quantized as the base was (in place; adapters
    on ``nn.Linear`` bases are merged as :func:`peftlab.adapters.merge_lora` does).

    This is what PEFT's ``merge_and_unload`` does on a bitsandbytes 4-bit model: the model
    stays 4-bit, and the part of the update smaller than half an NF4 step rounds away.
    Returns ``model`` (the new layer if ``model`` is itself a LoRALinear).
    """
    return _merge_4bit(model, _requantized, "merge_lora_requantized")
