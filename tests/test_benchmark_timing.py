"""benchmarks/_timing.py: the one timer and report every benchmark uses (CUDA mocked: these run on a CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def timing():
    spec = importlib.util.spec_from_file_location("_timing", ROOT / "benchmarks" / "_timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sync_waits_for_cuda_devices_only(timing, sync_log):
    timing.sync(None)
    timing.sync(torch.device("cpu"))
    assert sync_log == []
    timing.sync(torch.device("cuda", 1))
    assert sync_log == [("sync", torch.device("cuda", 1))]


def test_alternate_all_times_each_call_between_synchronizations_reversing_the_order_every_round(timing, sync_log,
                                                                                                monkeypatch):
    from peftlab import devices  # the benchmarks' timer is the package's one timer

    ticks = iter(range(1000))
    monkeypatch.setattr(devices.time, "perf_counter", lambda: next(ticks))
    fns = {name: (lambda name=name: sync_log.append(("call", name))) for name in ("a", "b", "c")}
    medians = timing.alternate_all(fns, repeats=2, device=torch.device("cuda", 0), warmup=1)
    calls = [name for kind, name in sync_log if kind == "call"]
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] + ["c", "b", "a"]  # warm-up, then rounds alternating
    timed = sync_log[3:]
    assert timed == [x for name in ("a", "b", "c", "c", "b", "a")
                     for x in (("sync", torch.device("cuda", 0)), ("call", name), ("sync", torch.device("cuda", 0)))]
    assert medians == {"a": 1, "b": 1, "c": 1}  # each call read the clock twice, one tick apart
    with pytest.raises(ValueError, match="repeats"):
        timing.alternate_all(fns, repeats=0)


def test_alternate_is_alternate_all_of_ours_and_the_reference(timing, sync_log):
    ours, reference = timing.alternate(lambda: sync_log.append("ours"), lambda: sync_log.append("reference"),
                                       repeats=3, warmup=0)
    assert sync_log == ["ours", "reference", "reference", "ours", "ours", "reference"]
    assert ours >= 0 and reference >= 0


def test_report_judges_against_the_target_or_prints_the_ratio_alone(timing, capsys):
    targets = {"fast": 1.05, "contrast": None}
    assert timing.report("fast", 0.010, 0.010, targets) == pytest.approx(1.0)
    assert timing.report("fast", 0.011, 0.010, targets) == pytest.approx(1.1)
    timing.report("contrast", 0.030, 0.010, targets)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("ours / reference = 1.00 (target <= 1.05: PASS)")
    assert lines[1].endswith("ours / reference = 1.10 (target <= 1.05: MISS)")
    assert lines[2] == "contrast: ours 30.00 ms, reference 10.00 ms, ours / reference = 3.00 (no target: for contrast)"
    with pytest.raises(KeyError):
        timing.report("misspelt", 1.0, 1.0, targets)  # a comparison without a target entry is not judged silently
