"""Uncertainty over seeds: Student-t confidence intervals for a mean, a difference of two
means, and a paired difference, and the equivalence test built on them.

Explained in the chapters *LoRA rank and alpha* (book/chapters/rank_alpha.md) and *QLoRA
end to end* (book/chapters/qlora.md).

A handful of seeds gives a handful of numbers; a conclusion from them needs an interval,
not a mean. Plain Python (no SciPy): the t distribution's quantile comes from its CDF,
written with the regularised incomplete beta function, inverted by bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # fmt: skip
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        + a * math.log(x) + b * math.log1p(-x)
    )  # fmt: skip
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be positive, got {df!r}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on
    :func:`t_cdf`), e.g. ``t_quantile(0.975, 4) ≈ 2.776``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """An estimate and its two-sided confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float
    df: float = math.inf
    """The t distribution's degrees of freedom behind the interval."""

    @property
    def half_width(self) -> float:
        """Half the interval's width (the ± of "estimate ± half_width")."""
        return 0.5 * (self.high - self.low)

    def __str__(self) -> str:
        return f"{self.estimate:.4f} ± {self.half_width:.4f}"


def _values(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    if len(out) < 2:
        raise ValueError(
            f"{name} needs at least 2 values for an interval, got {len(out)}"
        )
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must hold finite numbers")
    return out


def _mean_var(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, sum((x - m) ** 2 for x in v) / (len(v) - 1)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` with its Student-t confidence interval."""
    v = _values(values, "values")
    m, var = _mean_var(v)
    half = t_quantile(0.5 + confidence / 2, len(v) - 1) * math.sqrt(var / len(v))
    return Interval(m, m - half, m + half, len(v), confidence, len(v) - 1)


def difference_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> Interval:
    """mean(a) − mean(b) with Welch's confidence interval (unequal variances)."""
    va, vb = _values(a, "a"), _values(b, "b")
    (ma, sa), (mb, sb) = _mean_var(va), _mean_var(vb)
    se2 = sa / len(va) + sb / len(vb)
    if se2 == 0:
        d = ma - mb
        return Interval(d, d, d, len(va) + len(vb), confidence, len(va) + len(vb) - 2)
    df = se2**2 / (
        (sa / len(va)) ** 2 / (len(va) - 1) + (sb / len(vb)) ** 2 / (len(vb) - 1)
    )
    half = t_quantile(0.5 + confidence / 2, df) * math.sqrt(se2)
    d = ma - mb
    return Interval(d, d - half, d + half, len(va) + len(vb), confidence, df)


def paired_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> Interval:
    """mean(a − b) over pairs (e.g. two methods run on the same seeds) with its interval."""
    va, vb = _values(a, "a"), _values(b, "b")
    if len(va) != len(vb):
        raise ValueError(f"a and b must pair up, got {len(va)} and {len(vb)} values")
    return mean_interval([x - y for x, y in zip(va, vb)], confidence)


def equivalent(interval: Interval, margin: float) -> bool:
    """Two one-sided tests at level (1 − confidence)/2 each: the difference lies within
    ``±margin`` when the whole interval does (use a 90 % interval for a 5 % test)."""
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    return -margin < interval.low and interval.high < margin


def detectable_difference(
    interval: Interval, power: float = 0.8, confidence: float = 0.95
) -> float:
    """The smallest true difference a comparison of this precision detects with
    probability ``power`` in a two-sided test at ``confidence``:
    ``(t_{(1+confidence)/2} + t_{power}) · SE``, the standard error read back from the
    interval (its half-width over its own t quantile), at the interval's degrees of
    freedom."""
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    df = interval.df
    if interval.half_width == 0:
        return 0.0
    se = interval.half_width / t_quantile(0.5 + interval.confidence / 2, df)
    return (t_quantile(0.5 + confidence / 2, df) + t_quantile(power, df)) * se


@dataclass(frozen=True)
class Comparison:
    """A difference between two methods over seeds, read three ways: its 95 % interval
    (is it different from zero?), its 90 % interval against an equivalence ``margin``
    fixed before the data (two one-sided tests at 5 %), and the smallest difference it
    could have detected (:func:`detectable_difference`, 80 % power)."""

    interval: Interval
    tost: Interval
    margin: float | None = None

    @property
    def estimate(self) -> float:
        return self.interval.estimate

    @property
    def half_width(self) -> float:
        return self.interval.half_width

    @property
    def detectable(self) -> float:
        return detectable_difference(self.interval)

    @property
    def different(self) -> bool:
        """Whether the 95 % interval excludes zero."""
        return self.interval.low > 0 or self.interval.high < 0

    @property
    def equivalent(self) -> bool:
        """Whether the 90 % interval lies inside ±margin (``False`` without a margin)."""
        return self.margin is not None and equivalent(self.tost, self.margin)

    def verdict(
        self, lower: str = "lower", higher: str = "higher", unit: str = "nats/byte"
    ) -> str:
        """The comparison in words, only as strong as its intervals:
        ``lower``/``higher`` where the 95 % interval excludes zero, "equivalent within
        ±margin" where the 90 % interval lies inside the margin, else "undetermined"
        (the interval is too wide to say; the caller shows its half-width beside the
        estimate)."""
        if self.different:
            word = lower if self.interval.high < 0 else higher
            if self.equivalent:
                return f"{word}, yet within the ±{self.margin:.3f} {unit} margin"
            return word
        if self.equivalent:
            return f"equivalent within ±{self.margin:.3f} {unit}"
        return "undetermined"


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    paired: bool,
    margin: float | None = None,
) -> Comparison:
    """mean(a) − mean(b) as a :class:`Comparison`: paired by position (the same seeds)
    or Welch's two-sample interval. ``margin``, if given, must have been fixed before the
    data were seen; the chapters state it, with its reason, before the result."""
    if margin is not None and not margin > 0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    interval = paired_interval if paired else difference_interval
    return Comparison(interval(a, b, 0.95), interval(a, b, 0.90), margin)
