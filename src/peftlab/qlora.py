"""QLoRA's frozen base: a 4-bit linear layer (NF4, double quantization) and a function
that quantizes a model.

Explained in the chapter *QLoRA end to end* (book/chapters/qlora.md).

Storage and compute are separate (Dettmers et al. 2023, §3, Eq. 5–6): weights are stored
in NF4 with double-quantized constants and dequantized to the compute dtype for every
matmul; only LoRA adapters on top (:func:`peftlab.lora.add_lora`) get gradients. The
whole preparation of a model, these layers plus adapters started at zero, from PiSSA or
from LoftQ, is :func:`peftlab.prepare.prepare_qlora`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from peftlab.devices import compute_dtype as default_compute_dtype
from peftlab.nf4 import (
    NF4Tensor,
    absmax_values,
    dequantize_nf4,
    dequantize_nf4_rows,
    quantize_nf4,
    to_bnb,
)
from peftlab.targets import matches_target

__all__ = [
    "COMPUTE_DTYPES",
    "KERNELS",
    "Linear4bit",
    "bnb_cpu_skip_modules",
    "bnb_linear4bit",
    "free_workspaces",
    "quantize_model",
    "workspace_nbytes",
]

KERNELS = ("torch", "bnb")

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes a :class:`Linear4bit` dequantizes to and multiplies in."""


# Each thread's dequantization buffer, by (dtype, device): as large as the largest weight
# seen, every smaller weight dequantized into its beginning. So a LLaMA block's seven
# layers (three shapes) share one buffer the size of its largest matrix: what a fresh
# dequantized weight already cost at its peak, now allocated once. Per thread, because two
# threads running layers at once would otherwise write one buffer together; autograd's
# backward may run on another thread than the forward (on a GPU it does), which then has a
# buffer of its own.
_WORKSPACES = threading.local()


def _workspace(
    shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A contiguous ``shape`` view of this thread's buffer for ``dtype`` on ``device``,
    grown if too small.

    Note: made outside inference mode even when first asked for inside it: an inference
    tensor could not be written later by a forward that runs with autograd on.
    """
    buffers: dict[tuple, torch.Tensor] = _WORKSPACES.__dict__.setdefault("buffers", {})
    key, numel = (dtype, device), shape.numel()
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)  # free the smaller buffer before allocating the larger one
        with torch.inference_mode(False):
            buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def workspace_nbytes() -> int:
    """Bytes held by the calling thread's dequantization workspaces (one per compute dtype
    and device)."""
    buffers = _WORKSPACES.__dict__.get("buffers", {})
    return sum(b.numel() * b.element_size() for b in buffers.values())


def free_workspaces() -> None:
    """Drop the calling thread's dequantization workspaces; the next 4-bit forward makes
    them again."""
    _WORKSPACES.__dict__.pop("buffers", None)


# Bytes of weight dequantized at a time by a CPU forward: a chunk of rows stays in the last-level
# cache between the dequantization that writes it and the product that reads it, so the whole
# weight is never written to memory and read back. Measured on a quiet 2-core CPU with 32 MiB of
# cache (LLaMA-7B's q_proj, float32, 4 × 128 tokens, against the same product on the whole
# dequantized weight): 1 MiB chunks 1.2× slower (small products), 4 MiB 0.95×, 8 MiB 0.93×,
# 16 MiB 0.85–1.0× (noisy); a single token 0.7×.
CPU_CHUNK_BYTES = 8 * 2**20


def _chunk_rows(layer: Linear4bit, dtype: torch.dtype) -> int | None:
    """Rows per chunk for a chunked forward of ``layer``, or None for one product on the
    whole dequantized weight (on a GPU, without a workspace, for rows that are not whole
    blocks, or when one chunk would hold the whole weight anyway)."""
    q = layer.weight
    if q.device.type != "cpu" or not layer.workspace or q.shape[1] % q.blocksize:
        return None
    rows = max(1, CPU_CHUNK_BYTES // (q.shape[1] * dtype.itemsize))
    return rows if rows < q.shape[0] else None


def _chunked_linear(
    x: torch.Tensor, layer: Linear4bit, bias: torch.Tensor | None, rows: int
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` dequantized ``rows`` rows at a time into the
    workspace, each chunk multiplied while it is in cache: ``yᵀ[rows] = W[rows] xᵀ``.

    Note: each output is the dot product of the same numbers as in one whole product, but
    the matmul kernel may sum it in another order, so results can differ from
    ``F.linear`` on the whole weight in the last bits (float rounding; the tests bound
    it). The output is made contiguous, as ``F.linear``'s is.
    """
    q = layer.weight
    out_features, in_features = q.shape
    x2 = x.reshape(-1, in_features)
    y_t = torch.empty(out_features, x2.shape[0], dtype=x.dtype, device=x.device)
    absmax = absmax_values(q)  # double quantization undone once, not per chunk
    buffer = _workspace(torch.Size([rows, in_features]), x.dtype, q.device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        w = dequantize_nf4_rows(q, start, stop, buffer[: stop - start], absmax)
        torch.mm(w, x2.t(), out=y_t[start:stop])
    y = y_t.t().contiguous()
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], out_features)


class _Dequantize4bitMatmul(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` dequantized from 4 bits, in forward and again in
    backward.

    Note: nothing weight-sized is saved for backward. ``F.linear(x, W)`` on a dequantized
    ``W`` would keep ``W`` (needed for the input gradient) until backward: every layer's
    full-precision weight at once, which is the memory QLoRA exists to save. Dequantizing
    twice costs time, not memory.
    Note: ``W`` is the thread's workspace (see :meth:`Linear4bit.weight_for_matmul`),
    overwritten by the next 4-bit layer; that is safe because it is used only inside each
    call: the products below are new tensors, never views of it, and backward is
    ``once_differentiable`` (it runs without autograd, so a double backward cannot save
    the workspace and read it after it changed).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        rows = _chunk_rows(layer, x.dtype)
        if rows is None:
            return F.linear(x, layer.weight_for_matmul(x.dtype), bias)
        return _chunked_linear(x, layer, bias, rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_y @ ctx.layer.weight_for_matmul(grad_y.dtype), None


class Linear4bit(nn.Module):
    """A frozen linear layer stored in NF4 (``weight`` is a
    :class:`peftlab.nf4.NF4Tensor`).

    ``forward`` casts the input to ``compute_dtype``, dequantizes the weight to it,
    multiplies, and casts the result back to the input's dtype (as bitsandbytes'
    ``Linear4bit`` does). With ``kernels="bnb"`` the product runs in bitsandbytes'
    ``matmul_4bit`` on the same bytes.

    ``compute_dtype`` defaults to :func:`peftlab.devices.compute_dtype` of the weight's
    device: float32 on a CPU, bfloat16 on GPUs that compute it natively (sm80+), float16
    on older ones (T4).

    Note: ``.to(device)`` moves the packed bytes; ``.to(dtype)`` (and ``.half()``,
    ``.bfloat16()``...) only changes ``compute_dtype``. Neither re-quantizes, so the 4-bit
    values never drift.
    Note: ``state_dict()`` holds the 4-bit weight as bitsandbytes' ``Linear4bit`` does
    (see :meth:`_save_to_state_dict`): ``weight`` (the packed codes), ``weight.absmax``,
    ``weight.quant_map``, with double quantization ``weight.nested_absmax`` and
    ``weight.nested_quant_map``, and the metadata as a JSON byte tensor; all tensors, so
    ``safetensors`` saves it without pickle. ``load_state_dict`` restores the very same
    bytes into a layer of the same shape and format and raises ``ValueError`` naming what
    differs otherwise.
    Note: ``peftlab_linear = True`` lets :class:`peftlab.lora.LoRALinear` wrap it;
    ``merge()`` refuses it (merging into 4 bits would round the update away), so keep
    adapters separate or dequantize first.
    Note: with ``workspace=True`` (default) the weight is dequantized into a buffer reused
    by every 4-bit layer on the thread with the same compute dtype and device (see
    :meth:`weight_for_matmul`): one buffer the size of the largest weight, held for good,
    instead of a fresh one allocated and freed at every call. ``workspace=False``
    allocates.
    """

    peftlab_linear = True

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        kernels: str = "torch",
        workspace: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(weight, NF4Tensor):
            raise TypeError(
                f"weight must be an NF4Tensor (see peftlab.nf4.quantize_nf4), got {type(weight).__name__}"
            )
        if len(weight.shape) != 2:
            raise ValueError(
                f"weight must stand for a 2-D (out_features × in_features) matrix, got shape {tuple(weight.shape)}"
            )
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if not isinstance(workspace, bool):
            raise TypeError(f"workspace must be a bool, got {type(workspace).__name__}")
        compute_dtype = (
            default_compute_dtype(weight.device)
            if compute_dtype is None
            else compute_dtype
        )
        if compute_dtype not in COMPUTE_DTYPES:
            raise TypeError(
                f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype!r}"
            )
        self.out_features, self.in_features = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (self.out_features,):
                raise ValueError(
                    f"bias must be a tensor of shape ({self.out_features},), got {getattr(bias, 'shape', bias)!r}"
                )
            bias = bias.detach().clone()
        self.weight = weight
        self.bias = bias
        self.compute_dtype = compute_dtype
        self.kernels = kernels
        self.workspace = workspace
        self._bnb_state: tuple[NF4Tensor, torch.Tensor, Any] | None = (
            None  # bitsandbytes' view of the bytes
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        kernels: str = "torch",
        workspace: bool = True,
    ) -> Linear4bit:
        """Quantize ``linear``'s weight to NF4 (QLoRA's default: blocks of 64, double
        quantization)."""
        if isinstance(linear, Linear4bit):
            raise ValueError(
                "linear is already a Linear4bit: quantizing it again would compound the error"
            )
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = quantize_nf4(
            linear.weight.detach(), blocksize=blocksize, double_quant=double_quant
        )
        if (
            double_quant
            and weight.absmax.codes.untyped_storage().nbytes()
            > weight.absmax.codes.nbytes
        ):
            # The 8-bit codes can be a view of a buffer padded to whole blocks of 256;
            # keep only the codes.
            weight = replace(
                weight, absmax=replace(weight.absmax, codes=weight.absmax.codes.clone())
            )
        return cls(
            weight,
            linear.bias,
            compute_dtype=compute_dtype,
            kernels=kernels,
            workspace=workspace,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: ``compute_dtype``), out_features ×
        in_features."""
        return dequantize_nf4(self.weight, self.compute_dtype if dtype is None else dtype)

    def weight_for_matmul(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype`` for one product, right now: valid only until the next
        4-bit layer runs.

        With ``self.workspace`` it is written into the calling thread's buffer for this
        dtype and device (no allocation after the first call: on a CPU a fresh
        weight-sized tensor costs about as much as dequantizing into it); otherwise it is
        a fresh tensor, as :meth:`dequantize` returns.
        """
        if not self.workspace:
            return self.dequantize(dtype)
        return dequantize_nf4(
            self.weight,
            dtype,
            out=_workspace(self.weight.shape, dtype, self.weight.device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.in_features,):
            raise ValueError(
                "x must be a tensor whose last dimension is "
                f"in_features={self.in_features}, "
                f"got shape {tuple(getattr(x, 'shape', ()))}"
            )
        x_c = x.to(self.compute_dtype)
        if self.kernels == "bnb":
            import bitsandbytes as bnb

            # Built once per weight (and device): building it costs more than a small
            # matmul.
            if self._bnb_state is None or self._bnb_state[0] is not self.weight:
                self._bnb_state = (self.weight, *to_bnb(self.weight))
            _, packed, state = self._bnb_state
            state.dtype = self.compute_dtype
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            y = bnb.matmul_4bit(x_c, packed.t(), quant_state=state, bias=bias)
        else:
            y = _Dequantize4bitMatmul.apply(x_c, self)
        return y.to(x.dtype)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # nn.Module.to()/cuda()/half() all arrive here with a function on tensors. Probe
        # it with an empty tensor: the device it returns moves the packed bytes; a new
        # dtype becomes the compute dtype.
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device))
        if probe.device != self.weight.device:
            self.weight = self.weight.to(probe.device)
        if self.bias is not None:
            self.bias = self.bias.to(probe.device)
        self.compute_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def memory_tensors(self) -> dict[str, list[Any]]:
        """The tensors this layer holds, by kind (used by
        :func:`peftlab.measure.measure_step`)."""
        absmax = self.weight.absmax
        constants = (
            [absmax]
            if isinstance(absmax, torch.Tensor)
            else [absmax.codes, absmax.absmax2, absmax.offset]
        )
        weights = [self.weight.packed] + ([] if self.bias is None else [self.bias])
        return {"weights": weights, "quant_constants": constants}

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        # bitsandbytes 0.50.2's layout (Linear4bit._save_to_state_dict and
        # QuantState.as_dict(packed=True)): the packed bytes as ``weight`` of shape
        # [(numel + 1) // 2, 1], the constants and lookup tables beside it, and the
        # non-tensor fields as JSON bytes under ``weight.quant_state.bitsandbytes__nf4``.
        # The tables are copied per layer: tensors sharing memory cannot go in one
        # safetensors file.
        from peftlab.codebooks import get_code

        q = self.weight
        tensors = {
            "weight": q.packed.view(-1, 1),
            "bias": self.bias,
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
        tensors[_QUANT_STATE_KEY] = _pack_json(meta, q.device)
        for key, value in tensors.items():
            if value is not None:
                destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(  # noqa: ANN001, PLR0913 - nn.Module's signature
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        ours = {
            k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)
        }
        known = {"weight", "bias", "weight.absmax", "weight.quant_map", _QUANT_STATE_KEY}
        known |= {"weight.nested_absmax", "weight.nested_quant_map"}
        needed = ["weight", "weight.absmax", _QUANT_STATE_KEY]
        if self.bias is not None:
            needed.append("bias")
        missing = [k for k in needed if k not in ours]
        if strict:
            unexpected_keys.extend(prefix + k for k in ours if k not in known)
        if missing:
            missing_keys.extend(prefix + k for k in missing)
            return
        weight = _nf4_from_state(ours, self.weight.device)
        if self.bias is None and "bias" in ours and strict:
            unexpected_keys.append(prefix + "bias")
        expected = {
            "shape": tuple(self.weight.shape),
            "blocksize": self.weight.blocksize,
            "double_quant": self.weight.double_quant,
            "blocksize2": getattr(self.weight.absmax, "blocksize2", None),
        }
        got = {
            "shape": tuple(weight.shape),
            "blocksize": weight.blocksize,
            "double_quant": weight.double_quant,
            "blocksize2": getattr(weight.absmax, "blocksize2", None),
        }
        differ = [
            f"{k} {got[k]} (this layer: {expected[k]})"
            for k in expected
            if got[k] != expected[k]
        ]
        if differ:
            raise ValueError(
                f"cannot load {prefix or 'the state dict'}weight into this Linear4bit: "
                + "; ".join(differ)
            )
        self.weight = weight
        if self.bias is not None:
            bias = ours["bias"]
            if bias.shape != self.bias.shape:
                raise ValueError(
                    f"cannot load {prefix}bias: shape {tuple(bias.shape)} "
                    f"(this layer: {tuple(self.bias.shape)})"
                )
            self.bias = bias.detach().to(self.bias.device, self.bias.dtype).clone()

    def extra_parameter_count(self) -> int:
        """Logical frozen parameters held outside nn.Parameters: in × out (+ bias), for
        count_parameters."""
        return self.in_features * self.out_features + (
            0 if self.bias is None else self.out_features
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.weight.blocksize}, double_quant={self.weight.double_quant}, "
            f"compute_dtype={self.compute_dtype}, kernels={self.kernels!r}, workspace={self.workspace}"
        )


_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"


def _pack_json(meta: dict[str, Any], device: torch.device) -> torch.Tensor:
    """``meta`` as UTF-8 JSON bytes in a uint8 tensor (bitsandbytes'
    ``pack_dict_to_tensor``)."""
    data = json.dumps(meta).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8, device=device)


def _nf4_from_state(tensors: dict[str, torch.Tensor], device: torch.device) -> NF4Tensor:
    """The :class:`NF4Tensor` stored under ``weight*`` keys (ours or bitsandbytes'), on
    ``device``; ValueError if it is not NF4 in a format we read."""
    from peftlab.codebooks import get_code

    try:
        meta = json.loads(bytes(tensors[_QUANT_STATE_KEY].cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{_QUANT_STATE_KEY} is not JSON metadata: {err}") from None
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"quant_type must be 'nf4', got {meta.get('quant_type')!r}")
    code = tensors.get("weight.quant_map")
    if code is not None and not torch.equal(code.float().cpu(), get_code("nf4")):
        raise ValueError("weight.quant_map is not the NF4 table")
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {meta['dtype']!r} in {_QUANT_STATE_KEY}")
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
        absmax2 = tensors["weight.nested_absmax"].detach().float().to(device).reshape(-1)
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        absmax = DoubleQuantState(
            absmax, absmax2.clone(), offset.to(device), int(meta["nested_blocksize"])
        )
    else:
        absmax = absmax.float()
    return NF4Tensor(
        packed, absmax, torch.Size(meta["shape"]), dtype, int(meta["blocksize"])
    )


def bnb_linear4bit(
    linear: nn.Linear,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    blocksize: int = 64,
    double_quant: bool = True,
) -> nn.Module:
    """bitsandbytes' own NF4 ``Linear4bit`` holding ``linear``'s weights: the reference
    ours is checked against.

    Note: bitsandbytes quantizes when the layer is moved to ``device``, not when it is
    built.
    """
    import bitsandbytes as bnb

    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    ref = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    ref.load_state_dict(linear.state_dict())
    ref.weight.blocksize = blocksize
    return ref.to(device)


def bnb_cpu_skip_modules(model: Any, blocksize: int = 64) -> list[str]:
    """``llm_int8_skip_modules`` for loading ``model`` in 4 bits with transformers and
    bitsandbytes on a CPU: ``lm_head`` (16-bit in QLoRA), then the name (``down_proj``) of
    every linear layer whose ``in_features`` is not a multiple of ``blocksize``.

    bitsandbytes 0.50.2's CPU kernels assume each weight row is whole blocks: on other rows
    training mode dequantizes with misplaced block scales and inference mode fails to
    repack (book/chapters/stack.md). ``model`` is a module or a transformers config (built
    on the meta device to read its layers). Names are the last part of the module's name,
    which transformers matches as a suffix.
    """
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not isinstance(model, nn.Module):
        from transformers import AutoModelForCausalLM, PretrainedConfig

        if not isinstance(model, PretrainedConfig):
            raise TypeError(
                f"model must be an nn.Module or a transformers config, got "
                f"{type(model).__name__}"
            )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model)
    skip = ["lm_head"]
    for name, module in model.named_modules():
        short = name.rpartition(".")[2]
        if isinstance(module, nn.Linear) and module.in_features % blocksize:
            if short not in skip:
                skip.append(short)
    return skip


def quantize_model(
    model: nn.Module,
    target_modules: Iterable[str] | None = None,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    kernels: str = "torch",
    progress: bool = True,
) -> nn.Module:
    """Replace linear layers of ``model`` by :class:`Linear4bit` (in place); returns
    ``model``.

    ``target_modules``: names, each matching a module whose qualified name equals it or
    ends with ``"." + name`` (PEFT's rule); default: every ``nn.Linear`` except
    ``lm_head``, i.e. all linear layers of the blocks, as QLoRA does.

    Note: ``lm_head`` is never quantized (QLoRA keeps it in 16 bits: it is one matrix, and
    the logits are sensitive to it); naming it is an error, not a silent skip.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if target_modules is None:
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] != "lm_head"
        ]
        if not names:
            raise ValueError(
                "model has no nn.Linear layers to quantize (besides lm_head); is it already quantized?"
            )
    else:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"target_modules must be a non-empty list of module names, got {target_modules!r}"
            )
        if any(t.split(".")[-1] == "lm_head" for t in targets):
            raise ValueError(
                "target_modules must not include lm_head: QLoRA keeps it in 16 bits"
            )
        names = [n for n, _ in model.named_modules() if n and matches_target(n, targets)]
        if not names:
            raise ValueError(f"no module of model matches target_modules={targets}")
        for n in names:
            m = model.get_submodule(n)
            if isinstance(m, Linear4bit):
                raise ValueError(
                    f"module {n!r} is already a Linear4bit: quantizing it again would compound the error"
                )
            if not isinstance(m, nn.Linear):
                raise TypeError(
                    f"target module {n!r} must be an nn.Linear, got {type(m).__name__}"
                )
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(names, desc="quantize", unit="layer", mininterval=0.5)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = Linear4bit.from_linear(
            getattr(parent, child),
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            kernels=kernels,
        )
        setattr(parent, child, layer)
    return model
