"""Tests for peftlab.harness.recorded and peftlab.harness.studies (chapter:
book/chapters/rank_alpha.md): a study is recorded once with its provenance, and a re-run
of a sample must reproduce it."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from peftlab.harness import experiments as E
from peftlab.harness import recorded, studies

TINY = replace(studies.BASE, steps=4, eval_every=2, eval_windows=2, seq_len=16, batch_size=2)


@pytest.fixture
def tiny_study(monkeypatch):
    study = studies.Study(
        "tiny",
        "two learning rates, then the best on more seeds",
        (lambda rows: E.grid(TINY, lr=[1e-3, 3e-2]), studies._repeat_best(("r",))),
        keep_adapters=lambda rows: rows[:1],
    )
    monkeypatch.setattr(studies, "_STUDIES", studies._STUDIES + (study,))
    return study


@pytest.fixture
def recorded_tiny(tiny_study, tmp_path):
    path = recorded.run_study("tiny", 1, tmp_path / ".cache", tmp_path, argv=["run", "tiny"])
    return path


def test_a_recorded_study_holds_every_stage_and_its_provenance(recorded_tiny, tmp_path):
    rows, prov = recorded.load_study("tiny", tmp_path)
    # stage 1: two learning rates on seed 0; stage 2: the better one on seeds 1 and 2
    assert [r["seed"] for r in rows] == [0, 0, 1, 2]
    best = studies.best_lr(rows[:2], ("r",))[(8,)]
    assert {r["lr"] for r in rows[2:]} == {best}
    assert prov["command"] == "python -m peftlab.harness.recorded run tiny"
    assert prov["checkpoint_sha256"] == E.checkpoint_digest()
    assert prov["torch"] == torch.__version__ and prov["threads_per_run"] == 1
    text = recorded_tiny.read_text()
    assert "NaN" not in text and "Infinity" not in text
    written = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert written == ["tiny.adapters.safetensors", "tiny.json"]


def test_a_kept_adapter_is_the_runs_own_and_others_are_refused(recorded_tiny, tmp_path):
    rows, _ = recorded.load_study("tiny", tmp_path)
    kept = recorded.load_study_adapter("tiny", rows[0], tmp_path)
    again = E.finetune(E.config_of(rows[0]), progress=False)["adapter"]
    assert set(kept) == set(again) and all(torch.equal(kept[k], again[k]) for k in kept)
    with pytest.raises(ValueError, match="kept no adapter for run"):
        recorded.load_study_adapter("tiny", rows[1], tmp_path)


def test_verify_reproduces_recorded_losses_exactly_on_this_machine(recorded_tiny, tmp_path):
    checks = recorded.verify("tiny", sample=2, folder=tmp_path)
    assert len(checks) == 2
    assert all(c["difference"] == 0.0 and c["tolerance"] == 0.0 and c["study"] == "tiny" for c in checks)
    assert all(c["step"] == TINY.eval_every for c in checks)


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
    assert checks[0]["tolerance"] == recorded.CROSS_MACHINE_TOLERANCE
    assert 0 < checks[0]["difference"] <= recorded.CROSS_MACHINE_TOLERANCE


def test_load_study_names_the_command_that_records_a_missing_study(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m peftlab.harness.recorded run rank-lr"):
        recorded.load_study("rank-lr", tmp_path)
    with pytest.raises(ValueError, match="study must be one of"):
        recorded.load_study("no-such-study", tmp_path)


def test_sample_rows_is_deterministic_spread_and_skips_diverged_runs():
    rows = [{"key": f"{i:02d}", "diverged": i % 3 == 0} for i in range(12)]
    first = recorded.sample_rows(rows, 3)
    assert first == recorded.sample_rows(list(reversed(rows)), 3)
    assert not any(r["diverged"] for r in first) and len({r["key"] for r in first}) == 3
    with pytest.raises(ValueError, match="n must be a positive int"):
        recorded.sample_rows(rows, 0)


def test_best_lr_picks_the_lowest_mean_validation_loss_and_a_diverged_run_loses():
    rows = [
        {"r": 4, "lr": 1e-3, "validation_loss": 2.0},
        {"r": 4, "lr": 1e-3, "validation_loss": 1.0},
        {"r": 4, "lr": 1e-2, "validation_loss": 1.6},
        {"r": 4, "lr": 1e-1, "validation_loss": None},
        {"r": 8, "lr": 1e-1, "validation_loss": 0.5},
    ]
    assert studies.best_lr(rows, ("r",)) == {(4,): 1e-3, (8,): 1e-1}
    assert studies.best_lr(rows, ("r",), r=8) == {(8,): 1e-1}


def test_every_study_is_named_described_and_starts_from_runs_of_its_own():
    assert studies.names() == [*studies.RANK_ALPHA, *studies.VARIANTS]
    assert len(set(studies.names())) == len(studies.names())
    for name in studies.names():
        study = studies.get(name)
        first = study.stages[0]([])
        assert study.description and first and all(isinstance(c, E.RunConfig) for c in first)
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
    budgets = [sum(r * sum(shapes[m]) for m in E.TARGETS[t]) for t, r in studies.PLACEMENTS]
    assert budgets[0] == budgets[1] == budgets[2]
    assert 1.0 <= budgets[3] / budgets[0] < 1.5


@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank_of_k_equal_directions_is_k(k):
    u, _ = torch.linalg.qr(torch.randn(16, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64))
    assert E.effective_rank(u @ u.T) == pytest.approx(k, rel=1e-9)
    assert E.effective_rank(torch.zeros(4, 4)) == 0.0
    with pytest.raises(TypeError, match="2-D"):
        E.effective_rank(torch.ones(3))


def test_a_run_records_validation_loss_grad_norms_and_its_updates_effective_rank():
    row = E.finetune(TINY, progress=False)
    assert math.isfinite(row["validation_loss"]) and len(row["curve"][0]) == 4
    assert row["first_grad_norm"] > 0 and row["mean_grad_norm"] > 0 and row["update_norm"] > 0
    assert set(row["effective_rank"]) == {"q_proj", "v_proj"}
    assert all(1.0 <= v <= TINY.r for v in row["effective_rank"].values())


def test_the_command_line_lists_every_study_and_whether_it_is_recorded(capsys):
    recorded.main(["list"])
    out = capsys.readouterr().out
    for name in studies.names():
        assert f"{name}: " in out
