"""One rank of test_hf_fsdp.py: the HF Trainer training the tiny LLaMA under FSDP2 (gloo, CPU).

``python hf_fsdp_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR`` (launched by ``tests/gloo_launch.py``)
joins a gloo group, sets the variables ``torchrun`` would set, and trains through the path that
works on CPU: transformers' own FSDP2, ``from_pretrained(..., distributed_config=
DistributedConfig(fsdp_size=world_size))``, which ``fully_shard``-s every decoder layer and the
root at load time. The Trainer then neither wraps the model in DDP nor shards it again, and the
lowmem optimizer is built on the model's DTensor parameters. (``TrainingArguments(fsdp=...)``
goes through accelerate, which does not shard on CPU: :func:`accelerate_fsdp_error`.)

Each case of :data:`CASES` trains a fresh model; the full parameters, the logged losses, the
optimizer-state bytes of this rank and what the optimizer was built on go to
``OUT_DIR/rank{RANK}.pt``. The test runs the same cases in one process on the global batch
(:func:`run_case` with ``world_size=1``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

#: case -> (optimizer name, gradient_accumulation_steps, options). 4 updates, GaLore/APOLLO refresh
#: every 2. proj_type="right": the side every rank projects a row-sharded weight on
#: (lowmem.optim.sharded), so one process computes the same algorithm.
CASES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "galore": ("galore_adamw", 1, {"rank": 4, "proj_type": "right"}),
    "galore_ga2": ("galore_adamw", 2, {"rank": 4, "proj_type": "right"}),
    "apollo": ("apollo_adamw", 1, {"rank": 4, "proj_type": "right"}),
    # The embedding and head (256x32; 128x32 = 4096 elements per rank) get 8-bit states.
    "adamw8bit": ("adamw8bit", 1, {}),
    # Updates inside backward, from the reduce-scattered shards (FSDP2 runs the hooks).
    "galore_layerwise": ("galore_adamw_layerwise", 1, {"rank": 4, "proj_type": "right"}),
    "galore_layerwise_ga2": ("galore_adamw_layerwise", 2, {"rank": 4, "proj_type": "right"}),
    # A reduce-scatter per micro-batch (sync_each_batch): the optimizer accumulates the shards itself.
    "galore_layerwise_ga2_each": ("galore_adamw_layerwise", 2, {"rank": 4, "proj_type": "right"}),
}
#: layer-wise case -> the step() case it must reproduce (same model, batches and arguments).
LAYERWISE: dict[str, str] = {
    "galore_layerwise": "galore",
    "galore_layerwise_ga2": "galore_ga2",
    "galore_layerwise_ga2_each": "galore_ga2",
}
#: Cases whose Trainer reduces the gradients after every micro-batch, not only after the last.
SYNC_EACH_BATCH = {"galore_layerwise_ga2_each"}
#: Cases without the Trainer's global-norm clipping (layer-wise mode cannot clip globally, so its
#: references do not either); APOLLO and AdamW8bit keep the default max_grad_norm=1.0.
UNCLIPPED = {"galore", "galore_ga2", *LAYERWISE}
PER_RANK_BATCH = 2


class UpdateTiming(TrainerCallback):
    """When the parameters move, and which gradients exist, inside each update of the Trainer.

    ``on_substep_end`` follows a micro-batch run without gradient sync (all but the last of an
    update), ``on_pre_optimizer_step`` the last backward, before ``optimizer.step()``, and
    ``on_step_end`` the update (after ``optimizer.step()`` and ``zero_grad``). Each record
    is ``(event, parameters moved since the update began, parameters holding a gradient)``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = list(model.parameters())
        self.before: list[torch.Tensor] = []
        self.records: list[tuple[str, int, int]] = []

    def _locals(self) -> list[torch.Tensor]:
        from lowmem.optim.sharded import local_tensor

        return [local_tensor(p).detach() for p in self.params]

    def _record(self, event: str) -> None:
        moved = sum(not torch.equal(a, b) for a, b in zip(self.before, self._locals(), strict=True))
        self.records.append((event, moved, sum(p.grad is not None for p in self.params)))

    def on_step_begin(self, args, state, control, **kwargs):
        self.before = [t.clone() for t in self._locals()]

    def on_substep_end(self, args, state, control, **kwargs):
        self._record("substep")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._record("pre_step")

    def on_step_end(self, args, state, control, **kwargs):
        self._record("end")


def sharded_llama(model_dir: Path, world_size: int):
    """The tiny LLaMA loaded with transformers' FSDP2 (``fsdp_size=world_size``), or plain for 1."""
    from tiny_llama import tiny_llama
    from transformers import DistributedConfig, LlamaForCausalLM

    if world_size == 1:
        return tiny_llama()
    config = DistributedConfig(fsdp_size=world_size)
    return LlamaForCausalLM.from_pretrained(model_dir, distributed_config=config)


def _state_bytes(optimizer: Any) -> int:
    return sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def run_case(case: str, out_dir: Path, world_size: int, model_dir: Path | None = None) -> dict[str, Any]:
    """Train ``case`` with the Trainer; global batch ``PER_RANK_BATCH * 2`` whatever ``world_size``."""
    from tiny_llama import TARGETS, ByteWindows, logged, training_args

    import lowmem.hf
    from lowmem.optim.sharded import is_dtensor

    name, accumulation, options = CASES[case]
    args = training_args(
        out_dir / case,
        per_device_train_batch_size=PER_RANK_BATCH * 2 // world_size,
        gradient_accumulation_steps=accumulation,
        dataloader_drop_last=True,
        **({"max_grad_norm": 0.0} if case in UNCLIPPED else {}),
        **(
            {"accelerator_config": {"gradient_accumulation_kwargs": {"sync_each_batch": True}}}
            if case in SYNC_EACH_BATCH
            else {}
        ),
    )
    model = sharded_llama(model_dir, world_size)
    if name != "adamw8bit":
        options = {**options, "target_modules": TARGETS, "update_proj_gap": 2}
    value = lowmem.hf.optimizer_cls_and_kwargs(name, args, model, **options)
    groups = value[1]["params"]
    # The weights matched by name in the FSDP2-wrapped model, already DTensors for the optimizer.
    lowrank = [n for group in groups if "rank" in group for n, _ in group["params"]]
    built_on_dtensors = all(is_dtensor(p) for group in groups for _, p in group["params"])
    timing = UpdateTiming(model)
    trainer = lowmem.hf.LowmemTrainer(
        model=model,
        args=args,
        train_dataset=ByteWindows(count=32),
        optimizer_cls_and_kwargs=value,
        callbacks=[timing],
    )
    trainer.train()
    optimizer = lowmem.hf.unwrap_optimizer(trainer.optimizer)
    stepper = optimizer._layerwise
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    full = {
        k: (v.full_tensor() if is_dtensor(v) else v).detach().clone() for k, v in model.named_parameters()
    }
    return {
        "params": full,
        "loss": torch.tensor(list(logged(trainer, "loss").values()), dtype=torch.float64),
        "grad_norm": torch.tensor(list(logged(trainer, "grad_norm").values()), dtype=torch.float64),
        "state_bytes": _state_bytes(optimizer),
        "lowrank": lowrank,
        "built_on_dtensors": built_on_dtensors,
        # The optimizer steps the model's own (sharded) parameters: nothing swapped them after.
        "steps_model_params": stepped == {id(p) for p in model.parameters()},
        "wrapped": type(trainer.model_wrapped).__name__,
        "timing": timing.records,
        "parameters": len(timing.params),
        "accumulation_steps": 0 if stepper is None else stepper.options.accumulation_steps,
        # The DDP comm-hook path of LowmemTrainerMixin.training_step (DDP only) never engaged.
        "ddp_hook": trainer._lowmem_ddp_model is not None,
        "optimizer": optimizer,
        "model": model,
    }


def checkpoint_round_trip(result: dict[str, Any], out_dir: Path, model_dir: Path) -> dict[str, Any]:
    """The Trainer refuses optimizer checkpoints of a model sharded at load time; transformers' DCP
    helpers (the keys flattened to parameter names) save the lowmem state and load it into a fresh
    optimizer. Returns the refusal and whether every local state tensor came back equal."""
    from tiny_llama import TARGETS, ByteWindows, training_args
    from transformers.distributed.checkpoint import load_optimizer_distributed, save_optimizer_distributed

    import lowmem.hf

    try:
        lowmem.hf.LowmemTrainer(
            model=result["model"],
            args=training_args(out_dir / "refused", save_strategy="steps", save_steps=2),
            train_dataset=ByteWindows(count=8),
        )
        refusal = ""
    except ValueError as error:
        refusal = str(error)

    model, optimizer = result["model"], result["optimizer"]
    path = out_dir.parent / "optimizer_dcp"  # the same directory on every rank
    save_optimizer_distributed(model, optimizer, str(path))
    args = training_args(out_dir / "fresh")
    cls, kwargs = lowmem.hf.optimizer_cls_and_kwargs(
        "galore_adamw", args, model, **CASES["galore"][2], target_modules=TARGETS, update_proj_gap=2
    )
    fresh = cls(**kwargs)
    load_optimizer_distributed(model, fresh, str(path))
    equal, compared = True, 0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                equal = equal and torch.equal(value, fresh.state[param][key])
                compared += 1
    return {"refusal": refusal, "state_equal": equal, "compared": compared}


def hand_sharded_layerwise_error(out_dir: Path, world_size: int) -> str:
    """What a layer-wise name gives on a model ``fully_shard``-ed by hand ("" if nothing): the
    Trainer defers the reduce-scatter only for a model transformers sharded at load time."""
    from tiny_llama import TARGETS, tiny_llama, training_args
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lowmem.hf

    model = tiny_llama()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    args = training_args(out_dir / "hand_sharded", max_grad_norm=0.0)
    try:
        lowmem.hf.optimizer_cls_and_kwargs("galore_adamw_layerwise", args, model, target_modules=TARGETS)
    except ValueError as error:
        return str(error)
    return ""


def accelerate_fsdp_error(out_dir: Path) -> str:
    """What ``TrainingArguments(fsdp=True)`` on CPU gives: lowmem's error ("" if none)."""
    from tiny_llama import ByteWindows, tiny_llama, training_args

    import lowmem.hf

    args = training_args(out_dir / "accelerate", fsdp=True, fsdp_config={"version": 2}, ddp_backend="gloo")
    try:
        lowmem.hf.LowmemTrainer(model=tiny_llama(), args=args, train_dataset=ByteWindows(count=8))
    except ValueError as error:
        return str(error)
    return ""


def main() -> None:
    rank, world_size, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_llama
    from gloo_launch import gloo_group
    from tiny_llama import tiny_llama

    # What torchrun sets; accelerate reads them to decide on a multi-process run.
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    with gloo_group(rank, world_size, init_file):
        model_dir = out_dir / "tiny_llama"
        if rank == 0:  # a pretrained checkpoint, as a user would load one
            tiny_llama().save_pretrained(model_dir)
        dist.barrier()
        rank_dir = out_dir / f"rank{rank}"
        runs = {case: run_case(case, rank_dir, world_size, model_dir) for case in CASES}
        results: dict[str, Any] = {
            "checkpoint": checkpoint_round_trip(runs["galore"], rank_dir, model_dir),
            "accelerate_fsdp_error": accelerate_fsdp_error(rank_dir),
            "hand_sharded_layerwise_error": hand_sharded_layerwise_error(rank_dir, world_size),
        }
        for case, run in runs.items():
            results[case] = {k: v for k, v in run.items() if k not in ("optimizer", "model")}
    torch.save(results, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
