"""QLoRA's frozen base: a 4-bit linear layer (NF4, double quantization) and a function
that quantizes a model.

Explained in the chapter *QLoRA end to end* (book/chapters/qlora.md).

Storage and compute are separate (Dettmers et al. 2023, §3, Eq. 5–6): weights are stored
in NF4 with double-quantized constants and dequantized to the compute dtype for every
matmul; only LoRA adapters on top (:func:`peftlab.adapters.add_lora`) get gradients. The
whole preparation of a model, these layers plus adapters started at zero, from PiSSA or
from LoftQ, is :func:`peftlab.prepare.prepare_qlora`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from peftlab.chunked_matmul import chunk_rows, chunked_linear
from peftlab.devices import default_compute_dtype
from peftlab.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4, to_bnb
from peftlab.nf4_state_dict import (
    REQUIRED_STATE_KEYS,
    STATE_KEYS,
    layout_differences,
    nf4_from_state_dict,
    nf4_to_state_dict,
)
from peftlab.targets import matches_target
from peftlab.workspace import DequantWorkspace, scratch

__all__ = [
    "COMPUTE_DTYPES",
    "KERNELS",
    "Linear4bit",
    "bnb_linear4bit",
    "quantize_model",
    "set_compute_dtype",
    "set_workspace",
]

KERNELS = ("torch", "bnb")

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes a :class:`Linear4bit` dequantizes to and multiplies in."""


class _Dequantize4bitMatmul(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` dequantized from 4 bits, in forward and again in
    backward.

    Note: nothing weight-sized is saved for backward. ``F.linear(x, W)`` on a
    dequantized ``W`` would keep ``W`` (needed for the input gradient) until backward:
    every layer's full-precision weight at once, which is the memory QLoRA exists to
    save. Dequantizing twice costs time, not memory.
    Note: ``W`` may be a buffer of the layer's workspace (see
    :meth:`Linear4bit.weight_for_matmul`), lent for the ``with`` block and overwritten
    by the next 4-bit layer after it; that is safe because nothing outlives the block:
    the products are new tensors, never views of it, and backward is
    ``once_differentiable`` (it runs without autograd, so a double backward cannot save
    the buffer and read it after it changed).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        rows = chunk_rows(layer.weight, x.dtype)  # on a CPU, chunks that stay in cache
        if rows is not None:
            return chunked_linear(x, layer.weight, bias, rows, layer.workspace)
        with layer.weight_for_matmul(x.dtype) as w:
            return F.linear(x, w, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        with ctx.layer.weight_for_matmul(grad_y.dtype) as w:
            return grad_y @ w, None


class Linear4bit(nn.Module):
    """A frozen linear layer stored in NF4 (``weight`` is a
    :class:`peftlab.nf4.NF4Tensor`).

    ``forward`` casts the input to ``compute_dtype``, dequantizes the weight to it,
    multiplies, and casts the result back to the input's dtype (as bitsandbytes'
    ``Linear4bit`` does). With ``kernels="bnb"`` the product runs in bitsandbytes'
    ``matmul_4bit`` on the same bytes.

    ``compute_dtype`` defaults to :func:`peftlab.devices.default_compute_dtype` of the
    weight's device: float32 on a CPU, bfloat16 on GPUs that compute it natively (sm80+),
    float16 on older ones (T4). Only :meth:`set_compute_dtype` (or
    :func:`set_compute_dtype` for a model) changes it.

    Note: ``.to(device)`` moves the packed bytes; ``.to(dtype)`` (and ``.half()``,
    ``.bfloat16()``...) leaves the layer as it is, so casting a model's 16-bit parts never
    changes what its 4-bit layers compute in. Neither re-quantizes, so the 4-bit values
    never drift.
    Note: ``state_dict()`` holds the 4-bit weight as bitsandbytes' ``Linear4bit`` does
    (:mod:`peftlab.nf4_state_dict`): tensors only, so ``safetensors`` saves it without
    pickle. ``load_state_dict`` restores the very same bytes into a layer of the same
    shape and format and raises ``ValueError`` naming what differs otherwise.
    Note: ``peftlab_linear = True`` lets :class:`peftlab.lora.LoRALinear` wrap it;
    ``merge()`` refuses it (merging into 4 bits would round the update away), so keep
    adapters separate or dequantize first.
    Note: without a ``workspace`` (default) every product dequantizes into a fresh
    tensor; with a :class:`peftlab.workspace.DequantWorkspace` into its buffers, shared
    by every layer given the same workspace (see :meth:`weight_for_matmul`). The results
    are the same, bit for bit; ``kernels="bnb"`` uses none.
    """

    peftlab_linear = True

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        kernels: str = "torch",
        workspace: DequantWorkspace | None = None,
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
        _check_workspace(workspace)
        compute_dtype = (
            default_compute_dtype(weight.device)
            if compute_dtype is None
            else compute_dtype
        )
        _check_compute_dtype(compute_dtype, "compute_dtype")
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
        workspace: DequantWorkspace | None = None,
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
        return dequantize_nf4(
            self.weight, self.compute_dtype if dtype is None else dtype
        )

    def set_compute_dtype(self, dtype: torch.dtype) -> Linear4bit:
        """Compute in ``dtype`` (float32, float16 or bfloat16) from now on; returns the
        layer. The 4-bit weight is not touched."""
        _check_compute_dtype(dtype, "dtype")
        self.compute_dtype = dtype
        return self

    @contextmanager
    def weight_for_matmul(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The weight in ``dtype``, for the products inside the ``with`` block only.

        With ``self.workspace`` it is written into a buffer borrowed from it (no
        allocation once the buffer is as large as the weight: on a CPU a fresh
        weight-sized tensor costs about as much as dequantizing into it); otherwise into
        a fresh tensor, as :meth:`dequantize` returns it.
        """
        q = self.weight
        with scratch(self.workspace, q.shape, dtype, q.device) as buffer:
            yield dequantize_nf4(q, dtype, out=buffer)

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
        # it with an empty tensor: the device it returns moves the packed bytes. Its dtype
        # is ignored: a model cast to 16 bits for its embeddings and norms must not change
        # its 4-bit layers' compute dtype unasked (set_compute_dtype does that).
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device))
        if probe.device != self.weight.device:
            self.weight = self.weight.to(probe.device)
        if self.bias is not None:
            self.bias = self.bias.to(probe.device)
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
        # bitsandbytes' layout (peftlab.nf4_state_dict), the bias second as in theirs
        tensors = nf4_to_state_dict(self.weight)
        tensors = {"weight": tensors.pop("weight"), "bias": self.bias, **tensors}
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
        needed = [*REQUIRED_STATE_KEYS] + ([] if self.bias is None else ["bias"])
        missing = [k for k in needed if k not in ours]
        if strict:
            known = {*STATE_KEYS, "bias"}
            unexpected_keys.extend(prefix + k for k in ours if k not in known)
        if missing:
            missing_keys.extend(prefix + k for k in missing)
            return
        weight = nf4_from_state_dict(ours, self.weight.device)
        if self.bias is None and "bias" in ours and strict:
            unexpected_keys.append(prefix + "bias")
        differ = layout_differences(weight, self.weight)
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
            f"compute_dtype={self.compute_dtype}, kernels={self.kernels!r}, "
            f"workspace={self.workspace is not None}"
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


def quantize_model(
    model: nn.Module,
    target_modules: Iterable[str] | None = None,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    kernels: str = "torch",
    workspace: DequantWorkspace | None = None,
    progress: bool = True,
) -> nn.Module:
    """Replace linear layers of ``model`` by :class:`Linear4bit` (in place); returns
    ``model``.

    ``target_modules``: names, each matching a module whose qualified name equals it or
    ends with ``"." + name`` (PEFT's rule); default: every ``nn.Linear`` except
    ``lm_head``, i.e. all linear layers of the blocks, as QLoRA does. ``workspace``: one
    :class:`peftlab.workspace.DequantWorkspace` for all the new layers (default: none).

    Note: ``lm_head`` is never quantized (QLoRA keeps it in 16 bits: it is one matrix, and
    the logits are sensitive to it); naming it is an error, not a silent skip.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_workspace(workspace)
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
        names = [
            n for n, _ in model.named_modules() if n and matches_target(n, targets)
        ]
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
            workspace=workspace,
        )
        setattr(parent, child, layer)
    return model


def _layers_4bit(model: nn.Module) -> list[Linear4bit]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("model has no Linear4bit layer (see quantize_model)")
    return layers


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make every :class:`Linear4bit` of ``model`` compute in ``dtype`` (in place);
    returns ``model``. The one way to change it: ``model.to(dtype)`` does not."""
    _check_compute_dtype(dtype, "dtype")
    for layer in _layers_4bit(model):
        layer.set_compute_dtype(dtype)
    return model


def set_workspace(model: nn.Module, workspace: DequantWorkspace | None) -> nn.Module:
    """Give every :class:`Linear4bit` of ``model`` ``workspace`` to dequantize into (None:
    a fresh tensor per product), in place; returns ``model``. For a model prepared
    without one, e.g. by :func:`peftlab.prepare.prepare_qlora`."""
    _check_workspace(workspace)
    for layer in _layers_4bit(model):
        layer.workspace = workspace
    return model


def _check_compute_dtype(dtype: object, name: str) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype!r}")


def _check_workspace(workspace: object) -> None:
    if workspace is not None and not isinstance(workspace, DequantWorkspace):
        raise TypeError(
            "workspace must be a peftlab.workspace.DequantWorkspace or None, got "
            f"{type(workspace).__name__}"
        )
