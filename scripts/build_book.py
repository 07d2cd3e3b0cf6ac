"""Build the book: execute its chapters two at a time, then let Jupyter Book render them.

    python scripts/build_book.py            # what the README's build command runs

Jupyter Book 1.x executes a book's notebooks one after another, in one process; on a
two-core machine that leaves a core idle while each chapter runs. This script first
executes every chapter that Jupyter Book would execute from its cache (``execute_notebooks:
cache`` in ``_config.yml``), ``--jobs`` at a time, each kernel on one thread, and stores
each executed notebook in Jupyter Book's own execution cache (``_build/.jupyter_cache``,
jupyter-cache's format, keyed by the hash of the notebook's code cells). Then it runs
``jupyter-book build -W --keep-going .``, which finds every chapter in the cache and only
renders it. Pages that always execute in the build (``mystnb: execution_mode: force``: the
Figures, Claims and Status pages, which read what the chapters recorded) run there, after
the chapters, as before.

A chapter whose code did not change since the last build is not executed again (its hash
is already in the cache); ``rm -rf _build`` forces everything, as with ``jupyter-book``
alone. A chapter that fails stops the build with its traceback.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import yaml
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from myst_nb.core.read import read_myst_markdown_notebook
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"
KERNEL_LOGS = ROOT / "_build" / ".peftlab" / "kernel-logs"

#: The chapters that take longest to execute, slowest first (a clean build on two cores:
#: qlora about 80 s, variants 55 s, stack 35 s, testbed 35 s): started first.
SLOWEST = ("qlora", "variants", "stack", "testbed")

#: The start of the warning every ipykernel started over TCP prints (see :func:`main`).
TCP_WARNING = "Kernel is running over TCP without encryption"

#: Set for the chapters' kernels, as book/_ext/peftlab_build.py sets it in the build.
BOOK_BUILD_ENV = "PEFTLAB_BOOK_BUILD"


def toc_pages() -> list[Path]:
    """The book's pages (``.md`` files) in ``_toc.yml`` order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        files += [entry["file"] for entry in part.get("chapters", [])]
    return [ROOT / f"{f}.md" for f in files]


def read_page(path: Path) -> nbformat.NotebookNode:
    return read_myst_markdown_notebook(path.read_text(), path=path)


def executes_from_cache(nb: nbformat.NotebookNode, default_mode: str) -> bool:
    """Whether Jupyter Book would execute this page through its cache."""
    mode = nb.metadata.get("mystnb", {}).get("execution_mode", default_mode)
    has_code = any(c.cell_type == "code" and c.source.strip() for c in nb.cells)
    return mode == "cache" and has_code and "kernelspec" in nb.metadata


def execute(path: Path, timeout: int) -> tuple[Path, float, str | None]:
    """Execute one page in its own folder and store it in the cache (in a worker
    process: a kernel per page, on one thread). Returns the page, the seconds it took and
    the error, if any."""
    nb = read_page(path)
    timeout = int(nb.metadata.get("mystnb", {}).get("execution_timeout", timeout))
    os.environ[BOOK_BUILD_ENV] = "1"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    client = NotebookClient(
        nb,
        timeout=timeout,
        startup_timeout=300,  # two kernels start at once on a busy machine
        allow_errors=False,
        # no timestamps in the cells' metadata: the cache's key hashes that metadata, and
        # Jupyter Book looks the chapter up by the hash of the unexecuted notebook
        record_timing=False,
        kernel_name=nb.metadata["kernelspec"]["name"],
        resources={"metadata": {"path": str(path.parent)}},
    )
    log = KERNEL_LOGS / f"{path.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        # what the kernel process itself writes to stderr (not a cell's output) goes to a
        # log, echoed below without ipykernel's notice about local TCP
        with log.open("w") as stderr:
            client.execute(stderr=stderr)
        error = None
    except CellExecutionError as err:
        error = str(err)
    except Exception as err:  # a kernel that died or never started
        error = f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - start
    noise = [line for line in log.read_text().splitlines() if TCP_WARNING not in line]
    if noise:
        print(
            "\n".join(f"  [{path.stem} kernel] {line}" for line in noise),
            file=sys.stderr,
        )
    if error is not None:
        return path, seconds, error
    cache = get_cache(str(CACHE))
    cache.cache_notebook_bundle(
        CacheBundleIn(nb, str(path), data={"execution_seconds": seconds}),
        check_validity=False,
        overwrite=True,
    )
    return path, seconds, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="chapters at a time",
    )
    parser.add_argument(
        "--execute-only", action="store_true", help="fill the cache, do not render"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    execute_cfg = config.get("execute", {})
    default_mode = execute_cfg.get("execute_notebooks", "auto")
    timeout = int(execute_cfg.get("timeout", 30))
    cache = get_cache(str(CACHE))
    todo = []
    for path in toc_pages():
        nb = read_page(path)
        if not executes_from_cache(nb, "cache" if default_mode == "cache" else "off"):
            continue
        try:
            cache.match_cache_notebook(nb)
        except KeyError:
            todo.append(path)
    # the longest first, so that the queues end together: the chapters known to be slowest,
    # then the rest by size
    todo.sort(
        key=lambda p: (
            (0, SLOWEST.index(p.stem)) if p.stem in SLOWEST else (1, -p.stat().st_size)
        )
    )

    t0 = time.perf_counter()
    failed = []
    if todo:
        print(f"executing {len(todo)} chapters, {args.jobs} at a time", flush=True)
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(execute, p, timeout) for p in todo]
            for future in concurrent.futures.as_completed(futures):
                path, seconds, error = future.result()
                where = path.relative_to(ROOT)
                print(
                    f"  {where}: {seconds:.1f} s" + (" FAILED" if error else ""),
                    flush=True,
                )
                if error:
                    failed.append((where, error))
    print(f"chapters executed in {time.perf_counter() - t0:.0f} s", flush=True)
    for where, error in failed:
        print(f"\n{where} failed:\n{error}", file=sys.stderr)
    if failed:
        return 1
    if args.execute_only:
        return 0
    jb = Path(sys.executable).with_name("jupyter-book")
    # the pages the build still executes (Figures, Claims, Status) start kernels over TCP;
    # ipykernel's warning that their local traffic is unencrypted is noise, and dropped here
    build = subprocess.Popen(
        [str(jb), "build", "-W", "--keep-going", str(ROOT)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert build.stderr is not None
    for line in build.stderr:
        if TCP_WARNING not in line:
            sys.stderr.write(line)
    return build.wait()


if __name__ == "__main__":
    sys.exit(main())
