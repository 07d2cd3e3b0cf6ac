"""Tests of peftlab.memory: shapes against transformers and PEFT, 4-bit sizes against bitsandbytes, the
activation count against autograd's saved tensors, and the estimate against a measured training step."""

from __future__ import annotations

import math

import pytest
import torch

from peftlab.measure import _LiveTensors, measure_llama, measure_step
from peftlab.memory import COMPONENTS, GPUS, METHODS, Breakdown, activation_bytes, dequantized_weight_bytes, estimate, quantized_bytes, shard_bytes
from peftlab.shapes import LLAMA, LlamaShape
from peftlab.targets import LLAMA_LINEARS

import transformers
ALL_LINEARS = list(LLAMA_LINEARS)  # the package's one list of LLaMA's seven linear layers
PAPER_LLAMA = {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320,
               "llama-33b": 32_528_943_616, "llama-65b": 65_285_660_672}


def _config(shape: LlamaShape, **kw):
    return transformers.LlamaConfig(
        hidden_size=shape.d_model, intermediate_size=shape.ffn, num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads or shape.n_heads, num_hidden_layers=shape.n_layers,
        vocab_size=shape.vocab, tie_word_embeddings=shape.tied_embeddings, **kw)


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("name", list(LLAMA))
def test_parameter_counts_match_transformers_and_the_llama_paper(name):
    shape = LLAMA[name]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(_config(shape))
    assert shape.n_params == sum(p.numel() for p in model.parameters()) == PAPER_LLAMA[name]
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert shape.linear_params == linear


@pytest.mark.parametrize("name, millions", [("llama-7b", 159.9), ("llama-13b", 250.3),
                                            ("llama-33b", 487.6), ("llama-65b", 799.5)])
def test_lora_weights_match_peft_on_all_linear_layers(name, millions):
    import peft
    shape = LLAMA[name]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(_config(shape))
        model = peft.get_peft_model(model, peft.LoraConfig(r=64, lora_alpha=16, target_modules=ALL_LINEARS))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    b = estimate(name, "lora", r=64, dtype=torch.bfloat16)
    assert b.lora_weights == 2 * trainable
    assert b.gradients == 2 * trainable and b.optimizer_states == 8 * trainable
    assert round(trainable / 1e6, 1) == millions


def test_from_config_handles_grouped_query_attention():
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                   num_key_value_heads=2, num_hidden_layers=3, vocab_size=1000)
    shape = LlamaShape.from_config(cfg)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    assert shape.kv_dim == 64 and shape.n_params == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- 4-bit sizes, bnb


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("numel", [64, 4096 * 64, 64 * 256 * 3 + 64 * 5, 1001])
def test_quantized_bytes_match_bitsandbytes(numel, blocksize, double_quant):
    from _reference import bnbF  # tests/_reference.py

    w = torch.randn(numel)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    ours_packed, ours_constants = quantized_bytes(numel, blocksize, double_quant)
    assert ours_packed == packed.nbytes
    constants = state.absmax.nbytes
    if double_quant:
        constants += state.state2.absmax.nbytes + state.offset.nbytes
    assert ours_constants == constants


def test_nf4_with_double_quantization_is_4127_bits_per_parameter():
    n = 64 * 256 * 1000
    packed, constants = quantized_bytes(n)
    assert 8 * (packed + constants) / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)
    assert 8 * sum(quantized_bytes(n, double_quant=False)) / n == pytest.approx(4.5, abs=1e-9)


# --------------------------------------------------------------------------------------- paper's claims


def test_65b_full_needs_over_780gb_lora_over_80gb_and_qlora_fits_one_48gb_gpu():
    assert estimate("llama-65b", "full").total > 780e9  # QLoRA §1
    assert estimate("llama-65b", "qlora").total < GPUS["48 GB"]  # QLoRA §1: one 48 GB GPU
    assert estimate("llama-65b", "lora").total > GPUS["80 GB"]


def test_full_finetuning_is_twelve_bytes_per_parameter_before_activations():
    for name, shape in LLAMA.items():
        b = estimate(name, "full")
        assert b.weights + b.gradients + b.optimizer_states == 12 * shape.n_params


# LLaMA-7B counted by hand: 6,738,415,616 parameters (untied embeddings); LoRA r=64 on the seven linear
# layers of 32 blocks: 64 × (4·(4096 + 4096) + 3·(4096 + 11008)) = 4,997,120 per block.
N_7B = 6_738_415_616
LORA_7B_R64 = 32 * 64 * (4 * (4096 + 4096) + 3 * (4096 + 11008))


def test_hand_counts_of_llama_7b():
    assert LLAMA["llama-7b"].n_params == N_7B and LLAMA["llama-7b"].lora_params(64) == LORA_7B_R64


def test_master_weights_add_four_bytes_per_trained_16_bit_parameter():
    plain, master = estimate("llama-7b", "full"), estimate("llama-7b", "full", master_weights=True)
    assert master.optimizer_states - plain.optimizer_states == 4 * N_7B
    assert master.weights + master.gradients + master.optimizer_states == 16 * N_7B
    for c in ("weights", "gradients", "activations", "lora_weights", "quant_constants"):
        assert getattr(master, c) == getattr(plain, c)
    for method in ("lora", "qlora"):
        plain, master = estimate("llama-7b", method), estimate("llama-7b", method, master_weights=True)
        assert master.total - plain.total == 4 * LORA_7B_R64
        # float32 adapters are their own master copy
        fp32 = dict(lora_dtype=torch.float32)
        assert estimate("llama-7b", method, master_weights=True, **fp32) == estimate("llama-7b", method, **fp32)


def test_master_weights_must_be_a_bool():
    with pytest.raises(TypeError, match="master_weights"):
        estimate("llama-7b", "full", master_weights=1)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_dtype_scales_lora_weights_and_gradients_not_the_states(method):
    bf16, fp32 = estimate("llama-7b", method), estimate("llama-7b", method, lora_dtype=torch.float32)
    assert (bf16.lora_weights, bf16.gradients) == (2 * LORA_7B_R64, 2 * LORA_7B_R64)
    assert (fp32.lora_weights, fp32.gradients) == (4 * LORA_7B_R64, 4 * LORA_7B_R64)
    assert bf16.optimizer_states == fp32.optimizer_states == 8 * LORA_7B_R64  # two float32 moments
    assert (bf16.weights, bf16.quant_constants) == (fp32.weights, fp32.quant_constants)
    assert fp32.activations >= bf16.activations  # with checkpointing the loss's peak may hide the change
    # Without checkpointing, float32 adapters keep float32 copies of their inputs: (6·4096 + 11008)
    # elements per token and block, 4 bytes each; bf16 adapters read what the block keeps anyway, the two
    # normalized inputs (2 · 4096) and down_proj's input (11008), 2 bytes each; and the seven r-wide
    # products x Aᵀ are kept in 4 bytes instead of 2.
    no_ckpt = dict(gradient_checkpointing=False)
    bf16 = estimate("llama-7b", method, **no_ckpt)
    fp32 = estimate("llama-7b", method, lora_dtype=torch.float32, **no_ckpt)
    per_token_block = 4 * (6 * 4096 + 11008) - 2 * (2 * 4096 + 11008) + 7 * 64 * (4 - 2)
    assert fp32.activations - bf16.activations == 512 * 32 * per_token_block


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_gpus", [2, 4, 8])
def test_sharding_splits_the_states_but_not_the_activations(method, n_gpus):
    one, many = estimate("llama-13b", method), estimate("llama-13b", method, n_gpus=n_gpus)
    assert many.activations == one.activations
    shards, gathered = shard_bytes("llama-13b", method, n_gpus)
    shape = LLAMA["llama-13b"]
    # FSDP2 pads each tensor to whole rows on every GPU: at most one row per tensor more
    # than an even split (the widest row: an embedding's)
    slack = 13 * shape.n_layers * 2 * shape.ffn + 4 * shape.vocab * shape.d_model
    for c in ("weights", "quant_constants", "lora_weights", "gradients", "optimizer_states"):
        even = math.ceil(getattr(one, c) / n_gpus)
        assert even <= getattr(shards, c) <= even + slack * 4
        if c != "weights":
            assert getattr(many, c) == getattr(shards, c)
    # besides its shards, a GPU holds the embeddings, final norm and lm_head, and two blocks
    rest = 2 * (2 * shape.vocab * shape.d_model + shape.d_model)  # bf16
    per_block = (one.weights + one.quant_constants + one.lora_weights - rest) // shape.n_layers
    assert many.weights == shards.weights + gathered
    assert gathered == rest + 2 * per_block


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kw", [{}, dict(optimizer_bits=8, master_weights=True),
                                dict(optimizer_bits=16, lora_dtype=torch.float32),
                                dict(double_quant=False, r=16)])
def test_one_shard_per_tensor_adds_up_to_the_unsharded_estimate(method, kw):
    one = estimate("llama-7b", method, **kw)
    shards, _ = shard_bytes("llama-7b", method, 1, **{
        "targets" if k == "target_modules" else k: v for k, v in kw.items()})
    for c in ("weights", "quant_constants", "lora_weights", "gradients", "optimizer_states"):
        assert getattr(shards, c) == getattr(one, c), c


def test_fsdp2_pads_each_tensor_to_whole_rows_per_rank():
    from peftlab.sharding import rank_rows

    assert [rank_rows(255, n) for n in (1, 2, 4, 8)] == [255, 128, 64, 32]
    assert [rank_rows(3, n) for n in (2, 4)] == [2, 1]  # rank 3 of 4 holds only padding
    with pytest.raises(ValueError, match="n_gpus"):
        rank_rows(4, 0)


def test_breakdown_total_is_the_sum_and_as_dict_lists_components_then_total():
    b = Breakdown(1, 2, 3, 4, 5, 6)
    assert b.total == 21 and list(b.as_dict()) == [*COMPONENTS, "total"]
    assert "total" in str(b)


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, match", [("llama-8b", "llama-7b"), ("gpt2", "known")])
def test_unknown_model_lists_the_known_ones(bad, match):
    with pytest.raises(ValueError, match=match):
        estimate(bad, "qlora")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="full, lora, qlora"):
        estimate("llama-7b", "adapter")


@pytest.mark.parametrize("kw, exc, match", [
    (dict(batch=0), ValueError, "batch must be a positive int"), (dict(seq=-1), ValueError, "seq must"),
    (dict(r=0), ValueError, "r must"), (dict(n_gpus=0), ValueError, "n_gpus must"),
    (dict(seq=1.5), TypeError, "seq must"), (dict(optimizer_bits=4), ValueError, "optimizer_bits must"),
    (dict(target_modules=["lm_head"]), ValueError, "target_modules must"),
    (dict(target_modules=[]), ValueError, "target_modules must"), (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(device="tpu"), ValueError, "device must be 'cuda' or 'cpu'"),
])
def test_estimate_refuses_bad_options_naming_them(kw, exc, match):
    with pytest.raises(exc, match=match):
        estimate("llama-7b", "qlora", **kw)


@pytest.mark.parametrize("kw, match", [(dict(d_model=0), "d_model must be a positive int"),
                                       (dict(n_layers=-2), "n_layers must be a positive int"),
                                       (dict(d_model=100, n_heads=3), r"d_model \(100\) must be divisible by n_heads")])
def test_llama_shape_refuses_non_positive_sizes_and_heads_not_dividing_d_model(kw, match):
    args = dict(name="x", d_model=64, n_layers=2, n_heads=4, ffn=128) | kw
    with pytest.raises(ValueError, match=match):
        LlamaShape(**args)


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("name", ["llama-7b", "llama-65b"])
def test_a_dequantization_workspace_replaces_the_transient_weight_and_is_held_through_the_update(name, ckpt):
    shape, kw = LLAMA[name], dict(gradient_checkpointing=ckpt, compute_dtype=torch.bfloat16)
    largest = 2 * max(o * i for o, i in shape.block_linears().values())  # the MLP's, in bfloat16
    assert dequantized_weight_bytes(shape, torch.bfloat16) == largest
    fresh = activation_bytes(shape, "qlora", **kw)
    assert fresh - activation_bytes(shape, "qlora", dequant_workspace=True, **kw) == largest
    without, with_ = (estimate(name, "qlora", gradient_checkpointing=ckpt, dequant_workspace=w) for w in (False, True))
    # here the activations outweigh the optimizer update's temporaries: the same peak, held differently
    assert without.activations == with_.activations == fresh
    # only the activations change: the workspace is scratch memory of the products, not a stored weight
    assert {c: getattr(with_, c) for c in COMPONENTS if c != "activations"} == \
        {c: getattr(without, c) for c in COMPONENTS if c != "activations"}
    # a tiny model whose update outweighs its activations: the workspace is held during the update too
    tiny = LlamaShape("tiny", 64, 1, 1, 128, vocab=128)
    a, b = (estimate(tiny, "qlora", r=64, batch=1, seq=1, dequant_workspace=w) for w in (False, True))
    assert b.activations == a.activations + dequantized_weight_bytes(tiny, torch.bfloat16)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(method="lora", dequant_workspace=True), ValueError, "dequant_workspace applies to method='qlora' only"),
    (dict(method="full", dequant_workspace=True), ValueError, "dequant_workspace applies"),
    (dict(method="qlora", dequant_workspace=1), TypeError, "dequant_workspace must be a bool"),
])
def test_estimate_and_measure_llama_refuse_a_workspace_without_4bit_layers(kw, exc, match):
    with pytest.raises(exc, match=match):
        estimate("llama-7b", **kw)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1,
                                   num_key_value_heads=1, num_hidden_layers=1, vocab_size=128)
    with pytest.raises(exc, match=match):
        measure_llama(cfg, batch=1, seq=8, **kw)


def test_activation_bytes_refuses_an_unknown_method_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'adapter'; known: full, lora, qlora"):
        activation_bytes(LLAMA["llama-7b"], "adapter", batch=1, seq=16)


def test_estimate_refuses_a_non_config_and_a_non_float_dtype():
    with pytest.raises(TypeError, match="hidden_size"):
        estimate(object(), "full")
    with pytest.raises(TypeError, match="dtype"):
        estimate("llama-7b", "full", dtype=torch.int8)


# ---------------------------------------------------------------------------------- live-tensor tracker


def test_tracker_counts_storages_once_and_sees_frees():
    keep = torch.zeros(10)
    with _LiveTensors([keep.untyped_storage()]) as t:
        a = torch.empty(1000)  # 4,000 bytes
        b = torch.empty(2000)  # 8,000
        view = a[10:].view(-1, 5)  # a view: no new storage
        keep.add_(1)  # in place on a static tensor: not counted
        del a, view
        c = torch.empty(500, dtype=torch.float64)  # 4,000, after a's 4,000 were freed
        del b, c
    live = peak = 0
    for _, delta in t.events:
        live += delta
        peak = max(peak, live)
    assert peak == 12_000 and live == 0


# -------------------------------------------------------------------- activations vs autograd, measured


def _tiny(method, L, ckpt=False, dtype=torch.float32, dropout=0.0, d=128, f=352, h=4, V=512):
    from peftlab.adapters import add_lora

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=d, intermediate_size=f, num_attention_heads=h,
                                   num_key_value_heads=h, num_hidden_layers=L, vocab_size=V,
                                   attn_implementation="sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "qlora":
        from peftlab.qlora import quantize_model

        quantize_model(model, progress=False)
    if method != "full":
        add_lora(model, ALL_LINEARS, r=8, alpha=16, dropout=dropout)
    return cfg, model


@pytest.mark.parametrize("method, dtype, dropout", [("full", torch.float32, 0.0), ("full", torch.bfloat16, 0.0),
                                                    ("qlora", torch.float32, 0.0), ("qlora", torch.float32, 0.1),
                                                    ("lora", torch.float32, 0.0), ("lora", torch.bfloat16, 0.0),
                                                    ("lora", torch.float32, 0.1)])
def test_per_block_activations_equal_what_autograd_saves(method, dtype, dropout):
    """One more block must add exactly the estimate's per-block bytes to what autograd saves."""
    from peftlab.measure import count_saved_bytes

    saved = []
    for L in (2, 3):
        cfg, model = _tiny(method, L, dtype=dtype, dropout=dropout)
        x = torch.randint(0, cfg.vocab_size, (2, 64))
        with count_saved_bytes(exclude=model.parameters()) as counter:
            loss = model(input_ids=x, labels=x).loss
        saved.append(counter.nbytes)
        del loss
    shapes = [LlamaShape.from_config(cfg.__class__(**{**cfg.to_dict(), "num_hidden_layers": L})) for L in (2, 3)]
    kw = dict(batch=2, seq=64, gradient_checkpointing=False, compute_dtype=dtype, r=8, lora_dropout=dropout,
              device="cpu", lora_dtype=torch.float32 if method == "lora" else None)
    per_block = activation_bytes(shapes[1], method, **kw) - activation_bytes(shapes[0], method, **kw)
    assert saved[1] - saved[0] == per_block


def _measure(method, L, ckpt, dropout=0.0):
    from peftlab.paged import PagedAdamW

    cfg, model = _tiny(method, L, ckpt, dropout=dropout)
    optimizer = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (2, 128))

    def step():
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    measured = measure_step(model, step, optimizer)
    estimated = estimate(cfg, method, r=8, dtype=torch.float32, batch=2, seq=128, lora_dropout=dropout,
                         gradient_checkpointing=ckpt, device="cpu")
    return measured, estimated, model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ckpt", [False, True])
def test_estimate_matches_a_measured_step(method, ckpt):
    measured, estimated, model = _measure(method, 2, ckpt)
    for c in ("lora_weights", "gradients", "quant_constants"):
        assert getattr(measured, c) == getattr(estimated, c), c
    # states: plus AdamW's float32 step counter per tensor, which the estimate does not count
    trained = [p for p in model.parameters() if p.requires_grad]
    assert measured.optimizer_states - estimated.optimizer_states == 4 * len(trained)
    # weights: plus RoPE's inv_freq buffer, which the estimate does not count
    assert measured.weights - estimated.weights == sum(b.nbytes for b in model.buffers())
    assert measured.activations == pytest.approx(estimated.activations, rel=0.10)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["full", "lora"])
def test_estimate_matches_max_memory_allocated_on_cuda(method):
    from peftlab.adapters import add_lora

    torch.manual_seed(0)
    shape = LlamaShape("one-7b-block", 4096, 1, 32, 11008)
    cfg = _config(shape, attn_implementation="sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).train()
    if method == "lora":
        add_lora(model, ALL_LINEARS, r=64, alpha=16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    x = torch.randint(0, shape.vocab, (1, 512), device="cuda")

    def step():
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    measured = measure_step(model, step, optimizer)
    estimated = estimate(shape, method, lora_dtype=torch.float32 if method == "lora" else None,
                         optimizer_bits=16 if method == "full" else 32)
    assert measured.activations == pytest.approx(estimated.activations, rel=0.15)


def _cuda_qlora_step(shape, workspace):
    """One measured QLoRA step of ``shape`` on CUDA in bfloat16 (checkpointed, r = 64, fused AdamW), its 4-bit
    layers dequantizing into ``workspace`` (None: fresh tensors)."""
    from peftlab.adapters import add_lora
    from peftlab.qlora import quantize_model

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config(shape, attn_implementation="sdpa", use_cache=False))
    model = model.to("cuda", torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    quantize_model(model, compute_dtype=torch.bfloat16, workspace=workspace, progress=False)
    add_lora(model, ALL_LINEARS, r=64, alpha=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    x = torch.randint(0, shape.vocab, (1, 512), device="cuda")

    def step():
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return measure_step(model, step, optimizer)


@pytest.mark.cuda
def test_cuda_qlora_step_with_and_without_a_workspace_matches_its_estimate():
    from peftlab.workspace import DequantWorkspace

    shape = LlamaShape("one-7b-block", 4096, 1, 32, 11008)
    largest = dequantized_weight_bytes(shape, torch.bfloat16)  # the MLP's 11008 × 4096
    workspace = DequantWorkspace()
    measured = {held: _cuda_qlora_step(shape, workspace if held else None) for held in (False, True)}
    for held, step in measured.items():
        estimated = estimate(shape, "qlora", lora_dtype=torch.float32, gradient_checkpointing=True,
                             dequant_workspace=held)
        assert step.activations == pytest.approx(estimated.activations, rel=0.15), held
    # one buffer, though backward runs on autograd's device thread: both use one stream
    assert workspace.nbytes == largest and len(workspace.tensors()) == 1
    # held all step long instead of now and then (1 MiB: the caching allocator's rounding)
    difference = measured[True].activations - measured[False].activations
    assert -2**20 <= difference <= largest + 2**20


@pytest.mark.parametrize("method", METHODS)
def test_measure_llama_agrees_with_its_estimate(method):
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=352, num_attention_heads=1,
                                   num_key_value_heads=1, num_hidden_layers=2, vocab_size=512)
    measured, estimated = measure_llama(cfg, method, batch=2, seq=64, r=8, device="cpu")
    assert measured.lora_weights == estimated.lora_weights and measured.gradients == estimated.gradients
    assert measured.quant_constants == estimated.quant_constants
    assert measured.activations == pytest.approx(estimated.activations, rel=0.10)
    with pytest.raises(ValueError, match="full, lora, qlora"):
        measure_llama(cfg, "prefix")


@pytest.mark.parametrize("ckpt", [False, True])
def test_a_measured_step_counts_the_dequantization_workspace_as_its_estimate_does(ckpt):
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=352, num_attention_heads=1,
                                   num_key_value_heads=1, num_hidden_layers=2, vocab_size=512)
    kw = dict(batch=2, seq=64, r=8, device="cpu", gradient_checkpointing=ckpt)
    fresh, fresh_estimate = measure_llama(cfg, "qlora", **kw)
    held, held_estimate = measure_llama(cfg, "qlora", dequant_workspace=True, **kw)
    workspace = dequantized_weight_bytes(LlamaShape.from_config(cfg), torch.float32)
    for c in COMPONENTS:
        if c != "activations":
            assert getattr(held, c) == getattr(fresh, c), c
    # held all step long instead of now and then: at least the peak without it, at most the peak plus it
    assert fresh.activations <= held.activations <= fresh.activations + workspace
    assert held.activations == pytest.approx(held_estimate.activations, rel=0.10)
    assert held_estimate.activations >= fresh_estimate.activations


def _qlora_step(workspace, warmup=True):
    """A measured QLoRA step of a two-block model whose 4-bit layers use ``workspace``."""
    from peftlab.paged import PagedAdamW
    from peftlab.qlora import set_workspace

    cfg, model = _tiny("qlora", 2)
    set_workspace(model, workspace)
    optimizer = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return measure_step(model, step, optimizer, warmup=warmup), model


def test_measured_activations_do_not_depend_on_a_larger_workspace_left_by_another_model():
    from peftlab.qlora import Linear4bit
    from peftlab.workspace import DequantWorkspace

    fresh, model = _qlora_step(DequantWorkspace())
    largest = 4 * max(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    used = DequantWorkspace()
    with used.borrow(torch.Size([1024, 1024]), torch.float32, torch.device("cpu")):
        pass  # a larger model ran before with this workspace
    assert used.nbytes == 4 * 1024 * 1024
    again, _ = _qlora_step(used)
    assert again == fresh and used.nbytes == largest
    # without warmup the step makes the buffer itself: counted once, as it is allocated
    cold_fresh, _ = _qlora_step(None, warmup=False)
    cold, _ = _qlora_step(DequantWorkspace(), warmup=False)
    assert cold_fresh.activations <= cold.activations <= cold_fresh.activations + largest


# ------------------------------------------------------------------------------------------- CUDA plumbing


def test_cuda_peak_names_the_models_device_and_synchronizes_before_reading(monkeypatch):
    from peftlab.measure import _cuda_peak_above_start

    calls = []
    counters = {"allocated": 1000, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: calls.append(("reset_peak_memory_stats", device)))

    def allocated(device=None):
        calls.append(("memory_allocated", device))
        return counters["allocated"]

    def peak(device=None):
        calls.append(("max_memory_allocated", device))
        return counters["peak"]

    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", peak)

    def step():
        calls.append(("step", None))
        counters["peak"] = 1700

    dev = torch.device("cuda", 1)
    assert _cuda_peak_above_start(step, dev) == 700
    assert calls == [("synchronize", dev), ("reset_peak_memory_stats", dev), ("memory_allocated", dev),
                     ("step", None), ("synchronize", dev), ("max_memory_allocated", dev)]


def test_measure_step_refuses_a_non_module_and_a_non_callable_step():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        measure_step("model", lambda: None)
    with pytest.raises(TypeError, match="step must be a callable"):
        measure_step(torch.nn.Linear(2, 2), "step")


def test_measure_llama_runs_on_the_cpu_unless_told(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is present, but not asked for
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1,
                                   num_key_value_heads=1, num_hidden_layers=1, vocab_size=128)
    measured, estimated = measure_llama(cfg, "qlora", batch=1, seq=16, r=4)
    # float32 on the CPU: 4 bytes per LoRA parameter
    assert measured.lora_weights == estimated.lora_weights == 4 * LlamaShape.from_config(cfg).lora_params(4)


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_measure_llama_runs_in_the_native_dtype_and_matches_its_static_estimate(method):
    from peftlab.devices import default_compute_dtype

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=704, num_attention_heads=4,
                                   num_key_value_heads=4, num_hidden_layers=2, vocab_size=512)
    measured, estimated = measure_llama(cfg, method, batch=2, seq=128, r=8, device="cuda")
    assert measured.lora_weights == estimated.lora_weights and measured.gradients == estimated.gradients
    assert measured.quant_constants == estimated.quant_constants
    assert measured.activations > 0
    # the weights' bytes are those of the native 16-bit dtype (bf16 on sm80+, fp16 before): 2 bytes each
    assert default_compute_dtype("cuda").itemsize == 2 and measured.weights == pytest.approx(estimated.weights, rel=0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_measure_llama_full_in_16bit_counts_pagedadamws_float32_states(dtype):
    # PagedAdamW keeps float32 states for 16-bit parameters (as bitsandbytes' 32-bit optimizers)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1,
                                   num_key_value_heads=1, num_hidden_layers=1, vocab_size=128)
    measured, estimated = measure_llama(cfg, "full", batch=1, seq=16, dtype=dtype)
    tensors = list(transformers.LlamaForCausalLM(cfg).parameters())
    # measured: two float32 states per parameter plus AdamW's float32 step counter per tensor
    assert measured.optimizer_states == 2 * 4 * sum(p.numel() for p in tensors) + 4 * len(tensors)
    assert measured.optimizer_states - estimated.optimizer_states == 4 * len(tensors)
