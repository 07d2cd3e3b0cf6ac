"""Tests for peftlab.pissa against PEFT 0.21.2's ``init_lora_weights="pissa"`` and bitsandbytes'
NF4 (chapter: book/chapters/variants.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab.adapters import add_lora
from peftlab.lora import LoRALinear
from peftlab.nf4 import quantize_nf4
from peftlab.pissa import apply_pissa, apply_pissa_to_layers, pissa_init
from peftlab.prepare import prepare_qlora
from peftlab.qlora import Linear4bit, bnb_linear4bit

import peft
import peft.tuners.lora.layer as peft_layer  # noqa: E402


def _tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from peftlab.harness.pretrained import build_model

    return build_model(seed, num_hidden_layers=2).to(dtype)


def _pretrained():
    from peftlab.harness.pretrained import load_pretrained

    return load_pretrained()


def _peft_layers(model) -> dict[str, nn.Module]:
    return {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if isinstance(m, peft_layer.LoraLayer)
    }


def _our_layers(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _seeded_svd_lowrank(monkeypatch):
    """``svd_lowrank`` drawing from a seed per call (the call's index), for PEFT and for us:
    PEFT draws the layers' LoRA initialisations between its calls and we do not, so the
    global RNG alone would give the two different random projections."""
    calls = []
    original = torch.svd_lowrank

    def seeded(*args, **kwargs):
        calls.append(None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(len(calls))
            return original(*args, **kwargs)

    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)
    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    return calls


# (dtype, r, alpha, rslora): scaling 1, 2, 0.25 and rsLoRA's alpha/√r
CASES = [
    (torch.float32, 8, 8, False),
    (torch.float32, 8, 16, False),
    (torch.float32, 16, 4, False),
    (torch.float32, 4, 8, True),
    (torch.bfloat16, 8, 16, False),
]


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
@pytest.mark.parametrize("dtype,r,alpha,rslora", CASES)
def test_factors_and_residual_equal_peft_pissa_exactly(init, dtype, r, alpha, rslora, monkeypatch):
    """The same SVD on the same float32 copy, the same operations: PEFT's bits, in every
    dtype (a bfloat16 residual is the float32 one rounded once, in both)."""
    calls = _seeded_svd_lowrank(monkeypatch)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules="all-linear",
                          init_lora_weights=init)
    theirs = _peft_layers(peft.get_peft_model(_tiny_llama(dtype=dtype), cfg))
    peft_calls = len(calls)
    calls.clear()
    niter = int(init.split("_niter_")[1]) if "_niter_" in init else None
    ours = _our_layers(apply_pissa(add_lora(_tiny_llama(dtype=dtype), "all-linear", r=r, alpha=alpha,
                                            rslora=rslora), niter=niter))
    assert len(calls) == peft_calls == (0 if niter is None else 14)
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name, layer in ours.items():
        t = theirs[name]
        # PEFT moves a new adapter to its base's dtype (after pissa_init) and autocasts it back
        # to float32: its factors are ours rounded to a 16-bit base's dtype once; ours keep
        # float32, which the residual was computed with.
        assert torch.equal(layer.lora_A.to(dtype).float(), t.lora_A["default"].weight), name
        assert torch.equal(layer.lora_B.to(dtype).float(), t.lora_B["default"].weight), name
        assert torch.equal(layer.base.weight, t.base_layer.weight), name
        assert layer.base.weight.dtype == dtype and layer.lora_A.dtype == torch.float32


def test_with_a_bfloat16_base_our_float32_factors_start_closer_than_peft_rounded_ones():
    ref = _tiny_llama(dtype=torch.bfloat16)
    theirs = _peft_layers(peft.get_peft_model(
        _tiny_llama(dtype=torch.bfloat16),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="pissa")))
    ours = _our_layers(apply_pissa(add_lora(_tiny_llama(dtype=torch.bfloat16), "all-linear", r=8, alpha=16)))
    ours_err = theirs_err = 0.0
    with torch.no_grad():
        for name, layer in ours.items():
            w0 = ref.get_submodule(name).weight.float()
            t = theirs[name]
            ours_err += (w0 - layer.base.weight.float() - layer.delta_weight()).norm() ** 2
            delta = t.scaling["default"] * t.lora_B["default"].weight @ t.lora_A["default"].weight
            theirs_err += (w0 - t.base_layer.weight.float() - delta).norm() ** 2
    assert ours_err < theirs_err


def test_pissa_init_on_one_weight_is_what_apply_pissa_puts_in_the_layer():
    model = add_lora(_tiny_llama(), ["q_proj"], r=4, alpha=8)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    w0 = layer.base.weight.detach().clone()
    factors = pissa_init(w0, 4, 8)
    apply_pissa(model)
    assert torch.equal(layer.base.weight, factors.residual)
    assert torch.equal(layer.lora_A, factors.lora_A) and torch.equal(layer.lora_B, factors.lora_B)
    # the top singular values, split evenly: s·B A is W0's best rank-4 part
    s = 8 / 4
    u, sv, vh = torch.linalg.svd(w0)
    torch.testing.assert_close(s * factors.lora_B @ factors.lora_A, (u[:, :4] * sv[:4]) @ vh[:4])
    torch.testing.assert_close(factors.lora_A.norm(dim=1), factors.lora_B.norm(dim=0))


def test_the_model_starts_where_it_was():
    """PiSSA moves W0's principal part into the adapter: same function, to float32 rounding
    of the residual (one subtraction per weight)."""
    ref = _pretrained()
    ids = torch.arange(64).view(2, 32)
    with torch.no_grad():
        expected = ref(ids).logits
        got = apply_pissa(add_lora(_pretrained(), "all-linear", r=8, alpha=16))(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_pissa_is_bitsandbytes_nf4_of_peft_residual(double_quant):
    """PEFT's recipe (PiSSA on the float model, then the residual loaded in 4 bits) and ours
    give the same 4-bit base, bitsandbytes' bytes."""
    theirs = _peft_layers(peft.get_peft_model(
        _tiny_llama(), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                       init_lora_weights="pissa")))
    ours = _our_layers(prepare_qlora(_tiny_llama(), "all-linear", r=8, alpha=16, init="pissa",
                                     double_quant=double_quant))
    for name, layer in ours.items():
        t = theirs[name]
        assert isinstance(layer.base, Linear4bit)
        ref = bnb_linear4bit(t.base_layer, torch.float32, "cpu", 64, double_quant)
        packed = layer.base.weight.packed
        assert torch.equal(packed, ref.weight.data.view(-1)), name
        assert torch.equal(layer.lora_A, t.lora_A["default"].weight)
        assert torch.equal(layer.lora_B, t.lora_B["default"].weight)


def test_qlora_pissa_starts_closer_to_the_float_model_than_qlora():
    ref = _pretrained()
    ids = torch.arange(100, 164).view(2, 32)
    with torch.no_grad():
        expected = ref(ids).logits
        plain = prepare_qlora(_pretrained(), r=16, alpha=16)(ids).logits
        pissa = prepare_qlora(_pretrained(), r=16, alpha=16, init="pissa")(ids).logits
    assert (pissa - expected).norm() < 0.8 * (plain - expected).norm()


def test_quantizing_the_residual_errs_less_than_quantizing_w0():
    """Paper §5: without its largest directions the residual has smaller outliers."""
    w0 = _pretrained().get_submodule("model.layers.1.self_attn.q_proj").weight.detach()
    factors = pissa_init(w0, 16, 16)
    err_w0 = (quantize_nf4(w0, double_quant=True).dequantize() - w0).norm()
    err_res = (quantize_nf4(factors.residual, double_quant=True).dequantize() - factors.residual).norm()
    assert err_res < err_w0


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(ValueError, match="float weight W0"):
        apply_pissa(prepare_qlora(_tiny_llama(), r=4, alpha=4))
    with pytest.raises(ValueError, match="add_lora"):
        apply_pissa(_tiny_llama())
    with pytest.raises(ValueError, match="niter"):
        apply_pissa(add_lora(_tiny_llama(), ["q_proj"], r=4, alpha=4), niter=-1)
    with pytest.raises(TypeError, match=r"layers must be \(name, LoRALinear\) pairs"):
        apply_pissa_to_layers([("q_proj", nn.Linear(8, 8))])
    with pytest.raises(ValueError, match="layers must not be empty"):
        apply_pissa_to_layers([])
    with pytest.raises(TypeError, match="weight"):
        pissa_init(quantize_nf4(torch.randn(8, 64)), 2, 2)
    with pytest.raises(TypeError, match=r"\.weight"):
        pissa_init(nn.Linear(8, 8), 2, 2)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        pissa_init(torch.randn(8, 8, dtype=torch.float64), 2, 2)
    with pytest.raises(ValueError, match="r must be at most"):
        pissa_init(torch.randn(8, 64), 9, 2)
    with pytest.raises(ValueError, match="alpha"):
        pissa_init(torch.randn(8, 64), 2, 0)
    model = add_lora(_tiny_llama(), ["q_proj"], r=4, alpha=4)
    model.get_submodule("model.layers.0.self_attn.q_proj").merge()
    before = model.get_submodule("model.layers.1.self_attn.q_proj").lora_A.detach().clone()
    with pytest.raises(ValueError, match="merged"):
        apply_pissa(model)
    # checked before anything changed: the other layer is untouched
    assert torch.equal(model.get_submodule("model.layers.1.self_attn.q_proj").lora_A, before)
