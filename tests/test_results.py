"""Tests for peftlab.harness.results and the learning-rate schedule of peftlab.harness.config
(chapter: book/chapters/rank_alpha.md): a run's typed record survives JSON, and the schedule
warms up, decays to zero and ends where the run ends."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from peftlab.harness import config as C
from peftlab.harness import experiments as E
from peftlab.harness.results import CurvePoint, RunResult

TINY = C.RunConfig(steps=4, batch_size=2, seq_len=16, eval_windows=2, eval_every=1,
                   schedule="cosine", warmup_ratio=0.25)


@pytest.fixture(scope="module")
def run(one_thread):
    return E.finetune(TINY, progress=False)


def test_a_result_survives_json_exactly_and_names_its_curve_points(run):
    again = RunResult.from_json(json.loads(json.dumps(run.to_json())))
    assert again == replace(run, adapter=None)
    assert [p.step for p in run.curve] == [0, 1, 2, 3, 4]
    assert isinstance(run.curve[-1], CurvePoint) and run.curve[-1].held_out == run.held_out_loss
    assert run.learned == run.initial_held_out_loss - run.held_out_loss
    assert run.forgot == run.pretraining_loss - run.initial_pretraining_loss


def test_a_diverged_run_stores_null_losses_and_reads_back_as_diverged(run):
    bad = replace(run, held_out_loss=math.nan, validation_loss=math.inf)
    stored = json.dumps(bad.to_json(), allow_nan=False)
    back = RunResult.from_json(json.loads(stored))
    assert back.diverged and json.loads(stored)["diverged"] is True and math.isnan(back.validation_loss)


def test_last_quarter_drop_is_the_fall_of_the_validation_loss_from_three_quarters_to_the_end(run):
    at = {p.step: p.validation for p in run.curve}
    assert run.last_quarter_drop() == at[3] - at[4]
    coarse = replace(run, curve=run.curve[::2])  # points at 0, 2, 4: none at step 3
    with pytest.raises(ValueError, match="no point at step 3 of 4"):
        coarse.last_quarter_drop()


def test_from_json_refuses_what_is_not_a_mapping():
    with pytest.raises(TypeError, match="row must be a mapping"):
        RunResult.from_json([1, 2])


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero_after_the_last_step():
    config = replace(TINY, steps=100, warmup_ratio=0.1)
    factors = [C.lr_factor(config, t) for t in range(100)]
    assert factors[:10] == pytest.approx([(t + 1) / 10 for t in range(10)])
    assert factors[10] == 1.0 and all(a > b for a, b in zip(factors[10:], factors[11:]))
    assert 0 < factors[-1] < 1e-3 and factors[55] == pytest.approx(0.5)
    constant = replace(config, schedule="constant")
    assert [C.lr_factor(constant, t) for t in (0, 9, 10, 99)] == [0.1, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("kw,match", [(dict(schedule="step"), "schedule must be one of"),
                                      (dict(warmup_ratio=1.0), "warmup_ratio"),
                                      (dict(warmup_ratio=True), "warmup_ratio")])
def test_bad_schedules_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        C.RunConfig(**kw)


def test_the_schedule_changes_a_runs_cache_key_and_the_constant_default_keeps_old_keys():
    assert C.cache_key(replace(TINY, schedule="constant", warmup_ratio=0.0)) == C.cache_key(
        C.RunConfig(steps=4, batch_size=2, seq_len=16, eval_windows=2, eval_every=1))
    assert C.cache_key(TINY) != C.cache_key(replace(TINY, warmup_ratio=0.5))
