"""Benchmark: peftlab's 4-bit Linear4bit against bitsandbytes' Linear4bit, on LLaMA-7B's q_proj and gate_proj.

    python benchmarks/qlora.py [--repeats 15] [--device cpu|cuda] [--threads N] [--layers q_proj gate_proj]

Explained in the chapter *QLoRA end to end* (book/chapters/qlora.md). Both sides run in one process,
alternating call by call, so drifts in machine load hit both; medians are reported. Layers: LLaMA-7B's
``q_proj`` (4096 × 4096) and ``gate_proj`` (11008 × 4096), NF4 + double quantization, float32 compute on a
CPU (on a GPU the 16-bit dtype it computes natively: bfloat16 from sm80, else float16); inputs of 4 × 128 tokens, and of a single token (a decoding step).

Targets, on a CPU: our forward (4 × 128 tokens and one token), forward + backward and
``dequantize_nf4(..., out=)`` each at most 1.0× bitsandbytes' (``Linear4bit`` / ``dequantize_4bit``), and
``kernels="bnb"`` at most 1.05× bitsandbytes' own layer (the same kernel behind a thin wrapper). On CUDA
bitsandbytes has fused kernels and ours is plain PyTorch: the ratios are printed as readings, not judged.
Beside them: the floor, a plain float32 ``F.linear`` on the dense weight (what any 4-bit layer adds its
dequantization to; timed alternating with ours in a run of its own), and the dequantization's effective bandwidth (bytes read and written per second) beside
a plain copy's. Exits 0 either way (shared machines are noisy): read the ratios, and the load printed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import bitsandbytes.functional as bnbF
import torch
import torch.nn.functional as F
from torch import nn

from peftlab.devices import default_compute_dtype
from peftlab.nf4 import dequantize_nf4, to_bnb
from peftlab.qlora import Linear4bit, bnb_linear4bit
from peftlab.workspace import DequantWorkspace
from _timing import alternate, report  # benchmarks/_timing.py

LAYERS = {"q_proj": (4096, 4096), "gate_proj": (11008, 4096)}  # LLaMA-7B, (out_features, in_features)
TARGETS = {"forward, 4 × 128 tokens": 1.0, "forward, 1 token": 1.0, "forward + backward, 4 × 128 tokens": 1.0,
           "dequantize_nf4(out=) vs dequantize_4bit": 1.0, "kernels='bnb' forward, 4 × 128 tokens": 1.05}


def _load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else "load n/a"


def _train(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    """One forward + backward to the input (the frozen weight gets no gradient)."""
    def run() -> None:
        layer(x).sum().backward()
        x.grad = None

    return run


def bench_layer(name: str, out_features: int, in_features: int, device: torch.device, compute: torch.dtype,
                repeats: int) -> None:
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=False)
    # with a workspace: the layer's fastest path on a CPU (no weight-sized tensor allocated per call)
    ours = Linear4bit.from_linear(base, compute_dtype=compute, workspace=DequantWorkspace()).to(device)
    fast = Linear4bit.from_linear(base, compute_dtype=compute, kernels="bnb").to(device)
    ref = bnb_linear4bit(base, compute, device)
    dense = ours.dequantize().clone()  # the floor's weight: the same values, already dequantized
    packed, state = to_bnb(ours.weight)
    x = torch.randn(4, 128, in_features, device=device, dtype=compute)
    x1 = torch.randn(1, 1, in_features, device=device, dtype=compute)
    xg = x.clone().requires_grad_()
    out = torch.empty_like(dense)
    copy_src = dense.clone()
    with torch.no_grad():  # the same work on both sides, or the timing compares nothing
        if device.type == "cpu" and not (torch.equal(ours(x), ref(x)) and torch.equal(ours(x1), ref(x1))):
            raise AssertionError(f"{name}: our layer and bitsandbytes' disagree")
        if not torch.equal(dequantize_nf4(ours.weight, out=out).to(dense.dtype), dense):
            raise AssertionError(f"{name}: dequantize_nf4(out=) disagrees with the fresh result")

    print(f"\n{name} ({out_features} × {in_features}, NF4 + DQ, {compute}), {_load()}")
    cases = {
        "forward, 4 × 128 tokens": (lambda: ours(x), lambda: ref(x), True),
        "forward, 1 token": (lambda: ours(x1), lambda: ref(x1), True),
        "forward + backward, 4 × 128 tokens": (_train(ours, xg), _train(ref, xg), False),
        "dequantize_nf4(out=) vs dequantize_4bit": (lambda: dequantize_nf4(ours.weight, out=out),
                                                    lambda: bnbF.dequantize_4bit(packed, state), True),
        "kernels='bnb' forward, 4 × 128 tokens": (lambda: fast(x), lambda: ref(x), True),
    }
    times = {}
    for case, (a, b, no_grad) in cases.items():
        with torch.no_grad() if no_grad else torch.enable_grad():
            times[case] = alternate(a, b, repeats, device)
        if device.type == "cpu":
            report(case, *times[case], TARGETS)
        else:
            t_ours, t_ref = times[case]
            print(f"{case}: ours {t_ours * 1e3:.2f} ms, reference {t_ref * 1e3:.2f} ms, "
                  f"ours / reference = {t_ours / t_ref:.2f} (a reading: bitsandbytes' kernels are fused)")

    # The floor: the same products on the dense weight, alternating with ours (so the same load hits both).
    floors = {
        "forward, 4 × 128 tokens": (lambda: ours(x), lambda: F.linear(x, dense), True),
        "forward, 1 token": (lambda: ours(x1), lambda: F.linear(x1, dense), True),
        "forward + backward, 4 × 128 tokens": (_train(ours, xg), _train(lambda t: F.linear(t, dense), xg), False),
    }
    for case, (a, b, no_grad) in floors.items():
        with torch.no_grad() if no_grad else torch.enable_grad():
            t_ours, floor = alternate(a, b, repeats, device)
        print(f"  floor, {case}: plain F.linear {floor * 1e3:.2f} ms, ours {t_ours * 1e3:.2f} ms in the same run: "
              f"ours / plain = {t_ours / floor:.2f}")
    with torch.no_grad():
        copy, _ = alternate(lambda: out.copy_(copy_src), lambda: dequantize_nf4(ours.weight, out=out), repeats, device)
    values = out.numel() * out.element_size()
    moved = values + ours.weight.nbytes  # written values + read codes and constants
    t_ours, t_ref = times["dequantize_nf4(out=) vs dequantize_4bit"]
    print(f"  dequantize bandwidth: ours (out=) {moved / t_ours / 1e9:.1f} GB/s, bitsandbytes (fresh tensor) "
          f"{moved / t_ref / 1e9:.1f} GB/s; plain copy_ into a buffer {2 * values / copy / 1e9:.1f} GB/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layers", nargs="+", choices=tuple(LAYERS), default=list(LAYERS))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compute = default_compute_dtype(device)  # float32 on a CPU; bfloat16 only where a GPU computes it natively
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.repeats} "
          f"alternating repeats (medians), {os.cpu_count()} CPUs, {_load()}")
    for name in args.layers:
        bench_layer(name, *LAYERS[name], device, compute, args.repeats)
    print(f"\nend: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
