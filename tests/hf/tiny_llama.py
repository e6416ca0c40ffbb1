"""Shared fixtures of the HF tests: a tiny LLaMA from config, byte windows of a stdlib file, and a
Trainer run with a lowmem optimizer. CPU only, no downloads; each run takes well under a second."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

import lowmem.hf

#: The projected weights: q/k/v/o and the MLP of both layers (rank 4 < 32 = min side of each).
TARGETS = ["self_attn", "mlp"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Two layers, hidden 32, byte vocabulary. Only the embedding and the head (256x32) reach the
    4096 elements from which 8-bit states are quantized."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


class ByteWindows(torch.utils.data.Dataset):
    """``count`` fixed windows of ``length`` bytes of textwrap.py (input_ids == labels)."""

    def __init__(self, count: int = 24, length: int = 24, seed: int = 0) -> None:
        data = torch.frombuffer(bytearray(Path(textwrap.__file__).read_bytes()), dtype=torch.uint8)
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, data.numel() - length, (count,), generator=generator)
        self.windows = data[starts[:, None] + torch.arange(length)].long()

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index], "labels": self.windows[index]}


def training_args(output_dir: Path | str, **overrides: Any) -> TrainingArguments:
    """Small, deterministic CPU arguments; ``overrides`` replace any of them."""
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "lr_scheduler_type": "linear",
        "warmup_steps": 1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def make_trainer(
    name: str,
    args: TrainingArguments,
    *,
    dataset: torch.utils.data.Dataset | None = None,
    trainer_cls: type = lowmem.hf.LowmemTrainer,
    callbacks: list[TrainerCallback] | None = None,
    **options: Any,
):
    """A fresh tiny model (same seed every time) and a Trainer with ``name`` built from ``args``."""
    model = tiny_llama()
    value = lowmem.hf.optimizer_cls_and_kwargs(name, args, model, **options)
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset if dataset is not None else ByteWindows(),
        optimizer_cls_and_kwargs=value,
        callbacks=callbacks,
    )


def logged(trainer, key: str) -> dict[int, float]:
    """``{global step: value}`` of a logged quantity (``"loss"``, ``"grad_norm"``, ...)."""
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry}


def lowrank_options(name: str) -> dict[str, Any]:
    """Options that make ``name`` project the tiny model's weights and refresh every 2 steps."""
    base = name.removesuffix("_layerwise")
    if base == "adamw8bit":
        return {}
    options: dict[str, Any] = {"target_modules": TARGETS, "update_proj_gap": 2}
    if base != "apollo_mini":
        options["rank"] = 4
    return options
