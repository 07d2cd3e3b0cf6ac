"""Seeded finetuning runs of the tiny pretrained LLaMA, sweeps over them, and tidy result
tables.

Explained in the chapter *LoRA rank and alpha* (book/chapters/rank_alpha.md).

One run (:func:`finetune`) adapts the shipped checkpoint
(:func:`peftlab.harness.pretrained.load_pretrained`) to the downstream text
(CPython's C headers, :mod:`peftlab.harness.textdata`) with full finetuning,
LoRA or QLoRA, and returns one row: its settings and its measured losses. The same loop
serves the rank/α sweeps and the QLoRA chapter's three-way comparison (*QLoRA*,
book/chapters/qlora.md), whose recipe :func:`qlora_recipe` spells out. :func:`sweep` runs
many and returns a list of rows (a tidy table: one row per run, one column per setting or
measurement). Rows are cached on disk, keyed by their settings, under a folder the caller
names.

Also here: a synthetic task whose true update has a known rank
(:func:`synthetic_rank_run`), and the LoRA paper's subspace similarity between two
adapters (:func:`subspace_similarity`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from peftlab import _deprecated
from peftlab.devices import Stopwatch, compute_dtype
from peftlab.files import atomic_write
from peftlab.harness import pretrained, textdata
from peftlab.loftq import prepare_qlora_loftq
from peftlab.lora import LLAMA_LINEARS, add_lora, count_parameters, lora_scaling
from peftlab.loraplus import create_loraplus_optimizer
from peftlab.memory import METHODS, Breakdown, measure_step
from peftlab.paged import PagedAdamW
from peftlab.pissa import apply_pissa, prepare_qlora_pissa
from peftlab.qlora import prepare_qlora

CACHE_VERSION = 4
"""Bump when the meaning of a run changes, so old cached rows are not reused."""

TARGETS: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",),
    "qv": ("q_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": LLAMA_LINEARS,
}
"""Named sets of target modules: W_q alone; the LoRA paper's W_q, W_v; attention; every
linear layer of a block (QLoRA's choice; never ``lm_head``)."""


OPTIMIZERS = ("adamw", "paged_adamw")
"""``torch.optim.AdamW``, or the package's :class:`peftlab.paged.PagedAdamW` (the QLoRA
recipe's)."""

INITS = ("zero", "pissa", "loftq")
"""How the adapters start: LoRA's ``B = 0`` (``"zero"``), or from the frozen weight's top
singular directions (``"pissa"``) or from its quantization error (``"loftq"``, QLoRA only),
both with the base replaced by the residual (*LoRA variants*, book/chapters/variants.md)."""

SCHEDULES = ("constant", "cosine")
"""How the learning rate moves over a run: held at ``lr`` (``"constant"``), or warmed up
linearly over the first ``warmup_ratio`` of the steps and then decayed to zero along a
cosine by the last step (``"cosine"``, the usual recipe; :func:`lr_factor`)."""

OPTIMIZER_BITS = (32, 8)
"""Bits per optimizer state: float32, or bitsandbytes' blockwise 8-bit (``paged_adamw`` only)."""

# Fields added after runs were first recorded: left out of a run's cache key while they hold
# their default, so the runs recorded before them keep their keys.
_LATER_FIELDS = {
    "use_dora": False,
    "loraplus_ratio": 1.0,
    "optim_bits": 32,
    "init": "zero",
    "schedule": "constant",
    "warmup_ratio": 0.0,
}

PRECISIONS = ("float32", "16-bit")
"""What a LoRA or QLoRA run's frozen base computes in: float32, or the 16-bit dtype of
:func:`sixteen_bit_dtype` (the QLoRA paper's bfloat16). Full finetuning always trains in float32."""


@dataclass(frozen=True)
class RunConfig:
    """Settings of one finetuning run; every field is part of its cache key.

    ``method`` is one of :data:`peftlab.memory.METHODS`: ``"full"`` (every parameter
    trained; the LoRA fields are then ignored and normalised away), ``"lora"``, or
    ``"qlora"`` (the same adapters on an NF4 + double-quantized base,
    :func:`peftlab.qlora.prepare_qlora`). ``targets`` names a set in :data:`TARGETS`.
    ``train_bytes`` keeps only the first bytes of the downstream train split (``None``:
    all of it). ``pretrained=False`` starts from the same architecture untrained.
    ``eval_every`` > 0 records a learning curve (held-out and train loss every
    ``eval_every`` steps). ``device`` is where the run trains. ``optimizer`` is one of
    :data:`OPTIMIZERS` (constant learning rate, no weight decay), ``max_grad_norm`` the
    gradient-norm clip, ``precision`` one of :data:`PRECISIONS`, ``kernels`` the 4-bit
    layer's (``"torch"`` or ``"bnb"``, QLoRA only). ``measure_memory`` adds the measured
    memory of one step (:func:`peftlab.memory.measure_step`, on a copy of the model) to
    the row. The variants of the chapter *LoRA variants* (book/chapters/variants.md):
    ``use_dora`` (DoRA's magnitude and direction), ``loraplus_ratio`` (LoRA+: B learns
    this many times faster than A; 1 is plain LoRA), ``optim_bits`` (one of
    :data:`OPTIMIZER_BITS`) and ``init`` (one of :data:`INITS`).
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    targets: str = "qv"
    lr: float = 2e-3
    steps: int = 60
    batch_size: int = 8
    seq_len: int = 64
    seed: int = 0
    pretrained: bool = True
    train_bytes: int | None = None
    eval_windows: int = 32
    eval_every: int = 10
    device: str = "cpu"
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0
    precision: str = "float32"
    kernels: str = "torch"
    measure_memory: bool = False
    use_dora: bool = False
    loraplus_ratio: float = 1.0
    optim_bits: int = 32
    init: str = "zero"
    schedule: str = "constant"
    warmup_ratio: float = 0.0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("method", METHODS),
            ("targets", tuple(TARGETS)),
            ("optimizer", OPTIMIZERS),
            ("precision", PRECISIONS),
            ("kernels", ("torch", "bnb")),
            ("optim_bits", OPTIMIZER_BITS),
            ("init", INITS),
            ("schedule", SCHEDULES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in ("r", "steps", "batch_size", "seq_len", "eval_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (
            isinstance(self.eval_every, bool)
            or not isinstance(self.eval_every, int)
            or self.eval_every < 0
        ):
            raise ValueError(f"eval_every must be an int >= 0, got {self.eval_every!r}")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in (
            "cpu",
            "cuda",
        ):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be a bool, got {self.use_dora!r}")
        if self.optim_bits == 8 and self.optimizer != "paged_adamw":
            raise ValueError(
                "optim_bits=8 needs optimizer='paged_adamw' (8-bit states are the paged "
                f"optimizer's), got optimizer={self.optimizer!r}"
            )
        if self.use_dora and self.init != "zero":
            raise ValueError(
                "use_dora=True starts from B = 0 here: init must be 'zero', "
                f"got {self.init!r}"
            )
        if self.init == "loftq" and self.method != "qlora":
            raise ValueError(
                "init='loftq' fits adapters to a 4-bit base's error: it needs "
                f"method='qlora', got {self.method!r}"
            )
        for name in ("alpha", "lr", "max_grad_norm", "loraplus_ratio"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not value > 0
            ):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if (
            isinstance(self.warmup_ratio, bool)
            or not isinstance(self.warmup_ratio, (int, float))
            or not 0 <= self.warmup_ratio < 1
        ):
            raise ValueError(
                f"warmup_ratio must be a number in [0, 1), got {self.warmup_ratio!r}"
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    def normalized(self) -> "RunConfig":
        """The same run spelled one way, so that identical runs share a cache key.

        Full finetuning ignores the LoRA fields and trains in float32; at ``r = 1``,
        ``alpha / sqrt(r) == alpha / r``, so rsLoRA is the same run as plain LoRA; only
        QLoRA has kernels.
        """
        if self.method == "full":
            return replace(
                self,
                r=1,
                alpha=1.0,
                rslora=False,
                dropout=0.0,
                targets="qv",
                precision="float32",
                kernels="torch",
                use_dora=False,
                loraplus_ratio=1.0,
                init="zero",
                warmup_ratio=float(self.warmup_ratio),
            )
        kernels = self.kernels if self.method == "qlora" else "torch"
        return replace(
            self,
            alpha=float(self.alpha),
            loraplus_ratio=float(self.loraplus_ratio),
            warmup_ratio=float(self.warmup_ratio),
            rslora=self.rslora and self.r > 1,
            kernels=kernels,
        )

    @property
    def scaling(self) -> float:
        """LoRA's ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); 0 for full
        finetuning."""
        return (
            0.0
            if self.method == "full"
            else lora_scaling(self.alpha, self.r, self.rslora)
        )


def qlora_recipe(method: str, **settings: Any) -> RunConfig:
    """The QLoRA paper's recipe, where it applies, for ``method`` ("full", "lora" or
    "qlora"): adapters on all
    linear layers with α = 16, paged AdamW at a constant learning rate, gradient norm
    clipped at 0.3, the frozen base computing in 16 bits, and one step's memory measured.
    ``settings`` override any field.

    Note: the learning rate defaults to 2e-3 for the adapters and 5e-4 for full
    finetuning, which diverges at 2e-3 on this model; the paper's dropout (0.1 up to 13B)
    is a setting like any other.
    """
    defaults = dict(
        targets="all",
        r=16,
        alpha=16.0,
        optimizer="paged_adamw",
        max_grad_norm=0.3,
        precision="16-bit",
        measure_memory=True,
        lr=5e-4 if method == "full" else 2e-3,
    )
    return RunConfig(method=method, **{**defaults, **settings})


def lr_factor(config: RunConfig, step: int) -> float:
    """The multiple of ``config.lr`` that update ``step`` (0, 1, …, ``steps - 1``) uses.

    Warm-up climbs linearly to 1 over the first ``ceil(warmup_ratio · steps)`` updates
    (the first update already moves: ``1 / warmup``). A ``"cosine"`` schedule then falls
    along half a cosine and reaches exactly zero one update after the last, so a run ends
    at a learning rate close to zero: its loss has stopped moving because the steps have
    become small, the usual recipe's way of ending a run.
    """
    warmup = math.ceil(config.warmup_ratio * config.steps)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, config.steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def sixteen_bit_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype of a ``precision="16-bit"`` run's frozen base: bfloat16 on a CPU (the
    paper's dtype; a CPU
    has no faster 16-bit type), on CUDA :func:`peftlab.devices.compute_dtype` (float16 on a T4)."""
    device = torch.device(device)
    return torch.bfloat16 if device.type == "cpu" else compute_dtype(device)


def grid(base: RunConfig | None = None, **axes: Iterable[Any]) -> list[RunConfig]:
    """Every combination of ``axes`` (field name → values) applied to ``base``, in order.

    ``alpha="r"`` in an axis means alpha equal to the run's r (the LoRA paper's habit).
    """
    base = RunConfig() if base is None else base
    names = {f.name for f in fields(RunConfig)}
    for name in axes:
        if name not in names:
            raise ValueError(f"unknown RunConfig field {name!r}; fields: {sorted(names)}")
    configs = []
    for values in product(*(list(v) for v in axes.values())):
        settings = dict(zip(axes, values))
        config = replace(
            base, **{k: v for k, v in settings.items() if not (k == "alpha" and v == "r")}
        )
        if settings.get("alpha") == "r":
            config = replace(config, alpha=float(config.r))
        configs.append(config)
    return configs


@lru_cache(maxsize=None)
def checkpoint_digest() -> str:
    """The first 16 hex digits of the shipped checkpoint's SHA-256: which model a run
    adapted."""
    return hashlib.sha256(pretrained.CHECKPOINT.read_bytes()).hexdigest()[:16]


@lru_cache(maxsize=None)
def data_digest() -> str:
    """The first 16 hex digits of the SHA-256 of the downstream texts (all three splits)
    and the pretraining held-out text: which data a run saw and was measured on."""
    digest = hashlib.sha256()
    for split in ("train", "validation", "held_out"):
        digest.update(textdata.downstream_text(split).numpy().tobytes())
    digest.update(_texts(None)["pretraining"].numpy().tobytes())
    return digest.hexdigest()[:16]


def config_of(row: dict[str, Any]) -> RunConfig:
    """The :class:`RunConfig` a row was run with (a row holds every field; one recorded
    before a field existed ran at that field's default)."""
    return RunConfig(
        **{f.name: row.get(f.name, _LATER_FIELDS.get(f.name)) for f in fields(RunConfig)}
    )


def cache_key(config: RunConfig) -> str:
    """A stable name for a run: hash of its settings, the checkpoint, the Python version
    (the texts)."""
    settings = {
        k: v
        for k, v in asdict(config.normalized()).items()
        if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])
    }
    payload = {
        "config": settings,
        "checkpoint": checkpoint_digest(),
        "data": data_digest(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


@lru_cache(maxsize=None)
def _texts(train_bytes: int | None) -> dict[str, torch.Tensor]:
    corpus = pretrained.checkpoint_info()["data"].get("corpus", "help_topics")
    return {
        "train": textdata.downstream_text("train", max_bytes=train_bytes),
        "validation": textdata.downstream_text("validation"),
        "held_out": textdata.downstream_text("held_out"),
        "pretraining": textdata.pretraining_text("held_out", corpus),
    }


@lru_cache(maxsize=2)
def _base_model(is_pretrained: bool) -> torch.nn.Module:
    # Built once per process and deep-copied per run: building a LlamaForCausalLM costs
    # more than a short finetuning. The untrained model is the pretraining seed's
    # initialisation, i.e. the very weights the shipped checkpoint started from.
    return pretrained.load_pretrained() if is_pretrained else pretrained.build_model(0)


@torch.no_grad()
def _loss_on(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    loss = pretrained.lm_loss(model, *batch).item()
    model.train(was_training)
    return loss


def _prepare(config: RunConfig) -> tuple[torch.nn.Module, torch.dtype]:
    """The model a run trains, on ``config.device``, and the dtype its frozen base
    computes in."""
    model = copy.deepcopy(_base_model(config.pretrained))
    dtype = (
        sixteen_bit_dtype(config.device)
        if config.precision == "16-bit"
        else torch.float32
    )
    # LoRA's A is drawn on the CPU before the move, so CPU and GPU runs start from the
    # same A.
    with torch.random.fork_rng(devices=[]):
        # CPU only: CUDA RNG untouched
        torch.random.default_generator.manual_seed(config.seed)
        if config.method == "full":
            model.requires_grad_(True)
        else:
            # As in the paper, the base is loaded in 16 bits and its linear layers
            # quantized from there.
            model.to(dtype)
            targets = list(TARGETS[config.targets])
            if config.method == "qlora":
                prepare = {
                    "zero": prepare_qlora,
                    "pissa": prepare_qlora_pissa,
                    "loftq": prepare_qlora_loftq,
                }[config.init]
                prepare(
                    model,
                    targets,
                    r=config.r,
                    alpha=config.alpha,
                    dropout=config.dropout,
                    rslora=config.rslora,
                    compute_dtype=dtype,
                    kernels=config.kernels,
                    **({"use_dora": True} if config.use_dora else {}),
                )
            else:
                add_lora(
                    model,
                    targets,
                    config.r,
                    config.alpha,
                    config.dropout,
                    rslora=config.rslora,
                    use_dora=config.use_dora,
                )
                if config.init == "pissa":
                    apply_pissa(model)
    return model.to(config.device).train(), dtype


def _step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    max_grad_norm: float,
) -> torch.Tensor:
    """One training step: forward, backward, clip the gradient norm, update; returns the
    gradient's norm before clipping."""
    loss = pretrained.lm_loss(model, *batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], max_grad_norm
    )
    opt.step()
    return norm


def _optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    kind = PagedAdamW if config.optimizer == "paged_adamw" else torch.optim.AdamW
    options: dict[str, Any] = {"optim_bits": 8} if config.optim_bits == 8 else {}
    if config.loraplus_ratio != 1.0:
        return create_loraplus_optimizer(
            model,
            kind,
            lr=config.lr,
            loraplus_lr_ratio=config.loraplus_ratio,
            weight_decay=0.0,
            **options,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return kind(params, lr=config.lr, weight_decay=0.0, **options)


def _run(
    config: RunConfig, progress: bool, stop_after: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    texts = _texts(config.train_bytes)
    device = torch.device(config.device)
    held, train_eval, pre, val = (
        tuple(
            t.to(device)
            for t in textdata.spaced_windows(
                texts[name], config.eval_windows, config.seq_len
            )
        )
        for name in ("held_out", "train", "pretraining", "validation")
    )
    model, dtype = _prepare(config)
    base_weights = _linear_weights(model) if config.method == "full" else {}
    count = count_parameters(model)
    row: dict[str, Any] = {"compute_dtype": str(dtype).removeprefix("torch.")}
    if config.measure_memory:  # on a copy, so that training is not disturbed
        probe = copy.deepcopy(model)
        probe_opt = _optimizer(config, probe)
        batch = tuple(
            t.to(device)
            for t in textdata.random_batch(
                texts["train"],
                config.batch_size,
                config.seq_len,
                torch.Generator().manual_seed(config.seed),
            )
        )
        row["memory"] = measure_step(
            probe, lambda: _step(probe, probe_opt, batch, config.max_grad_norm), probe_opt
        ).as_dict()
        del probe, probe_opt
    opt = _optimizer(config, model)
    # each group's own peak rate (LoRA+ gives B a larger one), scaled by the schedule
    peaks = [group["lr"] for group in opt.param_groups]
    gen = torch.Generator().manual_seed(config.seed)
    row["initial_held_out_loss"] = _loss_on(model, held)
    row["initial_pretraining_loss"] = _loss_on(model, pre)
    row["initial_validation_loss"] = _loss_on(model, val)
    # the DoRA paper's ΔM/ΔD along training, at every curve point (not for a 4-bit base,
    # whose pretrained weight is no longer at hand)
    track = config.method != "qlora"
    start = _trained_weights(model, config.method) if track else {}
    direction = (
        [[0, _magnitude_direction_of(model, config.method, start)]] if track else []
    )
    curve = [
        [
            0,
            row["initial_held_out_loss"],
            _loss_on(model, train_eval),
            row["initial_validation_loss"],
        ]
    ]
    last_step = config.steps if stop_after is None else stop_after
    steps = range(last_step)
    if progress:
        steps = tqdm(
            steps,
            desc=f"{config.method} r={config.r} seed={config.seed}",
            leave=False,
            mininterval=0.5,
        )
    # synchronizes a GPU before reading the clock: its kernels run asynchronously
    watch = Stopwatch(device)
    grad_norms = []
    for step in steps:
        x, y = textdata.random_batch(
            texts["train"], config.batch_size, config.seq_len, gen
        )
        factor = lr_factor(config, step)
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * factor
        with watch:
            norm = _step(model, opt, (x.to(device), y.to(device)), config.max_grad_norm)
        grad_norms.append(norm)
        if (
            config.eval_every
            and (step + 1) % config.eval_every == 0
            and step + 1 < last_step
        ):
            curve.append(
                [
                    step + 1,
                    _loss_on(model, held),
                    _loss_on(model, train_eval),
                    _loss_on(model, val),
                ]
            )
            if track:
                direction.append(
                    [step + 1, _magnitude_direction_of(model, config.method, start)]
                )
    row["seconds"] = watch.seconds
    row["seconds_per_step"] = watch.seconds / last_step
    row["held_out_loss"] = _loss_on(model, held)
    row["train_loss"] = _loss_on(model, train_eval)
    row["pretraining_loss"] = _loss_on(model, pre)
    row["validation_loss"] = _loss_on(model, val)
    row["trainable"] = count.trainable
    row["total"] = count.total
    last = [row["held_out_loss"], row["train_loss"], row["validation_loss"]]
    row["curve"] = curve + [[last_step, *last]]
    if track:
        direction.append(
            [last_step, _magnitude_direction_of(model, config.method, start)]
        )
        row["magnitude_direction"] = direction
    norms = torch.stack(grad_norms).float().cpu()
    row["first_grad_norm"] = norms[0].item()
    row["mean_grad_norm"] = norms.mean().item()
    row["effective_rank"], row["update_norm"] = _update_statistics(model, base_weights)
    adapter = {}
    if config.method != "full":
        adapter = {
            name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in model.named_parameters()
            if name.endswith(("lora_A", "lora_B", "lora_magnitude_vector"))
        }
    return row, adapter


def magnitude_direction(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """The DoRA paper's ΔM and ΔD (Liu et al. 2024, §3, Eq. 2–4) between a pretrained
    weight ``w0`` and a finetuned ``w`` (both ``out_features × in_features``).

    ΔM is the mean absolute change of the weight's per-output norms (its *magnitude*), ΔD
    the mean ``1 − cos`` between each output's old and new weight vector (its
    *direction*). Used by the chapter *LoRA variants* (book/chapters/variants.md).

    Note: the paper's W is ``d × k`` and multiplies from the right, so its column norms
    are the norms over each output's inputs: the rows of a PyTorch ``weight``, which is
    also the vector DoRA's magnitude holds (PEFT: ``norm(weight, dim=1)``).
    """
    for name, value in (("w0", w0), ("w", w)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise TypeError(f"{name} must be a 2-D tensor")
    if w0.shape != w.shape:
        raise ValueError(
            f"w0 and w must have one shape, got {tuple(w0.shape)} and {tuple(w.shape)}"
        )
    w0, w = w0.detach().double(), w.detach().double()
    dm = (w.norm(dim=1) - w0.norm(dim=1)).abs().mean().item()
    dd = (1 - torch.nn.functional.cosine_similarity(w, w0, dim=1)).mean().item()
    return dm, dd


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007):
    how many directions a matrix really uses, between 1 and its rank (0 for a zero
    matrix)."""
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise TypeError("matrix must be a 2-D tensor")
    s = torch.linalg.svdvals(matrix.detach().double())
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


@torch.no_grad()
def _trained_weights(model: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The weights training changes, as they act now, by layer name: every adapted layer's
    merged weight (:meth:`peftlab.lora.LoRALinear.merged_weight`), or for full
    finetuning every linear layer of the blocks."""
    from peftlab.lora import LoRALinear

    if method == "full":
        return _linear_weights(model)
    return {
        name: module.merged_weight().float()
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }


def _magnitude_direction_of(
    model: torch.nn.Module, method: str, start: dict[str, torch.Tensor]
) -> dict[str, list[list[float]]]:
    """ΔM and ΔD (:func:`magnitude_direction`) of every trained layer against its weight
    at the start (W0; for PiSSA, the residual plus the starting adapter, which is W0
    again), by module type, one ``[ΔM, ΔD]`` per block."""
    out: dict[str, list[list[float]]] = {}
    for name, weight in _trained_weights(model, method).items():
        kind = name.rsplit(".", 1)[-1]
        out.setdefault(kind, []).append(list(magnitude_direction(start[name], weight)))
    return out


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the weights of every targetable linear layer of the blocks, by name."""
    return {
        name: module.weight.detach().float().clone()
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in LLAMA_LINEARS and hasattr(module, "weight")
    }


@torch.no_grad()
def _update_statistics(
    model: torch.nn.Module, base_weights: dict[str, torch.Tensor]
) -> tuple[dict[str, float], float]:
    """Mean effective rank of the trained update ΔW per module type (``q_proj`` …), and
    the mean Frobenius norm of ΔW over layers: the full update ``W - W0`` when
    ``base_weights`` are given (full finetuning), else LoRA's ``scaling · B A``."""
    from peftlab.lora import LoRALinear

    ranks: dict[str, list[float]] = {}
    norms: list[float] = []
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if isinstance(module, LoRALinear):
            delta = module.delta_weight().float()
        elif name in base_weights:
            delta = module.weight.float() - base_weights[name]
        else:
            continue
        ranks.setdefault(kind, []).append(effective_rank(delta.cpu()))
        norms.append(torch.linalg.matrix_norm(delta).item())
    mean_rank = {kind: sum(v) / len(v) for kind, v in ranks.items()}
    return mean_rank, sum(norms) / max(1, len(norms))


def finetune(
    config: RunConfig,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or load from ``cache_dir``) one finetuning; return its row.

    ``stop_after`` ends training after that many of ``config.steps`` updates, with the
    learning-rate schedule still laid over all of them: the first ``stop_after`` steps of
    the full run, exactly, which is how a recorded run is re-checked by a short one
    (:func:`peftlab.harness.recorded.verify`). Such a partial run is never cached.

    The row holds every field of ``config``, plus ``scaling``; the losses in nats/byte on
    the downstream held-out text before and after (``initial_held_out_loss``,
    ``held_out_loss``), on the downstream train text (``train_loss``) and on the
    pretraining held-out text (``initial_pretraining_loss``, ``pretraining_loss``:
    forgetting); ``trainable`` and ``total`` parameters; ``seconds`` and
    ``seconds_per_step`` of training (evaluations excluded, timed between synchronizations
    of the device); ``compute_dtype``; the loss on the downstream validation text, which
    is the one to choose settings by (``initial_validation_loss``, ``validation_loss``);
    ``curve`` as ``[step, held-out loss, train loss, validation loss]`` rows;
    ``effective_rank``, the mean :func:`effective_rank` of the trained update per module
    type, and ``update_norm``, its mean Frobenius norm; ``first_grad_norm`` and
    ``mean_grad_norm``, the trainable parameters' gradient norm before clipping at the
    first step and over all steps; ``magnitude_direction`` (not for QLoRA), the DoRA paper's
    ΔM and ΔD of each trained layer at every curve point, as ``[step, {module type:
    [[ΔM, ΔD] per block]}]`` (:func:`magnitude_direction`); with ``measure_memory``, ``memory`` (a :class:`peftlab.memory.Breakdown`);
    ``cached``. An adapted run's trained ``lora_A``/``lora_B`` are stored beside its row
    in ``cache_dir`` (or kept in the row under ``"adapter"`` without one): see
    :func:`load_run_adapter`.

    Note: losses are measured on ``eval_windows`` windows spread evenly over each text
    (:func:`peftlab.harness.textdata.spaced_windows`), the same windows for every run, so
    runs compare on identical data.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    # the row reports the settings as asked, even when the run is shared
    asked = asdict(config)
    config = config.normalized()
    key = cache_key(config)
    if stop_after is not None:
        if (
            isinstance(stop_after, bool)
            or not isinstance(stop_after, int)
            or not 1 <= stop_after <= config.steps
        ):
            raise ValueError(
                f"stop_after must be an int in [1, steps={config.steps}], got {stop_after!r}"
            )
        measured, _ = _run(config, progress, stop_after)
        return _with_breakdown({**asdict(config), "key": key, **measured, **asked})
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"cache_dir must be a folder, got the file {str(folder)!r}")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key}.json"
        if path.is_file() and (
            config.method == "full" or path.with_suffix(".safetensors").is_file()
        ):
            cached = json.loads(path.read_text())
            # A row cached before runs tracked ΔM/ΔD is the same run, measured less: run
            # it again rather than return a row without them.
            if "magnitude_direction" in cached or config.method == "qlora":
                return _with_breakdown({**cached, **asked, "cached": True})
    measured, adapter = _run(config, progress)
    row = {**asdict(config), "scaling": config.scaling, "key": key, **measured}
    if folder is not None:
        if adapter:
            from safetensors.torch import save_file

            atomic_write(
                path.with_suffix(".safetensors"), lambda tmp: save_file(adapter, tmp)
            )
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(row, indent=1)))
    elif adapter:
        row["adapter"] = adapter
    return _with_breakdown({**row, **asked, "cached": False})


def _with_breakdown(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its measured memory as a :class:`peftlab.memory.Breakdown` (JSON keeps
    a dict)."""
    if "memory" in row:
        row["memory"] = Breakdown(
            **{k: v for k, v in row["memory"].items() if k != "total"}
        )
    return row


def load_run_adapter(
    row: dict[str, Any], cache_dir: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """The trained ``lora_A``/``lora_B`` tensors of a run in the cache, by parameter name.

    Not a PEFT adapter folder: for those, :func:`peftlab.adapter_io.load_adapter`.
    """
    if "adapter" in row:
        return row["adapter"]
    if cache_dir is None:
        raise ValueError("cache_dir is needed: this row's adapter was stored on disk")
    path = Path(cache_dir) / f"{row['key']}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"adapter file {path} not found (only LoRA and QLoRA runs have one)"
        )
    from safetensors.torch import load_file

    return load_file(str(path))


def sweep(
    configs: Sequence[RunConfig],
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every config (cached ones are loaded) and return their rows, in order."""
    configs = list(configs)
    runs: Iterable[RunConfig] = configs
    if progress:
        runs = tqdm(configs, desc="sweep", total=len(configs), mininterval=0.5)
    return [finetune(c, cache_dir, progress=False) for c in runs]


@lru_cache(maxsize=None)
def count_ops(method: str = "lora", targets: str = "qv") -> tuple[int, int]:
    """Operators dispatched by one training step of a run and by one evaluation forward:
    ``(step, eval)``.

    Each operator is about one GPU kernel launch, and for a model this small a GPU step
    costs about one launch's CPU overhead per operator (it is launch-bound). Counted on a
    CPU, where ``torch.optim.AdamW`` runs one parameter at a time; on CUDA it batches its
    updates (foreach), so the count is an upper bound there.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    config = RunConfig(method=method, targets=targets)
    model = copy.deepcopy(_base_model(True))
    with torch.random.fork_rng(devices=[]):
        if method == "lora":
            add_lora(model, list(TARGETS[targets]), config.r, config.alpha)
        else:
            model.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    x = torch.zeros(1, 8, dtype=torch.long)

    def step() -> None:
        loss = pretrained.lm_loss(model, x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()  # the first step creates AdamW's states: count a steady one
    with _Count() as train_ops:
        step()
    with _Count() as eval_ops:
        _loss_on(model, (x, x))
    return train_ops.n, eval_ops.n


def estimate_seconds(
    config: RunConfig,
    flops_per_second: float,
    seconds_per_op: float,
    seconds_per_run: float = 0.5,
) -> float:
    """Seconds one run (:func:`finetune`) should take on a device of ``flops_per_second``
    sustained, when
    each operator costs at least ``seconds_per_op`` to launch: every step and every
    evaluation forward takes the longer of its arithmetic and its launches
    (:func:`count_ops`), plus ``seconds_per_run`` to set the run up.

    Arithmetic per token: 6 N for a training step and 2 N for a forward (N parameters; an
    upper bound for LoRA, whose frozen weights get no gradient), plus attention's 4 ·
    layers · seq_len · d_model per forward.
    """
    config = config.normalized()
    cfg = pretrained.tiny_llama_config()
    n = sum(p.numel() for p in _base_model(config.pretrained).parameters())
    attention = 4 * cfg.num_hidden_layers * config.seq_len * cfg.hidden_size
    step_ops, eval_ops = count_ops(config.method, config.targets)
    step_flops = config.batch_size * config.seq_len * (6 * n + 3 * attention)
    eval_flops = config.eval_windows * config.seq_len * (2 * n + attention)
    points = (config.steps - 1) // config.eval_every if config.eval_every else 0
    # before and after: held-out, train, pretraining text; per curve point: two
    evals = 6 + 2 * points
    step = max(step_flops / flops_per_second, step_ops * seconds_per_op)
    forward = max(eval_flops / flops_per_second, eval_ops * seconds_per_op)
    return seconds_per_run + config.steps * step + evals * forward


def select(rows: Iterable[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    """The rows whose fields equal every ``where`` value."""
    return [row for row in rows if all(row.get(k) == v for k, v in where.items())]


def aggregate(
    rows: Iterable[dict[str, Any]], value: str, by: Sequence[str]
) -> list[dict[str, Any]]:
    """Mean, sample standard deviation and count of ``value`` over rows sharing the ``by``
    fields.

    Groups keep the order in which they first appear. The standard deviation of a single
    row is 0.
    """
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(float(row[value]))
    out = []
    for key, values in groups.items():
        t = torch.tensor(values, dtype=torch.float64)
        std = t.std().item() if len(values) > 1 else 0.0
        out.append(
            {**dict(zip(by, key)), "mean": t.mean().item(), "std": std, "n": len(values)}
        )
    return out


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str = "{:.3f}"
) -> str:
    """A MyST/Markdown table of ``columns`` (floats formatted with ``fmt``)."""

    def cell(v: Any) -> str:
        return fmt.format(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) (Hu et al. 2021, §7.2), in
    [0, 1].

    ``A1`` (r1 × k) and ``A2`` (r2 × k) are two ``lora_A`` matrices of the same layer; U1,
    U2 hold their right-singular vectors (directions in the input space), most important
    first. 1 means the top-i directions of one span the top-j of the other (or vice
    versa); 0 means orthogonal.
    """
    for name, a in (("A1", A1), ("A2", A2)):
        if not isinstance(a, torch.Tensor) or a.dim() != 2:
            raise TypeError(f"{name} must be a 2-D tensor (r × in_features)")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(
            "A1 and A2 must have the same in_features, "
            f"got {A1.shape[1]} and {A2.shape[1]}"
        )
    for name, n, a in (("i", i, A1), ("j", j, A2)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= min(a.shape):
            raise ValueError(f"{name} must be an int in [1, {min(a.shape)}], got {n!r}")
    # i × k, rows orthonormal
    u1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh[:i]
    u2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh[:j]
    return (torch.linalg.matrix_norm(u1 @ u2.T) ** 2 / min(i, j)).item()


def synthetic_rank_run(
    r: int,
    true_rank: int,
    d: int = 64,
    steps: int = 300,
    lr: float = 1e-2,
    alpha: float | None = None,
    rslora: bool = False,
    seed: int = 0,
    n: int = 512,
) -> dict[str, Any]:
    """LoRA of rank ``r`` fitting a linear map whose true update ``W - W0`` has rank
    ``true_rank``.

    The data are ``y = (W0 + ΔW) x`` with Gaussian ``x``, a random ``W0`` (d × d) and ``ΔW
    = U Vᵀ`` of rank ``true_rank`` with singular values 1 … 1/true_rank; LoRA on a frozen
    ``W0`` learns ΔW. Returns the relative error ``‖scaling·BA - ΔW‖_F / ‖ΔW‖_F`` after
    training and the best any rank-r matrix can do (Eckart–Young: the energy of the
    discarded singular values), so the chapter can show the elbow at ``r = true_rank``.
    """
    from peftlab.lora import LoRALinear

    if (
        isinstance(true_rank, bool)
        or not isinstance(true_rank, int)
        or not 1 <= true_rank <= d
    ):
        raise ValueError(f"true_rank must be an int in [1, d={d}], got {true_rank!r}")
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d, d, generator=gen) / math.sqrt(d)
    U, _ = torch.linalg.qr(torch.randn(d, true_rank, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(d, true_rank, generator=gen))
    sigma = 1.0 / torch.arange(1, true_rank + 1, dtype=torch.float32)
    delta = U @ torch.diag(sigma) @ V.T
    x = torch.randn(n, d, generator=gen)
    y = x @ (W0 + delta).T
    base = torch.nn.Linear(d, d, bias=False)
    with torch.no_grad():
        base.weight.copy_(W0)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        layer = LoRALinear(base, r, float(r if alpha is None else alpha), rslora=rslora)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(layer(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = (
            torch.linalg.matrix_norm(layer.delta_weight() - delta)
            / torch.linalg.matrix_norm(delta)
        ).item()
    best = (
        math.sqrt(float((sigma[r:] ** 2).sum() / (sigma**2).sum()))
        if r < true_rank
        else 0.0
    )
    return {
        "r": r,
        "true_rank": true_rank,
        "relative_error": err,
        "best_possible": best,
        "seed": seed,
    }


__getattr__ = _deprecated.renamed(
    __name__, {"load_adapter": "peftlab.harness.experiments.load_run_adapter"}
)
