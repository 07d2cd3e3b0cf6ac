"""The checks behind the chapter *Questions people ask* (book/chapters/questions.md), the command that re-runs them
under other library versions (peftlab.book.faq_check), and gradient checkpointing's measurement
(peftlab.recompute, also used by the chapter *A first QLoRA finetune*, book/chapters/practice.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peftlab.book import faq_check, memory_questions, questions, training_questions
from peftlab.book.answers import Answer
from peftlab.book.memory_questions import bf16_nan_words


def answer(measured, expected, relation, tolerance=None):
    return Answer(0, "k", "q?", "a.", measured, expected, relation, "what", "source", tolerance=tolerance)


@pytest.mark.parametrize("measured, expected, relation, tolerance, holds", [
    (0.6, 0.5, ">", None, True), (0.4, 0.5, ">", None, False), (3, 3, "==", None, True),
    (2, 3, "==", None, False), (8.0, 8.0000001, "approx", 1e-6, True), (8.1, 8.0, "approx", 1e-6, False),
    (1.0, 1.0, "<=", None, True), (1.0, 1.0, "<", None, False),
])
def test_an_answer_holds_exactly_when_its_relation_does(measured, expected, relation, tolerance, holds):
    a = answer(measured, expected, relation, tolerance)
    assert a.holds is holds
    assert a.expectation.startswith("≈" if relation == "approx" else relation)


def test_bf16_nan_words_finds_nan_patterns_and_only_they_change():
    # little-endian bfloat16 words: 0x7F81 (a NaN), 0x3F80 (1.0), 0xFF85 (a negative NaN), 0x0001 (a subnormal)
    packed = torch.tensor([0x81, 0x7F, 0x80, 0x3F, 0x85, 0xFF, 0x01, 0x00], dtype=torch.uint8)
    words, nan, changed, numbers_changed = bf16_nan_words(packed)
    assert (words, nan, numbers_changed) == (4, 2, 0)
    assert changed == 2  # neither NaN is the pattern a float32 round trip writes back
    with pytest.raises(ValueError, match="even"):
        bf16_nan_words(packed[:3])
    with pytest.raises(ValueError, match="uint8"):
        bf16_nan_words(packed.to(torch.int16))


def test_random_bytes_are_nan_words_at_the_predicted_rate():
    random_bytes = torch.randint(0, 256, (2**18,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    words, nan, changed, numbers_changed = bf16_nan_words(random_bytes)
    assert nan / words == pytest.approx(2**-8 * (1 - 2**-7), rel=0.15)
    assert numbers_changed == 0 and 0 < changed <= nan


def test_memory_answers_rest_on_the_ledger():
    a1, a2 = memory_questions.q1_memory_not_covered(), memory_questions.q2_bytes_per_parameter()
    assert a1.holds and a2.holds
    # QLoRA's step is smaller than 16-bit LoRA's, and less so at a large batch, where activations dominate
    assert a1.numbers["small-ratio"] < a1.numbers["large-ratio"] < 1
    assert a1.numbers["large-activations-gb"] > a1.numbers["four-bit-gb"]
    # half a byte for the codes of the linear layers, 0.127 bits for their constants, 16-bit embeddings
    share = a2.numbers["linear-share"]
    assert a2.numbers["codes-bpp"] == pytest.approx(0.5 * share, rel=1e-6)
    assert a2.numbers["constants-bpp"] == pytest.approx(0.127 / 8 * share, rel=0.01)
    assert 0.55 < a2.measured < 0.6


def test_peft_scales_rslora_by_the_square_root_of_the_rank():
    a = training_questions.q9_alpha_and_rank()
    assert a.holds and a.measured == pytest.approx(8.0)
    assert a.numbers["scaling-64-std"] == pytest.approx(16 / 64)
    assert a.numbers["scaling-64-rs"] == pytest.approx(16 / math.sqrt(64))


def test_sharded_codes_answer_on_one_block():
    a = memory_questions.q7_sharded_bytes_as_floats()
    assert a.holds and a.numbers["numbers-changed"] == 0
    assert 0 < a.numbers["changed"] <= a.numbers["nan-words"]


def test_bitsandbytes_cpu_answer_is_byte_identical():
    a = memory_questions.q6_bnb_on_cpu(numel=64 * 256)
    assert a.holds and a.measured == 0 and a.numbers["dequant-gap"] == 0


def test_every_question_has_a_check_in_order():
    assert len(questions.QUESTIONS) == 10
    names = [f.__name__ for f in questions.QUESTIONS]
    assert [int(n.split("_")[0][1:]) for n in names] == list(range(1, 11))


def test_faq_check_compares_answers_and_values():
    here = [faq_check.Result(1, "q1", "> 0.5", 0.7, True), faq_check.Result(2, "q2", "== 0", 0.0, True),
            faq_check.Result(3, "q3", "> 1", 2.0, True)]
    there = [faq_check.Result(1, "q1", "> 0.5", 0.4, False), faq_check.Result(2, "q2", "== 0", 0.0, True),
             faq_check.Result(3, "q3", "> 1", 3.0, True)]
    changes = faq_check.compare(here, there, moved=0.05)
    assert [(n, what) for n, _, _, _, what in changes] == [(1, "answer"), (3, "value")]
    table = faq_check.results_markdown(there)
    assert "| 1 | q1 | > 0.5 | 0.4 | NO |" in table


def test_faq_check_turns_a_failing_check_into_a_changed_answer(monkeypatch):
    def broken():
        """A check whose library call went away."""
        raise AttributeError("no such API")

    monkeypatch.setattr(questions, "QUESTIONS", (broken,))
    [result] = faq_check.run_checks()
    assert not result.holds and result.measured is None
    assert "AttributeError" in result.error and result.question == "A check whose library call went away."


def test_faq_check_command_prints_json_and_a_table(capsys, tmp_path):
    assert faq_check.main(["--only", "2", "9", "--json", "--save", str(tmp_path / "run.json")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [r["number"] for r in record["results"]] == [2, 9]
    assert record["environment"]["peft"] != "-"
    assert faq_check.main(["--only", "2", "--baseline", str(tmp_path / "run.json")]) == 0
    out = capsys.readouterr().out
    assert "| 2 |" in out and "Changed against this environment: 0" in out
    with pytest.raises(SystemExit):
        faq_check.main(["--only", "11"])


def test_checkpointing_cost_on_a_small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.devices import torch_threads
    from peftlab.recompute import checkpointing_cost

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, use_cache=False)
    model = LlamaForCausalLM(config)
    x = torch.randint(0, 64, (2, 16))
    with torch_threads(1):  # tiny matrices: one thread, immune to a busy machine
        cost = checkpointing_cost(model, x, repeats=1)
    assert cost.checkpointed_saved_bytes < cost.saved_bytes
    # every block's input is kept: 3 blocks × 2 × 16 tokens × 32 float32 values
    assert cost.checkpointed_saved_bytes >= 3 * 2 * 16 * 32 * 4
    assert cost.time_ratio > 0 and cost.predicted_ratio > 1 and cost.repeats == 1
    assert not model.is_activation_checkpointing  # the copy was checkpointed, not the model
    with pytest.raises(ValueError, match="repeats"):
        checkpointing_cost(model, x, repeats=0)
    with pytest.raises(ValueError, match="2-D"):
        checkpointing_cost(model, x[0])
