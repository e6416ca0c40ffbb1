"""Layer-wise lowmem optimizers under the Trainer: the same training as ordinary stepping (the
Trainer's LR schedule, gradient accumulation with a short last window), the real gradient norm
in the logs, and clear errors for the settings that cannot work."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch
from tiny_llama import TARGETS, ByteWindows, logged, make_trainer, tiny_llama, training_args
from transformers import Trainer, TrainerCallback

import lowmem.hf

# 21 samples in micro-batches of 2: 11 micro-batches per epoch, so with 3 per update the 4th update
# of each epoch has only 2 (the Trainer scales their loss by 1/2 and steps early).
SHORT_LAST_WINDOW = {"dataset": ByteWindows(count=21)}


def _run(tmp_path, name, trainer_cls=lowmem.hf.LowmemTrainer, **overrides):
    options = {"target_modules": TARGETS, "rank": 4, "update_proj_gap": 2}
    options.update(overrides.pop("options", {}))
    args = training_args(tmp_path / name, max_grad_norm=0.0, **overrides)
    trainer = make_trainer(name, args, trainer_cls=trainer_cls, **SHORT_LAST_WINDOW, **options)
    trainer.train()
    return trainer


def _max_param_diff(a, b):
    return max(
        (p - q).abs().max().item() for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True)
    )


# GaLore accumulates micro-batch gradients in the low-rank basis between refreshes, Fira full ones.
@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw"])
def test_layerwise_trains_like_stepwise_with_accumulation(tmp_path, name):
    # 5 updates of 3 micro-batches: the 4th ends the epoch with a 2-micro-batch window and the 5th
    # starts the next epoch; warmup then linear decay, so every update has a different lr.
    settings = {"gradient_accumulation_steps": 3, "max_steps": 5, "warmup_steps": 2}
    stepwise = _run(tmp_path, name, **settings)
    # The training itself needs no Trainer subclass (LowmemTrainer only fixes the logged grad_norm).
    trainer_cls = Trainer if name == "fira_adamw" else lowmem.hf.LowmemTrainer
    layerwise = _run(tmp_path, f"{name}_layerwise", trainer_cls=trainer_cls, **settings)
    assert lowmem.hf.unwrap_optimizer(layerwise.optimizer)._layerwise is not None
    a, b = logged(stepwise, "loss"), logged(layerwise, "loss")
    assert sorted(a) == sorted(b) == list(range(1, 6))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    # GaLore sums micro-batch gradients in the low-rank basis (rounding differs); the others are exact.
    assert _max_param_diff(stepwise, layerwise) <= (1e-6 if name.startswith("galore") else 0.0)
    assert logged(stepwise, "learning_rate") == logged(layerwise, "learning_rate")


def test_the_trainers_schedule_drives_layerwise_updates(tmp_path):
    # Linear warmup from 0: the first update has lr 0 and must leave every parameter (decay
    # included) unchanged; the second one moves them.
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append([p.detach().clone() for p in model.parameters()])

    args = training_args(tmp_path, max_grad_norm=0.0, max_steps=2, warmup_steps=1)
    trainer = make_trainer(
        "galore_adamw_layerwise", args, callbacks=[Snapshot()], target_modules=TARGETS, rank=4
    )
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert logged(trainer, "learning_rate")[1] == 0.0
    assert all(torch.equal(p, q) for p, q in zip(initial, snapshots[0], strict=True))
    assert all(not torch.equal(p, q) for p, q in zip(snapshots[0], snapshots[1], strict=True))


@pytest.mark.parametrize(
    ("name", "accumulation", "options"),
    [
        ("fira_adamw", 1, {}),
        # per-parameter clipping (at a bound no gradient reaches) accumulates full gradients,
        # so the norm of the summed gradient is exact with accumulation too
        ("galore_adamw", 3, {"max_grad_norm_per_param": 1e6}),
    ],
)
def test_lowmem_trainer_logs_the_real_gradient_norm(tmp_path, name, accumulation, options):
    settings = {"gradient_accumulation_steps": accumulation, "max_steps": 4, "options": options}
    stepwise = _run(tmp_path, name, **settings)
    layerwise = _run(tmp_path, f"{name}_layerwise", **settings)
    a, b = logged(stepwise, "grad_norm"), logged(layerwise, "grad_norm")
    assert sorted(a) == sorted(b) == list(range(1, 5))
    for step in a:
        assert a[step] > 0.1  # a real norm, not the 0.0 of freed gradients
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_per_param_clipping_matches_stepwise(tmp_path):
    settings = {
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
        "options": {"max_grad_norm_per_param": 0.05},
    }
    stepwise = _run(tmp_path, "apollo_mini", **settings)
    layerwise = _run(tmp_path, "apollo_mini_layerwise", **settings)
    # 0.05 is below every per-parameter norm here, so clipping changed every update
    assert min(logged(stepwise, "grad_norm").values()) > 0.05
    assert _max_param_diff(stepwise, layerwise) == 0.0


def test_settings_that_cannot_work_are_rejected(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"max_grad_norm=0\.0.*max_grad_norm_per_param"):
        lowmem.hf.optimizer_cls_and_kwargs(
            "galore_adamw_layerwise",
            training_args(tmp_path, max_grad_norm=1.0),
            model,
            target_modules=TARGETS,
        )
    # The arguments the Trainer runs with are checked again when it builds the optimizer.
    built_for = training_args(tmp_path, max_grad_norm=0.0, gradient_accumulation_steps=2)
    value = lowmem.hf.optimizer_cls_and_kwargs("adamw8bit_layerwise", built_for, model)
    runs_with = training_args(tmp_path, max_grad_norm=0.0, gradient_accumulation_steps=4)
    trainer = lowmem.hf.LowmemTrainer(
        model=model, args=runs_with, train_dataset=ByteWindows(), optimizer_cls_and_kwargs=value
    )
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        trainer.create_optimizer()
