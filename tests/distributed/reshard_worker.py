"""One rank of test_fsdp_reshard.py: DCP checkpoints of FSDP2 runs resumed at another world size.

``python reshard_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR`` (WORLD_SIZE 2, launched by
``tests/gloo_launch.py``) runs three phases, each in its own gloo group:

A. rank 0 alone (a 1-rank group, ``fully_shard`` on a 1-rank mesh): for every case of
   :data:`CASES`, the uninterrupted reference of :data:`STEPS` steps, saving a DCP checkpoint
   after :data:`SPLIT` steps on the way;
B. both ranks: the same :data:`SPLIT` steps on 2 ranks, saved; then phase A's 1-rank checkpoint
   loaded into a fresh 2-rank model and optimizer and trained to :data:`STEPS` (1 → 2);
C. rank 0 alone again: phase B's 2-rank checkpoint loaded into a fresh 1-rank model and
   optimizer and trained to :data:`STEPS` (2 → 1).

Every run sees the same global batches (each rank its share), so the resumed runs must end where
the reference ends. Checkpoints go through ``torch.distributed.checkpoint`` with
``get_state_dict`` / ``set_state_dict``, which reshard DTensors on load.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gloo_launch
from gloo_launch import gloo_group

from lowmem.bench.fsdp_example import load_tokens
from lowmem.bench.model import PRESETS, build_model
from lowmem.optim import ApolloAdamW, FiraAdamW, GaLoreAdamW, GaLoreAdamW8bit, lowrank_param_groups

STEPS, SPLIT = 6, 3  # refreshes at steps 0, 2, 4: the resumed runs use a loaded basis, then refresh
GLOBAL_BATCH, SEQ_LEN = 4, 16
GROUPS = {"rank": 8, "update_proj_gap": 2}
#: case -> (optimizer class, parameter dtype, extra keywords). fp64: resharding must be exact.
CASES: dict[str, tuple[type, torch.dtype, dict[str, Any]]] = {
    "galore": (GaLoreAdamW, torch.float64, {}),
    "fira": (FiraAdamW, torch.float64, {}),
    "apollo": (ApolloAdamW, torch.float64, {}),
}
#: 8-bit states, quantized per local shard: a checkpoint of one world size cannot hold the block
#: layout of another (see the test).
CASE_8BIT = (GaLoreAdamW8bit, torch.float32, {"min_8bit_size": 0})
#: A vector whose 8-bit moment has as many blocks on 1 rank (400 → 2) as on 2 (200 → 1 each), with
#: other boundaries (256 vs 200): the block-scale tensors of the two layouts have the same size.
VECTOR = 400


class Scale(nn.Module):
    """y = x ⊙ w, one 1-D parameter: the smallest model whose shards misalign 8-bit blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, VECTOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _build(case: tuple[type, torch.dtype, dict[str, Any]], mesh: Any, seed: int) -> tuple[nn.Module, Any]:
    from torch.distributed.fsdp import fully_shard

    optimizer_cls, dtype, kwargs = case
    model = build_model(PRESETS["micro"], SEQ_LEN, seed).to(dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    groups = lowrank_param_groups(model, ["attn", "mlp"], **GROUPS)
    return model, optimizer_cls(groups, lr=3e-3, weight_decay=0.1, **kwargs)


def _train(model: nn.Module, optimizer: Any, steps: range, tokens: torch.Tensor) -> list[float]:
    """Steps on this rank's share of each global batch; returns the global mean loss of each."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = GLOBAL_BATCH // world
    losses = []
    for step in steps:
        starts = torch.randint(
            0, tokens.numel() - SEQ_LEN - 1, (GLOBAL_BATCH,), generator=torch.Generator().manual_seed(step)
        )
        windows = tokens[starts[rank * share : (rank + 1) * share, None] + torch.arange(SEQ_LEN + 1)]
        logits = model(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().double()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses


def _save(model: nn.Module, optimizer: Any, path: Path) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def _load(model: nn.Module, optimizer: Any, path: Path) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _vector_run(path: Path, train: bool, full_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """:class:`Scale` with AdamW8bit: :data:`SPLIT` steps then saved to ``path`` (``train``), or loaded
    from it. Returns the dequantized first moment, whole (every rank's rows); after training also
    ``full_state``, the optimizer's ``get_optimizer_state_dict(full_state_dict=True)``. Given
    ``full_state``, loads that with ``set_optimizer_state_dict`` instead of ``path`` (no DCP)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    from lowmem.kernels.blockwise_quant import dequantize_blockwise
    from lowmem.optim import AdamW8bit

    model = Scale()
    fully_shard(model, mesh=_mesh())
    optimizer = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
    rank, world = dist.get_rank(), dist.get_world_size()
    if train:
        for step in range(SPLIT):
            x, y = torch.randn(2, GLOBAL_BATCH, VECTOR, generator=torch.Generator().manual_seed(step))
            share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
            ((model(x[share]) - y[share]) ** 2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        _save(model, optimizer, path)
    elif full_state is not None:
        set_optimizer_state_dict(model, optimizer, full_state, options=StateDictOptions(full_state_dict=True))
    else:
        _load(model, optimizer, path)
    state = optimizer.state[model.weight]
    local = dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], signed=True)
    mesh = model.weight.device_mesh
    out = {"exp_avg": DTensor.from_local(local, mesh, [Shard(0)], run_check=False).full_tensor()}
    if train:
        out["full_state"] = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True)
        )
    return out


def _full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.full_tensor().detach().clone() for name, param in model.named_parameters()}


def _mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def reference(case: tuple, out: Path, tokens: torch.Tensor) -> dict[str, Any]:
    """Uninterrupted :data:`STEPS` steps, checkpointed to ``out`` after :data:`SPLIT`."""
    model, optimizer = _build(case, _mesh(), seed=0)
    losses = _train(model, optimizer, range(SPLIT), tokens)
    _save(model, optimizer, out)
    losses += _train(model, optimizer, range(SPLIT, STEPS), tokens)
    return {"params": _full_params(model), "losses": losses}


def resume(case: tuple, path: Path, tokens: torch.Tensor) -> dict[str, Any]:
    """A fresh model (other weights: loading must matter) and optimizer from ``path``, to :data:`STEPS`."""
    model, optimizer = _build(case, _mesh(), seed=1)
    _load(model, optimizer, path)
    losses = _train(model, optimizer, range(SPLIT, STEPS), tokens)
    return {"params": _full_params(model), "losses": losses}


def attempt(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s result, or the error it raised, as ``{"error": "Type: message"}``."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        return run()
    except (Exception, CheckpointException) as error:  # the test inspects it
        return {"error": f"{type(error).__name__}: {error}"}


def main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    out, tokens = Path(out_dir), load_tokens()
    all_cases = {**CASES, "galore8bit": CASE_8BIT}
    results: dict[str, Any] = {}
    if rank == 0:  # phase A: one rank
        with gloo_group(0, 1, f"{init_file}.a"):
            results["reference"] = {n: reference(c, out / f"{n}_w1", tokens) for n, c in all_cases.items()}
    with gloo_group(rank, world_size, init_file):  # phase B: two ranks
        for name, case in all_cases.items():
            model, optimizer = _build(case, _mesh(), seed=0)
            _train(model, optimizer, range(SPLIT), tokens)
            _save(model, optimizer, out / f"{name}_w2")
        results["1to2"] = {
            n: attempt(lambda c=c, n=n: resume(c, out / f"{n}_w1", tokens)) for n, c in all_cases.items()
        }
        results["vector_saved"] = _vector_run(out / "vector_w2", train=True)
        if rank:
            del results["vector_saved"]["full_state"]
    if rank == 0:  # phase C: one rank
        with gloo_group(0, 1, f"{init_file}.c"):
            results["2to1"] = {
                n: attempt(lambda c=c, n=n: resume(c, out / f"{n}_w2", tokens)) for n, c in all_cases.items()
            }
            results["vector_loaded"] = attempt(lambda: _vector_run(out / "vector_w2", train=False))
            full_state = results["vector_saved"].pop("full_state")  # 2 ranks' state, without DCP
            results["vector_full_loaded"] = attempt(lambda: _vector_run(out, False, full_state))
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
