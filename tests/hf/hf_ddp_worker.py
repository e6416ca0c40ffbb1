"""One rank of test_hf_distributed.py: the HF Trainer training the tiny LLaMA under DDP (gloo, CPU).

``python hf_ddp_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR`` (launched by ``tests/gloo_launch.py``)
joins a gloo group through a file store, then sets the variables a ``torchrun`` launch would set
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``): with ``use_cpu=True`` accelerate
sees a multi-CPU run, finds the process group already initialized and uses it, and the Trainer
wraps the model in ``DistributedDataParallel`` and shards every global batch over the ranks.

Each case of :data:`CASES` trains a fresh model; the final parameters and the logged losses go
to ``OUT_DIR/rank{RANK}.pt``. The test runs the same cases in one process on the global batch
(:func:`run_case` with ``world_size=1``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

#: case -> (optimizer name, gradient_accumulation_steps). 4 updates, refreshes every 2: the
#: projector is refreshed from the averaged gradient at updates 1 and 3, and reused at 2 and 4.
CASES: dict[str, tuple[str, int]] = {
    "galore": ("galore_adamw", 1),
    "galore_ga2": ("galore_adamw", 2),
    "galore_layerwise": ("galore_adamw_layerwise", 1),
    "galore_layerwise_ga2": ("galore_adamw_layerwise", 2),
}
PER_RANK_BATCH = 2


def run_case(case: str, out_dir: Path, world_size: int) -> dict[str, Any]:
    """Train ``case`` with the Trainer; global batch ``PER_RANK_BATCH * 2`` whatever ``world_size``."""
    from tiny_llama import TARGETS, ByteWindows, logged, make_trainer, training_args

    name, accumulation = CASES[case]
    args = training_args(
        out_dir / case,
        per_device_train_batch_size=PER_RANK_BATCH * 2 // world_size,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=0.0 if name.endswith("_layerwise") else 1.0,
        # Only for a distributed run: accelerate takes any backend as a request for one.
        ddp_backend="gloo" if world_size > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_drop_last=True,
    )
    trainer = make_trainer(
        name,
        args,
        dataset=ByteWindows(count=32),
        target_modules=TARGETS,
        rank=4,
        update_proj_gap=2,
    )
    trainer.train()
    return {
        "params": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
        "loss": torch.tensor(list(logged(trainer, "loss").values()), dtype=torch.float64),
        "grad_norm": torch.tensor(list(logged(trainer, "grad_norm").values()), dtype=torch.float64),
        "wrapped": type(trainer.model_wrapped).__name__,
        # Whether lowmem's DDP comm hook ran the updates (layer-wise cases only).
        "comm_hook": trainer._lowmem_ddp_model is trainer.model_wrapped,
    }


def unused_parameters_error(out_dir: Path) -> str:
    """The error for layer-wise DDP with the Trainer's default find_unused_parameters ("" if none)."""
    from tiny_llama import TARGETS, tiny_llama, training_args

    import lowmem.hf

    args = training_args(out_dir / "unused", max_grad_norm=0.0, ddp_backend="gloo")
    try:
        model = tiny_llama()
        lowmem.hf.optimizer_cls_and_kwargs("galore_adamw_layerwise", args, model, target_modules=TARGETS)
    except ValueError as error:
        return str(error)
    return ""


def sync_each_batch_error(out_dir: Path) -> str:
    """The error for layer-wise DDP with accelerate's sync_each_batch ("" if none): DDP's comm hook
    would then update after every micro-batch."""
    from tiny_llama import TARGETS, tiny_llama, training_args

    import lowmem.hf

    args = training_args(
        out_dir / "each_batch",
        max_grad_norm=0.0,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        gradient_accumulation_steps=2,
        accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": True}},
    )
    try:
        model = tiny_llama()
        lowmem.hf.optimizer_cls_and_kwargs("galore_adamw_layerwise", args, model, target_modules=TARGETS)
    except ValueError as error:
        return str(error)
    return ""


def main() -> None:
    rank, world_size, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_llama
    from gloo_launch import gloo_group

    # What torchrun sets; accelerate reads them to decide on a multi-CPU run.
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    with gloo_group(rank, world_size, init_file):
        rank_dir = out_dir / f"rank{rank}"
        results: dict[str, Any] = {case: run_case(case, rank_dir, world_size) for case in CASES}
        results["unused_parameters_error"] = unused_parameters_error(rank_dir)
        results["sync_each_batch_error"] = sync_each_batch_error(rank_dir)
    torch.save(results, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
