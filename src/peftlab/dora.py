"""DoRA: the adapted weight split into a trained magnitude and a LoRA-updated direction.

Explained in the chapter *LoRA variants* (book/chapters/variants.md).

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", Eq. 5) writes the
adapted weight as

    W' = m · (W0 + s·B A) / ‖W0 + s·B A‖

where ``s·B A`` is LoRA's update (:class:`peftlab.lora.LoRALinear`), the norm is the L2
norm of each output's weight vector (a row of our out_features × in_features matrix; the
paper's "column-wise" norm, in its in × out convention) and ``m`` (``out_features``
numbers, trained) starts at ``‖W0‖`` so that the layer starts as W0. LoRA learns the
direction, ``m`` the length of each output's weight vector.

The forward never forms W'. With ``g = m / ‖W0 + s·B A‖`` (one number per output),
``W' x = g ⊙ (W0 x + s·B A x) = W0 x + (g − 1) ⊙ W0 x + g ⊙ s·B A x``: the base layer's
output ``W0 x`` is reused and this module computes the rest, ``(g − 1) ⊙ W0 x + g ⊙ s·B
A x`` (:func:`dora_delta`), exactly as Hugging Face PEFT does (``peft.tuners.lora.dora``,
0.21.2), operation by operation, so that a model adapted here and one adapted by PEFT
agree to the last bit.

The norm is detached (the paper's §4.3, and PEFT): backward treats ``‖W0 + s·B A‖`` as a
constant. Its gradient would need the out_features × in_features matrix ``W0 + s·B A``
kept until backward for every adapted layer, the full-size tensor LoRA exists to avoid;
detached, the norm is computed without autograd and only the ``out_features`` ratios
``g`` are kept. The paper finds the accuracy cost of this negligible. ``m`` still gets its
gradient (through ``g``), and so do A and B (through ``s·B A x``).

This module holds the arithmetic only; :class:`peftlab.lora.LoRALinear` (``use_dora=True``)
holds the magnitude and calls it. It imports nothing from peftlab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "dense_weight",
    "dora_delta",
    "dora_merged_weight",
    "dora_unmerged_weight",
    "has_dense_weight",
    "weight_norm",
]


def has_dense_weight(base: nn.Module) -> bool:
    """Whether DoRA can read ``base``'s weight as a dense matrix: an ``nn.Linear``, or a
    layer that can dequantize its packed weight (``dequantize(dtype)``, as
    :class:`peftlab.qlora.Linear4bit` does)."""
    return isinstance(base, nn.Linear) or callable(getattr(base, "dequantize", None))


def dense_weight(base: nn.Module) -> torch.Tensor:
    """``W0`` (out_features × in_features) as a dense tensor: an ``nn.Linear``'s weight, or
    a 4-bit layer's weight dequantized to the dtype it was quantized from.

    Note: DoRA's norm needs every entry of W0, so a 4-bit base is dequantized, as PEFT does
    for bitsandbytes' ``Linear4bit`` (``dequantize_module_weight``: bitsandbytes returns
    its ``quant_state.dtype``, the original dtype; :class:`peftlab.nf4.NF4Tensor` keeps it
    as ``dtype``). The caller casts the result to the factors' dtype, as PEFT does.
    """
    if isinstance(base, nn.Linear):
        return base.weight
    if not has_dense_weight(base):
        raise TypeError(
            f"DoRA needs the base weight as a dense matrix; a {type(base).__name__} is "
            "neither an nn.Linear nor has dequantize()"
        )
    return base.dequantize(getattr(base.weight, "dtype", None))


def _lora_weight(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """``B A`` (out × in) computed the way PEFT's DoRA forward computes it.

    PEFT forms it as ``lora_B(lora_A(I)).T`` (an identity pushed through the two layers,
    for FSDP). ``I Aᵀ`` is exactly ``Aᵀ``, laid out contiguously; multiplying that copy by
    ``Bᵀ`` is then PEFT's very product, at the cost of an r × in copy instead of an in × in
    identity. A plain ``B @ A`` is the same number mathematically but, summed in another
    order by the matmul kernel, differs in the last bit for float64 factors.
    """
    return F.linear(lora_A.t().contiguous(), lora_B).t()


def weight_norm(
    weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``‖W0 + scaling · lora_weight‖``, the L2 norm of each row (one per output).

    PEFT's ``DoraLinearLayer.get_weight_norm``, step for step (the sum, then
    ``torch.linalg.norm``, cast to the sum's dtype), so the numbers are PEFT's.
    """
    summed = weight + scaling * lora_weight
    return torch.linalg.norm(summed, dim=1).to(summed.dtype)


def dora_delta(
    x: torch.Tensor,
    base_result: torch.Tensor | None,
    base: nn.Module,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """What DoRA adds to the base layer's output: ``(g − 1) ⊙ W0 x + g ⊙ s·B A x`` with
    ``g = m / ‖W0 + s·B A‖`` (the norm detached).

    ``x`` is the input already cast to the factors' dtype (and dropped out, if dropout
    is active). ``base_result`` is the base layer's output on the same ``x`` when no
    dropout was applied (its bias is taken off again here), or ``None``, in which case
    ``W0 x`` is computed from the dense weight on the dropped-out ``x``. Both cases are
    PEFT's (``DoraLinearVariant.forward``): with dropout active, W0 x inside DoRA's term
    sees the dropped-out input while the base output outside it does not.

    Note: with dropout active and a 4-bit base, ``F.linear(x, W0)`` keeps the
    dequantized W0 for backward (as PEFT's does), a full-size weight per layer until
    backward; without dropout (or in eval mode) the base output is reused and nothing
    weight-sized is kept.
    """
    # The norm is a constant for autograd (§4.3): computing it under no_grad keeps none
    # of its out × in intermediates alive, the memory saving the paper detaches it for.
    with torch.no_grad():
        lora_weight = _lora_weight(lora_A, lora_B).to(x.dtype)
        weight = dense_weight(base).to(x.dtype)
        norm = weight_norm(weight, lora_weight, scaling)
    mag_norm_scale = (magnitude / norm).view(1, -1)
    lora_result = F.linear(F.linear(x, lora_A), lora_B)
    if base_result is not None:
        bias = getattr(base, "bias", None)
        if bias is not None:
            base_result = base_result - bias
    else:
        base_result = F.linear(x, weight)
    # PEFT's expression and order of operations, so the rounding is the same.
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


def dora_merged_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', norm)``: the merged weight ``m / ‖W0 + ΔW‖ ⊙ (W0 + ΔW)`` (in the wider of the
    two dtypes, not yet rounded to W0's) and the norm it used.

    ``delta`` is ``scaling · B A`` (:meth:`peftlab.lora.LoRALinear.delta_weight`). As in
    PEFT's ``DoraLinearVariant.merge_safe``, the norm is taken with the scaling already in
    ``delta`` (``W0 + 1 · ΔW``). Unmerging needs this very norm: it cannot be recomputed
    from the merged weight, whose rows have the norms ``m``.
    """
    norm = weight_norm(weight, delta, scaling=1)
    dora_factor = (magnitude / norm).view(-1, 1)
    return dora_factor * (weight + delta), norm


def dora_unmerged_weight(
    merged: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
) -> torch.Tensor:
    """W0 back from a merged weight: ``W' / (m / norm) − ΔW`` with the norm the merge used
    (PEFT's ``DoraLinearVariant.unmerge``); not yet rounded to W0's dtype."""
    dora_factor = (magnitude / norm).view(-1, 1)
    return merged / dora_factor - delta
