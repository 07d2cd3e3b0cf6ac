"""Tests of peftlab.qlora against bitsandbytes' Linear4bit, PEFT's LoRA and torch autograd."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _reference import bnb_dequantize_4bit, bnb_dequantize_4bit_flat  # tests/_reference.py
from peftlab.lora import LLAMA_LINEARS, LoRALinear, add_lora, count_parameters
from peftlab.nf4 import quantize_nf4, to_bnb
from peftlab.memory import count_saved_bytes
from peftlab.qlora import Linear4bit, bnb_linear4bit, quantize_model

ALL_LINEARS = list(LLAMA_LINEARS)  # the package's one list of LLaMA's seven linear layers
SHAPES = [(96, 128), (64, 100), (33, 7), (256, 64)]  # (out, in); 7 × 33 and 100 × 64 end in partial blocks


def _linear(out_f, in_f, bias=True, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(device)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_bitsandbytes_linear4bit(shape, blocksize, double_quant, compute_dtype):
    lin = _linear(*shape)
    ours = Linear4bit.from_linear(lin, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
    ref = bnb_linear4bit(lin, compute_dtype, "cpu", blocksize, double_quant)
    x = torch.randn(3, 5, shape[1])
    with torch.no_grad():
        w = bnb_dequantize_4bit_flat(ref.weight.data, ref.weight.quant_state)  # flattened: see tests/_reference.py
        assert torch.equal(ours.dequantize(torch.float32), w.float())
        expected = F.linear(x.to(compute_dtype), w.to(compute_dtype), lin.bias.to(compute_dtype)).float()
        assert torch.equal(ours(x), expected)
        if shape[1] % blocksize == 0:  # the LLaMA case: blocks never cross rows
            assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_input_gradient_equals_autograd_through_the_dequantized_weight(shape, compute_dtype):
    lin = _linear(*shape)
    ours = Linear4bit.from_linear(lin, compute_dtype=compute_dtype)
    w = ours.dequantize().clone()
    x = torch.randn(4, shape[1], requires_grad=True)
    g = torch.randn(4, shape[0])
    ours(x).backward(g)
    ours_grad, x.grad = x.grad, None
    (x.to(compute_dtype) @ w.t() + lin.bias.detach().to(compute_dtype)).to(x.dtype).backward(g)
    assert torch.equal(ours_grad, x.grad)


@pytest.mark.parametrize("shape", SHAPES)
def test_bnb_kernels_give_the_torch_paths_output_and_input_gradient(shape):
    lin = _linear(*shape)
    a = Linear4bit.from_linear(lin, kernels="torch")
    b = Linear4bit.from_linear(lin, kernels="bnb")
    x = torch.randn(6, shape[1], requires_grad=True)
    ya = a(x)
    ya.sum().backward()
    ga, x.grad = x.grad, None
    yb = b(x)
    yb.sum().backward()
    assert torch.equal(ya, yb) and torch.equal(ga, x.grad)


def test_nothing_weight_sized_is_saved_for_backward():
    lin = _linear(512, 256)
    ours = Linear4bit.from_linear(lin)
    x = torch.randn(4, 256, requires_grad=True)
    with count_saved_bytes() as saved:
        ours(x)
    assert saved.nbytes == 0  # neither x (the weight is frozen) nor the dequantized 512 × 256 weight


def test_moves_and_casts_change_the_compute_dtype_but_never_requantize():
    ours = Linear4bit.from_linear(_linear(64, 128))
    packed, absmax = ours.weight.packed, ours.weight.absmax
    before = ours.dequantize(torch.float32)
    ours.to(torch.bfloat16)
    assert ours.compute_dtype == torch.bfloat16 and ours.weight.packed is packed and ours.weight.absmax is absmax
    x = torch.randn(2, 128)
    assert ours(x).dtype == torch.float32  # output in the input's dtype, as bitsandbytes does
    ours.float().to("cpu")
    assert ours.compute_dtype == torch.float32 and torch.equal(ours.dequantize(torch.float32), before)
    ours.half()
    assert ours.compute_dtype == torch.float16 and ours.weight.packed is packed


def test_parameter_counts_include_the_4bit_weight_as_logical_parameters():
    lin = _linear(96, 128)
    ours = Linear4bit.from_linear(lin)
    assert list(ours.parameters()) == []
    assert count_parameters(ours).total == 96 * 128 + 96
    wrapped = LoRALinear(ours, r=4, alpha=8)
    assert count_parameters(wrapped) == (4 * (96 + 128), 96 * 128 + 96 + 4 * (96 + 128))


def test_lora_merge_refuses_a_4bit_base_saying_to_dequantize_first():
    wrapped = LoRALinear(Linear4bit.from_linear(_linear(16, 64)), r=2, alpha=2)
    with pytest.raises(ValueError, match="cannot merge into a Linear4bit base: dequantize it"):
        wrapped.merge()


# ----------------------------------------------------------------------------------------- whole models


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                   num_key_value_heads=4, num_hidden_layers=2, vocab_size=256, use_cache=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def test_quantize_model_replaces_the_blocks_linears_but_not_lm_head():
    model = _tiny_llama()
    total = count_parameters(model).total
    quantize_model(model, progress=False)
    q = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(q) == 2 * 7 and all(n.split(".")[-1] in ALL_LINEARS for n in q)
    assert isinstance(model.lm_head, nn.Linear)
    assert count_parameters(model).total == total


def test_qlora_model_equals_peft_lora_on_the_dequantized_weights():
    peft = pytest.importorskip("peft")
    model = quantize_model(_tiny_llama(), progress=False)
    add_lora(model, ALL_LINEARS, r=4, alpha=8)
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.02)  # B = 0 would make the adapters invisible
    # reference: a plain model holding exactly the dequantized weights, adapted by PEFT
    ref = _tiny_llama()
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            ref.get_submodule(n).weight.data.copy_(m.base.dequantize(torch.float32))
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEARS))
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            layer = ref.base_model.model.get_submodule(n)
            layer.lora_A["default"].weight.data.copy_(m.lora_A)
            layer.lora_B["default"].weight.data.copy_(m.lora_B)
    x = torch.randint(0, 256, (2, 16))
    ours, theirs = model(input_ids=x, labels=x), ref(input_ids=x, labels=x)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            layer = ref.base_model.model.get_submodule(n)
            torch.testing.assert_close(m.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(m.lora_B.grad, layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_quantize_model_replaces_only_the_named_targets():
    model = quantize_model(_tiny_llama(), ["q_proj", "v_proj"], progress=False)
    q = [n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert sorted(q) == ["q_proj", "q_proj", "v_proj", "v_proj"]


# -------------------------------------------------------------------------------------------- bad input


def test_quantize_model_refuses_non_linear_lm_head_unknown_and_already_quantized_targets():
    model = _tiny_llama()
    with pytest.raises(TypeError, match="nn.Linear"):
        quantize_model(model, ["mlp"], progress=False)  # a non-Linear target
    with pytest.raises(ValueError, match="lm_head"):
        quantize_model(model, ["lm_head"], progress=False)
    with pytest.raises(ValueError, match="no module"):
        quantize_model(model, ["nope"], progress=False)
    quantize_model(model, progress=False)
    with pytest.raises(ValueError, match="already"):
        quantize_model(model, ["q_proj"], progress=False)
    with pytest.raises(ValueError, match="already"):
        quantize_model(model, progress=False)
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        quantize_model(model, [], progress=False)
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        quantize_model(model, ["q_proj", ""], progress=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_model("model")


def test_linear4bit_refuses_requantizing_bad_inputs_weights_bias_kernels_and_dtype_naming_them():
    layer = Linear4bit.from_linear(_linear(16, 64))
    with pytest.raises(ValueError, match="already"):
        Linear4bit.from_linear(layer)
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(2, 65))
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="NF4Tensor"):
        Linear4bit(torch.randn(4, 4))
    with pytest.raises(ValueError, match="kernels"):
        Linear4bit.from_linear(_linear(4, 64), kernels="triton")
    with pytest.raises(TypeError, match="compute_dtype"):
        Linear4bit.from_linear(_linear(4, 64), compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="2-D"):
        Linear4bit(quantize_nf4(torch.randn(64)))
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(16,\)"):
        Linear4bit(layer.weight, bias=torch.zeros(15))
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(16,\)"):
        Linear4bit(layer.weight, bias=[0.0] * 16)


# -------------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_bnb_kernels_equal_the_torch_path_and_bnb_dequantization(shape):
    lin = _linear(*shape)
    ours = Linear4bit.from_linear(lin).to("cuda")  # quantized on the CPU (bit-identical to bnb), then moved
    assert ours.compute_dtype == torch.float32 and ours.weight.device.type == "cuda"
    ours.to(torch.bfloat16)
    fast = Linear4bit.from_linear(lin, kernels="bnb").to("cuda").to(torch.bfloat16)
    assert torch.equal(ours.weight.packed, fast.weight.packed)
    packed, state = to_bnb(ours.weight)
    w = bnb_dequantize_4bit(packed, state).view(shape)  # bitsandbytes' CUDA dequantization
    assert torch.equal(ours.dequantize(torch.float32), w.float())
    x = torch.randn(8, shape[1], device="cuda", dtype=torch.bfloat16)
    expected = F.linear(x, w.to(torch.bfloat16), lin.bias.to("cuda", torch.bfloat16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(fast(x), expected, rtol=1.6e-2, atol=1e-2)  # fused kernel, bf16 sums
    xg = x.clone().requires_grad_()
    fast(xg).float().sum().backward()
    g_fast, xg.grad = xg.grad, None
    ours(xg).float().sum().backward()
    torch.testing.assert_close(g_fast, xg.grad, rtol=1.6e-2, atol=1e-2)


def test_bnb_linear4bit_refuses_non_linear():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        bnb_linear4bit(nn.Conv1d(4, 4, 1))
