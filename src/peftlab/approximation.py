"""How far an approximation is from what it approximates: the relative error
``‖approx − exact‖_F / ‖exact‖_F`` the book reports for quantized weights, adapter starts
and model outputs.

Explained in the chapter *4-bit NormalFloat (NF4)* (book/chapters/nf4.md), and used as
well by *LoRA variants* and *QLoRA with transformers, PEFT and bitsandbytes*.

Note: the norm is over every entry at once (Frobenius for a matrix), so the error over
several layers together is this function of their flattened, concatenated weights.
"""

from __future__ import annotations

import torch

__all__ = ["relative_error"]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖approx − exact‖_F / ‖exact‖_F``, computed in float64.

    Note: both are cast to float64 before the difference, so that rounding in the
    subtraction of two nearly equal float32 or 16-bit tensors does not add to the error
    being measured. Raises TypeError for a non-tensor, ValueError for shapes that differ,
    and ValueError if ``exact`` is all zeros (the ratio is undefined) or not finite.
    """
    for name, value in (("approx", approx), ("exact", exact)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(value).__name__}"
            )
    if approx.shape != exact.shape:
        raise ValueError(
            f"approx and exact must have the same shape, got {tuple(approx.shape)} "
            f"and {tuple(exact.shape)}"
        )
    exact64 = exact.detach().to(torch.float64)
    scale = torch.linalg.vector_norm(exact64).item()
    if not 0.0 < scale < float("inf"):
        raise ValueError(
            f"exact must have a finite, nonzero norm (the denominator), got {scale}"
        )
    diff = approx.detach().to(device=exact64.device, dtype=torch.float64) - exact64
    return torch.linalg.vector_norm(diff).item() / scale
