"""Tests for peftlab.harness.pretrained (chapter: book/chapters/rank_alpha.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peftlab.harness import pretrained, textdata
from peftlab.targets import LLAMA_LINEARS

import transformers


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return pretrained.load_pretrained()


@pytest.fixture()
def restore_torch_globals():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_architecture_is_llama_with_its_layer_names(model):
    assert isinstance(model, transformers.LlamaForCausalLM)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == set(LLAMA_LINEARS) | {"lm_head"}  # the package's list is LLaMA's, as transformers builds it
    assert model.config.vocab_size == textdata.VOCAB_SIZE == 256


def llama_parameter_count(V: int, d: int, L: int, f: int, kv: int | None = None, heads: int = 1) -> int:
    """LLaMA's parameter count by hand: untied embeddings, 2 RMSNorms per block, one final norm."""
    kv_dim = d if kv is None else d // heads * kv
    return 2 * V * d + L * (2 * d * d + 2 * d * kv_dim + 3 * d * f + 2 * d) + d


def test_tiny_config_counts_as_llama(model):
    c = pretrained.TINY_LLAMA
    expected = llama_parameter_count(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"])
    assert sum(p.numel() for p in model.parameters()) == expected


def test_llama_7b_shape_gives_the_papers_parameter_count():
    # The same config function at LLaMA-7B's shape (LLaMA Table 2) gives 6,738,415,616 parameters:
    # the tiny model is LLaMA, only smaller.
    cfg = pretrained.tiny_llama_config(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    )
    with torch.device("meta"):
        big = transformers.LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in big.parameters()) == 6_738_415_616


def test_tiny_llama_config_refuses_unknown_overrides():
    with pytest.raises(ValueError, match="unknown config overrides"):
        pretrained.tiny_llama_config(hidden_sise=64)


def test_lm_loss_equals_transformers_own_loss(model):
    # transformers shifts the labels inside the model; lm_loss takes targets already shifted. By
    # causality, the logits of ids[:, :-1] are the first n - 1 logits of ids.
    ids = textdata.encode("def f(x):\n    return x + 1\n" * 4)[None, :96]
    theirs = model(input_ids=ids, labels=ids).loss
    ours = pretrained.lm_loss(model, ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_shipped_checkpoint_is_small_and_documented_with_the_hashes_of_its_data():
    assert pretrained.CHECKPOINT.stat().st_size <= 8 * 1024 * 1024
    info = pretrained.checkpoint_info()
    assert info["command"].startswith("python -m peftlab.harness.pretrained --out ")
    assert {"python", "torch", "transformers"} <= set(info["versions"])
    assert info["config"] == json.loads(json.dumps(pretrained.TINY_LLAMA))
    corpus = info["data"]["corpus"]
    assert info["data"]["held_out_topics"] == list(textdata.corpus_info("pretraining", corpus).held_out_documents)
    hashes = info["data"]["sha256"]
    assert hashes["train"] == pretrained._sha256(textdata.pretraining_text("train", corpus))
    assert hashes["held_out"] == pretrained._sha256(textdata.pretraining_text("held_out", corpus))
    for kind in textdata.OUTSIDE_KINDS:
        assert hashes[kind] == pretrained._sha256(textdata.outside_text(kind))


def test_shipped_record_settings_are_those_of_its_own_command_line():
    info = pretrained.checkpoint_info()
    args = pretrained.command_line().parse_args(info["command"].split()[3:])
    for key in (*pretrained.PRETRAIN_DEFAULTS, "threads", "eval_every", "eval_windows", "final_eval_windows"):
        assert info["settings"][key] == getattr(args, key), key


def test_shipped_checkpoint_scores_its_record_on_outside_text_far_below_untrained(model):
    text = textdata.outside_text("english")
    info = pretrained.checkpoint_info()
    seq_len, batch = info["settings"]["seq_len"], info["settings"]["batch_size"]
    untrained = pretrained.evaluate_loss(pretrained.build_model(0), text, seq_len, batch, max_windows=32)
    trained = pretrained.evaluate_loss(model, text, seq_len, batch)
    assert abs(untrained - math.log(256)) < 0.1  # an untrained model is about uniform over bytes
    assert trained < 0.5 * untrained  # far below: at most half of ln 256
    assert trained == pytest.approx(info["final_outside_loss"]["english"], abs=1e-4)


def test_shipped_model_has_not_overfit_and_scores_below_1_6_nats_per_byte_on_outside_text():
    info = pretrained.checkpoint_info()
    held = [v for _, v in info["held_out_loss"][:-1]]  # in-training points share one set of windows
    assert held[-1] <= min(held) + 0.01  # level or still falling when training stopped
    assert all(loss <= 1.6 for loss in info["final_outside_loss"].values())
    assert info["wall_seconds"] <= 90 * 60


def test_brief_retraining_makes_the_loss_fall():
    model, record = pretrained.pretrain(
        steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup=5, eval_every=40, eval_windows=16, progress=False,
        final_eval_windows=16,
    )
    assert record["untrained_held_out_loss"] > 5.0
    assert record["final_held_out_loss"] < record["untrained_held_out_loss"] - 1.5
    assert not model.training


def test_pretraining_is_deterministic_for_a_seed():
    kw = dict(steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=3, eval_windows=2, final_eval_windows=2,
              progress=False)
    a, _ = pretrained.pretrain(seed=1, **kw)
    b, _ = pretrained.pretrain(seed=1, **kw)
    c, _ = pretrained.pretrain(seed=2, **kw)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_pretrain_rejects_bad_steps(bad):
    with pytest.raises(ValueError, match="steps"):
        pretrained.pretrain(steps=bad, progress=False)


def test_complete_is_greedy_decoding(model):
    prompt = "The "
    text = pretrained.complete(model, prompt, max_new_bytes=5)
    ids = textdata.encode(prompt)[None]
    for _ in range(5):  # argmax by hand, one forward per byte
        with torch.no_grad():
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    assert text == textdata.decode(ids[0, 4:])
    with pytest.raises(ValueError, match="prompt"):
        pretrained.complete(model, "")
    with pytest.raises(ValueError, match="max_new_bytes"):
        pretrained.complete(model, "x", 0)


def test_lr_schedule_warms_up_linearly_then_decays_to_a_tenth():
    lrs = [pretrained.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_cli_writes_a_loadable_checkpoint_atomically(tmp_path, restore_torch_globals):
    out = tmp_path / "m.safetensors"
    pretrained.main(["--out", str(out), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                     "--warmup", "1", "--eval-every", "2", "--threads", "1", "--final-eval-windows", "2",
                     "--no-progress"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]  # no temp files left
    info = pretrained.checkpoint_info(out)
    assert info["command"].endswith("--final-eval-windows 2 --no-progress") and info["settings"]["steps"] == 2
    assert (info["settings"]["eval_every"], info["settings"]["eval_windows"], info["settings"]["final_eval_windows"]) == (2, 64, 2)
    loaded = pretrained.load_pretrained(out)
    assert loaded.config.hidden_size == pretrained.TINY_LLAMA["hidden_size"]


def test_load_pretrained_refuses_missing_files_non_float_dtypes_and_missing_tensors(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="not found"):
        pretrained.load_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="dtype"):
        pretrained.load_pretrained(dtype=torch.int8)
    # A file whose tensors do not match the model (one missing) is refused, not loaded half.
    from safetensors.torch import save_file

    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "cut.safetensors"))
    (tmp_path / "cut.json").write_text(json.dumps(pretrained.checkpoint_info()))
    with pytest.raises(ValueError, match="lm_head.weight"):
        pretrained.load_pretrained(tmp_path / "cut.safetensors")
    (tmp_path / "cut.json").unlink()  # a checkpoint without its record beside it
    with pytest.raises(FileNotFoundError, match="checkpoint record .*cut.json not found"):
        pretrained.checkpoint_info(tmp_path / "cut.safetensors")


def test_save_checkpoint_refuses_a_path_not_ending_in_safetensors(tmp_path, model):
    with pytest.raises(ValueError, match=".safetensors"):
        pretrained.save_checkpoint(model, tmp_path / "m.pt", {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_pretrained_casts_every_parameter_to_dtype_in_eval_mode(dtype):
    m = pretrained.load_pretrained(dtype=dtype)
    assert all(p.dtype == dtype for p in m.parameters())
    assert not m.training


@pytest.mark.cuda
def test_load_pretrained_on_cuda_matches_cpu(model):
    ids = textdata.encode("for i in range(10):\n    print(i)\n")[None]
    gpu = pretrained.load_pretrained(device="cuda")
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = gpu(input_ids=ids.cuda()).logits.cpu()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
