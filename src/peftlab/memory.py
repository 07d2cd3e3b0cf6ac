"""How much memory one training step needs, estimated: the bytes one GPU holds,
component by
component, computed from the model's shape alone.

Explained in the chapter *Memory savings* (book/chapters/memory.md).

:func:`estimate` adds up, in bytes, what one GPU holds during a training step of a
LLaMA-shaped model — weights, quantization constants, LoRA weights, gradients, optimizer
states, activations — for full finetuning, 16-bit LoRA and QLoRA, as a
:class:`Breakdown`.
:mod:`peftlab.measure` measures the same components for a real step, and so checks it.

Note: the activation count is for Hugging Face's ``LlamaForCausalLM`` with SDPA
attention
(no sequence × sequence matrix is kept) and its ``labels=`` loss, which casts the logits
to float32. It was derived by listing the tensors autograd saves in that code and is
checked against :func:`peftlab.measure.measure_step`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from peftlab.checks import positive_int
from peftlab.paged import state_bytes
from peftlab.pages import DEFAULT_PAGE_BYTES
from peftlab.shapes import LLAMA, LlamaShape
from peftlab.sharding import COMPONENTS, rank_shares
from peftlab.targets import LLAMA_LINEARS

__all__ = [
    "COMPONENTS",
    "GPUS",
    "METHODS",
    "Breakdown",
    "activation_bytes",
    "dequantized_weight_bytes",
    "estimate",
    "quantized_bytes",
    "shard_bytes",
]

METHODS = ("full", "lora", "qlora")

GiB = 1024**3
GPUS: dict[str, int] = {"24 GB": 24 * GiB, "48 GB": 48 * GiB, "80 GB": 80 * GiB}
"""Usable memory of the usual cards. Note: a "24/48/80 GB" card (RTX 4090, RTX A6000,
A100/H100 80GB) has
24/48/80 GiB; CUDA's context and the allocator take a few hundred MB of it, which no
estimate here counts."""


@dataclass(frozen=True)
class Breakdown:
    """Bytes per component (per GPU when sharded); ``total`` is their sum."""

    weights: int = 0
    quant_constants: int = 0
    lora_weights: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in COMPONENTS)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def __str__(self) -> str:
        rows = [f"{c:>17}: {getattr(self, c) / 1e9:10.3f} GB" for c in COMPONENTS]
        return "\n".join([*rows, f"{'total':>17}: {self.total / 1e9:10.3f} GB"])


# -----------------------------------------------------------------------------------
# estimate


def _dtype_bytes(dtype: Any, name: str) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def _shape(model: Any) -> LlamaShape:
    if isinstance(model, LlamaShape):
        return model
    if isinstance(model, str):
        if model not in LLAMA:
            raise ValueError(
                f"unknown model {model!r}; known: {', '.join(LLAMA)} (or pass a config)"
            )
        return LLAMA[model]
    return LlamaShape.from_config(model)


def quantized_bytes(
    numel: int,
    blocksize: int = 64,
    double_quant: bool = True,
    blocksize2: int = 256,
) -> tuple[int, int]:
    """(packed 4-bit codes, quantization constants) in bytes for one tensor of ``numel``
    elements.

    Constants: one float32 absmax per block; with double quantization one uint8 code per
    block, one float32 absmax per ``blocksize2`` blocks and one float32 offset (QLoRA
    §3).

    Note: the lookup tables (16 NF4 values, 256 values of the 8-bit map) are shared
    constants and not counted; bitsandbytes keeps a copy per tensor, about 1 KB, which
    is
    below a rounding error here.
    """
    for value, name in (
        (numel, "numel"),
        (blocksize, "blocksize"),
        (blocksize2, "blocksize2"),
    ):
        positive_int(value, name)
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / blocksize2) + 4
    else:
        constants = 4 * blocks
    return (numel + 1) // 2, constants


def dequantized_weight_bytes(shape: LlamaShape, compute_dtype: torch.dtype) -> int:
    """Bytes of the largest of a block's seven linear weights dequantized to
    ``compute_dtype``: what QLoRA's 4-bit layers need for a product beside its input, a
    temporary each time or the buffer of a :class:`peftlab.workspace.DequantWorkspace`
    they share."""
    p = _dtype_bytes(compute_dtype, "compute_dtype")
    return p * max(o * i for o, i in shape.block_linears().values())


def activation_bytes(
    shape: LlamaShape,
    method: str,
    *,
    batch: int = 1,
    seq: int = 512,
    gradient_checkpointing: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    lora_dtype: torch.dtype | None = None,
    r: int = 64,
    lora_dropout: float = 0.0,
    device: str = "cuda",
    dequant_workspace: bool = False,
) -> int:
    """Peak bytes of activations (and other step temporaries) of one training step.

    Per token and block, autograd keeps (``p`` bytes per compute element, ``d`` model
    width, ``f`` FFN width, ``h`` heads): per RMSNorm its float32 input, its normalized
    output and ``1/rms``; queries, keys (after RoPE), values and the attention output,
    plus SDPA's float32 log-sum-exp per head; the four ``f``-wide tensors of the SwiGLU
    MLP (gate, SiLU(gate), up, product). With a frozen base the norms' scaled outputs
    are
    not saved (their weight needs no gradient); LoRA adds the ``r``-wide ``x Aᵀ`` of
    each
    adapter, and a copy of the adapter's input where dropout or a different LoRA dtype
    makes one. The head keeps the final norm's input and, at its peak in backward, the
    float32 log-probabilities, their gradient and the logits' float32 gradient: 12 bytes
    per vocabulary entry and token. With gradient checkpointing only each block's input
    is
    kept, and one block is recomputed at a time. QLoRA adds one dequantized weight
    matrix
    (the largest, :func:`dequantized_weight_bytes`), a transient; not with
    ``dequant_workspace``, where the layers dequantize into a workspace instead, which
    :func:`estimate` counts.

    Note: the logits themselves are not counted: a training loop that keeps only the
    loss
    (as ``transformers.Trainer`` does) frees them before backward. Keeping ``outputs``
    alive adds ``p`` bytes per vocabulary entry and token.
    Note: the adapters are assumed on all seven linear layers (QLoRA's setup); with
    fewer,
    frozen layers keep less and the count is an upper bound.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    for value, name in ((batch, "batch"), (seq, "seq"), (r, "r")):
        positive_int(value, name)
    p = _dtype_bytes(compute_dtype, "compute_dtype")
    pl = p if lora_dtype is None else _dtype_bytes(lora_dtype, "lora_dtype")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    d, f, h, kv, V = shape.d_model, shape.ffn, shape.n_heads, shape.kv_dim, shape.vocab
    frozen = method in ("lora", "qlora")
    # Note: for float32 compute the RMSNorm's .to(float32) is a no-op; 4 + 2p still
    # counts
    # its input, the normalized tensor and the output once each.
    norm_out = p * d  # the norm's output, kept by whoever reads it next
    attention = p * (2 * d + 2 * kv) + 4 * h
    mlp = 3 * p * f
    mlp_out = p * f  # SiLU(gate) * up, the input of down_proj
    if not frozen:
        block = 2 * ((4 + p) * d + 4 + norm_out) + attention + mlp + mlp_out
    else:
        block = 2 * (4 * d + 4) + attention + mlp + 7 * pl * r
        # what the seven adapters read: q, k, v, o, gate, up (d wide) and down (f wide)
        inputs = 6 * d + f
        if lora_dropout > 0 or pl != p:
            # Each adapter keeps its own copy of its input (dropped out and/or cast);
            # the
            # shared inputs themselves are then kept by nobody. Note: dropout's mask is
            # a
            # bool on CUDA (native_dropout) but a p-byte float on a CPU.
            mask = (1 if device == "cuda" else p) if lora_dropout > 0 else 0
            block += inputs * (pl + mask)
        else:
            block += 2 * norm_out + mlp_out
    # Head: the final norm, then the loss in float32: log-probabilities, their gradient
    # and the logits' gradient (12 bytes per vocabulary entry); the logits themselves
    # are
    # gone by then.
    head = (4 * d + 4 if frozen else (4 + 2 * p) * d + 4) + 12 * V + p * d
    tokens = batch * seq
    if gradient_checkpointing:
        # Recomputing a block, its activations meet the gradients in flight: the
        # residual
        # stream's and, in the MLP's backward, one f-wide and two d-wide gradients at
        # most.
        total = tokens * (shape.n_layers * p * d + max(head, block + p * (3 * d + f)))
    else:
        total = tokens * (shape.n_layers * block + head)
    if method == "qlora" and not dequant_workspace:
        total += dequantized_weight_bytes(shape, compute_dtype)
    return total


def estimate(
    model: Any,
    method: str,
    *,
    r: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype | None = None,
    lora_dtype: torch.dtype | None = None,
    optimizer_bits: int = 32,
    master_weights: bool = False,
    batch: int = 1,
    seq: int = 512,
    gradient_checkpointing: bool = True,
    blocksize: int = 64,
    double_quant: bool = True,
    blocksize2: int = 256,
    lora_dropout: float = 0.0,
    target_modules: Iterable[str] = LLAMA_LINEARS,
    n_gpus: int = 1,
    device: str = "cuda",
    dequant_workspace: bool = False,
) -> Breakdown:
    """Bytes one GPU needs for a training step of ``model`` with ``method``.

    Args:
        model: ``"llama-7b"``, ``"llama-13b"``, ``"llama-33b"``, ``"llama-65b"``, a
            :class:`LlamaShape` or a ``transformers.LlamaConfig``.
        method: ``"full"`` (every parameter trained), ``"lora"`` (frozen 16-bit base) or
            ``"qlora"`` (frozen NF4 base of the blocks' linear layers; embeddings, norms
            and ``lm_head`` in ``dtype``). r, target_modules, lora_dropout: the adapters
            (default: r=64 on all seven linear layers).
        dtype: storage of weights and gradients (bf16); ``compute_dtype`` defaults to
        it,
            ``lora_dtype`` (the adapters and their gradients) too.
        optimizer_bits: 32 (default), 16 or 8 — Adam's two states per trained parameter,
            updated page by page as a paged AdamW does (``torch.optim.AdamW`` with
            ``foreach=True`` briefly needs a temporary as large as all its states, which
            is not counted). 8 counts bitsandbytes' ``AdamW8bit`` states as
            :class:`peftlab.paged.PagedAdamW` with ``optim_bits=8`` keeps them
            (:func:`peftlab.paged.state_bytes`, tensor by tensor: one byte per element
            and
            one float32 absmax per block of 256, per state; tensors below 4096 elements
            keep 32-bit states).
        master_weights: keep a float32 copy of every trained parameter stored in fewer
            than 32 bits (mixed precision's "master weights"; ``torch.amp`` with float32
            parameters needs none). Counted with the optimizer states, as ZeRO does: 4
            bytes per such parameter, so full finetuning costs 16 bytes per parameter
            instead of 12. batch, seq, gradient_checkpointing: the activations (see
            :func:`activation_bytes`). blocksize, double_quant, blocksize2: the 4-bit
            format (QLoRA: 64, True, 256).
        device: ``"cuda"`` (default) or ``"cpu"``: where the step runs (only dropout's
        mask differs).
        n_gpus: ZeRO-3 / FSDP sharding: weights, constants, gradients and states are
        split
            over the GPUs as FSDP2 splits them (:func:`shard_bytes`, the first GPU's
            share); ``weights`` also counts the unsharded parameters a GPU holds during
            the step (the non-block parameters and two blocks). Activations are per GPU.
        dequant_workspace: QLoRA's 4-bit layers dequantize into a
            :class:`peftlab.workspace.DequantWorkspace` (default: a fresh tensor per
            product). Its buffer, the largest quantized weight in ``compute_dtype``
            (:func:`dequantized_weight_bytes`), is held through the whole step and
            counted with the activations, in place of the transient it replaces there.

    Note: defaults are the QLoRA paper's setup (bf16, r=64 everywhere, 32-bit AdamW,
    batch
    1, sequence 512, checkpointing; adapters in bf16 as the paper's code casts them:
    PEFT
    keeps them in float32 by default, ``lora_dtype=torch.float32``). Full finetuning
    defaults to 16-bit weights and gradients and no float32 master copy: 12 bytes per
    parameter before activations, the count behind the paper's "more than 780 GB" for
    65B; ``master_weights=True`` gives the 16 of mixed-precision training.
    """
    shape = _shape(model)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    for value, name in ((r, "r"), (batch, "batch"), (seq, "seq"), (n_gpus, "n_gpus")):
        positive_int(value, name)
    if isinstance(optimizer_bits, bool) or optimizer_bits not in (32, 16, 8):
        raise ValueError(f"optimizer_bits must be 32, 16 or 8, got {optimizer_bits!r}")
    if not isinstance(master_weights, bool):
        raise TypeError(f"master_weights must be a bool, got {master_weights!r}")
    if not isinstance(dequant_workspace, bool):
        raise TypeError(f"dequant_workspace must be a bool, got {dequant_workspace!r}")
    if dequant_workspace and method != "qlora":
        raise ValueError(
            f"dequant_workspace applies to method='qlora' only, got method={method!r}"
        )
    if (
        isinstance(lora_dropout, bool)
        or not isinstance(lora_dropout, (int, float))
        or not 0 <= lora_dropout < 1
    ):
        raise ValueError(
            f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}"
        )
    targets = list(target_modules)
    linears = shape.block_linears()
    unknown = [t for t in targets if t not in linears]
    if unknown or not targets:
        raise ValueError(
            f"target_modules must be a non-empty subset of {LLAMA_LINEARS}, got "
            f"{targets}"
        )
    w = _dtype_bytes(dtype, "dtype")
    compute_dtype = dtype if compute_dtype is None else compute_dtype
    lora_dtype = dtype if lora_dtype is None else lora_dtype
    wl = _dtype_bytes(lora_dtype, "lora_dtype")
    state = 2 * optimizer_bits // 8

    lora_params = shape.lora_params(r, targets)
    if method == "full":
        trained, trained_bytes = shape.n_params, w
        parts = dict(weights=w * shape.n_params)
    elif method == "lora":
        trained, trained_bytes = lora_params, wl
        parts = dict(weights=w * shape.n_params, lora_weights=wl * lora_params)
    else:
        packed = constants = 0
        for out_f, in_f in linears.values():
            c, q = quantized_bytes(out_f * in_f, blocksize, double_quant, blocksize2)
            packed, constants = packed + c, constants + q
        trained, trained_bytes = lora_params, wl
        parts = dict(
            weights=shape.n_layers * packed + w * shape.other_params,
            quant_constants=shape.n_layers * constants,
            lora_weights=wl * lora_params,
        )
    parts["gradients"] = trained_bytes * trained
    if optimizer_bits == 8:
        parts["optimizer_states"] = sum(
            state_bytes(n, 8) for n in shape.trained_numels(method, r, targets)
        )
    else:
        parts["optimizer_states"] = state * trained
    if master_weights and trained_bytes < 4:
        parts["optimizer_states"] += 4 * trained
    if n_gpus > 1:
        # FSDP2's split, tensor by tensor (each padded to whole rows on every GPU), plus
        # the unsharded parameters a step holds besides: see shard_bytes.
        sharded, gathered = shard_bytes(
            shape,
            method,
            n_gpus,
            r=r,
            targets=targets,
            dtype=dtype,
            lora_dtype=lora_dtype,
            blocksize=blocksize,
            double_quant=double_quant,
            blocksize2=blocksize2,
            optimizer_bits=optimizer_bits,
            master_weights=master_weights,
        )
        parts = {**sharded.as_dict(), "weights": sharded.weights + gathered}
        del parts["total"]
    activations = activation_bytes(
        shape,
        method,
        batch=batch,
        seq=seq,
        gradient_checkpointing=gradient_checkpointing,
        compute_dtype=compute_dtype,
        lora_dtype=lora_dtype,
        r=r,
        lora_dropout=lora_dropout,
        device=device,
        dequant_workspace=dequant_workspace,
    )
    # The optimizer update runs after backward, when the activations are gone; a paged
    # AdamW (ours, or bitsandbytes') needs at most two page-sized temporaries for it.
    if method == "full":
        largest = shape.vocab * shape.d_model
    else:
        largest = max(r * max(o, i) for o, i in (linears[t] for t in targets))
    # the temporaries are in the states' dtype; 8-bit states are dequantized to float32
    temporary = 4 if optimizer_bits == 8 else optimizer_bits // 8
    update = 2 * min(largest * temporary, DEFAULT_PAGE_BYTES)
    parts["activations"] = max(activations, update)
    if dequant_workspace:  # held during the update too
        parts["activations"] += dequantized_weight_bytes(shape, compute_dtype)
    return Breakdown(**parts)


def shard_bytes(
    model: Any, method: str, n_gpus: int, **kwargs: Any
) -> tuple[Breakdown, int]:
    """What the first of ``n_gpus`` GPUs holds when FSDP2 shards ``model`` (a name, a
    :class:`LlamaShape` or a config) one block per group: its shards by component
    (activations aside), and the bytes of the unsharded parameters it holds besides
    during a step. ``kwargs``: ``r``, ``targets``, ``dtype``, ``lora_dtype``,
    ``blocksize``, ``double_quant``, ``blocksize2``, ``optimizer_bits``,
    ``master_weights``, as for :func:`estimate`. The rule is
    :func:`peftlab.sharding.rank_shares` (the chapter *QLoRA across GPUs*)."""
    shape = _shape(model)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    dtype = kwargs.pop("dtype", torch.bfloat16)
    lora_dtype = kwargs.pop("lora_dtype", None) or dtype
    parts, gathered = rank_shares(
        shape,
        method,
        n_gpus,
        weight_bytes=_dtype_bytes(dtype, "dtype"),
        lora_bytes=_dtype_bytes(lora_dtype, "lora_dtype"),
        **kwargs,
    )
    return Breakdown(**parts), gathered
