"""``Trainer.train(resume_from_checkpoint=...)`` with every lowmem optimizer: the checkpoint holds the
whole optimizer state as tensors (loadable with ``weights_only=True``) and the resumed run continues
the uninterrupted run's loss curve bit for bit on CPU, across projector refreshes."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch
from tiny_llama import logged, lowrank_options, make_trainer, training_args

import lowmem.hf

N = 3  # save after N updates, compare updates N+1..2N


@pytest.mark.parametrize(
    ("name", "accumulation"),
    [(name, 1) for name in lowmem.hf.OPTIMIZER_NAMES]
    + [("galore_adamw_layerwise", 2), ("apollo_adamw_layerwise", 2)],
)
def test_resume_continues_the_uninterrupted_run(tmp_path, name, accumulation):
    settings = {
        "max_steps": 2 * N,
        "save_strategy": "steps",
        "save_steps": N,
        "gradient_accumulation_steps": accumulation,
        "max_grad_norm": 0.0 if name.endswith("_layerwise") else 1.0,
    }
    # update_proj_gap=2: refreshes at updates 1, 3, 5, so the resumed run refreshes from loaded state.
    straight = make_trainer(name, training_args(tmp_path / "straight", **settings), **lowrank_options(name))
    straight.train()
    checkpoint = tmp_path / "straight" / f"checkpoint-{N}"

    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    trainable = [p for p in straight.model.parameters() if p.requires_grad]
    assert len(saved["state"]) == len(trainable)  # every parameter's state is in the checkpoint
    assert all(isinstance(v, torch.Tensor) for entry in saved["state"].values() for v in entry.values())

    resumed = make_trainer(name, training_args(tmp_path / "resumed", **settings), **lowrank_options(name))
    resumed.train(resume_from_checkpoint=str(checkpoint))

    a, b = logged(straight, "loss"), logged(resumed, "loss")
    assert [a[s] for s in range(N + 1, 2 * N + 1)] == [b[s] for s in range(N + 1, 2 * N + 1)]
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    end_a = lowmem.hf.unwrap_optimizer(straight.optimizer).state_dict()["state"]
    end_b = lowmem.hf.unwrap_optimizer(resumed.optimizer).state_dict()["state"]
    for index, entry in end_a.items():
        for key, value in entry.items():
            assert torch.equal(value, end_b[index][key]), (index, key)
