"""Tests for peftlab.approximation against numpy's norms (chapter: book/chapters/nf4.md)."""

import numpy as np
import pytest
import torch

from peftlab.approximation import relative_error


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (5, 3), (2, 3, 4)])
def test_relative_error_equals_numpy_frobenius_ratio(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(shape, generator=gen).to(dtype)
    approx = (
        exact.double() + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64)
    ).to(dtype)
    e, a = exact.double().numpy().ravel(), approx.double().numpy().ravel()
    reference = np.linalg.norm(a - e) / np.linalg.norm(e)
    # both cast to float64 before subtracting, as the reference: equal to float64 rounding
    assert relative_error(approx, exact) == pytest.approx(reference, rel=1e-12)


def test_relative_error_is_rmse_over_rms_and_zero_for_equal_tensors():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=gen)
    w_hat = w + 0.1 * torch.randn(64, 32, generator=gen)
    rmse_ratio = (
        ((w_hat.double() - w.double()).pow(2).mean() / w.double().pow(2).mean())
        .sqrt()
        .item()
    )
    assert relative_error(w_hat, w) == pytest.approx(rmse_ratio, rel=1e-12)
    assert relative_error(w, w) == 0.0


def test_relative_error_ignores_autograd_and_returns_a_float():
    exact = torch.ones(3, requires_grad=True)
    out = relative_error(exact * 2, exact)
    assert isinstance(out, float) and out == pytest.approx(1.0)


@pytest.mark.parametrize(
    "approx, exact, error, name",
    [
        (np.ones(3), torch.ones(3), TypeError, "approx"),
        (torch.ones(3), [1.0, 1.0, 1.0], TypeError, "exact"),
        (torch.ones(3), torch.ones(4), ValueError, "same shape"),
        (torch.ones(3), torch.zeros(3), ValueError, "exact"),
        (torch.ones(0), torch.ones(0), ValueError, "exact"),
        (torch.ones(3), torch.tensor([1.0, float("inf"), 1.0]), ValueError, "exact"),
    ],
)
def test_relative_error_refuses_bad_input_naming_the_parameter(
    approx, exact, error, name
):
    with pytest.raises(error, match=name):
        relative_error(approx, exact)
