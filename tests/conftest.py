"""Fixtures and hooks shared by the test modules (bitsandbytes references: tests/_reference.py)."""

from __future__ import annotations

import pytest
import torch

CUDA_SKIP_REASON = "needs a CUDA GPU: run bash scripts/gpu-check.sh on a machine with one"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``cuda`` where no CUDA device is visible (``pytest -m cuda`` still selects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices: one thread is as fast, and does not collapse when the machine is oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
