"""Tests for peftlab.harness.recorded and peftlab.harness.studies (chapter:
book/chapters/rank_alpha.md): a study is recorded once with its provenance, and a re-run
of a sample must reproduce it."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace

import pytest
import torch

from peftlab.harness import config as C
from peftlab.harness import experiments as E
from peftlab.harness import recorded, studies
from peftlab.harness.results import RunResult

TINY = replace(studies.BASE, steps=4, eval_every=2, eval_windows=2, seq_len=16, batch_size=2)
TINY_ARM = replace(TINY, lr=studies.lr_lattice(0))


@pytest.fixture
def tiny_study(monkeypatch):
    arms = (TINY_ARM,)
    study = studies.Study(
        "tiny",
        "one arm tuned on seed 0, then its best rate on two other seeds",
        arms,
        (studies.tune(arms, [0]), studies.repeat_tuned(arms, (1, 2))),
        seeds=(1, 2),
        keep_adapters=lambda rows: list(rows[:1]),
    )
    monkeypatch.setattr(studies, "_STUDIES", studies._STUDIES + (study,))
    return study


@pytest.fixture
def recorded_tiny(tiny_study, tmp_path):
    path = recorded.run_study("tiny", 1, tmp_path / ".cache", tmp_path, argv=["run", "tiny"])
    return path


def test_a_recorded_study_tunes_to_an_interior_rate_then_reports_other_seeds(recorded_tiny, tmp_path):
    study = recorded.load_study("tiny", tmp_path)
    runs = study.runs
    tuning = [r for r in runs if r.config.seed == studies.TUNING_SEED]
    assert len(tuning) >= 3 and studies.is_interior(runs, TINY_ARM)
    best = studies.tuned_lr(runs, TINY_ARM)
    curve = studies.tuning_curve(runs, TINY_ARM)
    assert curve[best] == min(curve.values()) and list(curve) == sorted(curve)
    reported = studies.reported_runs(runs, TINY_ARM, (1, 2))
    assert [r.config.seed for r in reported] == [1, 2] and {r.config.lr for r in reported} == {best}
    assert len(runs) == len(tuning) + 2  # nothing run twice
    prov = study.provenance
    assert prov["command"] == "python -m peftlab.harness.recorded run tiny"
    assert prov["checkpoint_sha256"] == C.checkpoint_digest()
    assert prov["torch"] == torch.__version__ and prov["threads_per_run"] == 1
    text = recorded_tiny.read_text()
    assert "NaN" not in text and "Infinity" not in text
    written = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert written == ["tiny.adapters.safetensors", "tiny.json"]


def test_tuning_widens_the_grid_past_whichever_end_is_best():
    def run(lr, loss, seed=0):
        row = {**dataclasses.asdict(replace(TINY_ARM, lr=lr, seed=seed)), "key": f"{lr}-{seed}",
               "scaling": 2.0, "compute_dtype": "float32", "trainable": 1, "total": 2, "seconds": 1.0,
               "seconds_per_step": 0.25, "curve": [[0, 1.0, 1.0, 1.0]], "effective_rank": {},
               "update_norm": 0.0, "first_grad_norm": 1.0, "mean_grad_norm": 1.0}
        losses = dict.fromkeys(("initial_held_out_loss", "initial_pretraining_loss", "initial_validation_loss",
                                "held_out_loss", "train_loss", "pretraining_loss"), 1.0)
        return RunResult.from_json({**row, **losses, "validation_loss": loss})

    stage = studies.tune((TINY_ARM,), [0])
    assert sorted(c.lr for c in stage([])) == [5e-4, 1e-3, 2e-3]
    falling = [run(5e-4, 3.0), run(1e-3, 2.0), run(2e-3, 1.0)]
    assert [c.lr for c in stage(falling)] == [4e-3] and not studies.is_interior(falling, TINY_ARM)
    diverged = falling + [run(4e-3, None)]  # a diverged run is the worse side
    assert stage(diverged) == [] and studies.is_interior(diverged, TINY_ARM)
    assert studies.tuned_lr(diverged + [run(2e-3, 0.1, seed=1)], TINY_ARM) == 2e-3  # other seeds do not tune
    with pytest.raises(ValueError, match="seeds \\[1\\] not recorded"):
        studies.reported_runs(diverged, TINY_ARM, (1,))
    with pytest.raises(ValueError, match="lr must be LR_UNIT"):
        studies.lattice_index(3e-3)


def test_a_kept_adapter_is_the_runs_own_and_others_are_refused(recorded_tiny, tmp_path):
    runs = recorded.load_study("tiny", tmp_path).runs
    kept = recorded.load_study_adapter("tiny", runs[0], tmp_path)
    again = E.finetune(runs[0].config, progress=False).adapter
    assert set(kept) == set(again) and all(torch.equal(kept[k], again[k]) for k in kept)
    with pytest.raises(ValueError, match="kept no adapter for run"):
        recorded.load_study_adapter("tiny", runs[1], tmp_path)


def test_verify_reproduces_recorded_losses_exactly_on_this_machine(recorded_tiny, tmp_path):
    checks = recorded.verify("tiny", sample=2, folder=tmp_path)
    assert len(checks) == 2
    assert all(c.difference == 0.0 and c.tolerance == 0.0 and c.study == "tiny" for c in checks)
    assert all(c.step == TINY.eval_every for c in checks)


def test_a_run_stopped_early_repeats_the_first_steps_of_the_scheduled_run_exactly():
    six = replace(TINY_ARM, steps=6, eval_every=3)
    whole = E.finetune(six, progress=False)
    part = E.finetune(six, progress=False, stop_after=3)
    assert part.held_out_loss == whole.curve[1].held_out
    shorter = E.finetune(replace(six, steps=3, eval_every=0), progress=False)
    assert shorter.held_out_loss != whole.curve[1].held_out  # its schedule decays sooner
    with pytest.raises(ValueError, match="stop_after must be an int in \\[1, steps=6\\]"):
        E.finetune(six, progress=False, stop_after=7)


def test_verify_fails_when_a_recorded_loss_was_changed(recorded_tiny, tmp_path):
    record = json.loads(recorded_tiny.read_text())
    for row in record["rows"]:
        row["curve"][1][1] += 1e-6
    recorded_tiny.write_text(json.dumps(record))
    with pytest.raises(AssertionError, match="re-record the study"):
        recorded.verify("tiny", sample=1, folder=tmp_path)


def test_verify_allows_the_cross_machine_tolerance_only_on_another_machine(recorded_tiny, tmp_path):
    record = json.loads(recorded_tiny.read_text())
    record["provenance"]["cpu_capability"] = "some other CPU"
    for row in record["rows"]:
        row["curve"][1][1] += recorded.CROSS_MACHINE_TOLERANCE / 2
    recorded_tiny.write_text(json.dumps(record))
    checks = recorded.verify("tiny", sample=1, folder=tmp_path)
    assert checks[0].tolerance == recorded.CROSS_MACHINE_TOLERANCE
    assert 0 < checks[0].difference <= recorded.CROSS_MACHINE_TOLERANCE


def test_load_study_names_the_command_that_records_a_missing_study(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m peftlab.harness.recorded run rank-lr"):
        recorded.load_study("rank-lr", tmp_path)
    with pytest.raises(ValueError, match="study must be one of"):
        recorded.load_study("no-such-study", tmp_path)


def test_sample_runs_is_deterministic_spread_and_skips_diverged_runs(recorded_tiny, tmp_path):
    runs = recorded.load_study("tiny", tmp_path).runs
    runs = [replace(r, key=f"{i:02d}", held_out_loss=math.nan if i % 3 == 0 else 1.0)
            for i, r in enumerate(runs * 3)]
    first = recorded.sample_runs(runs, 3)
    assert first == recorded.sample_runs(list(reversed(runs)), 3)
    assert not any(r.diverged for r in first) and len({r.key for r in first}) == 3
    with pytest.raises(ValueError, match="n must be a positive int"):
        recorded.sample_runs(runs, 0)


def test_every_study_is_named_described_and_starts_from_runs_of_its_own():
    assert studies.names() == [*studies.RANK_ALPHA, *studies.LONGER_CHECKS, *studies.VARIANTS]
    assert len(set(studies.names())) == len(studies.names())
    for name in studies.names():
        study = studies.get(name)
        if study.after:
            assert study.after in studies.names()
            continue
        first = study.stages[0]([])
        assert study.description and first and all(isinstance(c, C.RunConfig) for c in first)
        assert {c.seed for c in first} == {studies.TUNING_SEED}
        assert studies.TUNING_SEED not in study.seeds
    with pytest.raises(ValueError, match="study must be one of"):
        studies.get("nope")


def test_every_factor_of_the_8bit_lora_setting_is_large_enough_for_8bit_states():
    from peftlab.harness import pretrained
    from peftlab.paged import MIN_8BIT_SIZE

    config = pretrained.load_pretrained().config
    r = studies.OPTIM8["lora"].r
    smallest = r * min(config.hidden_size, config.intermediate_size)
    assert studies.OPTIM8["lora"].targets == "all" and smallest >= MIN_8BIT_SIZE


def test_placements_have_nearly_equal_trainable_parameters_per_block():
    from peftlab.harness import pretrained

    config = pretrained.load_pretrained().config
    d, f = config.hidden_size, config.intermediate_size
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    budgets = [sum(r * sum(shapes[m]) for m in C.TARGETS[t]) for t, r in studies.PLACEMENTS]
    assert budgets[0] == budgets[1] == budgets[2]
    assert 1.0 <= budgets[3] / budgets[0] < 1.5


@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank_of_k_equal_directions_is_k(k):
    from peftlab.harness.analysis import effective_rank

    u, _ = torch.linalg.qr(torch.randn(16, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64))
    assert effective_rank(u @ u.T) == pytest.approx(k, rel=1e-9)
    assert effective_rank(torch.zeros(4, 4)) == 0.0
    with pytest.raises(TypeError, match="2-D"):
        effective_rank(torch.ones(3))


def test_a_run_records_validation_loss_grad_norms_and_its_updates_effective_rank():
    row = E.finetune(TINY_ARM, progress=False)
    assert math.isfinite(row.validation_loss) and row.curve[0].validation == row.initial_validation_loss
    assert row.first_grad_norm > 0 and row.mean_grad_norm > 0 and row.update_norm > 0
    assert set(row.effective_rank) == {"q_proj", "v_proj"}
    assert all(1.0 <= v <= TINY.r for v in row.effective_rank.values())


def test_the_command_line_lists_every_study_and_whether_it_is_recorded(capsys):
    recorded.main(["list"])
    out = capsys.readouterr().out
    for name in studies.names():
        assert f"{name}: " in out
