"""Analyses of trained runs and their updates: effective rank, the DoRA paper's magnitude
and direction changes, the LoRA paper's subspace similarity, and a synthetic task whose
true update has a known rank.

Explained in the chapters *LoRA rank and alpha* (book/chapters/rank_alpha.md) and *LoRA
variants* (book/chapters/variants.md). The training loop calls
:func:`update_statistics` and :func:`magnitude_direction_of` on every run.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from peftlab.lora import LoRALinear
from peftlab.targets import LLAMA_LINEARS


def magnitude_direction(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """The DoRA paper's ΔM and ΔD (Liu et al. 2024, §3, Eq. 2–4) between a pretrained
    weight ``w0`` and a finetuned ``w`` (both ``out_features × in_features``).

    ΔM is the mean absolute change of the weight's per-output norms (its *magnitude*), ΔD
    the mean ``1 − cos`` between each output's old and new weight vector (its
    *direction*). Used by the chapter *LoRA variants* (book/chapters/variants.md).

    Note: the paper's W is ``d × k`` and multiplies from the right, so its column norms
    are the norms over each output's inputs: the rows of a PyTorch ``weight``, which is
    also the vector DoRA's magnitude holds (PEFT: ``norm(weight, dim=1)``).
    """
    for name, value in (("w0", w0), ("w", w)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise TypeError(f"{name} must be a 2-D tensor")
    if w0.shape != w.shape:
        raise ValueError(
            f"w0 and w must have one shape, got {tuple(w0.shape)} and {tuple(w.shape)}"
        )
    w0, w = w0.detach().double(), w.detach().double()
    dm = (w.norm(dim=1) - w0.norm(dim=1)).abs().mean().item()
    dd = (1 - torch.nn.functional.cosine_similarity(w, w0, dim=1)).mean().item()
    return dm, dd


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007):
    how many directions a matrix really uses, between 1 and its rank (0 for a zero
    matrix)."""
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise TypeError("matrix must be a 2-D tensor")
    s = torch.linalg.svdvals(matrix.detach().double())
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


@torch.no_grad()
def trained_weights(model: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The weights training changes, as they act now, by layer name: every adapted layer's
    merged weight (:meth:`peftlab.lora.LoRALinear.merged_weight`), or for full
    finetuning every linear layer of the blocks."""
    if method == "full":
        return linear_weights(model)
    return {
        name: module.merged_weight().float()
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }


def magnitude_direction_of(
    model: torch.nn.Module, method: str, start: dict[str, torch.Tensor]
) -> dict[str, list[list[float]]]:
    """ΔM and ΔD (:func:`magnitude_direction`) of every trained layer against its weight
    at the start (W0; for PiSSA, the residual plus the starting adapter, which is W0
    again), by module type, one ``[ΔM, ΔD]`` per block."""
    out: dict[str, list[list[float]]] = {}
    for name, weight in trained_weights(model, method).items():
        kind = name.rsplit(".", 1)[-1]
        out.setdefault(kind, []).append(list(magnitude_direction(start[name], weight)))
    return out


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the weights of every targetable linear layer of the blocks, by name."""
    return {
        name: module.weight.detach().float().clone()
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in LLAMA_LINEARS and hasattr(module, "weight")
    }


@torch.no_grad()
def update_statistics(
    model: torch.nn.Module, base_weights: dict[str, torch.Tensor]
) -> tuple[dict[str, float], float]:
    """Mean effective rank of the trained update ΔW per module type (``q_proj`` …), and
    the mean Frobenius norm of ΔW over layers: the full update ``W - W0`` when
    ``base_weights`` are given (full finetuning), else LoRA's ``scaling · B A``."""
    ranks: dict[str, list[float]] = {}
    norms: list[float] = []
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if isinstance(module, LoRALinear):
            delta = module.delta_weight().float()
        elif name in base_weights:
            delta = module.weight.float() - base_weights[name]
        else:
            continue
        ranks.setdefault(kind, []).append(effective_rank(delta.cpu()))
        norms.append(torch.linalg.matrix_norm(delta).item())
    mean_rank = {kind: sum(v) / len(v) for kind, v in ranks.items()}
    return mean_rank, sum(norms) / max(1, len(norms))


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) (Hu et al. 2021, §7.2),
    in [0, 1].

    ``A1`` (r1 × k) and ``A2`` (r2 × k) are two ``lora_A`` matrices of the same layer;
    U1, U2 hold their right-singular vectors (directions in the input space), most
    important first. 1 means the top-i directions of one span the top-j of the other (or
    vice versa); 0 means orthogonal.
    """
    for name, a in (("A1", A1), ("A2", A2)):
        if not isinstance(a, torch.Tensor) or a.dim() != 2:
            raise TypeError(f"{name} must be a 2-D tensor (r × in_features)")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(
            "A1 and A2 must have the same in_features, "
            f"got {A1.shape[1]} and {A2.shape[1]}"
        )
    for name, n, a in (("i", i, A1), ("j", j, A2)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= min(a.shape):
            raise ValueError(f"{name} must be an int in [1, {min(a.shape)}], got {n!r}")
    # i × k, rows orthonormal
    u1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh[:i]
    u2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh[:j]
    return (torch.linalg.matrix_norm(u1 @ u2.T) ** 2 / min(i, j)).item()


def synthetic_rank_run(
    r: int,
    true_rank: int,
    d: int = 64,
    steps: int = 300,
    lr: float = 1e-2,
    alpha: float | None = None,
    rslora: bool = False,
    seed: int = 0,
    n: int = 512,
) -> dict[str, Any]:
    """LoRA of rank ``r`` fitting a linear map whose true update ``W - W0`` has rank
    ``true_rank``.

    The data are ``y = (W0 + ΔW) x`` with Gaussian ``x``, a random ``W0`` (d × d) and ``ΔW
    = U Vᵀ`` of rank ``true_rank`` with singular values 1 … 1/true_rank; LoRA on a frozen
    ``W0`` learns ΔW. Returns the relative error ``‖scaling·BA - ΔW‖_F / ‖ΔW‖_F`` after
    training and the best any rank-r matrix can do (Eckart–Young: the energy of the
    discarded singular values), so the chapter can show the elbow at ``r = true_rank``.
    """
    if (
        isinstance(true_rank, bool)
        or not isinstance(true_rank, int)
        or not 1 <= true_rank <= d
    ):
        raise ValueError(f"true_rank must be an int in [1, d={d}], got {true_rank!r}")
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d, d, generator=gen) / math.sqrt(d)
    U, _ = torch.linalg.qr(torch.randn(d, true_rank, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(d, true_rank, generator=gen))
    sigma = 1.0 / torch.arange(1, true_rank + 1, dtype=torch.float32)
    delta = U @ torch.diag(sigma) @ V.T
    x = torch.randn(n, d, generator=gen)
    y = x @ (W0 + delta).T
    base = torch.nn.Linear(d, d, bias=False)
    with torch.no_grad():
        base.weight.copy_(W0)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        layer = LoRALinear(base, r, float(r if alpha is None else alpha), rslora=rslora)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(layer(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = (
            torch.linalg.matrix_norm(layer.delta_weight() - delta)
            / torch.linalg.matrix_norm(delta)
        ).item()
    best = (
        math.sqrt(float((sigma[r:] ** 2).sum() / (sigma**2).sum()))
        if r < true_rank
        else 0.0
    )
    return {
        "r": r,
        "true_rank": true_rank,
        "relative_error": err,
        "best_possible": best,
        "seed": seed,
    }
