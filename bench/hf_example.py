"""Train a tiny LLaMA with a lowmem optimizer under the HuggingFace Trainer, on CPU, in seconds.

    python -m lowmem.bench.hf_example                              # GaLore-AdamW, layer-wise
    python -m lowmem.bench.hf_example --optimizer apollo_mini --steps 60
    python -m lowmem.bench.hf_example --optimizer fira_adamw --grad-accum 1 --no-layerwise
    torchrun --nproc_per_node 2 -m lowmem.bench.hf_example --fsdp  # FSDP2: gloo on CPU, nccl on GPUs

The model is built from a config (nothing is downloaded) and reads bytes of the Python standard
library (the benchmark corpus, :mod:`lowmem.bench.corpus`). The one line that matters::

    optimizer_cls_and_kwargs=lowmem.hf.optimizer_cls_and_kwargs(name, args, model, rank=..., ...)

It prints the loss as the Trainer logs it, then the optimizer state's size next to what
``torch.optim.AdamW`` would keep (two fp32 moments per parameter).

``--fsdp`` (under ``torchrun``) is the FSDP2 recipe of :mod:`lowmem.hf`: rank 0 saves the model
as a checkpoint to a directory every rank reads (``--model-dir``, default a temporary directory,
which is shared on one machine), every rank loads it sharded with
``from_pretrained(dir, distributed_config=DistributedConfig(fsdp_size=world_size))``, and the
Trainer trains it with the lowmem optimizer built on its DTensors; each rank prints the
optimizer state it keeps (1/world_size of one process's), rank 0 the loss. ``--batch-size`` is
per rank, so the global batch is world_size times larger than in one process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any

import torch


class _Windows(torch.utils.data.Dataset):
    """Fixed byte windows as causal-LM examples (labels are the inputs; the model shifts them)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index], "labels": self.windows[index]}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lowmem.bench.hf_example", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--optimizer", default="galore_adamw", help="a lowmem.hf.OPTIMIZER_NAMES entry")
    parser.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=30, help="optimizer updates")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per update")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=16, help="projection rank (low-rank optimizers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fsdp", action="store_true", help="FSDP2: load the model sharded over the torchrun ranks"
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="--fsdp: where rank 0 saves the model for every rank to load (default: a temporary directory)",
    )
    opts = parser.parse_args(argv)
    if opts.fsdp and "RANK" not in os.environ:
        parser.error(
            "--fsdp runs one process per rank: launch it with torchrun, e.g. "
            "torchrun --nproc_per_node 2 -m lowmem.bench.hf_example --fsdp"
        )
    if opts.model_dir is not None and not opts.fsdp:
        parser.error("--model-dir is where --fsdp shares the model between ranks; add --fsdp or drop it")
    return opts


def _config(opts: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,  # bytes
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=opts.seq_len,
    )


def _init_distributed() -> tuple[int, int, bool]:
    """Join torchrun's group (nccl on GPUs, gloo on CPU); returns (rank, world size, on CUDA)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        device = None
        if cuda:  # bind the GPU first, so the group's collectives use it
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device)
    return dist.get_rank(), dist.get_world_size(), cuda


def _sharded_model(opts: argparse.Namespace, rank: int, world_size: int) -> tuple[Any, str, bool]:
    """Rank 0 saves a freshly initialized model; every rank loads it sharded (transformers' FSDP2).

    Returns the model, the directory, and whether this run created it (and should remove it)."""
    import torch.distributed as dist
    from transformers import DistributedConfig, LlamaForCausalLM

    created = opts.model_dir is None
    path = [opts.model_dir]
    if rank == 0:
        if created:
            path[0] = tempfile.mkdtemp(prefix="lowmem_hf_example_model_")
        torch.manual_seed(opts.seed)
        LlamaForCausalLM(_config(opts)).save_pretrained(path[0])  # what a user would download
    dist.broadcast_object_list(path, src=0)  # the temporary directory's name
    dist.barrier()  # saved before anyone reads
    config = DistributedConfig(fsdp_size=world_size)
    model = LlamaForCausalLM.from_pretrained(path[0], distributed_config=config)
    return model, path[0], created and rank == 0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the logged losses and the state sizes (for tests)."""
    opts = _parse(argv)
    from transformers import LlamaForCausalLM, TrainingArguments

    import lowmem.hf
    from lowmem.bench.corpus import fixed_windows, load_corpus

    rank, world_size, cuda, model_dir, remove_dir = 0, 1, False, None, False
    if opts.fsdp:
        rank, world_size, cuda = _init_distributed()
        model, model_dir, remove_dir = _sharded_model(opts, rank, world_size)
    else:
        torch.manual_seed(opts.seed)
        model = LlamaForCausalLM(_config(opts))
    # Every rank reads its own part of the same windows (the Trainer's distributed sampler).
    examples = opts.steps * opts.grad_accum * opts.batch_size * world_size
    dataset = _Windows(fixed_windows(load_corpus().train, examples, opts.seq_len, seed=opts.seed))

    with tempfile.TemporaryDirectory(prefix="lowmem_hf_example_") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=opts.steps,
            per_device_train_batch_size=opts.batch_size,
            gradient_accumulation_steps=opts.grad_accum,
            learning_rate=opts.lr,
            weight_decay=0.1,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, opts.steps // 10),
            # Layer-wise updates free each gradient inside backward: clip per parameter instead.
            max_grad_norm=0.0 if opts.layerwise else 1.0,
            logging_steps=max(1, opts.steps // 10),
            # The Trainer does not checkpoint the optimizer of a model sharded at load time.
            save_strategy="no",
            report_to=[],
            use_cpu=not cuda,
            disable_tqdm=True,
            seed=opts.seed,
        )
        name = opts.optimizer.removesuffix("_layerwise")
        options: dict[str, Any] = {"layerwise": opts.layerwise}
        if name != "adamw8bit":
            options.update(target_modules=["self_attn", "mlp"], update_proj_gap=20)
            if name != "apollo_mini":
                options["rank"] = opts.rank
        if opts.layerwise:
            options["max_grad_norm_per_param"] = 1.0
        # Under --fsdp the model's parameters are already DTensors here: the optimizer is built
        # on the shards (each rank keeps the state of its rows).
        trainer = lowmem.hf.LowmemTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            optimizer_cls_and_kwargs=lowmem.hf.optimizer_cls_and_kwargs(name, args, model, **options),
        )
        mode = " (layer-wise)" if opts.layerwise else ""
        size = sum(p.numel() for p in model.parameters())  # a DTensor counts its global shape
        batch = f"{opts.grad_accum} x {opts.batch_size} x {opts.seq_len}"
        engine = ""
        if opts.fsdp:
            batch = f"{world_size} ranks x {batch}"
            engine = f" (FSDP2, {'nccl' if cuda else 'gloo'})"
        if rank == 0:
            print(f"{name}{mode}: {size:,} parameters, {opts.steps} updates of {batch} bytes{engine}")
        trainer.train()

    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    optimizer = lowmem.hf.unwrap_optimizer(trainer.optimizer)
    # Local tensors: under --fsdp, this rank's part of the state.
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    adamw_bytes = sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)
    first, last = losses[min(losses)], losses[max(losses)]
    if opts.fsdp:
        print(
            f"rank {rank}: optimizer state {state_bytes} bytes; torch.optim.AdamW would keep "
            f"{adamw_bytes} bytes on one process ({state_bytes / adamw_bytes:.3f}x)",
            flush=True,
        )
    if rank == 0:
        bits = last / torch.log(torch.tensor(2.0)).item()
        print(f"loss {first:.3f} -> {last:.3f} (bits per byte {bits:.2f})", flush=True)
        if not opts.fsdp:
            print(
                f"optimizer state {state_bytes / 1024:.1f} KiB; torch.optim.AdamW would keep "
                f"{adamw_bytes / 1024:.1f} KiB ({state_bytes / adamw_bytes:.2f}x)"
            )
    if opts.fsdp:
        import torch.distributed as dist

        # Not in a `finally`: a rank that failed must exit (torchrun then stops the others), not
        # wait for them in a barrier.
        dist.barrier()  # every rank is done with the model directory
        if remove_dir:
            shutil.rmtree(model_dir, ignore_errors=True)
        dist.destroy_process_group()
    return {
        "losses": losses,
        "state_bytes": state_bytes,
        "adamw_bytes": adamw_bytes,
        "rank": rank,
        "world_size": world_size,
    }


if __name__ == "__main__":
    main()
