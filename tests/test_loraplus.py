"""Tests for peftlab.loraplus against PEFT 0.21.2's ``create_loraplus_optimizer`` (chapter:
book/chapters/variants.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab.adapters import add_lora
from peftlab.lora import LoRALinear
from peftlab.loraplus import GROUP_NAMES, create_loraplus_optimizer, loraplus_param_groups
from peftlab.paged import PagedAdamW

import peft
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer  # noqa: E402

LR, RATIO = 1e-3, 16.0


def _tiny_llama(seed: int = 0):
    from peftlab.harness.pretrained import build_model

    return build_model(seed, num_hidden_layers=2)


def _our_name(peft_name: str) -> str:
    """PEFT's name of a LoRA factor as peftlab names it: the same module path, without
    ``base_model.model.`` and the adapter's ``.default.weight``."""
    name = peft_name.removeprefix("base_model.model.")
    for factor in ("lora_A", "lora_B"):
        name = name.replace(f".{factor}.default.weight", f".{factor}")
    return name


def _pair(trainable_norms: bool = False):
    """PEFT's LoRA and peftlab's on the same tiny LLaMA, with equal factors (A as PEFT drew
    it, B non-zero so that both factors get gradients from the first step)."""
    theirs = peft.get_peft_model(
        _tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    ours = add_lora(_tiny_llama(), "all-linear", r=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=gen)
            if "lora_" in name:
                mine[_our_name(name)].copy_(p)
    if trainable_norms:  # 1-D trainables: PEFT gives them B's rate (decayed: RMSNorm is no LayerNorm)
        for m in (theirs, ours):
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.requires_grad_(True)
    return theirs, ours


def _names_by_group(optimizer, model, rename=lambda n: n):
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return [
        ([names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"])
        for g in optimizer.param_groups
    ]


@pytest.mark.parametrize("trainable_norms", [False, True])
@pytest.mark.parametrize("decay", [{}, {"loraplus_weight_decay": 0.1}])
def test_groups_on_our_lora_equal_peft_groups_on_peft_lora(trainable_norms, decay):
    theirs, ours = _pair(trainable_norms)
    ref = peft_create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, **decay
    )
    opt = create_loraplus_optimizer(
        ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, **decay
    )
    expected = _names_by_group(ref, theirs, _our_name)
    got = _names_by_group(opt, ours)
    assert got == expected  # members in order, rates and decays, group by group
    assert [len(g[0]) for g in got][0] == 2 * 7 and got[1][0] == []  # A: 14 layers; no embedding adapter
    assert all("lora_B" in n or "norm" in n for n in got[2][0] + got[3][0])
    assert got[2][1] == LR * RATIO and got[0][1] == LR


def test_our_rule_on_a_peft_model_puts_every_parameter_where_peft_does():
    """Embedding adapters, LayerNorm weights and biases: the cases our LoRA never makes."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.proj = nn.Linear(16, 16)
            self.ln = nn.LayerNorm(16)
            self.head = nn.Linear(16, 4)

    torch.manual_seed(0)
    model = peft.get_peft_model(
        Net(),
        peft.LoraConfig(r=2, target_modules=["emb", "proj"], modules_to_save=["ln", "head"]),
    )
    ref = peft_create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=3e-6
    )
    opt = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=3e-6
    )
    expected = _names_by_group(ref, model)
    assert _names_by_group(opt, model) == expected
    assert expected[1][0] and expected[3][0]  # an embedding group, a no-decay B group (bias, LayerNorm)
    groups = loraplus_param_groups(model)
    assert [list(groups[g]) for g in GROUP_NAMES] == [e[0] for e in expected]


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, PagedAdamW])
def test_steps_on_the_same_gradients_give_peft_loraplus_parameters_exactly(optimizer_cls):
    """The optimizer alone: both models get our model's gradients, so any difference is the
    groups'."""
    theirs, ours = _pair(trainable_norms=True)
    decay = {"loraplus_weight_decay": 0.05}
    ref = peft_create_loraplus_optimizer(
        theirs, optimizer_cls, lr=LR, loraplus_lr_ratio=RATIO, **decay
    )
    opt = create_loraplus_optimizer(ours, optimizer_cls, lr=LR, loraplus_lr_ratio=RATIO, **decay)
    theirs_params = {_our_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        ids = torch.randint(0, 256, (2, 16), generator=gen)
        opt.zero_grad()
        ref.zero_grad()
        ours(ids, labels=ids).loss.backward()
        for n, p in ours.named_parameters():
            if p.requires_grad:
                theirs_params[n].grad = p.grad.clone()
        opt.step()
        ref.step()
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, theirs_params[n]), n
    a = ours.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(a, LoRALinear)


def test_training_both_models_end_to_end_agrees_with_peft():
    """Forward and backward included: our LoRA and PEFT's agree to rounding (tests/test_lora.py),
    so five steps of LoRA+ agree to a few float32 roundings, not bit for bit."""
    theirs, ours = _pair()
    ref = peft_create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    theirs_params = {_our_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(4)
    start = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    for _ in range(5):
        ids = torch.randint(0, 256, (2, 16), generator=gen)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            o.step()
    for n, p in ours.named_parameters():
        if p.requires_grad:
            # Adam's steps are ~lr in size whatever the gradient's, so compare with the distance moved
            moved = (p - start[n]).abs().max()
            assert moved > 0
            torch.testing.assert_close(p, theirs_params[n], rtol=0, atol=1e-3 * moved.item())


def test_b_moves_ratio_times_faster_than_a_on_the_first_adam_step():
    """Adam's first step is lr · sign(g) (to eps), so B's entries move λ times A's."""
    _, ours = _pair()
    opt = create_loraplus_optimizer(ours, torch.optim.Adam, lr=LR, loraplus_lr_ratio=RATIO)
    layer = ours.get_submodule("model.layers.0.mlp.up_proj")
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    ids = torch.arange(32).view(2, 16)
    ours(ids, labels=ids).loss.backward()
    opt.step()
    da, db = (layer.lora_A - a0).abs(), (layer.lora_B - b0).abs()
    torch.testing.assert_close(da.max(), torch.tensor(LR), rtol=1e-3, atol=0)
    torch.testing.assert_close(db.max(), torch.tensor(LR * RATIO), rtol=1e-3, atol=0)


def test_weight_decay_is_peft_loraplus_weight_decay():
    _, ours = _pair()
    a = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=2, weight_decay=0.1)
    b = create_loraplus_optimizer(
        ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=2, loraplus_weight_decay=0.1
    )
    assert [g["weight_decay"] for g in a.param_groups] == [0.1, 0.1, 0.1, 0.0]
    assert [g["weight_decay"] for g in a.param_groups] == [g["weight_decay"] for g in b.param_groups]
    with pytest.raises(ValueError, match="weight_decay and loraplus_weight_decay"):
        create_loraplus_optimizer(
            ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=2, weight_decay=0.1,
            loraplus_weight_decay=0.2,
        )


@pytest.mark.parametrize("ratio", [0, -1.0, float("nan"), float("inf")])
def test_ratio_not_positive_is_a_value_error_naming_it(ratio):
    _, ours = _pair()
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=ratio)


@pytest.mark.parametrize("ratio", ["16", None, True, torch.tensor(16.0)])
def test_ratio_not_a_number_is_a_type_error_naming_it(ratio):
    _, ours = _pair()
    with pytest.raises(TypeError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=ratio)


def test_other_bad_arguments_name_themselves():
    _, ours = _pair()
    kw = dict(lr=LR, loraplus_lr_ratio=RATIO)
    with pytest.raises(TypeError, match="optimizer_cls"):
        create_loraplus_optimizer(ours, "AdamW", **kw)
    with pytest.raises(ValueError, match="^lr must"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, lr=-1.0, loraplus_lr_ratio=RATIO)
    with pytest.raises(ValueError, match="loraplus_lr_embedding"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, loraplus_lr_embedding=-1.0, **kw)
    with pytest.raises(ValueError, match="weight_decay"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, weight_decay=-0.1, **kw)
    with pytest.raises(TypeError, match="model"):
        create_loraplus_optimizer(object(), torch.optim.AdamW, **kw)
    with pytest.raises(ValueError, match="lora_B"):
        create_loraplus_optimizer(_tiny_llama(), torch.optim.AdamW, **kw)  # no LoRA
