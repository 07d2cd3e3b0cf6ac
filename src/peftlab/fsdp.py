"""QLoRA sharded over several processes with PyTorch's FSDP2: the 4-bit weights, their
constants and the adapters split N ways, the 4-bit bytes gathered as bytes.

Explained in the chapter *QLoRA across GPUs* (book/chapters/fsdp.md).

:func:`fully_shard_qlora` hands a model prepared by
:func:`peftlab.prepare.prepare_qlora` to ``torch.distributed.fsdp.fully_shard`` (FSDP2),
one call per transformer block and one for the rest, so PyTorch's own engine shards,
all-gathers and reduce-scatters everything. What this module adds is the one thing FSDP2
cannot know: an NF4 weight is not a tensor but packed codes plus constants
(:class:`peftlab.nf4.NF4Tensor`), held outside any ``nn.Parameter``, which FSDP2 would
leave whole on every rank. :class:`ShardableLinear4bit` keeps the same bytes in
``uint8`` parameters instead:

- FSDP2 never casts a parameter that is not floating point (its mixed-precision policy
  skips them), so no policy can turn a code into a number;
- a group of parameters of several dtypes is all-gathered as one ``uint8`` buffer, so
  the codes, the double-quantization codes and the float32 constants (as their bytes)
  travel exactly as they are stored, and no NaN bit pattern can be rewritten on the way;
- forward reads the gathered bytes back as an NF4 weight, without copying them.

:func:`split_batch`, :func:`rank_bytes`, :class:`CollectiveBytes` (with
:func:`expected_collective_bytes`, its formula) and :func:`save_sharded_adapter` are
what a training loop, a measurement and a checkpoint need on top. The chapter launches
the processes with ``peftlab.harness.fsdp_run``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from peftlab.adapters import lora_layers
from peftlab.double_quant import DoubleQuantState
from peftlab.files import atomic_write_all
from peftlab.nf4 import NF4Tensor
from peftlab.qlora import Linear4bit
from peftlab.sharding import rank_rows

__all__ = [
    "BYTE_PARAMS",
    "CollectiveBytes",
    "ShardableLinear4bit",
    "blocks_of",
    "expected_collective_bytes",
    "fully_shard_qlora",
    "rank_bytes",
    "save_sharded_adapter",
    "split_batch",
    "unsharded_4bit_bytes",
]

BYTE_PARAMS = ("nf4_packed", "nf4_absmax", "nf4_absmax2", "nf4_offset")
"""The ``uint8`` parameters of a :class:`ShardableLinear4bit`: packed codes, first-level
constants (8-bit codes, or float32 absmax as bytes), and with double quantization the
second-level float32 absmax and offset, as bytes."""


def _as_bytes(t: torch.Tensor) -> nn.Parameter:
    # A frozen uint8 parameter holding t's bytes: a view of its memory, not a conversion
    flat = t.detach().contiguous().reshape(-1)
    return nn.Parameter(flat.view(torch.uint8), requires_grad=False)


class ShardableLinear4bit(Linear4bit):
    """A :class:`peftlab.qlora.Linear4bit` whose NF4 weight lives in ``uint8``
    parameters (:data:`BYTE_PARAMS`) that FSDP2 shards and gathers as bytes.

    ``weight`` is rebuilt from the parameters each time it is read: inside forward and
    backward FSDP2 has gathered them whole, so the NF4 weight is exactly the one the
    layer was built with; outside, they are this rank's shards and ``weight`` is not
    readable. The arithmetic is :class:`Linear4bit`'s, unchanged.
    """

    def __init__(self, layer: Linear4bit) -> None:
        if not isinstance(layer, Linear4bit):
            raise TypeError(f"layer must be a Linear4bit, got {type(layer).__name__}")
        # Linear4bit.__init__ assigns ``weight``: the property's setter below stores it.
        super().__init__(
            layer.weight,
            layer.bias,
            compute_dtype=layer.compute_dtype,
            kernels=layer.kernels,
            workspace=layer.workspace,
        )

    @property  # type: ignore[override]
    def weight(self) -> NF4Tensor:
        shape, dtype, blocksize, blocksize2 = self._nf4_meta
        absmax: torch.Tensor | DoubleQuantState
        if blocksize2 is None:
            absmax = self.nf4_absmax.view(torch.float32)
        else:
            absmax = DoubleQuantState(
                self.nf4_absmax,
                self.nf4_absmax2.view(torch.float32),
                self.nf4_offset.view(torch.float32).reshape(()),
                blocksize2,
            )
        return NF4Tensor(self.nf4_packed, absmax, shape, dtype, blocksize)

    @weight.setter
    def weight(self, q: NF4Tensor) -> None:
        if not isinstance(q, NF4Tensor):
            raise TypeError(f"weight must be an NF4Tensor, got {type(q).__name__}")
        blocksize2 = q.absmax.blocksize2 if q.double_quant else None
        self._nf4_meta = (q.shape, q.dtype, q.blocksize, blocksize2)
        self.nf4_packed = _as_bytes(q.packed)
        if q.double_quant:
            self.nf4_absmax = _as_bytes(q.absmax.codes)
            self.nf4_absmax2 = _as_bytes(q.absmax.absmax2)
            self.nf4_offset = _as_bytes(q.absmax.offset)
        else:
            self.nf4_absmax = _as_bytes(q.absmax)
            for stale in BYTE_PARAMS[2:]:  # from an earlier double-quantized weight
                if hasattr(self, stale):
                    delattr(self, stale)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # The bytes are parameters now: nn.Module moves them. Linear4bit's own _apply
        # would read ``weight``, which is not readable while sharded.
        return nn.Module._apply(self, fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        # The byte parameters as they are (DTensors while sharded), so that
        # torch.distributed.checkpoint can save and gather them.
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
        nn.Module._load_from_state_dict(self, *args, **kwargs)

    def memory_tensors(self) -> dict[str, list[Any]]:
        """The tensors this layer holds, by kind (as :class:`Linear4bit` has them)."""
        constants = [getattr(self, n) for n in BYTE_PARAMS[1:] if hasattr(self, n)]
        weights = [self.nf4_packed] + ([] if self.bias is None else [self.bias])
        return {"weights": weights, "quant_constants": constants}


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the elements of every outermost
    ``nn.ModuleList`` that hold a 4-bit layer (``model.model.layers`` of a LLaMA), the
    unit FSDP2 gathers at once (accelerate's ``TRANSFORMER_BASED_WRAP``)."""
    out: list[nn.Module] = []
    inside: set[int] = (
        set()
    )  # modules of a block already found: its own lists are not blocks
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and id(module) not in inside:
            for block in module:
                if any(isinstance(m, Linear4bit) for m in block.modules()):
                    out.append(block)
                    inside.update(id(m) for m in block.modules())
    return out


def _check_prepared(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError("model is already sharded (an FSDPModule)")
    if not any(isinstance(m, Linear4bit) for m in model.modules()):
        raise TypeError(
            "model has no 4-bit layer (peftlab.qlora.Linear4bit): prepare it with "
            "peftlab.prepare.prepare_qlora first"
        )
    if not lora_layers(model):
        raise TypeError(
            "model has no LoRA layer: prepare it with peftlab.prepare.prepare_qlora "
            "first"
        )


def _checked_mesh(model: nn.Module, mesh: object) -> DeviceMesh:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fully_shard_qlora needs torch.distributed initialized in every process "
            "(dist.init_process_group: gloo on CPUs, nccl on GPUs)"
        )
    device_type = next(model.parameters()).device.type
    if mesh is None:
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a DeviceMesh or None, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(
            f"mesh must be 1-D (pure sharding), got {mesh.ndim} dimensions"
        )
    if mesh.device_type != device_type:
        raise ValueError(
            f"mesh is a {mesh.device_type!r} mesh but the model is on {device_type!r}: "
            f"build the mesh with init_device_mesh({device_type!r}, ...) or move the "
            "model"
        )
    return mesh


def fully_shard_qlora(model: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard a model prepared by :func:`peftlab.prepare.prepare_qlora` over ``mesh``
    (default: every process of the default group, on the model's device type) with
    FSDP2, in place; returns ``model``, now an ``FSDPModule``.

    Every 4-bit layer becomes a :class:`ShardableLinear4bit` (same bytes, held in
    ``uint8`` parameters); then ``fully_shard`` is applied to each block
    (:func:`blocks_of`) and to the whole model, with FSDP2's defaults: parameters
    resharded after forward, gradients reduce-scattered and averaged, no mixed-precision
    cast. LoRA factors are sharded and trained like any parameter; an optimizer built
    afterwards sees their shards.

    Raises TypeError for a model not prepared with QLoRA (no 4-bit layer or no LoRA
    layer), ValueError for a mesh that is not 1-D or not of the model's device type,
    RuntimeError without ``torch.distributed``.
    """
    _check_prepared(model)
    mesh = _checked_mesh(model, mesh)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Linear4bit) and not isinstance(
                child, ShardableLinear4bit
            ):
                setattr(module, child_name, ShardableLinear4bit(child))
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _shard_bytes(p: torch.Tensor, world: int) -> int:
    # FSDP2's rule (peftlab.sharding.rank_rows): dim 0 in chunks of ceil(rows / world)
    rows = p.shape[0] if p.dim() else 1
    return rank_rows(rows, world) * (p.numel() // rows) * p.element_size()


def expected_collective_bytes(model: nn.Module, world: int) -> dict[str, int]:
    """Bytes one training step all-gathers and reduce-scatters on each rank, from the
    parameter shapes alone: each FSDP2 group (a block, or the rest of the model) is
    gathered as ``world`` padded shards, blocks twice (forward, then again for backward,
    having been freed after forward), the root group once (FSDP2 keeps it gathered from
    forward to backward); each group with trained parameters reduce-scatters their
    gradients once. ``model`` is sharded or not; shapes are the global ones."""
    blocks = blocks_of(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    gather = sum(
        2 * world * sum(_shard_bytes(p, world) for p in b.parameters()) for b in blocks
    )
    gather += world * sum(_shard_bytes(p, world) for p in root)
    groups = [list(b.parameters()) for b in blocks] + [root]
    scatter = sum(
        world * sum(_shard_bytes(p, world) for p in g if p.requires_grad)
        for g in groups
    )
    return {"all_gather": gather, "reduce_scatter": scatter}


def split_batch(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a global ``batch``: equal slices, so that the mean of the
    ranks' mean losses is the global batch's mean loss (what FSDP2's averaged gradients
    assume). ValueError when the rows do not divide by ``world_size``."""
    if not isinstance(batch, torch.Tensor) or batch.dim() < 1:
        raise TypeError("batch must be a tensor with a batch dimension first")
    n = batch.shape[0]
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if n % world_size:
        raise ValueError(
            f"a global batch of {n} rows does not divide over {world_size} ranks: the "
            "ranks' mean losses would weigh rows unequally; use a multiple of the "
            "world size"
        )
    per = n // world_size
    return batch[rank * per : (rank + 1) * per]


@contextmanager
def unsharded_4bit_bytes(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block: every 4-bit layer's byte parameters as FSDP2 all-gathers them
    (name -> uint8 tensor), read between ``unshard()`` and ``reshard()`` of each block.
    A collective: every rank must enter it."""
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for block in blocks:
        block.unshard()
    try:
        out = {}
        for name, module in model.named_modules():
            if isinstance(module, ShardableLinear4bit):
                for p in BYTE_PARAMS:
                    if hasattr(module, p):
                        out[f"{name}.{p}"] = getattr(module, p).detach()
        yield out
    finally:
        for block in blocks:
            block.reshard()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def rank_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int]:
    """The bytes this process holds, by the components of
    :func:`peftlab.memory.estimate`: ``weights`` (the 4-bit codes and the other frozen
    weights), ``quant_constants``, ``lora_weights``, ``gradients``,
    ``optimizer_states``; and ``replicated``, what FSDP2 does not shard: buffers (RoPE's
    frequencies) and AdamW's 0-dimensional step counters. Works on a sharded model (this
    rank's shards) and on an unsharded one (everything).

    Each tensor counts its storage's bytes once, FSDP2's padding included: a shard of a
    tensor whose first dimension does not divide by the world size is stored padded to
    ``ceil(rows / world)`` rows on every rank.
    """
    seen: set[int] = set()
    out = dict.fromkeys(
        (
            "weights",
            "quant_constants",
            "lora_weights",
            "gradients",
            "optimizer_states",
            "replicated",
        ),
        0,
    )

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        st = _local(t).untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            return
        seen.add(st.data_ptr())
        out[kind] += st.nbytes()

    for module in model.modules():
        if isinstance(module, Linear4bit) and not isinstance(
            module, ShardableLinear4bit
        ):
            for kind, tensors in module.memory_tensors().items():
                for t in tensors:
                    add(kind, t)
    for name, p in model.named_parameters():
        short = name.rpartition(".")[2]
        if short in BYTE_PARAMS[1:]:
            add("quant_constants", p)
        else:
            add("lora_weights" if p.requires_grad else "weights", p)
        add("gradients", p.grad)
    for b in model.buffers():
        add("replicated", b)
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    add("replicated" if value.dim() == 0 else "optimizer_states", value)
    return out


class CollectiveBytes:
    """Counts the bytes this rank's all-gathers produce and its reduce-scatters consume
    inside a ``with`` block, by watching the calls FSDP2's collectives make
    (``torch.distributed.all_gather_single`` and ``reduce_scatter_single``; in releases
    before 2.13, ``all_gather_into_tensor`` and ``reduce_scatter_tensor``): what is
    counted is what FSDP2 actually sent, not a copy of its arithmetic.

    ``all_gather`` is the outputs' bytes (world size × the shards), ``reduce_scatter``
    the inputs' (world size × the shards); ``calls`` counts each kind, ``dtypes`` names
    the dtypes the all-gathers moved, ``events`` lists ``(kind, bytes)`` in order.

    Note: the functions are wrapped on the ``torch.distributed`` module for the block
    and restored after it; a call made from inside another counted call is not counted
    again. A ``TorchFunctionMode`` would be the cleaner hook, but it does not see the
    collectives FSDP2 issues from its backward hooks and final callback.
    """

    _NAMES = {
        "all_gather": ("all_gather_single", "all_gather_into_tensor"),
        "reduce_scatter": ("reduce_scatter_single", "reduce_scatter_tensor"),
    }

    def __init__(self) -> None:
        self.all_gather = 0
        self.reduce_scatter = 0
        self.calls = {"all_gather": 0, "reduce_scatter": 0}
        self.dtypes: set[str] = set()
        self.events: list[tuple[str, int]] = []
        self._saved: dict[str, Any] = {}
        self._depth = 0

    def _wrap(self, kind: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                # (output, input) by position, or output=/input= (or output_tensor=...)
                out = kwargs.get("output", kwargs.get("output_tensor"))
                inp = kwargs.get("input", kwargs.get("input_tensor"))
                out = args[0] if out is None and args else out
                inp = args[1] if inp is None and len(args) > 1 else inp
                moved = _nbytes(out if kind == "all_gather" else inp)
                setattr(self, kind, getattr(self, kind) + moved)
                self.calls[kind] += 1
                self.events.append((kind, moved))
                if kind == "all_gather":
                    self.dtypes.add(str(out.dtype).removeprefix("torch."))
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def __enter__(self) -> CollectiveBytes:
        if self._saved:
            raise RuntimeError("this CollectiveBytes is already counting")
        for kind, names in self._NAMES.items():
            for name in names:
                if hasattr(dist, name):
                    self._saved[name] = getattr(dist, name)
                    setattr(dist, name, self._wrap(kind, self._saved[name]))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_sharded_adapter(model: nn.Module, directory: str | Path) -> Path | None:
    """Save the LoRA factors of a sharded model in PEFT's format
    (``adapter_config.json`` and ``adapter_model.safetensors``, loadable by
    ``peft.PeftModel.from_pretrained`` and :func:`peftlab.adapter_io.load_adapter`); a
    collective, every rank calls it.

    The factors are gathered with ``torch.distributed.checkpoint``'s full state dict
    (only the trained parameters, onto rank 0's CPU, one at a time): no rank ever holds
    the whole model. Rank 0 writes both files atomically and returns the folder; the
    other ranks return None.
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    layers = lora_layers(model)
    if not layers:
        raise TypeError("model has no LoRA layer to save")
    settings = {(m.r, m.alpha, m.rslora, m.use_dora) for _, m in layers}
    dropout = {float(getattr(m.dropout, "p", 0.0)) for _, m in layers}
    if len(settings) != 1 or len(dropout) != 1:
        raise ValueError(
            "all LoRA layers must share r, alpha, rslora, use_dora, dropout"
        )
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
    )
    state = get_model_state_dict(model, options=options)
    if dist.get_rank() != 0:
        return None
    r, alpha, rslora, use_dora = settings.pop()
    names = [n for n, _ in layers]
    tensors = {}
    for key, value in state.items():
        # PEFT's keys: base_model.model.<module>.lora_A.weight (and lora_B)
        module, _, param = key.rpartition(".")
        if param in ("lora_A", "lora_B"):
            tensors[f"base_model.model.{module}.{param}.weight"] = value.contiguous()
        elif param == "lora_magnitude_vector":
            tensors[f"base_model.model.{module}.{param}"] = value.contiguous()
    if len(tensors) != len(names) * (3 if use_dora else 2):
        raise ValueError(
            f"gathered {len(tensors)} adapter tensors for {len(names)} LoRA layers"
        )
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout.pop(),
        "use_rslora": rslora,
        "use_dora": use_dora,
        # an exact full-match regex of the layers' names (PEFT full-matches a str)
        "target_modules": "|".join(re.escape(n) for n in sorted(names)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_all(
        {
            directory / "adapter_model.safetensors": lambda tmp: save_file(
                tensors, tmp, metadata={"format": "pt"}
            ),
            directory / "adapter_config.json": lambda tmp: Path(tmp).write_text(
                json.dumps(config, indent=2)
            ),
        }
    )
    return directory
