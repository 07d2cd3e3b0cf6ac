"""peftlab: the companion package of the book *Parameter-efficient fine-tuning, executed*.

The science, one idea per module, each explained by one chapter (its docstring names it):
:mod:`~peftlab.targets` (which modules get an adapter), :mod:`~peftlab.lora` (the LoRA
layer), :mod:`~peftlab.adapters` (LoRA layers in a whole model) and
:mod:`~peftlab.adapter_io` (PEFT's files),
:mod:`~peftlab.codebooks`, :mod:`~peftlab.nf4` and :mod:`~peftlab.double_quant` (4-bit
NormalFloat and its constants), :mod:`~peftlab.approximation` (the relative error the book
reports), :mod:`~peftlab.pages` (the page pool),
:mod:`~peftlab.adam_updates` (AdamW's update rules, 32- and 8-bit) and
:mod:`~peftlab.paged` (the paged optimizer),
:mod:`~peftlab.qlora` (the 4-bit layer) with :mod:`~peftlab.workspace` (a dequantization
workspace its caller owns), :mod:`~peftlab.chunked_matmul` (a CPU product in cache-sized
chunks) and :mod:`~peftlab.nf4_state_dict` (bitsandbytes' state-dict layout),
:mod:`~peftlab.bnb_cpu` (the layers bitsandbytes' CPU kernels must leave in 16 bits),
:mod:`~peftlab.memory` and :mod:`~peftlab.measure`
(what a step holds, estimated and measured) with :mod:`~peftlab.sharding` (FSDP2's split
of each tensor) and :mod:`~peftlab.fsdp` (the 4-bit model sharded with FSDP2), the
variants :mod:`~peftlab.dora`, :mod:`~peftlab.loraplus`, :mod:`~peftlab.pissa` and
:mod:`~peftlab.loftq` (with the paged optimizer's 8-bit states), and
:mod:`~peftlab.prepare` (one entry point that makes a model ready for QLoRA, the adapters
started at zero, from PiSSA or from LoftQ), with :mod:`~peftlab.devices` and
:mod:`~peftlab.files` beneath them. Above them, the experiment harness
(:mod:`peftlab.harness`) and the book's own machinery (:mod:`peftlab.book`).
Import what you need from the module itself, e.g. ``from peftlab.lora import LoRALinear``.
"""

__version__ = "0.1.0"
