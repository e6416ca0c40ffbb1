"""ApolloAdamW beyond the shared contract: seeds, memory, APOLLO-Mini, orientations."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import APOLLO_MINI, ApolloAdamW
from lowmem.optim.projector import gaussian_projection


def _grad(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(2000 + seed)
    return torch.randn(shape, generator=gen, dtype=dtype)


def test_same_shaped_layers_get_different_projections() -> None:
    layers = [torch.nn.Parameter(torch.zeros(16, 8)) for _ in range(3)]
    opt = ApolloAdamW([{"params": layers, "rank": 2}])
    for p in layers:
        p.grad = _grad(p.shape, 0)
    opt.step()
    seeds = [int(opt.state[p]["proj_seed"]) for p in layers]
    assert len(set(seeds)) == 3
    # Identical gradients, different projections → different low-rank moments.
    assert not torch.equal(opt.state[layers[0]]["exp_avg"], opt.state[layers[1]]["exp_avg"])


def test_seed_does_not_depend_on_unrelated_params() -> None:
    """Adding a parameter of another shape in front changes nobody's projection."""
    a1, a2 = torch.nn.Parameter(torch.zeros(16, 8)), torch.nn.Parameter(torch.zeros(16, 8))
    other = torch.nn.Parameter(torch.zeros(9, 7))
    opt1 = ApolloAdamW([{"params": [a1], "rank": 2}])
    opt2 = ApolloAdamW([{"params": [other, a2], "rank": 2}])
    for p in (a1, a2, other):
        p.grad = _grad(p.shape, 0)
    opt1.step()
    opt2.step()
    assert int(opt1.state[a1]["proj_seed"]) == int(opt2.state[a2]["proj_seed"])


def test_projection_is_regenerated_not_stored() -> None:
    w = torch.nn.Parameter(torch.zeros(64, 32))
    opt = ApolloAdamW([{"params": [w], "rank": 4}])
    w.grad = _grad(w.shape, 0)
    opt.step()
    state = opt.state[w]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert set(tensors) == {"step", "exp_avg", "exp_avg_sq", "last_refresh", "proj_seed", "update_norm"}
    assert state["exp_avg"].shape == (64, 4)
    elements = sum(v.numel() for v in tensors.values())
    assert elements == 2 * 64 * 4 + 4  # moments + four scalars; no 4×32 projection matrix
    _, q = gaussian_projection((64, 32), 4, "right", seed=int(state["proj_seed"]), like=w)
    assert q.shape == (4, 32) and torch.equal(
        q, gaussian_projection((64, 32), 4, "right", seed=int(state["proj_seed"]), like=w)[1]
    )


def test_seed_changes_at_each_refresh() -> None:
    w = torch.nn.Parameter(torch.zeros(16, 8))
    opt = ApolloAdamW([{"params": [w], "rank": 2, "update_proj_gap": 2}])
    seeds = []
    for step in range(5):
        w.grad = _grad(w.shape, step)
        opt.step()
        seeds.append(int(opt.state[w]["proj_seed"]))
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3] != seeds[4]


def test_apollo_mini_state_is_rank_one_and_tiny() -> None:
    """APOLLO-Mini keeps 2·m moment elements per m×n weight (m >= n): < 1 % of AdamW's 2·m·n."""
    w = torch.nn.Parameter(torch.zeros(512, 256))
    opt = ApolloAdamW([{"params": [w], **APOLLO_MINI}], lr=1e-3)
    w.grad = _grad(w.shape, 0)
    opt.step()
    moments = opt.state[w]["exp_avg"].numel() + opt.state[w]["exp_avg_sq"].numel()
    assert moments == 2 * 512
    assert moments < 0.01 * 2 * w.numel()
    assert torch.count_nonzero(w) > 0


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_every_orientation_trains(proj_type: str, shape: tuple[int, int]) -> None:
    """A least-squares problem gets solved (loss falls by 5x) in every orientation."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(shape, generator=gen)
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = ApolloAdamW([{"params": [w], "rank": 2, "proj_type": proj_type, "update_proj_gap": 10}], lr=0.05)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = (w - target).square().mean()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first / 5


def test_project_on_refresh_needs_svd() -> None:
    with pytest.raises(ValueError, match="Invalid on_refresh"):
        ApolloAdamW([{"params": [torch.nn.Parameter(torch.zeros(8, 4))], "rank": 2, "on_refresh": "project"}])
    ApolloAdamW(
        [
            {
                "params": [torch.nn.Parameter(torch.zeros(8, 4))],
                "rank": 2,
                "on_refresh": "project",
                "proj": "svd",
            }
        ]
    )


def test_conv_weight() -> None:
    conv = torch.nn.Conv2d(4, 10, 3)
    opt = ApolloAdamW([{"params": [conv.weight], "rank": 3}])
    conv.weight.grad = _grad(conv.weight.shape, 0)
    before = conv.weight.detach().clone()
    opt.step()
    assert opt.state[conv.weight]["exp_avg"].shape == (3, 36)  # 10×36: the left side is projected
    assert not torch.equal(before, conv.weight)
