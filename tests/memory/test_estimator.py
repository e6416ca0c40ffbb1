"""The memory estimator against the real thing: states and weights exactly, activations within 10%."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

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
    GaLoreAdafactor,
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


def _real_optimizer(name: str, model: nn.Module, rank: int, proj_type: str, beta1: float | None = None):
    targets = ["self_attn", "mlp"]
    if name == "adafactor":
        transformers = pytest.importorskip("transformers")
        return transformers.optimization.Adafactor(model.parameters(), beta1=beta1)
    if name == "galore_adafactor":
        return GaLoreAdafactor(lowrank_param_groups(model, targets, rank, proj_type=proj_type), beta1=beta1)
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


def _step_twice(
    model: nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype, mesh: Any = None
) -> None:
    """Two steps on random gradients: every state (a refreshed basis included) is allocated.

    ``mesh``: the model is ``fully_shard``-ed on it; each rank gets its rows of the same gradient,
    as FSDP2's reduce-scatter hands them over (a ``Shard(0)`` DTensor).
    """
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in model.parameters():
            grad = torch.randn(p.shape, generator=gen).to(dtype)
            if mesh is not None:
                from torch.distributed.tensor import Shard, distribute_tensor

                grad = distribute_tensor(grad, mesh, [Shard(0)])
            p.grad = grad
        optimizer.step()


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
    _step_twice(model, opt, dtype)
    rank = None if name == "apollo_mini" else RANK  # APOLLO-Mini's own rank 1
    report = estimate(model, optimizer=name, rank=rank, proj_type=proj_type, dtype=dtype)
    real = _state_bytes(opt)
    assert real > 0 and report.optimizer_states == real
    assert report.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.gradients == report.weights


#: Adafactor: GaLore's (q/o, gate/up projected on the right, k/v and down on the left under std; the
#: r×r core under full) and transformers' (every tensor factored or full, no projection).
ADAFACTOR_CASES = [
    ("galore_adafactor", "std"),
    ("galore_adafactor", "reverse_std"),
    ("galore_adafactor", "full"),
    ("adafactor", "std"),
]


@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "proj_type"), ADAFACTOR_CASES)
def test_adafactor_state_bytes_equal_what_the_optimizer_allocates(
    name: str, proj_type: str, dtype: torch.dtype, beta1: float | None
) -> None:
    model = _tiny_model(dtype)
    opt = _real_optimizer(name, model, RANK, proj_type, beta1=beta1)
    _step_twice(model, opt, dtype)
    report = estimate(model, optimizer=name, rank=RANK, proj_type=proj_type, dtype=dtype, beta1=beta1)
    real = _state_bytes(opt)
    assert real > 0 and report.optimizer_states == real
    assert report.settings["beta1"] == beta1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["galore_adafactor", "adafactor"])
def test_adafactor_plain_rules_for_conv_scalar_and_rank_too_large(name: str, dtype: torch.dtype) -> None:
    """Factored over the last two dims of a conv weight (for each output channel), a full second
    moment for a 0-d parameter, statistics in fp64 for fp64 weights, and the plain state for a
    linear weight in a rank group whose rank is not below min(m, n)."""
    model = nn.Module()
    model.proj = nn.Linear(24, 40, dtype=dtype)  # projected at rank 5 (left: 24 < 40)
    model.small = nn.Linear(7, 3, bias=False, dtype=dtype)  # rank 5 >= 3: plain
    model.conv = nn.Conv1d(6, 10, 3, dtype=dtype)  # (10, 6, 3): rows 10·6, columns 10·3
    model.temperature = nn.Parameter(torch.ones((), dtype=dtype))
    rank, targets = 5, ["proj", "small"]
    if name == "adafactor":
        opt = _real_optimizer(name, model, rank, "std", beta1=0.9)
        _step_twice(model, opt, dtype)
    else:
        opt = GaLoreAdafactor(lowrank_param_groups(model, targets, rank), beta1=0.9)
        with pytest.warns(UserWarning, match="rank >= min"):
            _step_twice(model, opt, dtype)
    kw = {"rank": rank, "target_modules": targets, "beta1": 0.9}
    assert estimate(model, optimizer=name, **kw).optimizer_states == _state_bytes(opt)
    assert estimate(model, optimizer=name, **{**kw, "beta1": None}).optimizer_states < _state_bytes(opt)


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


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_fsdp_galore_adafactor_rows_sharded_columns_whole(beta1: float | None) -> None:
    """Sharded GaLoreAdafactor (optim/sharded.py): every projected m×n weight on the right; per rank
    1/w of the row statistics (m), of the first moment (m×r) and of the basis' columns (r×n); the
    column statistics (r of R, n of a plain matrix) and the counters are whole on every rank."""
    preset, w, r = "llama-13b", 8, 1024
    one = estimate(preset, optimizer="galore_adafactor", rank=r, proj_type="right", beta1=beta1)
    sharded = estimate(preset, optimizer="galore_adafactor", rank=r, world_size=w, beta1=beta1)
    shape = LLAMA_PRESETS[preset]
    layers, h = shape.num_layers, shape.hidden_size
    # Whole on every rank, in fp32: per projected weight (7 per layer) r column statistics, step
    # (4) and last_refresh (8); embedding and LM head (vocab x h): h column statistics and step;
    # the norms (2 per layer + the final one): step.
    replicated = layers * 7 * (4 * r + 4 + 8) + 2 * (4 * h + 4) + (2 * layers + 1) * 4
    assert sharded.optimizer_states == math.ceil((one.optimizer_states - replicated) / w) + replicated
    assert one.optimizer_states - replicated > 100 * replicated  # the rows dominate: the split matters
    assert sharded.gradients == estimate(preset, optimizer="adamw", world_size=w).gradients + 13824 * h * 2
    assert any("whole on every rank" in a for a in sharded.assumptions)
    with pytest.raises(ValueError, match="Invalid proj_type: 'full' with world_size=8"):
        estimate(preset, optimizer="galore_adafactor", world_size=w, proj_type="full")


def test_fsdp_galore_adafactor_state_equals_what_two_ranks_allocate(tmp_path: Path) -> None:
    """The world_size=2 estimate against GaLoreAdafactor on the fully_shard-ed tiny LLaMA, 2 gloo
    ranks on CPU (every dimension of SHAPE is even, so both ranks hold exactly half the rows)."""
    from gloo_launch import launch

    results = launch(Path(__file__), tmp_path, timeout=120)
    for dtype, beta1 in FSDP_CASES:
        expected = estimate(
            llama_skeleton(SHAPE, dtype=dtype),
            optimizer="galore_adafactor",
            rank=RANK,
            world_size=2,
            beta1=beta1,
        ).optimizer_states
        for result in results:
            assert result[str(dtype), str(beta1)] == expected, (dtype, beta1)


def test_adafactor_refusals() -> None:
    with pytest.raises(ValueError, match=r"Invalid beta1: 0\.9; beta1 is Adafactor's"):
        estimate("llama-60m", optimizer="galore_adamw", beta1=0.9)
    with pytest.raises(ValueError, match=r"Invalid beta1: 1\.0; pass None"):
        estimate("llama-60m", optimizer="galore_adafactor", beta1=1.0)
    with pytest.raises(ValueError, match="Invalid world_size: 2 with adafactor"):
        estimate("llama-60m", optimizer="adafactor", world_size=2)


#: (dtype, beta1) of the two-rank run.
FSDP_CASES = [(torch.float32, None), (torch.bfloat16, 0.9)]


def _fsdp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank of the test above (``python test_estimator.py RANK WORLD_SIZE INIT_FILE OUT_DIR``)."""
    from gloo_launch import gloo_group
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with gloo_group(rank, world_size, init_file):
        mesh = init_device_mesh("cpu", (world_size,))
        out = {}
        for dtype, beta1 in FSDP_CASES:
            model = _tiny_model(dtype)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = _real_optimizer("galore_adafactor", model, RANK, "std", beta1=beta1)
            _step_twice(model, opt, dtype, mesh)
            out[str(dtype), str(beta1)] = _state_bytes(opt)  # the rank's local tensors
        torch.save(out, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    _fsdp_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
