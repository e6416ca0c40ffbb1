"""Offloaded checkpointing: exact gradients, inputs in host memory, transformers integration.

Offload runs with ``emulate_device=True`` on CPU-only machines (see test_offload.py), so the
checkpointed blocks' kept inputs really are copied and released.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch import nn

from lowmem.bench.model import PRESETS, build_model, language_model_loss
from lowmem.memory import SavedTensorCounter, apply_checkpointing, checkpoint, offload_activations


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def _stack(depth: int = 4, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(width) for _ in range(depth)])


def _engine(model: nn.Module | None = None):
    return offload_activations(min_bytes=0, emulate_device=True, keep=model)


def _grads(model: nn.Module, x: torch.Tensor, ctx=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with ctx if ctx is not None else contextlib.nullcontext():
        loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("offload", [False, True])
def test_mlp_stack_checkpointed_gradients_bitwise(offload: bool, use_reentrant: bool) -> None:
    x = torch.randn(8, 32, requires_grad=True)
    model = _stack()
    loss0, grads0 = _grads(model, x)
    engine = _engine(model) if offload else None
    handle = apply_checkpointing(
        model, block_types=Block, offload=offload, offloader=engine, use_reentrant=use_reentrant
    )
    assert len(handle.modules) == 4
    loss1, grads1 = _grads(model, x)
    assert torch.equal(loss0, loss1)
    for a, b in zip(grads0, grads1, strict=True):
        assert torch.equal(a, b)
    if offload:  # the inputs of blocks 2..4 were copied to host (block 1's input x is a leaf)
        assert engine.stats.copies == 3


def test_checkpoint_function_keyword_arguments_and_plain_callables() -> None:
    x = torch.randn(8, 32, requires_grad=True)
    block = _stack(depth=1)[0]
    reference = block(x, scale=0.5).sum()
    (ref_grad,) = torch.autograd.grad(reference, x)
    out = checkpoint(block, x, scale=0.5, offloader=_engine(block)).sum()
    (grad,) = torch.autograd.grad(out, x)
    assert torch.equal(out, reference) and torch.equal(grad, ref_grad)


def test_offloaded_inputs_leave_the_device() -> None:
    x = torch.randn(16, 32)
    model = _stack(depth=6)
    alive = {}
    for offload in (False, True):
        handle = apply_checkpointing(model, block_types=Block, offload=offload, offloader=_engine(model))
        with SavedTensorCounter(exclude=[model, x]) as counter:
            loss = model(x).square().mean()
        alive[offload] = counter.alive_bytes()
        loss.backward()
        handle.remove()
    # Checkpointing keeps the 5 non-leaf block inputs (each shaped like x) plus the model output that
    # square() saves outside the blocks; offloaded, only that output stays.
    assert alive[False] == 6 * x.nbytes
    assert alive[True] == x.nbytes


def _llama_batch(seq: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, seq + 1), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("via", ["block_types", "transformers", "gradient_checkpointing_func"])
def test_tiny_llama_checkpointed_offloaded_gradients_bitwise(via: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    seq = 32
    batch = _llama_batch(seq)
    preset = PRESETS["micro"]
    model = build_model(preset, seq, seed=0)
    loss0 = language_model_loss(model, batch)
    loss0.backward()
    grads0 = [p.grad.clone() for p in model.parameters()]

    model = build_model(preset, seq, seed=0).train()
    engine = _engine(model)
    if via == "block_types":
        apply_checkpointing(model, block_types=(LlamaDecoderLayer,), offloader=engine)
    elif via == "transformers":
        handle = apply_checkpointing(model, offloader=engine)
        assert len(handle.modules) == preset.num_layers
    else:
        func = functools.partial(checkpoint, offload=True, offloader=engine)
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
    # The rest of the step (embeddings, head) in the same engine: almost nothing stays resident.
    with engine, SavedTensorCounter(exclude=[model, batch]) as counter:
        loss1 = language_model_loss(model, batch)
    alive = counter.alive_bytes()
    loss1.backward()
    assert torch.equal(loss0.detach(), loss1.detach())
    for a, p in zip(grads0, model.parameters(), strict=True):
        assert torch.equal(a, p.grad)
    assert engine.stats.copies > 0
    assert alive == 0


def test_remove_restores_the_model() -> None:
    model = _stack(depth=2)
    keys = list(model.state_dict())
    handle = apply_checkpointing(model, block_types=(Block,), offload=False)
    assert list(model.state_dict()) == keys  # no wrapper modules, no renamed parameters
    assert all("forward" in m.__dict__ for m in model)
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_checkpointing(model, block_types=(Block,))
    handle.remove()
    assert all("forward" not in m.__dict__ for m in model)


def test_bad_arguments() -> None:
    model = _stack(depth=1)
    with pytest.raises(ValueError, match="block_types"):
        apply_checkpointing(model)  # not a transformers model
    with pytest.raises(ValueError, match="no module of block_types"):
        apply_checkpointing(model, block_types=(nn.Conv2d,))
    with pytest.raises(ValueError, match="block_types must be"):
        apply_checkpointing(model, block_types=(int,))
    with pytest.raises(ValueError, match="use_reentrant=False"):
        checkpoint(model, torch.randn(2, 32), use_reentrant=True, offload_fraction=0.5)
    with pytest.raises(ValueError, match="offload_fraction"):
        checkpoint(model, torch.randn(2, 32), offload_fraction=1.5)


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_exception_inside_a_checkpointed_block_leaves_no_hooks_or_modes(fraction: float) -> None:
    def failing_block(t: torch.Tensor) -> torch.Tensor:
        (t * 2).exp()
        raise RuntimeError("inside the block")

    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inside the block"):
        checkpoint(failing_block, x, offloader=_engine(), offload_fraction=fraction)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert torch._C._len_torch_dispatch_stack() == 0
