"""Train a tiny LLaMA with a lowmem optimizer under the HuggingFace Trainer, on CPU, in seconds.

    python -m lowmem.bench.hf_example                              # GaLore-AdamW, layer-wise
    python -m lowmem.bench.hf_example --optimizer apollo_mini --steps 60
    python -m lowmem.bench.hf_example --optimizer fira_adamw --grad-accum 1 --no-layerwise

The model is built from a config (nothing is downloaded) and reads bytes of the Python standard
library (the benchmark corpus, :mod:`lowmem.bench.corpus`). The one line that matters::

    optimizer_cls_and_kwargs=lowmem.hf.optimizer_cls_and_kwargs(name, args, model, rank=..., ...)

It prints the loss as the Trainer logs it, then the optimizer state's size next to what
``torch.optim.AdamW`` would keep (two fp32 moments per parameter).
"""

from __future__ import annotations

import argparse
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the logged losses and the state sizes (for tests)."""
    opts = _parse(argv)
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    import lowmem.hf
    from lowmem.bench.corpus import fixed_windows, load_corpus

    torch.manual_seed(opts.seed)
    config = LlamaConfig(
        vocab_size=256,  # bytes
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=opts.seq_len,
    )
    model = LlamaForCausalLM(config)
    examples = opts.steps * opts.grad_accum * opts.batch_size
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
            save_strategy="no",
            report_to=[],
            use_cpu=True,
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
        trainer = lowmem.hf.LowmemTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            optimizer_cls_and_kwargs=lowmem.hf.optimizer_cls_and_kwargs(name, args, model, **options),
        )
        mode = " (layer-wise)" if opts.layerwise else ""
        size = sum(p.numel() for p in model.parameters())
        batch = f"{opts.grad_accum} x {opts.batch_size} x {opts.seq_len}"
        print(f"{name}{mode}: {size:,} parameters, {opts.steps} updates of {batch} bytes")
        trainer.train()

    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    optimizer = lowmem.hf.unwrap_optimizer(trainer.optimizer)
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    adamw_bytes = sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)
    first, last = losses[min(losses)], losses[max(losses)]
    print(f"loss {first:.3f} -> {last:.3f} (bits per byte {last / torch.log(torch.tensor(2.0)).item():.2f})")
    print(
        f"optimizer state {state_bytes / 1024:.1f} KiB; torch.optim.AdamW would keep "
        f"{adamw_bytes / 1024:.1f} KiB ({state_bytes / adamw_bytes:.2f}x)"
    )
    return {"losses": losses, "state_bytes": state_bytes, "adamw_bytes": adamw_bytes}


if __name__ == "__main__":
    main()
