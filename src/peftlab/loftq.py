"""LoftQ: quantize the base and start LoRA's factors so that together they approximate the
float weight (Li et al. 2023).

Explained in the chapter *LoRA variants* (book/chapters/variants.md).

QLoRA starts from ``deq(Q) + s·B A`` with ``B = 0``: the 4-bit model is off the float model
by the whole quantization error ``W0 − deq(Q)``. LoftQ (Li et al. 2023, Algorithm 1)
alternates, ``num_iter`` times::

    Q_t          = quantize(W0 − s · B_{t−1} A_{t−1})        (B_0 A_0 = 0)
    s · B_t A_t  = best rank-r approximation of W0 − deq(Q_t)  (truncated SVD)

so that the adapter starts by cancelling the largest directions of the quantization error;
with ``num_iter = 1`` it is QLoRA's own ``Q`` plus the SVD of its error.

Note: the alternation is not a descent method: given ``B A`` the SVD step is optimal, but
NF4's nearest rounding with per-block scales is not the best ``Q`` for the target, so the
error usually falls with ``num_iter`` but may rise a little (on the tiny LLaMA's q_proj at
r = 64: 5 iterations end 0.1 % above 3), and less weight error need not mean less output
error.

Quantization here is peftlab's NF4 (:mod:`peftlab.nf4`, byte-identical to bitsandbytes),
with double quantization by default, so the ``Q`` that LoftQ corrects is the one the
:class:`peftlab.qlora.Linear4bit` base then holds. The loop, the SVD and the split of the
singular values (``√S`` into each factor) follow Hugging Face PEFT's ``loftq_init``
(``peft/utils/loftq_utils.py``), which is what ours equals with ``double_quant=False`` and
``s = 1``. Unlike PEFT, the LoRA scaling ``s`` is divided out of the factors, so that the
*scaled* adapter, the one the layer adds, is the SVD's approximation (PEFT leaves it out:
huggingface/peft#1982; there LoftQ is exact only for ``lora_alpha = r``). The 4-bit model
with LoftQ's start is :func:`peftlab.prepare.prepare_qlora` with ``init="loftq"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn

from peftlab.checks import positive_int
from peftlab.adapters import check_lora_pairs, lora_layers
from peftlab.lora import LoRALinear, lora_scaling
from peftlab.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from peftlab.qlora import Linear4bit

__all__ = [
    "LoftQFactors",
    "apply_loftq",
    "apply_loftq_to_layers",
    "check_num_iter",
    "loftq_init",
    "low_rank_factors",
    "replace_lora_weights_loftq",
]

_LOFTQ_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LoftQFactors(NamedTuple):
    """LoftQ's start for one weight: the NF4 base ``quantized`` and the float32 factors
    ``lora_A`` (r × in) and ``lora_B`` (out × r)."""

    quantized: NF4Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor


def _check_weight(weight: object, name: str = "weight") -> torch.Tensor:
    """``weight`` if it is a float 2-D tensor (W0); TypeError/ValueError naming ``name``."""
    if isinstance(weight, (NF4Tensor, Linear4bit)):
        raise TypeError(
            f"{name} must be the float weight W0, got a 4-bit {type(weight).__name__}: "
            "LoftQ quantizes W0 itself (start from the float model), or use "
            "replace_lora_weights_loftq() with the float weights beside a 4-bit model"
        )
    if isinstance(weight, nn.Module):
        raise TypeError(
            f"{name} must be a tensor (the layer's .weight), got a {type(weight).__name__}"
        )
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{name} must be a float torch.Tensor, got {type(weight).__name__}"
        )
    if weight.dtype not in _LOFTQ_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 (the dtypes NF4 records), "
            f"got {weight.dtype}"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D linear weight (out_features × in_features), "
            f"got shape {tuple(weight.shape)}"
        )
    return weight


def check_num_iter(num_iter: object) -> int:
    """``num_iter`` if it is an int >= 1 (LoftQ's alternations); TypeError/ValueError
    naming it otherwise."""
    if isinstance(num_iter, bool) or not isinstance(num_iter, int):
        raise TypeError(
            f"num_iter must be an int >= 1, got {type(num_iter).__name__} {num_iter!r}"
        )
    if num_iter < 1:
        raise ValueError(f"num_iter must be an int >= 1, got {num_iter}")
    return num_iter


def _check_scaling(scaling: float) -> float:
    if not math.isfinite(scaling) or scaling == 0:
        raise ValueError(
            f"the LoRA scaling must be finite and non-zero (alpha != 0), got {scaling}: "
            "LoftQ divides the singular values by it"
        )
    return scaling


def low_rank_factors(
    residual: torch.Tensor, r: int, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` with ``scaling · lora_B @ lora_A`` the best rank-``r``
    approximation of ``residual`` (float32, 2-D): ``U_r √(S_r/s)`` and ``√(S_r/s) V_rᵀ``.

    PEFT's ``_low_rank_decomposition`` with the scaling divided out: the same
    ``torch.linalg.svd``, the same split (``√`` of the singular values into each factor).
    """
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(S[:r] / scaling)
    # PEFT multiplies by diag(√S) as matrices; scaling the columns (rows) instead gives the
    # very same bits (each entry is one product plus exact zeros) without the k × k matrix.
    lora_B = U[:, :r] * root
    lora_A = root[:, None] * Vh[:r]
    return lora_A, lora_B


def _loftq(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    num_iter: int,
    blocksize: int,
    double_quant: bool,
) -> LoftQFactors:
    w = weight.detach().to(torch.float32)  # as PEFT: the loop runs in float32
    target = w  # what Q is fitted to: W0, then W0 minus the current adapter
    for i in range(num_iter):
        q = quantize_nf4(target, blocksize=blocksize, double_quant=double_quant)
        lora_A, lora_B = low_rank_factors(
            w - dequantize_nf4(q, torch.float32), r, scaling
        )
        if i + 1 < num_iter:  # PEFT's order of operations: W0 − (s·B) A
            target = w - scaling * lora_B @ lora_A
    # The codes are those of the float32 target; the recorded dtype is W0's, so the
    # layer dequantizes to and saves as the model's dtype, as a quantized W0 would.
    return LoftQFactors(replace(q, dtype=weight.dtype), lora_A, lora_B)


def loftq_init(
    weight: torch.Tensor,
    r: int,
    alpha: float,
    *,
    rslora: bool = False,
    num_iter: int = 1,
    blocksize: int = 64,
    double_quant: bool = True,
) -> LoftQFactors:
    """LoftQ for one float ``weight`` (out_features × in_features; float32, float16 or
    bfloat16) at rank ``r`` with LoRA's ``alpha`` (scaling ``s = alpha / r``, or
    ``alpha / √r`` with ``rslora``): ``num_iter`` alternations of NF4 quantization (in
    blocks of ``blocksize``, with ``double_quant``) and a rank-``r`` SVD of the error.

    Returns :class:`LoftQFactors` ``(quantized, lora_A, lora_B)``:
    ``deq(quantized) + s · lora_B @ lora_A`` approximates ``weight``. Build the layer with
    ``LoRALinear(Linear4bit(quantized, bias), r, alpha)`` and copy the factors in, or let
    :func:`apply_loftq` / :func:`peftlab.prepare.prepare_qlora` (``init="loftq"``) do it
    for a model.

    Raises TypeError for a weight that is not a float tensor (a 4-bit weight included:
    LoftQ needs ``W0``), ValueError for a weight that is not 2-D, ``r`` above
    ``min(weight.shape)``, ``num_iter < 1`` or ``alpha`` zero or not finite.
    """
    r = positive_int(r, "r")
    weight = _check_weight(weight)
    if r > min(weight.shape):
        raise ValueError(
            f"r must be at most min(out_features, in_features) = {min(weight.shape)}, got {r}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not isinstance(rslora, bool):
        raise TypeError(f"rslora must be a bool, got {type(rslora).__name__}")
    num_iter = check_num_iter(num_iter)
    scaling = _check_scaling(lora_scaling(alpha, r, rslora))
    return _loftq(weight, r, scaling, num_iter, blocksize, double_quant)


@torch.no_grad()
def apply_loftq_to_layers(
    layers: Iterable[tuple[str, LoRALinear]],
    *,
    num_iter: int = 1,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    kernels: str = "torch",
) -> None:
    """:func:`apply_loftq` for the ``(name, layer)`` pairs ``layers`` only, e.g. those
    :func:`peftlab.adapters.add_lora_layers` just added, leaving any other LoRA layer of
    the model alone; the same arguments and checks, all before the first layer changes."""
    num_iter = check_num_iter(num_iter)
    layers = check_lora_pairs(layers)
    for name, layer in layers:  # every check before the first layer changes
        if isinstance(layer.base, Linear4bit):
            raise ValueError(
                f"layer {name!r} is already 4-bit: LoftQ needs the float weight W0; start "
                "from the float model, or pass the float weights to "
                "replace_lora_weights_loftq()"
            )
        if not isinstance(layer.base, nn.Linear):
            raise ValueError(
                f"layer {name!r} has a {type(layer.base).__name__} base; LoftQ needs an "
                "nn.Linear"
            )
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge() it first")
        _check_weight(layer.base.weight, f"the weight of {name!r}")
        if layer.r > min(layer.base.weight.shape):
            raise ValueError(f"layer {name!r}: r = {layer.r} exceeds its smaller side")
        _check_scaling(layer.scaling)
    for _, layer in layers:
        base = layer.base
        factors = _loftq(
            base.weight, layer.r, layer.scaling, num_iter, blocksize, double_quant
        )
        layer.base = Linear4bit(
            factors.quantized, base.bias, compute_dtype=compute_dtype, kernels=kernels
        )
        layer.lora_A.copy_(factors.lora_A)  # into the factors' own dtype and device
        layer.lora_B.copy_(factors.lora_B)


def apply_loftq(
    model: nn.Module,
    *,
    num_iter: int = 1,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    kernels: str = "torch",
) -> nn.Module:
    """LoftQ for every :class:`~peftlab.lora.LoRALinear` of ``model`` (in place): each float
    base becomes a :class:`~peftlab.qlora.Linear4bit` holding LoftQ's ``Q`` and the factors
    LoftQ's ``A``, ``B`` (with the layer's own ``r`` and scaling). Returns ``model``.

    Every layer must have a float ``nn.Linear`` base and be unmerged, checked for all
    layers before any is changed; a 4-bit base is a ValueError (LoftQ needs ``W0``: see
    :func:`replace_lora_weights_loftq` for a model that is already 4-bit).
    """
    apply_loftq_to_layers(
        lora_layers(model, required=True),
        num_iter=num_iter,
        blocksize=blocksize,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        kernels=kernels,
    )
    return model


@torch.no_grad()
def replace_lora_weights_loftq(
    model: nn.Module, weights: Mapping[str, torch.Tensor]
) -> nn.Module:
    """LoftQ's factors for a model that is already 4-bit (PEFT's
    ``replace_lora_weights_loftq``): for every :class:`~peftlab.lora.LoRALinear` with a
    :class:`~peftlab.qlora.Linear4bit` base, ``A``, ``B`` become the rank-``r`` SVD of
    ``W0 − deq(Q)`` (scaled down by the layer's scaling), ``Q`` left as it is: one LoftQ
    step without re-quantizing. Returns ``model``.

    ``weights`` maps ``"<layer name>.weight"`` (the float model's state-dict keys, e.g.
    from ``safetensors.torch.load_file``) to ``W0``. Raises ValueError, before any layer
    changes, for a layer whose base is not 4-bit (this needs the quantized base), or a
    weight that is missing or of another shape.
    """
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"weights must be a mapping of names to float weights, got {type(weights).__name__}"
        )
    layers = lora_layers(model, required=True)
    work = []
    for name, layer in layers:
        if not isinstance(layer.base, Linear4bit):
            raise ValueError(
                f"layer {name!r} has a {type(layer.base).__name__} base: "
                "replace_lora_weights_loftq needs a 4-bit model "
                "(peftlab.prepare.prepare_qlora); for a float model use apply_loftq"
            )
        key = f"{name}.weight"
        if key not in weights:
            raise ValueError(
                f"weights has no {key!r} (the float weight of layer {name!r})"
            )
        w0 = _check_weight(weights[key], f"weights[{key!r}]")
        if tuple(w0.shape) != tuple(layer.base.weight.shape):
            raise ValueError(
                f"weights[{key!r}] has shape {tuple(w0.shape)}, the layer "
                f"{tuple(layer.base.weight.shape)}"
            )
        _check_scaling(layer.scaling)
        work.append((layer, w0))
    for layer, w0 in work:
        q = layer.base.weight
        residual = w0.detach().to(q.device, torch.float32) - dequantize_nf4(
            q, torch.float32
        )
        lora_A, lora_B = low_rank_factors(residual, layer.r, layer.scaling)
        layer.lora_A.copy_(lora_A)
        layer.lora_B.copy_(lora_B)
    return model
