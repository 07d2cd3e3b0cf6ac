"""Tests for peftlab.adapter_io: adapters cross between peftlab and PEFT 0.21.2 (chapter: book/chapters/lora.md)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab import adapter_io
from peftlab.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from peftlab.adapters import add_lora
from peftlab.lora import LoRALinear

import peft

TOL = {
    # measured over tests/test_lora.py and test_adapter_io.py (69 comparisons): at most 4.0e-6 relative beyond
    # atol (|diff| up to 4.6e-5 on outputs of size ~10): a margin of 2.5x
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    # measured: at most 3.9e-3 absolute over 34 bfloat16 comparisons (margin 2.5x) and 9.8e-4 over 31 float16
    # ones (margin 2x): one rounding of the output's dtype, bfloat16's 8 bits against float16's 11
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


class Block(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype):
        super().__init__()
        self.q_proj = nn.Linear(d, d, dtype=dtype)
        self.v_proj = nn.Linear(d, d, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(d, 3 * d, dtype=dtype)
        self.down_proj = nn.Linear(3 * d, d, dtype=dtype)

    def forward(self, x):
        h = x + self.v_proj(self.q_proj(x))
        return h + self.down_proj(torch.relu(self.up_proj(h)))


class Net(nn.Module):
    """Two blocks and a head: qualified names like ``layers.1.q_proj`` as in transformers models."""

    def __init__(self, d: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([Block(d, dtype) for _ in range(2)])
        self.lm_head = nn.Linear(d, 7, dtype=dtype)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def _randomize_B(model: nn.Module, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.2)
            elif isinstance(m, peft.tuners.lora.LoraLayer):
                m.lora_B["default"].weight.normal_(std=0.2)


TARGETS = [["q_proj", "v_proj"], ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"], r"layers\.1\..*_proj"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("rslora", [False, True])
def test_ours_loads_in_peft(tmp_path, dtype, targets, rslora):
    ours = add_lora(Net(dtype=dtype), targets, r=4, alpha=12, rslora=rslora)
    _randomize_B(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(Net(dtype=dtype), tmp_path)
    x = torch.randn(3, 16, dtype=dtype)
    torch.testing.assert_close(theirs(x), ours(x), **TOL[dtype])
    wrapped = {n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == {"base_model.model." + n for n, m in ours.named_modules() if isinstance(m, LoRALinear)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.filterwarnings("ignore:.*embedding layer")  # PEFT guesses lm_head might be an embedding
def test_peft_loads_here(tmp_path, dtype, targets, rslora):
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_rslora=rslora, lora_dropout=0.1)
    theirs = peft.get_peft_model(Net(dtype=dtype), cfg)
    _randomize_B(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(Net(dtype=dtype), tmp_path)
    layer = ours.layers[1].q_proj
    assert isinstance(layer, LoRALinear) and layer.rslora == rslora and layer.dropout.p == 0.1
    ours.eval(), theirs.eval()
    x = torch.randn(3, 16, dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[dtype])


def test_round_trip_here_is_bit_exact_and_fills_a_wrapped_model(tmp_path):
    ours = add_lora(Net(), ["q_proj", "down_proj"], r=2, alpha=4)
    _randomize_B(ours)
    save_adapter(ours, tmp_path / "a")
    wrapped = add_lora(Net(), ["q_proj", "down_proj"], r=2, alpha=4)
    assert load_adapter(wrapped, tmp_path / "a") is wrapped
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), wrapped.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_saved_files_follow_peft_format(tmp_path):
    ours = add_lora(Net(), ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.05)
    save_adapter(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["lora_dropout"] == 0.05
    peft_config = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(peft_config, peft.LoraConfig) and peft_config.use_rslora is False
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors["base_model.model.layers.0.q_proj.lora_A.weight"].shape == (4, 16)
    assert tensors["base_model.model.layers.0.q_proj.lora_B.weight"].shape == (16, 4)
    assert len(tensors) == 2 * 2 * 2


def test_ambiguous_short_names_fall_back_to_an_exact_regex(tmp_path):
    ours = add_lora(Net(), ["layers.0.q_proj"], r=2, alpha=2)
    _randomize_B(ours)
    save_adapter(ours, tmp_path)
    targets = json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"]
    assert isinstance(targets, str)  # "q_proj" would also select layers.1.q_proj
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path)
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in theirs.modules()) == 1
    x = torch.randn(2, 16)
    torch.testing.assert_close(theirs(x), ours(x))
    again = load_adapter(Net(), tmp_path)
    torch.testing.assert_close(again(x), ours(x))


# --- refusals --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = add_lora(Net(), ["q_proj", "v_proj"], r=4, alpha=8)
    _randomize_B(model)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _untouched(model: nn.Module) -> bool:
    return not any(isinstance(m, LoRALinear) for m in model.modules())


def test_missing_folder_and_weights_are_refused_naming_them(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(Net(), tmp_path / "nowhere")
    (saved / WEIGHTS_NAME).unlink()
    model = Net()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_adapter(model, saved)
    assert _untouched(model)


@pytest.mark.parametrize(
    "text,word",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"peft_type": "IA3", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}', "peft_type"),
        ('{"peft_type": "LORA", "lora_alpha": 8, "target_modules": ["q_proj"]}', "'r'"),
        ('{"peft_type": "LORA", "r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]}', "r must"),
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": "x", "target_modules": ["q_proj"]}', "lora_alpha"),
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": "yes"}', "use_dora"),
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "all"}', "bias"),
    ],
)
def test_broken_config_is_refused_naming_the_problem_and_leaves_the_model_untouched(saved, text, word):
    (saved / CONFIG_NAME).write_text(text)
    model = Net()
    with pytest.raises(ValueError, match=word):
        load_adapter(model, saved)
    assert _untouched(model)


def test_unreadable_safetensors(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"\x00garbage, not a safetensors header")
    model = Net()
    with pytest.raises(ValueError, match="safetensors"):
        load_adapter(model, saved)
    assert _untouched(model)


def _rewrite(saved, edit):
    tensors = load_file(saved / WEIGHTS_NAME)
    save_file(edit(tensors), saved / WEIGHTS_NAME)


def test_keys_without_prefix_are_refused(saved):
    """PEFT's pitfall: such keys load as 'missing' with only a warning, B stays 0; we refuse."""
    _rewrite(saved, lambda t: {k.removeprefix("base_model.model."): v for k, v in t.items()})
    model = Net()
    with pytest.raises(ValueError, match="keys do not match"):
        load_adapter(model, saved)
    assert _untouched(model)


def test_missing_and_extra_keys_are_refused(saved):
    _rewrite(saved, lambda t: {k: v for k, v in t.items() if "layers.1.v_proj.lora_B" not in k})
    with pytest.raises(ValueError, match="missing.*layers.1.v_proj"):
        load_adapter(Net(), saved)
    _rewrite(saved, lambda t: t | {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 16),
                                   "base_model.model.layers.1.v_proj.lora_B.weight": torch.zeros(16, 4)})
    with pytest.raises(ValueError, match="unexpected.*lm_head"):
        load_adapter(Net(), saved)


def test_integer_adapter_tensors_are_refused_naming_the_key(saved):
    key = "base_model.model.layers.0.q_proj.lora_A.weight"
    _rewrite(saved, lambda t: t | {key: torch.zeros(4, 16, dtype=torch.int32)})
    model = Net()
    message = f"adapter tensor '{key}' has dtype torch.int32, expected a float dtype"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_adapter(model, saved)
    assert _untouched(model)


def test_shapes_that_do_not_fit_are_refused(saved):
    with pytest.raises(ValueError, match="shape"):
        load_adapter(Net(d=24), saved)
    _rewrite(saved, lambda t: t | {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 15)})
    model = Net()
    with pytest.raises(ValueError, match="shape"):
        load_adapter(model, saved)
    assert _untouched(model)


def test_wrapped_model_must_agree_in_r_targets_and_merging(saved):
    other_r = add_lora(Net(), ["q_proj", "v_proj"], r=8, alpha=16)
    with pytest.raises(ValueError, match="r=8"):
        load_adapter(other_r, saved)
    other_targets = add_lora(Net(), ["q_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="keys do not match"):
        load_adapter(other_targets, saved)
    extra = add_lora(Net(), ["q_proj", "v_proj", "lm_head"], r=4, alpha=8)
    with pytest.raises(ValueError, match="not selected"):
        load_adapter(extra, saved)
    merged = add_lora(Net(), ["q_proj", "v_proj"], r=4, alpha=8)
    merged.layers[0].q_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        load_adapter(merged, saved)
    assert torch.count_nonzero(other_r.layers[0].q_proj.lora_B) == 0  # nothing was copied


def test_targets_that_match_nothing(saved):
    cfg = json.loads((saved / CONFIG_NAME).read_text()) | {"target_modules": ["k_proj"]}
    (saved / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="match no module"):
        load_adapter(Net(), saved)


def test_save_refuses_no_lora_mixed_r_merged_layers_a_file_path_and_non_models(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layer"):
        save_adapter(Net(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    mixed = add_lora(Net(), ["q_proj"], r=2, alpha=2)
    add_lora(mixed, ["v_proj"], r=4, alpha=2)
    with pytest.raises(ValueError, match="share r"):
        save_adapter(mixed, tmp_path / "a")
    merged = add_lora(Net(), ["q_proj"], r=2, alpha=2)
    merged.layers[1].q_proj.merge()
    with pytest.raises(ValueError, match="unmerge"):
        save_adapter(merged, tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        save_adapter(add_lora(Net(), ["q_proj"], r=2, alpha=2), tmp_path / "file")
    with pytest.raises(TypeError, match="model"):
        save_adapter("model", tmp_path / "a")
    with pytest.raises(TypeError, match="model"):
        load_adapter(None, tmp_path / "a")


def test_failed_save_leaves_existing_adapter_intact(saved, monkeypatch):
    before = {name: (saved / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    model = add_lora(Net(seed=5), ["q_proj", "v_proj"], r=4, alpha=8)
    _randomize_B(model, seed=6)

    def half_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, saved)
    assert {name: (saved / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, WEIGHTS_NAME]  # temp file removed
    monkeypatch.undo()
    save_adapter(model, saved)  # overwriting works and changes the weights
    assert (saved / WEIGHTS_NAME).read_bytes() != before[WEIGHTS_NAME]


def test_failed_config_write_removes_the_new_weights(saved, monkeypatch):
    before = {name: (saved / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    model = add_lora(Net(seed=5), ["q_proj", "v_proj"], r=4, alpha=8)

    def broken_dumps(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io.json, "dumps", broken_dumps)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, saved)
    assert {name: (saved / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, WEIGHTS_NAME]


# --- every LoraConfig field is handled, ignored or refused (PEFT 0.21.2) --------------------------------


def _loraconfig_defaults() -> dict:
    import dataclasses

    out = {}
    for f in dataclasses.fields(peft.LoraConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_every_loraconfig_field_is_handled_ignored_or_refused():
    fields = set(_loraconfig_defaults())
    known = adapter_io._HANDLED | adapter_io._IGNORED | set(adapter_io._UNSUPPORTED)
    assert fields - known == set(), "a LoraConfig field the loader neither handles nor allow-lists"
    assert known - fields == set(), "a field name that LoraConfig does not have"
    assert not (adapter_io._HANDLED & adapter_io._IGNORED)
    assert not ((adapter_io._HANDLED | adapter_io._IGNORED) & set(adapter_io._UNSUPPORTED))


def test_refused_fields_are_refused_only_away_from_loraconfigs_defaults():
    defaults = _loraconfig_defaults()
    for field, default in adapter_io._UNSUPPORTED.items():
        assert defaults[field] == default, field


def _peft_saved(tmp_path, build, **kw):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], **kw}
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**kw))
    _randomize_B(theirs)
    theirs.save_pretrained(tmp_path)
    return theirs


def _tiny_llama():
    from peftlab.harness.pretrained import build_model

    return build_model(0)


# (field, LoraConfig settings, base model): adapters PEFT saves offline with each feature
PEFT_SAVES = [
    ("alora_invocation_tokens", dict(alora_invocation_tokens=[1, 2]), Net),
    ("rank_pattern", dict(rank_pattern={"q_proj": 2}), Net),
    ("alpha_pattern", dict(alpha_pattern={"q_proj": 2}), Net),
    ("modules_to_save", dict(modules_to_save=["lm_head"]), Net),
    ("layers_to_transform", dict(layers_to_transform=[0], layers_pattern="layers"), Net),
    ("use_qalora", dict(use_qalora=True), Net),
    ("lora_bias", dict(lora_bias=True), Net),
    ("target_parameters", dict(target_modules=["q_proj"], target_parameters=["layers.0.up_proj.weight"]), Net),
    ("bias", dict(bias="all"), Net),
    ("bias", dict(bias="lora_only"), Net),
    ("ensure_weight_tying", dict(ensure_weight_tying=True), Net),
    ("velora_config", dict(velora_config=peft.VeloraConfig()), Net),
    ("monteclora_config", dict(monteclora_config=peft.MontecloraConfig()), Net),
    ("kasa_config", dict(kasa_config=peft.KasaConfig()), Net),
    ("init_lora_weights", dict(init_lora_weights="pissa"), Net),
    ("init_lora_weights", dict(init_lora_weights="olora"), Net),
    ("init_lora_weights", dict(init_lora_weights="mica"), Net),
    ("layer_replication", dict(layer_replication=[[0, 2], [1, 3]]), _tiny_llama),
    ("trainable_token_indices", dict(trainable_token_indices=[1, 2]), _tiny_llama),
]


@pytest.mark.parametrize("field,settings,build", PEFT_SAVES, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(PEFT_SAVES)])
@pytest.mark.filterwarnings("ignore")
def test_load_adapter_refuses_a_peft_adapter_using_an_unimplemented_field_naming_it(tmp_path, field, settings, build):
    _peft_saved(tmp_path, build, **settings)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved[field] != _loraconfig_defaults()[field]  # PEFT wrote the feature to the config
    model = build()
    with pytest.raises(ValueError, match=field):
        load_adapter(model, tmp_path)
    assert _untouched(model)


# Features PEFT cannot save offline here (megatron, bitsandbytes LoftQ, a Conv1D base, ...): its own
# LoraConfig.to_dict() of the setting, written into a plain PEFT adapter's config.
HAND_WRITTEN = [
    ("fan_in_fan_out", True),
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("loftq_config", {"loftq_bits": 4, "loftq_iter": 1}),
    ("corda_config", {"cache_file": "x"}),
    ("lora_ga_config", {"direction": "ArB2r"}),
    ("use_bdlora", {"target_modules_bd_a": ["q_proj"]}),
    ("arrow_config", {"top_k": 3}),
    ("layers_pattern", "layers"),
    ("init_lora_weights", "loftq"),
    ("init_lora_weights", "corda"),
    ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "lora_ga"),
]


@pytest.mark.parametrize("field,value", HAND_WRITTEN)
@pytest.mark.filterwarnings("ignore")
def test_load_adapter_refuses_an_unimplemented_field_peft_cannot_save_here_naming_it(tmp_path, field, value):
    _peft_saved(tmp_path, Net)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert field in config  # PEFT writes every field; only the value is set by hand
    config[field] = value
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    model = Net()
    with pytest.raises(ValueError, match=field):
        load_adapter(model, tmp_path)
    assert _untouched(model)


def test_load_adapter_refuses_an_unknown_field_with_a_value_and_accepts_an_empty_one(tmp_path):
    theirs = _peft_saved(tmp_path, Net).eval()
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "future_field": None}))
    ours = load_adapter(Net(), tmp_path).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "future_field": 3}))
    with pytest.raises(ValueError, match="future_field"):
        load_adapter(Net(), tmp_path)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal"])
@pytest.mark.filterwarnings("ignore")
def test_init_only_settings_load_and_compute_what_peft_computes(tmp_path, init):
    # init_lora_weights values that only set the factors' start: the saved tensors win, in
    # PEFT's PeftModel.from_pretrained as here
    _peft_saved(tmp_path, Net, init_lora_weights=init, inference_mode=False)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["init_lora_weights"] == init
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path).eval()
    ours = load_adapter(Net(), tmp_path).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])


# --- "all-linear" in a config ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore")
def test_all_linear_config_loads_the_layers_and_outputs_peft_loads(tmp_path):
    _peft_saved(tmp_path, _tiny_llama, target_modules="all-linear")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["target_modules"] = "all-linear"  # as written by hand or by a PEFT that keeps it
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    theirs = peft.PeftModel.from_pretrained(_tiny_llama(), tmp_path).eval()
    ours = load_adapter(_tiny_llama(), tmp_path).eval()
    prefix = "base_model.model."
    expected = {n[len(prefix):] for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n for n, m in ours.named_modules() if isinstance(m, LoRALinear)} == expected
    assert "lm_head" not in expected
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    # and into a model already wrapped the same way
    wrapped = add_lora(_tiny_llama(), "all-linear", r=4, alpha=8)
    load_adapter(wrapped, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "targets,exclude",
    [(["q_proj", "v_proj", "up_proj"], ["v_proj"]), (["q_proj", "v_proj"], ["layers.0.q_proj"]),
     (r".*_proj", r"layers\.1\..*"), ("all-linear", ["down_proj", "q_proj"])],
)
@pytest.mark.filterwarnings("ignore")
def test_exclude_modules_loads_the_layers_and_outputs_peft_loads(tmp_path, targets, exclude):
    _peft_saved(tmp_path, Net, target_modules=targets, exclude_modules=exclude)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["exclude_modules"]
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path).eval()
    ours = load_adapter(Net(), tmp_path).eval()
    prefix = "base_model.model."
    expected = {n[len(prefix):] for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n for n, m in ours.named_modules() if isinstance(m, LoRALinear)} == expected
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    # a wrapped model whose layer the adapter excludes is refused
    wrapped = add_lora(Net(), [n.rpartition(".")[2] for n in expected] + ["layers.0.v_proj"], r=4, alpha=8)
    if {n for n, m in wrapped.named_modules() if isinstance(m, LoRALinear)} != expected:
        with pytest.raises(ValueError, match="not selected"):
            load_adapter(wrapped, tmp_path)
