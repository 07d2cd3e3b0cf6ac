"""A dequantization workspace: buffers, owned by the caller, that the 4-bit layers given
it dequantize their weights into instead of allocating a weight-sized tensor per product.

Explained in the chapter *QLoRA end to end* (book/chapters/qlora.md), section *Where the
dequantized weight goes*.

A :class:`peftlab.qlora.Linear4bit` needs its weight in the compute dtype for every
product. Without a workspace (the default) it dequantizes into a fresh tensor each time;
with one (``Linear4bit(..., workspace=ws)``, ``quantize_model(..., workspace=ws)`` or
:func:`peftlab.qlora.set_workspace`) into a buffer of ``ws``, reused by every layer that
shares ``ws``. The caller sees what it holds (``ws.nbytes``), drops it from any thread
(``ws.free()``), and tells the memory estimate about it
(``peftlab.memory.estimate(..., dequant_workspace=True)``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["DequantWorkspace", "scratch"]


class DequantWorkspace:
    """Reusable buffers for dequantized 4-bit weights, shared by the layers given it.

    A product borrows a buffer for as long as it reads it (:meth:`borrow`) and gives it
    back after. A buffer grows to the largest weight dequantized into it, every smaller
    weight written into its beginning: a LLaMA block's seven layers share one buffer the
    size of its largest matrix, which a fresh dequantized weight already cost at its
    peak, now allocated once and held. One buffer per compute dtype, device and CUDA
    stream serves a thread of work; a product that finds them all lent (another thread
    running a 4-bit layer at the same time) gets one of its own, kept for the next time.
    So two threads never write one buffer, and a training step whose backward runs on
    another thread than its forward (autograd's, on a GPU) still holds one buffer.

    ``nbytes`` is what it holds; ``free()`` drops it, from any thread (a buffer lent at
    that moment is dropped when it comes back).

    Note: ``copy.deepcopy`` of a model keeps its layers' workspace, shared as before, not
    a copy; pickling keeps none of its buffers (they are scratch, not state).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # borrow, give back and free from any thread
        self._idle: dict[tuple, list[torch.Tensor]] = {}  # by (dtype, device, stream)
        self._lent: dict[int, torch.Tensor] = {}  # by id: counted by nbytes until back
        self._generation = 0  # bumped by free(): a buffer lent before it is not kept

    @contextmanager
    def borrow(
        self, shape: torch.Size, dtype: torch.dtype, device: torch.device
    ) -> Iterator[torch.Tensor]:
        """A contiguous tensor of ``shape``, ``dtype`` on ``device``, the caller's alone
        until the block ends; its values are whatever was written there before.

        Note: made outside inference mode even when first asked for inside it: an
        inference tensor could not be written later by a forward that runs with
        autograd.
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = torch.device(device)
        numel = torch.Size(shape).numel()
        # CUDA kernels run after the call that queued them returns: a buffer given back
        # may still be read on its stream. A product queued on the same stream runs
        # after them; one on another stream would not, so each stream has buffers of
        # its own.
        stream = (
            torch.cuda.current_stream(device).cuda_stream
            if device.type == "cuda"
            else None
        )
        key = (dtype, device, stream)
        with self._lock:
            idle = self._idle.get(key, [])
            largest = max(range(len(idle)), key=lambda i: idle[i].numel(), default=None)
            buffer = None if largest is None else idle.pop(largest)
            generation = self._generation
        if buffer is None or buffer.numel() < numel:
            buffer = None  # the smaller buffer freed before the larger one is allocated
            with torch.inference_mode(False):
                buffer = torch.empty(numel, dtype=dtype, device=device)
        with self._lock:
            self._lent[id(buffer)] = buffer
        try:
            yield buffer[:numel].view(shape)
        finally:
            with self._lock:
                del self._lent[id(buffer)]
                if generation == self._generation:
                    self._idle.setdefault(key, []).append(buffer)

    def tensors(self) -> list[torch.Tensor]:
        """The buffers held now, lent or not (what
        :func:`peftlab.measure.measure_step` counts)."""
        with self._lock:
            idle = [b for buffers in self._idle.values() for b in buffers]
            return idle + list(self._lent.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers held now, lent or not."""
        return sum(b.numel() * b.element_size() for b in self.tensors())

    def free(self) -> None:
        """Drop every buffer, whichever thread made it; the next product makes one again.
        A buffer lent now is dropped when its product gives it back."""
        with self._lock:
            self._idle.clear()
            self._generation += 1

    def __repr__(self) -> str:
        return f"DequantWorkspace(nbytes={self.nbytes})"

    def __copy__(self) -> DequantWorkspace:
        return self

    def __deepcopy__(self, memo: dict) -> DequantWorkspace:
        return self

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


@contextmanager
def scratch(
    workspace: DequantWorkspace | None,
    shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
) -> Iterator[torch.Tensor]:
    """A tensor to dequantize into inside the block: borrowed from ``workspace``, or a
    fresh one without a workspace."""
    if workspace is not None and not isinstance(workspace, DequantWorkspace):
        raise TypeError(
            "workspace must be a DequantWorkspace or None, got "
            f"{type(workspace).__name__}"
        )
    if workspace is None:
        yield torch.empty(shape, dtype=dtype, device=device)
    else:
        with workspace.borrow(shape, dtype, device) as buffer:
            yield buffer
