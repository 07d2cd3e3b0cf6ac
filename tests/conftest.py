"""Fixtures and hooks shared by the test modules (bitsandbytes references: tests/_reference.py)."""

from __future__ import annotations

import os

import pytest
import torch

CUDA_SKIP_REASON = "needs a CUDA GPU: run bash scripts/gpu-check.sh on a machine with one"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker its share of the cores as torch threads, and
    the same to the kernels and processes the tests start. Two workers of two threads each
    on two cores oversubscribe them, and OpenMP's waiting threads then make a small SVD a
    hundred times slower (9 ms against 1 s measured)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``cuda`` where no CUDA device is visible (``pytest -m cuda`` still selects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def book(tmp_path, monkeypatch):
    """A throwaway book root (the current folder), so records, claims and figures land in tmp_path; the
    chapter "demo" started with seed 3; neither a record folder nor a book build set in the environment."""
    from peftlab.book import records, runtime

    (tmp_path / "_config.yml").write_text("title: t\n")
    (tmp_path / "_toc.yml").write_text("root: intro\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(records.RECORD_DIR_ENV, raising=False)
    monkeypatch.delenv(runtime.BOOK_BUILD_ENV, raising=False)
    runtime.start_chapter("demo", seed=3)
    return tmp_path


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(capability, name)``: pretend torch sees a CUDA GPU of that compute capability (None: no GPU),
    one whose ``is_bf16_supported()`` says True whatever its capability (as a T4's does)."""

    def pretend(capability: tuple[int, int] | None, name: str = "Fake GPU") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return pretend


@pytest.fixture
def sync_log(monkeypatch):
    """Replace torch.cuda.synchronize by a recorder: ("sync", device) for each call, in order."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", device)))
    return calls


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices: one thread is as fast, and does not collapse when the machine is oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
