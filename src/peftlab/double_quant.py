"""Double quantization: the NF4 absmax constants, quantized to 8 bits.

Explained in the chapter *Double quantization* (book/chapters/double_quant.md).

QLoRA stores one float32 ``absmax`` per block of 64 weights (0.5 bits per parameter).
Double quantization subtracts their mean (``offset``) and quantizes the centred constants
in blocks of ``blocksize2 = 256`` with bitsandbytes' signed 8-bit dynamic map, keeping one
float32 ``absmax2`` per block: 8/64 + 32/(64*256) = 0.127 bits per parameter.

Everything here reproduces bitsandbytes' CPU path byte for byte (checked in
tests/test_double_quant.py). In bitsandbytes' terms, a :class:`DoubleQuantState` is the
nested part of a 4-bit ``QuantState``: ``absmax`` = ``codes``, ``offset`` = ``offset`` and
``state2 = QuantState(absmax=absmax2, code=dynamic_map(), blocksize=blocksize2,
dtype=float32)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from peftlab.checks import positive_int
from peftlab.codebooks import (
    BLOCKSIZES,
    FLOAT_DTYPES,
    check_blocksize,
)  # the 4-bit path's sizes

__all__ = [
    "BLOCKSIZES",
    "LUT_SIZE",
    "DoubleQuantState",
    "dynamic_map",
    "quantize_8bit",
    "dequantize_8bit",
    "quantize_absmax",
    "dequantize_absmax",
    "roundtrip_absmax",
    "overhead_bits",
]


LUT_SIZE = 65536
"""Bins of bitsandbytes' CPU lookup table over [-1, 1] (``kLUTSize`` in
``csrc/cpu_ops.cpp``)."""

_FP8_E4M3_MAX = 448.0  # largest finite torch.float8_e4m3fn


def _check_blocksize_8bit(blocksize: object, name: str = "blocksize") -> int:
    """``blocksize`` if it is a positive int: bitsandbytes' CPU ``quantize_blockwise`` /
    ``dequantize_blockwise`` accept any (``blocksize must be positive``), unlike the 4-bit
    path (:data:`BLOCKSIZES`). TypeError/ValueError naming ``name`` otherwise."""
    return positive_int(blocksize, name)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted values of bitsandbytes' 8-bit dynamic ("dynamic tree") data type.

    Equal, value for value, to ``bitsandbytes.functional.create_dynamic_map(signed)``: for
    each decade ``10**(i-6)``, i = 0..6, the midpoints of ``2**i + 1`` (signed) or
    ``2**(i+1) + 1`` (unsigned) points evenly spaced on [0.1, 1], scaled by the decade,
    with both signs when ``signed``; then 0 and 1, sorted (256 values either way).

    Note: the arithmetic follows bitsandbytes exactly (linspace and midpoints in float32,
    the decade as a Python float applied to a float32 tensor), so the table is equal bit
    for bit.
    """
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        points = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, points, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = 10.0 ** (i - 6)
        parts.append(decade * means)
        if signed:
            parts.append(-decade * means)
    values = torch.cat(parts)
    values = torch.cat([values, torch.zeros(256 - values.numel())])
    return torch.sort(values).values


@lru_cache(maxsize=8)
def cached_dynamic_map(device: str, signed: bool = True) -> torch.Tensor:
    """:func:`dynamic_map` on ``device``, built once per device and sign and shared (do not
    modify it): the 8-bit states of the paged optimizer look it up at every step."""
    return dynamic_map(signed).to(device)


@lru_cache(maxsize=8)
def _default_lut(device: str, signed: bool = True) -> torch.Tensor:
    return _build_lut(dynamic_map(signed)).to(device)


def _lut_for(code: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The lookup table of ``code`` (default: the signed dynamic map).

    Note: building a table takes milliseconds; an 8-bit optimizer quantizes its two states
    (signed and unsigned dynamic maps, see peftlab.paged) at every step, chunk by chunk,
    so the tables of both dynamic maps are cached and recognised by value.
    """
    if code is None:
        return _default_lut(str(device))
    code = _check_code(code, device)  # the cached maps themselves pass unchecked
    for signed in (True, False):
        cached = cached_dynamic_map(str(device), signed)
        if code is cached or torch.equal(code, cached):
            return _default_lut(str(device), signed)
    return _build_lut(code).to(device)


def _build_lut(code: torch.Tensor) -> torch.Tensor:
    """Code index of each of the ``LUT_SIZE`` bins (``build_quantize_lut`` in
    bitsandbytes)."""
    code = code.to("cpu", torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(LUT_SIZE, dtype=torch.float32)
    centres = -1.0 + (2.0 * i) / float(LUT_SIZE - 1)
    # bitsandbytes advances while ``midpoint < centre``: the count of midpoints strictly
    # below.
    return torch.searchsorted(midpoints, centres, right=False).to(torch.uint8)


def _check_code(code: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if code is None:
        return cached_dynamic_map(str(device))
    if any(code is cached_dynamic_map(str(device), signed) for signed in (True, False)):
        # the 8-bit optimizer passes them at every chunk; they were checked when made
        return code
    if not isinstance(code, torch.Tensor):
        raise TypeError(
            f"code must be a torch.Tensor or None, got {type(code).__name__}"
        )
    if code.dtype != torch.float32 or code.shape != (256,):
        raise ValueError(
            f"code must be a float32 tensor of shape (256,), got {code.dtype} {tuple(code.shape)}"
        )
    if not bool((code[1:] >= code[:-1]).all()) or not bool((code.abs() <= 1).all()):
        raise ValueError("code must be sorted ascending with values in [-1, 1]")
    return code.to(device)


_CPU_CHUNK = 16384
"""Elements per step on the CPU: small enough for the cache and below PyTorch's parallel
grain."""


def _rows_per_step(blocks: int, blocksize: int, device: torch.device) -> int:
    # Note: on a CPU, whole-tensor element-wise passes run out of memory bandwidth and, on
    # a busy machine, stall on their thread pool; cache-sized steps are several times
    # faster. A GPU wants one launch per operation instead.
    return max(1, _CPU_CHUNK // blocksize) if device.type == "cpu" else blocks


def _quantize_rows(
    x: torch.Tensor,
    lut: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> None:
    """Quantize the blocks (rows) of ``x - shift`` into ``codes`` and ``absmax``
    (preallocated)."""
    rows, blocksize = x.shape
    step = _rows_per_step(rows, blocksize, x.device)
    work = torch.empty(min(step, rows), blocksize, device=x.device)
    index = torch.empty(min(step, rows), blocksize, dtype=torch.int32, device=x.device)
    centred = torch.empty_like(work) if shift is not None else None
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        # 16-bit: step by step
        xs, t, i = x[start:stop].float(), work[: stop - start], index[: stop - start]
        # centring step by step saves a pass over the whole tensor
        if centred is not None:
            xs = torch.sub(xs, shift, out=centred[: stop - start])
        torch.abs(xs, out=t)
        am = torch.amax(t, dim=1, out=absmax[start:stop])
        if not bool(
            torch.isfinite(am).all()
        ):  # a NaN or inf anywhere reaches its block's absmax
            raise ValueError("A must contain only finite values")
        # bitsandbytes multiplies by the float32 reciprocal; it does not divide.
        inv = torch.where(am == 0, 0.0, 1.0 / am)
        torch.mul(xs, inv[:, None], out=t)
        # ((v + 1) * 0.5) * 65535 + 0.5, each step rounded to float32 like bitsandbytes'
        # AVX2 code; (v + 1) * 0.5 is exact, so multiplying by 32767.5 at once rounds
        # identically. The clamp to [-1, 1] is left out: |v| <= 1 + 2**-23 and that
        # excess never changes the bin.
        t.add_(1.0).mul_(0.5 * (LUT_SIZE - 1)).add_(0.5)
        i.copy_(t)  # float -> int32 truncates, as cvttps2dq
        torch.index_select(lut, 0, i.view(-1), out=codes[start:stop].view(-1))


def quantize_8bit(
    A: torch.Tensor,
    code: torch.Tensor | None = None,
    blocksize: int = 256,
    *,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization, byte-identical to bitsandbytes' CPU
    ``quantize_blockwise``.

    The arguments are in the order of the 4-bit :func:`peftlab.codebooks.quantize_4bit`:
    the tensor, the code (default: bitsandbytes' signed dynamic map), the block size.

    Returns ``(codes, absmax)``: uint8 codes shaped like ``A`` and one float32 ``absmax``
    per block of ``blocksize`` values of the flattened ``A`` (a trailing partial block
    gets its own). ``blocksize`` is any positive int, as bitsandbytes' CPU path accepts
    (the 4-bit path keeps :data:`BLOCKSIZES`). With ``shift`` (a float32 scalar tensor), ``A - shift`` is quantized,
    as if subtracted beforehand.

    Note: bitsandbytes' CPU quantizer (``quantize_cpu_impl`` /
    ``avx2_quantize_8bit_block``) does not search for the nearest code. It scales by the
    reciprocal, ``x * (1/absmax)``, maps the result to one of ``LUT_SIZE`` bins with
    ``trunc(((x + 1) * 0.5) * 65535 + 0.5)`` and reads the code from a table built from
    the code midpoints. Near zero the bins (width 2/65535) are far wider than the dynamic
    map's spacing, so an exact 0 gets code 131 (2.1e-5), not code 127 (0.0). We reproduce
    the table, not the ideal.

    Note: a block whose values are all zero gets ``absmax = 0`` and codes 0, as in
    bitsandbytes (without the guard, 0 * (1/0) would be NaN).
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES:
        raise TypeError(f"A must be float32, float16 or bfloat16, got {A.dtype}")
    if A.numel() == 0:
        raise ValueError("A must not be empty")
    blocksize = _check_blocksize_8bit(blocksize, "blocksize")
    lut = _lut_for(code, A.device)
    x = A.detach().reshape(-1)
    if shift is not None and (
        not isinstance(shift, torch.Tensor)
        or shift.dtype != torch.float32
        or shift.dim() != 0
    ):
        raise TypeError("shift must be a 0-dim float32 torch.Tensor or None")

    n = x.numel()
    full, blocks = n // blocksize, -(-n // blocksize)
    codes = torch.empty(blocks, blocksize, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(blocks, device=A.device)
    if full:
        _quantize_rows(
            x[: full * blocksize].view(full, blocksize),
            lut,
            codes[:full],
            absmax[:full],
            shift,
        )
    # the trailing partial block, padded with zeros (they change no absmax)
    if blocks > full:
        tail = (
            x[full * blocksize :].float()
            if shift is None
            else x[full * blocksize :].float() - shift
        )
        tail = torch.nn.functional.pad(tail, (0, blocks * blocksize - n))
        _quantize_rows(tail.view(1, blocksize), lut, codes[full:], absmax[full:])
    zero = absmax == 0
    if bool(zero.any()):
        codes[zero] = 0
    return codes.view(-1)[:n].view(A.shape), absmax


def _dequantize_rows(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    out: torch.Tensor,
    offset: torch.Tensor | None,
) -> None:
    """``out = code[codes] * absmax[row] (+ offset)``, rows at a time, two float32
    roundings."""
    rows, blocksize = codes.shape
    step = _rows_per_step(rows, blocksize, codes.device)
    index = torch.empty(
        min(step, rows), blocksize, dtype=torch.int32, device=codes.device
    )
    work = (
        torch.empty(min(step, rows), blocksize, device=codes.device)
        if out.dtype != torch.float32
        else None
    )
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        i = index[: stop - start]
        i.copy_(codes[start:stop])
        o = out[start:stop] if work is None else work[: stop - start]
        torch.index_select(code, 0, i.view(-1), out=o.view(-1))
        o.mul_(absmax[start:stop, None])
        if offset is not None:
            o.add_(offset)
        if work is not None:
            out[start:stop].copy_(o)


def _dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    code: torch.Tensor,
    dtype: torch.dtype,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    n = codes.numel()
    flat = codes.reshape(-1)
    full, blocks = n // blocksize, -(-n // blocksize)
    out = torch.empty(blocks * blocksize, dtype=dtype, device=codes.device)
    if full:
        _dequantize_rows(
            flat[: full * blocksize].view(full, blocksize),
            absmax[:full],
            code,
            out[: full * blocksize].view(full, blocksize),
            offset,
        )
    if blocks > full:
        tail = torch.nn.functional.pad(
            flat[full * blocksize :], (0, blocks * blocksize - n)
        )
        _dequantize_rows(
            tail.view(1, blocksize),
            absmax[full:],
            code,
            out[full * blocksize :].view(1, blocksize),
            offset,
        )
    return out[:n].view(codes.shape)


def dequantize_8bit(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None = None,
    blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``code[codes] * absmax[block]`` in float32, cast to ``dtype`` (bitsandbytes' CPU
    path)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(
            f"codes must be a uint8 torch.Tensor, got {getattr(codes, 'dtype', type(codes).__name__)}"
        )
    if (
        not isinstance(absmax, torch.Tensor)
        or absmax.dtype != torch.float32
        or absmax.dim() != 1
    ):
        raise TypeError("absmax must be a 1-D float32 torch.Tensor")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    blocksize = _check_blocksize_8bit(blocksize, "blocksize")
    blocks = -(-codes.numel() // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(
            f"absmax must have {blocks} values (one per block of {blocksize}), got {absmax.numel()}"
        )
    code = _check_code(code, codes.device)
    return _dequantize(codes, absmax.to(codes.device), blocksize, code, dtype)


@dataclass(frozen=True)
class DoubleQuantState:
    """The double-quantized first-level ``absmax`` of an NF4 tensor.

    ``absmax ≈ dynamic_map()[codes] * absmax2[block] + offset``, with blocks of
    ``blocksize2`` codes. Build one with :func:`quantize_absmax`; move it with :meth:`to`.
    """

    codes: torch.Tensor  # uint8, one 8-bit code per first-level absmax
    absmax2: torch.Tensor  # float32, one per block of `blocksize2` codes
    offset: torch.Tensor  # float32, 0-dim: the mean that was subtracted
    blocksize2: int = 256

    def __post_init__(self) -> None:
        check_blocksize(self.blocksize2, "blocksize2")
        for name, dtype in (
            ("codes", torch.uint8),
            ("absmax2", torch.float32),
            ("offset", torch.float32),
        ):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != dtype:
                got = getattr(value, "dtype", type(value).__name__)
                raise TypeError(f"{name} must be a {dtype} torch.Tensor, got {got}")
        if self.codes.dim() != 1 or self.absmax2.dim() != 1 or self.offset.dim() != 0:
            raise ValueError("codes and absmax2 must be 1-D and offset 0-dim")
        blocks = -(-self.codes.numel() // self.blocksize2)
        if self.absmax2.numel() != blocks:
            raise ValueError(
                f"absmax2 must have {blocks} values for {self.codes.numel()} codes in blocks of "
                f"{self.blocksize2}, got {self.absmax2.numel()}"
            )
        if len({self.codes.device, self.absmax2.device, self.offset.device}) != 1:
            raise ValueError("codes, absmax2 and offset must be on the same device")

    @property
    def nbytes(self) -> int:
        """Bytes of the real buffers: codes + absmax2 + offset."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.codes, self.absmax2, self.offset)
        )

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str) -> DoubleQuantState:
        """A new state with every buffer on ``device`` (this one is unchanged)."""
        return DoubleQuantState(
            self.codes.to(device),
            self.absmax2.to(device),
            self.offset.to(device),
            self.blocksize2,
        )


def _check_absmax(absmax: torch.Tensor, finite: bool = True) -> None:
    if not isinstance(absmax, torch.Tensor):
        raise TypeError(f"absmax must be a torch.Tensor, got {type(absmax).__name__}")
    if absmax.dtype != torch.float32:
        raise TypeError(
            f"absmax must be float32 (the first-level constants), got {absmax.dtype}"
        )
    if absmax.dim() != 1 or absmax.numel() == 0:
        raise ValueError(
            f"absmax must be 1-D and non-empty (one value per block), got shape {tuple(absmax.shape)}"
        )
    if finite and not bool(torch.isfinite(absmax).all()):
        raise ValueError("absmax must contain only finite values")


def quantize_absmax(absmax: torch.Tensor, blocksize2: int = 256) -> DoubleQuantState:
    """Double-quantize the first-level constants exactly as bitsandbytes'
    ``compress_statistics=True``.

    ``offset = absmax.mean()``; the centred constants ``absmax - offset`` are quantized
    with :func:`quantize_8bit` in blocks of ``blocksize2`` with the signed
    :func:`dynamic_map`.

    Note: the constants are all positive and cluster around their mean; centring makes
    them symmetric around 0 so the signed map's 256 levels (half of them negative) are
    all usable.

    Note: if all constants are equal, the centred block is zero: ``absmax2 = 0`` and the
    constants dequantize to ``offset`` exactly, with no NaN.
    """
    _check_absmax(absmax, finite=False)
    blocksize2 = check_blocksize(blocksize2, "blocksize2")
    # the same reduction as bitsandbytes, so the same float32 rounding
    offset = absmax.mean()
    if not bool(torch.isfinite(offset)):  # any NaN or inf makes the mean non-finite
        raise ValueError("absmax must contain only finite values")
    codes, absmax2 = quantize_8bit(absmax, blocksize=blocksize2, shift=offset)
    return DoubleQuantState(codes, absmax2, offset, blocksize2)


def dequantize_absmax(state: DoubleQuantState) -> torch.Tensor:
    """The first-level ``absmax`` (float32): ``dynamic_map()[codes] * absmax2[block] +
    offset``.

    Note: two float32 roundings (the product, then the sum), as bitsandbytes' dequantize
    kernel followed by ``absmax += offset``; a fused multiply-add would differ in the
    last bit.
    """
    if not isinstance(state, DoubleQuantState):
        raise TypeError(f"state must be a DoubleQuantState, got {type(state).__name__}")
    return _dequantize(
        state.codes,
        state.absmax2,
        state.blocksize2,
        cached_dynamic_map(str(state.device)),
        torch.float32,
        offset=state.offset,
    )


Scheme = Literal["dynamic", "fp8_e4m3", "int8"]


def roundtrip_absmax(
    absmax: torch.Tensor, blocksize2: int = 256, scheme: Scheme = "dynamic"
) -> torch.Tensor:
    """Quantize and dequantize the centred constants with one of three 8-bit types
    (float32 out).

    - ``"dynamic"``: bitsandbytes' dynamic map (what this package and bitsandbytes
      implement).
    - ``"fp8_e4m3"``: IEEE-like FP8 E4M3 (``torch.float8_e4m3fn``), each block scaled so
      that its absmax maps to 448, the largest finite E4M3 value. The paper says "8-bit
      floats".
    - ``"int8"``: torchao's symmetric int8: ``clamp(round(a * 128/absmax2), -128, 127)``
      and division by the same factor (``NF4Tensor.double_quantize_scalers``).

    Note: all three subtract the same mean and use the same float32 ``absmax2`` per block,
    so they cost the same 0.127 bits per parameter; only the 256 levels differ.
    """
    _check_absmax(absmax)
    blocksize2 = check_blocksize(blocksize2, "blocksize2")
    if scheme == "dynamic":
        return dequantize_absmax(quantize_absmax(absmax, blocksize2))
    if scheme not in ("fp8_e4m3", "int8"):
        raise ValueError(
            f"scheme must be 'dynamic', 'fp8_e4m3' or 'int8', got {scheme!r}"
        )
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    blocks = -(-n // blocksize2)
    x = torch.nn.functional.pad(centred, (0, blocks * blocksize2 - n)).view(
        blocks, blocksize2
    )
    absmax2 = x.abs().amax(dim=1, keepdim=True)
    # a zero block stays zero
    safe = torch.where(absmax2 == 0, torch.ones_like(absmax2), absmax2)
    if scheme == "fp8_e4m3":
        scale = safe / _FP8_E4M3_MAX
        y = (x / scale).to(torch.float8_e4m3fn).float() * scale
    else:
        factor = 256 / (2 * safe)
        y = (x * factor).round().clamp(-128, 127) / factor
    return y.reshape(-1)[:n] + offset


def overhead_bits(blocksize: int = 64, blocksize2: int | None = 256) -> float:
    """Bits per parameter spent on constants, by the paper's formula (QLoRA §3).

    ``32/blocksize`` without double quantization (``blocksize2=None``), else
    ``8/blocksize + 32/(blocksize*blocksize2)``: 0.5 and 0.127 for blocks of 64 and 256.
    """
    blocksize = check_blocksize(blocksize, "blocksize")
    if blocksize2 is None:
        return 32 / blocksize
    blocksize2 = check_blocksize(blocksize2, "blocksize2")
    return 8 / blocksize + 32 / (blocksize * blocksize2)
