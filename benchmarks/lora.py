"""Benchmark: peftlab's LoRA layer against PEFT's, and a merged layer against a plain nn.Linear.

    python benchmarks/lora.py [--repeats 30] [--device cpu|cuda] [--threads N]

Explained in the chapter *LoRA* (book/chapters/lora.md). Both sides run in one process, alternating
call by call, so drifts in machine load hit both; medians are reported. Targets: a training
step (forward + backward; r=16; 1024×1024; 32×128 tokens) at most 1.05× PEFT's, and a merged layer's
forward at most 1.05× nn.Linear's. Exits 0 either way (shared machines are noisy): read the ratios.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from peftlab.adapters import merge_lora
from peftlab.lora import LoRALinear
from _timing import alternate, report  # benchmarks/_timing.py

TARGETS = {"training step vs PEFT": 1.05, "merged forward vs nn.Linear": 1.05}


def peft_lora_layer(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    """PEFT's LoRA layer around ``base`` (imported lazily: PEFT is the reference, not a dependency)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import peft
    holder = nn.Module()
    holder.layer = base
    model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["layer"]))
    return model.base_model.model.layer


def _copy(base: nn.Linear) -> nn.Linear:
    new = nn.Linear(base.in_features, base.out_features, device=base.weight.device, dtype=base.weight.dtype)
    new.load_state_dict(base.state_dict())
    return new


def training_step(repeats: int, device: torch.device, d: int = 1024, r: int = 16, batch: int = 32,
                  seq: int = 128) -> tuple[float, float]:
    """Forward + backward of one layer (input gradient included, as inside a network)."""
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device)
    ours = LoRALinear(_copy(base), r=r, alpha=2 * r)
    theirs = peft_lora_layer(_copy(base), r=r, alpha=2 * r)
    x = torch.randn(batch, seq, d, device=device, requires_grad=True)
    g = torch.randn(batch, seq, d, device=device)

    def step(layer: nn.Module) -> Callable[[], None]:
        params = [p for p in layer.parameters() if p.requires_grad]

        def run() -> None:
            layer(x).backward(g)
            for p in params:
                p.grad = None
            x.grad = None

        return run

    return alternate(step(ours), step(theirs), repeats, device)


def merged_forward(repeats: int, device: torch.device, d: int = 1024, r: int = 16, batch: int = 32,
                   seq: int = 128) -> tuple[float, float]:
    """Inference through a merged LoRALinear against the plain nn.Linear holding the same weight."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(d, d, device=device), r=r, alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.01)
    plain = merge_lora(LoRALinear(_copy(layer.base), r=r, alpha=2 * r))
    layer.merge()
    x = torch.randn(batch, seq, d, device=device)

    def run(module: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                module(x)

        return call

    return alternate(run(layer), run(plain), repeats, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be a positive int")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} alternating repeats, medians")
    report("training step vs PEFT", *training_step(args.repeats, device), TARGETS)
    report("merged forward vs nn.Linear", *merged_forward(args.repeats, device), TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
