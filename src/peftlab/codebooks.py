"""4-bit codebooks (NF4, FP4, Int4) and the blockwise absmax quantizer they share.

Explained in the chapter *4-bit NormalFloat* (book/chapters/nf4.md).

A 4-bit *codebook* is 16 float32 values in [-1, 1]. Blockwise quantization splits the
flattened tensor into blocks of ``blocksize`` values, divides each block by its ``absmax``
(largest magnitude) and stores, for each value, the index of the nearest code: two 4-bit
indices per byte. Everything here follows bitsandbytes 0.50.2's CPU reference path
(``backends/default/ops.py``) bit for bit.
"""

from __future__ import annotations

from functools import lru_cache

import torch


__all__ = [
    "BLOCKSIZES",
    "FLOAT_DTYPES",
    "NF4_OFFSET",
    "CODEBOOKS",
    "nf4_code",
    "fp4_code",
    "int4_code",
    "get_code",
    "check_blocksize",
    "check_float_tensor",
    "pack_nibbles",
    "unpack_nibbles",
    "quantize_4bit",
    "quantize_4bit_reference",
    "dequantize_4bit",
    "roundtrip",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Block sizes bitsandbytes' 4-bit kernels accept (``quantize_4bit``); we accept the same."""

NF4_OFFSET = 0.9677083
"""The outermost quantile of NF4 (``create_normal_map`` in bitsandbytes). Undocumented
upstream;
it equals ``1 - (1/30 + 1/32) / 2`` to the 7 digits given: the mean of the outer quantiles
that
16 and 15 equal-mass bins would use."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes a weight may have to be quantized, and the dtypes it may be dequantized to."""


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels, sorted: 7 negative, an exact 0, 8 positive; equal to
    bitsandbytes' table.

    Positive levels are the N(0, 1) quantiles at ``linspace(offset, 0.5, 9)[:-1]``,
    negative ones minus the quantiles at ``linspace(offset, 0.5, 8)[:-1]``; the set is
    divided by its maximum.

    Note: to get bitsandbytes' hard-coded table bit for bit, the arithmetic follows
    ``create_normal_map``: ``linspace`` in float32, the quantile (``ndtri``) in float64,
    the values rounded to float32 *before* the division by the maximum, which runs in
    float32.
    """
    if (
        isinstance(offset, bool)
        or not isinstance(offset, (int, float))
        or not 0.5 < offset < 1.0
    ):
        raise ValueError(f"offset must be a float in (0.5, 1), got {offset!r}")
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = (
        torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
        .float()
        .sort()
        .values
    )
    return values / values.max()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1) levels, in its bit-pattern order (index = the 4-bit
    code).

    Bit 3 is the sign; for the 3 low bits ``e1 e0 m``: ``000 -> 0``, ``001 -> 0.0625``
    (the subnormal), otherwise ``2**(4 - e) * (1 + m/2)`` with ``e = e1 e0`` — so
    010 -> 8, 011 -> 12, 100 -> 4, 101 -> 6, 110 -> 2, 111 -> 3 — all divided by the
    largest, 12.

    Note: this is bitsandbytes' layout (``get_4bit_type("fp4")``), not the OCP MX E2M1
    one: the normal levels are the same (1/6 ... 1 after scaling), but the exponent
    field runs downwards and the subnormal is 1/192 instead of 1/12. Index 8 ("-0") is a
    second +0.0: bitsandbytes writes it as the integer ``-0``, which is 0, and so do we,
    to stay equal bit for bit.
    """
    magnitudes = [0.0, 0.0625] + [
        2.0 ** (4 - e) * (1 + m / 2) for e in (1, 2, 3) for m in (0, 1)
    ]
    values = torch.tensor(
        magnitudes + [0.0] + [-v for v in magnitudes[1:]], dtype=torch.float32
    )
    return values / values.abs().max()


def int4_code() -> torch.Tensor:
    """The Int4 baseline: the integers 7 ... -7 divided by 7 (bitsandbytes'
    ``get_4bit_type("int4")``).

    Note: 15 evenly spaced levels, symmetric, with the zero twice (indices 7 and 8, both
    +0.0: the integer ``-0`` is 0) — the plain absmax integer quantization that QLoRA's
    Table 2 calls Int4.
    """
    values = torch.tensor(
        [7, 6, 5, 4, 3, 2, 1, 0, -0, -1, -2, -3, -4, -5, -6, -7], dtype=torch.float32
    )
    return values / 7


CODEBOOKS = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}
"""The codebooks by name: ``CODEBOOKS[name]()`` builds the 16 levels."""


@lru_cache(maxsize=None)
def _code_cpu(name: str) -> torch.Tensor:
    return CODEBOOKS[name]()


def get_code(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The codebook ``name`` ("nf4", "fp4" or "int4") as a float32 tensor of 16 values on
    ``device``."""
    if name not in CODEBOOKS:
        raise ValueError(f"name must be one of {tuple(CODEBOOKS)}, got {name!r}")
    return _code_cpu(name).to(device)


def check_blocksize(blocksize: object, name: str = "blocksize") -> int:
    """``blocksize`` if it is one of :data:`BLOCKSIZES`; TypeError/ValueError naming them
    otherwise."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(
            f"{name} must be an int, one of {BLOCKSIZES}; got {type(blocksize).__name__}"
        )
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize}")
    return blocksize


def check_float_tensor(x: object, name: str = "w") -> torch.Tensor:
    """``x`` if it is a non-empty float32/float16/bfloat16 tensor (finiteness is checked
    later, per block)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def _check_code(code: object) -> torch.Tensor:
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"code must be a torch.Tensor, got {type(code).__name__}")
    if code.dtype != torch.float32 or code.shape != (16,):
        raise ValueError(
            f"code must be a float32 tensor of shape (16,), got {code.dtype} {tuple(code.shape)}"
        )
    if not bool(torch.isfinite(code).all()) or not bool((code.abs() <= 1).all()):
        raise ValueError("code must hold finite values in [-1, 1]")
    return code


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit indices (uint8, < 16) two per byte, the first in the high nibble; an odd
    count gets a 0.

    Note: the order is bitsandbytes' ``(q[0::2] << 4) | q[1::2]``, so our bytes are
    theirs. :func:`quantize_4bit` pads an odd count itself, with the index of the value
    0.0, as bitsandbytes does; the index 0 padded here is only for other callers.
    """
    q = q.reshape(-1)
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    pairs = q.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` 4-bit indices (uint8) of ``packed``: the inverse of
    :func:`pack_nibbles`."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel]


def _key(code: torch.Tensor) -> tuple[int, ...]:
    """A cache key for a codebook: its float32 bit patterns (so +0.0 and -0.0 stay apart)."""
    return tuple(
        code.detach().to("cpu", torch.float32).contiguous().view(torch.int32).tolist()
    )


def _from_key(code_key: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(code_key, dtype=torch.int32).view(torch.float32)


@lru_cache(maxsize=16)
def _prefix_tables(
    code_key: tuple[int, ...], device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tables that turn the top 16 bits of a float32 into its bucket: ``(base, threshold,
    order)``.

    The 65,536 top-16-bit prefixes split the float32 line into cells. For each cell,
    ``base`` is the number of midpoints strictly below the cell's smallest value and
    ``threshold`` the next midpoint (``inf`` if none). With at most one midpoint per cell
    (checked), a value's bucket — the number of midpoints strictly below it, as
    ``torch.bucketize`` counts — is ``base + (x > threshold)``.
    """
    code = _from_key(code_key)
    order = torch.sort(code, stable=True).indices
    ordered = code[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    prefix = torch.arange(65536, dtype=torch.int32) << 16
    low, high = prefix.view(torch.float32), (prefix | 0xFFFF).view(torch.float32)
    cell_min, cell_max = torch.minimum(low, high), torch.maximum(low, high)
    finite = torch.isfinite(cell_min) & torch.isfinite(cell_max)
    base = torch.bucketize(torch.where(finite, cell_min, 0.0), midpoints)
    inside = (
        torch.bucketize(torch.where(finite, cell_max, 0.0), midpoints, right=True)
        - base
    )
    # cannot happen for 16 levels spaced > 2**-7 relative
    if int(inside[finite].max()) > 1:
        raise ValueError(
            "code levels are too close together for the 16-bit prefix table"
        )
    threshold = torch.cat([midpoints, torch.tensor([float("inf")])])[base]
    return (
        base.to(torch.uint8).to(device),
        threshold.to(device),
        order.to(torch.uint8).to(device),
    )


def _prefix16(x: torch.Tensor, shift: bool | None = None) -> torch.Tensor:
    """The top 16 bits of each float32 as an int32 in [0, 65535] (``shift``: force the
    portable way)."""
    if shift is None:
        shift = x.device.type != "cpu"
    if shift:  # uint16 has few kernels off the CPU
        return (x.view(torch.int32) >> 16) & 0xFFFF
    # The high half of each float32 (little-endian: the odd uint16) is its prefix: one
    # pass.
    return x.view(torch.uint16)[1::2].to(torch.int32)


def _bucket_codes(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The 4-bit index (uint8) of the nearest code for each float32 value; a tie takes the
    lower code."""
    base, threshold, order = _prefix_tables(_key(code), str(scaled.device))
    prefix = _prefix16(scaled)
    q = torch.index_select(base, 0, prefix)
    q.add_(torch.gt(scaled, torch.index_select(threshold, 0, prefix)))
    if not bool(
        (order == torch.arange(16, device=order.device, dtype=torch.uint8)).all()
    ):
        q = torch.index_select(order, 0, q.to(torch.int32))
    return q


def quantize_4bit(
    w: torch.Tensor, code: torch.Tensor, blocksize: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of ``w`` (flattened) to the 16 levels ``code``.

    Returns ``(packed, absmax)``: uint8 ``[(n + 1) // 2]`` with two indices per byte (see
    :func:`pack_nibbles`) and float32 ``[ceil(n / blocksize)]``, one per block; a trailing
    partial block gets its own ``absmax``. Byte-identical to bitsandbytes'
    ``quantize_4bit`` on its CPU path, and to :func:`quantize_4bit_reference`, the
    readable way, which it replaces by a table.

    Note: bitsandbytes scales full blocks by the reciprocal, ``x * (1 / absmax)``, but
    divides the trailing partial block, ``x / absmax``; the two can differ in the last
    bit, so we do the same. Its reciprocal uses ``absmax.clamp(min=1e-38)`` (an all-zero
    block gets codes of 0.0, not NaN), and the clamped value is what it stores for the
    trailing block only; we follow that too.

    Note: the nearest level is found by counting the midpoints strictly below the value (a
    value exactly on a midpoint takes the lower level), as ``torch.bucketize`` would, but
    through a 65,536-entry table on the float's top 16 bits and one comparison, several
    times faster. The clamp to [-1, 1] that bitsandbytes applies cannot change a bucket,
    so we skip it.

    Note: NaN or infinite values raise ValueError: a NaN would otherwise get a silent
    code. The check runs on the per-block ``absmax`` (NaN and inf propagate through the
    max), not on ``w``.
    """
    w = check_float_tensor(w, "w")
    code = _check_code(code)
    blocksize = check_blocksize(blocksize)
    return quantize_4bit_unchecked(w, code, blocksize)


def quantize_4bit_unchecked(
    w: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_4bit` for arguments already checked: the public functions of
    :mod:`peftlab.nf4` check them once and call this, so the checks are not repeated."""
    # a copy for bf16/fp16; a view (no copy) for contiguous float32
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    parts = []
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("w must be finite: it contains NaN or inf values")
    parts.append(
        (blocks * (1.0 / absmax[: full // blocksize].clamp(min=1e-38))[:, None]).view(
            -1
        )
    )
    if full < n:
        parts.append(tail / tail_absmax)
    # bitsandbytes pads the *value* 0.0, so the pad nibble is the code of 0 (7 in NF4)
    if n % 2:
        parts.append(flat.new_zeros(1))
    scaled = parts[0] if len(parts) == 1 else torch.cat(parts)
    return pack_nibbles(_bucket_codes(scaled, code.to(w.device))), absmax


def quantize_4bit_reference(
    w: torch.Tensor, code: torch.Tensor, blocksize: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization the readable way: :func:`quantize_4bit`'s bytes,
    without its table.

    Each block is scaled by its absmax into [-1, 1]; each value takes the level whose
    interval between midpoints holds it (``bucketize``: a value on a midpoint takes the
    lower level), as bitsandbytes' default ops do. The tests check :func:`quantize_4bit`
    against this on every float16 value.
    """
    w, code = check_float_tensor(w, "w"), _check_code(code)
    blocksize = check_blocksize(blocksize)
    flat = w.reshape(-1).float()
    n, full = flat.numel(), flat.numel() - flat.numel() % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if (
        full < n
    ):  # a trailing partial block: its own absmax, and a division (as bitsandbytes)
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("w must be finite: it contains NaN or inf values")
    if (
        n % 2
    ):  # two codes per byte: an odd count is padded with the value 0.0, as bitsandbytes
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    levels, order = torch.sort(code.to(w.device), stable=True)
    midpoints = (levels[:-1] + levels[1:]) / 2
    index = order[torch.bucketize(scaled, midpoints)]  # on a midpoint: the lower level
    return pack_nibbles(index.to(torch.uint8)), absmax


@lru_cache(maxsize=16)
def _pair_table(code_key: tuple[int, ...], device: str) -> torch.Tensor:
    """For each byte, the float32 pair (code[high nibble], code[low nibble]), viewed as
    one int64."""
    code = _from_key(code_key)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous()
    return pairs.view(torch.int64).reshape(256).to(device)


# Bytes of packed codes per step when dequantizing on a CPU: 1 MiB of codes become 8 MiB of float32 values,
# so a step's index, lookup and multiply run in the last-level cache and only the finished values go out to
# memory. Each step's operations are handed to the thread pool, and on a busy machine every hand-off waits for
# a core: so few, large steps. Measured on a 2-core CPU with 32 MiB of cache (4096 x 4096, into a reused
# buffer, against bitsandbytes' native kernel), quiet: 14 KiB steps 1.0-1.1x, 256 KiB 0.53-0.56x, 512 KiB
# 0.48x, 1 MiB 0.51-0.80x, 2 MiB 0.68-0.77x; with both cores busy with other work: 256 KiB 2.6-9.5x,
# 512 KiB 0.64-1.15x, 1 MiB 0.74-0.86x. A GPU wants one launch per operation instead.
_CPU_STEP_BYTES = 1024 * 1024


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The values ``code[index] * absmax[block]`` of the first ``numel`` packed indices,
    as a 1-D tensor.

    Computed in float32 and written to ``out`` (1-D, ``numel`` values, any float dtype:
    the product is rounded once into it) or to a new float32 tensor.

    Note: one lookup per *byte* in a 256-entry table of level pairs (stored as int64, so
    the copy moves bits and never touches a float), then one multiply by the block's
    ``absmax`` that writes the
    result: the same single float32 product per value as bitsandbytes, hence identical
    results.
    """
    code = _check_code(code)
    blocksize = check_blocksize(blocksize)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(
            f"packed must be a uint8 torch.Tensor, got {getattr(packed, 'dtype', type(packed).__name__)}"
        )
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise TypeError(
            f"absmax must be a float32 torch.Tensor, got {getattr(absmax, 'dtype', type(absmax).__name__)}"
        )
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    blocks = -(-numel // blocksize)
    if packed.numel() != (numel + 1) // 2 or absmax.numel() != blocks:
        raise ValueError(
            f"packed must hold {(numel + 1) // 2} bytes and absmax {blocks} values for numel={numel} and "
            f"blocksize={blocksize}, got {packed.numel()} and {absmax.numel()}"
        )
    if out is None:
        out = torch.empty(numel, device=packed.device)
    elif (
        not isinstance(out, torch.Tensor)
        or out.dtype not in FLOAT_DTYPES
        or out.shape != (numel,)
    ):
        raise ValueError(
            f"out must be a 1-D float tensor of {numel} values, got {getattr(out, 'shape', out)!r}"
        )
    dequantize_4bit_into(packed.reshape(-1), absmax, code, blocksize, numel, out)
    return out


def dequantize_4bit_into(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    out: torch.Tensor,
) -> None:
    """:func:`dequantize_4bit` into the 1-D ``out``, for arguments already checked.

    Note: on a CPU the work runs in cache-sized steps (``_CPU_STEP_BYTES``): each step
    looks up pairs of levels for 1 MiB of codes, then multiplies them by their blocks'
    ``absmax`` straight into ``out`` (casting there), so ``out`` is written once and never
    read.
    """
    table = _pair_table(_key(code), str(packed.device))  # 256 pairs of levels, as int64
    full_blocks = numel // blocksize
    # blocksize is even: a whole block is whole bytes
    full_bytes = full_blocks * blocksize // 2
    per_block = blocksize // 2
    # whole blocks per step, so each step has its own absmax values
    if packed.device.type == "cpu":
        step = max(per_block, _CPU_STEP_BYTES // per_block * per_block)
    else:
        step = max(full_bytes, 1)
    index = torch.empty(
        min(step, packed.numel()), dtype=torch.int32, device=packed.device
    )
    pairs = torch.empty(
        min(step, packed.numel()), dtype=torch.int64, device=packed.device
    )
    with torch.no_grad():
        for start in range(0, full_bytes, step):
            stop = min(start + step, full_bytes)
            i, p = index[: stop - start], pairs[: stop - start]
            i.copy_(packed[start:stop])  # index_select wants int32/int64 indices
            torch.index_select(table, 0, i, out=p)
            # The multiply writes ``out`` (and casts to its dtype) in the same pass.
            torch.mul(
                p.view(torch.float32).view(-1, blocksize),
                absmax[start // per_block : stop // per_block, None],
                out=out[2 * start : 2 * stop].view(-1, blocksize),
            )
        # a trailing partial block (and maybe a padding nibble): a few values
        if full_bytes * 2 < numel:
            tail = packed[full_bytes:].to(torch.int32)
            values = torch.index_select(table, 0, tail).view(torch.float32)[
                : numel - 2 * full_bytes
            ]
            torch.mul(values, absmax[-1], out=out[2 * full_bytes :])


def roundtrip(
    w: torch.Tensor, code: torch.Tensor | str, blocksize: int = 64
) -> torch.Tensor:
    """``w`` quantized to ``code`` (a tensor or a name from :data:`CODEBOOKS`) and back,
    same shape and dtype."""
    if isinstance(code, str):
        code = get_code(code)
    packed, absmax = quantize_4bit(w, code, blocksize)
    return (
        dequantize_4bit(packed, absmax, code, blocksize, w.numel())
        .to(w.dtype)
        .reshape(w.shape)
    )
