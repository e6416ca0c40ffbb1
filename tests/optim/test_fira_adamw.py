"""FiraAdamW beyond the shared contract: alias keys, the residual, the limiter, shapes."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import FiraAdamW, GaLoreAdamW


def _weight(shape=(12, 8), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))


def _grad(shape, seed, dtype=torch.float64, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(shape, generator=gen, dtype=dtype) * scale


def test_alpha_is_an_alias_of_scale() -> None:
    a, b = _weight(), _weight()
    opt_a = FiraAdamW([{"params": [a], "rank": 3, "alpha": 0.5}])
    opt_b = FiraAdamW([{"params": [b], "rank": 3, "scale": 0.5}])
    assert opt_a.param_groups[0]["scale"] == 0.5 and "alpha" not in opt_a.param_groups[0]
    for step in range(3):
        a.grad = _grad(a.shape, step)
        b.grad = _grad(b.shape, step)
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_alpha_and_scale_disagreeing_raise() -> None:
    with pytest.raises(ValueError, match="both 'scale' and its alias 'alpha'"):
        FiraAdamW([{"params": [_weight()], "rank": 3, "alpha": 0.5, "scale": 0.25}])


def test_full_projection_is_rejected_with_the_reason() -> None:
    with pytest.raises(ValueError, match="Invalid proj_type"):
        FiraAdamW([{"params": [_weight()], "rank": 3, "proj_type": "full"}])


def test_update_is_galore_plus_the_scaled_residual() -> None:
    """Fira − GaLore (same settings) is exactly the scaled residual, which lies outside span(Q)."""
    fira_w, galore_w = _weight(), _weight()
    keys = {"rank": 3, "projector": "svd", "scale": 0.25}
    fira = FiraAdamW([{"params": [fira_w], **keys}], lr=0.1, weight_decay=0.0)
    galore = GaLoreAdamW([{"params": [galore_w], **keys}], lr=0.1, weight_decay=0.0)
    before = fira_w.detach().clone()
    fira_w.grad = galore_w.grad = _grad(fira_w.shape, 0)
    fira.step()
    galore.step()
    extra = (galore_w - fira_w).detach() / 0.1  # = S, the scaled residual
    q = fira.state[fira_w]["proj_right"]
    assert extra.abs().max() > 1e-3, "the residual term must move the weights"
    torch.testing.assert_close(extra @ q.T, torch.zeros(12, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert not torch.equal(before, fira_w)


def test_residual_does_not_depend_on_scale() -> None:
    """Fira's reference code subtracts scale·back(R); ours subtracts back(R) whatever the scale."""
    residuals = []
    for scale in (0.25, 1.0):
        fira_w, galore_w = _weight(), _weight()
        keys = {"rank": 3, "projector": "svd", "scale": scale}
        fira = FiraAdamW([{"params": [fira_w], **keys}], lr=0.1, weight_decay=0.0)
        galore = GaLoreAdamW([{"params": [galore_w], **keys}], lr=0.1, weight_decay=0.0)
        fira_w.grad = galore_w.grad = _grad(fira_w.shape, 0)
        fira.step()
        galore.step()
        residuals.append((galore_w - fira_w).detach())
    torch.testing.assert_close(residuals[0], residuals[1], atol=1e-13, rtol=0)


def test_norm_growth_limiter_caps_a_gradient_spike() -> None:
    """A 100x gradient spike grows the residual's norm by at most γ = 1.01."""
    w = _weight()
    opt = FiraAdamW([{"params": [w], "rank": 3, "projector": "svd"}], lr=0.1, weight_decay=0.0)
    for step in range(3):
        w.grad = _grad(w.shape, step)
        opt.step()
    before = opt.state[w]["residual_norm"].item()
    w.grad = _grad(w.shape, 3, scale=100.0)
    opt.step()
    after = opt.state[w]["residual_norm"].item()
    assert 0 < after <= 1.01 * before * (1 + 1e-12)


def test_conv_weight_and_bf16() -> None:
    conv = torch.nn.Conv2d(6, 10, 3)
    conv_bf16 = torch.nn.Conv2d(6, 10, 3).to(torch.bfloat16)
    opt = FiraAdamW([{"params": [conv.weight, conv_bf16.weight], "rank": 4}], lr=1e-2)
    for step in range(3):
        conv.weight.grad = _grad(conv.weight.shape, step, torch.float32)
        conv_bf16.weight.grad = _grad(conv.weight.shape, step, torch.bfloat16)
        opt.step()
    assert opt.state[conv.weight]["exp_avg"].shape == (4, 54)  # 10×54: the left side is projected
    assert torch.isfinite(conv.weight).all() and torch.isfinite(conv_bf16.weight.float()).all()
