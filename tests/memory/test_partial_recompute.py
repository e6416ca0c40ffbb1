"""Partial recomputation (MEMO-style ``offload_fraction``): exact gradients, budget, and cost ranking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.bench.model import PRESETS, build_model, language_model_loss
from lowmem.memory import PartialRecompute, apply_checkpointing, checkpoint, offload_activations


def test_plan_takes_the_most_expensive_bytes_first_within_the_budget() -> None:
    # (bytes, recompute FLOPs): a matmul output (high FLOPs/byte), elementwise outputs (low).
    profile = [(400, 100.0), (1000, 1e6), (400, 1e5), (200, 50.0), (0, 0.0)]
    total = sum(b for b, _ in profile)
    for fraction, expected in ((0.0, {4}), (0.5, {1, 4}), (0.75, {1, 2, 4}), (1.0, {0, 1, 2, 3, 4})):
        plan = PartialRecompute(fraction).plan_for(profile)
        assert plan == frozenset(expected)
        assert sum(profile[i][0] for i in plan) <= fraction * total


def _llama_step(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = language_model_loss(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("offload", [True, False])
def test_tiny_llama_gradients_bitwise_and_recompute_shrinks(offload: bool) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    seq = 32
    preset = PRESETS["micro"]
    batch = torch.randint(0, 256, (2, seq + 1), generator=torch.Generator().manual_seed(5))
    loss0, grads0 = _llama_step(build_model(preset, seq, seed=0), batch)
    flops = {}
    for fraction in (0.0, 0.5, 1.0):
        model = build_model(preset, seq, seed=0)
        partial = PartialRecompute(fraction)
        engine = offload_activations(min_bytes=0, emulate_device=True, keep=model) if offload else None
        apply_checkpointing(
            model,
            block_types=(LlamaDecoderLayer,),
            offload=offload,
            offloader=engine,
            offload_fraction=partial,
        )
        _llama_step(model, batch)  # the first call of the layer measures it and makes the plan
        partial.reset_stats()  # count the next step only
        loss1, grads1 = _llama_step(model, batch)
        assert torch.equal(loss0, loss1)
        for a, b in zip(grads0, grads1, strict=True):
            assert torch.equal(a, b)
        stats = partial.stats
        flops[fraction] = (stats.recomputed_flops, stats.replayed_flops)
        if fraction > 0:
            assert stats.profiled_calls == 0 and stats.saved_ops > 0
            (profile,) = partial.profiles()
            assert stats.saved_bytes <= fraction * sum(b for b, _ in profile) * preset.num_layers
            if offload:  # the saved outputs went to host memory
                assert engine.stats.copied_bytes >= stats.saved_bytes
    recompute_0, replay_0 = flops[0.0]
    recompute_half, replay_half = flops[0.5]
    assert replay_0 == 0 and recompute_0 > 0
    assert replay_half > 0
    # Half the bytes, chosen by FLOPs per byte, carry most of the recompute cost (the matmuls).
    assert recompute_half < 0.2 * recompute_0
    assert flops[1.0][0] <= recompute_half


class DropoutBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 48)
        self.b = nn.Linear(48, 24)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h * 2  # an output changed in place below, after it may have been saved
        h.add_(1)
        return self.b(self.drop(torch.relu(h))) + self.drop(x)


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_random_ops_and_inplace_updates_stay_exact(fraction: float) -> None:
    torch.manual_seed(0)
    block = DropoutBlock()
    x = torch.randn(16, 24, requires_grad=True)
    torch.manual_seed(1)
    reference = block(x).square().sum()
    ref_grads = torch.autograd.grad(reference, [x, *block.parameters()])
    for offloader in (None, offload_activations(min_bytes=0, emulate_device=True)):
        partial = PartialRecompute(fraction)
        for _ in range(2):  # plan, then use it
            torch.manual_seed(1)
            out = checkpoint(
                block, x, offload=offloader is not None, offloader=offloader, offload_fraction=partial
            )
            loss = out.square().sum()
            grads = torch.autograd.grad(loss, [x, *block.parameters()])
            assert torch.equal(loss, reference)
            for a, b in zip(ref_grads, grads, strict=True):
                assert torch.equal(a, b)
        assert partial.stats.replayed_ops > 0


def test_bad_fraction() -> None:
    with pytest.raises(ValueError, match="offload_fraction"):
        PartialRecompute(-0.1)
    with pytest.raises(ValueError, match="offload_fraction"):
        PartialRecompute("half")  # type: ignore[arg-type]
