"""The appendix *Questions people ask* (book/chapters/questions.md), its questions about
memory and storage, each answered by a check that measures the answer with the installed
libraries: what a memory estimate leaves out (1), bytes per parameter (2), what a paged
optimizer pages (5), bitsandbytes on a CPU (6) and 4-bit bytes sharded as floats (7).

Every check runs on a CPU in a few seconds and returns an
:class:`peftlab.book.answers.Answer`.
"""

from __future__ import annotations

import warnings

import torch

from peftlab.book.answers import Answer

__all__ = [
    "bf16_nan_words",
    "q1_memory_not_covered",
    "q2_bytes_per_parameter",
    "q5_paged_optimizer",
    "q6_bnb_on_cpu",
    "q7_sharded_bytes_as_floats",
]


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


# --------------------------------------------------------------------------------------
# 1 and 2: memory


def _four_bit_bytes(shape) -> int:
    """Packed NF4 codes and double-quantized constants of every linear layer of the
    blocks of a :class:`peftlab.shapes.LlamaShape`."""
    from peftlab.memory import quantized_bytes

    per_block = sum(
        sum(quantized_bytes(o * i)) for o, i in shape.block_linears().values()
    )
    return shape.n_layers * per_block


def q1_memory_not_covered(batch: int = 32, seq: int = 384) -> Answer:
    """What 4-bit storage does not cover: LLaMA-7B, a QLoRA step (r = 64 on every linear
    layer, 32-bit AdamW, gradient checkpointing) at one sequence of 512 tokens and at
    ``batch`` × ``seq`` tokens, per component, beside 16-bit LoRA."""
    from peftlab.memory import estimate
    from peftlab.shapes import LLAMA

    shape = LLAMA["llama-7b"]
    four_bit = _four_bit_bytes(shape)
    rows, numbers = [], {}
    for b, s, tag in ((1, 512, "small"), (batch, seq, "large")):
        q, lora = (
            estimate(shape, "qlora", batch=b, seq=s),
            estimate(shape, "lora", batch=b, seq=s),
        )
        sixteen = q.weights + q.quant_constants - four_bit  # embeddings, lm_head, norms
        adapters = q.lora_weights + q.gradients + q.optimizer_states
        numbers |= {
            "four-bit-gb": four_bit / 1e9,
            f"{tag}-sixteen-gb": sixteen / 1e9,
            f"{tag}-adapters-gb": adapters / 1e9,
            f"{tag}-activations-gb": q.activations / 1e9,
            f"{tag}-total-gb": q.total / 1e9,
            f"{tag}-lora-total-gb": lora.total / 1e9,
            f"{tag}-uncovered": 1 - four_bit / q.total,
            f"{tag}-ratio": q.total / lora.total,
        }
        rows += [
            (
                f"{b} × {s} tokens: 4-bit codes and constants",
                f"{four_bit / 1e9:.2f} GB",
            ),
            (
                f"{b} × {s} tokens: 16-bit embeddings, `lm_head`, norms",
                f"{sixteen / 1e9:.2f} GB",
            ),
            (
                f"{b} × {s} tokens: adapters, their gradients and Adam states",
                f"{adapters / 1e9:.2f} GB",
            ),
            (f"{b} × {s} tokens: activations", f"{q.activations / 1e9:.2f} GB"),
            (
                f"{b} × {s} tokens: QLoRA total / 16-bit LoRA total",
                f"{q.total / 1e9:.2f} / {lora.total / 1e9:.2f} GB",
            ),
        ]
    numbers |= {"batch": batch, "seq": seq}
    return Answer(
        1,
        "memory-not-covered",
        "My 4-bit model uses as much memory as the 16-bit one: why?",
        "4 bits cover only the blocks' linear weights; embeddings, lm_head, adapters "
        "with their optimizer states, and above all the activations of a large batch "
        "stay as they were (and the CUDA context comes on top).",
        numbers["large-uncovered"],
        0.5,
        ">",
        f"share of a QLoRA step of LLaMA-7B at {batch} × {seq} tokens that is not "
        "4-bit storage",
        "peftlab.memory.estimate (checked against measured steps in the memory "
        "chapter)",
        numbers=numbers,
        rows=tuple(rows),
    )


def q2_bytes_per_parameter() -> Answer:
    """The ledger of QLoRA's LLaMA-7B base: bytes per parameter, part by part."""
    from peftlab.memory import quantized_bytes
    from peftlab.shapes import LLAMA

    shape = LLAMA["llama-7b"]
    linear = shape.linear_params
    packed = shape.n_layers * sum(
        quantized_bytes(o * i)[0] for o, i in shape.block_linears().values()
    )
    constants = _four_bit_bytes(shape) - packed
    embeddings = 2 * 2 * shape.vocab * shape.d_model  # embed_tokens and lm_head, 16-bit
    norms = 2 * (shape.other_params - 2 * shape.vocab * shape.d_model)
    total = packed + constants + embeddings + norms
    n = shape.n_params
    numbers = {
        "codes-bpp": packed / n,
        "constants-bpp": constants / n,
        "embeddings-bpp": embeddings / n,
        "norms-bpp": norms / n,
        "total-bpp": total / n,
        "total-mb": total / 1e6,
        "linear-share": linear / n,
        "params": n,
    }
    rows = (
        (
            "NF4 codes of the blocks' linear layers (½ byte each)",
            f"{packed / n:.4f} B/param, {_mb(packed)}",
        ),
        (
            "their double-quantized constants (0.127 bits each)",
            f"{constants / n:.4f} B/param, {_mb(constants)}",
        ),
        (
            "16-bit `embed_tokens` and `lm_head`",
            f"{embeddings / n:.4f} B/param, {_mb(embeddings)}",
        ),
        ("16-bit norms", f"{norms / n:.6f} B/param, {_mb(norms)}"),
        ("the 4-bit base in all", f"{total / n:.4f} B/param, {_mb(total)}"),
    )
    return Answer(
        2,
        "bytes-per-parameter",
        "Why does the QLoRA paper's 4-bit 7B take more than 0.5 bytes per parameter?",
        "Half a byte is the codes alone. The block constants add 0.127 bits per "
        "quantized weight, and embeddings and lm_head stay 16-bit; the paper's 5,048 "
        "MB also holds what a GPU adds (CUDA context, allocator), which no count of "
        "tensors sees.",
        total / n,
        0.5,
        ">",
        "bytes per parameter of LLaMA-7B's QLoRA base (codes, constants, 16-bit rest)",
        "QLoRA §2: the 4-bit LLaMA-7B takes 5,048 MB",
        numbers=numbers,
        rows=rows,
    )


# --------------------------------------------------------------------------------------
# 5: paged optimizers


def q5_paged_optimizer() -> Answer:
    """The book's PagedAdamW on the adapters of the book's model (every linear layer,
    r = 64) with a device budget that holds the states, then a spike that needs part
    of it: what is paged out, and whether the states shrink. And bitsandbytes'
    PagedAdamW on a CPU: its states beside torch's AdamW's."""
    import bitsandbytes as bnb

    from peftlab.adapters import add_lora
    from peftlab.devices import torch_threads
    from peftlab.harness import pretrained, textdata
    from peftlab.paged import PagedAdamW
    from peftlab.pages import PagePool

    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = pretrained.load_pretrained()
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora(model, "all-linear", r=64, alpha=16)
        params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        state = 8 * n  # two float32 moments
        pool = PagePool(capacity_bytes=2 * state)
        opt = PagedAdamW(params, lr=1e-3, pool=pool)
        batch = textdata.random_batch(
            textdata.downstream_text("train"), 2, 64, torch.Generator().manual_seed(0)
        )

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            pretrained.lm_loss(model, *batch).backward()
            opt.step()

        step()
        before = pool.stats
        spike = 2 * state - state // 4  # leaves room for only a quarter of the states
        with pool.reserve(spike):
            during = pool.stats
        step()  # the update pages back in what it needs
        after = pool.stats
        plain = torch.optim.AdamW([torch.zeros(1000, requires_grad=True)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paged = bnb.optim.PagedAdamW([torch.zeros(1000, requires_grad=True)])
            for o in (plain, paged):
                o.param_groups[0]["params"][0].grad = torch.ones(1000)
                o.step()
        state_bytes = {
            name: sum(
                t.nbytes
                for s in o.state.values()
                for t in s.values()
                if isinstance(t, torch.Tensor) and t.numel() > 1
            )
            for name, o in (("torch", plain), ("bnb", paged))
        }
    numbers = {
        "state-mb": state / 1e6,
        "paged-out-mb": during.paged_out_bytes / 1e6,
        "host-mb": during.host_bytes / 1e6,
        "device-before-mb": before.device_bytes / 1e6,
        "paged-in-mb": (after.paged_in_bytes - during.paged_in_bytes) / 1e6,
        "total-during-mb": (during.resident_bytes + during.host_bytes) / 1e6,
        "bnb-state-bytes": state_bytes["bnb"],
        "torch-state-bytes": state_bytes["torch"],
        "bnb-warned": int(any("paged" in str(w.message).lower() for w in caught)),
    }
    rows = (
        (
            "AdamW states of the adapters (r = 64, every linear layer)",
            f"{state / 1e6:.2f} MB",
        ),
        (
            "paged out to the host when the spike arrived",
            f"{during.paged_out_bytes / 1e6:.2f} MB",
        ),
        (
            "states on device + host during the spike",
            f"{(during.resident_bytes + during.host_bytes) / 1e6:.2f} MB",
        ),
        ("paged back in by the next update", f"{numbers['paged-in-mb']:.2f} MB"),
        (
            "bitsandbytes' PagedAdamW on a CPU: state bytes for 1,000 parameters",
            f"{state_bytes['bnb']:,} (torch's AdamW: {state_bytes['torch']:,})",
        ),
    )
    return Answer(
        5,
        "paged-optimizer",
        "Do paged optimizers save memory?",
        "They save no bytes: the states are as large as ever. They move them to CPU "
        "RAM when a spike needs the GPU's room and back for the update, which costs "
        "time only when it happens; on a CPU bitsandbytes' paged optimizer is a plain "
        "AdamW.",
        (during.resident_bytes + during.host_bytes) / state,
        1.0,
        "==",
        "optimizer-state bytes on device and host during a spike, over the states' "
        "bytes",
        "QLoRA §3 (paged optimizers move states, they do not shrink them)",
        numbers=numbers,
        rows=rows,
    )


# --------------------------------------------------------------------------------------
# 6: bitsandbytes on a CPU


def q6_bnb_on_cpu(numel: int = 64 * 1024) -> Answer:
    """bitsandbytes' NF4 + double quantization on a CPU, byte for byte against the
    book's quantizer, and its 4-bit layer's forward against the float product; the
    instruction set that picks its CPU kernels."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    from peftlab.nf4 import dequantize_nf4, quantize_nf4

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(numel, generator=gen) * 0.02
    packed, state = BF.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=True
    )
    ours = quantize_nf4(w, 64, double_quant=True)
    differing = int((packed.view(-1) != ours.packed).sum())
    deq_gap = (
        (BF.dequantize_4bit(packed, state).view(-1) - dequantize_nf4(ours))
        .abs()
        .max()
        .item()
    )
    layer = bnb.nn.Linear4bit(
        256,
        128,
        bias=False,
        quant_type="nf4",
        compress_statistics=True,
        compute_dtype=torch.float32,
    )
    with torch.no_grad():
        layer.weight = bnb.nn.Params4bit(
            torch.randn(128, 256, generator=gen) * 0.05,
            requires_grad=False,
            quant_type="nf4",
        )
        layer = layer.to("cpu").train()
        x = torch.randn(4, 256, generator=gen)
        deq = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        exact = x @ deq.float().T
        out_err = ((layer(x) - exact).norm() / exact.norm()).item()
    capability = torch.backends.cpu.get_cpu_capability()
    numbers = {
        "differing-bytes": differing,
        "bytes": packed.numel(),
        "dequant-gap": deq_gap,
        "layer-error": out_err,
        "avx512": int("AVX512" in capability),
    }
    rows = (
        (
            "NF4 + double quantization on a CPU: bytes differing from peftlab's",
            f"{differing:,} of {packed.numel():,}",
        ),
        ("dequantized values, largest difference", f"{deq_gap:.1e}"),
        (
            "`Linear4bit` forward on a CPU (in_features 256): relative error",
            f"{out_err:.1e}",
        ),
        ("CPU instruction set torch reports", capability),
    )
    return Answer(
        6,
        "bnb-on-cpu",
        "Does bitsandbytes run on a CPU?",
        "Yes, since the multi-backend releases: 4-bit quantization, the 4-bit layer "
        "and 8-bit optimizers run on a CPU, the paged optimizers fall back to "
        "ordinary states; two CPU kernels are wrong for rows that are not whole "
        "blocks of 64 on AVX-512 processors (the stack chapter), so keep such layers "
        "in 16 bits.",
        differing,
        0,
        "==",
        "bytes of bitsandbytes' CPU NF4 + double quantization differing from peftlab's",
        "bitsandbytes 0.50.2 quantize_4bit on a CPU",
        numbers=numbers,
        rows=rows,
    )


# --------------------------------------------------------------------------------------
# 7: sharding 4-bit weights


def bf16_nan_words(packed: torch.Tensor) -> tuple[int, int, int, int]:
    """Reinterpret ``packed`` (uint8, an even number of bytes) as bfloat16 words, as a
    sharding library that stores every parameter as a 16-bit float would see them.

    Returns ``(words, nan_words, changed, changed_numbers)``: how many words, how many
    are NaN patterns (exponent all ones, mantissa not zero), how many words change when
    they go through a float32 round trip (``.float().to(bfloat16)``, as under mixed
    precision), and how many of the changed words were not NaN. PyTorch writes every NaN
    back as one fixed pattern (which one depends on the CPU kernel that converts), so a
    NaN word loses its two codes' bits; every other word survives the round trip.
    """
    if packed.dtype != torch.uint8 or packed.numel() % 2:
        raise ValueError("packed must be uint8 with an even number of bytes")
    words = packed.contiguous().view(-1).view(torch.bfloat16)
    bits = words.view(torch.int16)
    nan = torch.isnan(words)
    changed = words.float().to(torch.bfloat16).view(torch.int16) != bits
    numbers_changed = int((changed & ~nan).sum())
    return words.numel(), int(nan.sum()), int(changed.sum()), numbers_changed


def q7_sharded_bytes_as_floats(block: int = 0) -> Answer:
    """The packed NF4 codes of the seven linear layers of one block of the book's model,
    read as bfloat16: how many words are NaN patterns, and how many a float32 round trip
    rewrites."""
    from peftlab.devices import torch_threads
    from peftlab.harness import pretrained
    from peftlab.nf4 import quantize_nf4
    from peftlab.targets import LLAMA_LINEARS

    model = pretrained.load_pretrained()
    words = nan = changed = numbers_changed = 0
    with torch_threads(1):  # small tensors: one thread, immune to a busy machine
        for name, m in model.model.layers[block].named_modules():
            if name.rsplit(".", 1)[-1] in LLAMA_LINEARS:
                q = quantize_nf4(m.weight.detach(), 64, double_quant=True)
                w, n, c, cn = bf16_nan_words(q.packed)
                words, nan = words + w, nan + n
                changed, numbers_changed = changed + c, numbers_changed + cn
    numbers = {
        "words": words,
        "nan-words": nan,
        "changed": changed,
        "numbers-changed": numbers_changed,
        "nan-share": nan / words,
        "block": block,
    }
    rows = (
        ("packed NF4 bytes read as bfloat16 words", f"{words:,}"),
        ("of which NaN patterns", f"{nan:,} ({nan / words:.2%})"),
        ("words changed by a float32 round trip", f"{changed:,}"),
        ("changed words that were not NaN", f"{numbers_changed:,}"),
    )
    return Answer(
        7,
        "sharded-bytes-as-floats",
        "Why does the loss go to 0 or NaN when I shard a 4-bit model?",
        "The packed 4-bit codes are bytes, not numbers. A sharding library that "
        "stores them as floats, casts them or reduces them rewrites some: every byte "
        "pair that happens to be a NaN pattern comes back as one fixed NaN, two codes "
        "lost. Keep quantized weights out of sharding, or store them as the float "
        "type the library expects (bnb_4bit_quant_storage) and never cast them.",
        changed,
        0,
        ">",
        "packed-code words of one block that a float32 round trip changes",
        "accelerate issue 3983; bitsandbytes issue 1945",
        numbers=numbers,
        rows=rows,
    )
