"""The book's recorded finetuning studies: which runs each one makes, and how each setting's
learning rate is tuned.

Explained in the chapters *LoRA rank and alpha* (book/chapters/rank_alpha.md) and *LoRA
variants* (book/chapters/variants.md); recorded and re-checked by
:mod:`peftlab.harness.recorded`.

A study compares *arms*: settings that differ in what the study asks about (a rank, a
placement, a method) and each get their own learning rate. Every arm is tuned the same
way, on :data:`TUNING_SEED` alone: a few rates on a geometric lattice
(:func:`lr_lattice`) around a first guess, then one more rate beyond whichever end of the
tried range is best, until the best rate has a worse one on each side (:func:`tune`).
Rates are compared by the loss on the downstream *validation* text
(:data:`peftlab.harness.textdata.DOWNSTREAM_EVERY`), never on the held-out text the
chapters report. The tuned rate is then run on :data:`SEEDS`, which never include the
tuning seed, so the reported runs are not the ones that won the tuning
(:func:`repeat_tuned`).

A study is a list of stages. A stage is a function of the rows recorded so far that
returns runs to make; the recorder calls it again after they finish, until it asks for
nothing new, which is how tuning widens its grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from peftlab.harness.config import RunConfig
from peftlab.harness.results import RunResult

Rows = Sequence[RunResult]
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
    schedule="cosine",
    warmup_ratio=0.05,
)
"""Every study's starting point: 300 steps of 8 × 64 bytes (153,600 training bytes,
about a third of the downstream train text), the learning rate warmed up over the first
5 % of the steps and decayed to zero along a cosine, evaluated on 128 windows of 64
bytes of each text every 75 steps."""

TUNING_SEED = 0
"""The seed every learning rate is tuned on."""

SEEDS = (1, 2, 3)
"""Seeds of every reported run: apart from :data:`TUNING_SEED`, so the run that won the
tuning is not among the runs reported."""

LR_UNIT = 1e-3
"""Every tuned learning rate is ``LR_UNIT · 2^k`` for an integer ``k``."""

PLACEMENTS = (("q", 16), ("qv", 8), ("qkvo", 4), ("all", 2))
"""Target sets and ranks with (nearly) equal trainable parameters, as in the LoRA paper's
Table 5: W_q at 4r, W_q,W_v at 2r, attention at r, and every linear layer at the rank
closest to the same budget."""


def lr_lattice(k: int) -> float:
    """The learning rate ``LR_UNIT · 2^k``, rounded to 6 significant digits so that a rate
    reached from either side of the lattice is the same float."""
    return float(f"{LR_UNIT * 2.0**k:.6g}")


def lattice_index(lr: float) -> int:
    """The ``k`` of a learning rate on the lattice (``ValueError`` for a rate off it)."""
    k = round(math.log2(lr / LR_UNIT))
    if lr_lattice(k) != lr:
        raise ValueError(f"lr must be LR_UNIT · 2^k, got {lr!r}")
    return k


def _is_run_of(run: RunResult, arm: RunConfig) -> bool:
    """Whether ``run`` is a run of ``arm`` (at any learning rate and seed)."""
    config = run.config
    return (
        replace(config, measure_memory=False).normalized()
        == replace(
            arm, lr=config.lr, seed=config.seed, measure_memory=False
        ).normalized()
    )


def tuning_curve(rows: Rows, arm: RunConfig) -> dict[float, float]:
    """An arm's validation loss at each learning rate tried on :data:`TUNING_SEED`
    (``math.inf`` for a run that diverged), by rate, in increasing order."""
    out = {}
    for run in rows:
        if run.config.seed == TUNING_SEED and _is_run_of(run, arm):
            loss = run.validation_loss
            out[run.config.lr] = loss if math.isfinite(loss) else math.inf
    return dict(sorted(out.items()))


def tuned_lr(rows: Rows, arm: RunConfig) -> float:
    """The learning rate with the lowest validation loss on the tuning seed
    (``ValueError`` when the arm has no tuning runs)."""
    curve = tuning_curve(rows, arm)
    if not curve:
        raise ValueError(f"no tuning runs recorded for {arm}")
    return min(curve, key=curve.get)


def is_interior(rows: Rows, arm: RunConfig) -> bool:
    """Whether the arm's tuned rate has a strictly worse rate tried on each side of it."""
    curve = tuning_curve(rows, arm)
    best = tuned_lr(rows, arm)
    lrs = list(curve)
    return lrs[0] < best < lrs[-1]


def refined_lr(rows: Rows, arm: RunConfig) -> tuple[float, float, float]:
    """The arm's best learning rate between lattice points: the vertex of the parabola
    through the validation losses at the tuned rate and its two neighbours, in log2 of the
    rate, with the bracket ``(tuned / 2, tuned · 2)`` that holds it when the loss has one
    minimum (an interior tuned rate has a worse rate on each side). Returns
    ``(low, estimate, high)``; ``ValueError`` unless the tuned rate is interior."""
    if not is_interior(rows, arm):
        raise ValueError(f"the tuned rate of {arm} is on its grid's edge")
    curve = tuning_curve(rows, arm)
    best = tuned_lr(rows, arm)
    k = lattice_index(best)
    y0, y1, y2 = (curve.get(lr_lattice(i), math.inf) for i in (k - 1, k, k + 1))
    curvature = y0 - 2 * y1 + y2
    shift = (
        0.0
        if not math.isfinite(curvature) or curvature <= 0
        else 0.5 * (y0 - y2) / curvature
    )
    return best / 2, best * 2.0 ** max(-1.0, min(1.0, shift)), best * 2


def tune(arms: Sequence[RunConfig], first: Sequence[int]) -> Stage:
    """A stage that tunes each arm's learning rate on :data:`TUNING_SEED`.

    ``first[i]`` is the lattice index (:func:`lr_lattice`) of arm ``i``'s first guess;
    the first call tries it and its two neighbours, each later call one more rate past
    whichever end is best, until every arm's best is interior (:func:`is_interior`).
    """
    if len(arms) != len(first):
        raise ValueError(
            f"first must give one index per arm, got {len(first)} for {len(arms)}"
        )

    def stage(rows: Rows) -> list[RunConfig]:
        configs = []
        for arm, k in zip(arms, first):
            curve = tuning_curve(rows, arm)
            if not curve:
                ks = [k - 1, k, k + 1]
            else:
                best = lattice_index(tuned_lr(rows, arm))
                lo, hi = (lattice_index(lr) for lr in (min(curve), max(curve)))
                ks = [best - 1] if best == lo else [best + 1] if best == hi else []
            configs += [replace(arm, lr=lr_lattice(i), seed=TUNING_SEED) for i in ks]
        return configs

    return stage


def repeat_tuned(arms: Sequence[RunConfig], seeds: Sequence[int] = SEEDS) -> Stage:
    """A stage running each arm at its tuned learning rate on every one of ``seeds``."""

    def stage(rows: Rows) -> list[RunConfig]:
        return [
            replace(arm, lr=tuned_lr(rows, arm), seed=s) for arm in arms for s in seeds
        ]

    return stage


def reported_runs(
    rows: Rows, arm: RunConfig, seeds: Sequence[int] = SEEDS, lr: float | None = None
) -> list[RunResult]:
    """The arm's runs at its tuned learning rate on ``seeds``, in seed order: the runs a
    chapter reports for it. ``lr`` names the rate instead, for an arm run at another arm's
    tuned rate (QLoRA at LoRA's)."""
    best = tuned_lr(rows, arm) if lr is None else lr
    by_seed = {
        r.config.seed: r for r in rows if r.config.lr == best and _is_run_of(r, arm)
    }
    missing = [s for s in seeds if s not in by_seed]
    if missing:
        raise ValueError(f"seeds {missing} not recorded at lr={best} for {arm}")
    return [by_seed[s] for s in seeds]


def arms_in(rows: Rows) -> list[RunConfig]:
    """The distinct arms among ``rows`` (each run's settings with the learning rate and seed
    left out), in the order they first appear: how a chapter names the arms of a study
    recorded under an older definition."""
    seen: list[RunConfig] = []
    for run in rows:
        arm = replace(
            run.config, lr=LR_UNIT, seed=TUNING_SEED, measure_memory=False
        ).normalized()
        if arm not in seen:
            seen.append(arm)
    return seen


@dataclass(frozen=True)
class Study:
    """A named study: what it asks, the arms it tunes, and its stages. ``keep_adapters``
    picks the rows whose trained ``lora_A``/``lora_B`` are stored beside the rows (for
    analyses of the adapters themselves, such as the LoRA paper's subspace similarity).
    ``seeds`` are the seeds its arms are reported on. A study that names another in
    ``after`` sees that study's recorded rows as well as its own (a longer re-run of its
    tuned arms reads their rates from there); it stores only its own."""

    name: str
    description: str
    arms: tuple[RunConfig, ...]
    stages: tuple[Stage, ...]
    seeds: tuple[int, ...] = SEEDS
    keep_adapters: Callable[[Rows], list[RunResult]] = lambda rows: []
    after: str | None = None


def _nearest(lr: float) -> int:
    return round(math.log2(lr / LR_UNIT))


def _tuned_study(
    name: str,
    description: str,
    arms: Sequence[RunConfig],
    guesses: Sequence[float],
    seeds: Sequence[int] = SEEDS,
    keep_adapters: Callable[[Rows], list[RunResult]] = lambda rows: [],
) -> Study:
    """A study that tunes every arm from a first-guess rate and repeats it on ``seeds``."""
    arms = tuple(arms)
    return Study(
        name,
        description,
        arms,
        (tune(arms, [_nearest(g) for g in guesses]), repeat_tuned(arms, seeds)),
        tuple(seeds),
        keep_adapters,
    )


def _alpha_guess(arm: RunConfig, at_base: float = 4e-3) -> float:
    """The first-guess rate of an adapter arm: ``at_base`` scaled by
    ``sqrt(scaling(BASE) / scaling(arm))``, the rate that keeps ``scaling · lr²`` fixed (the
    trade between α and the rate under Adam that the chapter *LoRA rank and alpha*
    derives)."""
    return at_base * math.sqrt(BASE.scaling / arm.scaling)


ALPHAS = (1.0, 4.0, 16.0, 64.0, 256.0)
"""α of the α/learning-rate map at r = 8: steps of 4, so the rate that keeps α · lr² fixed
moves one lattice step (×2) per α."""

_ALPHA_ARMS = tuple(replace(BASE, alpha=a) for a in ALPHAS)

RANKS = (1, 4, 16, 64)
"""Ranks of the rank study."""

_RANK_ARMS = tuple(
    replace(BASE, r=r, rslora=rs)
    for rs in (False, True)
    for r in RANKS
    if r > 1 or not rs
)

_PLACEMENT_ARMS = tuple(
    replace(BASE, targets=t, r=r, alpha=2.0 * r) for t, r in PLACEMENTS
)

QLORA_LORA_SEEDS = tuple(range(1, 11))
"""Seeds of the QLoRA-against-LoRA comparison: ten, enough for its interval to be narrower
than the equivalence margin it is tested against."""

QLORA_LORA_MARGIN = 0.01
"""nats/byte: how far QLoRA's held-out loss may sit from LoRA's, paired by seed, for the two
to count as equivalent. Fixed before the ten-seed study was recorded, below the whole
starting penalty of the 4-bit base (its held-out loss before any training exceeds the
float base's by about 0.02 on this model), so the test fails if training recovers less
than about half of that penalty."""

OPTIM8_MARGIN = 0.01
"""nats/byte: how far the held-out loss with 8-bit optimizer states may sit from that with
32-bit states, paired by seed, for the two to count as equivalent. Fixed before the study
was recorded under the book's schedule (an earlier recording with a constant learning rate
had been seen, and differed by less than a quarter of it), at the same size as the
QLoRA-against-LoRA margin: the smallest difference the book treats as mattering."""

LORA_FULL_LR_RATIO = 10.0
"""The ratio of LoRA's best learning rate to full finetuning's that Schulman et al. (2025,
*LoRA Without Regret*) report at scale, set beside the ratio measured here."""

_ALL_LORA = replace(BASE, targets="all")
_FULL = replace(BASE, method="full")

_STUDIES = (
    Study(
        "alpha-lr",
        "validation loss over α and learning rate at r = 8, each α tuned: α and the rate "
        "trade against each other",
        _ALPHA_ARMS,
        (
            # five rates per α, centred where α · lr² equals BASE's at 4e-3
            lambda rows: [
                replace(
                    arm,
                    lr=lr_lattice(_nearest(_alpha_guess(arm)) + k),
                    seed=TUNING_SEED,
                )
                for arm in _ALPHA_ARMS
                for k in (-2, -1, 0, 1, 2)
            ],
            tune(_ALPHA_ARMS, [_nearest(_alpha_guess(a)) for a in _ALPHA_ARMS]),
        ),
        seeds=(),
    ),
    _tuned_study(
        "rank-lr",
        "rank at fixed α = 16, with α/r and with rsLoRA's α/√r, each at its own tuned "
        "learning rate, three seeds",
        _RANK_ARMS,
        [_alpha_guess(a) for a in _RANK_ARMS],
        # the LoRA paper's §7.2 compares a small and a large rank's adapters, trained from
        # different seeds (one seed would start both A's with the same first rows)
        keep_adapters=lambda rows: [
            reported_runs(rows, replace(BASE, r=16))[0],
            reported_runs(rows, replace(BASE, r=64))[1],
        ],
    ),
    _tuned_study(
        "placement",
        "where the adapters go, at (nearly) equal trainable parameters, each at its own "
        "tuned learning rate, three seeds",
        _PLACEMENT_ARMS,
        [4e-3] * len(_PLACEMENT_ARMS),
    ),
    Study(
        "qlora-lora",
        "QLoRA (NF4 + double-quantized base) against LoRA on the float32 base, all "
        "linear layers, r = 8, at LoRA's tuned learning rate, ten seeds, paired",
        (_ALL_LORA,),
        (
            tune((_ALL_LORA,), [_nearest(4e-3)]),
            lambda rows: [
                replace(_ALL_LORA, method=m, lr=tuned_lr(rows, _ALL_LORA), seed=s)
                for m in ("lora", "qlora")
                for s in QLORA_LORA_SEEDS
            ],
        ),
        seeds=QLORA_LORA_SEEDS,
    ),
    _tuned_study(
        "full",
        "full finetuning at its own tuned learning rate, three seeds: the reference for "
        "the update's effective rank, for forgetting and for LoRA's best learning rate",
        (_FULL,),
        [2.5e-4],
    ),
    _tuned_study(
        "scratch",
        "LoRA (W_q, W_v, r = 8) and full finetuning from the untrained initialisation of "
        "the same network, each at its own tuned learning rate, three seeds",
        (replace(BASE, pretrained=False), replace(_FULL, pretrained=False)),
        [8e-3, 1e-3],
    ),
    _tuned_study(
        "small-data",
        "LoRA (W_q, W_v, r = 8) and full finetuning on only 4,096 training bytes, about "
        "37 passes over them, each at its own tuned learning rate, three seeds",
        (replace(BASE, train_bytes=4096), replace(_FULL, train_bytes=4096)),
        [1e-3, 1.25e-4],
    ),
)


OPTIM8 = {
    "lora": replace(BASE, targets="all", r=32, alpha=32.0, optimizer="paged_adamw"),
    "full": replace(_FULL, optimizer="paged_adamw"),
}
"""The two settings of the 8-bit-states study: LoRA at r = 32 on every linear layer (every
factor has at least bitsandbytes' 4,096 values, so each gets 8-bit states) and full
finetuning."""

_DORA_ARMS = (BASE, replace(BASE, use_dora=True), _FULL)
_LORAPLUS_ARMS = tuple(replace(BASE, loraplus_ratio=lam) for lam in (1.0, 4.0, 16.0))
_INIT_ARMS = tuple(
    replace(BASE, method="qlora", targets="all", init=i, r=r)
    for i in ("zero", "pissa", "loftq")
    for r in (4, 32)
)

LONGER = 4
"""How many times longer the budget of a study's check at a larger budget is."""


def _longer(name: str, after: str, arms: Sequence[RunConfig]) -> Study:
    """Study ``after``'s tuned ``arms`` again on :data:`SEEDS` at :data:`LONGER` times the
    steps, at the same tuned rate and the same schedule stretched over the longer run:
    whether a conclusion about capacity survives a budget at which the runs have levelled
    off further."""

    def stage(rows: Rows) -> list[RunConfig]:
        return [
            replace(
                arm,
                lr=tuned_lr(rows, arm),
                steps=LONGER * arm.steps,
                eval_every=LONGER * arm.eval_every,
                seed=s,
            )
            for arm in arms
            for s in SEEDS
        ]

    longer = tuple(
        replace(a, steps=LONGER * a.steps, eval_every=LONGER * a.eval_every)
        for a in arms
    )
    return Study(
        name,
        f"the tuned arms of {after!r} at {LONGER} × the steps, three seeds",
        longer,
        (stage,),
        after=after,
    )


_LONGER_STUDIES = (
    _longer("rank-lr-long", "rank-lr", [a for a in _RANK_ARMS if not a.rslora]),
    _longer("placement-long", "placement", _PLACEMENT_ARMS),
    _longer("full-long", "full", (_FULL,)),
    _longer(
        "small-data-long",
        "small-data",
        (replace(BASE, train_bytes=4096), replace(_FULL, train_bytes=4096)),
    ),
)

# The variants of the chapter *LoRA variants* (book/chapters/variants.md).
_VARIANTS = (
    _tuned_study(
        "dora",
        "DoRA against LoRA (W_q, W_v, r = 8) and full finetuning, each at its own tuned "
        "learning rate, three seeds, with the DoRA paper's magnitude and direction changes "
        "along training",
        _DORA_ARMS,
        [4e-3, 4e-3, 2.5e-4],
    ),
    _tuned_study(
        "loraplus",
        "LoRA+ (B's learning rate λ times A's) for λ = 1, 4, 16, each λ at its own tuned "
        "learning rate, three seeds",
        _LORAPLUS_ARMS,
        [4e-3, 2e-3, 1e-3],
    ),
    Study(
        "optim8",
        "8-bit against 32-bit optimizer states (paged AdamW), for LoRA on every linear "
        "layer at r = 32 and for full finetuning, at the learning rate tuned with 32-bit "
        "states, three seeds, paired",
        tuple(OPTIM8.values()),
        (
            tune(tuple(OPTIM8.values()), [_nearest(2e-3), _nearest(2.5e-4)]),
            lambda rows: [
                replace(arm, lr=tuned_lr(rows, arm), optim_bits=bits, seed=seed)
                for arm in OPTIM8.values()
                for bits in (32, 8)
                for seed in SEEDS
            ],
        ),
    ),
    _tuned_study(
        "init",
        "QLoRA's adapters started at B = 0, with PiSSA and with LoftQ, on every linear "
        "layer at r = 4 and r = 32, each at its own tuned learning rate, three seeds",
        _INIT_ARMS,
        [2e-3] * len(_INIT_ARMS),
    ),
)

RANK_ALPHA = tuple(s.name for s in _STUDIES)
"""The studies of the chapter *LoRA rank and alpha*."""

LONGER_CHECKS = tuple(s.name for s in _LONGER_STUDIES)
"""The capacity studies' checks at :data:`LONGER` times the budget."""

VARIANTS = tuple(s.name for s in _VARIANTS)
"""The studies of the chapter *LoRA variants*."""


def names() -> list[str]:
    """The studies' names."""
    return [*RANK_ALPHA, *LONGER_CHECKS, *VARIANTS]


def get(name: str) -> Study:
    """The study called ``name`` (``ValueError`` listing the names otherwise)."""
    for study in (*_STUDIES, *_LONGER_STUDIES, *_VARIANTS):
        if study.name == name:
            return study
    raise ValueError(f"study must be one of {names()}, got {name!r}")
