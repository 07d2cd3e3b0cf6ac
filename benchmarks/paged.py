"""Benchmark peftlab.paged: PagedAdamW's step vs torch.optim.AdamW when nothing is paged, and the cost of paging.

    python benchmarks/paged.py [--device cpu|cuda] [--repeats 30] [--threads 1]

Explained in the chapter *Paged optimizers* (book/chapters/paged.md). Ours and the reference run alternately
in one process (order flipped every round) and the medians are compared. Targets: PagedAdamW's step at
most 1.3x torch.optim.AdamW's when nothing is paged. The cost of paging every state out and back in is reported
beside a plain copy of the same bytes (no target: it is the price of the copies). Machines are noisy: the script
prints PASS/MISS and always exits 0.
"""

from __future__ import annotations

import argparse

import torch

from peftlab.paged import PagedAdamW
from peftlab.pages import DEFAULT_PAGE_BYTES, PagePool
from _timing import alternate, alternate_all, report  # benchmarks/_timing.py

TARGETS = {"step, nothing paged": 1.3, "paging the states out and back vs a plain copy": None}

#: Parameter sets: LoRA adapters (many small matrices) and a full finetune of a few large ones.
CASES = {
    "LoRA-like: 64 x (2 x 16x1024)": [(16, 1024), (1024, 16)] * 64,
    "full-like: 8 x 1024x1024": [(1024, 1024)] * 8,
}


def _make(shapes, device, make_opt):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    opt = make_opt(params)
    opt.step()  # allocate the states outside the timing
    return params, opt


def bench_step(shapes, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median step seconds: (PagedAdamW in a pool with room for everything, torch.optim.AdamW)."""
    state_bytes = 2 * sum(torch.Size(s).numel() * 4 for s in shapes)
    _, ours = _make(shapes, device, lambda ps: PagedAdamW(ps, pool=PagePool(2 * state_bytes, device=device)))
    # foreach=False: torch's single-tensor path, what PagedAdamW mirrors (on CUDA torch defaults to foreach).
    _, ref = _make(shapes, device, lambda ps: torch.optim.AdamW(ps, foreach=False))
    times = alternate(ours.step, ref.step, repeats, device)
    assert ours.pool.stats.page_outs == 0
    return times


def bench_paging(shapes, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Median seconds of moving every state out and back in (a spike that evicts every page, then a step,
    less the step alone) and of a plain copy of the same bytes out and back; and the MiB moved."""
    state_bytes = 2 * sum(torch.Size(s).numel() * 4 for s in shapes)
    params, opt = _make(shapes, device, lambda ps: PagedAdamW(
        ps, pool=PagePool(2 * state_bytes, device=device, page_bytes=DEFAULT_PAGE_BYTES)))
    pool = opt.pool
    pin = device.type == "cuda"
    flat = torch.empty(state_bytes // 4, device=device)
    host = torch.empty(state_bytes // 4, pin_memory=pin)

    def spike_and_step():
        with pool.reserve(pool.capacity_bytes):  # everything steps aside
            pass
        opt.step()  # ... and comes back for the update

    def plain_copy():
        host.copy_(flat, non_blocking=pin)
        flat.copy_(host, non_blocking=pin)

    t = alternate_all({"spike and step": spike_and_step, "step": opt.step, "copy": plain_copy}, repeats, device)
    paging = max(t["spike and step"] - t["step"], 0.0)
    return paging, t["copy"], state_bytes / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on shared machines)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {args.threads} CPU thread(s), "
          f"{args.repeats} alternating repeats, medians")
    for name, shapes in CASES.items():
        print(f"\n[{name}] ours: PagedAdamW, reference: torch.optim.AdamW")
        report("step, nothing paged", *bench_step(shapes, device, args.repeats), TARGETS)
        paging, copy, mib = bench_paging(shapes, device, args.repeats)
        print(f"[{name}] ours: paging {mib:.1f} MiB of states out and back in; reference: a plain copy of as "
              "many bytes")
        report("paging the states out and back vs a plain copy", paging, copy, TARGETS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
