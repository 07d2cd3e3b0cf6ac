"""What each GPU holds when FSDP2 shards a LLaMA-shaped model N ways, tensor by tensor.

Explained in the chapter *QLoRA across GPUs* (book/chapters/fsdp.md); used by
:func:`peftlab.memory.estimate` (``n_gpus``) through :func:`peftlab.memory.shard_bytes`.

FSDP2 (``torch.distributed.fsdp.fully_shard``) splits every parameter on its first
dimension into N chunks of ``ceil(rows / N)`` rows; each rank stores its chunk padded to
that size, so the first rank's share is ``ceil(rows / N) × row`` bytes and the padding
is at most one row per tensor. Gradients and optimizer states follow the same rows. The
counts here take a model's shape and the element sizes, nothing else, so
:mod:`peftlab.memory` can call them without this module knowing about it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

from peftlab.checks import positive_int
from peftlab.paged import state_bytes
from peftlab.targets import LLAMA_LINEARS

__all__ = [
    "COMPONENTS",
    "ParameterTensor",
    "parameter_tensors",
    "rank_rows",
    "rank_shares",
]

COMPONENTS = (
    "weights",
    "quant_constants",
    "lora_weights",
    "gradients",
    "optimizer_states",
    "activations",
)
"""The parts of a training step's memory, as the memory model counts them
(:mod:`peftlab.memory` names its breakdown by these)."""


class ParameterTensor(NamedTuple):
    """One parameter tensor as FSDP2 shards it."""

    component: str  # "weights", "quant_constants" or "lora_weights"
    in_block: bool  # one per block (repeated n_layers times), or one in all
    trained: bool
    rows: int  # the first dimension, the one FSDP2 splits
    row_bytes: int


def rank_rows(rows: int, n_gpus: int) -> int:
    """Rows of a tensor's first dimension that FSDP2 gives the first of ``n_gpus``
    ranks: ``ceil(rows / n_gpus)``. Every rank's shard is stored padded to this many
    rows; the last ranks hold fewer real ones, or none."""
    positive_int(rows, "rows")
    positive_int(n_gpus, "n_gpus")
    return -(-rows // n_gpus)


def parameter_tensors(
    shape: Any,
    method: str,
    *,
    r: int = 64,
    targets: Iterable[str] = LLAMA_LINEARS,
    weight_bytes: int = 2,
    lora_bytes: int = 2,
    blocksize: int = 64,
    double_quant: bool = True,
    blocksize2: int = 256,
) -> list[ParameterTensor]:
    """Every parameter tensor of a model of ``shape`` (a
    :class:`peftlab.shapes.LlamaShape`) trained with ``method``: one entry per tensor of
    one block, or of the rest (embeddings, final norm, ``lm_head``).

    A 4-bit weight is the layout of :class:`peftlab.fsdp.ShardableLinear4bit`: 1-D
    ``uint8`` tensors of its packed codes and of the bytes of each constant (8-bit
    codes, float32 second-level absmax, float32 offset; or float32 absmax without double
    quantization).
    """
    full, d, w = method == "full", shape.d_model, weight_bytes
    embeddings = 1 if shape.tied_embeddings else 2
    out = [ParameterTensor("weights", False, full, shape.vocab, w * d)] * embeddings
    out.append(ParameterTensor("weights", False, full, d, w))  # the final norm
    out += [ParameterTensor("weights", True, full, d, w)] * 2  # the block's norms
    linears = shape.block_linears()
    for o, i in linears.values():
        if method != "qlora":
            out.append(ParameterTensor("weights", True, full, o, w * i))
            continue
        blocks = math.ceil(o * i / blocksize)
        out.append(ParameterTensor("weights", True, False, (o * i + 1) // 2, 1))
        sizes = (
            (blocks, 4 * math.ceil(blocks / blocksize2), 4)
            if double_quant
            else (4 * blocks,)
        )
        out += [ParameterTensor("quant_constants", True, False, n, 1) for n in sizes]
    if method != "full":
        for t in targets:
            o, i = linears[t]
            out.append(ParameterTensor("lora_weights", True, True, r, lora_bytes * i))
            out.append(ParameterTensor("lora_weights", True, True, o, lora_bytes * r))
    return out


def rank_shares(
    shape: Any,
    method: str,
    n_gpus: int,
    *,
    optimizer_bits: int = 32,
    master_weights: bool = False,
    **tensors: Any,
) -> tuple[dict[str, int], int]:
    """What the first of ``n_gpus`` GPUs holds under FSDP2, one block per group: (its
    shards by component, activations at 0; the bytes of the unsharded parameters it
    holds besides during a step). ``tensors``: the arguments of
    :func:`parameter_tensors` after ``method``.

    Shards: every parameter tensor split on its first dimension, :func:`rank_rows` rows
    each, padding included; gradients and Adam's states
    (:func:`peftlab.paged.state_bytes` for 8-bit states; float32 master weights for
    16-bit trained tensors when asked) for the trained ones, in the same rows.
    Unsharded: the parameters outside the blocks, which FSDP2 gathers at the start of
    forward and keeps until backward is done (the root group is not resharded after
    forward), and two blocks, the one computing and the next, gathered in advance.
    Replicated buffers (RoPE's frequencies) and AdamW's step counters, a few bytes per
    tensor, are left out.
    """
    positive_int(n_gpus, "n_gpus")
    if isinstance(optimizer_bits, bool) or optimizer_bits not in (32, 16, 8):
        raise ValueError(f"optimizer_bits must be 32, 16 or 8, got {optimizer_bits!r}")
    parts = dict.fromkeys(COMPONENTS, 0)
    block = rest = 0
    element = {
        "weights": tensors.get("weight_bytes", 2),
        "lora_weights": tensors.get("lora_bytes", 2),
    }
    for t in parameter_tensors(shape, method, **tensors):
        copies = shape.n_layers if t.in_block else 1
        local = rank_rows(t.rows, n_gpus) * t.row_bytes
        parts[t.component] += copies * local
        if t.in_block:
            block += t.rows * t.row_bytes
        else:
            rest += t.rows * t.row_bytes
        if t.trained:
            numel = local // element[t.component]
            states = (
                state_bytes(numel, 8)
                if optimizer_bits == 8
                else 2 * optimizer_bits // 8 * numel
            )
            if master_weights and element[t.component] < 4:
                states += 4 * numel
            parts["gradients"] += copies * local
            parts["optimizer_states"] += copies * states
    return parts, rest + 2 * block
