"""NF4, the 4-bit NormalFloat of QLoRA: a tensor type, its quantizer, and interchange with
bitsandbytes.

Explained in the chapter *4-bit NormalFloat* (book/chapters/nf4.md); double quantization
of the ``absmax`` constants in the chapter *Double quantization*
(book/chapters/double_quant.md).

Pure PyTorch, so it runs on any device; on the CPU it is byte-identical to bitsandbytes
0.50.2's ``quantize_4bit(..., quant_type="nf4")`` (codes, ``absmax`` and dequantized
values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch

# the unchecked cores: quantize_nf4 and dequantize_nf4 check their input
from peftlab.codebooks import (
    FLOAT_DTYPES,
    dequantize_4bit_into,
    quantize_4bit_unchecked,
    check_blocksize,
    check_float_tensor,
    get_code,
)

if TYPE_CHECKING:  # imported lazily at run time: double quantization is optional
    from peftlab.double_quant import DoubleQuantState

__all__ = ["NF4Tensor", "quantize_nf4", "dequantize_nf4", "to_bnb", "from_bnb"]


@dataclass(frozen=True)
class NF4Tensor:
    """A tensor stored in NF4: packed 4-bit codes plus one scale (``absmax``) per block.

    ``packed`` is uint8 ``[(numel + 1) // 2]``, two codes per byte with the first element
    in the high nibble; ``absmax`` is float32 ``[ceil(numel / blocksize)]``, or a
    ``DoubleQuantState`` when the constants are double-quantized. ``shape`` and ``dtype``
    are those of the original tensor. Build one with :func:`quantize_nf4`; read it back
    with :func:`dequantize_nf4`.

    Note: frozen, and :meth:`to` returns a new tensor: a device move copies the bytes and
    never re-quantizes, so a model moved between devices keeps exactly the same weights.
    """

    packed: torch.Tensor
    absmax: Union[torch.Tensor, "DoubleQuantState"]
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        check_blocksize(self.blocksize)
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"dtype must be float32, float16 or bfloat16, got {self.dtype}"
            )
        if (
            not isinstance(self.packed, torch.Tensor)
            or self.packed.dtype != torch.uint8
            or self.packed.dim() != 1
        ):
            raise TypeError("packed must be a 1-D uint8 torch.Tensor")
        n = self.shape.numel()
        if n == 0 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"packed must hold {(n + 1) // 2} bytes for shape {tuple(self.shape)}, got {self.packed.numel()}"
            )
        blocks = -(-n // self.blocksize)
        if isinstance(self.absmax, torch.Tensor):
            if self.absmax.dtype != torch.float32 or self.absmax.shape != (blocks,):
                raise ValueError(
                    f"absmax must be float32 of shape ({blocks},), got {self.absmax.dtype} {tuple(self.absmax.shape)}"
                )
            absmax_device = self.absmax.device
        else:
            from peftlab.double_quant import DoubleQuantState

            if not isinstance(self.absmax, DoubleQuantState):
                raise TypeError(
                    f"absmax must be a float32 tensor or a DoubleQuantState, got {type(self.absmax).__name__}"
                )
            if self.absmax.codes.numel() != blocks:
                raise ValueError(
                    f"absmax must hold {blocks} codes, got {self.absmax.codes.numel()}"
                )
            absmax_device = self.absmax.device
        if absmax_device != self.packed.device:
            raise ValueError(
                f"packed ({self.packed.device}) and absmax ({absmax_device}) must be on the same device"
            )

    @property
    def numel(self) -> int:
        """Number of values in the original tensor."""
        return self.shape.numel()

    @property
    def double_quant(self) -> bool:
        """Whether ``absmax`` is double-quantized (a ``DoubleQuantState``)."""
        return not isinstance(self.absmax, torch.Tensor)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of the real buffers: packed codes plus the constants (all of their
        buffers)."""
        constants = self.absmax.nbytes if self.double_quant else self.absmax.numel() * 4
        return self.packed.numel() + constants

    @property
    def bits_per_param(self) -> float:
        """Storage per original value in bits: 4.5 for blocks of 64, about 4.127 with
        double quantization."""
        return 8 * self.nbytes / self.numel

    def to(self, device: torch.device | str) -> NF4Tensor:
        """The same NF4 tensor on ``device`` (a copy of the buffers; this one is
        unchanged)."""
        return NF4Tensor(
            self.packed.to(device),
            self.absmax.to(device),
            self.shape,
            self.dtype,
            self.blocksize,
        )

    def dequantize(
        self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Shorthand for :func:`dequantize_nf4`."""
        return dequantize_nf4(self, dtype, out)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}{dq}, "
            f"device={self.device}, bits_per_param={self.bits_per_param:.3f})"
        )


def quantize_nf4(
    w: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = False,
    *,
    blocksize2: int = 256,
) -> NF4Tensor:
    """Quantize ``w`` (any shape; float32, float16 or bfloat16) to NF4 in blocks of
    ``blocksize``.

    With ``double_quant=True`` the float32 ``absmax`` constants are quantized again to 8
    bits in blocks of ``blocksize2`` (see :mod:`peftlab.double_quant`), as QLoRA does.

    Note: blocks run over the *flattened* tensor (row-major), as in bitsandbytes, so a
    block may straddle two rows; a trailing partial block gets its own ``absmax``.

    Raises TypeError for non-tensors or non-float dtypes and a blocksize that is not an
    int, ValueError for empty tensors, NaN or inf values and unsupported block sizes.
    """
    w = check_float_tensor(w, "w")
    blocksize = check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(
            f"double_quant must be a bool, got {type(double_quant).__name__}"
        )
    packed, absmax = quantize_4bit_unchecked(w, get_code("nf4", w.device), blocksize)
    constants: Any = absmax
    if double_quant:
        from peftlab.double_quant import quantize_absmax

        constants = quantize_absmax(absmax, blocksize2=blocksize2)
    return NF4Tensor(packed, constants, w.shape, w.dtype, blocksize)


def _check_out(out: object, q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out`` if it can receive ``q`` dequantized to ``dtype``; TypeError/ValueError
    naming ``out`` otherwise."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(
            f"out must have dtype {dtype} (the dtype asked for), got {out.dtype}"
        )
    if out.shape != q.shape:
        raise ValueError(
            f"out must have shape {tuple(q.shape)} (the quantized tensor's), got {tuple(out.shape)}"
        )
    if out.device != q.device:
        raise ValueError(
            f"out must be on {q.device} (where the quantized tensor is), got {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous: it is written through a flat view")
    if out.requires_grad:
        raise ValueError(
            "out must not require grad: dequantizing overwrites it outside autograd"
        )
    return out


def dequantize_nf4(
    q: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The tensor ``q`` stands for, in its original shape and in ``dtype`` (default: its
    original dtype).

    With ``out`` (a contiguous tensor of ``q``'s shape, of that dtype, on ``q``'s device)
    the values are written there and ``out`` is returned: a caller that dequantizes again
    and again, as the 4-bit layer of the chapter *QLoRA end to end* does, reuses one
    buffer instead of allocating a weight-sized one each time (on a CPU, a fresh 64 MB
    tensor costs about as much as the dequantization itself).

    Note: values are computed in float32 (``code * absmax``) and cast once at the end, as
    in bitsandbytes, so a bfloat16 result is the float32 value rounded to nearest-even.
    Note: on a CPU the work runs in cache-sized steps (see
    :func:`peftlab.codebooks.dequantize_4bit`), writing ``out`` once and never reading it.
    Double-quantized constants are dequantized once per call, not per step.
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    else:
        out = _check_out(out, q, dtype)
    absmax = q.absmax
    if q.double_quant:
        from peftlab.double_quant import dequantize_absmax

        absmax = dequantize_absmax(absmax)
    dequantize_4bit_into(
        q.packed, absmax, get_code("nf4", q.device), q.blocksize, q.numel, out.view(-1)
    )
    return out


def absmax_values(q: NF4Tensor) -> torch.Tensor:
    """``q``'s float32 block constants, with double quantization undone (once: a caller that
    dequantizes ``q`` piece by piece passes them to :func:`dequantize_nf4_rows`)."""
    if not q.double_quant:
        return q.absmax
    from peftlab.double_quant import dequantize_absmax

    return dequantize_absmax(q.absmax)


def dequantize_nf4_rows(
    q: NF4Tensor, start: int, stop: int, out: torch.Tensor, absmax: torch.Tensor
) -> torch.Tensor:
    """Rows ``start:stop`` of the 2-D weight ``q`` stands for, written into ``out`` (a
    contiguous ``(stop - start) × in_features`` float tensor, returned), with ``absmax``
    from :func:`absmax_values`.

    For the 4-bit layer of the chapter *QLoRA end to end*, which dequantizes and multiplies
    a few rows at a time so that they are still in cache when the product reads them.
    Needs rows of whole blocks (``in_features`` a multiple of ``blocksize``: every LLaMA
    layer); the values are those of :func:`dequantize_nf4`, bit for bit.
    """
    rows, cols = q.shape
    if cols % q.blocksize:
        raise ValueError(
            f"rows must be whole blocks: in_features={cols} is not a multiple of "
            f"blocksize={q.blocksize}"
        )
    if not 0 <= start < stop <= rows:
        raise ValueError(f"need 0 <= start < stop <= {rows}, got {start} and {stop}")
    if out.shape != (stop - start, cols) or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {stop - start} × {cols} tensor, got {tuple(out.shape)}"
        )
    row_bytes, row_blocks = cols // 2, cols // q.blocksize
    dequantize_4bit_into(
        q.packed[start * row_bytes : stop * row_bytes],
        absmax[start * row_blocks : stop * row_blocks],
        get_code("nf4", q.device),
        q.blocksize,
        (stop - start) * cols,
        out.view(-1),
    )
    return out


def to_bnb(q: NF4Tensor) -> tuple[torch.Tensor, Any]:
    """``(packed, QuantState)`` as bitsandbytes' ``quantize_4bit(..., quant_type="nf4")``
    would return them.

    The packed bytes are shared, not copied (shape ``[(numel + 1) // 2, 1]`` as
    bitsandbytes stores them). With double quantization the state is nested: ``absmax``
    holds the 8-bit codes, ``offset`` the mean, and ``state2`` the second-level
    ``absmax2``, the dynamic map and ``blocksize2``.
    """
    from bitsandbytes.functional import QuantState

    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    code = get_code("nf4", q.device)
    common = dict(
        shape=q.shape, code=code, blocksize=q.blocksize, quant_type="nf4", dtype=q.dtype
    )
    if not q.double_quant:
        return q.packed.view(-1, 1), QuantState(absmax=q.absmax, **common)
    from peftlab.double_quant import dynamic_map

    dq = q.absmax
    state2 = QuantState(
        absmax=dq.absmax2,
        code=dynamic_map(True).to(q.device),
        blocksize=dq.blocksize2,
        dtype=torch.float32,
    )
    return q.packed.view(-1, 1), QuantState(
        absmax=dq.codes, offset=dq.offset, state2=state2, **common
    )


def from_bnb(packed: torch.Tensor, state: Any) -> NF4Tensor:
    """The :class:`NF4Tensor` of bitsandbytes' ``(packed, QuantState)``: the inverse of
    :func:`to_bnb`.

    Raises TypeError for a state that is not a ``QuantState`` and ValueError for one that
    is not NF4 (FP4, or a different table) or whose buffers do not match its shape and
    block size.
    """
    from bitsandbytes.functional import QuantState

    if not isinstance(state, QuantState):
        raise TypeError(
            f"state must be a bitsandbytes QuantState, got {type(state).__name__}"
        )
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if state.quant_type != "nf4":
        raise ValueError(f"state.quant_type must be 'nf4', got {state.quant_type!r}")
    if state.code is not None and not torch.equal(
        state.code.float().cpu(), get_code("nf4")
    ):
        raise ValueError("state.code is not the NF4 table")
    flat = packed.reshape(-1)
    if (
        flat.dtype != torch.uint8
    ):  # bitsandbytes' quant_storage may be another dtype over the same bytes
        flat = flat.contiguous().view(torch.uint8)
    if not state.nested:
        return NF4Tensor(
            flat,
            state.absmax.float(),
            torch.Size(state.shape),
            state.dtype,
            state.blocksize,
        )
    from peftlab.double_quant import DoubleQuantState, dynamic_map

    state2 = state.state2
    if state2.code is not None and not torch.equal(
        state2.code.float().cpu(), dynamic_map(True)
    ):
        raise ValueError("state.state2.code is not bitsandbytes' signed dynamic map")
    offset = torch.as_tensor(
        state.offset, dtype=torch.float32, device=flat.device
    ).reshape(())
    dq = DoubleQuantState(
        state.absmax.reshape(-1),
        state2.absmax.float().reshape(-1),
        offset,
        state2.blocksize,
    )
    return NF4Tensor(flat, dq, torch.Size(state.shape), state.dtype, state.blocksize)
