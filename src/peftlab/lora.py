"""LoRA: a frozen linear layer plus a trainable low-rank update, its gradients and
merging.

Explained in the chapter *LoRA* (book/chapters/lora.md).

The layer computes ``y = W0 x + scaling · B A x`` (Hu et al. 2021, §4.1) with ``lora_A``
(r × in_features) and ``lora_B`` (out_features × r); ``scaling`` is ``alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023). Parameter names, initialisation,
forward and merge follow Hugging Face PEFT, so that adapters cross between the two (see
:mod:`peftlab.adapter_io`). With ``use_dora=True`` the layer is DoRA (Liu et al. 2024): a
trained magnitude per output on top of the LoRA-updated direction; its arithmetic is
:mod:`peftlab.dora` (the chapter *LoRA variants*, book/chapters/variants.md). Which layers
of a model get one is :mod:`peftlab.targets` (PEFT's ``target_modules``); putting layers
into a model, merging and counting them there is :mod:`peftlab.adapters`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftlab import dora
from peftlab.targets import is_linear_like

__all__ = [
    "LoRAFunction",
    "LoRALinear",
    "check_lora_hyperparameters",
    "lora_scaling",
]


def check_lora_hyperparameters(
    r: object, alpha: object, dropout: object, rslora: object, use_dora: object = False
) -> None:
    """TypeError/ValueError naming the first bad LoRA setting; for callers that must check
    them before changing a model (:func:`peftlab.prepare.prepare_qlora` quantizes
    first)."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be a positive int, got {type(r).__name__} {r!r}")
    if r <= 0:
        raise ValueError(f"r must be a positive int, got {r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(
            f"alpha must be a finite real number, got {type(alpha).__name__} {alpha!r}"
        )
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite real number, got {alpha}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(
            f"dropout must be a float in [0, 1), got {type(dropout).__name__} {dropout!r}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout}")
    if not isinstance(rslora, bool):
        raise TypeError(
            f"rslora must be a bool, got {type(rslora).__name__} {rslora!r}"
        )
    if not isinstance(use_dora, bool):
        raise TypeError(
            f"use_dora must be a bool, got {type(use_dora).__name__} {use_dora!r}"
        )


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """The factor on ``B A``: LoRA's ``alpha / r`` (Hu et al. 2021, §4.1), or rsLoRA's
    ``alpha / sqrt(r)``
    (Kalajdzievski 2023), which keeps the update's size from shrinking as ``r`` grows."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRAFunction(torch.autograd.Function):
    """``scaling · x Aᵀ Bᵀ`` with a backward written from the notes' formulas.

    With tokens as rows (``x``: tokens × in_features, ``g_y``: tokens × out_features)
    and ``g_ΔW = g_yᵀ x``, the notes give ``g_B = s · g_ΔW Aᵀ`` and
    ``g_A = s · Bᵀ g_ΔW``. Both are evaluated right to left, ``g_B = s · g_yᵀ (x Aᵀ)``
    and ``g_A = s · (g_y B)ᵀ x``, which is the same product by associativity.

    Note: ``g_ΔW`` itself is never formed: it is out_features × in_features, the
    full-size gradient LoRA exists to avoid. Every intermediate here has r columns.

    Note: the scaling is applied to the (tokens × r) intermediates, never to a (tokens ×
    out_features) tensor, which is cheaper than scaling the output as PEFT does; results
    agree to rounding.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        u = (x2 @ lora_A.t()) * scaling  # tokens × r, already scaled
        ctx.save_for_backward(x2, lora_A, lora_B, u)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return (u @ lora_B.t()).reshape(*x.shape[:-1], lora_B.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2, lora_A, lora_B, u = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # tokens × out
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[0]:
            h = (g @ lora_B) * ctx.scaling  # tokens × r: s · g_y B
            if ctx.needs_input_grad[1]:
                grad_A = h.t() @ x2  # s · Bᵀ g_ΔW
            if ctx.needs_input_grad[0]:
                grad_x = (h @ lora_A).reshape(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_B = g.t() @ u  # s · g_ΔW Aᵀ
        return grad_x, grad_A, grad_B, None


def _factor_device_dtype(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where LoRA's factors live and in which dtype, for a base layer.

    The device is the base weight's: an ``nn.Linear``'s tensor, or a packed weight that is
    not a ``torch.Tensor`` but has a ``.device`` (:class:`peftlab.nf4.NF4Tensor`);
    ``meta`` included (a base without ``weight``: its first parameter or buffer). The
    dtype is the weight's when it is float32 or float64, else float32 (16-bit and packed
    bases: PEFT's ``autocast_adapter_dtype``), whatever the 4-bit layer's compute dtype.
    """
    weight = getattr(base, "weight", None)
    device = getattr(weight, "device", None)
    if not isinstance(
        device, torch.device
    ):  # no weight attribute: the module's first tensor, else the CPU
        first = next(iter([*base.parameters(), *base.buffers()]), None)
        device = first.device if first is not None else torch.device("cpu")
    if isinstance(weight, torch.Tensor) and weight.dtype in (
        torch.float32,
        torch.float64,
    ):
        return device, weight.dtype
    return device, torch.float32


class LoRALinear(nn.Module):
    """A frozen linear layer ``base`` plus the trainable update ``scaling · lora_B @
    lora_A``.

    ``base`` is an ``nn.Linear`` or a module whose class sets ``peftlab_linear = True``
    (the 4-bit layer of the QLoRA chapter). ``lora_A`` starts Kaiming-uniform (a=√5) and
    ``lora_B`` at zero, as in PEFT and loralib, so the wrapped layer first computes
    exactly what ``base`` computes.

    Note: the factors are float32 when the base weight is float16/bfloat16 or packed
    (PEFT's ``autocast_adapter_dtype``): small updates to low-precision factors would
    round away. The LoRA path runs in the factors' dtype; the output is cast back to the
    input's dtype.

    Note: the factors are created on the base weight's device (CUDA, CPU or ``meta``),
    also for a 4-bit base; ``lora_A`` is drawn from the CPU generator and then moved, so a
    seed gives the same ``lora_A`` on any device.

    Note: merging is explicit (``merge()`` / ``unmerge()``), never a side effect of
    ``eval()``.

    With ``use_dora=True`` the layer is DoRA (the chapter *LoRA variants*,
    book/chapters/variants.md; the arithmetic is :mod:`peftlab.dora`): a trainable
    ``lora_magnitude_vector`` (out_features, in the factors' dtype) starts at the row norms
    of ``W0 + scaling · B A`` (= ‖W0‖, B being zero), and forward computes
    ``m / ‖W0 + scaling · B A‖ ⊙ (W0 + scaling · B A) x + b`` as PEFT does, the norm
    detached from autograd (the paper's §4.3). ``merge()`` writes that weight into the
    base. A 4-bit base (:class:`peftlab.qlora.Linear4bit`) is dequantized for the norm, as
    PEFT does for bitsandbytes' ``Linear4bit``; merging into it stays refused.

    Note: PEFT computes the initial magnitude in the base's dtype before it upcasts the
    adapter to float32, so for a float16/bfloat16 base its magnitude is the norm rounded
    to 16 bits, and its DoRA layer does not start exactly at the base output. Here the
    norm is computed in the factors' dtype (float32), from the same dense weight forward
    uses: the layer starts at the base output exactly, for every base dtype.
    """

    # How peftlab.targets, which this module imports, tells a LoRA layer from its base
    # without importing this module back.
    peftlab_lora = True

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        use_dora: bool = False,
    ):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(
                "base must be an nn.Linear or a module whose class sets peftlab_linear = True, "
                f"got {type(base).__name__}"
            )
        check_lora_hyperparameters(r, alpha, dropout, rslora, use_dora)
        if use_dora and not dora.has_dense_weight(base):
            raise TypeError(
                f"use_dora=True needs the base weight as a dense matrix for its norm; a "
                f"{type(base).__name__} is neither an nn.Linear nor has dequantize()"
            )
        self.base = base
        self.base.requires_grad_(False)
        self.r = r
        self.alpha = alpha
        self.rslora = rslora
        # Note: rsLoRA's alpha/sqrt(r) keeps the update's size independent of r
        # (Kalajdzievski 2023).
        self.scaling = lora_scaling(alpha, r, rslora)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        device, dtype = _factor_device_dtype(base)
        # A is drawn on the CPU (the CPU generator) and then moved, so a seed gives the
        # same A on every device.
        lora_A = torch.empty(r, self.in_features, dtype=dtype)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        self.lora_A = nn.Parameter(lora_A.to(device))
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, r, dtype=dtype, device=device)
        )
        self.merged = False
        # Set by disable_adapter(): forward is the base layer's alone.
        self.disabled = False
        self.use_dora = use_dora
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:
            with torch.no_grad():
                # PEFT's init: the row norms of W0 + scaling · B A, read from the same
                # dense weight (cast to the factors' dtype) that forward's norm reads, so
                # that m / norm is exactly 1 and the layer starts at the base output.
                weight = dora.dense_weight(base).to(device=device, dtype=dtype)
                magnitude = dora.weight_norm(
                    weight, self.lora_B @ self.lora_A, self.scaling
                )
            self.lora_magnitude_vector = nn.Parameter(magnitude)
            # W0's row norms at the last merge(): unmerge() needs them (the merged weight's
            # rows have the norms m instead). Not saved: a merged layer is not saved.
            self.register_buffer("dora_merge_norm", None, persistent=False)

    @property
    def weight(self):
        """The base layer's weight (PEFT's LoRA layer exposes its base's ``weight``)."""
        return self.base.weight

    @property
    def bias(self):
        """The base layer's bias (``None`` when it has none), as in PEFT."""
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` (out_features × in_features), computed in at least float32."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or self.disabled:
            return result
        if self.use_dora:
            return self._dora_forward(x, result)
        x_lora = self.dropout(x).to(self.lora_A.dtype)
        delta = LoRAFunction.apply(x_lora, self.lora_A, self.lora_B, self.scaling)
        # Note: add in the wider dtype, then round once (as PEFT does).
        return (result + delta).to(x.dtype)

    def _dora_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # PEFT's order: cast to the factors' dtype, then dropout (the mask is drawn on
        # the cast tensor, as PEFT's is).
        x_lora = x.to(self.lora_A.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_result = result  # reused: W0 x is the base output less its bias
        else:
            # PEFT's DoRA with active dropout: W0 x inside DoRA's term is recomputed on
            # the dropped-out input (the base output outside it keeps the full input).
            x_lora = self.dropout(x_lora)
            base_result = None
        delta = dora.dora_delta(
            x_lora,
            base_result,
            self.base,
            self.lora_A,
            self.lora_B,
            self.lora_magnitude_vector,
            self.scaling,
        )
        return (result + delta).to(x.dtype)

    def _merge_base_weight(self, sign: float, action: str) -> None:
        if not isinstance(self.base, nn.Linear):
            raise ValueError(
                f"cannot {action} into a {type(self.base).__name__} base: "
                "dequantize it to an nn.Linear first"
            )
        weight = self.base.weight
        with torch.no_grad():
            dtype = torch.promote_types(weight.dtype, torch.float32)
            norm = None
            if not self.use_dora:
                new = (weight.to(dtype) + sign * self.delta_weight().to(dtype)).to(
                    weight.dtype
                )
            elif sign > 0:
                new, norm = self._dora_merged(weight.to(dtype))
                new = new.to(weight.dtype)
            else:
                new = dora.dora_unmerged_weight(
                    weight.to(dtype),
                    self.delta_weight().to(dtype),
                    self.lora_magnitude_vector,
                    self.dora_merge_norm,
                ).to(weight.dtype)
            if not torch.isfinite(new).all():
                raise ValueError(
                    f"{action} would put non-finite values into the base weight; "
                    "left unchanged"
                )
            weight.copy_(new)
            if self.use_dora:
                self.dora_merge_norm = norm  # kept for unmerge(), dropped by it

    def merged_weight(self) -> torch.Tensor:
        """The weight ``merge()`` would write, as a new float32-or-wider tensor, without
        writing it: ``W0 + ΔW``, or DoRA's ``m / ‖W0 + ΔW‖ ⊙ (W0 + ΔW)``. For analyses
        of what training changed, such as the DoRA paper's magnitude and direction (the
        chapter *LoRA variants*)."""
        if self.merged:
            raise ValueError(
                "this LoRALinear is merged: its base weight is the merged one"
            )
        with torch.no_grad():
            weight = dora.dense_weight(self.base)
            weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
            if self.use_dora:
                return self._dora_merged(weight)[0]
            return weight + self.delta_weight().to(weight.dtype)

    def _dora_merged(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DoRA's merged weight (unrounded) and norm from W0 in a float32-or-wider dtype."""
        return dora.dora_merged_weight(
            weight, self.delta_weight().to(weight.dtype), self.lora_magnitude_vector
        )

    def merge(self) -> None:
        """Add ``scaling · B A`` into the base weight, so that forward is one plain linear
        layer.

        Note: the sum is formed in float32 (float64 for float64 weights) and checked for
        non-finite values before anything is written. ``unmerge()`` restores W0 to within
        one rounding of the merged weight.

        With DoRA the base weight becomes ``m / ‖W0 + ΔW‖ ⊙ (W0 + ΔW)`` (PEFT's merge), and
        the norm is kept for ``unmerge()``, which divides by ``m / norm`` and subtracts
        ``ΔW`` (PEFT's unmerge): W0 comes back to within a rounding or two of the merged
        weight's entries.
        """
        if self.merged:
            raise ValueError("this LoRALinear is already merged; call unmerge() first")
        if self.disabled:
            raise ValueError(
                "cannot merge inside disable_adapter(); leave the context first"
            )
        self._merge_base_weight(+1.0, "merge")
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ``scaling · B A`` from the base weight again (the inverse of
        ``merge()``)."""
        if not self.merged:
            raise ValueError("this LoRALinear is not merged; nothing to unmerge")
        self._merge_base_weight(-1.0, "unmerge")
        self.merged = False

    def extra_repr(self) -> str:
        dora_flag = ", use_dora=True" if self.use_dora else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}{dora_flag}, merged={self.merged}"
