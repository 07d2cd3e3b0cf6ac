"""Benchmark: peftlab's double quantization against bitsandbytes' 8-bit blockwise quantizer.

    python benchmarks/double_quant.py [--repeats 30] [--device cpu|cuda]

Explained in the chapter *Double quantization* (book/chapters/double_quant.md). Both sides run in
one process, alternating call by call (order flipped every round), so drifts in machine load hit
both; medians are reported. The workload is the first-level absmax of LLaMA-65B's largest matrix
(8192 × 22016 weights in blocks of 64: 2,818,048 constants), double-quantized in blocks of 256:

- quantize: ``quantize_absmax`` against ``mean`` + bitsandbytes ``quantize_blockwise`` (what
  ``quantize_4bit(compress_statistics=True)`` runs), target at most 1.5× bitsandbytes;
- dequantize: ``dequantize_absmax`` against bitsandbytes ``dequantize_blockwise`` + offset (what
  ``dequantize_4bit`` runs first), target at most 1.5× bitsandbytes;
- and the 8-bit quantizer on its own, on a 4096 × 4096 bfloat16 weight in blocks of 256
  (``quantize_blockwise`` against bitsandbytes' ``quantize_blockwise``), target at most 1.5×.

Both sides' outputs are checked equal before timing. Exits 0 either way (shared machines are
noisy): read the ratios.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from peftlab.double_quant import dequantize_absmax, quantize_8bit, quantize_absmax
from _timing import alternate, report  # benchmarks/_timing.py

TARGETS = {"quantize constants": 1.5, "dequantize constants": 1.5, "8-bit quantize of bf16 weights": 1.5}
CONSTANTS = 8192 * 22016 // 64  # LLaMA-65B's FFN matrix in blocks of 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="cpu (the byte-identical path) or cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnb_F  # the reference, not a dependency

    torch.manual_seed(0)
    # Realistic constants: the absmax of 64 N(0, 0.02) weights per block.
    absmax = (torch.randn(CONSTANTS, 64, device=device) * 0.02).abs().amax(dim=1)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{CONSTANTS:,} constants, {args.repeats} alternating repeats, medians")

    def reference_quantize():
        offset = absmax.mean()
        return bnb_F.quantize_blockwise(absmax - offset, blocksize=256), offset

    state = quantize_absmax(absmax)
    (codes, state2), offset = reference_quantize()
    if device.type == "cpu":
        assert torch.equal(state.codes, codes) and torch.equal(state.absmax2, state2.absmax)
        assert torch.equal(dequantize_absmax(state), bnb_F.dequantize_blockwise(codes, state2) + offset)
    else:
        print("(on CUDA bitsandbytes uses its own kernels; the outputs are not required to match)")

    report("quantize constants", *alternate(lambda: quantize_absmax(absmax), reference_quantize,
                                            args.repeats, device), TARGETS)
    report("dequantize constants", *alternate(lambda: dequantize_absmax(state),
                                              lambda: bnb_F.dequantize_blockwise(codes, state2) + offset,
                                              args.repeats, device), TARGETS)
    weight = (torch.randn(4096, 4096, device=device) * 0.02).to(torch.bfloat16)
    if device.type == "cpu":
        assert torch.equal(quantize_8bit(weight, blocksize=256)[0], bnb_F.quantize_blockwise(weight, blocksize=256)[0])
    report("8-bit quantize of bf16 weights", *alternate(lambda: quantize_8bit(weight, blocksize=256),
                                                        lambda: bnb_F.quantize_blockwise(weight, blocksize=256),
                                                        args.repeats, device), TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
