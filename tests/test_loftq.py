"""Tests for peftlab.loftq against PEFT 0.21.2's LoftQ (chapter: book/chapters/variants.md).

PEFT 0.21.2's ``loftq_init`` (and ``_loftq_init_new``, behind ``replace_lora_weights_loftq``)
quantizes with bitsandbytes' NF4 on a hard-coded ``"cuda"`` (or ``"xpu"``) device: on a CPU
it stops at ``weight.to("cuda")`` ("Torch not compiled with CUDA enabled"); its own
``NFQuantizer`` was removed in PEFT 0.20. So the reference here is PEFT's own source with that
one line changed to ``"cpu"`` (:func:`_peft_on_cpu`): bitsandbytes' CPU NF4 and PEFT's loop,
SVD and factor split, unchanged.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from torch import nn

from peftlab.adapters import add_lora
from peftlab.lora import LoRALinear, lora_scaling
from peftlab.loftq import (
    apply_loftq,
    apply_loftq_to_layers,
    loftq_init,
    low_rank_factors,
    replace_lora_weights_loftq,
)
from peftlab.nf4 import dequantize_nf4, quantize_nf4, to_bnb
from peftlab.prepare import prepare_qlora
from peftlab.qlora import Linear4bit

import peft
import peft.tuners.lora.layer as peft_layer  # noqa: E402
import peft.utils.loftq_utils as peft_loftq  # noqa: E402

_DEVICE_LINE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


def _peft_on_cpu(fn):
    """PEFT's ``fn`` from its own source with its compute device set to the CPU."""
    source = inspect.getsource(fn)
    assert source.count(_DEVICE_LINE) == 1, "PEFT's LoftQ changed: revisit this reference"
    namespace = dict(vars(peft_loftq))
    exec(source.replace(_DEVICE_LINE, 'compute_device = "cpu"'), namespace)  # noqa: S102
    return namespace[fn.__name__]


def test_peft_loftq_does_not_run_on_a_cpu_as_released():
    if torch.cuda.is_available():
        pytest.skip("this documents the CPU-only case")
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        peft_loftq.loftq_init(torch.randn(64, 64), num_bits=4, reduced_rank=4)


def _tiny_llama(seed: int = 0):
    from peftlab.harness.pretrained import build_model

    return build_model(seed, num_hidden_layers=2)


def _pretrained():
    from peftlab.harness.pretrained import load_pretrained

    return load_pretrained()


def _our_layers(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# (out, in): LLaMA-like shapes whose rows are whole blocks of 64 (bitsandbytes' CPU kernels
# need that: see tests/_reference.py); the third is wider than tall
SHAPES = [(192, 192), (512, 192), (192, 512)]


@pytest.mark.parametrize("num_iter", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_loftq_init_equals_peft_loftq_init_exactly(shape, num_iter):
    """Without double quantization (PEFT quantizes with compress_statistics=False) and with
    scaling 1 (PEFT ignores it): the same Q and the same factors, bit for bit: the NF4 bytes
    are bitsandbytes' and the loop, SVD and split are PEFT's."""
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    deq, lora_A, lora_B = _peft_on_cpu(peft_loftq.loftq_init)(w, num_bits=4, reduced_rank=8, num_iter=num_iter)
    ours = loftq_init(w, 8, 8, num_iter=num_iter, double_quant=False)
    assert torch.equal(dequantize_nf4(ours.quantized, torch.float32), deq)
    assert torch.equal(ours.lora_A, lora_A) and torch.equal(ours.lora_B, lora_B)


def test_a_peft_loftq_model_equals_prepare_qlora_with_loftq_init(monkeypatch):
    """The whole model: PEFT's LoraConfig(init_lora_weights="loftq") on a tiny LLaMA (with its
    LoftQ run on the CPU) and ours: every layer's factors, and our 4-bit base dequantized is
    PEFT's base weight (PEFT keeps deq(Q) as a float weight, to be quantized again on loading).

    PEFT's config asks for scipy, which its LoftQ no longer uses; it is not installed here."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "scipy" else find_spec(name, *a))
    monkeypatch.setattr(peft_layer, "loftq_init", _peft_on_cpu(peft_loftq.loftq_init))
    cfg = peft.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq",
                          loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2))
    theirs = {n.removeprefix("base_model.model."): m
              for n, m in peft.get_peft_model(_tiny_llama(), cfg).named_modules()
              if isinstance(m, peft_layer.LoraLayer)}
    ours = _our_layers(prepare_qlora(_tiny_llama(), "all-linear", r=8, alpha=8, init="loftq",
                                     num_iter=2, double_quant=False))
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name, layer in ours.items():
        t = theirs[name]
        assert isinstance(layer.base, Linear4bit)
        assert torch.equal(layer.base.dequantize(torch.float32), t.base_layer.weight), name
        assert torch.equal(layer.lora_A, t.lora_A["default"].weight), name
        assert torch.equal(layer.lora_B, t.lora_B["default"].weight), name


@pytest.mark.parametrize("alpha", [16, 2])
def test_the_scaled_adapter_is_peft_unscaled_one(alpha):
    """PEFT leaves the LoRA scaling out (huggingface/peft#1982): its B A is the SVD's
    approximation, so the layer adds s times it. Ours divides s out: s·B A is the same
    approximation (to float32 rounding of √(S/s)), whatever alpha is."""
    torch.manual_seed(1)
    w = torch.randn(192, 192) * 0.02
    r = 8
    s = lora_scaling(alpha, r)
    deq, lora_A, lora_B = _peft_on_cpu(peft_loftq.loftq_init)(w, num_bits=4, reduced_rank=r, num_iter=1)
    ours = loftq_init(w, r, alpha, double_quant=False)
    torch.testing.assert_close(s * ours.lora_B @ ours.lora_A, lora_B @ lora_A, rtol=1e-5, atol=1e-7)

    def err(delta):
        return (w - deq - delta).norm()

    # PEFT's layer adds s·(its B A): with s = 2 that is E − 2P for the rank-r part P of the
    # error E, exactly as far from W0 as no adapter at all (‖E − 2P‖ = ‖E‖: P ⟂ E − P)
    assert err(s * ours.lora_B @ ours.lora_A) < 0.99 * err(0)
    if s == 2:
        torch.testing.assert_close(err(s * lora_B @ lora_A), err(0), rtol=1e-4, atol=0)


def test_replace_lora_weights_loftq_equals_peft_on_our_4bit_model():
    """A model already 4-bit (with double quantization, QLoRA's default) and the float weights:
    PEFT's one-step _loftq_init_new on our Q (handed to it as bitsandbytes' QuantState) gives our
    factors exactly; scaling 1 again, as PEFT ignores it."""
    float_weights = {k: v.clone() for k, v in _tiny_llama().state_dict().items()}
    model = replace_lora_weights_loftq(prepare_qlora(_tiny_llama(), r=8, alpha=8), float_weights)
    peft_new = _peft_on_cpu(peft_loftq._loftq_init_new)
    for name, layer in _our_layers(model).items():
        packed, state = to_bnb(layer.base.weight)
        qweight = nn.Parameter(packed, requires_grad=False)
        qweight.quant_state = state
        lora_A, lora_B = peft_new(qweight, float_weights[f"{name}.weight"], num_bits=4, reduced_rank=8)
        assert torch.equal(layer.lora_A, lora_A) and torch.equal(layer.lora_B, lora_B), name


def _errors(w: torch.Tensor, r: int, alpha: float, iters):
    s = lora_scaling(alpha, r)
    zero = (w - quantize_nf4(w, double_quant=True).dequantize()).norm().item()
    out = []
    for k in iters:
        f = loftq_init(w, r, alpha, num_iter=k)
        out.append((w - f.quantized.dequantize(torch.float32) - s * f.lora_B @ f.lora_A).norm().item())
    return zero, out


@pytest.mark.parametrize("r", [4, 16, 64])
def test_loftq_errs_less_than_qlora_zero_start_and_more_iterations_help(r):
    """‖W0 − (deq(Q) + s·B A)‖ on the pretrained model's layers: below QLoRA's ‖W0 − deq(Q)‖
    from one iteration on. More iterations lower it from 1 to 2 and 3, but are not a descent
    method (Q is nearest rounding with its own block scales, not the minimizer given B A):
    measured, at r = 64 on q_proj 5 iterations end 0.1 % above 3. So later ones are allowed
    to rise by 0.5 %, never above the first."""
    model = _pretrained()
    for name in ["model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj"]:
        w = model.get_submodule(name).weight.detach()
        zero, errs = _errors(w, r, 16, [1, 2, 3, 5])
        assert errs[0] < zero, name
        assert errs[1] < errs[0] and errs[2] < errs[1], (name, errs)
        assert errs[3] <= 1.005 * errs[2] and errs[3] < errs[0], (name, errs)


def test_loftq_model_starts_closer_to_the_float_model_than_qlora():
    """Logits on printable bytes at step 0, QLoRA's r = 16, alpha = 16. Note: less weight
    error is not always less output error: 5 iterations beat 1 in every layer's weight error
    but not always in the logits (measured on these ids: 1: 0.034, 2: 0.032, 5: 0.033
    relative; QLoRA 0.040), so only "closer than QLoRA" is asserted for them."""
    ref = _pretrained()
    ids = torch.randint(32, 127, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        plain = prepare_qlora(_pretrained(), r=16, alpha=16)(ids).logits
        loftq = prepare_qlora(_pretrained(), r=16, alpha=16, init="loftq")(ids).logits
        loftq5 = prepare_qlora(_pretrained(), r=16, alpha=16, init="loftq", num_iter=5)(ids).logits
    plain_err = (plain - expected).norm()
    assert (loftq - expected).norm() < 0.9 * plain_err
    assert (loftq5 - expected).norm() < 0.9 * plain_err


def test_apply_loftq_equals_loftq_init_and_keeps_bias_and_layer_settings():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    holder = nn.Module()
    holder.proj = lin
    model = apply_loftq(add_lora(holder, ["proj"], r=4, alpha=8, rslora=True), num_iter=2,
                        compute_dtype=torch.bfloat16)
    layer = model.proj
    f = loftq_init(lin.weight, 4, 8, rslora=True, num_iter=2)
    assert torch.equal(layer.base.weight.packed, f.quantized.packed)
    assert torch.equal(layer.lora_A, f.lora_A) and torch.equal(layer.lora_B, f.lora_B)
    assert torch.equal(layer.base.bias, lin.bias) and layer.base.compute_dtype == torch.bfloat16
    assert layer.base.weight.double_quant and layer.scaling == 8 / 2


def test_a_16bit_weight_gives_a_base_recording_its_dtype():
    w = (torch.randn(64, 128) * 0.02).to(torch.bfloat16)
    f = loftq_init(w, 4, 4)
    assert f.quantized.dtype == torch.bfloat16 and f.lora_A.dtype == torch.float32
    assert f.quantized.dequantize().dtype == torch.bfloat16


def test_low_rank_factors_are_the_truncated_svd_with_the_scaling_divided_out():
    torch.manual_seed(2)
    e = torch.randn(48, 80)
    lora_A, lora_B = low_rank_factors(e, 5, 0.5)
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    torch.testing.assert_close(0.5 * lora_B @ lora_A, (u[:, :5] * s[:5]) @ vh[:5])


def test_bad_inputs_name_what_is_wrong():
    w = torch.randn(64, 128)
    with pytest.raises(TypeError, match="weight must be the float weight W0"):
        loftq_init(quantize_nf4(w), 4, 4)
    with pytest.raises(TypeError, match="weight must be the float weight W0"):
        loftq_init(Linear4bit.from_linear(nn.Linear(128, 64)), 4, 4)
    with pytest.raises(TypeError, match=r"\.weight"):
        loftq_init(nn.Linear(128, 64), 4, 4)
    with pytest.raises(ValueError, match="2-D"):
        loftq_init(torch.randn(128), 4, 4)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        loftq_init(w.double(), 4, 4)
    with pytest.raises(ValueError, match="num_iter"):
        loftq_init(w, 4, 4, num_iter=0)
    with pytest.raises(TypeError, match="num_iter"):
        loftq_init(w, 4, 4, num_iter=1.0)
    with pytest.raises(ValueError, match="r must be at most"):
        loftq_init(w, 65, 4)
    with pytest.raises(ValueError, match="alpha"):
        loftq_init(w, 4, 0)
    with pytest.raises(ValueError, match="num_iter"):
        apply_loftq(add_lora(_tiny_llama(), ["q_proj"], r=4, alpha=4), num_iter=0)
    with pytest.raises(ValueError, match="num_iter"):
        prepare_qlora(_tiny_llama(), init="loftq", num_iter=-1)
    with pytest.raises(TypeError, match=r"layers must be \(name, LoRALinear\) pairs"):
        apply_loftq_to_layers([("q_proj", nn.Linear(8, 8))])
    with pytest.raises(ValueError, match="layers must not be empty"):
        apply_loftq_to_layers([])
    with pytest.raises(ValueError, match="already 4-bit"):
        apply_loftq(prepare_qlora(_tiny_llama(), r=4, alpha=4))
    with pytest.raises(ValueError, match="add_lora"):
        apply_loftq(_tiny_llama())
    float_lora = add_lora(_tiny_llama(), ["q_proj"], r=4, alpha=4)
    with pytest.raises(ValueError, match="needs a 4-bit model"):
        replace_lora_weights_loftq(float_lora, _tiny_llama().state_dict())
    qlora = prepare_qlora(_tiny_llama(), ["q_proj"], r=4, alpha=4)
    with pytest.raises(ValueError, match="q_proj.weight"):
        replace_lora_weights_loftq(qlora, {})
    with pytest.raises(TypeError, match="weights must be a mapping"):
        replace_lora_weights_loftq(qlora, [torch.randn(4)])


def test_a_refused_model_is_left_unchanged():
    model = add_lora(_tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=4)
    model.get_submodule("model.layers.1.self_attn.v_proj").merge()
    first = model.get_submodule("model.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="merged"):
        apply_loftq(model)
    assert isinstance(first.base, nn.Linear) and not first.lora_B.any()
