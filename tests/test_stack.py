"""The library stack (transformers + PEFT + bitsandbytes) against peftlab, and merging into 4 bits
(book/chapters/stack.md): every reference is the installed library, run here."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from _reference import bnb, bnbF  # skips this module without bitsandbytes

import peft
import transformers

from peftlab.adapter_io import load_adapter, save_adapter  # noqa: E402
from peftlab.harness import pretrained  # noqa: E402
from peftlab.adapters import add_lora  # noqa: E402
from peftlab.lora import LoRALinear  # noqa: E402
from peftlab.merge4bit import (  # noqa: E402
    merge_lora_dequantized,
    merge_lora_requantized,
    merged_weight_4bit,
)
from peftlab.bnb_cpu import bnb_cpu_skip_modules  # noqa: E402
from peftlab.qlora import Linear4bit, quantize_model  # noqa: E402
from peftlab.targets import LLAMA_LINEARS, find_targets  # noqa: E402

BOOK_CONFIG = pretrained.tiny_llama_config(**pretrained.checkpoint_info()["config"])
# bitsandbytes 0.50.2's CPU kernels mishandle rows that are not whole blocks of 64: such
# layers stay in 16 bits beside lm_head, as in the chapter.
SKIP = bnb_cpu_skip_modules(BOOK_CONFIG)
QUANTIZED = [name for name in LLAMA_LINEARS if name not in SKIP]
TRAINING_MODE_TOL = 1e-5  # float32 rounding: both compute the same float32 products


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("tiny-llama-bf16")
    pretrained.load_pretrained(dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def load_stack(checkpoint):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=SKIP,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
        )


def sixteen_bit_values():
    model = pretrained.load_pretrained()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    return model


def our_4bit_model():
    return quantize_model(
        sixteen_bit_values(), QUANTIZED, compute_dtype=torch.float32, progress=False
    )


def bnb_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def inference_precision(model) -> float:
    """bitsandbytes' CPU 4-bit matmul in inference mode vs the exact float32 product, on a copy of one layer."""
    layer = copy.deepcopy(next(iter(bnb_layers(model).values())))
    state = copy.copy(layer.weight.quant_state)
    state.dtype = torch.float32
    x = torch.randn(4, 32, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = x @ bnbF.dequantize_4bit(layer.weight.data, state).T
        return relative(layer.eval()(x), exact)


TOKENS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))

WIDTHS = {
    "intermediate 352 (the old book model)": dict(intermediate_size=352),
    "hidden 192, intermediate 512": dict(
        hidden_size=192,
        intermediate_size=512,
        num_attention_heads=6,
        num_key_value_heads=6,
    ),
    "hidden 96, intermediate 256": dict(
        hidden_size=96,
        intermediate_size=256,
        num_attention_heads=3,
        num_key_value_heads=3,
    ),
}
EXPECTED_SKIP = {
    "intermediate 352 (the old book model)": ["lm_head", "down_proj"],
    "hidden 192, intermediate 512": ["lm_head"],
    "hidden 96, intermediate 256": ["lm_head", *LLAMA_LINEARS[:6]],
}


def assert_same_logits(stack, ours):
    """The stack's logits equal ours: exactly enough in training mode, and within each bnb
    layer's measured CPU precision in inference mode (where bnb repacks for its kernel)."""
    eps = inference_precision(stack)
    with torch.no_grad():
        expected = ours(TOKENS).logits
        assert relative(stack.train()(TOKENS).logits, expected) <= TRAINING_MODE_TOL
        inference = relative(stack.eval()(TOKENS).logits, expected)
    assert inference <= len(bnb_layers(stack)) * max(eps, 1e-6)

@pytest.mark.parametrize("widths", list(WIDTHS))

def test_bnb_cpu_skip_modules_is_lm_head_and_the_layers_not_whole_blocks(widths):
    config = pretrained.tiny_llama_config(**WIDTHS[widths])
    skip = bnb_cpu_skip_modules(config)
    assert skip == EXPECTED_SKIP[widths]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    not_whole = {
        name.rpartition(".")[2]
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.in_features % 64
    }
    assert skip[0] == "lm_head" and len(set(skip)) == len(skip)
    assert set(skip) == {"lm_head"} | not_whole
    assert bnb_cpu_skip_modules(model) == skip  # a model gives what its config gives


def test_bnb_cpu_skip_modules_rejects_bad_input():
    with pytest.raises(TypeError, match="model"):
        bnb_cpu_skip_modules("llama")
    with pytest.raises(ValueError, match="blocksize"):
        bnb_cpu_skip_modules(nn.Linear(4, 4), blocksize=0)


def test_stack_4bit_bytes_equal_peftlab_nf4_of_the_same_weights(checkpoint):
    stack, ours = load_stack(checkpoint), our_4bit_model()
    layers = bnb_layers(stack)
    assert sorted(n.rpartition(".")[2] for n in layers) == sorted(
        QUANTIZED * BOOK_CONFIG.num_hidden_layers
    )
    for name, layer in layers.items():
        state, q = layer.weight.quant_state, ours.get_submodule(name).weight
        assert torch.equal(layer.weight.data.view(-1), q.packed), name
        assert torch.equal(state.absmax, q.absmax.codes), name
        assert torch.equal(state.state2.absmax, q.absmax.absmax2), name
        assert torch.equal(state.offset, q.absmax.offset), name


def test_all_linear_names_equal_peft_on_the_4bit_model(checkpoint):
    stack = load_stack(checkpoint)
    ours = find_targets(stack, "all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            stack, peft.LoraConfig(r=4, target_modules="all-linear")
        )
    theirs = [
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A")
    ]
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == len(LLAMA_LINEARS) * BOOK_CONFIG.num_hidden_layers
    assert not any("lm_head" in n for n in ours)


def _peft_stack(checkpoint, **lora):
    stack = peft.prepare_model_for_kbit_training(load_stack(checkpoint))
    config = peft.LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", **lora
    )
    return peft.get_peft_model(stack, config)


def test_peft_adapter_crosses_into_peftlab_4bit_model_within_bnb_cpu_precision(
    checkpoint, tmp_path
):
    torch.manual_seed(0)
    stack = _peft_stack(
        checkpoint, init_lora_weights=False
    )  # B random: the adapter is not a no-op
    stack.save_pretrained(tmp_path)
    ours = load_adapter(our_4bit_model(), tmp_path)
    for name, layer in stack.named_modules():
        if hasattr(layer, "base_layer") and hasattr(layer, "lora_A"):
            twin = ours.get_submodule(name.removeprefix("base_model.model."))
            assert torch.equal(twin.lora_A, layer.lora_A["default"].weight)
            assert torch.equal(twin.lora_B, layer.lora_B["default"].weight)
            assert twin.scaling == layer.scaling["default"]
    assert_same_logits(stack, ours)


def test_peftlab_adapter_crosses_into_peft_on_bnb_within_bnb_cpu_precision(
    checkpoint, tmp_path
):
    torch.manual_seed(0)
    ours = add_lora(our_4bit_model(), "all-linear", r=8, alpha=32)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = peft.PeftModel.from_pretrained(
            peft.prepare_model_for_kbit_training(load_stack(checkpoint)), tmp_path
        )
    assert_same_logits(stack, ours)


def _lora_4bit(out_features=96, in_features=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.05)
        linear.bias.copy_(torch.randn(out_features, generator=gen))
    torch.manual_seed(seed)
    layer = LoRALinear(
        Linear4bit.from_linear(linear, compute_dtype=torch.float32), r=4, alpha=16
    )
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(out_features, 4, generator=gen) * 0.05)
    return layer


def test_merge_lora_dequantized_computes_the_unmerged_forward_to_float_rounding():
    layer = _lora_4bit()
    x = torch.randn(3, 10, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = layer(x)
        merged = merge_lora_dequantized(layer)
        assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float32
        torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
        assert torch.equal(merged.weight, merged_weight_4bit(layer))


def test_merge_lora_dequantized_on_a_model_merges_every_layer_and_matches_logits():
    torch.manual_seed(0)
    model = add_lora(our_4bit_model(), "all-linear", r=4, alpha=16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
        before = model(TOKENS).logits
        merge_lora_dequantized(model)
        assert not any(isinstance(m, (LoRALinear, Linear4bit)) for m in model.modules())
        assert relative(model(TOKENS).logits, before) <= TRAINING_MODE_TOL


def test_merge_lora_requantized_bytes_equal_bnb_quantizing_the_merged_weight():
    layer = _lora_4bit()
    weight = merged_weight_4bit(layer)
    packed, state = bnbF.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    merged = merge_lora_requantized(layer)
    assert isinstance(merged, Linear4bit)
    q = merged.weight
    assert torch.equal(packed.view(-1), q.packed)
    assert torch.equal(state.absmax, q.absmax.codes)
    assert torch.equal(state.state2.absmax, q.absmax.absmax2)
    assert torch.equal(state.offset, q.absmax.offset)
    assert torch.equal(merged.bias, layer.base.bias)


def test_merge_functions_reject_bad_input():
    with pytest.raises(TypeError, match="model"):
        merge_lora_dequantized("not a model")
    with pytest.raises(TypeError, match="model"):
        merge_lora_requantized(None)
    with pytest.raises(ValueError, match="no LoRALinear on a Linear4bit"):
        merge_lora_requantized(nn.Sequential(nn.Linear(4, 4)))
    float_lora = LoRALinear(nn.Linear(8, 8), r=2, alpha=2)
    with pytest.raises(TypeError, match="layer.base"):
        merged_weight_4bit(float_lora)
    with pytest.raises(ValueError, match="merge_lora"):
        merge_lora_dequantized(float_lora)
    with pytest.raises(TypeError, match="layer"):
        merged_weight_4bit(nn.Linear(8, 8))
    layer = _lora_4bit()
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora_dequantized(layer)
