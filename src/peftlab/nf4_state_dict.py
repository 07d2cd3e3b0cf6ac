"""An NF4 weight in bitsandbytes' state-dict layout: the tensors bitsandbytes'
``Linear4bit`` saves it as, and the weight read back from them.

Explained in the chapter *QLoRA end to end* (book/chapters/qlora.md): what
``peftlab.qlora.Linear4bit.state_dict()`` holds, so that ``safetensors`` saves a 4-bit
model without pickle, and a 4-bit checkpoint of bitsandbytes loads into ours and ours
into bitsandbytes.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from peftlab.codebooks import get_code
from peftlab.nf4 import NF4Tensor

__all__ = [
    "QUANT_STATE_KEY",
    "REQUIRED_STATE_KEYS",
    "STATE_KEYS",
    "layout_differences",
    "nf4_from_state_dict",
    "nf4_to_state_dict",
]

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
"""The key of the non-tensor fields, JSON bytes in a uint8 tensor."""

STATE_KEYS = (
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    QUANT_STATE_KEY,
)
"""Every key of a weight's state (the nested ones with double quantization only)."""

REQUIRED_STATE_KEYS = ("weight", "weight.absmax", QUANT_STATE_KEY)
"""The keys without which no weight can be read."""


def nf4_to_state_dict(q: NF4Tensor) -> dict[str, torch.Tensor]:
    """``q`` as bitsandbytes 0.50.2 saves it (``Linear4bit._save_to_state_dict`` and
    ``QuantState.as_dict(packed=True)``), keys as in :data:`STATE_KEYS`: the packed
    bytes as ``weight`` of shape ``[(numel + 1) // 2, 1]``, the constants and lookup
    tables beside it, the non-tensor fields under :data:`QUANT_STATE_KEY`.

    Note: the tables are copied per weight: tensors sharing memory cannot go in one
    safetensors file.
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    tensors = {
        "weight": q.packed.view(-1, 1),
        "weight.absmax": q.absmax if not q.double_quant else q.absmax.codes,
        "weight.quant_map": get_code("nf4", q.device).clone(),
    }
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": str(q.dtype).removeprefix("torch."),
        "shape": list(q.shape),
    }
    if q.double_quant:
        from peftlab.double_quant import dynamic_map

        tensors["weight.nested_absmax"] = q.absmax.absmax2
        tensors["weight.nested_quant_map"] = dynamic_map(True).to(q.device)
        meta.update(
            nested_blocksize=q.absmax.blocksize2,
            nested_dtype="float32",
            nested_offset=q.absmax.offset.item(),  # a float32, exact as a Python float
        )
    # bitsandbytes' pack_dict_to_tensor: UTF-8 JSON bytes in a uint8 tensor
    data = json.dumps(meta).encode("utf-8")
    tensors[QUANT_STATE_KEY] = torch.tensor(
        list(data), dtype=torch.uint8, device=q.device
    )
    return tensors


def nf4_from_state_dict(
    tensors: dict[str, torch.Tensor], device: torch.device
) -> NF4Tensor:
    """The :class:`NF4Tensor` stored under ``weight*`` keys (ours or bitsandbytes'), on
    ``device``; ValueError if it is not NF4 in a format we read."""
    try:
        meta = json.loads(
            bytes(tensors[QUANT_STATE_KEY].cpu().tolist()).decode("utf-8")
        )
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{QUANT_STATE_KEY} is not JSON metadata: {err}") from None
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"quant_type must be 'nf4', got {meta.get('quant_type')!r}")
    code = tensors.get("weight.quant_map")
    if code is not None and not torch.equal(code.float().cpu(), get_code("nf4")):
        raise ValueError("weight.quant_map is not the NF4 table")
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {meta['dtype']!r} in {QUANT_STATE_KEY}")
    packed = tensors["weight"].detach().reshape(-1)
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage over the same bytes
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.to(device).clone()
    absmax = tensors["weight.absmax"].detach().to(device).reshape(-1).clone()
    if "nested_blocksize" in meta:
        from peftlab.double_quant import DoubleQuantState, dynamic_map

        if "weight.nested_absmax" not in tensors:
            raise ValueError("double-quantized weight without weight.nested_absmax")
        nested_code = tensors.get("weight.nested_quant_map")
        if nested_code is not None and not torch.equal(
            nested_code.float().cpu(), dynamic_map(True)
        ):
            raise ValueError("weight.nested_quant_map is not the signed dynamic map")
        absmax2 = (
            tensors["weight.nested_absmax"].detach().float().to(device).reshape(-1)
        )
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        absmax = DoubleQuantState(
            absmax, absmax2.clone(), offset.to(device), int(meta["nested_blocksize"])
        )
    else:
        absmax = absmax.float()
    return NF4Tensor(
        packed, absmax, torch.Size(meta["shape"]), dtype, int(meta["blocksize"])
    )


def layout_differences(got: NF4Tensor, expected: NF4Tensor) -> list[str]:
    """How the layout of ``got`` (a weight read back) differs from ``expected`` (the
    layer's): shape, block size, double quantization and its block size, one
    ``"name got (this layer: expected)"`` each; empty if none does."""

    def layout(q: NF4Tensor) -> dict[str, Any]:
        blocksize2 = getattr(q.absmax, "blocksize2", None)
        return dict(
            shape=tuple(q.shape),
            blocksize=q.blocksize,
            double_quant=q.double_quant,
            blocksize2=blocksize2,
        )

    found, wanted = layout(got), layout(expected)
    return [
        f"{k} {found[k]} (this layer: {wanted[k]})"
        for k in found
        if found[k] != wanted[k]
    ]
