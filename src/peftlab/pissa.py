"""PiSSA: LoRA's factors from the top singular vectors of the weight, the rest as the
frozen base (Meng et al. 2024).

Explained in the chapter *LoRA variants* (book/chapters/variants.md).

With ``W0 = U S Vᵀ``, PiSSA (Meng, Wang and Zhang 2024, §3) starts ``B = U_r √(S_r/s)`` and
``A = √(S_r/s) V_rᵀ`` (``s`` the LoRA scaling) and freezes the *residual* ``W_res = W0 − s·B
A`` as the base: the model starts exactly where it was, but training moves the principal
directions instead of a zero-started update. For QLoRA the residual is then quantized to
NF4 (PEFT's documented recipe, and §5 of the paper): it lacks the largest singular
directions, so it has smaller outliers and quantizes with less error than ``W0``.

The factors, the split of the singular values and the residual follow Hugging Face PEFT's
``init_lora_weights="pissa"`` / ``"pissa_niter_k"`` (``LoraLayer.pissa_init`` in
``peft/tuners/lora/layer.py``) operation for operation, so they are PEFT's bit for bit.
The 4-bit model with PiSSA's start is :func:`peftlab.prepare.prepare_qlora` with
``init="pissa"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from peftlab.checks import positive_int
from peftlab.adapters import check_lora_pairs, lora_layers
from peftlab.lora import LoRALinear, lora_scaling

__all__ = [
    "PiSSAFactors",
    "apply_pissa",
    "apply_pissa_to_layers",
    "check_niter",
    "pissa_init",
]

_PISSA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PiSSAFactors(NamedTuple):
    """PiSSA's start for one weight: the frozen ``residual`` (in the weight's dtype) and the
    trainable ``lora_A`` (r × in) and ``lora_B`` (out × r), float32."""

    residual: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor


def _check_weight(weight: object, r: int) -> torch.Tensor:
    if isinstance(weight, nn.Module):
        raise TypeError(
            f"weight must be a tensor (the layer's .weight), got a {type(weight).__name__}"
        )
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"weight must be a float torch.Tensor (W0: out_features × in_features), "
            f"got {type(weight).__name__}; a 4-bit weight cannot be decomposed, start "
            "from the float model"
        )
    if weight.dtype not in _PISSA_DTYPES:
        # PEFT's restriction too: PiSSA runs on the float weight, before quantization.
        raise TypeError(
            f"weight must be float32, float16 or bfloat16, got {weight.dtype}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if r > min(weight.shape):
        raise ValueError(
            f"r must be at most min(out_features, in_features) = {min(weight.shape)}, "
            f"got {r}: the weight has no more singular directions"
        )
    return weight


def check_niter(niter: object) -> None:
    """ValueError naming ``niter`` unless it is None (the exact SVD) or an int >= 0 (the
    subspace iterations of the randomized SVD)."""
    if niter is not None and (
        isinstance(niter, bool) or not isinstance(niter, int) or niter < 0
    ):
        raise ValueError(f"niter must be None or an int >= 0, got {niter!r}")


def _pissa(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None
) -> PiSSAFactors:
    """PEFT's ``pissa_init`` on one ``nn.Linear`` weight (no ``fan_in_fan_out``), with the
    LoRA ``scaling`` of the layer."""
    if not math.isfinite(scaling) or scaling == 0:
        raise ValueError(
            f"the LoRA scaling must be finite and non-zero (alpha != 0), got {scaling}: "
            "PiSSA divides the singular values by it"
        )
    w = weight.detach().to(
        torch.float32
    )  # PEFT decomposes in float32 whatever the dtype
    if niter is None:
        # W = V S Uᴴ in PEFT's names: V (out × k) the left singular vectors.
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
    else:
        # Randomized (Halko et al. 2011): the global RNG, as in PEFT; seed it to repeat.
        Vr, Sr, Ur = torch.svd_lowrank(w, r, niter=niter)
        Uhr = Ur.t()
    # The scaling is divided out of the singular values, so that s·B A is the rank-r part
    # of W0 whatever alpha is; √ of them goes to each factor (equal norms, as in the paper).
    Sr = Sr / scaling
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))
    # PEFT's expression and order: (s·B) @ A, subtracted in float32, then cast once.
    residual = (w - scaling * lora_B @ lora_A).to(weight.dtype)
    return PiSSAFactors(residual, lora_A, lora_B)


def pissa_init(
    weight: torch.Tensor,
    r: int,
    alpha: float,
    *,
    rslora: bool = False,
    niter: int | None = None,
) -> PiSSAFactors:
    """PiSSA's factors for ``weight`` (out_features × in_features, float32/16/bf16) at rank
    ``r`` with LoRA's ``alpha`` (scaling ``alpha / r``, or ``alpha / √r`` with
    ``rslora``).

    ``niter=None``: the exact SVD (``torch.linalg.svd``, PEFT's ``"pissa"``); an int:
    ``torch.svd_lowrank`` with that many subspace iterations (PEFT's
    ``"pissa_niter_<niter>"``), much faster on large weights, random (global RNG).

    Returns :class:`PiSSAFactors`; ``residual + s · lora_B @ lora_A`` equals ``weight`` up
    to the float32 rounding of the subtraction (and the cast back to a 16-bit dtype).
    """
    r = positive_int(r, "r")
    weight = _check_weight(weight, r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"alpha must be finite and non-zero, got {alpha}")
    check_niter(niter)
    return _pissa(weight, r, lora_scaling(alpha, r, rslora), niter)


def apply_pissa(model: nn.Module, *, niter: int | None = None) -> nn.Module:
    """PiSSA for every :class:`~peftlab.lora.LoRALinear` of ``model`` (in place): its
    factors become PiSSA's and its base weight the residual. Returns ``model``.

    Every layer must have a float ``nn.Linear`` base and be unmerged; this is checked for
    all layers before any is changed. For a 4-bit model use
    :func:`peftlab.prepare.prepare_qlora` with ``init="pissa"``, which decomposes the
    float weight and then quantizes the residual.
    """
    apply_pissa_to_layers(lora_layers(model, required=True), niter=niter)
    return model


@torch.no_grad()
def apply_pissa_to_layers(
    layers: Iterable[tuple[str, LoRALinear]], *, niter: int | None = None
) -> None:
    """:func:`apply_pissa` for the ``(name, layer)`` pairs ``layers`` only, e.g. those
    :func:`peftlab.adapters.add_lora_layers` just added, leaving any other LoRA layer of
    the model alone; the same checks, all before the first layer changes."""
    check_niter(niter)
    layers = check_lora_pairs(layers)
    for name, layer in layers:
        if not isinstance(layer.base, nn.Linear):
            raise ValueError(
                f"layer {name!r} has a {type(layer.base).__name__} base: PiSSA needs the "
                "float weight W0; apply it before quantizing "
                "(peftlab.prepare.prepare_qlora with init='pissa')"
            )
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge() it first")
        _check_weight(layer.base.weight, layer.r)
    for _, layer in layers:
        factors = _pissa(layer.base.weight, layer.r, layer.scaling, niter)
        layer.base.weight.copy_(factors.residual)
        layer.lora_A.copy_(factors.lora_A)  # into the factors' own dtype and device
        layer.lora_B.copy_(factors.lora_B)
