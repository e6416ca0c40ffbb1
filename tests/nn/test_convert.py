"""Conversion API: target matching rules, in-place swaps, reports, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.nn import (
    LowRankLinear,
    SparseLowRankLinear,
    convert_to_low_rank,
    convert_to_sparse_low_rank,
    iter_target_linears,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.layers:
            h = h + block.mlp(block.norm(block.q_proj(h) + block.v_proj(h)))
        return self.lm_head(h)


def _names(model: nn.Module, **kwargs) -> list[str]:
    return [name for name, _ in iter_target_linears(model, **kwargs)]


def test_matching_rules() -> None:
    model = Toy()
    every = [f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj", "mlp.0", "mlp.2")]
    assert _names(model) == every  # lm_head excluded
    assert _names(model, target_modules="all-linear") == every
    assert _names(model, target_modules=["q_proj"]) == [
        "layers.0.q_proj",
        "layers.1.q_proj",
    ]  # last component
    assert _names(model, target_modules="mlp") == [n for n in every if ".mlp." in n]  # substring
    assert _names(model, target_modules=r"layers\.1\.(q|v)_proj") == ["layers.1.q_proj", "layers.1.v_proj"]
    assert _names(model, target_modules=["lm_head"]) == ["lm_head"]  # explicit head is allowed
    assert _names(model, module_filter_fn=lambda m, n: m.out_features == 32) == [
        "layers.0.mlp.0",
        "layers.1.mlp.0",
    ]


def test_convert_sparse_low_rank_in_place_with_report() -> None:
    torch.manual_seed(0)
    model = Toy()
    report = convert_to_sparse_low_rank(
        model, rank=4, density=0.05, target_modules=["q_proj", "v_proj"], seed=0
    )
    assert report.converted == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert (
        isinstance(model.layers[1].v_proj, SparseLowRankLinear) and type(model.layers[0].mlp[0]) is nn.Linear
    )
    assert report.params_after == sum(p.numel() for p in model.parameters()) < report.params_before
    assert report.index_bytes == 4 * sum(
        model.layers[i].q_proj.nnz + model.layers[i].v_proj.nnz for i in range(2)
    )
    assert "converted 4 linear layers" in str(report)
    # Distinct supports per layer, reproducible from the seed.
    assert not torch.equal(model.layers[0].q_proj.sparse_index, model.layers[0].v_proj.sparse_index)
    again = Toy()
    convert_to_sparse_low_rank(again, rank=4, density=0.05, target_modules=["q_proj", "v_proj"], seed=0)
    assert torch.equal(again.layers[1].v_proj.sparse_index, model.layers[1].v_proj.sparse_index)
    model(torch.tensor([[1, 2, 3]])).sum().backward()  # still trains end to end


def test_convert_svd_preserves_function_at_full_rank() -> None:
    torch.manual_seed(0)
    model = Toy().double()
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(ids)
    report = convert_to_low_rank(model, rank=lambda lin: min(lin.weight.shape), init="svd")
    assert len(report.converted) == 8 and all(
        isinstance(model.get_submodule(n), LowRankLinear) for n in report.converted
    )
    torch.testing.assert_close(model(ids), before)


def test_converting_twice_is_a_noop_and_nothing_matched_errors() -> None:
    model = Toy()
    convert_to_low_rank(model, rank=2)
    with pytest.raises(ValueError, match=r"no nn\.Linear matched"):
        convert_to_low_rank(model, rank=2)  # only lm_head is left, and it is excluded
    with pytest.raises(ValueError, match=r"no nn\.Linear matched"):
        convert_to_sparse_low_rank(Toy(), rank=2, target_modules="nonexistent")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="init"):
        convert_to_sparse_low_rank(Toy(), rank=2, init="zeros")
    with pytest.raises(ValueError, match="rank"):
        convert_to_low_rank(Toy(), rank=0)
    with pytest.raises(TypeError, match="target_modules"):
        iter_target_linears(Toy(), target_modules=[3])  # type: ignore[list-item]


def test_llama_attention_and_mlp_converted() -> None:
    pytest.importorskip("transformers")
    from lowmem.bench.layers import sltrain_variant
    from lowmem.bench.model import PRESETS, build_model, language_model_loss

    model = build_model(PRESETS["micro"], seq_len=16, seed=0)
    report = sltrain_variant(model, density=0.03, seed=0)
    kinds = {name.rsplit(".", 1)[-1] for name in report.converted}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert type(model.lm_head) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj.rank == PRESETS["micro"].hidden_size // 4
    loss = language_model_loss(model, torch.randint(0, 256, (2, 17)))
    loss.backward()
    assert torch.isfinite(loss)
