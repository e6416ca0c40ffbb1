"""SparseLowRankLinear: initialization, support, state_dict, from_linear / to_dense, errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lowmem.nn import SparseLowRankLinear
from lowmem.nn.sparse_low_rank import random_support


def test_shapes_support_and_init() -> None:
    layer = SparseLowRankLinear(40, 30, rank=6, density=0.1, alpha=12.0, seed=3)
    assert layer.B.shape == (30, 6) and layer.A.shape == (6, 40)
    assert layer.nnz == round(0.1 * 30 * 40) == layer.sparse_values.numel()
    index = layer.sparse_index
    assert index.dtype == torch.int32
    assert (
        torch.all(index[1:] > index[:-1]) and 0 <= index.min() and index.max() < 30 * 40
    )  # sorted, distinct
    assert layer.scale == 2.0
    # SLTrain init: B = 0, A Kaiming-uniform (nn.Linear's bound for a 40-wide input), S in ±1/sqrt(in).
    assert torch.count_nonzero(layer.B) == 0
    assert layer.A.abs().max() <= 1 / math.sqrt(40) + 1e-7 and layer.A.std() > 0
    assert layer.sparse_values.abs().max() <= 1 / math.sqrt(40)
    # At init W = S exactly.
    expected = torch.zeros(30 * 40)
    expected[index.long()] = layer.sparse_values.detach()
    torch.testing.assert_close(layer.dense_weight().view(-1), expected)


def test_support_is_seeded_and_uniform() -> None:
    a = SparseLowRankLinear(64, 32, 4, seed=7).sparse_index
    assert torch.equal(a, SparseLowRankLinear(64, 32, 4, seed=7).sparse_index)
    assert not torch.equal(a, SparseLowRankLinear(64, 32, 4, seed=8).sparse_index)
    big = random_support(200, 300, 0.05, seed=0).long()
    rows = torch.bincount(big // 300, minlength=200).float()
    # Uniform support: ~15 per row, no row systematically empty or full.
    assert abs(rows.mean().item() - 15.0) < 1e-6 and rows.std().item() < 3 * math.sqrt(15)


def test_forward_matches_dense_weight_and_backward_reaches_all_params() -> None:
    torch.manual_seed(0)
    layer = SparseLowRankLinear(24, 18, 5, density=0.2, seed=1)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 7, 24)
    y = layer(x)
    torch.testing.assert_close(y, x @ layer.dense_weight().t() + layer.bias)
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip_keeps_support() -> None:
    layer = SparseLowRankLinear(20, 10, 3, density=0.2, seed=5)
    assert {"B", "A", "sparse_values", "sparse_index", "bias"} <= set(layer.state_dict())
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    other = SparseLowRankLinear(20, 10, 3, density=0.2, seed=99)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(other.sparse_index, layer.sparse_index)
    x = torch.randn(4, 20)
    torch.testing.assert_close(other(x), layer(x))


@pytest.mark.parametrize("support", ["largest", "random"])
def test_from_linear_and_to_dense(support: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    layer = SparseLowRankLinear.from_linear(linear, rank=8, density=0.1, support=support, seed=0)
    w = linear.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    svd_err = torch.linalg.norm(w - (u[:, :8] * s[:8]) @ vh[:8])
    err = torch.linalg.norm(layer.dense_weight() - w)
    assert err < svd_err  # the sparse part removes part of the truncated-SVD residual
    if support == "largest":
        residual = w - (u[:, :8] * s[:8]) @ vh[:8]
        best = residual.view(-1).abs().topk(layer.nnz).values
        torch.testing.assert_close(
            err**2, residual.square().sum() - best.square().sum(), rtol=1e-3, atol=1e-6
        )
    dense = layer.to_dense()
    assert type(dense) is nn.Linear
    x = torch.randn(5, 32)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)


def test_full_rank_from_linear_is_exact() -> None:
    linear = nn.Linear(6, 5, dtype=torch.float64)
    layer = SparseLowRankLinear.from_linear(linear, rank=5, density=0.0)
    torch.testing.assert_close(layer.dense_weight(), linear.weight.detach())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 11}, "rank"),
        ({"rank": 2, "density": 1.5}, "density"),
        ({"rank": 2, "alpha": float("nan")}, "alpha"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseLowRankLinear(20, 10, **kwargs)


def test_from_linear_bad_support() -> None:
    with pytest.raises(ValueError, match="support"):
        SparseLowRankLinear.from_linear(nn.Linear(4, 4), 2, support="topk")  # type: ignore[arg-type]
