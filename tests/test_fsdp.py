"""Tests of peftlab.fsdp (QLoRA sharded with PyTorch's FSDP2) and its launcher: two gloo
processes against one, per-rank bytes against PyTorch's storages and the memory model,
collective bytes against what FSDP2 sent, the 4-bit bytes after a gather, and the adapter
checkpoint against PEFT.

One launch (two processes, a random LLaMA with an odd vocabulary so that FSDP2 pads) is
shared by the tests that need one; the one-process reference runs while it does.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from peftlab.adapter_io import load_adapter
from peftlab.fsdp import (
    ShardableLinear4bit,
    fully_shard_qlora,
    rank_bytes,
    split_batch,
)
from peftlab.harness.fsdp_run import Launch, RunSpec, build_model, reference_run
from peftlab.memory import shard_bytes
from peftlab.shapes import LlamaShape
from peftlab.qlora import Linear4bit

import peft

SPEC = RunSpec(pretrained=False, negative_control=False)  # vocabulary 255: padded rows
WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    with Launch(SPEC, folder, world_size=WORLD, timeout=180) as run:
        reference = reference_run(SPEC)  # in this process, while the ranks run
        sharded = run.wait()
    return sharded, reference


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b))
    return math.sqrt(num / sum((y**2).sum() for y in b))


def test_two_processes_equal_one_over_twenty_adamw_steps(runs):
    sharded, ref = runs
    losses = sharded["ranks"][0]["losses"]
    assert len(losses) == SPEC.steps == len(ref["losses"])
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref["losses"])) <= 1e-5
    names = list(ref["grads"])
    for step in range(SPEC.steps):
        got = [sharded["grads"][f"{step}.{n}"] for n in names]
        assert _relative(got, [ref["grads"][n][step] for n in names]) <= 1e-5
    # the LoRA factors trained, and the two runs trained them alike
    factors = [sharded["factors"][n] for n in names]
    assert _relative(factors, [ref["factors"][n] for n in names]) <= 1e-4
    assert any(not torch.equal(ref["factors"][n], torch.zeros_like(ref["factors"][n]))
               for n in names if n.endswith("lora_B"))


def test_every_rank_holds_half_of_each_component_plus_one_padded_row(runs):
    sharded, ref = runs
    one = ref["bytes"]
    rows = math.ceil(SPEC.vocab / WORLD)  # the embeddings' and lm_head's rows per rank
    padding = 2 * (WORLD * rows - SPEC.vocab) * SPEC.hidden * 4  # float32
    assert padding > 0
    for r in sharded["ranks"]:
        held = r["bytes"]
        assert held["replicated"] == one["replicated"]  # RoPE's buffer, AdamW's steps
        for c in ("quant_constants", "lora_weights", "gradients", "optimizer_states"):
            assert held[c] * WORLD == one[c]
        assert held["weights"] * WORLD == one["weights"] + padding


def test_the_memory_model_predicts_each_ranks_bytes(runs):
    sharded, _ = runs
    config = build_model(SPEC).config
    predicted, gathered = shard_bytes(
        LlamaShape.from_config(config), "qlora", WORLD, r=SPEC.r, dtype=torch.float32,
        lora_dtype=torch.float32,
    )
    for r in sharded["ranks"]:  # padded storage: the last rank holds as much as the first
        for c in ("weights", "quant_constants", "lora_weights", "gradients"):
            assert r["bytes"][c] == getattr(predicted, c), c
    # AdamW's states follow the real rows: the first rank holds the padded count
    assert sharded["ranks"][0]["bytes"]["optimizer_states"] == predicted.optimizer_states
    # the unsharded bytes: the root group and two blocks
    assert gathered == sum(
        p.numel() * p.element_size() for p in _unsharded_params(SPEC, blocks=2)
    )


def _unsharded_params(spec: RunSpec, blocks: int) -> list[torch.Tensor]:
    model = build_model(spec)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Linear4bit):
                setattr(module, child_name, ShardableLinear4bit(child))
    layers = model.model.layers
    in_blocks = {id(p) for p in layers.parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_blocks]
    return rest + [p for layer in list(layers)[:blocks] for p in layer.parameters()]


def test_bytes_all_gathered_and_reduce_scattered_per_step_equal_the_formula(runs):
    sharded, _ = runs
    for r in sharded["ranks"]:
        traffic, expected = r["traffic"], r["expected"]
        assert traffic["all_gather"] == expected["all_gather"] > 0
        assert traffic["reduce_scatter"] == expected["reduce_scatter"] > 0
        # forward: the root group and each block; backward: each block again
        assert traffic["calls"]["all_gather"] == 1 + 2 * SPEC.layers
        assert traffic["calls"]["reduce_scatter"] == SPEC.layers
        assert "uint8" in traffic["dtypes"]  # the blocks travel as bytes


def test_the_4bit_bytes_after_a_gather_are_the_unsharded_ones(runs):
    sharded, _ = runs
    for r in sharded["ranks"]:
        assert r["gather"]["same_keys"] and r["gather"]["compared"] > 0
        assert r["gather"]["differing"] == 0
        assert r["n_4bit_layers"] == 7 * SPEC.layers


def test_the_sharded_adapter_checkpoint_loads_in_peft_and_here(runs):
    sharded, _ = runs
    folder = sharded["adapter"]
    ours = load_adapter(_plain(SPEC), folder)
    for name, p in ours.named_parameters():
        if "lora_" in name:
            assert torch.equal(p.detach(), sharded["factors"][name])
    torch.manual_seed(SPEC.seed)
    base = transformers.LlamaForCausalLM(build_model(SPEC).config)
    theirs = peft.PeftModel.from_pretrained(base, folder)
    for name, m in ours.named_modules():
        if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.Parameter):
            peft_layer = theirs.base_model.model.get_submodule(name)
            assert torch.equal(peft_layer.lora_A["default"].weight, m.lora_A.detach())
            assert torch.equal(peft_layer.lora_B["default"].weight, m.lora_B.detach())


def _plain(spec: RunSpec) -> nn.Module:
    # the random model before LoRA, 4-bit layers in place (load_adapter adds the LoRA)
    from peftlab.qlora import quantize_model

    torch.manual_seed(spec.seed)
    model = transformers.LlamaForCausalLM(build_model(spec).config)
    return quantize_model(model, progress=False)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_one_rank_sharded_model_computes_what_the_unsharded_one_does(one_process_group):
    spec = RunSpec(pretrained=False, layers=1)
    model, sharded = build_model(spec), build_model(spec)
    fully_shard_qlora(sharded)
    x = torch.randint(0, spec.vocab, (2, 16))
    assert torch.equal(model(input_ids=x).logits, sharded(input_ids=x).logits)
    assert rank_bytes(sharded)["weights"] == rank_bytes(model)["weights"]


def test_a_model_not_prepared_with_qlora_is_refused():
    plain = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="prepare_qlora"):
        fully_shard_qlora(plain)
    with pytest.raises(TypeError, match="nn.Module"):
        fully_shard_qlora("model")


def test_a_mesh_of_another_device_type_is_refused(one_process_group):
    model = build_model(RunSpec(pretrained=False, layers=1)).to("meta")
    with pytest.raises(ValueError, match="'cpu' mesh but the model is on 'meta'"):
        fully_shard_qlora(model, mesh=init_device_mesh("cpu", (1,)))


def test_a_batch_that_does_not_divide_over_the_ranks_is_refused():
    with pytest.raises(ValueError, match="does not divide over 2 ranks"):
        split_batch(torch.zeros(3, 4), 0, 2)
    with pytest.raises(ValueError, match="does not divide over 3 ranks"):
        Launch(RunSpec(batch=4), "unused", world_size=3)
    assert torch.equal(split_batch(torch.arange(4), 1, 2), torch.tensor([2, 3]))
