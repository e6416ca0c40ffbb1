"""One rank of test_layerwise.py's data-parallel test, and the training run both sides share.

``python layerwise_ddp_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR`` joins a gloo group through
a file store (no port to pick, nothing to collide with), trains the same tiny model on its shard
of every global batch in two ways, and saves the final parameters to ``OUT_DIR/rank{RANK}.pt``:

- layer-wise with ``process_group=WORLD`` (the optimizer all-reduces; no DDP);
- the model wrapped in ``DistributedDataParallel`` (one bucket per parameter, so several
  buckets' updates run in comm-hook callbacks), layer-wise through
  :func:`lowmem.optim.register_layerwise_ddp_hook`, accumulating with ``no_sync``.

The test imports :func:`train` to run the single-process reference on the whole global batch.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch

from lowmem.optim import ApolloAdamW, GaLoreAdamW, register_layerwise_ddp_hook

GLOBAL_BATCH = 8
STEPS = 4  # gap 2: refreshes at updates 1 and 3, low-rank accumulation at updates 2 and 4
CONFIGS = {"k1": 1, "k2": 2}
# name -> (micro-batches per update, optimizer class), run under DDP.
DDP_CONFIGS = {"ddp_k1": (1, GaLoreAdamW), "ddp_k2": (2, GaLoreAdamW), "ddp_apollo": (1, ApolloAdamW)}


def init_params() -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"w1": (16, 8), "b1": (16,), "w2": (6, 16), "b2": (6,)}
    return {
        name: torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5)
        for name, shape in shapes.items()
    }


def global_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(GLOBAL_BATCH, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64)
    return x, y


class TinyNet(torch.nn.Module):
    """The two-layer net of :func:`train` as a module, for DDP."""

    def __init__(self) -> None:
        super().__init__()
        for name, param in init_params().items():
            self.register_parameter(name, param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def make_optimizer(p: dict[str, torch.nn.Parameter], optimizer_cls: type = GaLoreAdamW, **kwargs: Any) -> Any:
    return optimizer_cls(
        [{"params": [p["w1"], p["w2"]], "rank": 2, "update_proj_gap": 2}, {"params": [p["b1"], p["b2"]]}],
        lr=1e-2,
        weight_decay=0.1,
        **kwargs,
    )


def train(
    micro_batches: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    optimizer_cls: type = GaLoreAdamW,
    **optimizer_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """STEPS updates of ``micro_batches`` backward passes each, on this rank's shard of every
    global batch, calling step() after the last one; returns the final parameters.

    The loss is the mean over the local shard, so the mean of the ranks' gradients is the
    gradient of the global batch's mean loss: what one process on the whole batch computes.
    """
    p = init_params()
    opt = make_optimizer(p, optimizer_cls, **optimizer_kwargs)
    shard = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    for step in range(STEPS):
        for micro in range(micro_batches):
            x, y = global_batch(step, micro)
            hidden = torch.tanh(x[shard] @ p["w1"].T + p["b1"])
            loss = ((hidden @ p["w2"].T + p["b2"] - y[shard]) ** 2).mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
    return {name: param.detach().clone() for name, param in p.items()}


def train_ddp(
    micro_batches: int, optimizer_cls: type, *, rank: int, world_size: int
) -> dict[str, torch.Tensor]:
    """:func:`train` with the net wrapped in DDP and a layer-wise optimizer updating in its comm hook."""
    from torch.nn.parallel import DistributedDataParallel

    net = TinyNet()
    ddp = DistributedDataParallel(net, bucket_cap_mb=1e-4)  # ~100-byte buckets: one per parameter
    opt = make_optimizer(dict(net.named_parameters()), optimizer_cls, layerwise=True)
    register_layerwise_ddp_hook(ddp, opt)
    shard = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    for step in range(STEPS):
        for micro in range(micro_batches):
            x, y = global_batch(step, micro)
            sync = micro == micro_batches - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                ((ddp(x[shard]) - y[shard]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {name: param.detach().clone() for name, param in net.named_parameters()}


def refuses_local_update() -> bool:
    """A layer-wise optimizer with neither process_group nor the DDP hook, in a 2-rank group,
    must raise at its first hook instead of updating from the local gradient."""
    p = init_params()
    opt = make_optimizer(p, layerwise=True)
    x, y = global_batch(0, 0)
    loss = ((torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"] - y) ** 2).mean()
    try:
        loss.backward()
    except RuntimeError as error:
        return "local gradient" in str(error) and opt is not None
    return False


def main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from gloo_launch import gloo_group

    with gloo_group(rank, world_size, init_file, timeout_s=30):
        results = {
            name: train(
                k,
                rank=rank,
                world_size=world_size,
                layerwise=True,
                accumulation_steps=k,
                process_group=dist.group.WORLD,
            )
            for name, k in CONFIGS.items()
        }
        for name, (k, optimizer_cls) in DDP_CONFIGS.items():
            results[name] = train_ddp(k, optimizer_cls, rank=rank, world_size=world_size)
        results["refused_local_update"] = torch.tensor(refuses_local_update())
        torch.save(results, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
