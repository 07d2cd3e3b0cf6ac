"""Side-by-side timing shared by the benchmarks: ours and the reference, alternating, medians; and the report.

Both sides run in one process, call by call, with the order flipped every round, so drifts in machine
load hit both equally; medians resist the outliers of a noisy shared machine. :func:`alternate_all` does the
same for more than two contenders; :func:`report` prints every comparison the same way (PASS/MISS against a
target, or the ratio alone for a comparison that has none).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from peftlab.devices import alternating_medians, synchronize


def sync(device: torch.device | None) -> None:
    """Wait for queued CUDA work, so a timer measures the kernels and not their launch
    (:func:`peftlab.devices.synchronize`, the one the package and the chapters use)."""
    synchronize(device)


def alternate_all(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device | None = None,
                  warmup: int = 3) -> dict[str, float]:
    """Median seconds of each of ``fns``, called in turn every round (the order reversed every other round),
    each call between two synchronizations of ``device``: :func:`peftlab.devices.alternating_medians`, the
    one timer the package, the chapters and the benchmarks share."""
    return alternating_medians(fns, repeats=repeats, device=device, warmup=warmup)


def alternate(ours: Callable[[], object], reference: Callable[[], object], repeats: int,
              device: torch.device | None = None, warmup: int = 3) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``reference``, called alternately (order flipped every round)."""
    medians = alternate_all({"ours": ours, "reference": reference}, repeats, device, warmup)
    return medians["ours"], medians["reference"]


def report(name: str, ours: float, reference: float, targets: dict[str, float | None]) -> float:
    """Print ours, the reference and their ratio against ``targets[name]`` (PASS/MISS); return the ratio.

    A target of None prints the ratio alone (a comparison for contrast, e.g. with a plain copy); a name
    missing from ``targets`` is an error, so a misspelt comparison cannot go unjudged.
    """
    ratio = ours / reference
    target = targets[name]
    if target is None:
        verdict = "no target: for contrast"
    else:
        verdict = f"target <= {target:.2f}: {'PASS' if ratio <= target else 'MISS'}"
    print(f"{name}: ours {ours * 1e3:.2f} ms, reference {reference * 1e3:.2f} ms, "
          f"ours / reference = {ratio:.2f} ({verdict})")
    return ratio
