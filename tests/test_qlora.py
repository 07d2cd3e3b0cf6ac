"""Tests of peftlab.qlora against bitsandbytes' Linear4bit, PEFT's LoRA and torch autograd."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _reference import bnb_dequantize_4bit, bnb_dequantize_4bit_flat  # tests/_reference.py
from peftlab.adapters import add_lora, count_parameters
from peftlab.lora import LoRALinear
from peftlab.nf4 import quantize_nf4, to_bnb
from peftlab.measure import count_saved_bytes
from peftlab.qlora import Linear4bit, bnb_linear4bit, quantize_model
from peftlab.targets import LLAMA_LINEARS

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


def test_casts_leave_the_compute_dtype_and_only_set_compute_dtype_changes_it_never_requantizing():
    from peftlab.qlora import set_compute_dtype

    ours = Linear4bit.from_linear(_linear(64, 128))
    packed, absmax = ours.weight.packed, ours.weight.absmax
    before = ours.dequantize(torch.float32)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float16)):
        cast(ours)
        assert ours.compute_dtype == torch.float32 and ours.weight.packed is packed and ours.weight.absmax is absmax
    assert ours.set_compute_dtype(torch.bfloat16) is ours and ours.compute_dtype == torch.bfloat16
    x = torch.randn(2, 128)
    assert ours(x).dtype == torch.float32  # output in the input's dtype, as bitsandbytes does
    assert torch.equal(ours.dequantize(torch.float32), before) and ours.weight.packed is packed
    # a model cast to 16 bits for its other parts keeps its 4-bit layers' compute dtype
    model = quantize_model(_tiny_llama(), compute_dtype=torch.float32, progress=False).to(torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert model.lm_head.weight.dtype == torch.bfloat16 and {m.compute_dtype for m in layers} == {torch.float32}
    assert set_compute_dtype(model, torch.float16) is model and {m.compute_dtype for m in layers} == {torch.float16}
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        ours.set_compute_dtype(torch.float64)
    with pytest.raises(TypeError, match="dtype must be"):
        set_compute_dtype(model, "bfloat16")
    with pytest.raises(ValueError, match="no Linear4bit"):
        set_compute_dtype(nn.Sequential(nn.Linear(4, 4)), torch.float32)
    assert ours.compute_dtype == torch.bfloat16 and {m.compute_dtype for m in layers} == {torch.float16}


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
    import transformers
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
    import peft
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
    ours.set_compute_dtype(torch.bfloat16)
    fast = Linear4bit.from_linear(lin, kernels="bnb").to("cuda").set_compute_dtype(torch.bfloat16)
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


# --- state_dict: save and load the 4-bit weight -------------------------------------------------------


def _quantized(shape, blocksize=64, double_quant=True, seed=0, bias=True):
    return Linear4bit.from_linear(_linear(*shape, bias=bias, seed=seed), blocksize=blocksize,
                                  double_quant=double_quant, compute_dtype=torch.float32)


def _same_weight(a, b):
    qa, qb = a.weight, b.weight
    assert (qa.shape, qa.dtype, qa.blocksize, qa.double_quant) == (qb.shape, qb.dtype, qb.blocksize, qb.double_quant)
    assert torch.equal(qa.packed, qb.packed)
    if qa.double_quant:
        for name in ("codes", "absmax2", "offset"):
            assert torch.equal(getattr(qa.absmax, name), getattr(qb.absmax, name))
        assert qa.absmax.blocksize2 == qb.absmax.blocksize2
    else:
        assert torch.equal(qa.absmax, qb.absmax)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_state_dict_round_trips_bit_for_bit(shape, double_quant):
    one = _quantized(shape, double_quant=double_quant, seed=0)
    two = _quantized(shape, double_quant=double_quant, seed=1)
    assert not torch.equal(one.weight.packed, two.weight.packed)
    two.load_state_dict(one.state_dict())
    _same_weight(one, two)
    x = torch.randn(4, shape[1])
    with torch.no_grad():
        assert torch.equal(one(x), two(x))
    assert torch.equal(one.bias, two.bias)


def test_state_dict_keys_follow_bitsandbytes():
    packed_n = (96 * 128 + 1) // 2
    sd = _quantized((96, 128)).state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (packed_n, 1)
    assert sd["weight.absmax"].dtype == torch.uint8 and sd["weight.absmax"].shape == (96 * 128 // 64,)
    assert sd["weight.nested_absmax"].shape == (1,)  # 192 codes: one block of 256
    sd = _quantized((96, 128), double_quant=False, bias=False).state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    assert sd["weight.absmax"].dtype == torch.float32


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_keys_and_values_equal_bitsandbytes_linear4bit(double_quant):
    lin = _linear(96, 128)
    ref = bnb_linear4bit(lin, torch.float32, "cpu", 64, double_quant)
    ours = Linear4bit.from_linear(lin, double_quant=double_quant, compute_dtype=torch.float32)
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert set(theirs) == set(mine)
    for k in theirs:
        if k.endswith("bitsandbytes__nf4"):
            import json
            assert json.loads(bytes(theirs[k].tolist())) == json.loads(bytes(mine[k].tolist()))
        else:
            assert torch.equal(theirs[k].reshape(mine[k].shape).to(mine[k].dtype), mine[k]), k


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_bitsandbytes_state_dict_loads_into_ours_and_ours_into_bitsandbytes(double_quant):
    from bitsandbytes.functional import QuantState, dequantize_4bit

    from peftlab.nf4 import from_bnb

    lin = _linear(96, 128)
    ref = bnb_linear4bit(lin, torch.float32, "cpu", 64, double_quant)
    ours = _quantized((96, 128), double_quant=double_quant, seed=3)
    ours.load_state_dict(ref.state_dict())
    expected = from_bnb(ref.weight.data, ref.weight.quant_state)
    assert torch.equal(ours.weight.packed, expected.packed)
    assert torch.equal(ours.dequantize(torch.float32), bnb_dequantize_4bit_flat(ref.weight.data, ref.weight.quant_state).float())
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    # and back: bitsandbytes rebuilds its QuantState from our keys (what transformers does on loading)
    sd = ours.state_dict()
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    state = QuantState.from_dict(stats, device=torch.device("cpu"))
    assert torch.equal(dequantize_4bit(sd["weight"], state).float(), ours.dequantize(torch.float32))


@pytest.mark.parametrize("other, what", [
    (dict(shape=(64, 128)), "shape"),
    (dict(blocksize=128), "blocksize"),
    (dict(double_quant=False), "double_quant"),
])
def test_loading_another_format_is_a_value_error_naming_it(other, what):
    base = dict(shape=(96, 128), blocksize=64, double_quant=True)
    src = _quantized(**{**base, **other})
    dst = _quantized(**base)
    before = dst.weight
    with pytest.raises(ValueError, match=what):
        dst.load_state_dict(src.state_dict())
    assert dst.weight is before


def test_loading_another_blocksize2_is_a_value_error():
    from dataclasses import replace

    from peftlab.double_quant import quantize_absmax

    src = _quantized((96, 128))
    q = quantize_nf4(_linear(96, 128).weight.detach(), blocksize=64, double_quant=False)
    src.weight = replace(q, absmax=quantize_absmax(q.absmax, blocksize2=128))
    with pytest.raises(ValueError, match="blocksize2"):
        _quantized((96, 128)).load_state_dict(src.state_dict())


def test_missing_and_unexpected_keys_are_reported():
    sd = _quantized((96, 128)).state_dict()
    del sd["weight.absmax"]
    with pytest.raises(RuntimeError, match="Missing key"):
        _quantized((96, 128)).load_state_dict(sd)
    sd = _quantized((96, 128)).state_dict()
    sd["weight.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _quantized((96, 128)).load_state_dict(sd)


def test_a_quantized_model_saves_to_safetensors_and_loads_back_identically(tmp_path):
    from safetensors.torch import load_file, save_file

    from peftlab.harness.pretrained import build_model

    one = quantize_model(build_model(0), progress=False, compute_dtype=torch.float32).eval()
    two = quantize_model(build_model(1), progress=False, compute_dtype=torch.float32).eval()
    save_file(one.state_dict(), tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(isinstance(v, torch.Tensor) for v in loaded.values())
    assert any(k.endswith("q_proj.weight.nested_absmax") for k in loaded)
    two.load_state_dict(loaded)
    for (name, a), (_, b) in zip(one.named_modules(), two.named_modules()):
        if isinstance(a, Linear4bit):
            _same_weight(a, b)
    ids = torch.randint(0, one.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(one(ids).logits, two(ids).logits)


def test_adapter_files_hold_only_the_adapters(tmp_path):
    from safetensors.torch import load_file

    from peftlab.adapter_io import save_adapter
    from peftlab.harness.pretrained import build_model

    model = prepare_qlora_small(build_model(0))
    save_adapter(model, tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert keys and all("lora_" in k for k in keys)


def prepare_qlora_small(model):
    from peftlab.prepare import prepare_qlora

    return prepare_qlora(model, r=4, compute_dtype=torch.float32)


# --- the dequantization workspace (chapter: book/chapters/qlora.md) -------------------------------------------

def _workspace_pair(shape, seed, workspace, **kw):
    """The same 4-bit layer twice: without a workspace, and with ``workspace``."""
    lin = _linear(*shape, seed=seed)
    return Linear4bit.from_linear(lin, **kw), Linear4bit.from_linear(lin, workspace=workspace, **kw)


@pytest.mark.parametrize("chunk_bytes", [None, 64 * 128 * 2])  # one product, or chunks of 64 or 32 rows
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_workspace_gives_the_same_outputs_and_gradients_bit_for_bit(monkeypatch, compute_dtype, chunk_bytes):
    from peftlab import chunked_matmul
    from peftlab.workspace import DequantWorkspace

    if chunk_bytes is not None:
        monkeypatch.setattr(chunked_matmul, "CPU_CHUNK_BYTES", chunk_bytes)
    workspace = DequantWorkspace()
    for shape, seed in (((256, 128), 1), ((64, 128), 2), ((96, 100), 3)):  # the last: rows not whole blocks
        fresh, reused = _workspace_pair(shape, seed, workspace, compute_dtype=compute_dtype)
        x = torch.randn(2, 5, shape[1], generator=torch.Generator().manual_seed(seed))
        outputs, grads = [], []
        for layer in (fresh, reused):
            xg = x.clone().requires_grad_(True)
            y = layer(xg)
            y.backward(torch.ones_like(y))
            outputs.append(y)
            grads.append(xg.grad)
        assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])
        assert fresh.workspace is None and reused.workspace is workspace
    assert workspace.nbytes == 256 * 128 * compute_dtype.itemsize  # one buffer, the largest weight


def test_layers_share_one_workspace_as_large_as_the_largest_weight_and_free_drops_it():
    from peftlab.qlora import set_workspace
    from peftlab.workspace import DequantWorkspace

    workspace = DequantWorkspace()
    fresh_small, small = _workspace_pair((64, 128), 1, workspace)
    fresh_large, large = _workspace_pair((256, 128), 2, workspace)
    x = torch.randn(3, 128)
    assert workspace.nbytes == 0  # nothing until a layer runs
    with torch.no_grad():
        assert torch.equal(small(x), fresh_small(x))
        assert workspace.nbytes == 64 * 128 * 4
        assert torch.equal(large(x), fresh_large(x))
        assert torch.equal(small(x), fresh_small(x))  # the smaller weight in the beginning of the larger buffer
    assert workspace.nbytes == 256 * 128 * 4 and len(workspace.tensors()) == 1  # one buffer, grown once
    workspace.free()
    assert workspace.nbytes == 0 and workspace.tensors() == []
    # off unless asked, and given to a whole model at once
    model = quantize_model(_tiny_llama(), progress=False)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert {m.workspace for m in layers} == {None}
    assert set_workspace(model, workspace) is model and all(m.workspace is workspace for m in layers)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 8)))
    assert workspace.nbytes == 4 * max(m.in_features * m.out_features for m in layers)
    set_workspace(model, None)
    assert {m.workspace for m in layers} == {None}
    with pytest.raises(TypeError, match="workspace must be a peftlab.workspace.DequantWorkspace"):
        set_workspace(model, True)
    with pytest.raises(TypeError, match="workspace must be"):
        Linear4bit.from_linear(_linear(4, 64), workspace=True)
    with pytest.raises(TypeError, match="workspace must be"):
        quantize_model(_tiny_llama(), workspace="yes", progress=False)
    with pytest.raises(ValueError, match="no Linear4bit"):
        set_workspace(nn.Sequential(nn.Linear(4, 4)), workspace)


def test_two_threads_running_4bit_layers_at_once_get_their_own_results():
    import threading

    from peftlab.workspace import DequantWorkspace

    workspace = DequantWorkspace()  # shared by both layers: one buffer written by both threads would fail this
    layers = [Linear4bit.from_linear(_linear(128, 128, seed=s), workspace=workspace) for s in (3, 4)]
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = [layer.dequantize() for layer in layers]
    failures, barrier = [], threading.Barrier(2)

    def run(layer, weight):
        barrier.wait()  # both threads dequantize and multiply at the same time, many times
        for _ in range(200):
            xg = x.clone().requires_grad_(True)
            y = layer(xg)
            y.backward(torch.ones_like(y))
            if not (torch.equal(y, F.linear(x, weight, layer.bias)) and
                    torch.equal(xg.grad, torch.ones_like(y) @ weight)):
                failures.append(threading.current_thread().name)
                return

    threads = [threading.Thread(target=run, args=(layer, w)) for layer, w in zip(layers, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert 1 <= len(workspace.tensors()) <= 2  # a buffer per thread running at the same time, kept for reuse


def test_a_workspace_is_seen_and_freed_from_any_thread_and_a_lent_buffer_is_dropped_on_return():
    import threading

    from peftlab.workspace import DequantWorkspace, scratch

    workspace = DequantWorkspace()
    layer = Linear4bit.from_linear(_linear(128, 64, seed=5), workspace=workspace)
    x = torch.randn(4, 64, requires_grad=True)
    y = layer(x)  # forward on this thread, backward on another (as autograd's own thread does on a GPU)
    worker = threading.Thread(target=lambda: y.backward(torch.ones_like(y)))
    worker.start()
    worker.join()
    assert x.grad is not None and workspace.nbytes == 128 * 64 * 4  # one buffer for both threads' products
    workspace.free()
    assert workspace.nbytes == 0
    with workspace.borrow(torch.Size([8, 8]), torch.float32, torch.device("cpu")) as buffer:
        assert buffer.shape == (8, 8) and workspace.nbytes == 8 * 8 * 4  # lent, still held
        freer = threading.Thread(target=workspace.free)
        freer.start()
        freer.join()
        assert workspace.nbytes == 8 * 8 * 4
    assert workspace.nbytes == 0  # dropped when it came back
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        with workspace.borrow(torch.Size([2]), torch.int8, torch.device("cpu")):
            pass
    with pytest.raises(TypeError, match="workspace must be a DequantWorkspace or None"):
        with scratch(True, torch.Size([2]), torch.float32, torch.device("cpu")):
            pass


def test_a_copied_model_shares_its_workspace_and_a_pickled_one_starts_empty():
    import copy
    import pickle

    from peftlab.workspace import DequantWorkspace

    workspace = DequantWorkspace()
    layer = Linear4bit.from_linear(_linear(64, 64), workspace=workspace)
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert copy.deepcopy(layer).workspace is workspace
    restored = pickle.loads(pickle.dumps(workspace))
    assert restored is not workspace and restored.nbytes == 0 and workspace.nbytes == 64 * 64 * 4


def test_chunked_cpu_forward_equals_one_product_on_the_whole_weight_to_float_rounding(monkeypatch):
    from peftlab import chunked_matmul
    from peftlab.chunked_matmul import chunk_rows

    monkeypatch.setattr(chunked_matmul, "CPU_CHUNK_BYTES", 64 * 128 * 4)  # chunks of 64 rows of a 256 × 128 layer
    lin = _linear(256, 128, bias=True, seed=5)
    layer = Linear4bit.from_linear(lin)
    assert chunk_rows(layer.weight, torch.float32) == 64
    x = torch.randn(2, 7, 128, requires_grad=True)
    y = layer(x)
    w = layer.dequantize(torch.float32)
    expected = F.linear(x.detach(), w, lin.bias.detach())
    assert y.shape == expected.shape and y.is_contiguous()
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.ones_like(y) @ w, rtol=1e-6, atol=1e-6)
    # rows that are not whole blocks, or a weight that one chunk holds, take the one product
    assert chunk_rows(Linear4bit.from_linear(_linear(256, 100)).weight, torch.float32) is None
    assert chunk_rows(Linear4bit.from_linear(_linear(64, 128)).weight, torch.float32) is None
    with pytest.raises(TypeError, match="weight must be a 2-D NF4Tensor"):
        chunk_rows(w, torch.float32)
    with pytest.raises(ValueError, match="rows must be a positive int"):
        chunked_matmul.chunked_linear(x, layer.weight, None, 0)


def test_a_chunk_of_rows_dequantizes_to_those_rows_of_the_whole_weight_bit_for_bit():
    from peftlab.nf4 import absmax_values, dequantize_nf4, dequantize_nf4_rows

    q = quantize_nf4(torch.randn(96, 128), double_quant=True)
    whole = dequantize_nf4(q)
    out = torch.empty(40, 128)
    assert torch.equal(dequantize_nf4_rows(q, 50, 90, out, absmax_values(q)), whole[50:90])
    with pytest.raises(ValueError, match="start < stop"):
        dequantize_nf4_rows(q, 90, 50, out, absmax_values(q))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_nf4_rows(q, 0, 10, out, absmax_values(q))
    with pytest.raises(ValueError, match="whole blocks"):
        dequantize_nf4_rows(quantize_nf4(torch.randn(4, 100)), 0, 1, torch.empty(1, 100),
                            absmax_values(quantize_nf4(torch.randn(4, 100))))


@pytest.mark.parametrize("kw,exc,match", [(dict(r=0), ValueError, "r must"), (dict(use_dora=1), TypeError, "use_dora")])
def test_prepare_qlora_refuses_bad_lora_settings_before_quantizing_anything(kw, exc, match):
    from peftlab.prepare import prepare_qlora

    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(exc, match=match):
        prepare_qlora(model, ["0"], **kw)
    assert type(model[0]) is nn.Linear  # left as it was
