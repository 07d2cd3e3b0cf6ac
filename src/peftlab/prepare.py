"""One entry point that makes a model ready for QLoRA training, with the adapters started
at zero, from PiSSA or from LoftQ.

Explained in the chapter *QLoRA end to end* (book/chapters/qlora.md); the PiSSA and LoftQ
starts in the chapter *LoRA variants* (book/chapters/variants.md).

:func:`prepare_qlora` stores the targeted linear layers in NF4 (:mod:`peftlab.qlora`) and
puts LoRA adapters on them (:mod:`peftlab.lora`); ``init`` says where the adapters start:

- ``"zero"``: QLoRA's own start (Dettmers et al. 2023), ``B = 0`` on the quantized
  ``W0``: the 4-bit model starts off the float one by the whole quantization error;
- ``"pissa"``: PiSSA's (:mod:`peftlab.pissa`): the adapter holds ``W0``'s top singular
  directions and the quantized base is the residual;
- ``"loftq"``: LoftQ's (:mod:`peftlab.loftq`): ``Q`` and the adapter fitted together,
  the adapter cancelling the largest directions of the quantization error.

Each start keeps its own order of steps (quantize, then LoRA; or LoRA, then the start and
the quantization), so a seed draws the same random numbers, and gives the same model, as
the separate functions these steps come from.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from peftlab.codebooks import check_blocksize, check_float_tensor
from peftlab.loftq import apply_loftq_to_layers, check_num_iter
from peftlab.adapters import add_lora, add_lora_layers
from peftlab.lora import check_lora_hyperparameters
from peftlab.pissa import apply_pissa_to_layers, check_niter
from peftlab.qlora import COMPUTE_DTYPES, KERNELS, Linear4bit, quantize_model
from peftlab.targets import LLAMA_LINEARS, find_targets

__all__ = ["INITS", "prepare_qlora"]

INITS = ("zero", "pissa", "loftq")
"""Where :func:`prepare_qlora` starts the adapters: LoRA's ``B = 0``, PiSSA or LoftQ."""


def prepare_qlora(
    model: nn.Module,
    target_modules: str | Iterable[str] = LLAMA_LINEARS,
    *,
    r: int = 64,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
    use_dora: bool = False,
    init: str = "zero",
    niter: int | None = None,
    num_iter: int = 1,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    kernels: str = "torch",
) -> nn.Module:
    """QLoRA's model, in place: the targeted linear layers stored in NF4 (blocks of
    ``blocksize``, with ``double_quant``) and frozen, LoRA adapters on the same layers
    (trained), started as ``init`` says (one of :data:`INITS`). Returns ``model``.

    The paper's defaults: every linear layer of the blocks, r = 64, α = 16.
    ``target_modules`` is matched as by :func:`peftlab.adapters.add_lora` (names, a
    regex or ``"all-linear"``); never ``lm_head``. ``use_dora``: DoRA adapters (as PEFT
    allows on a 4-bit base; the chapter *LoRA variants*), with ``init="zero"`` only.
    ``niter``: for ``init="pissa"``, the randomized SVD's iterations (None: the exact
    SVD); ``num_iter``: for ``init="loftq"``, LoftQ's alternations. Every argument, and
    every targeted layer, is checked before the model changes.
    """
    # All checks first: some of the steps below check only after an earlier one has
    # changed the model (PiSSA's and LoftQ's, after LoRA is on).
    _check_start(init, r, alpha, dropout, rslora, use_dora, niter, num_iter)
    quantized = _checked_quantization(blocksize, double_quant, compute_dtype, kernels)
    names = _checked_targets(model, target_modules, init, r)
    if init == "zero":
        # Quantize first: DoRA's magnitude is then the norm of the 4-bit weight the
        # layer multiplies by.
        quantize_model(model, names, **quantized, progress=False)
        add_lora(model, names, r, alpha, dropout, rslora, use_dora)
    elif init == "pissa":
        # LoRA first: PiSSA splits the float W0, and it is the residual that is
        # quantized (it has smaller outliers than W0).
        layers = add_lora_layers(model, names, r, alpha, dropout, rslora)
        apply_pissa_to_layers(layers, niter=niter)
        for _, layer in layers:
            layer.base = Linear4bit.from_linear(layer.base, **quantized)
    else:
        # LoRA first: LoftQ quantizes each float W0 itself, alternating with the fit of
        # the adapter to the quantization error.
        layers = add_lora_layers(model, names, r, alpha, dropout, rslora)
        apply_loftq_to_layers(layers, num_iter=num_iter, **quantized)
    return model


def _check_start(
    init: object,
    r: object,
    alpha: object,
    dropout: object,
    rslora: object,
    use_dora: object,
    niter: object,
    num_iter: object,
) -> None:
    """TypeError/ValueError naming the first bad LoRA setting or start of
    :func:`prepare_qlora`, or a setting given to a start it does not apply to."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    check_lora_hyperparameters(r, alpha, dropout, rslora, use_dora)
    if use_dora and init != "zero":
        raise ValueError(
            "use_dora=True needs init='zero' (DoRA's magnitude is set from the base "
            f"with B = 0), got init={init!r}"
        )
    if init != "zero" and alpha == 0:
        raise ValueError(
            f"alpha must be non-zero for init={init!r}: it divides the singular values "
            f"by the LoRA scaling, got alpha={alpha}"
        )
    check_niter(niter)
    if niter is not None and init != "pissa":
        raise ValueError(
            "niter applies only to init='pissa' (its randomized SVD), got "
            f"niter={niter!r} with init={init!r}"
        )
    check_num_iter(num_iter)
    if num_iter != 1 and init != "loftq":
        raise ValueError(
            "num_iter applies only to init='loftq' (its alternations), got "
            f"num_iter={num_iter!r} with init={init!r}"
        )


def _checked_quantization(
    blocksize: object, double_quant: object, compute_dtype: object, kernels: object
) -> dict[str, Any]:
    """The 4-bit layers' settings as keyword arguments of
    :meth:`peftlab.qlora.Linear4bit.from_linear`; TypeError/ValueError naming the first
    bad one."""
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(
            f"double_quant must be a bool, got {type(double_quant).__name__}"
        )
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(
            f"compute_dtype must be None or one of {COMPUTE_DTYPES}, "
            f"got {compute_dtype!r}"
        )
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return dict(
        blocksize=blocksize,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        kernels=kernels,
    )


def _checked_targets(
    model: object, target_modules: object, init: str, r: int
) -> list[str]:
    """The qualified names of the layers :func:`prepare_qlora` changes: float
    ``nn.Linear`` layers, never ``lm_head``, with ``r`` singular directions for PiSSA and
    LoftQ; TypeError/ValueError naming the first that is not."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = find_targets(model, target_modules)
    for name in names:
        layer = model.get_submodule(name)
        if name.rpartition(".")[2] == "lm_head":
            raise ValueError(
                "target_modules must not include lm_head: QLoRA keeps it in 16 bits"
            )
        if isinstance(layer, Linear4bit):
            raise ValueError(
                f"module {name!r} is already a Linear4bit: quantizing it again would "
                "compound the error; start from the float model"
            )
        if not isinstance(layer, nn.Linear):
            raise TypeError(
                f"target module {name!r} must be an nn.Linear, got {type(layer).__name__}"
            )
        weight = check_float_tensor(layer.weight, f"the weight of {name!r}")
        if init != "zero" and r > min(weight.shape):
            raise ValueError(
                f"r must be at most min(out_features, in_features) = {min(weight.shape)} "
                f"of {name!r} for init={init!r} (r singular directions), got {r}"
            )
    return names
