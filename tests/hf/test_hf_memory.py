"""Activation memory and layer conversions under the Trainer: lowmem's offloaded checkpointing and
activation offload change no number (CPU, emulated device copies) while they move the saved tensors,
and converted models train with lowmem optimizers."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch
from tiny_llama import TARGETS, ByteWindows, logged, tiny_llama, training_args
from transformers import TrainerCallback

import lowmem.hf
from lowmem.memory import offload_activations


def _train(tmp_path, name, memory=None, convert=None, options=None, steps=3):
    model = tiny_llama()
    if convert:
        lowmem.hf.convert_model(model, **convert)
    if memory is not None and memory.offload:
        # emulate_device: CPU tensors are copied out and back as if they lived on an accelerator,
        # so the bookkeeping runs and is counted; min_bytes=0 moves every activation.
        engine = offload_activations(keep=model, emulate_device=True, min_bytes=0)
        memory = lowmem.hf.ActivationMemory(
            checkpoint=memory.checkpoint,
            offload=True,
            offload_fraction=memory.offload_fraction,
            offloader=engine,
        )
    checkpointed = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            checkpointed.append(sum(layer.gradient_checkpointing for layer in model.model.layers))

    args = training_args(tmp_path / name, max_steps=steps, max_grad_norm=0.0)
    trainer = lowmem.hf.LowmemTrainer(
        model=model,
        args=args,
        train_dataset=ByteWindows(),
        optimizer_cls_and_kwargs=lowmem.hf.optimizer_cls_and_kwargs(name, args, model, **(options or {})),
        activation_memory=memory,
        callbacks=[Probe()],
    )
    trainer.train()
    return trainer, checkpointed, (memory.offloader if memory is not None else None)


GALORE = {"target_modules": TARGETS, "rank": 4, "update_proj_gap": 2}


@pytest.mark.parametrize(
    "memory",
    [
        lowmem.hf.ActivationMemory(offload=True),
        lowmem.hf.ActivationMemory(checkpoint=True),
        lowmem.hf.ActivationMemory(checkpoint=True, offload=True, offload_fraction=0.5),
    ],
    ids=["offload", "checkpoint", "checkpoint+offload+partial"],
)
def test_activation_memory_changes_no_number(tmp_path, memory):
    name = "galore_adamw_layerwise"  # updates inside the (recomputing) backward
    plain, _, _ = _train(tmp_path / "plain", name, options=GALORE)
    saved, checkpointed, engine = _train(tmp_path / "saved", name, memory, options=GALORE)
    assert logged(saved, "loss") == logged(plain, "loss")
    for p, q in zip(plain.model.parameters(), saved.model.parameters(), strict=True):
        assert torch.equal(p, q)
    layers = len(saved.model.model.layers)
    assert checkpointed == [layers if memory.checkpoint else 0] * 3  # on during training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in saved.model.modules())  # off after
    if memory.offload:
        assert engine.stats.copied_bytes > 0 and engine.stats.fetched_on_demand + engine.stats.prefetched > 0


def test_activation_memory_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs checkpoint=True"):
        lowmem.hf.ActivationMemory(offload_fraction=0.5)
    with pytest.raises(ValueError, match="offload=False"):
        lowmem.hf.ActivationMemory(checkpoint=True, offloader=offload_activations())
    model = tiny_llama()
    with pytest.raises(ValueError, match="activation_checkpointing=False"):
        lowmem.hf.LowmemTrainer(
            model=model,
            args=training_args(tmp_path, activation_checkpointing=True),
            train_dataset=ByteWindows(),
            activation_memory=lowmem.hf.ActivationMemory(checkpoint=True),
        )


def test_sparse_low_rank_model_trains(tmp_path):
    convert = {"sparse_low_rank": {"rank": 4, "density": 0.1, "target_modules": TARGETS, "seed": 0}}
    trainer, _, _ = _train(tmp_path, "adamw8bit_layerwise", convert=convert)
    sparse = trainer.model.model.layers[0].self_attn.q_proj
    assert type(sparse).__name__ == "SparseLowRankLinear"
    losses = logged(trainer, "loss")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    optimizer = lowmem.hf.unwrap_optimizer(trainer.optimizer)
    assert all(optimizer.state[p] for p in sparse.parameters())  # the new factors are trained


def test_low_precision_model_trains_with_galore(tmp_path):
    convert = {"low_precision": {"precision": "int8", "target_modules": ["mlp"]}}
    trainer, _, _ = _train(tmp_path, "galore_adamw", convert=convert, options=GALORE)
    up = trainer.model.model.layers[0].mlp.up_proj
    assert type(up).__name__ == "LowPrecisionLinear"
    optimizer = lowmem.hf.unwrap_optimizer(trainer.optimizer)
    assert optimizer.state[up.weight]["exp_avg"].shape == (64, 4)  # int8 linears' weights are projected too
    assert all(torch.isfinite(torch.tensor(v)) for v in logged(trainer, "loss").values())


def test_convert_model_needs_a_conversion():
    with pytest.raises(ValueError, match="sparse_low_rank"):
        lowmem.hf.convert_model(tiny_llama())
