"""What one training step actually holds, measured: the bytes of each memory component of
a real step, to check the estimate of :mod:`peftlab.memory` against.

Explained in the chapter *Memory savings* (book/chapters/memory.md); the chapter *Paged
optimizers* (book/chapters/paged.md) uses :func:`count_saved_bytes`.

:func:`measure_step` measures one call of a training step per component (a
:class:`peftlab.memory.Breakdown`): ``torch.cuda.max_memory_allocated`` on CUDA; on a CPU,
the exact bytes of live tensors, tracked op by op. :func:`measure_llama` measures a small
``LlamaForCausalLM`` and estimates it too; :func:`count_saved_bytes` counts only what
autograd keeps for backward, a step's activations.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from peftlab.memory import METHODS, Breakdown, estimate
from peftlab.targets import LLAMA_LINEARS

__all__ = [
    "SavedBytes",
    "count_saved_bytes",
    "measure_llama",
    "measure_step",
]


class _LiveTensors(TorchDispatchMode):
    """Records every new tensor storage an op creates and when it is freed.

    Note: storages are the unit (views and in-place results share one); a weak reference
    with a callback sees the moment the last tensor using a storage dies. What does not
    pass through PyTorch's dispatcher (allocator caches, kernels' private workspaces) is
    not seen: these are bytes of live tensors.
    """

    def __init__(self, static: Iterable[torch.UntypedStorage]) -> None:
        super().__init__()
        self._static = {id(s): s for s in static}
        self._live: dict[int, int] = {}  # id(storage) -> serial of its allocation
        # (serial, +bytes) on allocation, (serial, -bytes) on free
        self.events: list[tuple[int, int]] = []
        self.sizes: dict[int, int] = {}

    def _freed(self, key: int, serial: int) -> None:
        self._live.pop(key, None)
        self.events.append((serial, -self.sizes[serial]))

    def serial_of(self, storage: torch.UntypedStorage) -> int | None:
        return self._live.get(id(storage))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            try:
                st = t.untyped_storage()
            # tensor subclasses without storage
            except (RuntimeError, NotImplementedError):
                continue
            key = id(st)
            if key in self._static or key in self._live:
                continue
            serial = len(self.sizes)
            self.sizes[serial] = st.nbytes()
            self._live[key] = serial
            self.events.append((serial, st.nbytes()))
            weakref.finalize(st, self._freed, key, serial)
        return out


def _storages(tensors: Iterable[Any]) -> list[torch.UntypedStorage]:
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            out.append(t.untyped_storage())
        # peftlab.pages.PagedTensor: resident pages are device tensors
        elif hasattr(t, "pages"):
            out.extend(
                pg.data.untyped_storage()
                for pg in t.pages
                if getattr(pg, "data", None) is not None
            )
    return out


def _static_parts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, list]:
    parts: dict[str, list] = {
        "weights": [],
        "quant_constants": [],
        "lora_weights": [],
        "optimizer_states": [],
    }
    for module in model.modules():
        memory_tensors = getattr(module, "memory_tensors", None)
        # peftlab.qlora.Linear4bit: packed codes and constants
        if callable(memory_tensors):
            for kind, tensors in memory_tensors().items():
                parts[kind].extend(_storages(tensors))
    for name, p in model.named_parameters():
        parts["lora_weights" if "lora_" in name else "weights"].append(
            p.untyped_storage()
        )
    parts["weights"].extend(b.untyped_storage() for b in model.buffers())
    if optimizer is not None:
        for s in optimizer.state.values():
            parts["optimizer_states"].extend(_storages(s.values()))
    return parts


def _cuda_peak_above_start(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes the caching allocator handed out on ``device`` while ``step()`` ran,
    above what was allocated
    before it.

    Note: every call names ``device`` (a model on ``cuda:1`` is measured there, not on the
    current device) and synchronizes before reading the counters, so kernels still queued
    count. The CUDA context, the allocator's cached-but-free blocks and memory outside
    PyTorch's allocator (e.g. bitsandbytes' paged states in unified memory) are not
    allocations, so they are not counted.
    """
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_step(
    model: nn.Module,
    step: Callable[[], Any],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    warmup: bool = True,
) -> Breakdown:
    """Measure the memory of one call of ``step()`` (forward, backward, optimizer step)
    per component.

    Gradients are set to None first (as ``zero_grad()`` does); ``step`` must not keep
    references to its outputs. Weights, constants, LoRA weights and optimizer states are
    the bytes of their storages; gradients the bytes of the ``.grad`` tensors the step
    leaves; activations the peak of every other tensor the step creates (saved
    activations, the logits, temporaries), plus the buffers of the
    :class:`peftlab.workspace.DequantWorkspace` its 4-bit layers dequantize into, if they
    have one (held between steps; without one, the same bytes are a temporary).

    On CUDA this is ``torch.cuda.max_memory_allocated`` minus what was allocated before,
    less the gradients; on a CPU the exact bytes of live tensors (see
    :class:`_LiveTensors`).

    Note: with ``warmup`` (default) the step runs once first, so that the optimizer's
    states exist and the measured step is a steady one, like every step after the first.
    Note: the layers' workspaces are freed first: a workspace is as large as the largest
    weight it has served, perhaps another model's; the step measured holds this model's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(step):
        raise TypeError(
            f"step must be a callable taking no arguments, got {type(step).__name__}"
        )
    from peftlab.qlora import Linear4bit

    workspaces = {
        id(m.workspace): m.workspace
        for m in model.modules()
        if isinstance(m, Linear4bit) and m.workspace is not None
    }.values()
    for workspace in workspaces:
        workspace.free()
    if warmup:
        step()
    model.zero_grad(set_to_none=True)
    parts = _static_parts(model, optimizer)
    # Held before the step: not new storages to the tracker, nor above the start on CUDA.
    # A buffer the step itself makes (without warmup) is seen as it is allocated.
    held = _storages(t for w in workspaces for t in w.tensors())
    workspace_bytes = sum(s.nbytes() for s in held)
    device = next(model.parameters()).device
    # id(parameter) -> bytes of the gradient the step gave it
    grad_bytes: dict[int, int] = {}
    grad_serials: set[int | None] = set()
    tracker: _LiveTensors | None = None

    def grad_done(p: torch.Tensor) -> None:
        storage = p.grad.untyped_storage()
        grad_bytes[id(p)] = storage.nbytes()
        if tracker is not None:
            grad_serials.add(tracker.serial_of(storage))

    hooks = [
        p.register_post_accumulate_grad_hook(grad_done)
        for p in model.parameters()
        if p.requires_grad
    ]
    try:
        if device.type == "cuda":
            activations = _cuda_peak_above_start(step, device) - sum(
                grad_bytes.values()
            )
        else:
            static = [s for group in parts.values() for s in group] + held
            with _LiveTensors(static) as tracker:
                step()
            live = activations = 0
            for serial, delta in tracker.events:
                if serial in grad_serials:
                    continue
                live += delta
                activations = max(activations, live)
    finally:
        for h in hooks:
            h.remove()
    seen: set[int] = set()
    sizes = {}
    for kind in ("quant_constants", "lora_weights", "optimizer_states", "weights"):
        unique = [s for s in parts[kind] if id(s) not in seen]
        seen.update(id(s) for s in unique)
        sizes[kind] = sum(s.nbytes() for s in unique)
    return Breakdown(
        gradients=sum(grad_bytes.values()),
        activations=activations + workspace_bytes,
        **sizes,
    )


def measure_llama(
    config: Any,
    method: str,
    *,
    batch: int = 1,
    seq: int = 512,
    r: int = 64,
    gradient_checkpointing: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    dequant_workspace: bool = False,
) -> tuple[Breakdown, Breakdown]:
    """Measure one training step of a randomly initialised ``LlamaForCausalLM(config)``
    and estimate it.

    The model is trained with ``method`` — every parameter; LoRA (r, alpha=16) on all
    seven linear layers of the blocks; or the same on an NF4 + double-quantized base
    (:func:`peftlab.qlora.quantize_model`) — and :class:`peftlab.paged.PagedAdamW`, on
    ``device`` (default: the CPU) in ``dtype`` (default:
    :func:`peftlab.devices.default_compute_dtype`: float32 on a CPU; on CUDA bfloat16
    where the GPU computes it natively, float16 on older GPUs such as the T4). With
    ``dequant_workspace`` (QLoRA only) the 4-bit layers share a
    :class:`peftlab.workspace.DequantWorkspace`. Returns ``(measured, estimated)``.

    Note: the model is initialised on the CPU and the tokens drawn there, then moved, so a
    seed gives the same model and batch on every device and the CUDA generator is left
    untouched.

    Note: peftlab's LoRA factors are float32 whatever the base dtype, and PagedAdamW keeps
    its states in float32 for 16-bit parameters (as bitsandbytes does), else in the
    parameters' dtype; the estimate is told both, so that it predicts this run and not
    the paper's.
    """
    from transformers import LlamaForCausalLM

    from peftlab.adapters import add_lora
    from peftlab.paged import PagedAdamW

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if not isinstance(dequant_workspace, bool):
        raise TypeError(f"dequant_workspace must be a bool, got {dequant_workspace!r}")
    if dequant_workspace and method != "qlora":
        raise ValueError(
            f"dequant_workspace applies to method='qlora' only, got method={method!r}"
        )
    from peftlab.devices import default_compute_dtype

    device = torch.device(device)
    dtype = dtype or default_compute_dtype(device)
    config = type(config)(
        **{**config.to_dict(), "use_cache": False, "attn_implementation": "sdpa"}
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
        if gradient_checkpointing:
            # transformers 5 renamed it; the old name still works there, with a warning
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is None:
                enable = model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        if method == "qlora":
            from peftlab.qlora import quantize_model
            from peftlab.workspace import DequantWorkspace

            workspace = DequantWorkspace() if dequant_workspace else None
            quantize_model(
                model, compute_dtype=dtype, workspace=workspace, progress=False
            )
        if method != "full":
            add_lora(model, list(LLAMA_LINEARS), r=r, alpha=16)
        x = torch.randint(0, config.vocab_size, (batch, seq)).to(device)
    optimizer = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    measured = measure_step(model, step, optimizer)
    estimated = estimate(
        config,
        method,
        r=r,
        dtype=dtype,
        batch=batch,
        seq=seq,
        gradient_checkpointing=gradient_checkpointing,
        device=device.type,
        lora_dtype=torch.float32 if method != "full" else None,
        dequant_workspace=dequant_workspace,
        optimizer_bits=8
        * torch.empty((), dtype=PagedAdamW.state_dtype(dtype)).element_size()
        if method == "full"
        else 32,
    )
    return measured, estimated


# -----------------------------------------------------------------------------------
# saved tensors


class SavedBytes:
    """What :func:`count_saved_bytes` counted: ``nbytes`` of distinct storages in
    ``tensors`` saves."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.tensors = 0
        self._seen: set[int] = set()


@contextmanager
def count_saved_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedBytes]:
    """Count the memory autograd keeps for backward inside the block: a step's
    activations.

    Args:
        exclude: tensors whose storage is not activation memory, typically
            ``model.parameters()`` (autograd saves weights, or views of them, to compute
            input gradients).

    Note: a storage saved several times (by several ops, or through views) counts once,
    with its full size. With gradient checkpointing (``use_reentrant=False``) this
    counts what is kept across the forward (each checkpointed block's inputs), not what
    backward recomputes one block at a time.
    """
    counter = SavedBytes()
    counter._seen.update(t.untyped_storage().data_ptr() for t in exclude)

    def pack(t: torch.Tensor) -> torch.Tensor:
        counter.tensors += 1
        storage = t.untyped_storage()
        if storage.data_ptr() not in counter._seen:
            counter._seen.add(storage.data_ptr())
            counter.nbytes += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield counter
