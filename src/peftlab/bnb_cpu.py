"""Which layers to keep out of 4 bits when transformers loads a model with bitsandbytes on
a CPU: the workaround for bitsandbytes' CPU kernels, which assume whole blocks per row.

Explained in the chapter *QLoRA with transformers, PEFT and bitsandbytes*
(book/chapters/stack.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["bnb_cpu_skip_modules"]


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
