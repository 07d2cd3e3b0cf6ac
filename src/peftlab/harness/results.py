"""What one finetuning run measured, as a typed record: :class:`RunResult`, with named
learning-curve points (:class:`CurvePoint`).

Explained in the chapter *LoRA rank and alpha* (book/chapters/rank_alpha.md).

:func:`peftlab.harness.experiments.finetune` measures a run; this module gives the
measurement its names, so a chapter reads ``run.curve[-1].validation`` or
``run.config.lr``, never a dict key or a position. Recorded studies store each run as a
JSON object (:meth:`RunResult.to_json`) and read it back with :meth:`RunResult.from_json`:
plain numbers, no pickle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from peftlab.harness.config import RunConfig, config_of
from peftlab.memory import Breakdown


@dataclass(frozen=True)
class CurvePoint:
    """The losses, in nats/byte, after ``step`` updates: on the downstream held-out text
    (what the chapters report), on the downstream train text, and on the downstream
    validation text (what learning rates are tuned on)."""

    step: int
    held_out: float
    train: float
    validation: float


@dataclass(frozen=True)
class DirectionPoint:
    """The DoRA paper's ΔM and ΔD after ``step`` updates, by module type (``q_proj`` …),
    one ``(ΔM, ΔD)`` pair per block (:func:`peftlab.harness.analysis.magnitude_direction`)."""

    step: int
    by_module: Mapping[str, tuple[tuple[float, float], ...]]


def _float(value: Any) -> float:
    """A stored loss: JSON keeps a diverged run's non-finite loss as null."""
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class RunResult:
    """One finetuning run: its settings and everything it measured.

    Losses are in nats/byte: ``initial_*`` before training, the others after it, on the
    downstream held-out, train and validation texts and on the pretraining held-out text
    (``*_pretraining_loss``: forgetting). ``curve`` holds a :class:`CurvePoint` at step 0,
    every ``config.eval_every`` steps and at the end. ``effective_rank`` is the mean
    effective rank of the trained update per module type and ``update_norm`` its mean
    Frobenius norm; ``first_grad_norm``/``mean_grad_norm`` the trainable parameters'
    gradient norm before clipping, at the first step and over all. ``direction`` holds
    the DoRA paper's ΔM/ΔD at every curve point (``()`` for a 4-bit base). ``memory`` is
    the measured memory of one step when ``config.measure_memory``. ``key`` names the run
    in a cache (:func:`peftlab.harness.config.cache_key`); ``adapter`` holds the trained
    adapter tensors of a run that was not cached (not stored in JSON).
    """

    config: RunConfig
    key: str
    scaling: float
    compute_dtype: str
    initial_held_out_loss: float
    initial_pretraining_loss: float
    initial_validation_loss: float
    held_out_loss: float
    train_loss: float
    pretraining_loss: float
    validation_loss: float
    trainable: int
    total: int
    seconds: float
    seconds_per_step: float
    curve: tuple[CurvePoint, ...]
    effective_rank: Mapping[str, float]
    update_norm: float
    first_grad_norm: float
    mean_grad_norm: float
    direction: tuple[DirectionPoint, ...] = ()
    memory: Breakdown | None = None
    cached: bool = False
    adapter: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def diverged(self) -> bool:
        """Whether training ended with a non-finite held-out loss."""
        return not math.isfinite(self.held_out_loss)

    @property
    def learned(self) -> float:
        """How far the downstream held-out loss fell."""
        return self.initial_held_out_loss - self.held_out_loss

    @property
    def forgot(self) -> float:
        """How far the loss on the model's own pretraining text rose."""
        return self.pretraining_loss - self.initial_pretraining_loss

    def last_quarter_drop(self) -> float:
        """How far the validation loss fell over the last quarter of the steps: from the
        curve point at three quarters of the run to the end. Near zero when a run has
        levelled off (``ValueError`` when the curve has no point there)."""
        at = {p.step: p.validation for p in self.curve}
        three_quarters = self.config.steps - self.config.steps // 4
        if self.config.steps % 4 or three_quarters not in at:
            raise ValueError(
                f"the curve has no point at step {three_quarters} of {self.config.steps} "
                f"(eval_every={self.config.eval_every})"
            )
        return at[three_quarters] - at[self.config.steps]

    def to_json(self) -> dict[str, Any]:
        """The run as plain JSON values (settings flattened in, as ``from_json`` reads
        them); non-finite losses become ``None``."""
        out: dict[str, Any] = asdict(self.config)
        for f in fields(self):
            if f.name in (
                "config",
                "memory",
                "cached",
                "adapter",
                "direction",
                "curve",
            ):
                continue
            out[f.name] = getattr(self, f.name)
        if self.memory is not None:
            out["memory"] = self.memory.as_dict()
        out["curve"] = [[p.step, p.held_out, p.train, p.validation] for p in self.curve]
        if self.direction:
            out["magnitude_direction"] = [
                [
                    p.step,
                    {k: [list(pair) for pair in v] for k, v in p.by_module.items()},
                ]
                for p in self.direction
            ]
        out["effective_rank"] = dict(self.effective_rank)
        out["diverged"] = self.diverged
        return _finite(out)

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "RunResult":
        """A run from its JSON object (as :meth:`to_json` writes it, or a row recorded
        before a setting existed: that setting then held its default)."""
        if not isinstance(row, Mapping):
            raise TypeError(f"row must be a mapping, got {type(row).__name__}")
        curve = tuple(
            CurvePoint(int(s), _float(h), _float(t), _float(v))
            for s, h, t, v in row["curve"]
        )
        direction = tuple(
            DirectionPoint(
                int(step),
                {
                    k: tuple((float(m), float(d)) for m, d in v)
                    for k, v in layers.items()
                },
            )
            for step, layers in row.get("magnitude_direction", ())
        )
        memory = row.get("memory")
        if isinstance(memory, Mapping):
            memory = Breakdown(**{k: v for k, v in memory.items() if k != "total"})
        losses = (
            "initial_held_out_loss",
            "initial_pretraining_loss",
            "initial_validation_loss",
            "held_out_loss",
            "train_loss",
            "pretraining_loss",
            "validation_loss",
        )
        return cls(
            config=config_of(row),
            key=str(row["key"]),
            scaling=float(row["scaling"]),
            compute_dtype=str(row["compute_dtype"]),
            **{name: _float(row[name]) for name in losses},
            trainable=int(row["trainable"]),
            total=int(row["total"]),
            seconds=float(row["seconds"]),
            seconds_per_step=float(row["seconds_per_step"]),
            curve=curve,
            effective_rank={k: float(v) for k, v in row["effective_rank"].items()},
            update_norm=float(row["update_norm"]),
            first_grad_norm=_float(row["first_grad_norm"]),
            mean_grad_norm=_float(row["mean_grad_norm"]),
            direction=direction,
            memory=memory,
            cached=bool(row.get("cached", False)),
        )


def _finite(value: Any) -> Any:
    """JSON without NaN: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value
