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
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from peftlab.files import atomic_write_all
from peftlab.harness import experiments, studies

RUNS_DIR = Path(__file__).resolve().parents[1] / "data" / "runs"
"""Where recorded studies live: package data, so the rows travel with the package."""

CACHE_DIR = Path(".peftlab-cache") / "runs"
"""Where :func:`run_study` keeps each run as it finishes (relative to the current folder):
outside the package, and reused when a study is run again."""

CROSS_MACHINE_TOLERANCE = 1e-3
"""nats/byte a re-run may differ from its record when torch's version or the CPU's
instruction set differs from the recording machine's: float32 kernels then round
differently, and a few dozen steps of training carry the difference forward."""


def _provenance(study: str, argv: Sequence[str], workers: int, seconds: float) -> dict:
    import peftlab

    return {
        "command": "python -m peftlab.harness.recorded " + " ".join(argv),
        "peftlab": peftlab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "checkpoint_sha256": experiments.checkpoint_digest(),
        "threads_per_run": 1,
        "workers": workers,
        "wall_seconds": round(seconds, 1),
        "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
        "study": study,
    }


def _finite(value: Any) -> Any:
    """JSON without NaN: a diverged run's non-finite losses become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _stored_row(row: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in row.items() if k not in ("adapter", "memory", "cached")}
    keep["diverged"] = not math.isfinite(row["held_out_loss"])
    return _finite(keep)


def _run_one(config: experiments.RunConfig, cache_dir: str) -> dict[str, Any]:
    torch.set_num_threads(1)  # deterministic arithmetic, and one run per core
    return experiments.finetune(config, cache_dir, progress=False)


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
    rows: list[dict[str, Any]] = []
    # the rows of the study this one follows: seen by the stages, not stored again
    before = load_study(study.after, out_dir)[0] if study.after else []
    threads = torch.get_num_threads()
    # one worker runs in this process; more run in fresh ones ("spawn": no forked torch)
    pool = (
        None
        if workers == 1
        else ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    )
    try:
        for index, stage in enumerate(study.stages):
            desc = f"{name} stage {index + 1}/{len(study.stages)}"
            # a stage is asked again after its runs finish, until it wants nothing new
            # (tuning widens its grid this way); a run asked for twice is stored once
            while True:
                seen = {row["key"] for row in rows}
                configs, keys = [], set()
                for config in stage(before + rows):
                    key = experiments.cache_key(config)
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
                rows += [
                    _stored_row(r) for r in tqdm(results, desc=desc, total=len(configs))
                ]
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown()
    record = {
        "provenance": _provenance(name, argv, workers, time.perf_counter() - start),
        "description": study.description,
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, sort_keys=True, allow_nan=False) + "\n"
    writers = {out_dir / f"{name}.json": lambda tmp: Path(tmp).write_text(text)}
    kept = study.keep_adapters(rows)
    if kept:
        from safetensors.torch import save_file

        tensors = {
            f"{row['key']}/{param}": value
            for row in kept
            for param, value in experiments.load_run_adapter(row, cache).items()
        }
        writers[out_dir / f"{name}.adapters.safetensors"] = lambda tmp: save_file(
            tensors, tmp
        )
    atomic_write_all(writers)
    return out_dir / f"{name}.json"


def load_study_adapter(
    name: str, row: dict[str, Any], folder: str | os.PathLike = RUNS_DIR
) -> dict[str, torch.Tensor]:
    """The trained ``lora_A``/``lora_B`` of a recorded row whose adapter the study kept
    (``Study.keep_adapters``), by parameter name."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.adapters.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"study {name!r} kept no adapters ({path} not found)")
    prefix = f"{row['key']}/"
    found = {
        k[len(prefix) :]: v
        for k, v in load_file(str(path)).items()
        if k.startswith(prefix)
    }
    if not found:
        raise ValueError(f"study {name!r} kept no adapter for run {row['key']}")
    return found


def load_study(
    name: str, folder: str | os.PathLike = RUNS_DIR
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of recorded study ``name`` and its provenance.

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
    return record["rows"], record["provenance"]


def sample_rows(rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` rows spread evenly over the rows sorted by cache key: a deterministic sample
    that every build draws the same way. Diverged rows are skipped."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    ordered = sorted((r for r in rows if not r["diverged"]), key=lambda r: r["key"])
    if not ordered:
        raise ValueError("no finite rows to sample")
    step = len(ordered) / min(n, len(ordered))
    return [ordered[int(i * step)] for i in range(min(n, len(ordered)))]


def verify(
    names: str | Sequence[str], sample: int = 3, folder: str | os.PathLike = RUNS_DIR
) -> list[dict]:
    """Re-run ``sample`` rows drawn from the recorded studies ``names`` (one name or
    several) up to their first curve point; raise ``AssertionError`` unless each
    reproduces its recorded held-out loss there.

    Returns one dict per checked row: its study and key, the step, the recorded and
    re-run losses, their difference and the tolerance that applied (0.0: exact).
    """
    names = [names] if isinstance(names, str) else list(names)
    pool, tolerance = [], {}
    for name in names:
        rows, prov = load_study(name, folder)
        same_machine = (
            prov["torch"] == torch.__version__
            and prov["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
            and prov["checkpoint_sha256"] == experiments.checkpoint_digest()
        )
        tolerance[name] = 0.0 if same_machine else CROSS_MACHINE_TOLERANCE
        pool += [{**row, "study": name} for row in rows]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    checks = []
    try:
        for row in sample_rows(pool, sample):
            step, recorded = row["curve"][1][0], row["curve"][1][1]
            config = replace(experiments.config_of(row), measure_memory=False)
            again = experiments.finetune(config, progress=False, stop_after=step)[
                "held_out_loss"
            ]
            check = {
                "study": row["study"],
                "key": row["key"],
                "step": step,
                "recorded": recorded,
                "rerun": again,
                "difference": abs(again - recorded),
                "tolerance": tolerance[row["study"]],
            }
            checks.append(check)
            if not check["difference"] <= check["tolerance"]:
                raise AssertionError(
                    f"study {row['study']!r}: run {row['key']} gave held-out loss "
                    f"{again!r} at step {step}, recorded {recorded!r} (tolerance "
                    f"{check['tolerance']}); re-record the study if the training loop "
                    "changed on purpose"
                )
    finally:
        torch.set_num_threads(threads)
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
            print(json.dumps(c))
    else:
        for name in studies.names():
            try:
                rows, prov = load_study(name)
                state = f"{len(rows)} runs recorded {prov['date']}"
            except FileNotFoundError:
                state = "not recorded"
            print(f"{name}: {state} - {studies.get(name).description}")


if __name__ == "__main__":
    main()
