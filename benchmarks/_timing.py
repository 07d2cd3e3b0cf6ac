"""Side-by-side timing shared by the benchmarks: ours and the reference, alternating, medians.

Both sides run in one process, call by call, with the order flipped every round, so drifts in machine
load hit both equally; medians resist the outliers of a noisy shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from peftlab.devices import synchronize


def sync(device: torch.device | None) -> None:
    """Wait for queued CUDA work, so a timer measures the kernels and not their launch
    (:func:`peftlab.devices.synchronize`, the one the package and the chapters use)."""
    synchronize(device)


def alternate(ours: Callable[[], object], reference: Callable[[], object], repeats: int,
              device: torch.device | None = None, warmup: int = 3) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``reference``, called alternately (order flipped every round)."""
    for _ in range(warmup):
        ours(), reference()
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for i in range(repeats):
        pair = [("ours", ours), ("reference", reference)]
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["reference"])


def report(name: str, ours: float, reference: float, targets: dict[str, float]) -> float:
    """Print ours, the reference and their ratio against ``targets[name]`` (PASS/MISS); return the ratio."""
    ratio = ours / reference
    target = targets[name]
    verdict = "PASS" if ratio <= target else "MISS"
    print(f"{name}: ours {ours * 1e3:.2f} ms, reference {reference * 1e3:.2f} ms, "
          f"ours / reference = {ratio:.2f} (target <= {target:.2f}: {verdict})")
    return ratio
