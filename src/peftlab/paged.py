"""The paged AdamW: an AdamW whose two states live in a page pool, in 32 or 8 bits.

Explained in the chapter *Paged optimizers* (book/chapters/paged.md); the 8-bit states in
the chapter *LoRA variants* (book/chapters/variants.md).

QLoRA's third trick (Dettmers et al. 2023, §3): when a memory spike would not fit,
optimizer states step aside to host memory and come back for the update.
:class:`PagedAdamW` keeps its states in a :class:`peftlab.pages.PagePool` (the pages, the
device budget and the paging) and updates them one page at a time with the rules of
:mod:`peftlab.adam_updates`. It takes the same steps as ``torch.optim.AdamW``; with
``optim_bits=8`` it takes bitsandbytes' ``AdamW8bit`` steps instead, its states kept as
8-bit codes and one float32 absmax per block of 256, paged the same way
(:func:`state_bytes` counts them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from peftlab.adam_updates import (
    optimizer_update_8bit_blockwise,
    optimizer_update_32bit,
    single_tensor_adamw,
)
from peftlab.pages import PagedTensor, PagePool

__all__ = [
    "MIN_8BIT_SIZE",
    "OPTIM_BITS",
    "STATE_BLOCKSIZE",
    "PagedAdamW",
    "state_bytes",
]

#: The bits per element of PagedAdamW's states (``optim_bits``).
OPTIM_BITS = (32, 8)
#: Elements per absmax block of an 8-bit state (bitsandbytes' optimizers: 256).
STATE_BLOCKSIZE = 256
#: bitsandbytes' ``min_8bit_size``: parameters with fewer elements keep 32-bit states.
MIN_8BIT_SIZE = 4096


def state_bytes(
    numel: int, optim_bits: int = 32, min_8bit_size: int = MIN_8BIT_SIZE
) -> int:
    """Bytes of :class:`PagedAdamW`'s two states for a float32 (or 16-bit) parameter of
    ``numel`` elements: ``8 * numel`` in 32 bits; in 8 bits, ``2 * numel`` codes plus
    two float32 absmax per block of :data:`STATE_BLOCKSIZE`, unless ``numel <
    min_8bit_size`` (then 32-bit, as bitsandbytes does).

    The one count of the states' bytes: :func:`peftlab.memory.estimate` adds it up over
    the trained tensors, and the pool's bytes equal it (tests/test_paged8bit.py).
    """
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    _check_optim_bits(optim_bits, min_8bit_size)
    if optim_bits == 32 or numel < min_8bit_size:
        return 2 * 4 * numel
    return 2 * (numel + 4 * -(-numel // STATE_BLOCKSIZE))


def _check_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    def number(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return float(value)

    if number(lr, "lr") < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= number(beta, f"betas[{i}]") < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    if number(eps, "eps") <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if number(weight_decay, "weight_decay") < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _check_optim_bits(optim_bits: Any, min_8bit_size: Any) -> None:
    if isinstance(optim_bits, bool) or not isinstance(optim_bits, int):
        raise TypeError(
            f"optim_bits must be an int, 8 or 32, got {type(optim_bits).__name__} {optim_bits!r}"
        )
    if optim_bits not in OPTIM_BITS:
        raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int):
        raise TypeError(
            f"min_8bit_size must be an int number of elements, got {type(min_8bit_size).__name__}"
        )
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")


# The keys of a parameter's paged states: 32-bit (torch.optim.AdamW's names) or 8-bit (one
# uint8 code per element and one float32 absmax per block of STATE_BLOCKSIZE, per state).
_KEYS_32 = ("exp_avg", "exp_avg_sq")
_KEYS_8 = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose two state tensors live in a :class:`PagePool`,
    in 32 or 8 bits.

    With ``optim_bits=32`` (default) it takes the same steps as ``torch.optim.AdamW`` with
    the same arguments (its single-tensor path: the same operations in the same order),
    whether or not states were paged out in between. With ``optim_bits=8`` it takes
    bitsandbytes' ``AdamW8bit`` steps (below). The paging is explained in the chapter
    *Paged optimizers* (book/chapters/paged.md), the 8-bit states in the chapter *LoRA
    variants* (book/chapters/variants.md).

    Args: params, lr, betas, eps, weight_decay: as for ``torch.optim.AdamW`` (same
        defaults).
        pool: where the states live. Default: a pool on the parameters' device whose
            capacity is the free device memory on CUDA, and unlimited on cpu (then nothing
            is ever paged).
        optim_bits: 32 or 8, the bits per element of each state (bitsandbytes'
            ``optim_bits``).
        min_8bit_size: with ``optim_bits=8``, parameters with fewer elements keep 32-bit
            states (bitsandbytes' ``min_8bit_size``, default 4096): their states are
            small (norms, biases), so 8 bits would save little.

    The 8-bit states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
    Quantization"), as bitsandbytes 0.50.2 keeps them: ``exp_avg`` (m) in the signed
    dynamic map and ``exp_avg_sq`` (v) in the unsigned one
    (:func:`peftlab.double_quant.dynamic_map`), each as one uint8 code per element plus one
    float32 absmax per block of :data:`STATE_BLOCKSIZE` = 256 elements: 2 + 8/256 bytes per
    parameter instead of 8 (:func:`state_bytes`). One step of a parameter, exactly as
    bitsandbytes' CPU kernel (``backends/cpu/ops.py``, ``_optimizer_update_8bit_blockwise_cpu``)
    runs it, block-aligned chunk by chunk (Adam is elementwise and blocks are
    independent, so chunks give the same bits as the whole tensor):

    1. dequantize: ``m = signed[codes_m] * absmax_m[block]``,
       ``v = unsigned[codes_v] * absmax_v[block]`` in float32 (the absmax of the last step);
    2. ``m = m * beta1 + (1 - beta1) * g``; ``v = v * beta2 + (1 - beta2) * g * g``
       (``mul_`` then ``add_``/``addcmul_``, not torch's ``lerp_``), g in float32;
    3. ``denom = sqrt(v) / sqrt(1 - beta2**t) + eps`` (eps outside the bias correction,
       as in torch's AdamW);
    4. decoupled weight decay ``p *= 1 - lr * weight_decay`` (if weight_decay > 0), then
       ``p -= lr / (1 - beta1**t) * m / denom``, in float32 and rounded once to p's dtype;
    5. requantize m and v: each block's new absmax is its largest ``|value|``, each value
       ``x / absmax`` gets a code through bitsandbytes' CPU lookup table
       (:func:`peftlab.double_quant.quantize_8bit`, byte-identical).

    With ``optim_bits=8``, parameters below ``min_8bit_size`` take bitsandbytes' 32-bit
    CPU step instead (``_optimizer_update_32bit_cpu``): float32 states and ``p -= lr *
    sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps * sqrt(1 - beta2**t))``, the
    same AdamW in another order of roundings than torch's. So the whole optimizer takes
    ``bitsandbytes.optim.AdamW8bit``'s steps bit for bit on a CPU (tests/test_paged8bit.py).

    Note: Adam is elementwise, so each update runs page by page on slices of the parameter
    and gradient: only one page of each state (for 8 bits: of codes and of absmax) needs to
    be resident at a time, and temporaries are page-sized (for 8 bits, the dequantized
    float32 states are at most ``page_bytes`` each).
    Note: ``state_dict()`` holds ordinary tensors (as ``torch.optim.AdamW``'s does): 32-bit
    states under ``exp_avg``/``exp_avg_sq`` (so checkpoints load in either), 8-bit ones as
    uint8 ``exp_avg_codes``/``exp_avg_sq_codes`` (shaped like the parameter) and float32
    ``exp_avg_absmax``/``exp_avg_sq_absmax`` (one per block). A state's keys decide its
    format when loaded.
    Note: 32-bit states are float32 for 16-bit parameters (float16, bfloat16), as in
    bitsandbytes' 32-bit optimizers: the update of such a parameter is computed in float32
    and written back rounded to its dtype once per step. (States in float16 overflow:
    ``v`` holds squared gradients, and ``1 - beta2`` = 1e-3 is near float16's
    resolution.) With ``optim_bits=32``, float32 and float64 parameters keep states of
    their own dtype and take ``torch.optim.AdamW``'s steps exactly; with ``optim_bits=8``
    every update is computed in float32, as bitsandbytes computes it (a float64
    parameter is rounded through float32 at each step).
    Note: 8-bit states cannot hold NaN or inf (a block's absmax would be lost); a step
    whose gradients are not finite is refused before anything changes (bitsandbytes
    would store meaningless codes).
    Note: bitsandbytes' CUDA kernel quantizes the new states by a search for the nearest
    code, its CPU kernel (and this class) by the lookup table; the two differ where a
    value falls near the midpoint of two codes. bitsandbytes 0.50.2's ``AdamW8bit`` has no
    ``percentile_clipping`` and passes no ``max_unorm``: neither is implemented here.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        pool: PagePool | None = None,
        *,
        optim_bits: int = 32,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay)
        _check_optim_bits(optim_bits, min_8bit_size)
        self.optim_bits, self.min_8bit_size = optim_bits, min_8bit_size
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        )
        for group in self.param_groups:
            _check_hyperparameters(
                group["lr"], group["betas"], group["eps"], group["weight_decay"]
            )
            for p in group["params"]:
                if p.is_complex() or not p.is_floating_point():
                    raise TypeError(
                        f"params must be real floating-point tensors, got dtype {p.dtype}"
                    )
        if pool is None:
            pool = _default_pool(self.param_groups[0]["params"][0].device)
        if not isinstance(pool, PagePool):
            raise TypeError(
                f"pool must be a PagePool or None, got {type(pool).__name__}"
            )
        self.pool = pool
        for group in self.param_groups:
            for p in group["params"]:
                if p.device != pool.device:
                    raise ValueError(
                        f"params must be on the pool's device {pool.device}, got one on {p.device}"
                    )

    @staticmethod
    def state_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype of the 32-bit AdamW states of a parameter of ``dtype`` with
        ``optim_bits=32``: float32 for 16-bit parameters (as bitsandbytes' 32-bit
        optimizers keep them), else ``dtype``."""
        return torch.promote_types(dtype, torch.float32)

    def is_8bit(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s states are (or, before its first step, will be) 8-bit."""
        state = self.state.get(p)
        if state:
            return _KEYS_8[0] in state
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _layout(
        self, p: torch.Tensor, eight_bit: bool
    ) -> dict[str, tuple[torch.Size, torch.dtype, int | None]]:
        """Shape, dtype and elements per page of each state of ``p``."""
        if not eight_bit:
            if self.optim_bits == 32:
                dtype = self.state_dtype(p.dtype)
                return {k: (p.shape, dtype, None) for k in _KEYS_32}
            # bitsandbytes' 32-bit step: float32 states; pages of whole 256-element
            # stretches keep each page's vector loops aligned as on the whole tensor
            numel = self.pool.page_numel(4, STATE_BLOCKSIZE)
            return {k: (p.shape, torch.float32, numel) for k in _KEYS_32}
        codes = self.pool.page_numel(1, STATE_BLOCKSIZE)  # whole blocks per page
        per_page = codes // STATE_BLOCKSIZE
        # absmax pages hold whole pages' worth of blocks: a page of codes finds all its
        # absmax in one page
        absmax = self.pool.page_numel(4, per_page)
        blocks = torch.Size([-(-p.numel() // STATE_BLOCKSIZE)])
        return {
            "exp_avg_codes": (p.shape, torch.uint8, codes),
            "exp_avg_absmax": (blocks, torch.float32, absmax),
            "exp_avg_sq_codes": (p.shape, torch.uint8, codes),
            "exp_avg_sq_absmax": (blocks, torch.float32, absmax),
        }

    def _update_bytes(self, p: torch.Tensor) -> int:
        """Bytes of the pages one update of ``p`` holds resident together (the first page
        of each state: the largest)."""
        state = self.state.get(p)
        if state:
            return sum(
                v.pages[0].nbytes
                for v in state.values()
                if isinstance(v, PagedTensor) and v.pages
            )
        total = 0
        for shape, dtype, page_numel in self._layout(p, self.is_8bit(p)).values():
            itemsize = torch.empty((), dtype=dtype).element_size()
            per_page = page_numel or self.pool.page_numel(itemsize)
            total += min(math.prod(shape), per_page) * itemsize
        return total

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            if not p.is_contiguous():
                raise ValueError(
                    "params must be contiguous: updates run on slices of p.view(-1)"
                )
            layout = self._layout(p, self.is_8bit(p))
            state["step"] = torch.tensor(0.0)  # as torch.optim.AdamW keeps it
            for key, (shape, dtype, page_numel) in layout.items():
                # all-zero codes with absmax 0 dequantize to 0, as bitsandbytes starts
                state[key] = self.pool.zeros(shape, dtype, page_numel=page_numel)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One AdamW update of every parameter with a gradient; states are paged in page
        by page.

        Raises ``PoolMemoryError`` before changing anything if one page of each state
        cannot fit beside the current reservations, and ``ValueError`` if a parameter
        with 8-bit states has a gradient that is not finite.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [
            (g, p) for g in self.param_groups for p in g["params"] if p.grad is not None
        ]
        largest = 0
        for _, p in work:
            if p.grad.is_sparse:
                raise TypeError("PagedAdamW does not support sparse gradients")
            if self.is_8bit(p) and not bool(torch.isfinite(p.grad).all()):
                raise ValueError(
                    "gradients of parameters with 8-bit states must be finite "
                    "(a NaN or inf "
                    "would take its block's absmax); nothing was changed"
                )
            largest = max(largest, self._update_bytes(p))
        self.pool.check_fits(largest, "one page of each AdamW state")
        for group, p in work:
            state = self._state(p)
            lr, (beta1, beta2), eps, wd = (
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
            )
            state["step"] += 1
            step = state["step"].item()
            hyper = (lr, beta1, beta2, eps, wd, step)
            if _KEYS_8[0] in state:
                states = (state[k] for k in _KEYS_8)  # m's codes and absmax, then v's
                optimizer_update_8bit_blockwise(p, *states, *hyper, STATE_BLOCKSIZE)
            elif self.optim_bits == 8:  # below min_8bit_size: bitsandbytes' 32-bit step
                optimizer_update_32bit(p, state["exp_avg"], state["exp_avg_sq"], *hyper)
            else:
                single_tensor_adamw(p, state["exp_avg"], state["exp_avg_sq"], *hyper)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.AdamW.state_dict()``: states gathered into ordinary tensors
        (8-bit states as their codes and absmax)."""
        sd = super().state_dict()
        sd["state"] = {
            key: {
                k: (v.to_tensor() if isinstance(v, PagedTensor) else v)
                for k, v in s.items()
            }
            for key, s in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an ``AdamW``-format state dict (ours or torch's) or one of our 8-bit ones;
        states are copied into the pool."""
        old = [
            v
            for s in self.state.values()
            for v in s.values()
            if isinstance(v, PagedTensor)
        ]
        super().load_state_dict(state_dict)
        for v in old:
            self.pool.free(v)
        # torch's loader casts floating-point states (and uint8 codes) to the
        # parameter's dtype; take them from state_dict instead, in the states' dtypes
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            s, saved = self.state.get(p), state_dict["state"].get(saved_id, {})
            if not s:
                continue
            eight_bit = _KEYS_8[0] in s
            for k, (shape, dtype, page_numel) in self._layout(p, eight_bit).items():
                value = saved.get(k)
                value = value if isinstance(value, torch.Tensor) else s.get(k)
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"state_dict's state of a parameter lacks {k!r}")
                if value.shape != shape:
                    raise ValueError(
                        f"state_dict's {k!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
                    )
                s[k] = self.pool.from_tensor(
                    value.to(device=p.device, dtype=dtype), page_numel=page_numel
                )


def _default_pool(device: torch.device) -> PagePool:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return PagePool(free, device)
    return PagePool(2**62, device)  # effectively unlimited: nothing is paged
