"""Weight refactorization: product unchanged, factors balanced, degenerate directions kept alive."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.nn import LowRankLinear, SparseLowRankLinear, refactorize_


def test_product_unchanged_and_factors_balanced() -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(30, 20, rank=5)
    with torch.no_grad():
        layer.B.mul_(50.0)  # unbalance: B's scale grew, A's is unchanged
    before = layer.dense_weight().clone()
    b_param = layer.B
    assert refactorize_(layer) == 1
    assert layer.B is b_param  # copied in place: optimizers keep their references
    torch.testing.assert_close(layer.dense_weight(), before, rtol=1e-4, atol=1e-5)
    b_norms, a_norms = layer.B.norm(dim=0), layer.A.norm(dim=1)
    torch.testing.assert_close(b_norms, a_norms, rtol=1e-4, atol=1e-6)
    gram = layer.B.t() @ layer.B
    torch.testing.assert_close(
        gram, torch.diag(torch.diagonal(gram)), atol=1e-3, rtol=0
    )  # orthogonal columns


def test_sparse_low_rank_in_a_model_and_zero_product_skipped() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        SparseLowRankLinear(12, 10, 3, density=0.2, seed=0), nn.ReLU(), LowRankLinear(10, 8, 2)
    )
    assert refactorize_(model) == 1  # the SLTrain layer has B = 0 at init: skipped, unchanged
    assert torch.count_nonzero(model[0].B) == 0
    with torch.no_grad():
        model[0].B.normal_()
    x = torch.randn(4, 12)
    before = model(x)
    assert refactorize_(model) == 2
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_rank_deficient_directions_stay_trainable() -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(9, 7, rank=3)
    with torch.no_grad():
        layer.B[:, 2] = 0  # product has rank 2
    before = layer.dense_weight().clone()
    refactorize_(layer)
    torch.testing.assert_close(layer.dense_weight(), before, rtol=1e-4, atol=1e-5)
    assert (layer.A.norm(dim=1) > 0).all()  # no direction zero in both factors
    layer(torch.randn(5, 9)).square().sum().backward()
    assert (layer.B.grad.norm(dim=0) > 0).all()  # every column of B still receives gradient


def test_errors() -> None:
    with pytest.raises(ValueError, match="no LowRankLinear"):
        refactorize_(nn.Linear(3, 3))
    layer = LowRankLinear(4, 4, 2)
    with torch.no_grad():
        layer.A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        refactorize_(layer)
