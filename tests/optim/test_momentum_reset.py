"""reset_momentum: zeroes momenta (fp32 and 8-bit), re-warms the lr, composes with schedulers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.kernels.blockwise_quant import dequantize_blockwise
from lowmem.optim import AdamW8bit, GaLoreAdamW, reset_momentum


def _stepped(opt_factory, steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 4))
    opt = opt_factory(model)
    for _ in range(steps):
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_adamw_first_moment_zeroed_second_kept() -> None:
    model, opt = _stepped(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    v_before = [opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
    assert reset_momentum(opt, warmup_steps=0) == 4
    for p, v in zip(model.parameters(), v_before, strict=True):
        assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
        assert torch.equal(opt.state[p]["exp_avg_sq"], v)
    assert reset_momentum(opt, warmup_steps=0, second_moment=True) == 8
    assert all(torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0 for p in model.parameters())


def test_lowmem_optimizers_fp32_lowrank_and_8bit() -> None:
    model, opt = _stepped(lambda m: GaLoreAdamW([{"params": [m[0].weight], "rank": 2}], lr=1e-2))
    assert reset_momentum(opt, warmup_steps=0) == 1
    assert torch.count_nonzero(opt.state[model[0].weight]["exp_avg"]) == 0
    model, opt = _stepped(lambda m: AdamW8bit(m.parameters(), lr=1e-2, min_8bit_size=0))
    state = opt.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.uint8  # really the 8-bit block-wise layout
    assert dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], signed=True).abs().sum() > 0
    reset_momentum(opt, warmup_steps=0)
    assert dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], signed=True).abs().sum() == 0


def test_rewarmup_ramps_lr_and_restores_it_for_the_scheduler() -> None:
    model, opt = _stepped(lambda m: torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)  # chainable: reads the current lr
    reset_momentum(opt, warmup_steps=4)
    used: list[float] = []
    # Registered after the reset, so it runs after the ramp's pre-hook: it sees the lr step() uses.
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    for _ in range(6):
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    ramp = [(k + 1) / 4 for k in range(4)] + [1.0, 1.0]
    assert used == pytest.approx([0.5**k * r for k, r in enumerate(ramp)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5**6)  # the scheduler never saw the factor


def test_sgd_momentum_buffer_and_a_second_reset_restarts_the_ramp() -> None:
    _, opt = _stepped(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    assert reset_momentum(opt, warmup_steps=3) == 4
    assert reset_momentum(opt, warmup_steps=2) == 4
    lrs = []
    opt.register_step_pre_hook(
        lambda o, a, k: lrs.append(o.param_groups[0]["lr"])
    )  # runs after the ramp's hook
    for _ in range(3):
        opt.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1])


def test_errors() -> None:
    model = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="no momentum state"):
        reset_momentum(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="warmup_steps"):
        reset_momentum(torch.optim.AdamW(model.parameters()), warmup_steps=-1)
    opt = GaLoreAdamW(model.parameters(), lr=1e-3, layerwise=True)
    with pytest.raises(ValueError, match="layer-wise"):
        reset_momentum(opt, warmup_steps=5)
