"""Up-front refusals of layer-wise mode on models distributed at load time (lowmem.hf), in one process.

transformers distributes a model only for sizes above 1, so these tests distribute the tiny LLaMA
by hand on a one-rank gloo group, with torch's ``fully_shard`` (FSDP2, which marks every module it
manages ``_is_fsdp_managed_module``) or ``parallelize_module`` (tensor parallelism, no such mark),
and set the mark transformers' ``maybe_distribute_model`` leaves on any model it distributed,
tensor parallel only included: ``_is_distributed_loading_by_transformers``. lowmem.hf reads them
through the model's property and transformers' own ``is_fsdp_managed_module``, as the Trainer
does. The 2-rank launch with a model transformers really sharded is tests/hf/test_hf_fsdp.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_llama import TARGETS, tiny_llama, training_args

import lowmem.hf


@pytest.fixture
def mesh_1rank(tmp_path: Path) -> Iterator[None]:
    """A one-rank gloo group in this process, destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _loaded(mesh_shape: tuple[int, ...] = (1,)) -> nn.Module:
    """The tiny LLaMA sharded like transformers' ``_fsdp_plan`` (each decoder layer, then the root),
    marked as distributed at load time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("dp_replicate", "fsdp")[-len(mesh_shape) :]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model._is_distributed_loading_by_transformers = True
    return model


def _tensor_parallel() -> nn.Module:
    """The tiny LLaMA with column/row-parallel attention and MLP (DTensor weights, no FSDP), marked as
    distributed at load time: what ``DistributedConfig(tp_size=...)`` alone gives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = tiny_llama()
    plan = {}
    for i in range(len(model.model.layers)):
        prefix = f"model.layers.{i}"
        plan.update({f"{prefix}.self_attn.{p}_proj": ColwiseParallel() for p in "qkv"})
        plan[f"{prefix}.self_attn.o_proj"] = RowwiseParallel()
        plan.update({f"{prefix}.mlp.{p}_proj": ColwiseParallel() for p in ("gate", "up")})
        plan[f"{prefix}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, init_device_mesh("cpu", (1,), mesh_dim_names=("tp",)), plan)
    model._is_distributed_loading_by_transformers = True
    return model


def _layerwise(model: nn.Module, tmp_path: Path, name: str = "galore_adamw_layerwise") -> dict:
    args = training_args(tmp_path, max_grad_norm=0.0, gradient_accumulation_steps=2)
    return lowmem.hf.optimizer_cls_and_kwargs(name, args, model, target_modules=TARGETS, rank=4)[1]


def test_distributed_at_load_without_fsdp_is_not_treated_as_fsdp(mesh_1rank: None, tmp_path: Path) -> None:
    """Tensor parallel only (distributed at load time, not FSDP-managed): the Trainer defers no
    reduction for it, so layer-wise mode is refused by name instead of counting 1 backward per update.
    The same model FSDP2-sharded is accepted, with accumulation_steps=1 (the Trainer defers)."""
    model = _tensor_parallel()
    assert model.is_distributed_loading_by_transformers and lowmem.hf._sharded(model)
    assert not lowmem.hf._sharded_at_load(model)
    # The Trainer does not wrap it in DDP either (it skips DDP for any model distributed at load).
    assert not lowmem.hf._data_parallel(training_args(tmp_path), model)
    with pytest.raises(ValueError, match=r"tensor parallel only") as error:
        _layerwise(model, tmp_path)
    assert "DistributedConfig(fsdp_size=world_size)" in str(error.value)
    sharded = _loaded()
    assert lowmem.hf._sharded_at_load(sharded)
    assert _layerwise(sharded, tmp_path)["accumulation_steps"] == 1


def test_plain_trainable_params_on_a_sharded_model_are_refused(mesh_1rank: None, tmp_path: Path) -> None:
    """A PEFT-style adapter attached after loading stays a plain tensor next to the DTensors: refused up
    front in layer-wise mode (its hook would update from this rank's gradient), naming it; frozen, or
    without layerwise, it is accepted."""
    model = _loaded()
    model.model.layers[0].self_attn.q_proj.lora_A = nn.Linear(32, 2, bias=False)
    with pytest.raises(ValueError, match=r"FSDP2-sharded \(DTensor\) parameters only") as error:
        _layerwise(model, tmp_path)
    message = str(error.value)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in message and "PEFT" in message
    assert "Drop layerwise" in message
    _layerwise(model, tmp_path, "galore_adamw")  # step() mode: the Trainer averages before step()
    model.model.layers[0].self_attn.q_proj.lora_A.weight.requires_grad_(False)
    assert _layerwise(model, tmp_path)["layerwise"]


def test_hsdp_mesh_is_refused_up_front(mesh_1rank: None, tmp_path: Path) -> None:
    """Parameters on a 2-D (replicate, shard) mesh, HSDP's layout: refused when the optimizer is built,
    not at the first hook."""
    model = _loaded(mesh_shape=(1, 1))
    placements = tuple(next(model.parameters()).placements)
    assert len(placements) == 2, placements
    with pytest.raises(ValueError, match=r"1-D mesh \(Shard\(0\)\) only") as error:
        _layerwise(model, tmp_path)
    assert "2-D mesh" in str(error.value) and "dp_replicate_size" in str(error.value)
    assert _layerwise(_loaded(), tmp_path)["layerwise"]  # the same model on a 1-D mesh: accepted
