"""Claims: a measured number set beside a paper's or a library's, asserted by the build.

A chapter calls :func:`claim` wherever it compares itself with a source. The call glues
both numbers for the prose, fails the cell (and so the build) when the comparison breaks,
and records the result for the *Claims checked* page (book/reference/claims.md).
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import asdict, dataclass
from typing import Any, Callable

from peftlab.checks import stable_name
from peftlab.book.runtime import chapter_order, current_chapter, glue, output_dir

__all__ = [
    "Claim",
    "ClaimError",
    "RELATIONS",
    "claim",
    "claims_markdown",
    "format_number",
    "load_claims",
]


RELATIONS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}


class ClaimError(AssertionError):
    """A measured value does not bear out the claim it was compared with."""


@dataclass(frozen=True)
class Claim:
    """One checked comparison, as the Claims page lists it."""

    key: str
    what: str
    source: str
    measured: float
    expected: float
    relation: str
    tolerance: str
    passed: bool
    chapter: str | None
    measured_text: str
    expected_text: str


def _number(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        and not hasattr(value, "item")
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value.item() if hasattr(value, "item") else value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _glued(value: Any) -> int | float:
    """The number as the prose gets it: an integer (a Python int, or an integer tensor or
    NumPy scalar) stays an int, so ``{glue:text}`key``` reads "0", not "0.0"."""
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, int) else float(value)


def format_number(x: float) -> str:
    """Whole numbers and numbers from 1,000 up in full with thousands separators
    (6,738,415,616, 9,250);
    others to 4 significant digits."""
    if x == int(x) and abs(x) < 1e16:
        return f"{int(x):,}"
    if abs(x) >= 1e3:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def claim(
    key: str,
    measured: Any,
    expected: Any,
    *,
    relation: str = "approx",
    rel: float | None = None,
    abs: float | None = None,  # noqa: A002 - mirrors math.isclose
    source: str,
    what: str,
    fmt: str | None = None,
) -> None:
    """Check ``measured`` against ``expected`` and glue both (``key``,
    ``key-expected``).

    ``relation="approx"`` passes when
    ``|measured - expected| <= max(rel * |expected|, abs)``; the other relations compare
    ``measured <relation> expected`` (e.g. ``"<"`` for "below 48 GB"). ``source`` cites
    where ``expected`` comes from ("QLoRA §3"), ``what`` says it in words; ``fmt`` (e.g.
    ``"{:.3f}"``) sets how the Claims page prints both numbers, default
    :func:`format_number`. Raises :class:`ClaimError` when the claim fails, after
    recording it. Returns None, so a cell that ends with a claim shows
    nothing; the prose shows the glued numbers.
    """
    stable_name(key, "key")
    for name, text in (("source", source), ("what", what)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must be a non-empty str")
    m, e = _number("measured", measured), _number("expected", expected)
    if relation == "approx":
        if rel is None and abs is None:
            raise ValueError(
                "relation='approx' needs a tolerance: rel=..., abs=... or both"
            )
        bound = max((rel or 0.0) * math.fabs(e), abs or 0.0)
        passed = math.fabs(m - e) <= bound
        parts = ([f"{rel:.3g} relative"] if rel is not None else []) + (
            [f"{abs:.3g} absolute"] if abs is not None else []
        )
        tolerance = "within " + " or ".join(parts)
    elif relation in RELATIONS:
        if rel is not None or abs is not None:
            raise ValueError(
                f"rel/abs only apply to relation='approx', not {relation!r}"
            )
        passed = RELATIONS[relation](m, e)
        tolerance = f"measured {relation} expected"
    else:
        raise ValueError(
            f"relation must be 'approx' or one of {sorted(RELATIONS)}, got {relation!r}"
        )
    record = Claim(
        key=key,
        what=what.strip(),
        source=source.strip(),
        measured=m,
        expected=e,
        relation=relation,
        tolerance=tolerance,
        passed=passed,
        chapter=current_chapter(),
        measured_text=fmt.format(m) if fmt else format_number(m),
        expected_text=fmt.format(e) if fmt else format_number(e),
    )
    path = output_dir("claims") / f"{key}.json"
    path.write_text(json.dumps(asdict(record), indent=1, sort_keys=True))
    glue(key, _glued(measured))
    glue(f"{key}-expected", _glued(expected))
    if not passed:
        raise ClaimError(
            f"claim {key!r} failed: {what} — measured {record.measured_text}, "
            f"{source} says {record.expected_text} ({tolerance})"
        )


def load_claims() -> list[Claim]:
    """Every claim recorded by this build, chapters in the book's order (``_toc.yml``),
    then by key."""
    records = [
        Claim(**json.loads(p.read_text())) for p in output_dir("claims").glob("*.json")
    ]
    order = {name: i for i, name in enumerate(chapter_order())}
    return sorted(
        records,
        key=lambda c: (order.get(c.chapter, len(order)), c.chapter or "", c.key),
    )


def claims_markdown() -> str:
    """The Claims page (MyST): per chapter, every claim with both numbers, the tolerance
    and the verdict."""
    claims = load_claims()
    if not claims:
        return "*No claims were recorded by this build.*"
    held = sum(c.passed for c in claims)
    out = [f"This build checked **{len(claims)}** claims; **{held}** held."]
    chapter: object = ()
    for c in claims:
        if c.chapter != chapter:
            chapter = c.chapter
            title = (
                f"{{doc}}`/book/chapters/{c.chapter}`"
                if c.chapter
                else "Outside a chapter"
            )
            out += [
                "",
                f"**{title}**",
                "",
                "| Claim | Source | Ours | Source's | Tolerance | Holds |",
                "|---|---|---|---|---|---|",
            ]
        cells = [
            c.what,
            c.source,
            c.measured_text,
            c.expected_text,
            c.tolerance,
            "✓" if c.passed else "✗",
        ]
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(out)
