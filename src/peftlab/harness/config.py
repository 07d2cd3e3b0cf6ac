"""The settings of one finetuning run (:class:`RunConfig`), the grid and schedule helpers
built on them, and the cache key that names a run by its settings, its model and its data.

Explained in the chapter *LoRA rank and alpha* (book/chapters/rank_alpha.md). The training
loop that runs a config is :mod:`peftlab.harness.experiments`.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from itertools import product
from typing import Any, Iterable

import torch

from peftlab.harness import pretrained, textdata
from peftlab.lora import lora_scaling
from peftlab.memory import METHODS
from peftlab.prepare import INITS  # how the adapters start: B = 0, PiSSA or LoftQ
from peftlab.targets import LLAMA_LINEARS

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
:func:`peftlab.devices.sixteen_bit_dtype` (the QLoRA paper's bfloat16). Full finetuning always trains in float32."""


@dataclass(frozen=True)
class RunConfig:
    """Settings of one finetuning run; every field is part of its cache key.

    ``method`` is one of :data:`peftlab.memory.METHODS`: ``"full"`` (every parameter
    trained; the LoRA fields are then ignored and normalised away), ``"lora"``, or
    ``"qlora"`` (the same adapters on an NF4 + double-quantized base,
    :func:`peftlab.prepare.prepare_qlora`). ``targets`` names a set in :data:`TARGETS`.
    ``train_bytes`` keeps only the first bytes of the downstream train split (``None``:
    all of it). ``pretrained=False`` starts from the same architecture untrained.
    ``eval_every`` > 0 records a learning curve (held-out and train loss every
    ``eval_every`` steps). ``device`` is where the run trains. ``optimizer`` is one of
    :data:`OPTIMIZERS` (constant learning rate, no weight decay), ``max_grad_norm`` the
    gradient-norm clip, ``precision`` one of :data:`PRECISIONS`, ``kernels`` the 4-bit
    layer's (``"torch"`` or ``"bnb"``, QLoRA only). ``measure_memory`` adds the measured
    memory of one step (:func:`peftlab.measure.measure_step`, on a copy of the model) to
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
                "optim_bits=8 needs optimizer='paged_adamw' (8-bit states are the "
                f"paged optimizer's), got optimizer={self.optimizer!r}"
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
            raise ValueError(
                f"dropout must be a number in [0, 1), got {self.dropout!r}"
            )

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
    clipped at 0.3, the frozen base computing in 16 bits, and one step's memory
    measured. ``settings`` override any field.

    Note: the learning rate defaults to 2e-3 for the adapters and 5e-4 for full
    finetuning, which diverges at 2e-3 on this model; the paper's dropout (0.1 up to
    13B) is a setting like any other.
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
    along half a cosine and reaches exactly zero one update after the last, so a run
    ends at a learning rate close to zero: its loss has stopped moving because the steps
    have become small, the usual recipe's way of ending a run.
    """
    warmup = math.ceil(config.warmup_ratio * config.steps)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, config.steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def grid(base: RunConfig | None = None, **axes: Iterable[Any]) -> list[RunConfig]:
    """Every combination of ``axes`` (field name → values) applied to ``base``, in order.

    ``alpha="r"`` in an axis means alpha equal to the run's r (the LoRA paper's habit).
    """
    base = RunConfig() if base is None else base
    names = {f.name for f in fields(RunConfig)}
    for name in axes:
        if name not in names:
            raise ValueError(
                f"unknown RunConfig field {name!r}; fields: {sorted(names)}"
            )
    configs = []
    for values in product(*(list(v) for v in axes.values())):
        settings = dict(zip(axes, values))
        config = replace(
            base,
            **{k: v for k, v in settings.items() if not (k == "alpha" and v == "r")},
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
    digest.update(run_texts(None)["pretraining"].numpy().tobytes())
    return digest.hexdigest()[:16]


def config_of(row: dict[str, Any]) -> RunConfig:
    """The :class:`RunConfig` a row was run with (a row holds every field; one recorded
    before a field existed ran at that field's default)."""
    return RunConfig(
        **{
            f.name: row.get(f.name, _LATER_FIELDS.get(f.name))
            for f in fields(RunConfig)
        }
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
def run_texts(train_bytes: int | None) -> dict[str, torch.Tensor]:
    """The texts a run trains and is measured on, by name: the downstream ``"train"``
    split (its first ``train_bytes`` bytes; ``None``: all), ``"validation"`` and
    ``"held_out"``, and the model's own held-out ``"pretraining"`` text."""
    corpus = pretrained.checkpoint_info()["data"].get("corpus", "help_topics")
    return {
        "train": textdata.downstream_text("train", max_bytes=train_bytes),
        "validation": textdata.downstream_text("validation"),
        "held_out": textdata.downstream_text("held_out"),
        "pretraining": textdata.pretraining_text("held_out", corpus),
    }
