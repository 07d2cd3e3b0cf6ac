"""What a question of the appendix *Questions people ask* (book/chapters/questions.md)
gets back from its check: the measured number, what it is compared with, whether it holds,
and the table the page shows.

The checks themselves are in :mod:`peftlab.book.memory_questions` and
:mod:`peftlab.book.training_questions`; :mod:`peftlab.book.questions` lists them in the
page's order.
"""

from __future__ import annotations

from dataclasses import dataclass, field


from peftlab.book.claims import RELATIONS

__all__ = ["Answer", "answers_markdown"]


@dataclass(frozen=True)
class Answer:
    """One question's measured answer.

    ``measured`` is compared with ``expected`` by ``relation`` (one of
    :data:`peftlab.book.claims.RELATIONS`, or ``"approx"`` with ``tolerance`` relative);
    ``holds`` is the result. ``numbers`` are the values the page shows (glued by name),
    ``rows`` a small table of (what, value as text).
    """

    number: int
    key: str
    question: str
    short: str
    measured: float
    expected: float
    relation: str
    what: str
    source: str
    tolerance: float | None = None
    numbers: dict[str, float] = field(default_factory=dict)
    rows: tuple[tuple[str, str], ...] = ()

    @property
    def holds(self) -> bool:
        if self.relation == "approx":
            return abs(self.measured - self.expected) <= (self.tolerance or 0.0) * abs(
                self.expected
            )
        return RELATIONS[self.relation](self.measured, self.expected)

    @property
    def expectation(self) -> str:
        """The comparison in words, e.g. ``"> 0.5"`` or ``"≈ 8 (±1e-06 relative)"``."""
        if self.relation == "approx":
            return f"≈ {self.expected:.4g} (±{self.tolerance:.2g} relative)"
        return f"{self.relation} {self.expected:.4g}"

    def table(self) -> str:
        """The answer's rows as a Markdown table."""
        lines = ["| quantity | value |", "|---|---:|"]
        lines += [f"| {what} | {value} |" for what, value in self.rows]
        return "\n".join(lines)


def answers_markdown(answers: list[Answer]) -> str:
    """A table of answers: question, what is measured, expected, measured, holds."""
    lines = [
        "| # | question | what is measured | expected | measured | holds |",
        "|---|---|---|---|---|---|",
    ]
    for a in answers:
        lines.append(
            f"| {a.number} | {a.question} | {a.what} | {a.expectation} | "
            f"{a.measured:.4g} | {'yes' if a.holds else 'NO'} |"
        )
    return "\n".join(lines)
