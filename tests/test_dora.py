"""Tests for DoRA (peftlab.dora, LoRALinear(use_dora=True), DoRA adapters in adapter_io) against PEFT 0.21.2
(chapter: book/chapters/variants.md).

Most comparisons are bit for bit (``torch.equal``): peftlab.dora runs PEFT's DoRA operations in PEFT's order
on the same tensors (the B·A product included, see ``peftlab.dora._lora_weight``), and the CPU kernels are
deterministic, so any difference is a difference in the computation, not rounding noise. Where two different
computations are compared (a merged layer against the unmerged one, unmerge against the original W0, the
init against a float64 norm) the tolerance is stated at the assertion.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftlab.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from peftlab.adapters import add_lora, disable_adapter, merge_lora
from peftlab.lora import LoRALinear

import peft
import transformers  # noqa: F401 - required: a missing reference library fails the tests

PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny LLaMA (2 layers, width 64), built locally and the same for a seed."""
    from peftlab.harness.pretrained import build_model

    model = build_model(0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4)
    return model.to(dtype)


def _peft_dora(model: nn.Module, r: int = 4, alpha: float = 8, rslora: bool = False, dropout: float = 0.0,
               targets=TARGETS):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                          lora_dropout=dropout, use_dora=True)
    return peft.get_peft_model(model, cfg)


def _peft_layers(theirs: nn.Module) -> dict[str, nn.Module]:
    return {n.removeprefix(PREFIX): m for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _ours_layers(ours: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}


def _randomize(ours: nn.Module, seed: int = 1) -> None:
    """B non-zero and the magnitude moved off ‖W0‖, so that every term of DoRA's forward matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _ours_layers(ours).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)
            m.lora_magnitude_vector.mul_(torch.rand(m.out_features, generator=gen) + 0.5)


def _copy_layer(m: LoRALinear, p: nn.Module) -> None:
    """Our layer's A, B and magnitude into PEFT's layer ``p``."""
    with torch.no_grad():
        p.lora_A["default"].weight.copy_(m.lora_A)
        p.lora_B["default"].weight.copy_(m.lora_B)
        p.lora_magnitude_vector["default"].weight.copy_(m.lora_magnitude_vector)


def _copy_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    layers = _peft_layers(theirs)
    assert set(layers) == set(_ours_layers(ours))
    for name, m in _ours_layers(ours).items():
        _copy_layer(m, layers[name])


def _twins(dtype=torch.float32, dropout=0.0, **kw):
    """Our DoRA tiny LLaMA and PEFT's, the same A, B (non-zero) and magnitude in both."""
    ours = add_lora(_llama(dtype), TARGETS, r=kw.get("r", 4), alpha=kw.get("alpha", 8), dropout=dropout,
                    rslora=kw.get("rslora", False), use_dora=True)
    theirs = _peft_dora(_llama(dtype), dropout=dropout, **kw)
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    return ours, theirs


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


# --- (5) the magnitude starts at the row norms of W0 ---------------------------------------------------


def test_magnitude_starts_at_the_row_norms_of_W0_like_peft():
    ours = add_lora(_llama(), TARGETS, r=4, alpha=8, use_dora=True)
    theirs = _peft_dora(_llama())
    peft_layers = _peft_layers(theirs)
    for name, m in _ours_layers(ours).items():
        assert m.lora_magnitude_vector.requires_grad and m.lora_magnitude_vector.shape == (m.out_features,)
        W0 = m.base.weight.detach()
        # against PEFT: the very same float32 numbers
        assert torch.equal(m.lora_magnitude_vector, peft_layers[name].lora_magnitude_vector["default"].weight)
        # against the definition, in float64: a float32 norm of 64-128 entries is within a few float32 ulps
        torch.testing.assert_close(m.lora_magnitude_vector.double(), W0.double().norm(dim=1), rtol=1e-6, atol=0)


def test_a_fresh_dora_layer_computes_the_base_output_exactly():
    ours = add_lora(_llama(), TARGETS, r=4, alpha=8, use_dora=True)
    ids = _ids()
    with disable_adapter(ours):
        base = ours(ids).logits
    # m / ‖W0‖ is exactly 1 and B A is zero: DoRA's extra term is exactly zero
    assert torch.equal(ours(ids).logits, base)


def test_16bit_base_starts_at_the_base_output_where_peft_rounds_the_magnitude_to_16_bits():
    """The one documented deviation: PEFT takes the initial norm in bfloat16 (before it upcasts the adapter),
    so its layer starts off the base output by that rounding; ours takes it in float32 and starts on it."""
    layer = nn.Linear(64, 32, dtype=torch.bfloat16)
    ours = LoRALinear(layer, 4, 8, use_dora=True)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert ours.lora_magnitude_vector.dtype == torch.float32
    assert torch.equal(ours(x), layer(x))
    holder = nn.Module()
    holder.layer = nn.Linear(64, 32, dtype=torch.bfloat16)
    holder.layer.load_state_dict(layer.state_dict())
    theirs = _peft_dora(holder, targets=["layer"]).base_model.model.layer
    peft_m = theirs.lora_magnitude_vector["default"].weight
    # PEFT's magnitude is a bfloat16 number: within half a bfloat16 ulp (2^-9 relative) of ours, yet not ours
    torch.testing.assert_close(peft_m, ours.lora_magnitude_vector, rtol=2**-8, atol=0)
    assert torch.equal(peft_m, peft_m.bfloat16().float()) and not torch.equal(peft_m, ours.lora_magnitude_vector)


# --- (1) forward, (2) gradients: bit for bit against PEFT --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rslora", [False, True])
def test_tiny_llama_logits_equal_peft_bit_for_bit(dtype, rslora):
    ours, theirs = _twins(dtype, rslora=rslora)
    ours.eval(), theirs.eval()
    ids = _ids()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert torch.equal(ours(ids).logits, expected)
        with disable_adapter(ours):  # the adapter changes the output: the comparison above is not vacuous
            assert not torch.allclose(ours(ids).logits, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_layer_forward_and_gradients_equal_peft_with_bias_and_dropout(dtype, bias, dropout):
    """Bias (taken off the base output again) and dropout (PEFT's DoRA recomputes W0 x on the dropped-out input)
    in training mode, the same dropout mask drawn from the same seed; and in eval mode, where dropout is off."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 24, bias=bias, dtype=dtype)
    holder = nn.Module()
    holder.layer = nn.Linear(48, 24, bias=bias, dtype=dtype)
    holder.layer.load_state_dict(layer.state_dict())
    theirs = _peft_dora(holder, dropout=dropout, targets=["layer"]).base_model.model.layer
    ours = LoRALinear(layer, 4, 8, dropout=dropout, use_dora=True)
    _randomize(ours)
    _copy_layer(ours, theirs)
    params = lambda m: ([m.lora_A, m.lora_B, m.lora_magnitude_vector] if m is ours else  # noqa: E731
                        [m.lora_A["default"].weight, m.lora_B["default"].weight,
                         m.lora_magnitude_vector["default"].weight])
    x = torch.randn(3, 5, 48, dtype=dtype)
    g = torch.randn(3, 5, 24, dtype=dtype)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        outs, grads = [], []
        for m in (ours, theirs):
            for p in params(m):
                p.grad = None
            xm = x.clone().requires_grad_()
            torch.manual_seed(7)  # the same dropout mask
            y = m(xm)
            y.backward(g)
            outs.append(y)
            grads.append([xm.grad] + [p.grad for p in params(m)])
        assert torch.equal(outs[0], outs[1])
        for mine, peft_grad in zip(*grads):
            assert torch.equal(mine, peft_grad)
        assert ours.base.weight.grad is None  # the base stays frozen


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_tiny_llama_gradients_of_A_B_and_magnitude_equal_peft_bit_for_bit(dropout):
    ours, theirs = _twins(dropout=dropout, rslora=True)
    ours.train(), theirs.train()
    ids = _ids(3)
    for model in (ours, theirs):
        torch.manual_seed(11)  # the same dropout masks, drawn in the same order
        model(input_ids=ids, labels=ids).loss.backward()
    peft_layers = _peft_layers(theirs)
    for name, m in _ours_layers(ours).items():
        p = peft_layers[name]
        assert m.lora_magnitude_vector.grad.abs().sum() > 0
        assert torch.equal(m.lora_A.grad, p.lora_A["default"].weight.grad), name
        assert torch.equal(m.lora_B.grad, p.lora_B["default"].weight.grad), name
        assert torch.equal(m.lora_magnitude_vector.grad, p.lora_magnitude_vector["default"].weight.grad), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_B_A_product_is_peft_dora_product_bit_for_bit(dtype):
    """PEFT's DoRA forms B A as lora_B(lora_A(I)).T; a plain B @ A differs from it in the last bit in float64
    (checked here, so that the test can tell the two apart), ours does not."""
    from peft.tuners.lora.dora import DoraLinearLayer

    from peftlab.dora import _lora_weight

    gen = torch.Generator().manual_seed(0)
    lora_A, lora_B = nn.Linear(128, 16, bias=False, dtype=dtype), nn.Linear(16, 256, bias=False, dtype=dtype)
    with torch.no_grad():
        lora_A.weight.copy_(torch.randn(16, 128, generator=gen))
        lora_B.weight.copy_(torch.randn(256, 16, generator=gen))
    expected = DoraLinearLayer(fan_in_fan_out=False).get_lora_weight(lora_A, lora_B)
    assert torch.equal(_lora_weight(lora_A.weight, lora_B.weight), expected)
    if dtype == torch.float64:
        assert not torch.equal(lora_B.weight @ lora_A.weight, expected)


def test_the_norm_is_detached_as_in_the_paper():
    """DoRA §4.3: the norm gets no gradient. With a live norm, m's gradient would be different: checked here
    against autograd through the undetached formula, which must disagree."""
    torch.manual_seed(2)
    layer = LoRALinear(nn.Linear(16, 8, dtype=torch.float64), 2, 4, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 16, dtype=torch.float64)
    layer(x).square().sum().backward()
    W0, A, B, m = (t.detach().clone() for t in (layer.base.weight, layer.lora_A, layer.lora_B,
                                                  layer.lora_magnitude_vector))
    A.requires_grad_(), B.requires_grad_()
    V = lambda: W0 + 2.0 * B @ A  # noqa: E731 - a fresh graph for each of the two backward passes
    detached = m.view(-1, 1) * V() / V().norm(dim=1, keepdim=True).detach()
    (x @ detached.T + layer.base.bias).square().sum().backward()
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-10, atol=1e-12)
    B.grad = None
    live = m.view(-1, 1) * V() / V().norm(dim=1, keepdim=True)
    (x @ live.T + layer.base.bias).square().sum().backward()
    assert not torch.allclose(layer.lora_B.grad, B.grad, rtol=1e-3, atol=1e-6)


# --- (3) adapters cross between peftlab and PEFT ---------------------------------------------------------


def test_ours_loads_in_peft_with_the_same_logits(tmp_path):
    ours, _ = _twins(rslora=True)
    ours.eval()
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(_llama(), tmp_path)
    assert set(_peft_layers(theirs)) == set(_ours_layers(ours))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, ours(ids).logits)


def test_peft_loads_here_with_the_same_logits_and_the_same_keys(tmp_path):
    _, theirs = _twins(dropout=0.05)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(_llama(), tmp_path / "peft")
    layer = ours.model.layers[1].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.use_dora and layer.dropout.p == 0.05
    ours.eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(input_ids=ids).logits)
    # and saved again here, the same file contents as PEFT's (keys, shapes, values)
    save_adapter(ours, tmp_path / "ours")
    peft_tensors, our_tensors = load_file(tmp_path / "peft" / WEIGHTS_NAME), load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert set(our_tensors) == set(peft_tensors)
    assert f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector" in our_tensors
    for key, value in peft_tensors.items():
        assert torch.equal(our_tensors[key], value), key


def test_dora_adapter_into_plain_lora_layers_and_back_is_refused(tmp_path):
    ours, _ = _twins()
    save_adapter(ours, tmp_path / "dora")
    plain = add_lora(_llama(), TARGETS, r=4, alpha=8)
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(plain, tmp_path / "dora")
    save_adapter(plain, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())["use_dora"] is False
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(add_lora(_llama(), TARGETS, r=4, alpha=8, use_dora=True), tmp_path / "lora")


def test_a_dora_config_without_magnitudes_is_refused_naming_the_missing_key(tmp_path):
    plain = add_lora(_llama(), TARGETS, r=4, alpha=8)
    save_adapter(plain, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        load_adapter(_llama(), tmp_path)


def test_save_refuses_a_model_mixing_dora_and_plain_layers(tmp_path):
    model = add_lora(_llama(), ["q_proj"], r=4, alpha=8, use_dora=True)
    add_lora(model, ["v_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="use_dora"):
        save_adapter(model, tmp_path)


# --- (4) merge and unmerge ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_peft_and_unmerge_restores_W0(dtype):
    ours, theirs = _twins(dtype)
    ours.eval(), theirs.eval()
    ids = _ids()
    with torch.no_grad():
        before = ours(ids).logits
    W0 = {n: m.base.weight.detach().clone() for n, m in _ours_layers(ours).items()}
    peft_layers = _peft_layers(theirs)
    for name, m in _ours_layers(ours).items():
        m.merge()
        peft_layers[name].merge()
        assert m.merged
        # PEFT's merge formula, the same operations: the same bits
        assert torch.equal(m.base.weight, peft_layers[name].base_layer.weight), name
    with torch.no_grad():
        after = ours(ids).logits
    assert torch.equal(after, theirs(input_ids=ids).logits)
    if dtype == torch.float32:
        # merged vs unmerged are different computations (one product with the merged weight instead of the
        # base product plus DoRA's term): float32 rounding through two blocks, measured ~1e-6
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    for name, m in _ours_layers(ours).items():
        m.unmerge()
        peft_layers[name].unmerge()
        assert not m.merged and m.dora_merge_norm is None
        assert torch.equal(m.base.weight, peft_layers[name].base_layer.weight), name
        # W' / f − ΔW with W' = f (W0 + ΔW) rounded: f is the same number both times, so what is left is the
        # rounding of W' (half an ulp of W0 + ΔW, after dividing by f), of the float32 steps and of the final
        # cast (half an ulp of W0): within 2 eps (|W0 + ΔW| + |W0|). A wrong unmerge is off by about |ΔW|.
        w0 = W0[name].double()
        V = w0 + m.delta_weight().double()
        bound = 2 * torch.finfo(dtype).eps * (V.abs() + w0.abs())
        assert ((m.base.weight.double() - w0).abs() <= bound).all(), name
        assert not torch.equal(V, w0)  # the update is not negligible: the bound means something
    with torch.no_grad():
        restored = ours(ids).logits
    if dtype == torch.float32:
        torch.testing.assert_close(restored, before, rtol=1e-4, atol=1e-4)


def test_merge_lora_gives_plain_linears_holding_peft_merge_and_unload(tmp_path):
    ours, theirs = _twins()
    ours.eval()
    ids = _ids()
    with torch.no_grad():
        before = ours(ids).logits
    merged_ours = merge_lora(ours)
    merged_theirs = theirs.merge_and_unload()
    assert not _ours_layers(merged_ours)
    for name, m in merged_theirs.named_modules():
        if name.endswith(tuple(TARGETS)):
            mine = merged_ours.get_submodule(name)
            assert type(mine) is nn.Linear and torch.equal(mine.weight, m.weight), name
    with torch.no_grad():
        # a different computation than the unmerged model (see the test above): float32 rounding
        torch.testing.assert_close(merged_ours(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_merge_lora_of_a_merged_dora_layer_keeps_the_merged_weight():
    torch.manual_seed(4)
    layer = LoRALinear(nn.Linear(16, 8), 2, 4, use_dora=True)
    _randomize(layer)
    layer.merge()
    merged = layer.base.weight.detach().clone()
    assert torch.equal(merge_lora(layer).weight, merged)


def test_disable_adapter_on_merged_dora_layers_gives_the_base_and_remerges():
    ours, theirs = _twins()
    ours.eval(), theirs.eval()
    ids = _ids()
    for m in _ours_layers(ours).values():
        m.merge()
    with torch.no_grad(), theirs.disable_adapter():
        expected = theirs(input_ids=ids).logits
    with torch.no_grad(), disable_adapter(ours):
        # unmerged on entry: W0 back to within a rounding, so close to (not equal to) PEFT's untouched base
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert all(m.merged for m in _ours_layers(ours).values())


# --- (6) a 4-bit base: ours (peftlab.qlora.Linear4bit) against PEFT on bitsandbytes' Linear4bit ----------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_4bit_base_equals_peft_on_bitsandbytes_linear4bit_bit_for_bit(bias, dropout):
    """PEFT supports DoRA on a bitsandbytes 4-bit base (it dequantizes the weight for the norm); so do we.
    in_features = 128 (whole blocks of 64 per row: bitsandbytes 0.50.2's CPU kernels are right there)."""
    import bitsandbytes  # noqa: F401 - required: a missing reference library fails the tests
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from peftlab.qlora import Linear4bit, bnb_linear4bit

    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=bias)
    holder = nn.Module()
    holder.layer = bnb_linear4bit(lin, torch.float32, "cpu")
    holder.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps bitsandbytes' layer
    theirs = _peft_dora(holder, dropout=dropout, targets=["layer"]).base_model.model.layer
    assert type(theirs).__module__ == "peft.tuners.lora.bnb"
    ours = LoRALinear(Linear4bit.from_linear(lin, compute_dtype=torch.float32), 4, 8, dropout=dropout, use_dora=True)
    # the initial magnitude: the norms of the dequantized weight, the same bits as PEFT's
    assert torch.equal(ours.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)
    _randomize(ours)
    _copy_layer(ours, theirs)
    x = torch.randn(3, 5, 128)
    g = torch.randn(3, 5, 64)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        results = []
        for m, params in ((ours, [ours.lora_A, ours.lora_B, ours.lora_magnitude_vector]),
                          (theirs, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                                    theirs.lora_magnitude_vector["default"].weight])):
            for p in params:
                p.grad = None
            xm = x.clone().requires_grad_()
            torch.manual_seed(7)
            y = m(xm)
            y.backward(g)
            results.append([y, xm.grad] + [p.grad.clone() for p in params])
        for mine, peft_value in zip(*results):
            assert torch.equal(mine, peft_value)
    with pytest.raises(ValueError, match="Linear4bit"):
        ours.merge()  # merging into 4 bits stays refused
    with pytest.raises(ValueError, match="Linear4bit"):
        merge_lora(ours)


def test_add_lora_with_dora_on_a_quantized_tiny_llama_starts_at_its_output():
    from peftlab.qlora import quantize_model

    model = quantize_model(_llama(), TARGETS, compute_dtype=torch.float32, progress=False)
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    add_lora(model, TARGETS, r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


# --- (7) bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, "yes", None, 1.0])
def test_use_dora_must_be_a_bool_naming_it(value):
    with pytest.raises(TypeError, match="use_dora"):
        LoRALinear(nn.Linear(4, 4), 2, 4, use_dora=value)
    model = _llama()
    with pytest.raises(TypeError, match="use_dora"):
        add_lora(model, TARGETS, r=2, alpha=4, use_dora=value)
    assert not _ours_layers(model) and all(p.requires_grad for p in model.parameters())


class _Packed(nn.Module):
    """A linear-like layer (peftlab_linear) with no dense weight DoRA could read."""

    peftlab_linear = True

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 4, 3
        self.register_buffer("packed", torch.zeros(3, 4, dtype=torch.uint8))

    def forward(self, x):
        return x @ self.packed.T.to(x.dtype)


def test_dora_on_a_base_without_a_dense_weight_is_refused_and_the_model_untouched():
    LoRALinear(_Packed(), 2, 4)  # plain LoRA wraps it
    with pytest.raises(TypeError, match="use_dora"):
        LoRALinear(_Packed(), 2, 4, use_dora=True)
    model = nn.Sequential(nn.Linear(4, 4), _Packed())
    with pytest.raises(TypeError, match="use_dora"):
        add_lora(model, ["0", "1"], r=2, alpha=4, use_dora=True)
    assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters())
