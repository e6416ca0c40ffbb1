"""The memory estimator against the real thing: states and weights exactly, activations within 10%."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.memory import CPUOffloadOptimizer, estimate
from lowmem.memory.presets import LLAMA_PRESETS, LlamaShape, llama_skeleton
from lowmem.optim import (
    APOLLO_MINI,
    AdamW8bit,
    ApolloAdamW,
    FiraAdamW,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    lowrank_param_groups,
)

# Sizes chosen so that both rules of the 8-bit states show up: low-rank moments of q/o, gate/up
# and down (128x40, 352x40, 40x352) and the embedding are over the 4096-element threshold, those of
# k/v (grouped-query: 64x128, left-projected to 40x128 = 5120) too, the norms are under it.
SHAPE = LlamaShape(
    hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4, vocab_size=80, num_kv_heads=2
)
RANK = 40


def _real_optimizer(name: str, model: nn.Module, rank: int, proj_type: str):
    targets = ["self_attn", "mlp"]
    if name == "adamw":
        return torch.optim.AdamW(model.parameters())
    if name == "adamw8bit":
        return AdamW8bit(model.parameters())
    if name == "apollo_mini":
        return ApolloAdamW(lowrank_param_groups(model, targets, **{**APOLLO_MINI, "proj_type": proj_type}))
    cls = {
        "galore_adamw": GaLoreAdamW,
        "galore_adamw8bit": GaLoreAdamW8bit,
        "fira_adamw": FiraAdamW,
        "apollo_adamw": ApolloAdamW,
    }[name]
    return cls(lowrank_param_groups(model, targets, rank, proj_type=proj_type))


def _tiny_model(dtype: torch.dtype) -> nn.Module:
    model = llama_skeleton(SHAPE, dtype=dtype, device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(v.numel() * v.element_size() for v in tensors)


CASES = [
    ("adamw", "std"),
    ("adamw8bit", "std"),
    ("galore_adamw", "std"),
    ("galore_adamw", "full"),
    ("galore_adamw8bit", "std"),
    ("galore_adamw8bit", "reverse_std"),
    ("fira_adamw", "std"),
    ("apollo_adamw", "std"),
    ("apollo_mini", "std"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "proj_type"), CASES)
def test_state_and_weight_bytes_equal_what_the_optimizer_allocates(name: str, proj_type: str, dtype) -> None:
    model = _tiny_model(dtype)
    opt = _real_optimizer(name, model, RANK, proj_type)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    rank = None if name == "apollo_mini" else RANK  # APOLLO-Mini's own rank 1
    report = estimate(model, optimizer=name, rank=rank, proj_type=proj_type, dtype=dtype)
    real = _state_bytes(opt)
    assert real > 0 and report.optimizer_states == real
    assert report.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.gradients == report.weights


def test_the_8bit_threshold_and_low_rank_both_matter() -> None:
    """Guards the test above against a model where every rule gives the same bytes."""
    sizes = {
        name: estimate(_tiny_model(torch.float32), optimizer=name, rank=RANK).optimizer_states
        for name in ("adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit", "apollo_adamw")
    }
    assert sizes["adamw8bit"] < sizes["adamw"] / 3
    assert sizes["galore_adamw8bit"] < sizes["galore_adamw"] < sizes["adamw"]
    assert sizes["apollo_adamw"] < sizes["galore_adamw"]  # no stored basis


def test_offloaded_states_and_masters_are_what_cpu_offload_optimizer_holds() -> None:
    model = _tiny_model(torch.bfloat16)
    opt = CPUOffloadOptimizer(model.parameters(), AdamW8bit)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    report = estimate(model, optimizer="adamw8bit", dtype=torch.bfloat16, offload_optimizer=True)
    assert report.optimizer_states == 0
    assert report.host["optimizer states"] == _state_bytes(opt)
    masters = opt.master_params()
    assert report.host["fp32 master weights"] == sum(m.numel() * m.element_size() for m in masters)


def _saved_bytes(model: nn.Module, windows: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    from lowmem.bench.model import language_model_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        language_model_loss(model, windows)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("preset", "dtype", "batch", "seq"),
    [("tiny", torch.float32, 2, 64), ("tiny", torch.bfloat16, 1, 96), ("micro", torch.float32, 3, 33)],
)
def test_activation_bytes_within_ten_percent_of_saved_tensor_count(preset, dtype, batch, seq) -> None:
    pytest.importorskip("transformers")  # the tiny LLaMA of the benchmark is a transformers model
    from lowmem.bench.model import PRESETS, build_model

    model = build_model(PRESETS[preset], seq, seed=0).to(dtype)
    windows = torch.randint(0, 256, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    counted = _saved_bytes(model, windows)
    estimated = estimate(model, batch_size=batch, seq_len=seq, dtype=dtype).activations
    assert abs(estimated - counted) <= 0.10 * counted, (estimated, counted)


def test_activation_modes_order_and_host_bytes() -> None:
    kw = {"optimizer": "adamw", "batch_size": 4, "seq_len": 1024}
    modes = ("none", "checkpoint", "offload", "offload_checkpoint")
    none, ckpt, off, both = (estimate("llama-1b", activation=mode, **kw) for mode in modes)
    assert none.activations > off.activations and none.activations > ckpt.activations > both.activations
    assert off.host["activations"] == none.activations  # offload: every saved tensor has a host copy
    assert off.host["activations"] > both.host["activations"] > 0 and "activations" not in ckpt.host
    longer = estimate("llama-1b", seq_len=2048, optimizer="adamw").activations
    assert longer > 1.9 * estimate("llama-1b", seq_len=1024, optimizer="adamw").activations


def test_galore_headline_llama_7b_fits_24_gb_and_adamw_does_not() -> None:
    """GaLore (Zhao et al. 2024): 8-bit GaLore + per-layer updates, bf16, 256 tokens, under 24 GB."""
    kw = {"batch_size": 1, "seq_len": 256, "dtype": torch.bfloat16}
    galore = estimate("llama-7b", optimizer="galore_adamw8bit", layerwise=True, **kw)
    adamw = estimate("llama-7b", optimizer="adamw", **kw)
    assert 6.7e9 < galore.params < 6.8e9
    assert galore.total < 24e9 < adamw.total
    assert adamw.total > 2 * galore.total
    text = str(galore)
    assert "layerwise" in text and "Assumptions" in text and "bfloat16" in text and "total per device" in text


def test_presets_match_transformers_llama_parameters() -> None:
    transformers = pytest.importorskip("transformers")
    for name in ("llama-60m", "llama-70b"):
        shape = LLAMA_PRESETS[name]
        config = transformers.LlamaConfig(
            vocab_size=shape.vocab_size,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=2,  # the layers are identical: two are enough to compare names and shapes
            num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.kv_heads,
            tie_word_embeddings=False,
        )
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(config)
        ours = llama_skeleton(LlamaShape(**{**shape.to_dict(), "num_layers": 2}))
        assert {n: tuple(p.shape) for n, p in hf.named_parameters()} == {
            n: tuple(p.shape) for n, p in ours.named_parameters()
        }
        assert all(p.device.type == "meta" for p in ours.parameters())


def test_fsdp_sharding_and_bad_arguments() -> None:
    one = estimate("llama-13b", optimizer="adamw")
    eight = estimate("llama-13b", optimizer="adamw", world_size=8)
    assert eight.optimizer_states == -(-one.optimizer_states // 8)
    assert one.weights / 8 < eight.weights < one.weights / 4  # a shard plus two gathered layers
    assert eight.activations == one.activations
    # Low-rank optimizers under lowmem's FSDP2 (optim/sharded.py): every weight projected on its
    # right side whatever proj_type, moments and a stored basis sharded 1/w, plus one weight's full
    # gradient gathered at a projector refresh.
    mlp_weight = 13824 * 5120 * 2  # LLaMA-13B's largest projected matrix, bf16
    for name in ("galore_adamw8bit", "galore_adamw", "fira_adamw", "apollo_adamw", "apollo_mini"):
        one_right = estimate("llama-13b", optimizer=name, proj_type="right")
        for proj_type in ("std", "reverse_std", "right"):
            sharded = estimate("llama-13b", optimizer=name, world_size=8, proj_type=proj_type)
            assert sharded.optimizer_states == -(-one_right.optimizer_states // 8), (name, proj_type)
            assert sharded.gradients == eight.gradients + mlp_weight
        with pytest.raises(ValueError, match="Invalid proj_type: 'left' with world_size=8"):
            estimate("llama-13b", optimizer=name, world_size=8, proj_type="left")
    # The side matters: std projects the 5120x13824 down projection on the left on one process.
    galore_std = estimate("llama-13b", optimizer="galore_adamw", proj_type="std").optimizer_states
    assert galore_std != estimate("llama-13b", optimizer="galore_adamw", proj_type="right").optimizer_states
    with pytest.raises(ValueError, match="unknown optimizer"):
        estimate("llama-7b", optimizer="lion")
    with pytest.raises(ValueError, match="unknown model preset"):
        estimate("llama-3b")
    with pytest.raises(ValueError, match="Invalid activation"):
        estimate("llama-7b", activation="swap")
    with pytest.raises(ValueError, match="Invalid batch_size"):
        estimate("llama-7b", batch_size=0)
    with pytest.raises(ValueError, match="Invalid proj_type"):
        estimate("llama-7b", optimizer="fira_adamw", proj_type="full")
    with pytest.raises(TypeError, match="cannot read a LLaMA shape"):
        estimate(object())
    plain = estimate(nn.Linear(4, 4), optimizer="adamw")
    assert plain.activations == 0 and any("NOT counted" in a for a in plain.assumptions)
