"""Tests for peftlab.prepare: one prepare_qlora for the zero, PiSSA and LoftQ starts
(chapters: book/chapters/qlora.md, book/chapters/variants.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab.loftq import apply_loftq
from peftlab.adapters import add_lora, add_lora_layers
from peftlab.lora import LoRALinear
from peftlab.pissa import apply_pissa
from peftlab.prepare import INITS, prepare_qlora
from peftlab.qlora import Linear4bit, quantize_model
from peftlab.targets import LLAMA_LINEARS


def _tiny_llama(seed: int, dtype: torch.dtype):
    from peftlab.harness.pretrained import build_model

    return build_model(seed, num_hidden_layers=2).to(dtype)


def _pieces(model, targets, init, *, r, alpha, dropout=0.0, rslora=False, use_dora=False,
            niter=None, num_iter=1, blocksize=64, double_quant=True, compute_dtype=None,
            kernels="torch"):
    """What the three functions prepare_qlora replaced did, step by step, from the public
    pieces: the expectation is this path, never prepare_qlora itself."""
    quantized = dict(blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                     kernels=kernels)
    if init == "zero":  # peftlab.qlora.prepare_qlora: quantize, then LoRA
        quantize_model(model, targets, **quantized, progress=False)
        add_lora(model, targets, r=r, alpha=alpha, dropout=dropout, rslora=rslora, use_dora=use_dora)
    elif init == "pissa":  # peftlab.pissa.prepare_qlora_pissa: LoRA, PiSSA, then the residual in NF4
        layers = add_lora_layers(model, targets, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        apply_pissa(model, niter=niter)
        for _, layer in layers:
            layer.base = Linear4bit.from_linear(layer.base, **quantized)
    else:  # peftlab.loftq.prepare_qlora_loftq: LoRA, then LoftQ quantizes W0 itself
        add_lora(model, targets, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        apply_loftq(model, num_iter=num_iter, **quantized)
    return model


def _state(model) -> dict:
    """Everything prepare_qlora sets: every tensor (4-bit bytes and constants included),
    every module's class, the layers' settings and what is trained."""
    lora = {n: (m.r, m.alpha, m.scaling, m.rslora, m.use_dora, repr(m.dropout), m.lora_A.dtype)
            for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    four_bit = {n: (m.compute_dtype, m.kernels, m.workspace, m.weight.dtype, m.weight.blocksize,
                    m.weight.double_quant)
                for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "classes": [(n, type(m).__name__) for n, m in model.named_modules()],
        "lora": lora,
        "4bit": four_bit,
        "trained": [(n, p.requires_grad) for n, p in model.named_parameters()],
    }


def _assert_same(got: dict, expected: dict) -> None:
    assert got["tensors"].keys() == expected["tensors"].keys()
    for key, tensor in expected["tensors"].items():
        other = got["tensors"][key]
        assert other.dtype == tensor.dtype and torch.equal(other, tensor), key
    for part in ("classes", "lora", "4bit", "trained"):
        assert got[part] == expected[part], part


# (init, model dtype, targets, settings): every argument, in both model dtypes the runs use
CASES = [
    ("zero", torch.float32, LLAMA_LINEARS, dict(r=8, alpha=16)),
    ("zero", torch.bfloat16, ["q_proj", "v_proj"],
     dict(r=4, alpha=8, rslora=True, dropout=0.1, use_dora=True, compute_dtype=torch.bfloat16)),
    ("zero", torch.float32, ["q_proj", "down_proj"],
     dict(r=8, alpha=16, blocksize=128, double_quant=False, kernels="bnb")),
    ("pissa", torch.float32, LLAMA_LINEARS, dict(r=8, alpha=16, blocksize=128, double_quant=False)),
    # the randomized SVD draws from the global RNG after LoRA's A: the order of draws counts
    ("pissa", torch.bfloat16, LLAMA_LINEARS,
     dict(r=4, alpha=8, rslora=True, dropout=0.05, niter=2, compute_dtype=torch.bfloat16)),
    ("loftq", torch.float32, LLAMA_LINEARS, dict(r=8, alpha=8, num_iter=2, double_quant=False)),
    ("loftq", torch.bfloat16, ["q_proj", "up_proj"],
     dict(r=4, alpha=16, rslora=True, compute_dtype=torch.bfloat16)),
]


@pytest.mark.parametrize("init,dtype,targets,settings", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_init_is_bit_identical_to_the_steps_it_replaced(init, dtype, targets, settings):
    """The same seed gives the same model, bit for bit, and leaves the global RNG where the
    old steps left it (the same random draws, in the same order)."""
    old, new = _tiny_llama(3, dtype), _tiny_llama(3, dtype)
    torch.manual_seed(7)
    expected = _state(_pieces(old, list(targets), init, **settings))
    expected_rng = torch.get_rng_state()
    torch.manual_seed(7)
    got = _state(prepare_qlora(new, targets, init=init, **settings))
    assert torch.equal(torch.get_rng_state(), expected_rng)
    _assert_same(got, expected)
    assert got["lora"] and len(got["4bit"]) == len(got["lora"])


def test_zero_takes_the_targets_as_the_other_inits_do():
    """A regex or "all-linear" selects the layers as add_lora does, for init="zero" too."""
    states = []
    for targets in (LLAMA_LINEARS, "all-linear", r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"):
        model = _tiny_llama(0, torch.float32)
        torch.manual_seed(0)
        states.append(_state(prepare_qlora(model, targets, r=4, alpha=8)))
    _assert_same(states[1], states[0])
    _assert_same(states[2], states[0])


def test_only_the_layers_it_adds_get_the_start():
    """A LoRA layer the model already had is left as it was (PiSSA and LoftQ rewrite only
    the layers prepare_qlora adds)."""
    for init in ("pissa", "loftq"):
        model = add_lora(_tiny_llama(0, torch.float32), ["q_proj"], r=4, alpha=8)
        before = {k: v.clone() for k, v in model.state_dict().items() if ".q_proj." in k}
        prepare_qlora(model, ["v_proj"], r=4, alpha=8, init=init)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), init
        assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj").base, nn.Linear)
        assert isinstance(model.get_submodule("model.layers.0.self_attn.v_proj").base, Linear4bit)


def _small() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.q_proj = nn.Linear(64, 64)
    model.v_proj = nn.Linear(64, 32)  # after q_proj: a late refusal would find q_proj changed
    model.lm_head = nn.Linear(32, 10)
    return model


def _snapshot(model: nn.Module):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _assert_unchanged(model: nn.Module, before) -> None:
    classes, tensors, trained = _snapshot(model)
    assert classes == before[0] and trained == before[2]
    assert tensors.keys() == before[1].keys()
    assert all(torch.equal(tensors[k], v) for k, v in before[1].items())


BAD = [
    (dict(init="qlora"), ValueError, r"init must be one of \('zero', 'pissa', 'loftq'\)"),
    (dict(init=None), ValueError, "init must be one of"),
    (dict(use_dora=True, init="pissa"), ValueError, r"use_dora=True needs init='zero'.*init='pissa'"),
    (dict(use_dora=True, init="loftq"), ValueError, r"use_dora=True needs init='zero'.*init='loftq'"),
    (dict(niter=4), ValueError, r"niter applies only to init='pissa'.*init='zero'"),
    (dict(niter=4, init="loftq"), ValueError, r"niter applies only to init='pissa'.*init='loftq'"),
    (dict(niter=-1, init="pissa"), ValueError, "niter must be None or an int >= 0"),
    (dict(num_iter=2), ValueError, r"num_iter applies only to init='loftq'.*init='zero'"),
    (dict(num_iter=3, init="pissa"), ValueError, r"num_iter applies only to init='loftq'.*init='pissa'"),
    (dict(num_iter=True, init="loftq"), TypeError, "num_iter must be an int"),
    (dict(num_iter=0, init="loftq"), ValueError, "num_iter must be an int >= 1"),
    (dict(r=0), ValueError, "r must"),
    (dict(use_dora=1), TypeError, "use_dora"),
    (dict(alpha=0, init="pissa"), ValueError, "alpha must be non-zero for init='pissa'"),
    (dict(alpha=0, init="loftq"), ValueError, "alpha must be non-zero for init='loftq'"),
    (dict(r=48, init="pissa"), ValueError, r"r must be at most .* = 32 of 'v_proj'"),
    (dict(r=48, init="loftq"), ValueError, r"r must be at most .* = 32 of 'v_proj'"),
    (dict(blocksize=100, init="pissa"), ValueError, "blocksize must be one of"),
    (dict(double_quant="yes", init="loftq"), TypeError, "double_quant must be a bool"),
    (dict(compute_dtype=torch.float64, init="pissa"), TypeError, "compute_dtype must be"),
    (dict(kernels="cuda", init="pissa"), ValueError, r"kernels must be one of \('torch', 'bnb'\)"),
    (dict(target_modules=["q_proj", "lm_head"], init="loftq"), ValueError, "must not include lm_head"),
    (dict(target_modules=["k_proj"]), ValueError, "match no module"),
]


@pytest.mark.parametrize("kw,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_every_argument_is_checked_before_the_model_changes(kw, exc, match):
    """Each refusal names the parameter and leaves the model as it was, also where the old
    functions had already put LoRA on the first layers (PiSSA's r, LoftQ's kernels...)."""
    model = _small()
    before = _snapshot(model)
    kw = {"target_modules": ["q_proj", "v_proj"], "r": 4, "alpha": 8, **kw}
    with pytest.raises(exc, match=match):
        prepare_qlora(model, **kw)
    _assert_unchanged(model, before)


def test_defaults_of_the_other_inits_settings_are_accepted_everywhere():
    for init in INITS:
        prepare_qlora(_small(), ["q_proj"], r=4, alpha=8, init=init, niter=None, num_iter=1)


def test_a_bad_model_or_an_already_4bit_layer_is_refused():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        prepare_qlora({"q_proj": nn.Linear(4, 4)})
    for init in INITS:
        model = quantize_model(_small(), ["q_proj"], progress=False)
        before = _snapshot(model)
        with pytest.raises(ValueError, match="'q_proj' is already a Linear4bit"):
            prepare_qlora(model, ["q_proj", "v_proj"], r=4, alpha=8, init=init)
        _assert_unchanged(model, before)
