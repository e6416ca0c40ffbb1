"""One rank of test_ddp.py, and the single-process runs it is compared with.

``python ddp_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR`` joins a gloo group through a file
store (no port to pick), trains every case of :data:`CASES` under ``DistributedDataParallel``
on its half of each global batch, and saves the final parameters to ``OUT_DIR/rank{RANK}.pt``.
All cases run in one launch because starting two Python processes with torch costs more than
all the training together.

A case is a tiny model (two layers; lowmem layers where the case is about a layer) and an
optimizer (every lowmem optimizer; fp32 and 8-bit states; layer-wise stepping through
:func:`lowmem.optim.register_layerwise_ddp_hook`), trained for :data:`STEPS` updates with
``update_proj_gap=2``, so each low-rank run refreshes its projector at updates 1 and 3.

The test imports :func:`train` for two single-process references:

- ``"global"``: one process on the whole global batch (the loss's mean over 8 samples);
- ``"shards"``: one process that forms each gradient the way DDP does, (g₀/2) + (g₁/2) from
  the two halves' backward passes, so the references and the DDP run share every rounding.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from gloo_launch import gloo_group
from torch import nn

from lowmem.memory import offload_activations
from lowmem.nn.low_precision import LowPrecisionLinear
from lowmem.nn.low_rank import LowRankLinear
from lowmem.nn.sparse_low_rank import SparseLowRankLinear
from lowmem.optim import (
    APOLLO_MINI,
    AdamW8bit,
    ApolloAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    register_layerwise_ddp_hook,
)

GLOBAL_BATCH = 8
IN, HIDDEN, OUT = 8, 16, 6
STEPS = 4
GAP = {"update_proj_gap": 2}


class TwoLayer(nn.Module):
    """``layer2(tanh(layer1(x)))``; the layers are ``nn.Linear`` or a lowmem replacement."""

    def __init__(self, make_layer: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.layer1 = make_layer(IN, HIDDEN)
        self.layer2 = make_layer(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(torch.tanh(self.layer1(x)))


def _linear(dtype: torch.dtype) -> Callable[[int, int], nn.Module]:
    return lambda i, o: nn.Linear(i, o, dtype=dtype)


def _split(model: nn.Module, **lowrank: Any) -> list[dict[str, Any]]:
    """2-D weights in a group with ``lowrank`` keys, the rest plain (no group key without rank)."""
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, **lowrank}, {"params": others}]


def _all(model: nn.Module, **_: Any) -> list[dict[str, Any]]:
    return [{"params": list(model.parameters())}]


# name -> (layer factory, param dtype, optimizer class, groups(model), optimizer kwargs, flags)
Case = tuple[Callable[[int, int], nn.Module], torch.dtype, type, Callable[..., Any], dict[str, Any], set]
F64, F32 = torch.float64, torch.float32
ADAM = {"lr": 1e-2, "weight_decay": 0.1}
CASES: dict[str, Case] = {
    "galore": (_linear(F64), F64, GaLoreAdamW, lambda m: _split(m, rank=2, **GAP), ADAM, set()),
    "galore_svd_keep": (
        _linear(F64),
        F64,
        GaLoreAdamW,
        lambda m: _split(m, rank=2, projector="svd", on_refresh="keep", **GAP),
        ADAM,
        set(),
    ),
    "fira": (_linear(F64), F64, FiraAdamW, lambda m: _split(m, rank=2, **GAP), ADAM, set()),
    "apollo": (_linear(F64), F64, ApolloAdamW, lambda m: _split(m, rank=2, **GAP), ADAM, set()),
    "apollo_mini": (_linear(F64), F64, ApolloAdamW, lambda m: _split(m, **APOLLO_MINI, **GAP), ADAM, set()),
    "adafactor": (
        _linear(F64),
        F64,
        GaLoreAdafactor,
        lambda m: _split(m, rank=2, **GAP),
        {"lr": 1e-2, "relative_step": False, "beta1": 0.9},
        set(),
    ),
    # The 8-bit kernels take fp32/bf16/fp16 parameters, so the 8-bit cases run in fp32.
    "adamw8bit": (_linear(F32), F32, AdamW8bit, _all, {**ADAM, "min_8bit_size": 0}, set()),
    "galore8bit": (
        _linear(F32),
        F32,
        GaLoreAdamW8bit,
        lambda m: _split(m, rank=2, **GAP),
        {**ADAM, "min_8bit_size": 0},
        set(),
    ),
    "layerwise": (_linear(F64), F64, GaLoreAdamW, lambda m: _split(m, rank=2, **GAP), ADAM, {"layerwise"}),
    "layerwise_apollo": (
        _linear(F64),
        F64,
        ApolloAdamW,
        lambda m: _split(m, rank=2, **GAP),
        ADAM,
        {"layerwise"},
    ),
    "layerwise8bit": (
        _linear(F32),
        F32,
        GaLoreAdamW8bit,
        lambda m: _split(m, rank=2, **GAP),
        {**ADAM, "min_8bit_size": 0},
        {"layerwise"},
    ),
    "sparse_low_rank": (
        lambda i, o: SparseLowRankLinear(i, o, rank=2, density=0.25, seed=i * o, dtype=F64),
        F64,
        GaLoreAdamW,
        _all,
        ADAM,
        set(),
    ),
    "low_rank": (lambda i, o: LowRankLinear(i, o, rank=2, dtype=F64), F64, GaLoreAdamW, _all, ADAM, set()),
    "int8_linear": (
        lambda i, o: LowPrecisionLinear(i, o, precision="int8", dtype=F32),
        F32,
        GaLoreAdamW,
        lambda m: _split(m, rank=2, **GAP),
        ADAM,
        set(),
    ),
    "offload": (_linear(F64), F64, GaLoreAdamW, lambda m: _split(m, rank=2, **GAP), ADAM, {"offload"}),
}


def build(name: str) -> tuple[nn.Module, Any]:
    """The case's model (same weights in every process) and its optimizer."""
    make_layer, _, optimizer_cls, groups, kwargs, flags = CASES[name]
    torch.manual_seed(0)
    model = TwoLayer(make_layer)
    return model, (optimizer_cls, groups, kwargs, flags)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=gen, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, OUT, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, offload: Any) -> torch.Tensor:
    if offload is None:
        return ((model(x) - y) ** 2).mean()
    with offload:  # saved activations go through the offload hooks (host copies, back in backward)
        out = model(x)
    return ((out - y) ** 2).mean()


def _half(shard: int, world_size: int = 2) -> slice:
    return slice(shard * GLOBAL_BATCH // world_size, (shard + 1) * GLOBAL_BATCH // world_size)


def set_mean_gradient(
    model: nn.Module, opt: Any, loss_of: Callable[[int], torch.Tensor], world: int = 2
) -> None:
    """Set every ``.grad`` to (g₀/w) + (g₁/w) + ..., g_k from ``loss_of(k).backward()``: the mean
    DDP's all-reduce and FSDP2's reduce-scatter form, in the same floating-point order."""
    parts: list[list[torch.Tensor]] = []
    for shard in range(world):
        opt.zero_grad()
        loss_of(shard).backward()
        parts.append([p.grad / world for p in model.parameters()])
    for param, *terms in zip(model.parameters(), *parts, strict=True):
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        param.grad = total


def train(name: str, mode: str, rank: int = 0, world_size: int = 2) -> dict[str, torch.Tensor]:
    """Train case ``name`` for :data:`STEPS` updates; returns the final parameters by name.

    ``mode``: ``"ddp"`` (this rank's half of each batch, model wrapped in DDP; needs an
    initialized process group), ``"global"`` or ``"shards"`` (single process, module docstring).
    """
    model, (optimizer_cls, groups, kwargs, flags) = build(name)
    dtype = CASES[name][1]
    layerwise = "layerwise" in flags
    offload = (
        offload_activations(keep=model, emulate_device=True, min_bytes=0) if "offload" in flags else None
    )
    net: nn.Module = model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Tiny buckets (one per parameter) so the layer-wise cases update in several comm-hook calls.
        net = DistributedDataParallel(model, bucket_cap_mb=1e-4 if layerwise else 25)
    # Layer-wise stepping is a DDP feature here; the single-process references use step().
    opt = optimizer_cls(
        groups(model), **kwargs, **({"layerwise": True} if layerwise and mode == "ddp" else {})
    )
    if layerwise and mode == "ddp":
        register_layerwise_ddp_hook(net, opt)
    for step in range(STEPS):
        x, y = batch(step, dtype)
        if mode == "global":
            _loss(net, x, y, offload).backward()
        elif mode == "ddp":
            _loss(net, x[_half(rank, world_size)], y[_half(rank, world_size)], offload).backward()
        else:  # "shards": DDP's arithmetic in one process
            set_mean_gradient(model, opt, lambda k, x=x, y=y: _loss(net, x[_half(k)], y[_half(k)], offload))
        opt.step()
        opt.zero_grad()
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world_size, init_file):
        results = {name: train(name, "ddp", rank, world_size) for name in CASES}
        torch.save(results, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
