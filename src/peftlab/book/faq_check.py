"""Re-check the answers of *Questions people ask* (book/chapters/questions.md) here,
and under other installed versions of PEFT and bitsandbytes, and print which answers
changed.

    python -m peftlab.book.faq_check                      # this environment
    python -m peftlab.book.faq_check --only 3 9           # some questions
    python -m peftlab.book.faq_check --python /venvs/peft-0.14/bin/python
    python -m peftlab.book.faq_check --save answers.json  # keep this run
    python -m peftlab.book.faq_check --baseline answers.json

Each question's check is listed by :mod:`peftlab.book.questions`, the same one the
chapter's cell calls, so the command and the book cannot disagree about what is checked.
``--python`` runs the checks with another interpreter (another virtual environment with
other versions of the libraries installed), importing this checkout's package, and sets
its answers beside this environment's; ``--baseline`` does the same with a saved run.
An answer *changed* when it holds in one and not in the other (or its check fails to
run); a measured value that moved by more than ``--moved`` (relative) is marked too.
The exit status is 1 when an answer does not hold in some environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Result", "compare", "environment", "main", "results_markdown", "run_checks"]

LIBRARIES = ("torch", "bitsandbytes", "peft", "transformers")


@dataclass(frozen=True)
class Result:
    """One question's outcome in one environment (``error`` when the check raised)."""

    number: int
    question: str
    expected: str
    measured: float | None
    holds: bool
    error: str | None = None

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "Result":
        return cls(**{k: row.get(k) for k in cls.__dataclass_fields__})


def environment() -> dict[str, str]:
    """Python and library versions of this interpreter (``"-"`` where missing)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def run_checks(numbers: Sequence[int] | None = None) -> list[Result]:
    """Run the questions' checks here; a check that raises is a result that does not
    hold, with the error, so that an API a library removed shows up as a changed
    answer."""
    import warnings

    from peftlab.book import questions

    chosen = range(1, len(questions.QUESTIONS) + 1) if not numbers else numbers
    out = []
    for n in chosen:
        check = questions.QUESTIONS[n - 1]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = check()
            out.append(Result(n, a.question, a.expectation, float(a.measured), a.holds))
        except Exception as err:  # noqa: BLE001 - any failure is an answer that changed
            doc = (check.__doc__ or check.__name__).split("\n")[0]
            out.append(Result(n, doc, "-", None, False, f"{type(err).__name__}: {err}"))
    return out


def _measured(r: Result) -> str:
    return "error" if r.measured is None else f"{r.measured:.4g}"


def results_markdown(results: Sequence[Result]) -> str:
    """The table the command prints: question, expected, measured, holds."""
    lines = ["| # | question | expected | measured | holds |", "|---|---|---|---|---|"]
    for r in results:
        holds = (
            "yes"
            if r.holds
            else ("ERROR: " + (r.error or "")[:60] if r.error else "NO")
        )
        lines.append(
            f"| {r.number} | {r.question} | {r.expected} | {_measured(r)} | {holds} |"
        )
    return "\n".join(lines)


def compare(
    here: Sequence[Result], there: Sequence[Result], moved: float = 0.05
) -> list[tuple[int, str, str, str, str]]:
    """Questions whose answer differs between two runs: ``(number, question, here,
    there, what changed)``, where what changed is ``"answer"`` (holds in one run only)
    or ``"value"`` (both hold, the measured value moved by more than ``moved``
    relative)."""
    by_number = {r.number: r for r in there}
    out = []
    for a in here:
        b = by_number.get(a.number)
        if b is None:
            continue
        if a.holds != b.holds or (a.error is None) != (b.error is None):
            change = "answer"
        elif (
            a.measured is not None
            and b.measured is not None
            and abs(a.measured - b.measured) > moved * max(abs(a.measured), 1e-12)
        ):
            change = "value"
        else:
            continue
        out.append((a.number, a.question, _measured(a), _measured(b), change))
    return out


def _other_interpreter(python: str, numbers: Sequence[int] | None) -> dict[str, Any]:
    """Run the checks under ``python``, this checkout's package first on its path."""
    src = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [src, *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    command = [python, "-m", "peftlab.book.faq_check", "--json"]
    if numbers:
        command += ["--only", *map(str, numbers)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"{python} could not run the checks:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _record(results: Sequence[Result]) -> dict[str, Any]:
    return {"environment": environment(), "results": [r.__dict__ for r in results]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        type=int,
        nargs="+",
        metavar="N",
        help="question numbers to check (default: all)",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="PATH",
        help="another interpreter to re-check under (repeatable)",
    )
    parser.add_argument(
        "--baseline", type=Path, help="a run saved with --save to compare with"
    )
    parser.add_argument(
        "--save", type=Path, help="write this run (JSON) for a later --baseline"
    )
    parser.add_argument(
        "--json", action="store_true", help="print this run as JSON only"
    )
    parser.add_argument(
        "--moved",
        type=float,
        default=0.05,
        help="relative change of a measured value that is reported",
    )
    args = parser.parse_args(argv)
    from peftlab.book import questions

    known = range(1, len(questions.QUESTIONS) + 1)
    if args.only and any(n not in known for n in args.only):
        parser.error(f"--only takes question numbers {known.start}-{known.stop - 1}")
    if args.json:
        # stdout carries the JSON alone: what the libraries print goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            here = run_checks(args.only)
    else:
        here = run_checks(args.only)
    record = _record(here)
    if args.save:
        args.save.write_text(json.dumps(record, indent=1) + "\n")
    if args.json:
        print(json.dumps(record))
        return 0 if all(r.holds for r in here) else 1
    others: list[tuple[str, dict[str, Any]]] = []
    if args.baseline:
        others.append(
            (f"baseline {args.baseline}", json.loads(args.baseline.read_text()))
        )
    for python in args.python:
        others.append((python, _other_interpreter(python, args.only)))
    versions = ", ".join(f"{k} {v}" for k, v in record["environment"].items())
    print(f"This environment ({versions}):\n")
    print(results_markdown(here))
    ok = all(r.holds for r in here)
    for name, other in others:
        results = [Result.from_json(row) for row in other["results"]]
        ok = ok and all(r.holds for r in results)
        versions = ", ".join(f"{k} {v}" for k, v in other["environment"].items())
        print(f"\n{name} ({versions}):\n")
        print(results_markdown(results))
        changes = compare(here, results, args.moved)
        print(f"\nChanged against this environment: {len(changes)}")
        if changes:
            print("\n| # | question | measured here | measured there | changed |")
            print("|---|---|---|---|---|")
            for n, q, a, b, change in changes:
                print(f"| {n} | {q} | {a} | {b} | {change} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
