"""One rank of test_fsdp.py: lowmem optimizers on FSDP2 (``fully_shard``) parameters, 2 gloo ranks.

``python fsdp_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR`` runs, in one launch:

1. ``exact``: the two-layer model of :mod:`ddp_worker` with each layer and the root
   ``fully_shard``-ed, trained on each rank's half of every global batch for every case of
   :data:`EXACT_CASES`; saves the full parameters (``full_tensor``) for comparison with one
   process on DDP's arithmetic.
2. ``llama``: the micro LLaMA of :mod:`lowmem.bench.fsdp_example` with GaLoreAdamW, under FSDP2
   and under DDP with the same global batches: losses, held-out loss and optimizer-state bytes
   per rank.
3. ``resume``: the FSDP2 run checkpointed with ``torch.distributed.checkpoint`` midway, then
   resumed into a fresh model and optimizer; saves both final parameters and optimizer states.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import (
    ADAM,
    CASES,
    GAP,
    GLOBAL_BATCH,
    STEPS,
    Case,
    TwoLayer,
    _all,
    _linear,
    _loss,
    _split,
    batch,
    set_mean_gradient,
)
from gloo_launch import gloo_group

from lowmem.memory import offload_activations
from lowmem.optim import (
    APOLLO_MINI,
    AdamW8bit,
    ApolloAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
)

F64, F32 = torch.float64, torch.float32
RIGHT = {"rank": 2, "proj_type": "right", **GAP}
ADAFACTOR_LR = {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "weight_decay": 0.1}
# name -> the fields of ddp_worker.Case: (layer factory, param dtype, optimizer class, groups(model),
# optimizer kwargs, flags). proj_type="right": the side FSDP projects a row-sharded weight on, so one
# process computes the same update.
EXACT_CASES: dict[str, Case] = {
    "galore": (_linear(F64), F64, GaLoreAdamW, lambda m: _split(m, **RIGHT), ADAM, set()),
    "galore_reset_svd": (
        _linear(F64),
        F64,
        GaLoreAdamW,
        lambda m: _split(m, **RIGHT, on_refresh="reset", projector="svd"),
        ADAM,
        set(),
    ),
    "fira_plain": (_linear(F64), F64, FiraAdamW, _all, ADAM, set()),
    # Fira / APOLLO low-rank groups: norms over the whole matrix are all-reduced (optim/sharded.py).
    "fira": (_linear(F64), F64, FiraAdamW, lambda m: _split(m, **RIGHT), ADAM, set()),
    "apollo": (_linear(F64), F64, ApolloAdamW, lambda m: _split(m, **RIGHT), ADAM, set()),
    "apollo_svd": (
        _linear(F64),
        F64,
        ApolloAdamW,
        lambda m: _split(m, **RIGHT, proj="svd", on_refresh="project"),
        ADAM,
        set(),
    ),
    "apollo_mini": (
        _linear(F64),
        F64,
        ApolloAdamW,
        lambda m: _split(m, **{**APOLLO_MINI, "proj_type": "right"}, **GAP),
        ADAM,
        set(),
    ),
    # GaLoreAdafactor: column means, mean(r), RMS(U), RMS(W) are all-reduced (optim/sharded.py);
    # the plain group holds the sharded biases (element-wise moment, whole-tensor RMS).
    "adafactor_lr": (
        _linear(F64),
        F64,
        GaLoreAdafactor,
        lambda m: _split(m, **RIGHT),
        {**ADAFACTOR_LR, "beta1": None},
        set(),
    ),
    "adafactor_scaled_beta1": (
        _linear(F64),
        F64,
        GaLoreAdafactor,
        lambda m: _split(m, **RIGHT),
        {"beta1": 0.9, "weight_decay": 0.1},  # relative_step and scale_parameter: the defaults
        set(),
    ),
    "adafactor_reset_svd": (
        _linear(F64),
        F64,
        GaLoreAdafactor,
        lambda m: _split(m, **RIGHT, on_refresh="reset", projector="svd"),
        {**ADAFACTOR_LR, "beta1": 0.9, "clip_threshold": 0.5},
        set(),
    ),
    "adafactor_plain": (_linear(F64), F64, GaLoreAdafactor, _all, {"beta1": None}, set()),
    "galore8bit": (
        _linear(F32),
        F32,
        GaLoreAdamW8bit,
        lambda m: _split(m, **RIGHT),
        {**ADAM, "min_8bit_size": 0},
        set(),
    ),
    "adamw8bit": (_linear(F32), F32, AdamW8bit, _all, {**ADAM, "min_8bit_size": 0}, set()),
    "sparse_low_rank": CASES["sparse_low_rank"],
    "low_rank": CASES["low_rank"],
    "int8_linear": (CASES["int8_linear"][0], F32, GaLoreAdamW, _all, ADAM, set()),
    "offload": (_linear(F64), F64, GaLoreAdamW, lambda m: _split(m, **RIGHT), ADAM, {"offload"}),
}


def _model_and_optimizer(name: str, mesh: Any = None) -> tuple[nn.Module, Any, Any]:
    make_layer, _, optimizer_cls, groups, kwargs, flags = EXACT_CASES[name]
    torch.manual_seed(0)
    model = TwoLayer(make_layer)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.layer1, model.layer2):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # keep=model with DTensor parameters: their local shards' storages are the ones kept.
    offload = (
        offload_activations(keep=model, emulate_device=True, min_bytes=0) if "offload" in flags else None
    )
    return model, optimizer_cls(groups(model), **kwargs), offload


def _halves_loss(model: nn.Module, offload: Any, step: int, dtype: torch.dtype, shard: int, world: int):
    x, y = batch(step, dtype)
    half = slice(shard * GLOBAL_BATCH // world, (shard + 1) * GLOBAL_BATCH // world)
    return _loss(model, x[half], y[half], offload)


def train_exact(name: str, mesh: Any, rank: int, world_size: int) -> dict[str, Any]:
    """:data:`STEPS` FSDP2 updates of case ``name`` on this rank's half of each global batch.

    Returns the full parameters and, per parameter, this rank's (codes, block scales) sizes of
    8-bit states, to check that blocks are per shard.
    """
    model, opt, offload = _model_and_optimizer(name, mesh)
    dtype = EXACT_CASES[name][1]
    for step in range(STEPS):
        _halves_loss(model, offload, step, dtype, rank, world_size).backward()
        opt.step()
        opt.zero_grad()
    blocks = {
        key: (opt.state[param]["exp_avg"].numel(), opt.state[param]["exp_avg_absmax"].numel())
        for key, param in model.named_parameters()
        if "exp_avg_absmax" in opt.state[param]
    }
    return {"params": {key: param.full_tensor() for key, param in model.named_parameters()}, "blocks": blocks}


def train_exact_reference(name: str, world_size: int = 2) -> dict[str, torch.Tensor]:
    """One process, each gradient formed as (g₀/2) + (g₁/2) from the two halves (FSDP's mean)."""
    model, opt, offload = _model_and_optimizer(name)
    dtype = EXACT_CASES[name][1]
    for step in range(STEPS):
        set_mean_gradient(
            model, opt, lambda k, step=step: _halves_loss(model, offload, step, dtype, k, world_size)
        )
        opt.step()
        opt.zero_grad()
    return {key: param.detach().clone() for key, param in model.named_parameters()}


def refusals(mesh: Any) -> dict[str, str]:
    """The errors of unsupported sharded combinations (each must name what to do instead)."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    attempts = {
        # a 3-D (conv) weight in a plain Adafactor group: factored over its last two dims only
        "adafactor_conv": (GaLoreAdafactor, _all),
        "proj_left": (GaLoreAdamW, lambda m: _split(m, rank=2, proj_type="left")),
    }
    for name, (optimizer_cls, groups) in attempts.items():
        torch.manual_seed(0)
        conv = optimizer_cls is GaLoreAdafactor
        model = nn.Conv1d(4, 6, 3, dtype=F64) if conv else TwoLayer(_linear(F64))
        fully_shard(model, mesh=mesh)
        opt = optimizer_cls(groups(model), **(ADAFACTOR_LR if conv else ADAM))
        x, y = (torch.randn(2, 4, 5, dtype=F64), 0.0) if conv else batch(0, F64)
        ((model(x) - y) ** 2).mean().backward()
        try:
            opt.step()
        except (NotImplementedError, ValueError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
        else:
            out[name] = "no error"
    return out


def main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from lowmem.bench import fsdp_example

    with gloo_group(rank, world_size, init_file):
        mesh = init_device_mesh("cpu", (world_size,))
        results: dict[str, Any] = {"exact": {n: train_exact(n, mesh, rank, world_size) for n in EXACT_CASES}}
        results["refusals"] = refusals(mesh)
        config = fsdp_example.Config()
        results["llama_fsdp"] = fsdp_example.train(config, mesh, engine="fsdp")
        results["llama_ddp"] = fsdp_example.train(config, mesh, engine="ddp")
        results["resume"] = fsdp_example.checkpoint_and_resume(config, mesh, Path(out_dir) / "dcp")
        torch.save(results, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
