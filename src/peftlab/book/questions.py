"""The ten questions of the appendix *Questions people ask* (book/chapters/questions.md),
in the page's order, each with the check that measures its answer with the installed
libraries (:mod:`peftlab.book.memory_questions`, :mod:`peftlab.book.training_questions`).

The page calls each check and turns its :class:`peftlab.book.answers.Answer` into a
``claim``, so the build fails when an answer stops being true;
``python -m peftlab.book.faq_check`` runs :func:`run_all` under other installed versions of
PEFT and bitsandbytes and prints which answers changed. One source of truth for both.
"""

from __future__ import annotations

from typing import Callable

from peftlab.book.answers import Answer
from peftlab.book.memory_questions import (
    q1_memory_not_covered,
    q2_bytes_per_parameter,
    q5_paged_optimizer,
    q6_bnb_on_cpu,
    q7_sharded_bytes_as_floats,
)
from peftlab.book.training_questions import (
    q3_merge_into_4bit,
    q4_dora_overhead,
    q8_gradient_checkpointing,
    q9_alpha_and_rank,
    q10_pissa_start,
)

__all__ = ["QUESTIONS", "run_all"]


QUESTIONS: tuple[Callable[[], Answer], ...] = (
    q1_memory_not_covered,
    q2_bytes_per_parameter,
    q3_merge_into_4bit,
    q4_dora_overhead,
    q5_paged_optimizer,
    q6_bnb_on_cpu,
    q7_sharded_bytes_as_floats,
    q8_gradient_checkpointing,
    q9_alpha_and_rank,
    q10_pissa_start,
)
"""Every question's check, in the page's order."""


def run_all(numbers: list[int] | None = None) -> list[Answer]:
    """Run the checks (all, or those whose question ``numbers`` are given), in order."""
    chosen = QUESTIONS if numbers is None else [QUESTIONS[n - 1] for n in numbers]
    return [check() for check in chosen]
