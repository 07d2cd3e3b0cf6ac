"""A page pool: pages of memory within a device budget, least-recently-used pages stepping
aside to host memory for a spike and paged back in when next used.

Explained in the chapter *Paged optimizers* (book/chapters/paged.md). QLoRA's third trick
(Dettmers et al. 2023, §3): optimizer states step aside to host memory when a spike (the
activations of a long sequence) would not fit, and come back for the update.
bitsandbytes does it with CUDA unified memory and the driver's page migration; here the
mechanism is explicit. :class:`PagePool` holds pages within ``capacity_bytes`` of device
memory (on CUDA real device buffers and pinned host buffers moved by asynchronous copies;
on a CPU a *simulated* budget: real copies, exact byte accounting).
:meth:`PagePool.reserve` holds room for a spike, evicting pages, or refuses
(:class:`PoolMemoryError`) before changing anything. A user of the pages
(:class:`peftlab.paged.PagedAdamW`) checks that the pages it holds together fit
(:meth:`PagePool.check_fits`), then pages them in (:meth:`PagePool.make_resident`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from peftlab.checks import positive_int

__all__ = [
    "DEFAULT_PAGE_BYTES",
    "Event",
    "Page",
    "PagePool",
    "PagedTensor",
    "PoolMemoryError",
    "PoolStats",
]

#: Default page size, 2 MiB (a common GPU large-page size). Note: smaller pages evict
#: closer to what a spike needs but cost more copies and more Python per update; the
#: chapter uses 64 KiB for its tiny model.
DEFAULT_PAGE_BYTES = 2 * 1024 * 1024


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


class Page:
    """One chunk of a paged tensor: its live copy is ``data`` (device) or ``host``, never
    both.

    A user reads and writes ``data`` after :meth:`PagePool.make_resident`; the other
    fields are the pool's to change.
    """

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
        self, pool: PagePool, shape: torch.Size, dtype: torch.dtype, pages: list[Page]
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
            out[start : start + page.numel].copy_(
                src, non_blocking=self.pool.non_blocking
            )
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
        self._resident: OrderedDict[int, Page] = (
            OrderedDict()
        )  # LRU order: oldest first
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
    def non_blocking(self) -> bool:
        """Whether the pool's copies are asynchronous (CUDA: pinned host buffers, copies
        on the current stream); pass it as ``non_blocking`` to copies of pages."""
        return self._async

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

    def check_fits(self, nbytes: int, what: str) -> None:
        """Raise :class:`PoolMemoryError` (naming ``what``) before changing anything if
        ``nbytes`` cannot fit even with every page evicted.

        Callers of :meth:`make_resident` check first that the pages they will hold
        together fit, so that an update refuses before it has changed anything.
        """
        if nbytes > self.capacity_bytes - self._reserved_bytes:
            raise PoolMemoryError(
                what, nbytes, self.capacity_bytes, self._reserved_bytes
            )

    # -- pages
    # ---------------------------------------------------------------------------------
    def page_numel(self, itemsize: int, multiple: int = 1) -> int:
        """Elements per page of ``itemsize``-byte elements: as many as fit in
        ``page_bytes``, rounded down to a multiple of ``multiple`` (at least one
        multiple)."""
        return max(self.page_bytes // itemsize // multiple, 1) * multiple

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
            page_numel = self.page_numel(itemsize)
        else:
            page_numel = positive_int(page_numel, "page_numel", "elements")
        numel = math.prod(shape)
        sizes = [
            min(page_numel, numel - start) for start in range(0, numel, page_numel)
        ]
        if sizes:
            self.check_fits(sizes[0] * itemsize, "a new page")
        pages = []
        for n in sizes:
            self._make_room(n * itemsize)
            page = Page(torch.zeros(n, dtype=dtype, device=self.device))
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

    def _page_out(self, page: Page) -> None:
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

    def _page_in(self, page: Page) -> None:
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

    def make_resident(self, pages: Sequence[Page]) -> None:
        """Make ``pages`` resident together and most recently used: each one not resident
        is paged in, evicting least-recently-used pages other than ``pages``.

        Callers check first (:meth:`check_fits`) that ``pages`` fit together beside the
        reservations; their ``data`` then stays valid until the pool next evicts.
        """
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
        """Hold ``nbytes`` of the device budget for a memory spike, evicting LRU pages
        to host as needed.

        Raises:
            PoolMemoryError: (a ``MemoryError``) if ``nbytes`` exceeds the capacity
                minus other reservations, i.e. even an empty pool could not hold it;
                then no page has moved.

        Note: pages evicted for the spike are not paged back when it ends; they return
        when next used.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(
                f"nbytes must be an int number of bytes, got {type(nbytes).__name__}"
            )
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self.check_fits(nbytes, f"reserve({label!r})")
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
