"""Finetuning studies too long for the book's build: run once by a command, stored with
their provenance, and re-checked by every build on a sample that must reproduce.

Explained in the chapter *LoRA rank and alpha* (book/chapters/rank_alpha.md).

The book builds in a few minutes on two CPU cores; conclusions about rank, α and learning
rate need hundreds of runs, each long enough to flatten, over several seeds. So a study
(:mod:`peftlab.harness.studies`) is run once::

    python -m peftlab.harness.recorded run rank-lr --workers 2

which writes ``peftlab/data/runs/<study>.json``: every row of
:func:`peftlab.harness.experiments.finetune` (settings, losses, curves), with the command,
versions, checkpoint hash, thread count, machine and wall time. Chapters read the rows
with :func:`load_study`. Every build then calls :func:`verify`, which re-runs a few rows,
chosen deterministically, up to their first recorded curve point and fails unless the
losses come out the same: exactly when torch and the CPU's instruction set match the
record (each run uses one thread, so its arithmetic is deterministic), else within
:data:`CROSS_MACHINE_TOLERANCE`.

Note: a run's batches come from its own seeded generator and its learning-rate schedule is
a function of the step and the run's length, so a run stopped after ``k`` of its steps
(``finetune(..., stop_after=k)``) repeats exactly the first ``k`` steps of the recorded
one: a short re-run checks a long one.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from peftlab.devices import torch_threads
from peftlab.files import atomic_write_all
from peftlab.harness import experiments, studies
from peftlab.harness.config import RunConfig, cache_key, checkpoint_digest
from peftlab.harness.results import RunResult

RUNS_DIR = Path(__file__).resolve().parents[1] / "data" / "runs"
"""Where recorded studies live: package data, so the rows travel with the package."""

CACHE_DIR = Path(".peftlab-cache") / "runs"
"""Where :func:`run_study` keeps each run as it finishes (relative to the current folder):
outside the package, and reused when a study is run again."""

CROSS_MACHINE_TOLERANCE = 1e-3
"""nats/byte a re-run may differ from its record when torch's version or the CPU's
instruction set differs from the recording machine's: float32 kernels then round
differently, and a few dozen steps of training carry the difference forward. Measured:
eight runs recorded with AVX-512 kernels and re-run with AVX2 ones (torch 2.13.0, 75 steps)
differed by at most 1.7e-4, so the margin is about 6x."""


def _provenance(study: str, argv: Sequence[str], workers: int, seconds: float) -> dict:
    import peftlab

    return {
        "command": "python -m peftlab.harness.recorded " + " ".join(argv),
        "peftlab": peftlab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "checkpoint_sha256": checkpoint_digest(),
        "threads_per_run": 1,
        "workers": workers,
        "wall_seconds": round(seconds, 1),
        "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
        "study": study,
    }


def _run_one(config: RunConfig, cache_dir: str) -> RunResult:
    with torch_threads(1):  # deterministic arithmetic, and one run per core
        return experiments.finetune(config, cache_dir, progress=False)


@dataclass(frozen=True)
class RecordedStudy:
    """A recorded study as a chapter reads it: its runs and where they came from."""

    name: str
    description: str
    provenance: Mapping[str, Any]
    runs: tuple[RunResult, ...]

    def same_machine(self) -> bool:
        """Whether this machine's torch, CPU instruction set and checkpoint match the
        recording's, so that a re-run must reproduce it exactly."""
        return (
            self.provenance["torch"] == torch.__version__
            and self.provenance["cpu_capability"]
            == torch.backends.cpu.get_cpu_capability()
            and self.provenance["checkpoint_sha256"] == checkpoint_digest()
        )


def run_study(
    name: str,
    workers: int = 1,
    cache_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = RUNS_DIR,
    argv: Sequence[str] = (),
) -> Path:
    """Run every stage of study ``name`` and write ``<out_dir>/<name>.json``; return its
    path.

    Runs go to ``workers`` processes of one thread each and are cached in ``cache_dir``
    (default :data:`CACHE_DIR` under the current folder), so an interrupted study resumes
    where it stopped. The file is written once, at the end, atomically.
    """
    study = studies.get(name)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    out_dir = Path(out_dir)
    cache = str(Path(cache_dir) if cache_dir is not None else CACHE_DIR)
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from tqdm.auto import tqdm

    start = time.perf_counter()
    rows: list[RunResult] = []
    # the runs of the study this one follows: seen by the stages, not stored again
    before = list(load_study(study.after, out_dir).runs) if study.after else []
    # one worker runs in this process; more run in fresh ones ("spawn": no forked torch)
    pool = (
        None
        if workers == 1
        else ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")
        )
    )
    try:
        for index, stage in enumerate(study.stages):
            desc = f"{name} stage {index + 1}/{len(study.stages)}"
            # a stage is asked again after its runs finish, until it wants nothing new
            # (tuning widens its grid this way); a run asked for twice is stored once
            while True:
                seen = {run.key for run in rows}
                configs, keys = [], set()
                for config in stage(before + rows):
                    key = cache_key(config)
                    if key not in seen and key not in keys:
                        configs.append(config)
                        keys.add(key)
                if not configs:
                    break
                if pool is None:
                    results = (_run_one(c, cache) for c in configs)
                else:
                    results = (
                        f.result()
                        for f in [pool.submit(_run_one, c, cache) for c in configs]
                    )
                rows += list(tqdm(results, desc=desc, total=len(configs)))
    finally:
        if pool is not None:
            pool.shutdown()
    record = {
        "provenance": _provenance(name, argv, workers, time.perf_counter() - start),
        "description": study.description,
        "rows": [replace(run, cached=False).to_json() for run in rows],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, sort_keys=True, allow_nan=False) + "\n"
    writers = {out_dir / f"{name}.json": lambda tmp: Path(tmp).write_text(text)}
    kept = study.keep_adapters(rows)
    if kept:
        from safetensors.torch import save_file

        tensors = {
            f"{run.key}/{param}": value
            for run in kept
            for param, value in experiments.load_run_adapter(run, cache).items()
        }
        writers[out_dir / f"{name}.adapters.safetensors"] = lambda tmp: save_file(
            tensors, tmp
        )
    atomic_write_all(writers)
    return out_dir / f"{name}.json"


def load_study_adapter(
    name: str, run: RunResult, folder: str | os.PathLike = RUNS_DIR
) -> dict[str, torch.Tensor]:
    """The trained ``lora_A``/``lora_B`` of a recorded row whose adapter the study kept
    (``Study.keep_adapters``), by parameter name."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.adapters.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"study {name!r} kept no adapters ({path} not found)")
    prefix = f"{run.key}/"
    found = {
        k[len(prefix) :]: v
        for k, v in load_file(str(path)).items()
        if k.startswith(prefix)
    }
    if not found:
        raise ValueError(f"study {name!r} kept no adapter for run {run.key}")
    return found


def load_study(name: str, folder: str | os.PathLike = RUNS_DIR) -> RecordedStudy:
    """Recorded study ``name``: its runs (:class:`peftlab.harness.results.RunResult`) and
    provenance.

    A missing file raises ``FileNotFoundError`` saying which command records it.
    """
    studies.get(name)
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"study {name!r} is not recorded at {path}; record it with "
            f"'python -m peftlab.harness.recorded run {name}'"
        )
    record = json.loads(path.read_text())
    return RecordedStudy(
        name,
        record["description"],
        record["provenance"],
        tuple(RunResult.from_json(row) for row in record["rows"]),
    )


def sample_runs(runs: Sequence[RunResult], n: int) -> list[RunResult]:
    """``n`` runs spread evenly over the runs sorted by cache key: a deterministic sample
    that every build draws the same way. Diverged runs are skipped."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    ordered = sorted((r for r in runs if not r.diverged), key=lambda r: r.key)
    if not ordered:
        raise ValueError("no finite runs to sample")
    step = len(ordered) / min(n, len(ordered))
    return [ordered[int(i * step)] for i in range(min(n, len(ordered)))]


@dataclass(frozen=True)
class Check:
    """One re-run of a recorded run's first steps: the held-out loss recorded at ``step``,
    the loss the re-run measured there, and the tolerance that applied (0.0: exact)."""

    study: str
    key: str
    step: int
    recorded: float
    rerun: float
    tolerance: float

    @property
    def difference(self) -> float:
        return abs(self.rerun - self.recorded)


def verify(
    names: str | Sequence[str], sample: int = 3, folder: str | os.PathLike = RUNS_DIR
) -> list[Check]:
    """Re-run ``sample`` runs drawn from the recorded studies ``names`` (one name or
    several) up to their first curve point after step 0; raise ``AssertionError`` unless
    each reproduces its recorded held-out loss there (exactly on the recording machine's
    torch and CPU, else within :data:`CROSS_MACHINE_TOLERANCE`)."""
    names = [names] if isinstance(names, str) else list(names)
    pool: list[tuple[str, RunResult]] = []
    tolerance = {}
    for name in names:
        study = load_study(name, folder)
        tolerance[name] = 0.0 if study.same_machine() else CROSS_MACHINE_TOLERANCE
        pool += [(name, run) for run in study.runs]
    study_of = {run.key: name for name, run in pool}
    checks = []
    with torch_threads(1):
        for run in sample_runs([run for _, run in pool], sample):
            point = run.curve[1]
            config = replace(run.config, measure_memory=False)
            again = experiments.finetune(config, progress=False, stop_after=point.step)
            check = Check(
                study_of[run.key],
                run.key,
                point.step,
                point.held_out,
                again.held_out_loss,
                tolerance[study_of[run.key]],
            )
            checks.append(check)
            if not check.difference <= check.tolerance:
                raise AssertionError(
                    f"study {check.study!r}: run {run.key} gave "
                    f"held-out loss {check.rerun!r} at step {check.step}, "
                    f"recorded {check.recorded!r} (tolerance {check.tolerance}); "
                    "re-record the study if the training loop changed on purpose"
                )
    return checks


def main(argv: list[str] | None = None) -> None:
    """Command line: ``run NAME [--workers N]``, ``verify NAME [--sample N]``, ``list``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m peftlab.harness.recorded",
        description="Record the book's long finetuning studies, or re-check them.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run a study and write its results file")
    run.add_argument("study", choices=studies.names())
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--out", default=str(RUNS_DIR), help="folder for <study>.json")
    run.add_argument("--cache", default=str(CACHE_DIR), help="folder for finished runs")
    check = sub.add_parser("verify", help="re-run a sample of a recorded study")
    check.add_argument("study", nargs="+", choices=studies.names())
    check.add_argument("--sample", type=int, default=3)
    sub.add_parser("list", help="the studies and how many runs each has recorded")
    args = parser.parse_args(argv)
    if args.action == "run":
        path = run_study(args.study, args.workers, args.cache, args.out, argv=argv)
        print(f"wrote {path}")
    elif args.action == "verify":
        for c in verify(args.study, args.sample):
            print(json.dumps({**asdict(c), "difference": c.difference}))
    else:
        for name in studies.names():
            try:
                study = load_study(name)
                state = f"{len(study.runs)} runs recorded {study.provenance['date']}"
            except FileNotFoundError:
                state = "not recorded"
            print(f"{name}: {state} - {studies.get(name).description}")


if __name__ == "__main__":
    main()
