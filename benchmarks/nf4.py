"""NF4 on the CPU: peftlab against bitsandbytes (and torchao for contrast), 4096 x 4096 float32.

    python benchmarks/nf4.py [--reps 15] [--size 4096]

Explained in the chapter *4-bit NormalFloat* (book/chapters/nf4.md), closing note. Every contender runs
in one process, in turn within each repetition (the order reversed every other one), so machine noise hits
all alike; we report medians. Targets: our quantize / bitsandbytes' <= 1.0; our dequantize into a
reused buffer (``out=``, what the 4-bit layer does) / bitsandbytes' <= 1.0. Dequantizing into a fresh tensor
is reported for contrast: both sides pay for allocating it, and bitsandbytes' fused native kernel writes it
in one pass, which plain PyTorch cannot. The script prints PASS or MISS for each and always exits 0 (shared machines are noisy).

Note: what bitsandbytes runs on the CPU: ``quantize_4bit`` is its pure-PyTorch reference
(``backends/default/ops.py``: ``bucketize`` on the midpoints); ``dequantize_4bit`` is a native
(AVX-512 where available) C++ kernel from ``backends/cpu/ops.py``. Our time includes the input
checks (NaN/inf, dtype). Dequantize's effective bandwidth counts bytes read (codes, absmax) plus
written (float32 output); a plain ``clone`` (read + write) is the physical limit beside it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from _timing import alternate_all, report  # benchmarks/_timing.py

TARGETS = {"quantize": 1.0, "dequantize into a reused buffer": 1.0, "dequantize into a fresh tensor": None, "quantize vs torchao to_nf4": None,
           "dequantize vs torchao": None}


def measure(size: int = 4096, reps: int = 15, torchao: bool = True) -> dict[str, float]:
    """Median seconds of each contender on a ``size`` x ``size`` float32 N(0, 1) tensor, and the bytes that
    a dequantization and a copy move."""
    import bitsandbytes.functional as bnbF

    from peftlab.nf4 import dequantize_nf4, quantize_nf4

    w = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    q = quantize_nf4(w)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    if not torch.equal(q.packed, packed.reshape(-1)) or not torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(packed, state)):
        raise AssertionError("peftlab and bitsandbytes disagree: the timing would compare different work")
    buffer = torch.empty_like(w)
    fns: dict[str, Callable[[], object]] = {
        "ours quantize": lambda: quantize_nf4(w),
        "bnb quantize": lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4"),
        "ours dequantize": lambda: dequantize_nf4(q),
        "ours dequantize, reused buffer": lambda: dequantize_nf4(q, out=buffer),
        "bnb dequantize": lambda: bnbF.dequantize_4bit(packed, state),
        "copy": lambda: w.clone(),
    }
    if torchao:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

            nf4 = to_nf4(w)
            fns["torchao to_nf4"] = lambda: to_nf4(w)
            fns["torchao dequantize"] = lambda: nf4.get_original_weight()
        except Exception as exc:  # torchao is optional: say why it is missing
            print(f"torchao skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    out = alternate_all(fns, reps, warmup=1)  # one warm-up call each: caches, lazy tables, allocator
    out["dequantize bytes"] = float(w.numel() * 4 + packed.numel() + q.absmax.numel() * 4)
    out["copy bytes"] = float(2 * w.numel() * 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--no-torchao", action="store_true", help="skip torchao's to_nf4")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.size < 64:
        parser.error("--reps must be >= 1 and --size >= 64")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} x {args.size} float32, "
          f"{args.reps} alternating repetitions (medians)")
    res = measure(args.size, args.reps, torchao=not args.no_torchao)
    report("quantize", res["ours quantize"], res["bnb quantize"], TARGETS)
    report("dequantize into a reused buffer", res["ours dequantize, reused buffer"], res["bnb dequantize"], TARGETS)
    report("dequantize into a fresh tensor", res["ours dequantize"], res["bnb dequantize"], TARGETS)
    if "torchao to_nf4" in res:
        report("quantize vs torchao to_nf4", res["ours quantize"], res["torchao to_nf4"], TARGETS)
        report("dequantize vs torchao", res["ours dequantize"], res["torchao dequantize"], TARGETS)
    gbps = {name: res["dequantize bytes"] / res[f"{name} dequantize"] / 1e9 for name in ("ours", "bnb")}
    print(f"dequantize bandwidth: ours {gbps['ours']:.1f} GB/s, bitsandbytes {gbps['bnb']:.1f} GB/s, "
          f"plain copy {res['copy bytes'] / res['copy'] / 1e9:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
