"""The appendix *Questions people ask* (book/chapters/questions.md), its questions about
training with adapters, each answered by a check on the book's tiny pretrained model:
merging into a 4-bit base (3), DoRA's overhead (4), gradient checkpointing's price (8), α
and rank (9) and PiSSA's start on a 4-bit base (10).

Every check runs on a CPU in a few seconds and returns an
:class:`peftlab.book.answers.Answer`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from peftlab.book.answers import Answer

__all__ = [
    "q3_merge_into_4bit",
    "q4_dora_overhead",
    "q8_gradient_checkpointing",
    "q9_alpha_and_rank",
    "q10_pissa_start",
]


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
