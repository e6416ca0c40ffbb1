"""Recipe: GaLoreAdamW on a FSDP2-sharded LLaMA, launched by torchrun (CPU/gloo or CUDA/nccl).

Run on a laptop (2 processes, gloo)::

    torchrun --nproc_per_node 2 -m lowmem.bench.fsdp_example --steps 50
    torchrun --nproc_per_node 2 -m lowmem.bench.fsdp_example --engine ddp     # the same under DDP
    torchrun --nproc_per_node 2 -m lowmem.bench.fsdp_example --checkpoint /tmp/ckpt   # DCP save + resume

The recipe, in the order a training script does it::

    dist.init_process_group("gloo")                       # "nccl" on GPUs; torchrun sets the env
    mesh = init_device_mesh("cpu", (world_size,))         # "cuda" on GPUs
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)                     # one all-gather per decoder layer
    fully_shard(model, mesh=mesh)                         # embeddings, final norm, LM head
    groups = lowrank_param_groups(model, ["attn", "mlp"], rank=16)   # AFTER fully_shard
    opt = GaLoreAdamW(groups, lr=3e-3)                    # every rank updates its own rows
    ...  loss.backward(); opt.step(); opt.zero_grad()
    # checkpoint: DCP writes each rank's shards (the optimizer's state as DTensors)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, ...)

The optimizer's semantics on sharded weights (right-side projection, the basis computed from
the gathered gradient at a refresh and stored sharded, 8-bit blocks per shard) are described in
:mod:`lowmem.optim.sharded`. Each rank prints its optimizer-state bytes; rank 0 prints losses.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lowmem.bench.model import PRESETS, build_model
from lowmem.optim import GaLoreAdamW, lowrank_param_groups

__all__ = ["Config", "checkpoint_and_resume", "load_tokens", "main", "state_bytes", "train"]


@dataclass(frozen=True)
class Config:
    """One run: model preset, data shape, GaLore settings (a refresh every ``update_proj_gap``)."""

    preset: str = "micro"
    seq_len: int = 32
    global_batch: int = 8
    steps: int = 50
    lr: float = 3e-3
    rank: int = 16
    update_proj_gap: int = 10
    seed: int = 0


def load_tokens() -> torch.Tensor:
    """Bytes of a few standard-library sources as int64 token ids (the benchmark's corpus, smaller)."""
    import argparse as a
    import dataclasses as d
    import inspect as i

    data = b"".join(Path(module.__file__).read_bytes() for module in (i, a, d))  # type: ignore[arg-type]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _windows(tokens: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length - 1, (count,), generator=gen)
    return torch.stack([tokens[s : s + length + 1] for s in starts.tolist()])


def _loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    windows = windows.to(next(model.parameters()).device)
    logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` on this rank (local shards under FSDP2)."""
    return sum(v.nbytes for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def build(config: Config, mesh: Any, engine: str) -> tuple[nn.Module, GaLoreAdamW]:
    """The model wrapped for ``engine`` (``"fsdp"``: ``fully_shard``; ``"ddp"``) and its optimizer."""
    model = build_model(PRESETS[config.preset], config.seq_len, config.seed).to(mesh.device_type)
    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        inner = model
    elif engine == "ddp":
        inner = model
        model = nn.parallel.DistributedDataParallel(model)
    else:
        raise ValueError(f"Invalid engine: {engine!r}; choose 'fsdp' or 'ddp'")
    groups = lowrank_param_groups(
        inner, ["attn", "mlp"], rank=config.rank, update_proj_gap=config.update_proj_gap
    )
    return model, GaLoreAdamW(groups, lr=config.lr)


def _run(
    model: nn.Module, opt: GaLoreAdamW, config: Config, tokens: torch.Tensor, steps: range
) -> list[float]:
    """Train ``steps``; returns the global-batch loss of each step (the mean over ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = config.global_batch // world
    losses = []
    for step in steps:
        windows = _windows(tokens, config.global_batch, config.seq_len, config.seed * 100_003 + step)
        loss = _loss(model, windows[rank * per_rank : (rank + 1) * per_rank])
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def train(config: Config, mesh: Any, engine: str = "fsdp") -> dict[str, Any]:
    """Train ``config.steps`` under ``engine``; losses, held-out loss, this rank's state bytes."""
    if config.global_batch % dist.get_world_size():
        raise ValueError(f"global_batch={config.global_batch} must be a multiple of the world size")
    tokens = load_tokens()
    model, opt = build(config, mesh, engine)
    losses = _run(model, opt, config, tokens, range(config.steps))
    with torch.no_grad():
        heldout = float(_loss(model, _windows(tokens, 16, config.seq_len, seed=12345)))
    return {"losses": losses, "heldout": heldout, "state_bytes": state_bytes(opt)}


def checkpoint_and_resume(
    config: Config, mesh: Any, directory: Path, split: int | None = None
) -> dict[str, Any]:
    """FSDP2 run checkpointed by DCP after ``split`` steps and resumed into a new model and optimizer.

    Returns this rank's local parameter shards and optimizer-state tensors after
    ``config.steps`` steps, uninterrupted and resumed, for a bit-for-bit comparison.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    split = config.steps // 2 + 1 if split is None else split
    tokens = load_tokens()

    def snapshot(model: nn.Module, opt: GaLoreAdamW) -> dict[str, torch.Tensor]:
        out = {f"param/{k}": v.to_local().clone() for k, v in model.named_parameters()}
        names = {id(p): k for k, p in model.named_parameters()}
        for param, state in opt.state.items():
            out |= {f"state/{names[id(param)]}/{k}": v.clone() for k, v in state.items()}
        return out

    model, opt = build(config, mesh, "fsdp")
    _run(model, opt, config, tokens, range(split))
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=str(directory),
    )
    _run(model, opt, config, tokens, range(split, config.steps))
    uninterrupted = snapshot(model, opt)

    model, opt = build(
        replace(config, seed=config.seed + 1), mesh, "fsdp"
    )  # other weights: loading must matter
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    _run(model, opt, config, tokens, range(split, config.steps))
    return {"uninterrupted": uninterrupted, "resumed": snapshot(model, opt)}


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=Config.preset)
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="also DCP save + resume through this dir"
    )
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("launch with torchrun, e.g. torchrun --nproc_per_node 2 -m lowmem.bench.fsdp_example")
    from torch.distributed.device_mesh import init_device_mesh

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        mesh = init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),))
        config = Config(steps=args.steps, preset=args.preset)
        result = train(config, mesh, args.engine)
        print(f"rank {dist.get_rank()}: optimizer state {result['state_bytes']} bytes", flush=True)
        if dist.get_rank() == 0:
            first, last = result["losses"][0], result["losses"][-1]
            print(f"{args.engine}: loss {first:.4f} -> {last:.4f}, held-out {result['heldout']:.4f}")
        if args.checkpoint is not None:
            out = checkpoint_and_resume(config, mesh, args.checkpoint)
            same = all(torch.equal(v, out["resumed"][k]) for k, v in out["uninterrupted"].items())
            print(f"rank {dist.get_rank()}: resumed run identical to uninterrupted: {same}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
