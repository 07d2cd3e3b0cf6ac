"""Benchmark: a finetuning step of the tiny pretrained LLaMA with peftlab's LoRA against PEFT's, and
loading the shipped checkpoint against ``transformers``' ``from_pretrained``.

    python benchmarks/rank_alpha.py [--repeats 30] [--threads 1]

Explained in the chapter *LoRA rank and alpha* (book/chapters/rank_alpha.md), whose sweeps are made
of such steps. Both sides run in one process, alternating call by call (order flipped every round),
so drifts in machine load hit both; medians are reported. Targets:

- training step (forward, backward, AdamW; LoRA r=8 on all seven linear layers; 8 × 64 bytes):
  at most 1.05× PEFT's on the same model;
- loading the checkpoint (``peftlab.harness.pretrained.load_pretrained``) at most 1.5× ``LlamaForCausalLM
  .from_pretrained`` on the same weights saved by ``save_pretrained``.

Both sides' outputs are checked equal before timing. Exits 0 either way (shared machines are
noisy): read the ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable

import torch

from peftlab.harness import pretrained, textdata
from peftlab.harness.experiments import TARGETS as MODULES
from peftlab.adapters import add_lora
from _timing import alternate, report  # benchmarks/_timing.py

TARGETS = {"training step vs PEFT": 1.05, "load checkpoint vs from_pretrained": 1.5}


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> float:
        loss = pretrained.lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def bench_training_step(repeats: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import peft
    targets = list(MODULES["all"])
    ours = pretrained.load_pretrained().train()
    torch.manual_seed(0)
    add_lora(ours, targets, r=8, alpha=16)
    theirs = peft.get_peft_model(pretrained.load_pretrained().train(),
                                 peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    named = dict(ours.named_parameters())
    with torch.no_grad():  # same A (and B = 0) on both sides
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(named[name.replace("base_model.model.", "").replace(".default.weight", "")])
    x, y = textdata.random_batch(textdata.downstream_text("train"), 8, 64, torch.Generator().manual_seed(0))
    ours_step, theirs_step = step_fn(ours, x, y), step_fn(theirs, x, y)
    first = ours_step(), theirs_step()
    if abs(first[0] - first[1]) > 1e-5:
        raise SystemExit(f"losses differ before timing: ours {first[0]}, PEFT {first[1]}")
    report("training step vs PEFT", *alternate(ours_step, theirs_step, repeats), TARGETS)


def bench_load(repeats: int) -> None:
    from transformers import LlamaForCausalLM

    reference_model = pretrained.load_pretrained()
    with tempfile.TemporaryDirectory() as folder:
        reference_model.save_pretrained(folder)

        def theirs() -> torch.nn.Module:
            return LlamaForCausalLM.from_pretrained(folder).eval()

        a, b = pretrained.load_pretrained(), theirs()
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            if not torch.equal(p, q):
                raise SystemExit(f"weights differ before timing: {name}")
        report("load checkpoint vs from_pretrained", *alternate(pretrained.load_pretrained, theirs, repeats), TARGETS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: immune to a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} alternating repeats, medians")
    bench_training_step(args.repeats)
    bench_load(max(5, args.repeats // 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
