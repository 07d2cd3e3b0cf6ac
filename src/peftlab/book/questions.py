"""Ten questions people ask about LoRA and QLoRA, each answered by a check that measures
the answer with the installed libraries.

Shown in the chapter *Questions people ask* (book/chapters/questions.md); re-run
against other installed versions of PEFT and bitsandbytes by
``python -m peftlab.book.faq_check``.

Each ``q*`` function measures one answer and returns an :class:`Answer`: the number the
answer rests on, what it is compared with, whether it still holds, and a small table for
the page. The page calls the same function and turns the comparison into a ``claim``,
so the build fails when an answer stops being true; the command prints which answers
changed under another environment. One source of truth for both.

Every check runs on a CPU in a few seconds: the book's tiny pretrained model, one layer,
or the memory model of :mod:`peftlab.memory`.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from peftlab.book.claims import RELATIONS

__all__ = [
    "Answer",
    "QUESTIONS",
    "answers_markdown",
    "bf16_nan_words",
    "q1_memory_not_covered",
    "q2_bytes_per_parameter",
    "q3_merge_into_4bit",
    "q4_dora_overhead",
    "q5_paged_optimizer",
    "q6_bnb_on_cpu",
    "q7_sharded_bytes_as_floats",
    "q8_gradient_checkpointing",
    "q9_alpha_and_rank",
    "q10_pissa_start",
    "run_all",
]


@dataclass(frozen=True)
class Answer:
    """One question's measured answer.

    ``measured`` is compared with ``expected`` by ``relation`` (one of
    :data:`peftlab.book.claims.RELATIONS`, or ``"approx"`` with ``tolerance`` relative);
    ``holds`` is the result. ``numbers`` are the values the page shows (glued by name),
    ``rows`` a small table of (what, value as text).
    """

    number: int
    key: str
    question: str
    short: str
    measured: float
    expected: float
    relation: str
    what: str
    source: str
    tolerance: float | None = None
    numbers: dict[str, float] = field(default_factory=dict)
    rows: tuple[tuple[str, str], ...] = ()

    @property
    def holds(self) -> bool:
        if self.relation == "approx":
            return abs(self.measured - self.expected) <= (self.tolerance or 0.0) * abs(
                self.expected
            )
        return RELATIONS[self.relation](self.measured, self.expected)

    @property
    def expectation(self) -> str:
        """The comparison in words, e.g. ``"> 0.5"`` or ``"≈ 8 (±1e-06 relative)"``."""
        if self.relation == "approx":
            return f"≈ {self.expected:.4g} (±{self.tolerance:.2g} relative)"
        return f"{self.relation} {self.expected:.4g}"

    def table(self) -> str:
        """The answer's rows as a Markdown table."""
        lines = ["| quantity | value |", "|---|---:|"]
        lines += [f"| {what} | {value} |" for what, value in self.rows]
        return "\n".join(lines)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


# --------------------------------------------------------------------------------------
# 1 and 2: memory


def _four_bit_bytes(shape) -> int:
    """Packed NF4 codes and double-quantized constants of every linear layer of the
    blocks of a :class:`peftlab.memory.LlamaShape`."""
    from peftlab.memory import quantized_bytes

    per_block = sum(
        sum(quantized_bytes(o * i)) for o, i in shape.block_linears().values()
    )
    return shape.n_layers * per_block


def q1_memory_not_covered(batch: int = 32, seq: int = 384) -> Answer:
    """What 4-bit storage does not cover: LLaMA-7B, a QLoRA step (r = 64 on every linear
    layer, 32-bit AdamW, gradient checkpointing) at one sequence of 512 tokens and at
    ``batch`` × ``seq`` tokens, per component, beside 16-bit LoRA."""
    from peftlab.memory import LLAMA, estimate

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
    from peftlab.memory import LLAMA, quantized_bytes

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
# helpers on the book's model


def _held_out(n_windows: int = 16, seq: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from peftlab.harness import textdata

    return textdata.spaced_windows(textdata.downstream_text("held_out"), n_windows, seq)


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    from peftlab.harness.pretrained import lm_loss

    with torch.no_grad():
        return lm_loss(model, *batch).item()


def _read(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, float]:
    """Next-byte log-probabilities on ``batch``'s inputs and the mean loss on its
    targets, from one forward pass."""
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=batch[0]).logits.float(), -1)
    return logp, F.nll_loss(logp.flatten(0, 1), batch[1].flatten()).item()


# --------------------------------------------------------------------------------------
# 3: merging into 4 bits


def q3_merge_into_4bit(steps: int = 8, r: int = 8, lr: float = 2e-3) -> Answer:
    """A QLoRA model of the book's model (every linear layer in NF4 + double
    quantization, LoRA r on each) trained ``steps`` steps, then merged three ways; each
    merged model against the unmerged one: KL of the next-byte distributions and the
    change of the held-out loss."""
    from peftlab.adapters import lora_layers
    from peftlab.devices import torch_threads
    from peftlab.harness import pretrained, textdata
    from peftlab.merge4bit import merge_lora_dequantized, merge_lora_requantized
    from peftlab.prepare import prepare_qlora

    held = _held_out()
    train = textdata.downstream_text("train")
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        floats = pretrained.load_pretrained()
        model = prepare_qlora(
            copy.deepcopy(floats), r=r, alpha=16.0, compute_dtype=torch.float32
        )
        model.train()
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr
        )
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            loss = pretrained.lm_loss(model, *textdata.random_batch(train, 4, 64, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        into16 = copy.deepcopy(floats)
        with torch.no_grad():
            for name, layer in lora_layers(model):
                into16.get_submodule(name).weight += layer.delta_weight()
        merged = {
            "16-bit weights": into16,
            "dequantized, kept in float": merge_lora_dequantized(copy.deepcopy(model)),
            "re-quantized to NF4": merge_lora_requantized(copy.deepcopy(model)),
        }
        p, base_loss = _read(model, held)
        kl, change = {}, {}
        for how, m in merged.items():
            q, loss = _read(m, held)
            kl[how] = (p.exp() * (p - q)).sum(-1).mean().item()
            change[how] = loss - base_loss
    tags = {
        "16-bit weights": "16bit",
        "dequantized, kept in float": "float",
        "re-quantized to NF4": "requant",
    }
    numbers = (
        {f"{tags[h]}-kl": kl[h] for h in merged}
        | {f"{tags[h]}-loss-change": change[h] for h in merged}
        | {"steps": steps, "r": r, "unmerged-loss": base_loss}
    )
    rows = tuple(
        (how, f"KL {kl[how]:.2e} nats, held-out loss {change[how]:+.5f}")
        for how in merged
    )
    return Answer(
        3,
        "merge-into-4bit",
        "Can I merge a LoRA into a 4-bit model?",
        "Three ways, not equal: into the dequantized weights kept in float it is "
        "exact but no longer 4-bit; re-quantized to NF4 (PEFT's merge_and_unload on a "
        "4-bit model) every block touched is rounded afresh; into the original 16-bit "
        "weights it loses what the adapter learned about the quantization error.",
        kl["re-quantized to NF4"],
        1e-6,
        ">",
        "KL (nats) of the re-quantized merge from the unmerged model, above 1e-6 (far "
        "above the float32 rounding of the exact merge)",
        "PEFT's warning: merging into 4 bits 'may get different generations'",
        numbers=numbers,
        rows=rows,
    )


# --------------------------------------------------------------------------------------
# 4: DoRA


def q4_dora_overhead(
    width: int = 1024, r: int = 16, batch: int = 4, tokens: int = 128, repeats: int = 3
) -> Answer:
    """PEFT's LoRA and DoRA on one square ``width`` layer: the bytes kept for backward
    beyond the input, and the time of forward + backward (medians of alternating
    calls, one thread)."""
    from peft import LoraConfig, inject_adapter_in_model

    from peftlab.devices import alternating_medians, torch_threads
    from peftlab.measure import count_saved_bytes

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, width, generator=gen, requires_grad=True)
    layers, saved = {}, {}
    for kind, dora in (("LoRA", False), ("DoRA", True)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(width, width))
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=dora)
        layers[kind] = inject_adapter_in_model(config, model)
        with count_saved_bytes(exclude=[*layers[kind].parameters(), x]) as counter:
            layers[kind](x).sum().backward()
        saved[kind] = counter.nbytes

    def step(layer):
        return lambda: layer(x).sum().backward()

    with torch_threads(1):
        seconds = alternating_medians(
            {k: step(m) for k, m in layers.items()}, repeats=repeats
        )
    out_bytes = batch * tokens * width * 4
    extra = (saved["DoRA"] - saved["LoRA"]) / out_bytes
    numbers = {
        "time-ratio": seconds["DoRA"] / seconds["LoRA"],
        "lora-ms": 1e3 * seconds["LoRA"],
        "dora-ms": 1e3 * seconds["DoRA"],
        "extra-outputs": extra,
        "extra-mib": (saved["DoRA"] - saved["LoRA"]) / 2**20,
        "width": width,
        "r": r,
        "tokens": batch * tokens,
    }
    rows = (
        ("forward + backward, LoRA", f"{1e3 * seconds['LoRA']:.1f} ms"),
        ("forward + backward, DoRA", f"{1e3 * seconds['DoRA']:.1f} ms"),
        ("kept for backward, DoRA beyond LoRA", f"{extra:.2f} × the output's bytes"),
    )
    return Answer(
        4,
        "dora-overhead",
        "Why is DoRA slower than LoRA?",
        "Every step it forms W0 + sBA for every layer to take its norms, and it keeps "
        "more output-sized tensors for backward (the base and adapter results that the "
        "magnitude scales); merging removes the cost at inference.",
        extra,
        1.0,
        ">=",
        "bytes PEFT's DoRA keeps for backward beyond LoRA's, in output-sized tensors",
        "DoRA (Liu et al. 2024) §4.3; PEFT's DoRA layer",
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


# --------------------------------------------------------------------------------------
# 8: gradient checkpointing


def q8_gradient_checkpointing(
    batch: int = 2, seq: int = 128, repeats: int = 2
) -> Answer:
    """Gradient checkpointing on the book's model with LoRA (r = 16, every linear
    layer): the bytes kept for backward and the step time, with and without."""
    from peftlab.adapters import add_lora
    from peftlab.devices import torch_threads
    from peftlab.harness import pretrained, textdata
    from peftlab.recompute import checkpointing_cost

    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = pretrained.load_pretrained()
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora(model, "all-linear", r=16, alpha=16)
        x, _ = textdata.spaced_windows(textdata.downstream_text("train"), batch, seq)
        cost = checkpointing_cost(model, x, repeats=repeats)
    cfg = model.config
    checkpoints = cfg.num_hidden_layers * batch * seq * cfg.hidden_size * 4
    numbers = {
        "saved-mb": cost.saved_bytes / 1e6,
        "ckpt-saved-mb": cost.checkpointed_saved_bytes / 1e6,
        "memory-ratio": cost.saved_bytes / cost.checkpointed_saved_bytes,
        "time-ratio": cost.time_ratio,
        "predicted-ratio": cost.predicted_ratio,
        "checkpoints-mb": checkpoints / 1e6,
        "batch": batch,
        "seq": seq,
    }
    rows = (
        ("kept for backward, no checkpointing", f"{cost.saved_bytes / 1e6:.1f} MB"),
        (
            "kept for backward, every block checkpointed",
            f"{cost.checkpointed_saved_bytes / 1e6:.1f} MB",
        ),
        (
            "step time, checkpointed over plain (median of rounds)",
            f"{cost.time_ratio:.2f}",
        ),
        (
            "the same if it cost exactly one more forward pass",
            f"{cost.predicted_ratio:.2f}",
        ),
    )
    return Answer(
        8,
        "gradient-checkpointing",
        "Gradient checkpointing: how much memory, how much time?",
        "The activations kept fall to the blocks' inputs plus one block's worth at a "
        "time; the price is one more forward pass of the blocks, about a third more "
        "time for full finetuning and about half more with a frozen base, whose "
        "backward computes no weight gradients.",
        cost.checkpointed_saved_bytes,
        checkpoints,
        ">=",
        "bytes kept with checkpointing, at least the blocks' float32 inputs",
        "gradient checkpointing keeps each block's input",
        numbers=numbers,
        rows=rows,
    )


# --------------------------------------------------------------------------------------
# 9: alpha and rank


def q9_alpha_and_rank(alpha: float = 16.0, ranks: tuple[int, int] = (4, 64)) -> Answer:
    """PEFT's scaling at two ranks with α fixed, with α/r and with rsLoRA's α/√r, and
    the tuned learning rates the book recorded at those ranks."""
    from dataclasses import replace

    from peft import LoraConfig, inject_adapter_in_model

    from peftlab.harness import recorded, studies

    def scaling(r: int, rs: bool) -> float:
        model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_rslora=rs)
        return float(inject_adapter_in_model(cfg, model)[0].scaling["default"])

    lo, hi = ranks
    s = {(r, rs): scaling(r, rs) for r in ranks for rs in (False, True)}
    rows_runs = recorded.load_study("rank-lr").runs
    tuned = {
        (r, rs): studies.tuned_lr(rows_runs, replace(studies.BASE, r=r, rslora=rs))
        for r in ranks
        for rs in (False, True)
    }
    numbers = (
        {f"scaling-{r}-{'rs' if rs else 'std'}": v for (r, rs), v in s.items()}
        | {f"lr-{r}-{'rs' if rs else 'std'}": v for (r, rs), v in tuned.items()}
        | {
            "alpha": alpha,
            "r-lo": lo,
            "r-hi": hi,
            "rs-over-std": s[hi, True] / s[hi, False],
        }
    )
    rows = tuple(
        (
            f"r = {r}, {'α/√r (use_rslora=True)' if rs else 'α/r'}",
            f"scaling {s[r, rs]:.4g}; tuned learning rate here {tuned[r, rs]:g}",
        )
        for rs in (False, True)
        for r in ranks
    )
    return Answer(
        9,
        "alpha-and-rank",
        "How should α change with the rank?",
        "With α/r, a fixed α shrinks the update as r grows, which with Adam is a "
        "smaller learning rate; rsLoRA's α/√r keeps it of order one. Either way, tune "
        "the learning rate whenever r or α changes; in this book's runs, each at its "
        "own tuned rate, the two scalings could not be told apart.",
        s[hi, True] / s[hi, False],
        math.sqrt(hi),
        "approx",
        "PEFT's scaling with use_rslora=True over without, at r = " + str(hi),
        "rsLoRA (Kalajdzievski 2023): α/√r",
        tolerance=1e-6,
        numbers=numbers,
        rows=rows,
    )


# --------------------------------------------------------------------------------------
# 10: PiSSA / LoftQ starts on a 4-bit base


def q10_pissa_start(r: int = 32) -> Answer:
    """The held-out loss of the book's model before any training: float, QLoRA's zero
    start, PiSSA and LoftQ done as their papers do, and PiSSA's adapters put on a base
    quantized from the original weights (the top directions counted twice)."""
    from peftlab.adapters import lora_layers
    from peftlab.devices import torch_threads
    from peftlab.harness import pretrained
    from peftlab.pissa import pissa_init
    from peftlab.prepare import prepare_qlora

    held = _held_out()
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        floats = pretrained.load_pretrained()
        losses = {"float model": _loss(floats, held)}
        for init, label in (
            ("zero", "QLoRA, B = 0"),
            ("pissa", "PiSSA, residual quantized"),
            ("loftq", "LoftQ, one alternation"),
        ):
            m = prepare_qlora(
                copy.deepcopy(floats),
                r=r,
                alpha=16.0,
                init=init,
                compute_dtype=torch.float32,
            )
            losses[label] = _loss(m, held)
        wrong = prepare_qlora(
            copy.deepcopy(floats), r=r, alpha=16.0, compute_dtype=torch.float32
        )
        with torch.no_grad():
            for name, layer in lora_layers(wrong):
                f = pissa_init(floats.get_submodule(name).weight, r, 16.0)
                layer.lora_A.copy_(f.lora_A)
                layer.lora_B.copy_(f.lora_B)
        losses["PiSSA's adapters on the original weights, quantized"] = _loss(
            wrong, held
        )
    zero = losses["QLoRA, B = 0"]
    tags = {
        "float model": "float",
        "QLoRA, B = 0": "zero",
        "PiSSA, residual quantized": "pissa",
        "LoftQ, one alternation": "loftq",
        "PiSSA's adapters on the original weights, quantized": "wrong",
    }
    numbers = {f"{tags[k]}-loss": v for k, v in losses.items()} | {"r": r}
    rows = tuple((k, f"{v:.4f} nats/byte") for k, v in losses.items())
    return Answer(
        10,
        "pissa-start",
        "Why does my loss start higher with PiSSA or LoftQ on a 4-bit model?",
        "Done right, both start lower than QLoRA's zero start. A high start means the "
        "adapters were initialised from W while the base was not replaced by what "
        "they leave: PiSSA must decompose the float weight and quantize the residual, "
        "LoftQ must quantize inside its alternation; adapters from W on a base "
        "quantized from W count W's top directions twice.",
        losses["PiSSA's adapters on the original weights, quantized"] - zero,
        0.0,
        ">",
        "held-out loss of PiSSA's adapters on a base quantized from the original "
        "weights, minus QLoRA's zero start (nats/byte)",
        "PiSSA (Meng et al. 2024): quantize the residual",
        numbers=numbers,
        rows=rows,
    )


QUESTIONS: tuple[Callable[[], Answer], ...] = (
    q1_memory_not_covered,
    q2_bytes_per_parameter,
    q3_merge_into_4bit,
    q4_dora_overhead,
    q5_paged_optimizer,
    q6_bnb_on_cpu,
    q7_sharded_bytes_as_floats,
    q8_gradient_checkpointing,
    q9_alpha_and_rank,
    q10_pissa_start,
)
"""Every question's check, in the page's order."""


def run_all(numbers: list[int] | None = None) -> list[Answer]:
    """Run the checks (all, or those whose question ``numbers`` are given), in order."""
    chosen = QUESTIONS if numbers is None else [QUESTIONS[n - 1] for n in numbers]
    return [check() for check in chosen]


def answers_markdown(answers: list[Answer]) -> str:
    """A table of answers: question, what is measured, expected, measured, holds."""
    lines = [
        "| # | question | what is measured | expected | measured | holds |",
        "|---|---|---|---|---|---|",
    ]
    for a in answers:
        lines.append(
            f"| {a.number} | {a.question} | {a.what} | {a.expectation} | "
            f"{a.measured:.4g} | {'yes' if a.holds else 'NO'} |"
        )
    return "\n".join(lines)
