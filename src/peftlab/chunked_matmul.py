"""A CPU product by a 4-bit weight dequantized a chunk of rows at a time, each chunk
multiplied while it is still in the processor's cache.

Explained in the chapter *QLoRA end to end* (book/chapters/qlora.md), section *Where the
dequantized weight goes*: the forward of :class:`peftlab.qlora.Linear4bit` on a CPU.
"""

from __future__ import annotations

import torch

from peftlab.nf4 import NF4Tensor, absmax_values, dequantize_nf4_rows
from peftlab.workspace import DequantWorkspace, scratch

__all__ = ["CPU_CHUNK_BYTES", "chunk_rows", "chunked_linear"]

# Bytes of weight dequantized at a time by a CPU forward: a chunk of rows stays in the
# last-level cache between the dequantization that writes it and the product that reads
# it, so the whole weight is never written to memory and read back. Measured on a quiet
# 2-core CPU with 32 MiB of cache (LLaMA-7B's q_proj, float32, 4 × 128 tokens, against the
# same product on the whole dequantized weight): 1 MiB chunks 1.2× slower (small
# products), 4 MiB 0.95×, 8 MiB 0.93×, 16 MiB 0.85–1.0× (noisy); a single token 0.7×.
CPU_CHUNK_BYTES = 8 * 2**20


def chunk_rows(weight: NF4Tensor, dtype: torch.dtype) -> int | None:
    """Rows per chunk for a chunked product by ``weight`` in ``dtype``, or None for one
    product on the whole dequantized weight (on a GPU, for rows that are not whole
    blocks, or when one chunk would hold the whole weight anyway)."""
    if not isinstance(weight, NF4Tensor) or len(weight.shape) != 2:
        raise TypeError(f"weight must be a 2-D NF4Tensor, got {weight!r}")
    if weight.device.type != "cpu" or weight.shape[1] % weight.blocksize:
        return None
    rows = max(1, CPU_CHUNK_BYTES // (weight.shape[1] * dtype.itemsize))
    return rows if rows < weight.shape[0] else None


def chunked_linear(
    x: torch.Tensor,
    weight: NF4Tensor,
    bias: torch.Tensor | None,
    rows: int,
    workspace: DequantWorkspace | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` dequantized ``rows`` rows at a time (into a
    buffer of ``workspace``, or a fresh one), each chunk multiplied while it is in
    cache: ``yᵀ[rows] = W[rows] xᵀ``.

    Note: each output is the dot product of the same numbers as in one whole product,
    but the matmul kernel may sum it in another order, so results can differ from
    ``F.linear`` on the whole weight in the last bits (float rounding; the tests bound
    it). The output is made contiguous, as ``F.linear``'s is.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features)
    y_t = torch.empty(out_features, x2.shape[0], dtype=x.dtype, device=x.device)
    absmax = absmax_values(weight)  # double quantization undone once, not per chunk
    shape = torch.Size([rows, in_features])
    with scratch(workspace, shape, x.dtype, weight.device) as buffer:
        for start in range(0, out_features, rows):
            stop = min(start + rows, out_features)
            w = dequantize_nf4_rows(weight, start, stop, buffer[: stop - start], absmax)
            torch.mm(w, x2.t(), out=y_t[start:stop])
    y = y_t.t().contiguous()
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], out_features)
