"""Token-wise recomputation (MEMO): exact losses, near-exact gradients, and bytes/FLOPs linear in α.

Offload runs with ``emulate_device=True`` (CPU tensors copied as if they lived on an accelerator),
so host bytes are the engine's copies and device bytes are saved storages still alive.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lowmem.bench.model import PRESETS, build_model, language_model_loss
from lowmem.memory import (
    SavedTensorCounter,
    apply_checkpointing,
    apply_tokenwise_recompute,
    offload_activations,
    split_point,
    tokenwise_checkpoint,
)

SEQ = 33  # odd: the halves are unequal and no fraction splits it evenly
BATCH = 2
PRESET = PRESETS["micro"]  # hidden 64, MLP 128, one layer
#: Row-split fp32 GEMMs are bitwise; the weight gradient, a sum over tokens, is taken as two partial
#: sums added together. Measured relative max difference: 2.7e-7 (fp32 rounding of the extra add).
GRAD_RTOL = 2e-6


def _mlp_type() -> type[nn.Module]:
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP


def _batch() -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))


def _reference() -> tuple[torch.Tensor, list[torch.Tensor], float]:
    model = build_model(PRESET, SEQ, seed=0)
    loss = language_model_loss(model, _batch())
    with FlopCounterMode(display=False) as flops:
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], flops.get_total_flops()


def _assert_close_grads(reference: list[torch.Tensor], grads: list[torch.Tensor], exact: bool) -> None:
    for a, b in zip(reference, grads, strict=True):
        if exact:
            assert torch.equal(a, b)
        else:
            assert (a - b).abs().max() <= GRAD_RTOL * a.abs().max()


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_llama_mlp_gradients_host_bytes_and_recompute_flops(fraction: float) -> None:
    loss0, grads0, backward_flops0 = _reference()
    model = build_model(PRESET, SEQ, seed=0)
    engine = offload_activations(min_bytes=0, emulate_device=True, keep=model)
    handle = apply_tokenwise_recompute(model, _mlp_type(), offload_fraction=fraction, offloader=engine)
    assert len(handle.modules) == PRESET.num_layers and handle.offloader is engine
    batch = _batch()
    with engine, SavedTensorCounter(exclude=[model, batch]) as counter:  # the whole step offloaded
        loss = language_model_loss(model, batch)
    resident = counter.alive_bytes()
    with FlopCounterMode(display=False) as flops:
        loss.backward()
    assert torch.equal(loss.detach(), loss0)  # the forward runs the same rows, bitwise
    _assert_close_grads(grads0, [p.grad for p in model.parameters()], exact=fraction in (0.0, 1.0))

    h, i = PRESET.hidden_size, PRESET.intermediate_size
    k = split_point(fraction, SEQ)
    assert (handle.stats.saved_tokens, handle.stats.recomputed_tokens) == (k, SEQ - k)
    # Backward runs the recomputed rows' forward up to the last tensor it needs (torch's early stop):
    # gate and up projections, 2·(2·h·i) FLOPs per row; the down projection's output is not needed.
    recompute = flops.get_total_flops() - backward_flops0
    assert recompute == BATCH * (SEQ - k) * 2 * (2 * h * i)
    assert resident == 0  # every saved tensor of the step is in host memory, whatever the fraction


@pytest.mark.parametrize("offload", [True, False])
def test_bytes_follow_the_fraction(offload: bool) -> None:
    """With offload, the saved half's activations grow the host copy; without, the device's."""
    h, i = PRESET.hidden_size, PRESET.intermediate_size
    batch = _batch()
    measured = {}
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        model = build_model(PRESET, SEQ, seed=0)
        engine = offload_activations(min_bytes=0, emulate_device=True, keep=model) if offload else None
        apply_tokenwise_recompute(
            model, _mlp_type(), offload_fraction=fraction, offload=offload, offloader=engine
        )
        with SavedTensorCounter(exclude=[model, batch]) as counter:
            loss = language_model_loss(model, batch)
        measured[fraction] = engine.stats.copied_bytes if offload else counter.alive_bytes()
        loss.backward()
    # Per saved token and sequence: gate and up outputs, silu(gate) and the product (4·i fp32 values).
    # The MLP input (h values per token) is kept for every token in both halves: it is the
    # recomputation's input for one and the projections' saved input for the other.
    for fraction, value in measured.items():
        k = split_point(fraction, SEQ)
        assert value - measured[0.0] == BATCH * k * 4 * i * 4
    if offload:
        assert measured[0.0] == BATCH * SEQ * h * 4  # only the MLP inputs crossed


@pytest.mark.parametrize("seq", [1, 2, 7])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("token_dim", [1, 0, -2])
def test_short_and_odd_sequences_any_token_dim(seq: int, fraction: float, token_dim: int) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))
    shape = [3, 3, 12]
    shape[token_dim % 3] = seq
    x = torch.randn(shape, requires_grad=True)
    reference = mlp(x)
    ref_grads = torch.autograd.grad(reference.square().sum(), [x, *mlp.parameters()])
    engine = offload_activations(min_bytes=0, emulate_device=True, keep=mlp)
    out = tokenwise_checkpoint(mlp, x, offload_fraction=fraction, token_dim=token_dim, offloader=engine)
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    assert out.shape == reference.shape
    # One or two rows per half go through a matrix-vector path: not bitwise, fp32 rounding only.
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(ref_grads, grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_no_grad_runs_once_and_nesting_inside_block_checkpointing() -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    loss0, grads0, _ = _reference()
    model = build_model(PRESET, SEQ, seed=0)
    engine = offload_activations(min_bytes=0, emulate_device=True, keep=model)
    apply_checkpointing(model, block_types=(LlamaDecoderLayer,), offloader=engine)
    handle = apply_tokenwise_recompute(model, _mlp_type(), offload_fraction=0.5, offloader=engine)
    with torch.no_grad():
        assert torch.equal(language_model_loss(model, _batch()), loss0)
    assert handle.stats.calls == 0
    loss = language_model_loss(model, _batch())
    loss.backward()
    assert torch.equal(loss.detach(), loss0)
    _assert_close_grads(grads0, [p.grad for p in model.parameters()], exact=False)
    handle.remove()
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, _mlp_type()))


def test_bad_arguments_name_the_argument() -> None:
    x = torch.randn(2, 5, 4, requires_grad=True)
    lin = nn.Linear(4, 4)
    for bad in (-0.1, 1.5, "half", True, None):
        with pytest.raises(ValueError, match="offload_fraction"):
            tokenwise_checkpoint(lin, x, offload_fraction=bad)
    with pytest.raises(ValueError, match="token_dim=3"):
        tokenwise_checkpoint(lin, x, offload_fraction=0.5, token_dim=3)
    with pytest.raises(ValueError, match="token_dim must be an int"):
        tokenwise_checkpoint(lin, x, offload_fraction=0.5, token_dim=1.0)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        tokenwise_checkpoint(lin, [1.0], offload_fraction=0.5)
    with pytest.raises(ValueError, match="position-wise"):  # mixes tokens: the token dim collapses
        tokenwise_checkpoint(lambda t: t.sum(1), x, offload_fraction=0.5, offload=False)
    with pytest.raises(TypeError, match="returns one tensor"):
        tokenwise_checkpoint(lambda t: (t, t), x, offload_fraction=0.5, offload=False)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="no module of module_types"):
        apply_tokenwise_recompute(model, nn.Conv1d, offload_fraction=0.5)
    with pytest.raises(ValueError, match="module_types must be"):
        apply_tokenwise_recompute(model, (int,), offload_fraction=0.5)
    with pytest.raises(ValueError, match="offload_fraction"):
        apply_tokenwise_recompute(model, nn.Linear, offload_fraction=2)
    handle = apply_tokenwise_recompute(model, nn.Linear, offload_fraction=0.5, offload=False)
    with pytest.raises(ValueError, match="already has"):
        apply_tokenwise_recompute(model, nn.Linear, offload_fraction=0.5)
    with pytest.raises(TypeError, match="exactly one positional tensor"):
        model[0](x, x)
    handle.remove()
    assert "forward" not in model[0].__dict__
    assert split_point(0.5, 1) == 1 and split_point(0.25, 7) == 2 and split_point(1.0, 5) == 5
