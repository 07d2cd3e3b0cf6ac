"""Paged optimizer state: a page pool with a device budget, and an AdamW whose states live
in it.

Explained in the chapter *Paged optimizers* (book/chapters/paged.md).

QLoRA's third trick (Dettmers et al. 2023, §3): when a memory spike (the activations of a
long sequence) would not fit, optimizer states step aside to host memory and come back for
the update. bitsandbytes does it with CUDA unified memory and the driver's page migration;
here the mechanism is explicit:

- :class:`PagePool` holds pages of optimizer state within ``capacity_bytes`` of device
  memory. Pages that do not fit live in host memory. On CUDA they are real device buffers
  and pinned host buffers moved by asynchronous copies; on a CPU the pool *simulates* the
  device budget: the copies are real, the budget is exact byte accounting.
- :meth:`PagePool.reserve` is a context manager for a spike: it evicts least-recently-used
  pages to host until the spike fits, or refuses (:class:`PoolMemoryError`) before
  changing anything.
- :class:`PagedAdamW` takes the same steps as ``torch.optim.AdamW``; its two state tensors
  are paged in, one page at a time, for each update. With ``optim_bits=8`` it takes
  bitsandbytes' ``AdamW8bit`` steps instead, its states kept as 8-bit codes and one
  float32 absmax per block of 256, paged the same way (the chapter *LoRA variants*,
  book/chapters/variants.md; :func:`state_bytes` counts them).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from peftlab.checks import positive_int
from peftlab.double_quant import cached_dynamic_map, dequantize_8bit, quantize_8bit

__all__ = [
    "DEFAULT_PAGE_BYTES",
    "MIN_8BIT_SIZE",
    "OPTIM_BITS",
    "STATE_BLOCKSIZE",
    "Event",
    "PagePool",
    "PagedAdamW",
    "PagedTensor",
    "PoolMemoryError",
    "PoolStats",
    "state_bytes",
]

#: Default page size, 2 MiB (a common GPU large-page size). Note: smaller pages evict closer to what a spike
#: needs but cost more copies and more Python per update; the chapter uses 64 KiB for its tiny model.
DEFAULT_PAGE_BYTES = 2 * 1024 * 1024

#: The bits per element of PagedAdamW's states (``optim_bits``).
OPTIM_BITS = (32, 8)
#: Elements per absmax block of an 8-bit state (bitsandbytes' optimizers: 256).
STATE_BLOCKSIZE = 256
#: bitsandbytes' ``min_8bit_size``: parameters with fewer elements keep 32-bit states.
MIN_8BIT_SIZE = 4096


def state_bytes(
    numel: int, optim_bits: int = 32, min_8bit_size: int = MIN_8BIT_SIZE
) -> int:
    """Bytes of :class:`PagedAdamW`'s two states for a float32 (or 16-bit) parameter of
    ``numel`` elements: ``8 * numel`` in 32 bits; in 8 bits, ``2 * numel`` codes plus two
    float32 absmax per block of :data:`STATE_BLOCKSIZE`, unless ``numel <
    min_8bit_size`` (then 32-bit, as bitsandbytes does).

    The one count of the states' bytes: :func:`peftlab.memory.estimate` adds it up over
    the trained tensors, and the pool's bytes equal it (tests/test_paged8bit.py).
    """
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    _check_optim_bits(optim_bits, min_8bit_size)
    if optim_bits == 32 or numel < min_8bit_size:
        return 2 * 4 * numel
    return 2 * (numel + 4 * -(-numel // STATE_BLOCKSIZE))


class PoolMemoryError(MemoryError):
    """A spike or a page that does not fit in the pool even after every page has been
    evicted.

    Attributes name the sizes involved, in bytes: ``requested``, ``capacity`` and
    ``reserved`` (held by other reservations, which cannot be evicted).
    """

    def __init__(self, what: str, requested: int, capacity: int, reserved: int) -> None:
        self.requested, self.capacity, self.reserved = requested, capacity, reserved
        super().__init__(
            f"{what}: {requested:,} bytes requested, but the pool's capacity_bytes is {capacity:,} "
            f"and {reserved:,} bytes are held by other reservations, so at most "
            f"{max(capacity - reserved, 0):,} bytes could be freed; nothing was changed"
        )


class Event(NamedTuple):
    """One point of the pool's timeline (bytes after the event)."""

    seconds: float  # since the pool was created
    kind: str  # "alloc", "free", "page_out", "page_in", "reserve", "release", "mark"
    label: str
    device_bytes: int  # resident pages + reservations
    host_bytes: int  # pages whose live copy is on the host
    reserved_bytes: int


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's accounting, in bytes (``paging_seconds`` in seconds)."""

    capacity_bytes: int
    device_bytes: int
    resident_bytes: int
    reserved_bytes: int
    host_bytes: int
    peak_device_bytes: int
    paged_out_bytes: int
    paged_in_bytes: int
    page_outs: int
    page_ins: int
    paging_seconds: float
    timeline: tuple[Event, ...]


class _Page:
    """One chunk of a paged tensor: its live copy is ``data`` (device) or ``host``, never
    both."""

    __slots__ = ("numel", "nbytes", "data", "host", "in_use")

    def __init__(self, data: torch.Tensor) -> None:
        self.numel = data.numel()
        self.nbytes = self.numel * data.element_size()
        self.data: torch.Tensor | None = data
        self.host: torch.Tensor | None = (
            None  # kept once allocated: the page's backing store
        )
        self.in_use = False  # True while an update uses it: not evictable


class PagedTensor:
    """A tensor stored as pages of a :class:`PagePool`; flat, split into chunks of
    ``page_numel`` elements."""

    def __init__(
        self, pool: PagePool, shape: torch.Size, dtype: torch.dtype, pages: list[_Page]
    ) -> None:
        self.pool, self.shape, self.dtype, self.pages = pool, shape, dtype, pages

    @property
    def nbytes(self) -> int:
        return sum(page.nbytes for page in self.pages)

    def to_tensor(self) -> torch.Tensor:
        """A new ordinary tensor on the pool's device with the current values.

        Note: reading does not page anything in or change the LRU order; host pages are
        copied directly.
        """
        out = torch.empty(
            math.prod(self.shape), dtype=self.dtype, device=self.pool.device
        )
        start = 0
        for page in self.pages:
            src = page.data if page.data is not None else page.host
            out[start : start + page.numel].copy_(src, non_blocking=self.pool._async)
            start += page.numel
        return out.view(self.shape)


class PagePool:
    """A fixed budget of device memory for optimizer-state pages; pages that do not fit
    live on the host.

    Args:
        capacity_bytes: the device budget; pages and :meth:`reserve` spikes must fit in it
        together.
        device: where pages live when resident (default: the CPU; pass ``"cuda"`` for a
            GPU). On cpu the budget is simulated: copies between "device" and "host"
            buffers are real, the limit is accounting.
        page_bytes: page size; a tensor is split into pages of ``page_bytes //
        element_size`` elements.
        timeline_len: how many recent :class:`Event` s :attr:`stats` keeps for plotting.

    Note: eviction is least-recently-used; a page is "used" when it is allocated or paged
    in for an update. Pages are paged in lazily, when an update needs them (bitsandbytes
    prefetches before each update instead).
    Note: ``stats.paging_seconds`` is the copies' own time: on CUDA measured by CUDA
    events around each asynchronous copy (read, and so waited for, only when :attr:`stats`
    is read), on a CPU by the clock.
    """

    def __init__(
        self,
        capacity_bytes: int,
        device: str | torch.device = "cpu",
        page_bytes: int = DEFAULT_PAGE_BYTES,
        timeline_len: int = 100_000,
    ) -> None:
        self.capacity_bytes = positive_int(capacity_bytes, "capacity_bytes", "bytes")
        self.page_bytes = positive_int(page_bytes, "page_bytes", "bytes")
        self.device = _resolve_device(device)
        # Note: on CUDA, copies run asynchronously on the current stream (stream order
        # makes them safe: a freed device buffer is only reused after the copy that read
        # it, see _page_out), and host buffers are pinned. Use a pool from one stream at a
        # time: a page's host buffer is reused by its next page-out, which stream order
        # only keeps behind the previous page-in on the same stream.
        self._async = self.device.type == "cuda"
        self._resident: OrderedDict[int, _Page] = OrderedDict()  # LRU order: oldest first
        self._resident_bytes = 0
        self._host_bytes = 0
        self._reserved_bytes = 0
        self._peak = 0
        self._out_bytes = self._in_bytes = self._outs = self._ins = 0
        self._copy_timer = _CudaCopyTimer(self.device) if self._async else _ClockTimer()
        self._t0 = time.perf_counter()
        self._timeline: deque[Event] = deque(
            maxlen=positive_int(timeline_len, "timeline_len", "events")
        )

    # -- accounting
    # ---------------------------------------------------------------------------------
    @property
    def device_bytes(self) -> int:
        """Bytes held on the device: resident pages plus reservations."""
        return self._resident_bytes + self._reserved_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.device_bytes

    @property
    def stats(self) -> PoolStats:
        """Bytes on device and host, bytes paged out and in, the peak, and the timeline (a
        snapshot)."""
        return PoolStats(
            capacity_bytes=self.capacity_bytes,
            device_bytes=self.device_bytes,
            resident_bytes=self._resident_bytes,
            reserved_bytes=self._reserved_bytes,
            host_bytes=self._host_bytes,
            peak_device_bytes=self._peak,
            paged_out_bytes=self._out_bytes,
            paged_in_bytes=self._in_bytes,
            page_outs=self._outs,
            page_ins=self._ins,
            paging_seconds=self._copy_timer.seconds(),
            timeline=tuple(self._timeline),
        )

    def mark(self, label: str) -> None:
        """Add a labelled point to the timeline (e.g. the start of a training step);
        changes nothing."""
        self._record("mark", label)

    def _record(self, kind: str, label: str = "") -> None:
        self._peak = max(self._peak, self.device_bytes)
        self._timeline.append(
            Event(
                time.perf_counter() - self._t0,
                kind,
                label,
                self.device_bytes,
                self._host_bytes,
                self._reserved_bytes,
            )
        )

    def _check_fits(self, nbytes: int, what: str) -> None:
        """Raise before changing anything if ``nbytes`` cannot fit even with every page
        evicted."""
        if nbytes > self.capacity_bytes - self._reserved_bytes:
            raise PoolMemoryError(what, nbytes, self.capacity_bytes, self._reserved_bytes)

    # -- pages
    # ---------------------------------------------------------------------------------
    def zeros(
        self,
        shape: Sequence[int] | torch.Size,
        dtype: torch.dtype = torch.float32,
        *,
        page_numel: int | None = None,
    ) -> PagedTensor:
        """A zero-filled :class:`PagedTensor`; its pages start on the device (evicting
        others if needed).

        ``page_numel``: elements per page (default ``page_bytes // element_size``). The
        8-bit optimizer states pass a multiple of their block size: a block is
        quantized as a whole, so it must not straddle two pages.
        """
        shape = torch.Size(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if page_numel is None:
            page_numel = max(self.page_bytes // itemsize, 1)
        else:
            page_numel = positive_int(page_numel, "page_numel", "elements")
        numel = math.prod(shape)
        sizes = [min(page_numel, numel - start) for start in range(0, numel, page_numel)]
        if sizes:
            self._check_fits(sizes[0] * itemsize, "a new page")
        pages = []
        for n in sizes:
            self._make_room(n * itemsize)
            page = _Page(torch.zeros(n, dtype=dtype, device=self.device))
            self._resident[id(page)] = page
            self._resident_bytes += page.nbytes
            pages.append(page)
        self._record("alloc")
        return PagedTensor(self, shape, dtype, pages)

    def from_tensor(
        self, tensor: torch.Tensor, *, page_numel: int | None = None
    ) -> PagedTensor:
        """A :class:`PagedTensor` holding a copy of ``tensor`` (``page_numel``: as for
        :meth:`zeros`)."""
        paged = self.zeros(tensor.shape, tensor.dtype, page_numel=page_numel)
        flat = tensor.detach().reshape(-1)
        start = 0
        for page in paged.pages:
            src = flat[start : start + page.numel]
            if page.data is not None:
                page.data.copy_(src)
            else:  # evicted while later pages were allocated
                page.host.copy_(src)
            start += page.numel
        return paged

    def free(self, paged: PagedTensor) -> None:
        """Release a paged tensor's pages (device and host)."""
        for page in paged.pages:
            if page.data is not None:
                del self._resident[id(page)]
                self._resident_bytes -= page.nbytes
            else:
                self._host_bytes -= page.nbytes
            page.data = page.host = None
        paged.pages = []
        self._record("free")

    def evict_all(self) -> None:
        """Page every page not in use out to the host (as a very large spike would)."""
        self._make_room(self.capacity_bytes)

    def _make_room(self, nbytes: int) -> None:
        """Evict LRU pages (not those in use) until ``nbytes`` more fit (callers have
        checked that they can)."""
        if self.free_bytes >= nbytes:
            return
        for page in list(self._resident.values()):
            if self.free_bytes >= nbytes:
                break
            if not page.in_use:
                self._page_out(page)

    def _page_out(self, page: _Page) -> None:
        if page.host is None:
            page.host = torch.empty(
                page.numel, dtype=page.data.dtype, pin_memory=self._async
            )
        token = self._copy_timer.start()
        page.host.copy_(page.data, non_blocking=self._async)
        self._copy_timer.stop(token)
        if self._async:
            # The copy runs on the current stream; if that is not the stream the buffer
            # was allocated on, the caching allocator must not hand the block out again
            # before the copy has read it.
            page.data.record_stream(torch.cuda.current_stream(self.device))
        # on CUDA the block returns to the caching allocator, reused in stream order
        page.data = None
        del self._resident[id(page)]
        self._resident_bytes -= page.nbytes
        self._host_bytes += page.nbytes
        self._out_bytes += page.nbytes
        self._outs += 1
        self._record("page_out")

    def _page_in(self, page: _Page) -> None:
        # Note: a fresh buffer and an explicit copy: on cpu, ``host.to("cpu")`` would
        # alias the host buffer.
        page.data = torch.empty_like(page.host, device=self.device)
        token = self._copy_timer.start()
        page.data.copy_(page.host, non_blocking=self._async)
        self._copy_timer.stop(token)
        self._resident[id(page)] = page
        self._resident_bytes += page.nbytes
        self._host_bytes -= page.nbytes
        self._in_bytes += page.nbytes
        self._ins += 1
        self._record("page_in")

    def _acquire(self, pages: Sequence[_Page]) -> None:
        """Make ``pages`` resident together and most recently used (callers have checked
        that they fit)."""
        # the common case: nothing to page in
        if all(page.data is not None for page in pages):
            for page in pages:
                self._resident.move_to_end(id(page))
            return
        for page in pages:
            page.in_use = True
        try:
            for page in pages:
                if page.data is None:
                    self._make_room(page.nbytes)
                    self._page_in(page)
                else:
                    self._resident.move_to_end(id(page))
        finally:
            for page in pages:
                page.in_use = False

    # -- spikes
    # ---------------------------------------------------------------------------------
    @contextmanager
    def reserve(self, nbytes: int, label: str = "spike") -> Iterator[None]:
        """Hold ``nbytes`` of the device budget for a memory spike, evicting LRU pages to
        host as needed.

        Raises:
            PoolMemoryError: (a ``MemoryError``) if ``nbytes`` exceeds the capacity minus
                other reservations, i.e. even an empty pool could not hold it; then no
                page has moved.

        Note: pages evicted for the spike are not paged back when it ends; they return
        when next used.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(
                f"nbytes must be an int number of bytes, got {type(nbytes).__name__}"
            )
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._check_fits(nbytes, f"reserve({label!r})")
        self._make_room(nbytes)
        self._reserved_bytes += nbytes
        self._record("reserve", label)
        try:
            yield
        finally:
            self._reserved_bytes -= nbytes
            self._record("release", label)


class _ClockTimer:
    """Seconds of synchronous copies (a CPU pool), by the clock."""

    def __init__(self) -> None:
        self._seconds = 0.0

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, token: float) -> None:
        self._seconds += time.perf_counter() - token

    def seconds(self) -> float:
        return self._seconds


class _CudaCopyTimer:
    """Seconds of asynchronous CUDA copies, by CUDA events recorded around each on the
    current stream.

    Note: the clock would measure only the launch of an asynchronous copy. Events measure
    the copy on the GPU without making the host wait for it; they are read (their end
    waited for) only when the total is asked.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._seconds = 0.0
        self._pending: list[tuple[Any, Any]] = []

    def start(self) -> Any:
        begin = torch.cuda.Event(enable_timing=True)
        begin.record(torch.cuda.current_stream(self.device))
        return begin

    def stop(self, token: Any) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self._pending.append((token, end))
        # a long run that never reads the total: fold the finished copies
        if len(self._pending) >= 4096:
            self._fold(wait=False)

    def _fold(self, wait: bool) -> None:
        still = []
        for begin, end in self._pending:
            if wait:
                end.synchronize()
            elif not end.query():
                still.append((begin, end))
                continue
            self._seconds += begin.elapsed_time(end) / 1e3  # milliseconds
        self._pending = still

    def seconds(self) -> float:
        self._fold(wait=True)
        return self._seconds


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but torch.cuda.is_available() is False")
        if (
            device.index is None
        ):  # compare equal to the parameters' device, which carries an index
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    return device


def _check_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    def number(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return float(value)

    if number(lr, "lr") < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= number(beta, f"betas[{i}]") < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    if number(eps, "eps") <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if number(weight_decay, "weight_decay") < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _check_optim_bits(optim_bits: Any, min_8bit_size: Any) -> None:
    if isinstance(optim_bits, bool) or not isinstance(optim_bits, int):
        raise TypeError(
            f"optim_bits must be an int, 8 or 32, got {type(optim_bits).__name__} {optim_bits!r}"
        )
    if optim_bits not in OPTIM_BITS:
        raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int):
        raise TypeError(
            f"min_8bit_size must be an int number of elements, got {type(min_8bit_size).__name__}"
        )
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")


# The keys of a parameter's paged states: 32-bit (torch.optim.AdamW's names) or 8-bit (one
# uint8 code per element and one float32 absmax per block of STATE_BLOCKSIZE, per state).
_KEYS_32 = ("exp_avg", "exp_avg_sq")
_KEYS_8 = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose two state tensors live in a :class:`PagePool`,
    in 32 or 8 bits.

    With ``optim_bits=32`` (default) it takes the same steps as ``torch.optim.AdamW`` with
    the same arguments (its single-tensor path: the same operations in the same order),
    whether or not states were paged out in between. With ``optim_bits=8`` it takes
    bitsandbytes' ``AdamW8bit`` steps (below). The paging is explained in the chapter
    *Paged optimizers* (book/chapters/paged.md), the 8-bit states in the chapter *LoRA
    variants* (book/chapters/variants.md).

    Args: params, lr, betas, eps, weight_decay: as for ``torch.optim.AdamW`` (same
        defaults).
        pool: where the states live. Default: a pool on the parameters' device whose
            capacity is the free device memory on CUDA, and unlimited on cpu (then nothing
            is ever paged).
        optim_bits: 32 or 8, the bits per element of each state (bitsandbytes'
            ``optim_bits``).
        min_8bit_size: with ``optim_bits=8``, parameters with fewer elements keep 32-bit
            states (bitsandbytes' ``min_8bit_size``, default 4096): their states are
            small (norms, biases), so 8 bits would save little.

    The 8-bit states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
    Quantization"), as bitsandbytes 0.50.2 keeps them: ``exp_avg`` (m) in the signed
    dynamic map and ``exp_avg_sq`` (v) in the unsigned one
    (:func:`peftlab.double_quant.dynamic_map`), each as one uint8 code per element plus one
    float32 absmax per block of :data:`STATE_BLOCKSIZE` = 256 elements: 2 + 8/256 bytes per
    parameter instead of 8 (:func:`state_bytes`). One step of a parameter, exactly as
    bitsandbytes' CPU kernel (``backends/cpu/ops.py``, ``_optimizer_update_8bit_blockwise_cpu``)
    runs it, block-aligned chunk by chunk (Adam is elementwise and blocks are
    independent, so chunks give the same bits as the whole tensor):

    1. dequantize: ``m = signed[codes_m] * absmax_m[block]``,
       ``v = unsigned[codes_v] * absmax_v[block]`` in float32 (the absmax of the last step);
    2. ``m = m * beta1 + (1 - beta1) * g``; ``v = v * beta2 + (1 - beta2) * g * g``
       (``mul_`` then ``add_``/``addcmul_``, not torch's ``lerp_``), g in float32;
    3. ``denom = sqrt(v) / sqrt(1 - beta2**t) + eps`` (eps outside the bias correction,
       as in torch's AdamW);
    4. decoupled weight decay ``p *= 1 - lr * weight_decay`` (if weight_decay > 0), then
       ``p -= lr / (1 - beta1**t) * m / denom``, in float32 and rounded once to p's dtype;
    5. requantize m and v: each block's new absmax is its largest ``|value|``, each value
       ``x / absmax`` gets a code through bitsandbytes' CPU lookup table
       (:func:`peftlab.double_quant.quantize_8bit`, byte-identical).

    With ``optim_bits=8``, parameters below ``min_8bit_size`` take bitsandbytes' 32-bit
    CPU step instead (``_optimizer_update_32bit_cpu``): float32 states and ``p -= lr *
    sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps * sqrt(1 - beta2**t))``, the
    same AdamW in another order of roundings than torch's. So the whole optimizer takes
    ``bitsandbytes.optim.AdamW8bit``'s steps bit for bit on a CPU (tests/test_paged8bit.py).

    Note: Adam is elementwise, so each update runs page by page on slices of the parameter
    and gradient: only one page of each state (for 8 bits: of codes and of absmax) needs to
    be resident at a time, and temporaries are page-sized (for 8 bits, the dequantized
    float32 states are at most ``page_bytes`` each).
    Note: ``state_dict()`` holds ordinary tensors (as ``torch.optim.AdamW``'s does): 32-bit
    states under ``exp_avg``/``exp_avg_sq`` (so checkpoints load in either), 8-bit ones as
    uint8 ``exp_avg_codes``/``exp_avg_sq_codes`` (shaped like the parameter) and float32
    ``exp_avg_absmax``/``exp_avg_sq_absmax`` (one per block). A state's keys decide its
    format when loaded.
    Note: 32-bit states are float32 for 16-bit parameters (float16, bfloat16), as in
    bitsandbytes' 32-bit optimizers: the update of such a parameter is computed in float32
    and written back rounded to its dtype once per step. (States in float16 overflow:
    ``v`` holds squared gradients, and ``1 - beta2`` = 1e-3 is near float16's
    resolution.) With ``optim_bits=32``, float32 and float64 parameters keep states of
    their own dtype and take ``torch.optim.AdamW``'s steps exactly; with ``optim_bits=8``
    every update is computed in float32, as bitsandbytes computes it (a float64
    parameter is rounded through float32 at each step).
    Note: 8-bit states cannot hold NaN or inf (a block's absmax would be lost); a step
    whose gradients are not finite is refused before anything changes (bitsandbytes
    would store meaningless codes).
    Note: bitsandbytes' CUDA kernel quantizes the new states by a search for the nearest
    code, its CPU kernel (and this class) by the lookup table; the two differ where a
    value falls near the midpoint of two codes. bitsandbytes 0.50.2's ``AdamW8bit`` has no
    ``percentile_clipping`` and passes no ``max_unorm``: neither is implemented here.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        pool: PagePool | None = None,
        *,
        optim_bits: int = 32,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay)
        _check_optim_bits(optim_bits, min_8bit_size)
        self.optim_bits, self.min_8bit_size = optim_bits, min_8bit_size
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        )
        for group in self.param_groups:
            _check_hyperparameters(
                group["lr"], group["betas"], group["eps"], group["weight_decay"]
            )
            for p in group["params"]:
                if p.is_complex() or not p.is_floating_point():
                    raise TypeError(
                        f"params must be real floating-point tensors, got dtype {p.dtype}"
                    )
        if pool is None:
            pool = _default_pool(self.param_groups[0]["params"][0].device)
        if not isinstance(pool, PagePool):
            raise TypeError(f"pool must be a PagePool or None, got {type(pool).__name__}")
        self.pool = pool
        for group in self.param_groups:
            for p in group["params"]:
                if p.device != pool.device:
                    raise ValueError(
                        f"params must be on the pool's device {pool.device}, got one on {p.device}"
                    )

    @staticmethod
    def state_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype of the 32-bit AdamW states of a parameter of ``dtype`` with
        ``optim_bits=32``: float32 for 16-bit parameters (as bitsandbytes' 32-bit
        optimizers keep them), else ``dtype``."""
        return torch.promote_types(dtype, torch.float32)

    def is_8bit(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s states are (or, before its first step, will be) 8-bit."""
        state = self.state.get(p)
        if state:
            return _KEYS_8[0] in state
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _page_numel(self, itemsize: int, multiple: int) -> int:
        """Elements per page: as many as fit in ``page_bytes``, rounded down to a multiple
        of ``multiple`` (at least one multiple)."""
        return max(self.pool.page_bytes // itemsize // multiple, 1) * multiple

    def _layout(
        self, p: torch.Tensor, eight_bit: bool
    ) -> dict[str, tuple[torch.Size, torch.dtype, int | None]]:
        """Shape, dtype and elements per page of each state of ``p``."""
        if not eight_bit:
            if self.optim_bits == 32:
                dtype = self.state_dtype(p.dtype)
                return {k: (p.shape, dtype, None) for k in _KEYS_32}
            # bitsandbytes' 32-bit step: float32 states; pages of whole 256-element
            # stretches keep each page's vector loops aligned as on the whole tensor
            numel = self._page_numel(4, STATE_BLOCKSIZE)
            return {k: (p.shape, torch.float32, numel) for k in _KEYS_32}
        codes = self._page_numel(1, STATE_BLOCKSIZE)  # whole blocks per page
        per_page = codes // STATE_BLOCKSIZE
        # absmax pages hold whole pages' worth of blocks: a page of codes finds all its
        # absmax in one page
        absmax = self._page_numel(4, per_page)
        blocks = torch.Size([-(-p.numel() // STATE_BLOCKSIZE)])
        return {
            "exp_avg_codes": (p.shape, torch.uint8, codes),
            "exp_avg_absmax": (blocks, torch.float32, absmax),
            "exp_avg_sq_codes": (p.shape, torch.uint8, codes),
            "exp_avg_sq_absmax": (blocks, torch.float32, absmax),
        }

    def _update_bytes(self, p: torch.Tensor) -> int:
        """Bytes of the pages one update of ``p`` holds resident together (the first page
        of each state: the largest)."""
        state = self.state.get(p)
        if state:
            return sum(
                v.pages[0].nbytes
                for v in state.values()
                if isinstance(v, PagedTensor) and v.pages
            )
        total = 0
        for shape, dtype, page_numel in self._layout(p, self.is_8bit(p)).values():
            itemsize = torch.empty((), dtype=dtype).element_size()
            per_page = page_numel or max(self.pool.page_bytes // itemsize, 1)
            total += min(math.prod(shape), per_page) * itemsize
        return total

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            if not p.is_contiguous():
                raise ValueError(
                    "params must be contiguous: updates run on slices of p.view(-1)"
                )
            layout = self._layout(p, self.is_8bit(p))
            state["step"] = torch.tensor(0.0)  # as torch.optim.AdamW keeps it
            for key, (shape, dtype, page_numel) in layout.items():
                # all-zero codes with absmax 0 dequantize to 0, as bitsandbytes starts
                state[key] = self.pool.zeros(shape, dtype, page_numel=page_numel)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One AdamW update of every parameter with a gradient; states are paged in page
        by page.

        Raises ``PoolMemoryError`` before changing anything if one page of each state
        cannot fit beside the current reservations, and ``ValueError`` if a parameter
        with 8-bit states has a gradient that is not finite.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [
            (g, p) for g in self.param_groups for p in g["params"] if p.grad is not None
        ]
        largest = 0
        for _, p in work:
            if p.grad.is_sparse:
                raise TypeError("PagedAdamW does not support sparse gradients")
            if self.is_8bit(p) and not bool(torch.isfinite(p.grad).all()):
                raise ValueError(
                    "gradients of parameters with 8-bit states must be finite "
                    "(a NaN or inf "
                    "would take its block's absmax); nothing was changed"
                )
            largest = max(largest, self._update_bytes(p))
        self.pool._check_fits(largest, "one page of each AdamW state")
        for group, p in work:
            state = self._state(p)
            lr, (beta1, beta2), eps, wd = (
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
            )
            state["step"] += 1
            step = state["step"].item()
            if _KEYS_8[0] in state:
                self._update_8bit(p, state, lr, beta1, beta2, eps, wd, step)
            elif self.optim_bits == 8:
                self._update_bnb_32bit(p, state, lr, beta1, beta2, eps, wd, step)
            else:
                self._update_torch(p, state, lr, beta1, beta2, eps, wd, step)
        return loss

    def _update_torch(
        self,
        p: torch.Tensor,
        state: dict[str, Any],
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        wd: float,
        step: float,
    ) -> None:
        """torch.optim.AdamW's single-tensor step, page by page."""
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1
        # 16-bit parameters: the update in float32 (the states' dtype), rounded once
        wide = self.state_dtype(p.dtype) != p.dtype
        if wd != 0 and not wide:
            p.mul_(1 - lr * wd)
        p_flat, g_flat = p.view(-1), p.grad.reshape(-1)
        start = 0
        for m_page, v_page in zip(state["exp_avg"].pages, state["exp_avg_sq"].pages):
            self.pool._acquire((m_page, v_page))
            m, v = m_page.data, v_page.data
            stop = start + m_page.numel
            # one page: skip making slices (Python time per param)
            whole = stop - start == p_flat.numel()
            g = g_flat if whole else g_flat[start:stop]
            target = p_flat if whole else p_flat[start:stop]
            if wide:
                g = g.to(m.dtype)
                target_wide = target.to(m.dtype)
                if wd != 0:
                    target_wide.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            if wide:
                target.copy_(target_wide.addcdiv_(m, denom, value=-step_size))
            else:
                target.addcdiv_(m, denom, value=-step_size)
            start = stop

    def _update_bnb_32bit(
        self,
        p: torch.Tensor,
        state: dict[str, Any],
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        wd: float,
        step: float,
    ) -> None:
        """bitsandbytes' CPU 32-bit Adam step (``_optimizer_update_32bit_cpu``, its
        operations in its order), page by page: the step ``AdamW8bit`` takes for
        parameters below ``min_8bit_size``."""
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        step_size = -lr * correction2 / correction1
        p_flat, g_flat = p.view(-1), p.grad.reshape(-1)
        start = 0
        for m_page, v_page in zip(state["exp_avg"].pages, state["exp_avg_sq"].pages):
            self.pool._acquire((m_page, v_page))
            m, v = m_page.data, v_page.data
            stop = start + m_page.numel
            target = p_flat[start:stop]
            g = g_flat[start:stop].float()
            p32 = target.float()  # the parameter itself when float32, as in bitsandbytes
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            if wd > 0.0:
                p32.mul_(1.0 - lr * wd)
            update = m / (v.sqrt() + eps * correction2)
            p32.add_(update, alpha=step_size)
            if p32 is not target:
                target.copy_(p32)
            start = stop

    def _update_8bit(
        self,
        p: torch.Tensor,
        state: dict[str, Any],
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        wd: float,
        step: float,
    ) -> None:
        """bitsandbytes' CPU 8-bit blockwise Adam step
        (``_optimizer_update_8bit_blockwise_cpu``), page by page and, within a page, in
        chunks of whole blocks whose float32 temporaries take at most ``page_bytes``."""
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        signed = cached_dynamic_map(str(p.device), True)
        unsigned = cached_dynamic_map(str(p.device), False)
        m_codes, m_absmax, v_codes, v_absmax = (state[k] for k in _KEYS_8)
        chunk = self._page_numel(4, STATE_BLOCKSIZE)
        p_flat, g_flat = p.view(-1), p.grad.reshape(-1)
        blocks_per_absmax_page = m_absmax.pages[0].numel if m_absmax.pages else 1
        start = 0
        for mc, vc in zip(m_codes.pages, v_codes.pages):
            # this page's blocks lie in one absmax page (see _layout)
            first = start // STATE_BLOCKSIZE
            index, offset = divmod(first, blocks_per_absmax_page)
            ma, va = m_absmax.pages[index], v_absmax.pages[index]
            self.pool._acquire((mc, vc, ma, va))
            for lo in range(0, mc.numel, chunk):
                hi = min(lo + chunk, mc.numel)
                b_lo = offset + lo // STATE_BLOCKSIZE
                b_hi = offset + -(-hi // STATE_BLOCKSIZE)
                codes = (mc.data[lo:hi], vc.data[lo:hi])
                absmax = (ma.data[b_lo:b_hi], va.data[b_lo:b_hi])
                m = dequantize_8bit(codes[0], absmax[0], signed, STATE_BLOCKSIZE)
                v = dequantize_8bit(codes[1], absmax[1], unsigned, STATE_BLOCKSIZE)
                target = p_flat[start + lo : start + hi]
                g = g_flat[start + lo : start + hi].float()
                p32 = target.float()  # the parameter itself when float32
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = (v.sqrt() / correction2).add_(eps)
                if wd > 0.0:
                    p32.mul_(1.0 - lr * wd)
                p32.addcdiv_(m, denom, value=-lr / correction1)
                if p32 is not target:
                    target.copy_(p32)
                # requantize with each block's new absmax
                for new, code, c_out, a_out in (
                    (m, signed, codes[0], absmax[0]),
                    (v, unsigned, codes[1], absmax[1]),
                ):
                    new_codes, new_absmax = quantize_8bit(new, code, STATE_BLOCKSIZE)
                    c_out.copy_(new_codes)
                    a_out.copy_(new_absmax)
            start += mc.numel

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.AdamW.state_dict()``: states gathered into ordinary tensors
        (8-bit states as their codes and absmax)."""
        sd = super().state_dict()
        sd["state"] = {
            key: {
                k: (v.to_tensor() if isinstance(v, PagedTensor) else v)
                for k, v in s.items()
            }
            for key, s in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an ``AdamW``-format state dict (ours or torch's) or one of our 8-bit ones;
        states are copied into the pool."""
        old = [
            v
            for s in self.state.values()
            for v in s.values()
            if isinstance(v, PagedTensor)
        ]
        super().load_state_dict(state_dict)
        for v in old:
            self.pool.free(v)
        # torch's loader casts floating-point states (and uint8 codes) to the
        # parameter's dtype; take them from state_dict instead, in the states' dtypes
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            s, saved = self.state.get(p), state_dict["state"].get(saved_id, {})
            if not s:
                continue
            eight_bit = _KEYS_8[0] in s
            for k, (shape, dtype, page_numel) in self._layout(p, eight_bit).items():
                value = saved.get(k)
                value = value if isinstance(value, torch.Tensor) else s.get(k)
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"state_dict's state of a parameter lacks {k!r}")
                if value.shape != shape:
                    raise ValueError(
                        f"state_dict's {k!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
                    )
                s[k] = self.pool.from_tensor(
                    value.to(device=p.device, dtype=dtype), page_numel=page_numel
                )


def _default_pool(device: torch.device) -> PagePool:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return PagePool(free, device)
    return PagePool(2**62, device)  # effectively unlimited: nothing is paged
