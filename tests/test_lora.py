"""Tests for peftlab.lora against PEFT 0.21.2's LoRA layer and torch autograd (chapter: book/chapters/lora.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peftlab.adapters import ParameterCount, add_lora, count_parameters, merge_lora
from peftlab.lora import LoRAFunction, LoRALinear
from peftlab.targets import find_targets

import peft

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (in_features, out_features, leading batch shape of x)
SHAPES = [(16, 8, (5,)), (33, 17, (2, 7)), (64, 128, (3, 4, 2))]
# Forward/backward tolerance vs PEFT: both run the LoRA path in float32 (fp32/bf16/fp16 bases) or float64;
# the only difference is where the scaling is applied, i.e. one or two float32 roundings (measured ≤ 3e-7
# relative in fp32); a low-precision output adds one rounding of its own dtype.
TOL = {
    # measured over tests/test_lora.py and test_adapter_io.py (69 comparisons): at most 4.0e-6 relative beyond
    # atol (|diff| up to 4.6e-5 on outputs of size ~10): a margin of 2.5x
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    # measured: at most 3.9e-3 absolute over 34 bfloat16 comparisons (margin 2.5x) and 9.8e-4 over 31 float16
    # ones (margin 2x): one rounding of the output's dtype, bfloat16's 8 bits against float16's 11
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


class Tiny(nn.Module):
    """A block-shaped toy: attention projections, an MLP and a head (names as in LLaMA)."""

    def __init__(self, d: int = 12, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.q_proj = nn.Linear(d, d, dtype=dtype)
        self.v_proj = nn.Linear(d, d, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d, dtype=dtype), nn.GELU(), nn.Linear(2 * d, d, dtype=dtype))
        self.norm = nn.LayerNorm(d, dtype=dtype)
        self.lm_head = nn.Linear(d, 5, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q_proj(x) + self.v_proj(x)
        return self.lm_head(self.norm(h + self.mlp(h)))


def peft_layer(base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
    """PEFT's LoRA layer around a copy of ``base`` (through get_peft_model, as users meet it)."""
    holder = nn.Module()
    holder.layer = _copy_linear(base)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, target_modules=["layer"])
    model = peft.get_peft_model(holder, cfg)
    return model.base_model.model.layer


def _copy_linear(base: nn.Linear) -> nn.Linear:
    new = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=base.weight.dtype)
    new.load_state_dict(base.state_dict())
    return new


def pair(fan_in, fan_out, dtype, r=4, alpha=8.0, dropout=0.0, rslora=False, seed=0):
    """Our layer and PEFT's around the same base, with the same non-zero A and B."""
    torch.manual_seed(seed)
    base = nn.Linear(fan_in, fan_out, dtype=dtype)
    ours = LoRALinear(_copy_linear(base), r, alpha, dropout, rslora)
    theirs = peft_layer(base, r, alpha, dropout, rslora)
    with torch.no_grad():
        ours.lora_B.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    return ours, theirs


# --- forward -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in,fan_out,lead", SHAPES)
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("r", [1, 4])
def test_forward_matches_peft(dtype, fan_in, fan_out, lead, rslora, r):
    ours, theirs = pair(fan_in, fan_out, dtype, r=r, alpha=6.0, rslora=rslora)
    assert ours.lora_A.dtype == theirs.lora_A["default"].weight.dtype  # float32 factors for 16-bit bases
    assert ours.scaling == theirs.scaling["default"]
    x = torch.randn(*lead, fan_in, dtype=dtype)
    y = ours(x)
    assert y.dtype == dtype and y.shape == (*lead, fan_out)
    torch.testing.assert_close(y, theirs(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_is_the_papers_formula(dtype):
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(10, 7, dtype=dtype), r=3, alpha=5.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 10, dtype=dtype)
    W0, b = layer.base.weight, layer.base.bias
    expected = x @ W0.T + b + (5.0 / 3) * x @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in,fan_out,lead", SHAPES)
def test_zero_B_gives_the_base_output_exactly(dtype, fan_in, fan_out, lead):
    torch.manual_seed(2)
    base = nn.Linear(fan_in, fan_out, dtype=dtype)
    layer = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(*lead, fan_in, dtype=dtype)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("fan_in", [16, 1024])
def test_init_draws_A_kaiming_uniform_like_peft_and_B_zero(fan_in):
    torch.manual_seed(3)
    layer = LoRALinear(nn.Linear(fan_in, 32), r=64, alpha=16)
    theirs = peft_layer(nn.Linear(fan_in, 32), r=64, alpha=16)
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5): gain √(1/3), bound √3·gain/√fan_in
    for A in (layer.lora_A, theirs.lora_A["default"].weight):
        assert A.abs().max() <= bound
        assert A.abs().max() > 0.9 * bound  # uses the whole range
        assert abs(A.std().item() - bound / math.sqrt(3)) < 0.1 * bound  # uniform: std = bound/√3
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.shape == (64, fan_in) and layer.lora_B.shape == (32, 64)


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 64), (True, 16 / 8)])
def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora(rslora, expected):
    layer = LoRALinear(nn.Linear(8, 8), r=64, alpha=16, rslora=rslora)
    assert layer.scaling == expected
    assert (layer.r, layer.alpha, layer.in_features, layer.out_features, layer.merged) == (64, 16, 8, 8, False)


def test_alpha_larger_than_r_is_allowed():
    """The notes' α ∈ [0, r] is not a constraint: QLoRA uses r=64, α=16, PEFT defaults α = r, rsLoRA α > r."""
    assert LoRALinear(nn.Linear(8, 8), r=2, alpha=32).scaling == 16


# --- dropout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_train_matches_peft_and_eval_is_off(dtype):
    ours, theirs = pair(20, 12, dtype, dropout=0.5)
    x = torch.randn(6, 20, dtype=dtype)
    ours.train(), theirs.train()
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.manual_seed(7)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, **TOL[dtype])
    torch.manual_seed(8)
    assert not torch.allclose(ours(x), y_ours)  # a different mask gives a different output
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), **TOL[dtype])
    assert torch.equal(ours(x), ours(x))


def test_dropout_only_on_the_lora_path():
    torch.manual_seed(4)
    base = nn.Linear(20, 12)
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.9).train()
    x = torch.randn(6, 20)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout must not touch the base path
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.manual_seed(9)
    mask_applied = layer(x)
    torch.manual_seed(9)
    x_dropped = nn.functional.dropout(x, 0.9, training=True)
    expected = base(x) + layer.scaling * x_dropped @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(mask_applied, expected)


# --- backward --------------------------------------------------------------------------------------------


def _reference(layer: LoRALinear, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The layer written as plain autograd ops (no custom Function)."""
    return x @ layer.base.weight.T + layer.base.bias + layer.scaling * (x @ A.T) @ B.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fan_in,fan_out,lead", SHAPES)
@pytest.mark.parametrize("rslora", [False, True])
def test_gradients_equal_autograd(dtype, fan_in, fan_out, lead, rslora):
    torch.manual_seed(5)
    layer = LoRALinear(nn.Linear(fan_in, fan_out, dtype=dtype), r=4, alpha=8, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(*lead, fan_in, dtype=dtype, requires_grad=True)
    g = torch.randn(*lead, fan_out, dtype=dtype)
    gx, gA, gB = torch.autograd.grad(layer(x), (x, layer.lora_A, layer.lora_B), g)
    A = layer.lora_A.detach().requires_grad_()
    B = layer.lora_B.detach().requires_grad_()
    rx, rA, rB = torch.autograd.grad(_reference(layer, x, A, B), (x, A, B), g)
    for ours, ref in ((gx, rx), (gA, rA), (gB, rB)):
        torch.testing.assert_close(ours, ref, **TOL[dtype])


def test_gradients_are_the_notes_formulas():
    """g_B = s·g_ΔW·Aᵀ and g_A = s·Bᵀ·g_ΔW with g_ΔW = Σ_tokens g_y xᵀ formed explicitly."""
    torch.manual_seed(6)
    layer = LoRALinear(nn.Linear(9, 11, dtype=torch.float64), r=3, alpha=7)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 9, dtype=torch.float64)
    g = torch.randn(2, 5, 11, dtype=torch.float64)
    gA, gB = torch.autograd.grad(layer(x), (layer.lora_A, layer.lora_B), g)
    g_dW = g.reshape(-1, 11).T @ x.reshape(-1, 9)  # out × in
    s, A, B = layer.scaling, layer.lora_A.detach(), layer.lora_B.detach()
    torch.testing.assert_close(gB, s * g_dW @ A.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gA, s * B.T @ g_dW, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradients_match_peft(dtype):
    ours, theirs = pair(24, 16, dtype, r=8, alpha=16)
    x = torch.randn(3, 5, 24, dtype=dtype)
    g = torch.randn(3, 5, 16, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).backward(g)
    theirs(xb).backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-4)
    assert ours.base.weight.grad is None and ours.base.bias.grad is None  # frozen base
    assert not ours.base.weight.requires_grad


@pytest.mark.parametrize("lead", [(4,), (2, 3)])
@pytest.mark.parametrize("scaling", [0.5, 4.0])
def test_lora_function_passes_gradcheck(lead, scaling):
    torch.manual_seed(7)
    x = torch.randn(*lead, 6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: LoRAFunction.apply(x, A, B, scaling), (x, A, B))


def test_gradcheck_through_the_layer_with_B_nonzero():
    torch.manual_seed(8)
    layer = LoRALinear(nn.Linear(5, 4, dtype=torch.float64), r=2, alpha=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_no_input_gradient_when_x_does_not_need_one():
    layer = LoRALinear(nn.Linear(5, 4), r=2, alpha=3)
    x = torch.randn(3, 5)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is None


# --- merge -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in,fan_out,lead", SHAPES)
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_matches_peft_and_unmerge_restores(dtype, fan_in, fan_out, lead, rslora):
    ours, theirs = pair(fan_in, fan_out, dtype, rslora=rslora)
    x = torch.randn(*lead, fan_in, dtype=dtype)
    W0 = ours.base.weight.detach().clone()
    before = ours(x)
    ours.merge()
    theirs.merge()
    assert ours.merged
    torch.testing.assert_close(ours.base.weight, theirs.base_layer.weight, **TOL[dtype])
    # Merged and unmerged differ by the rounding of W0 + D to the weight's dtype and the order of sums:
    # bounded by a few eps times Σ|x||W| (a 16-bit weight rounds each entry by up to eps/2).
    f64 = torch.float64
    scale = x.to(f64).abs() @ ours.base.weight.to(f64).abs().T + ours.base.bias.to(f64).abs()
    assert ((ours(x).to(f64) - before.to(f64)).abs() <= 4 * torch.finfo(dtype).eps * scale).all()
    merged_weight = ours.base.weight.detach().clone()
    ours.unmerge()
    assert not ours.merged
    # fl(fl(W0 + D) - D) is within one ulp of max(|W0|, |W0 + D|) of W0 (two roundings of half an ulp).
    ulp = torch.finfo(dtype).eps * torch.maximum(W0.abs(), merged_weight.abs()).to(torch.float64)
    assert ((ours.base.weight.to(torch.float64) - W0.to(torch.float64)).abs() <= ulp).all()
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(ours(x), before, **TOL[dtype])


def test_merge_is_exact_when_the_update_is_representable():
    layer = LoRALinear(nn.Linear(4, 4, dtype=torch.float64), r=1, alpha=1)
    with torch.no_grad():
        layer.base.weight.fill_(1.0)
        layer.lora_A.fill_(0.5)
        layer.lora_B.fill_(0.25)
    layer.merge()
    assert torch.equal(layer.base.weight, torch.full((4, 4), 1.125, dtype=torch.float64))
    layer.unmerge()
    assert torch.equal(layer.base.weight, torch.ones(4, 4, dtype=torch.float64))


def test_merge_refuses_non_finite_and_leaves_weight():
    layer = LoRALinear(nn.Linear(4, 4, dtype=torch.float16), r=2, alpha=2)
    with torch.no_grad():
        layer.lora_B.fill_(1e5)
        layer.lora_A.fill_(1.0)
    W0 = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base.weight, W0) and not layer.merged
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora(layer)


def test_merge_twice_and_unmerge_unmerged_raise_saying_so():
    layer = LoRALinear(nn.Linear(4, 4), r=2, alpha=2)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_lora_gives_plain_linears(dtype):
    torch.manual_seed(9)
    model = add_lora(Tiny(dtype=dtype), ["q_proj", "v_proj", "mlp.0"], r=4, alpha=8)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.normal_(std=0.1)
    model.v_proj.merge()  # an already merged layer is taken as is
    x = torch.randn(3, 12, dtype=dtype)
    before = model(x)
    assert merge_lora(model) is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.q_proj) is nn.Linear and type(model.mlp[0]) is nn.Linear
    torch.testing.assert_close(model(x), before, **TOL[dtype])
    single = LoRALinear(nn.Linear(3, 2), r=1, alpha=1)
    assert type(merge_lora(single)) is nn.Linear


# --- add_lora and matching -------------------------------------------------------------------------------


def _peft_targets(model: nn.Module, target_modules) -> set[str]:
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=target_modules))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize(
    "targets",
    [["q_proj"], ["q_proj", "v_proj"], ["proj", "q_proj"], ["0", "2"], ["mlp.0"], ["lm_head"],
     r".*_proj", r"mlp\.[02]", ("q_proj",)],
)
def test_matching_equals_peft(targets):
    expected = _peft_targets(Tiny(), list(targets) if isinstance(targets, tuple) else targets)
    model = add_lora(Tiny(), targets, r=2, alpha=2)
    assert {n for n, m in model.named_modules() if isinstance(m, LoRALinear)} == expected


@pytest.mark.parametrize("targets", [[r"1"], r"mlp\.\d"])
def test_non_linear_targets_are_refused_like_peft(targets):
    with pytest.raises(ValueError, match="not supported"):
        _peft_targets(Tiny(), targets)
    with pytest.raises(TypeError, match="only nn.Linear"):
        add_lora(Tiny(), targets, r=2, alpha=2)


def test_add_lora_freezes_everything_else_and_counts_like_peft():
    model = add_lora(Tiny(), ["q_proj", "v_proj"], r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}
    theirs = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    count = count_parameters(model)
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()
    assert count.trainable == 2 * 4 * (12 + 12)


def test_add_lora_refuses_empty_unmatched_non_linear_non_str_and_already_wrapped_targets():
    with pytest.raises(ValueError, match="empty"):
        add_lora(Tiny(), [], r=2, alpha=2)
    with pytest.raises(ValueError, match="empty"):
        add_lora(Tiny(), "", r=2, alpha=2)
    with pytest.raises(ValueError, match="match no module"):
        add_lora(Tiny(), ["k_proj"], r=2, alpha=2)
    with pytest.raises(TypeError, match="norm"):
        add_lora(Tiny(), ["norm"], r=2, alpha=2)
    with pytest.raises(TypeError, match="target_modules"):
        add_lora(Tiny(), 3, r=2, alpha=2)
    with pytest.raises(TypeError, match="target_modules"):
        add_lora(Tiny(), ["q_proj", 3], r=2, alpha=2)
    model = add_lora(Tiny(), ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, ["q_proj"], r=2, alpha=2)
    with pytest.raises(TypeError, match="model"):
        find_targets("not a model", ["q_proj"])


def test_failed_add_lora_leaves_model_untouched():
    model = Tiny()
    with pytest.raises(TypeError, match="norm.*only nn.Linear"):
        add_lora(model, ["q_proj", "norm"], r=2, alpha=2)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


# --- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(r=0), ValueError, "r must"),
        (dict(r=-2), ValueError, "r must"),
        (dict(r=2.0), TypeError, "r must"),
        (dict(r=True), TypeError, "r must"),
        (dict(alpha=float("inf")), ValueError, "alpha"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(alpha="8"), TypeError, "alpha"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(dropout=-0.1), ValueError, "dropout"),
        (dict(dropout=None), TypeError, "dropout"),
        (dict(rslora=1), TypeError, "rslora"),
    ],
)
def test_lora_linear_and_add_lora_refuse_bad_hyperparameters_naming_them(kwargs, exc, word):
    args = dict(r=4, alpha=8.0, dropout=0.0, rslora=False) | kwargs
    with pytest.raises(exc, match=word):
        LoRALinear(nn.Linear(4, 4), **args)
    with pytest.raises(exc, match=word):
        add_lora(Tiny(), ["q_proj"], **args)


@pytest.mark.parametrize("base", [nn.Conv1d(2, 2, 1), nn.Embedding(4, 4), nn.Identity(), "linear"])
def test_lora_linear_refuses_a_base_that_is_not_linear(base):
    with pytest.raises(TypeError, match="base must be"):
        LoRALinear(base, r=2, alpha=2)


# --- packed (4-bit-like) bases ---------------------------------------------------------------------------


class FakePacked(nn.Module):
    """Stands in for the QLoRA chapter's Linear4bit: declares peftlab_linear and keeps its weight outside Parameters."""

    peftlab_linear = True

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.in_features, self.out_features = fan_in, fan_out
        self.register_buffer("packed", torch.randn(fan_out, fan_in))

    def extra_parameter_count(self) -> int:
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.packed.T.to(x.dtype)  # computes in the input's dtype, like bnb's Linear4bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_base_output_dtype_follows_input(dtype):
    torch.manual_seed(10)
    layer = LoRALinear(FakePacked(8, 6), r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and layer.lora_A.dtype == torch.float32
    expected = (x.float() @ layer.base.packed.T.to(dtype).float()
                + layer.scaling * x.float() @ (layer.lora_B @ layer.lora_A).T)
    torch.testing.assert_close(y.float(), expected, **TOL[dtype])
    y.sum().backward()
    assert x.grad.dtype == dtype and layer.lora_A.grad.dtype == torch.float32


def test_packed_base_wraps_counts_and_refuses_merge():
    model = nn.Sequential(FakePacked(8, 6), nn.ReLU(), nn.Linear(6, 3))
    add_lora(model, ["0", "2"], r=2, alpha=4)
    assert isinstance(model[0], LoRALinear) and model[0].lora_A.dtype == torch.float32
    x = torch.randn(5, 8)
    assert model(x).shape == (5, 3)
    count = count_parameters(model)
    assert count.trainable == 2 * (8 + 6) + 2 * (6 + 3)
    assert count.total == count.trainable + 8 * 6 + (6 * 3 + 3)
    with pytest.raises(ValueError, match="dequantize"):
        model[0].merge()
    with pytest.raises(ValueError, match="dequantize"):
        merge_lora(model)
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)  # nothing replaced


# --- device and dtype of the factors ---------------------------------------------------------------------


def _linear4bit(fan_in=128, fan_out=64, compute_dtype=None):
    from peftlab.qlora import Linear4bit

    torch.manual_seed(3)
    return Linear4bit.from_linear(nn.Linear(fan_in, fan_out), compute_dtype=compute_dtype)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_factors_on_a_meta_linear4bit_base_are_meta_and_float32(compute_dtype):
    base = _linear4bit(compute_dtype=compute_dtype).to("meta")
    assert base.weight.device.type == "meta"  # the NF4Tensor's bytes, not a torch.Tensor weight
    layer = LoRALinear(base, r=4, alpha=8)
    for factor in (layer.lora_A, layer.lora_B):
        assert factor.device.type == "meta" and factor.dtype == torch.float32  # float32 whatever the compute dtype
    assert layer.lora_A.shape == (4, 128) and layer.lora_B.shape == (64, 4)


@pytest.mark.parametrize("dtype,factor_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_factors_on_a_meta_linear_base_are_meta(dtype, factor_dtype):
    layer = LoRALinear(nn.Linear(32, 16, device="meta", dtype=dtype), r=2, alpha=4)
    assert layer.lora_A.device.type == layer.lora_B.device.type == "meta"
    assert layer.lora_A.dtype == layer.lora_B.dtype == factor_dtype


def test_add_lora_on_a_quantized_model_moved_to_meta_puts_every_factor_on_meta():
    from peftlab.qlora import quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    quantize_model(model, progress=False).to("meta")
    add_lora(model, ["0", "2"], r=4, alpha=8)
    factors = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(factors) == 4 and all(p.device.type == "meta" and p.dtype == torch.float32 for p in factors)


def test_lora_A_of_a_4bit_base_is_the_same_draw_as_of_its_float_base():
    # A is drawn from the CPU generator before it is placed, so a seed gives one A whatever the base.
    base, base_4bit = nn.Linear(128, 64), _linear4bit()
    torch.manual_seed(7)
    a_float = LoRALinear(base, r=4, alpha=8).lora_A
    torch.manual_seed(7)
    a_4bit = LoRALinear(base_4bit, r=4, alpha=8).lora_A
    torch.testing.assert_close(a_4bit, a_float, rtol=0, atol=0)


# --- counting --------------------------------------------------------------------------------------------


def test_count_parameters_counts_shared_once_and_prints():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, head)
    count = count_parameters(model)
    assert count == ParameterCount(40, 40) and count.fraction == 1.0
    model.requires_grad_(False)
    assert count_parameters(model) == (0, 40)
    assert str(ParameterCount(1234, 1_000_000)) == "trainable: 1,234 of 1,000,000 parameters (0.1234%)"
    assert ParameterCount(0, 0).fraction == 0.0
    with pytest.raises(TypeError, match="model"):
        count_parameters([1, 2])


# --- CUDA ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_peft(dtype):
    ours, theirs = pair(256, 128, dtype, r=16, alpha=32)
    ours, theirs = ours.cuda(), theirs.cuda()
    x = torch.randn(4, 32, 256, dtype=dtype, device="cuda", requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y1, y2 = ours(x), theirs(x2)
    torch.testing.assert_close(y1, y2, **TOL[dtype])
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, **TOL[dtype])
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-3, atol=1e-3)
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(ours.base.weight, theirs.base_layer.weight, **TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16])
def test_cuda_factors_follow_a_linear4bit_base_and_train(compute_dtype):
    cpu_base = _linear4bit(compute_dtype=compute_dtype)
    cuda_base = _linear4bit(compute_dtype=compute_dtype).to("cuda")
    torch.manual_seed(5)
    on_cpu = LoRALinear(cpu_base, r=8, alpha=16)
    torch.manual_seed(5)
    layer = LoRALinear(cuda_base, r=8, alpha=16)
    assert layer.lora_A.is_cuda and layer.lora_B.is_cuda and layer.lora_A.dtype == torch.float32
    torch.testing.assert_close(layer.lora_A.cpu(), on_cpu.lora_A, rtol=0, atol=0)  # same draw on either device
    x = torch.randn(4, 16, 128, device="cuda", dtype=compute_dtype)
    y = layer(x)
    y.float().square().mean().backward()
    assert y.dtype == compute_dtype and layer.lora_B.grad.is_cuda and layer.lora_B.grad.abs().sum() > 0


# --- "all-linear", disable_adapter, weight/bias (PEFT users' expectations) ------------------------------


def _tiny_llama(seed: int = 0):
    from peftlab.harness.pretrained import build_model

    return build_model(seed)


def _lora_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@pytest.mark.parametrize("spelling", ["all-linear", "ALL-Linear"])
def test_all_linear_on_the_tiny_llama_selects_what_peft_selects(spelling):
    expected = _peft_targets(_tiny_llama(), spelling)
    assert "lm_head" not in expected and len(expected) == 7 * 4  # PEFT leaves the head out
    assert set(find_targets(_tiny_llama(), spelling)) == expected
    assert _lora_names(add_lora(_tiny_llama(), spelling, r=2, alpha=4)) == expected


def test_all_linear_on_a_transformers_gpt_neox_selects_what_peft_selects():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    def build():
        torch.manual_seed(0)
        cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32)
        return GPTNeoXForCausalLM(cfg)

    expected = _peft_targets(build(), "all-linear")
    assert expected and not any("embed_out" in n for n in expected)
    assert _lora_names(add_lora(build(), "all-linear", r=2, alpha=4)) == expected


def test_all_linear_on_a_plain_module_keeps_the_head_as_peft_does():
    # PEFT leaves the head out only for a transformers PreTrainedModel
    expected = _peft_targets(Tiny(), "all-linear")
    assert "lm_head" in expected
    assert _lora_names(add_lora(Tiny(), "all-linear", r=2, alpha=4)) == expected


def test_all_linear_on_a_4bit_tiny_llama_selects_what_peft_selects_on_its_float_twin():
    from peftlab.qlora import Linear4bit, quantize_model

    expected = _peft_targets(_tiny_llama(), "all-linear")
    model = quantize_model(_tiny_llama(), progress=False)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    assert _lora_names(add_lora(model, "all-linear", r=2, alpha=4)) == expected


def test_all_linear_on_a_model_with_lora_refuses_like_explicit_targets():
    model = add_lora(Tiny(), ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, "all-linear", r=2, alpha=2)


def _llama_pair_with_trained_factors():
    """PEFT's and peftlab's LoRA on the same tiny LLaMA, with equal non-zero factors."""
    theirs = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ours = add_lora(_tiny_llama(), "all-linear", r=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    with torch.no_grad():
        for name, m in theirs.base_model.model.named_modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                m.lora_B["default"].weight.normal_(0, 0.05, generator=gen)
                layers[name].lora_A.copy_(m.lora_A["default"].weight)
                layers[name].lora_B.copy_(m.lora_B["default"].weight)
    return theirs.eval(), ours.eval()


def test_disable_adapter_gives_peft_disable_adapter_outputs_and_restores():
    from peftlab.adapters import disable_adapter

    theirs, ours = _llama_pair_with_trained_factors()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with theirs.disable_adapter():
            base_theirs = theirs(ids).logits
        with disable_adapter(ours) as same:
            assert same is ours
            base_ours = ours(ids).logits
        on_theirs, on_ours = theirs(ids).logits, ours(ids).logits
    torch.testing.assert_close(base_ours, base_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_ours, _tiny_llama()(ids).logits, rtol=0, atol=0)
    assert (on_theirs - base_theirs).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(on_ours, on_theirs, rtol=1e-5, atol=1e-5)


def test_disable_adapter_restores_after_an_exception():
    from peftlab.adapters import disable_adapter

    _, ours = _llama_pair_with_trained_factors()
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        before = ours(ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with disable_adapter(ours):
                raise RuntimeError("boom")
        assert not any(m.disabled for m in ours.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(ours(ids).logits, before, rtol=0, atol=0)


def test_disable_adapter_on_merged_layers_unmerges_like_peft_and_remerges():
    from peftlab.adapters import disable_adapter

    theirs, ours = _llama_pair_with_trained_factors()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        on_theirs = theirs(ids).logits
        theirs.merge_adapter()
        with theirs.disable_adapter():  # PEFT's disabled forward unmerges
            base_theirs = theirs(ids).logits
        for m in ours.modules():
            if isinstance(m, LoRALinear):
                m.merge()
        with disable_adapter(ours):
            assert not any(m.merged for m in ours.modules() if isinstance(m, LoRALinear))
            base_ours = ours(ids).logits
            with pytest.raises(ValueError, match="disable_adapter"):
                ours.model.layers[0].self_attn.q_proj.merge()
        assert all(m.merged for m in ours.modules() if isinstance(m, LoRALinear))
        after = ours(ids).logits
    torch.testing.assert_close(base_ours, base_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, on_theirs, rtol=1e-4, atol=1e-4)


def test_disable_adapter_refuses_a_model_without_lora_and_a_non_module():
    from peftlab.adapters import disable_adapter

    with pytest.raises(ValueError, match="no LoRA layer"):
        with disable_adapter(Tiny()):
            pass
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        with disable_adapter("model"):
            pass


@pytest.mark.parametrize("bias", [True, False])
def test_weight_and_bias_are_the_base_layers_like_peft(bias):
    base = nn.Linear(6, 4, bias=bias)
    ours = LoRALinear(base, r=2, alpha=2)
    theirs = peft_layer(base, r=2, alpha=2)
    assert ours.weight is base.weight
    assert ours.bias is base.bias
    torch.testing.assert_close(ours.weight, theirs.weight)
    assert (ours.bias is None) == (theirs.bias is None)
    assert set(ours.state_dict()) == {"base.weight", "lora_A", "lora_B"} | ({"base.bias"} if bias else set())


def test_all_linear_on_gpt2_refuses_the_conv1d_layers_peft_would_select():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    assert "transformer.h.0.attn.c_attn" in _peft_targets(GPT2LMHeadModel(model.config), "all-linear")
    with pytest.raises(TypeError, match="Conv1D"):
        add_lora(model, "all-linear", r=2, alpha=2)


@pytest.mark.parametrize(
    "targets,exclude",
    [(["q_proj", "v_proj", "0"], ["v_proj"]), (r".*", r"lm_head|norm|mlp\.1|mlp|"),
     ("all-linear", ["mlp.0", "q_proj"]), ("all-linear", r".*head")],
)
def test_exclude_modules_selects_what_peft_selects(targets, exclude):
    wrapped = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=targets, exclude_modules=exclude))
    prefix = "base_model.model."
    expected = {n[len(prefix):] for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert _lora_names(add_lora(Tiny(), targets, r=2, alpha=2, exclude_modules=exclude)) == expected


def test_exclude_modules_of_the_wrong_type_is_refused_naming_it():
    with pytest.raises(TypeError, match="exclude_modules"):
        add_lora(Tiny(), ["q_proj"], r=2, alpha=2, exclude_modules=3)
    with pytest.raises(TypeError, match="exclude_modules"):
        add_lora(Tiny(), ["q_proj"], r=2, alpha=2, exclude_modules=["q_proj", 1])


def test_add_lora_layers_returns_the_layers_it_added_and_lora_layers_finds_them_all():
    from peftlab.adapters import add_lora_layers, lora_layers

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no LoRA layer"):
        lora_layers(model, required=True)
    assert lora_layers(model) == []
    first = add_lora_layers(model, ["0"], r=2, alpha=2)
    second = add_lora_layers(model, ["1"], r=2, alpha=2)
    assert [n for n, _ in first] == ["0"] and [n for n, _ in second] == ["1"]
    assert first[0][1] is model[0] and second[0][1] is model[1]
    assert [n for n, _ in lora_layers(model)] == ["0", "1"]
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lora_layers("model")
