"""Where tensors compute: the dtypes a device computes in, reproducible settings, and
clocks that wait for the device.

Used by the 4-bit layer (*QLoRA*, book/chapters/qlora.md), the memory measurements
(*Memory savings*, book/chapters/memory.md), the experiment harness and every chapter's
``# GPU:`` cell.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

__all__ = [
    "Stopwatch",
    "alternating_medians",
    "default_compute_dtype",
    "make_deterministic",
    "median_seconds",
    "native_bf16",
    "sixteen_bit_dtype",
    "synchronize",
    "torch_threads",
]


def native_bf16(device: str | torch.device | None = None) -> bool:
    """True when ``device`` is a CUDA GPU that computes bfloat16 in hardware (compute
    capability ≥ 8.0).

    Note: not ``torch.cuda.is_bf16_supported()``: that also says True on a T4 (sm75,
    Colab's free GPU), where bfloat16 is emulated — correct, but slower than float16.
    """
    dev = torch.device("cuda" if device is None else device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(dev)
    return major >= 8


def sixteen_bit_dtype(device: str | torch.device) -> torch.dtype:
    """The 16-bit dtype to compute in on ``device``: float16 on a CUDA GPU that does not
    compute bfloat16 natively (T4, V100: see :func:`native_bf16`), bfloat16 everywhere
    else: GPUs that do (sm80+: A100, H100, RTX 30xx/40xx) and a CPU (the QLoRA paper's
    dtype; a CPU has no faster 16-bit type).

    The one rule for 16-bit compute: the frozen base of the experiment harness's
    ``precision="16-bit"`` runs, and on CUDA :func:`default_compute_dtype`.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not native_bf16(dev):
        return torch.float16
    return torch.bfloat16


def default_compute_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype a 4-bit layer (:class:`peftlab.qlora.Linear4bit`) computes in on
    ``device`` when not told: :func:`sixteen_bit_dtype` on a CUDA GPU, float32 anywhere
    else (on a CPU 16-bit matmuls are slower than float32, and float32 is exact).

    Also the dtype :func:`peftlab.measure.measure_llama` runs a model in when not told.
    """
    dev = torch.device(device)
    return sixteen_bit_dtype(dev) if dev.type == "cuda" else torch.float32


def synchronize(device: str | torch.device | None) -> None:
    """Wait until the work queued on ``device`` is done (CUDA); nothing to wait for on a
    CPU.

    Call it before reading a clock: CUDA kernels run asynchronously, so without it a timer
    measures their launch, not their work.
    """
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Stopwatch:
    """Accumulated seconds of the blocks run inside ``with watch:``, synchronizing
    ``device`` at both ends.

    >>> watch = Stopwatch("cpu")
    >>> with watch:
    ...     pass
    >>> watch.seconds >= 0
    True
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = None if device is None else torch.device(device)
        self.seconds = 0.0
        self._start: float | None = None

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)  # work queued before the block is not the block's
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(
            self.device
        )  # the block's kernels have finished, not only been launched
        self.seconds += time.perf_counter() - self._start
        self._start = None


def median_seconds(
    fn: Callable[[], object],
    device: str | torch.device | None = None,
    repeats: int = 20,
    warmup: int = 1,
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls, each
    timed between two
    synchronizations of ``device`` (see :class:`Stopwatch`)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        watch = Stopwatch(device)
        with watch:
            fn()
        times.append(watch.seconds)
    return statistics.median(times)


def alternating_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int = 5,
    device: str | torch.device | None = None,
    warmup: int = 1,
) -> dict[str, float]:
    """Median seconds of each of ``fns``, called in turn, round after round, the order
    reversed every other
    round, each call timed between synchronizations of ``device``.

    Note: comparing two implementations on a shared machine, alternating spreads a change
    of load over both instead of charging it to whichever ran at the time; medians resist
    the outliers that remain.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not fns or not all(callable(fn) for fn in fns.values()):
        raise TypeError("fns must be a non-empty dict of callables taking no arguments")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]:
            watch = Stopwatch(device)
            with watch:
                fn()
            times[name].append(watch.seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def make_deterministic() -> None:
    """Ask torch (and cuBLAS, cuDNN on a GPU) for deterministic kernels, as far as they
    have them.

    Note: ``CUBLAS_WORKSPACE_CONFIG`` is read when CUDA creates its cuBLAS handle, so it
    is set here, in the first cell, before anything touches the GPU (a value the reader
    set is kept). What stays not bit-reproducible on a GPU: bitsandbytes' kernels, and ops
    that accumulate with atomics (e.g. index_add, scatter_add, some backward passes),
    which torch then warns about instead of failing.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # Why: two clean builds must draw the same figures; warn_only keeps ops that have no
    # deterministic variant usable instead of failing a reader's run.
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch's CPU kernels on ``n`` threads, and restore the count
    after it, so a setting made for one measurement does not outlive it.

    One thread makes float32 arithmetic run in one fixed order (a recorded run re-runs
    bit for bit) and keeps tiny matrices from paying for a thread pool they cannot use.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
