"""The book's recorded finetuning studies: which runs each one makes, stage by stage.

Explained in the chapters *LoRA rank and alpha* (book/chapters/rank_alpha.md) and *LoRA
variants* (book/chapters/variants.md); recorded and re-checked by
:mod:`peftlab.harness.recorded`.

Each study is a list of stages. A stage is a function of the rows recorded so far that
returns the next runs, so a study can first tune the learning rate on seed 0 and then
repeat the best one on more seeds. Learning rates are always chosen on the downstream
*validation* headers (:data:`peftlab.harness.textdata.DOWNSTREAM_EVERY`), never
on the held-out text the chapters report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from peftlab.harness.experiments import RunConfig, config_of, grid

Rows = list[dict[str, Any]]
Stage = Callable[[Rows], list[RunConfig]]

BASE = RunConfig(
    method="lora",
    r=8,
    alpha=16.0,
    targets="qv",
    steps=300,
    batch_size=8,
    seq_len=64,
    eval_windows=128,
    eval_every=75,
)
"""Every study's starting point: 300 steps of 8 × 64 bytes (153,600 training bytes, about
a third of the downstream train text), evaluated on 128 windows of 64 bytes of each text
every 75 steps."""

SEEDS = (0, 1, 2)
"""Seeds of every repeated setting."""

PLACEMENTS = (("q", 16), ("qv", 8), ("qkvo", 4), ("all", 2))
"""Target sets and ranks with (nearly) equal trainable parameters, as in the LoRA paper's
Table 5: W_q at 4r, W_q,W_v at 2r, attention at r, and every linear layer at the rank
closest to the same budget."""


@dataclass(frozen=True)
class Study:
    """A named study: what it asks, and its stages. ``keep_adapters`` picks the rows whose
    trained ``lora_A``/``lora_B`` are stored beside the rows (for analyses of the adapters
    themselves, such as the LoRA paper's subspace similarity)."""

    name: str
    description: str
    stages: tuple[Stage, ...]
    keep_adapters: Callable[[Rows], list[dict[str, Any]]] = lambda rows: []


def best_lr(rows: Rows, by: Sequence[str], **where: Any) -> dict[tuple, float]:
    """For each group of rows sharing the ``by`` fields (among rows matching ``where``),
    the learning rate with the lowest mean validation loss; diverged runs lose.

    The studies tune on seed 0 alone (pass ``seed=0``): the repeats on other seeds exist
    only at the chosen rate, and averaging them in would favour or penalise it."""
    scores: dict[tuple, dict[float, list[float]]] = {}
    for row in rows:
        if any(row.get(k) != v for k, v in where.items()):
            continue
        loss = row.get("validation_loss")
        value = loss if loss is not None and math.isfinite(loss) else math.inf
        key = tuple(row[k] for k in by)
        scores.setdefault(key, {}).setdefault(row["lr"], []).append(value)
    return {
        key: min(per_lr, key=lambda lr: sum(per_lr[lr]) / len(per_lr[lr]))
        for key, per_lr in scores.items()
    }


def _repeat_best(by: Sequence[str], **where: Any) -> Stage:
    """A stage repeating, on every seed of :data:`SEEDS`, each group's best seed-0 run."""

    def stage(rows: Rows) -> list[RunConfig]:
        configs = []
        for row in rows:
            if any(row.get(k) != v for k, v in where.items()) or row["seed"] != 0:
                continue
            best = best_lr(rows, by, seed=0, **where)[tuple(row[k] for k in by)]
            if row["lr"] == best:
                base = config_of(row)
                configs += [replace(base, seed=s) for s in SEEDS if s != 0]
        return configs

    return stage


_STUDIES = (
    Study(
        "alpha-lr",
        "final loss over alpha and learning rate at r = 8: the two trade against each "
        "other, and both sides of the best setting show",
        (
            # both axes in steps of 4, so a diagonal of the grid holds one value of α · lr
            lambda rows: grid(
                BASE, alpha=[2, 8, 32, 128, 512], lr=[1.25e-4, 5e-4, 2e-3, 8e-3, 3.2e-2]
            ),
        ),
    ),
    Study(
        "rank-lr",
        "rank at fixed alpha = 16, with and without rsLoRA, each at its own tuned "
        "learning rate, three seeds",
        (
            lambda rows: grid(
                BASE,
                r=[1, 4, 16, 64],
                rslora=[False, True],
                lr=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
            ),
            _repeat_best(("r", "rslora")),
        ),
        # the LoRA paper's §7.2 compares a small and a large rank's adapters, trained from
        # different seeds (one seed would start both A's with the same first rows)
        lambda rows: _best_rows(rows, ("r", "rslora"), [(16, False, 0), (64, False, 1)]),
    ),
    Study(
        "placement",
        "where the adapters go, at (nearly) equal trainable parameters, each at its own "
        "tuned learning rate, three seeds",
        (
            lambda rows: [
                replace(BASE, targets=t, r=r, alpha=2.0 * r, lr=lr)
                for t, r in PLACEMENTS
                for lr in (3e-3, 1e-2, 3e-2)
            ],
            _repeat_best(("targets",)),
        ),
    ),
    Study(
        "qlora-lora",
        "QLoRA (NF4 + double-quantized base) against LoRA on the float32 base, all "
        "linear layers, r = 8, at LoRA's tuned learning rate, five seeds",
        (
            lambda rows: grid(replace(BASE, targets="all"), lr=[3e-3, 1e-2, 3e-2]),
            lambda rows: grid(
                replace(
                    BASE,
                    targets="all",
                    lr=best_lr(rows, ("method",), seed=0, method="lora")[("lora",)],
                ),
                method=["lora", "qlora"],
                seed=[0, 1, 2, 3, 4],
            ),
        ),
    ),
    Study(
        "full",
        "full finetuning at its own tuned learning rate, three seeds: the reference for "
        "the update's effective rank and for forgetting",
        (
            lambda rows: grid(replace(BASE, method="full"), lr=[3e-4, 1e-3, 3e-3]),
            _repeat_best(("method",)),
        ),
    ),
    Study(
        "scratch",
        "LoRA (W_q, W_v, r = 8) and full finetuning from the untrained initialisation of "
        "the same network, each at its own tuned learning rate, three seeds",
        (
            lambda rows: [
                replace(BASE, method=m, pretrained=False, lr=lr)
                for m, lrs in (("lora", (3e-3, 1e-2, 3e-2)), ("full", (3e-4, 1e-3, 3e-3)))
                for lr in lrs
            ],
            _repeat_best(("method",)),
        ),
    ),
    Study(
        "small-data",
        "LoRA (W_q, W_v, r = 8) and full finetuning on only 4,096 training bytes, about "
        "37 passes over them, each at its own tuned learning rate, three seeds",
        (
            lambda rows: [
                replace(BASE, method=m, train_bytes=4096, lr=lr)
                for m, lrs in (("lora", (1e-3, 3e-3, 1e-2)), ("full", (1e-4, 3e-4, 1e-3)))
                for lr in lrs
            ],
            _repeat_best(("method",)),
        ),
    ),
)


# The variants of the chapter *LoRA variants* (book/chapters/variants.md).
_VARIANTS = (
    Study(
        "dora",
        "DoRA against LoRA (W_q, W_v, r = 8) and full finetuning, each at its own tuned "
        "learning rate, three seeds, with the DoRA paper's magnitude and direction changes "
        "along training",
        (
            lambda rows: [
                replace(BASE, method=m, use_dora=d, lr=lr)
                for m, d, lrs in (
                    ("lora", False, (1e-3, 3e-3, 1e-2)),
                    ("lora", True, (1e-3, 3e-3, 1e-2)),
                    ("full", False, (1e-4, 3e-4)),
                )
                for lr in lrs
            ],
            _repeat_best(("method", "use_dora")),
        ),
    ),
    Study(
        "loraplus",
        "LoRA+ (B's learning rate λ times A's) for λ = 1, 4, 16, each λ at its own tuned "
        "learning rate, three seeds",
        (
            lambda rows: grid(
                BASE, loraplus_ratio=[1.0, 4.0, 16.0], lr=[3e-4, 1e-3, 3e-3, 1e-2]
            ),
            _repeat_best(("loraplus_ratio",)),
        ),
    ),
    Study(
        "optim8",
        "8-bit against 32-bit optimizer states (paged AdamW), for LoRA on every linear "
        "layer at r = 32 and for full finetuning, at the learning rate tuned with 32-bit "
        "states, three seeds, paired",
        (
            lambda rows: [
                replace(OPTIM8[m], lr=lr)
                for m, lrs in (("lora", (3e-3, 1e-2)), ("full", (1e-4, 3e-4)))
                for lr in lrs
            ],
            lambda rows: [
                replace(
                    OPTIM8[m],
                    lr=best_lr(rows, ("method",), seed=0, method=m)[(m,)],
                    optim_bits=bits,
                    seed=seed,
                )
                for m in OPTIM8
                for bits in (32, 8)
                for seed in SEEDS
            ],
        ),
    ),
    Study(
        "init",
        "QLoRA's adapters started at B = 0, with PiSSA and with LoftQ, on every linear "
        "layer at r = 4 and r = 32, each at its own tuned learning rate, three seeds",
        (
            lambda rows: grid(
                replace(BASE, method="qlora", targets="all", alpha=16.0),
                init=["zero", "pissa", "loftq"],
                r=[4, 32],
                lr=[1e-3, 3e-3],
            ),
            _repeat_best(("init", "r")),
        ),
    ),
)

OPTIM8 = {
    "lora": replace(BASE, targets="all", r=32, alpha=32.0, optimizer="paged_adamw"),
    "full": replace(BASE, method="full", optimizer="paged_adamw"),
}
"""The two settings of the 8-bit-states study: LoRA at r = 32 on every linear layer (every
factor has at least bitsandbytes' 4,096 values, so each gets 8-bit states) and full
finetuning."""


def _best_rows(rows: Rows, by: Sequence[str], wanted: list[tuple]) -> Rows:
    """The rows at their group's best learning rate whose ``by`` fields and seed match one
    of ``wanted``."""
    best = best_lr(rows, by, seed=0)
    return [
        row
        for row in rows
        if (*(row[k] for k in by), row["seed"]) in wanted
        and row["lr"] == best[tuple(row[k] for k in by)]
    ]


RANK_ALPHA = tuple(s.name for s in _STUDIES)
"""The studies of the chapter *LoRA rank and alpha*."""

VARIANTS = tuple(s.name for s in _VARIANTS)
"""The studies of the chapter *LoRA variants*."""


def names() -> list[str]:
    """The studies' names."""
    return [*RANK_ALPHA, *VARIANTS]


def get(name: str) -> Study:
    """The study called ``name`` (``ValueError`` listing the names otherwise)."""
    for study in (*_STUDIES, *_VARIANTS):
        if study.name == name:
            return study
    raise ValueError(f"study must be one of {names()}, got {name!r}")
