"""lowmem.optim.lowrank_param_groups on a small transformer-shaped model (no transformers needed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lowmem.optim import GaLoreAdamW, lowrank_param_groups


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict(
            {name: nn.Linear(d, d) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        )
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = (self.attn[n](h) for n in ("q_proj", "k_proj", "v_proj"))
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.attn["o_proj"](weights @ v)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def ids(params) -> set[int]:
    return {id(p) for p in params}


def expected_lowrank(model: TinyLM) -> set[int]:
    weights = set()
    for block in model.blocks:
        weights |= {id(block.attn[n].weight) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        weights |= {id(block.mlp[0].weight), id(block.mlp[2].weight)}
    return weights


def test_matches_attn_and_mlp_linear_weights() -> None:
    model = make_model()
    groups = lowrank_param_groups(model, ["attn", "mlp"], rank=2, update_proj_gap=5, lr=3e-3)
    assert len(groups) == 2
    lowrank, rest = groups
    assert lowrank["rank"] == 2 and lowrank["update_proj_gap"] == 5 and lowrank["lr"] == 3e-3
    assert set(rest) == {"params"}  # the plain group takes the optimizer's defaults
    assert ids(lowrank["params"]) == expected_lowrank(model)
    assert len(lowrank["params"]) == 12 and all(p.dim() == 2 for p in lowrank["params"])
    # Everything else once: biases, norms, the (tied) embedding; every trainable param exactly once.
    all_params = [*lowrank["params"], *rest["params"]]
    assert len(all_params) == len(ids(all_params)) == len(list(model.parameters()))
    assert ids(rest["params"]) == ids(model.parameters()) - expected_lowrank(model)
    assert id(model.embed.weight) in ids(rest["params"])
    for block in model.blocks:
        assert id(block.attn["q_proj"].bias) in ids(rest["params"])
        assert id(block.norm1.weight) in ids(rest["params"]) and id(block.norm1.bias) in ids(rest["params"])


def test_tied_weight_matched_as_linear_appears_once() -> None:
    model = make_model()
    groups = lowrank_param_groups(model, ["lm_head", "q_proj"], rank=2)
    lowrank, rest = groups
    assert id(model.embed.weight) in ids(lowrank["params"])
    assert id(model.embed.weight) not in ids(rest["params"])
    all_params = [*lowrank["params"], *rest["params"]]
    assert len(all_params) == len(ids(all_params)) == len(list(model.parameters()))


def test_two_linears_sharing_a_weight_are_listed_once() -> None:
    model = nn.ModuleDict({"attn_a": nn.Linear(4, 4), "attn_b": nn.Linear(4, 4)})
    model["attn_b"].weight = model["attn_a"].weight
    lowrank, rest = lowrank_param_groups(model, "attn", rank=1)
    assert lowrank["params"] == [model["attn_a"].weight]
    assert ids(rest["params"]) == {id(model["attn_a"].bias), id(model["attn_b"].bias)}


def test_frozen_params_are_left_out() -> None:
    model = make_model()
    model.blocks[0].attn["q_proj"].weight.requires_grad_(False)
    model.norm.weight.requires_grad_(False)
    lowrank, rest = lowrank_param_groups(model, ["attn", "mlp"], rank=2)
    everything = ids(lowrank["params"]) | ids(rest["params"])
    assert id(model.blocks[0].attn["q_proj"].weight) not in everything
    assert id(model.norm.weight) not in everything
    assert len(lowrank["params"]) == 11


def test_warns_listing_unmatched_targets() -> None:
    model = make_model()
    with pytest.warns(UserWarning, match=r"\['gate_proj', 'up_proj'\]") as record:
        groups = lowrank_param_groups(model, ["q_proj", "gate_proj", "up_proj"], rank=2)
    assert len(record) == 1 and "q_proj'" not in str(record[0].message)
    assert len(groups[0]["params"]) == 2


def test_no_warning_when_every_target_matches() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank_param_groups(make_model(), ["attn", "mlp"], rank=2)


@pytest.mark.parametrize("targets", [["nothing"], ["embed"], ["norm"], []])
def test_raises_when_nothing_matches(targets: list[str]) -> None:
    """Embedding and LayerNorm names are not nn.Linear, so they match nothing either."""
    with pytest.raises(ValueError, match="lowrank_param_groups"):
        lowrank_param_groups(make_model(), targets, rank=2)


def test_groups_train_with_galore_adamw() -> None:
    model = make_model()
    groups = lowrank_param_groups(model, ["attn", "mlp"], rank=2, update_proj_gap=4)
    opt = GaLoreAdamW(groups, lr=2e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (4, 6), generator=gen)
    targets = torch.roll(tokens, -1, dims=1)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens).reshape(-1, 11), targets.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for p in groups[0]["params"]:
        state = opt.state[p]
        assert state["exp_avg"].numel() < p.numel() and "last_refresh" in state
        assert int(state["last_refresh"]) == 25
    for p in groups[1]["params"]:
        assert opt.state[p]["exp_avg"].shape == p.shape and "last_refresh" not in opt.state[p]
