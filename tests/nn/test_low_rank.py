"""LowRankLinear: forward, init variance, from_linear (Eckart-Young) and to_dense."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.nn import LowRankLinear


def test_forward_is_b_at_a() -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(16, 12, rank=3)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), x @ (layer.B @ layer.A).t() + layer.bias)
    assert sum(p.numel() for p in layer.parameters()) == 12 * 3 + 3 * 16 + 12


def test_init_matches_nn_linear_variance() -> None:
    torch.manual_seed(0)
    w = LowRankLinear(512, 512, rank=64).dense_weight()
    dense = nn.Linear(512, 512).weight.detach()
    assert abs(w.var().item() / dense.var().item() - 1) < 0.1


def test_from_linear_is_truncated_svd_and_balanced() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(20, 14)
    layer = LowRankLinear.from_linear(linear, rank=4)
    u, s, vh = torch.linalg.svd(linear.weight.detach())
    torch.testing.assert_close(layer.dense_weight(), (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.B.norm(dim=0), layer.A.norm(dim=1))  # both sqrt(s)
    dense = layer.to_dense()
    x = torch.randn(3, 20)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)


def test_saves_no_dense_weight() -> None:
    layer = LowRankLinear(64, 48, rank=4)
    x = torch.randn(5, 64, requires_grad=True)
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        layer(x).sum().backward()
    assert sizes and max(sizes) < 64 * 48


def test_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(8, 4, rank=5)
