"""bitsandbytes as the tests' reference: imported once here, with the workarounds its 0.50.2 CPU path needs.

Test modules import what they need (``from _reference import bnbF, bnb_dequantize_4bit_eager``); importing
this module skips the importing test module (or test) where bitsandbytes is not installed. bitsandbytes' own
``Linear4bit`` is built by the package's :func:`peftlab.qlora.bnb_linear4bit`, not here.

Note: bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` mis-indexes ``absmax`` for some 2-D shapes whose
rows straddle a block or are shorter than one (e.g. 7 × 320 or 256 × 64 in blocks of 128; documented by
tests/test_nf4.py::test_bnb_native_cpu_dequantize_4bit_is_wrong_for_2d_rows_straddling_a_block). So the
references for arbitrary shapes are its pure-PyTorch definition (:func:`bnb_dequantize_4bit_eager`) and its
public ``dequantize_4bit`` on the flattened tensor (:func:`bnb_dequantize_4bit_flat`), which are right.
"""

from __future__ import annotations

import logging

import torch

import bitsandbytes as bnb
bnbF = bnb.functional
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__all__ = ["bnb", "bnbF", "bnb_dequantize_4bit", "bnb_dequantize_4bit_eager", "bnb_dequantize_4bit_flat",
           "nested_absmax"]


def nested_absmax(state) -> torch.Tensor:
    """The float32 absmax of a 4-bit ``QuantState``: its 8-bit constants dequantized plus the offset if nested."""
    if not state.nested:
        return state.absmax
    return bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset


def bnb_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' public ``dequantize_4bit``; its ``torch.compile``'d fallback (odd last dims) run eagerly.

    Note: on the CPU this is right only where the last dim is odd or a multiple of the blocksize (see the
    module's note); use :func:`bnb_dequantize_4bit_flat` or :func:`bnb_dequantize_4bit_eager` for other shapes.
    """
    with torch.compiler.set_stance("force_eager"):
        return bnbF.dequantize_4bit(packed, state)


def bnb_dequantize_4bit_flat(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' public ``dequantize_4bit`` run on the flattened tensor (where its CPU kernel is right),
    viewed back to ``state.shape``; ``state`` itself is left unchanged."""
    flat = bnbF.QuantState(absmax=state.absmax, shape=torch.Size([state.shape.numel()]), code=state.code,
                           blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
                           offset=state.offset, state2=state.state2)
    return bnb_dequantize_4bit(packed, flat).view(state.shape)


def bnb_dequantize_4bit_eager(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' pure-PyTorch dequantize (``backends/default/ops.py``) run eagerly, in ``state.shape``:
    its definition of the 4-bit format (nested constants dequantized first, as ``dequantize_4bit`` does)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = _get_4bit_code(state.quant_type, packed.device)
    return eager(packed.reshape(-1), nested_absmax(state), code, state.blocksize, state.shape, state.dtype)
