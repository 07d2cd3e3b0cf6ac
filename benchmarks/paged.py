"""Benchmark peftlab.paged: PagedAdamW's step vs torch.optim.AdamW when nothing is paged, and the cost of paging.

    python benchmarks/paged.py [--device cpu|cuda] [--repeats 30] [--threads 1]

Ours and the reference run alternately in one process and the medians are compared. Targets (issue 6):
PagedAdamW's step at most 1.3x torch.optim.AdamW's when nothing is paged. The cost of paging is reported per MiB
moved out and back in, beside a plain copy of the same bytes (no target: it is the price of the copies).
Machines are noisy: the script prints PASS/MISS and always exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peftlab.paged import DEFAULT_PAGE_BYTES, PagedAdamW, PagePool

TARGET_STEP = 1.3

#: Parameter sets: LoRA adapters (many small matrices) and a full finetune of a few large ones.
CASES = {
    "LoRA-like: 64 x (2 x 16x1024)": [(16, 1024), (1024, 16)] * 64,
    "full-like: 8 x 1024x1024": [(1024, 1024)] * 8,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


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
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t_ours.append(_timed(ours.step, device))
        t_ref.append(_timed(ref.step, device))
    assert ours.pool.stats.page_outs == 0
    return statistics.median(t_ours), statistics.median(t_ref)


def bench_paging(shapes, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Median seconds per MiB moved out and back in by a spike that evicts every page, and of a plain copy
    of the same bytes out and back; also the MiB moved per spike."""
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

    t_spike, t_step, t_copy = [], [], []
    for _ in range(repeats):
        t_spike.append(_timed(spike_and_step, device))
        t_step.append(_timed(opt.step, device))
        t_copy.append(_timed(plain_copy, device))
    mib = state_bytes / 2**20
    paging = max(statistics.median(t_spike) - statistics.median(t_step), 0.0)
    return paging / mib, statistics.median(t_copy) / mib, mib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on shared machines)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {args.threads} CPU thread(s), medians of {args.repeats}")
    for name, shapes in CASES.items():
        ours, ref = bench_step(shapes, device, args.repeats)
        ratio = ours / ref
        verdict = "PASS" if ratio <= TARGET_STEP else "MISS"
        print(f"\n[{name}] step, nothing paged: PagedAdamW {ours * 1e3:.2f} ms, torch.optim.AdamW {ref * 1e3:.2f} ms")
        print(f"  ours / reference = {ratio:.2f}  (target <= {TARGET_STEP}: {verdict})")
        per_mib, copy_per_mib, mib = bench_paging(shapes, device, args.repeats)
        print(f"[{name}] paging {mib:.1f} MiB of states out and back: {per_mib * 1e3:.3f} ms/MiB; "
              f"a plain copy out and back: {copy_per_mib * 1e3:.3f} ms/MiB")
        print(f"  ours / reference = {per_mib / copy_per_mib:.2f}  (no target: the price of the copies)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
