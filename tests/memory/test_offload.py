"""offload_activations: exact gradients, what stays on the device, hooks hygiene, host-buffer reuse.

On a CPU-only machine the offload rows use ``emulate_device=True`` (CPU tensors treated as device
tensors: copied into separate host buffers and back into fresh storages), so "bytes still on the
device" is measurable: a saved storage that was copied and released is dead, one kept by the
graph is alive (``SavedTensorCounter``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.bench.model import PRESETS, build_model, language_model_loss
from lowmem.memory import SavedTensorCounter, offload_activations
from lowmem.memory.offload import host_buffer_pool


def _top_hooks() -> object:
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def _mlp(depth: int = 6, width: int = 48, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width)) for _ in range(depth)]
    return nn.Sequential(*layers)


def _emulated(**kwargs: object) -> object:
    return offload_activations(min_bytes=0, emulate_device=True, **kwargs)


def _step(model: nn.Module, loss_fn, ctx) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with ctx:
        loss = loss_fn(model)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _mlp_loss(x: torch.Tensor):
    return lambda model: model(x).square().mean()


@pytest.mark.parametrize(
    "make_ctx", [lambda: offload_activations(), _emulated], ids=["cpu-default", "emulated"]
)
def test_mlp_gradients_bitwise(make_ctx) -> None:
    x = torch.randn(16, 48)
    model = _mlp()
    loss0, grads0 = _step(model, _mlp_loss(x), contextlib.nullcontext())
    loss1, grads1 = _step(model, _mlp_loss(x), make_ctx())
    assert torch.equal(loss0, loss1)
    for a, b in zip(grads0, grads1, strict=True):
        assert torch.equal(a, b)


def _tiny_llama(seq_len: int) -> nn.Module:
    return build_model(PRESETS["micro"], seq_len, seed=0)


def test_llama_gradients_bitwise_and_resident_bytes_drop() -> None:
    seq = 32
    batch = torch.randint(0, 256, (2, seq + 1), generator=torch.Generator().manual_seed(1))
    results = {}
    for name in ("none", "offload"):
        model = _tiny_llama(seq)
        ctx = _emulated(keep=model) if name == "offload" else contextlib.nullcontext()
        with ctx:
            with SavedTensorCounter(exclude=[model, batch]) as counter:
                loss = language_model_loss(model, batch)
        saved, alive = counter.saved_bytes(), counter.alive_bytes()
        loss.backward()
        results[name] = (loss.detach(), [p.grad for p in model.parameters()], saved, alive)
    (loss0, grads0, saved0, alive0), (loss1, grads1, saved1, alive1) = results["none"], results["offload"]
    assert torch.equal(loss0, loss1)
    for a, b in zip(grads0, grads1, strict=True):
        assert torch.equal(a, b)
    # Without offload every saved activation is held by the graph; with it, at least 90% are gone.
    assert saved0 > 0 and alive0 == saved0
    assert saved1 == saved0
    assert alive1 <= 0.1 * alive0


def test_mlp_resident_bytes_drop_and_counter_sees_the_difference() -> None:
    x = torch.randn(32, 48)
    model = _mlp(depth=8)
    alive = {}
    for name, ctx in (("none", contextlib.nullcontext()), ("offload", _emulated())):
        with ctx:
            with SavedTensorCounter(exclude=[model, x]) as counter:
                loss = model(x).square().mean()
        alive[name] = counter.alive_bytes()
        loss.backward()
    assert alive["none"] > 0
    assert alive["offload"] <= 0.1 * alive["none"]


class _CopySpy(TorchDispatchMode):
    """Records the storage of every tensor that ``copy_`` reads."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.sources.append(args[1].untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def test_no_parameter_or_view_of_one_is_ever_copied() -> None:
    model = _mlp(depth=3)
    model[0][0].weight.requires_grad_(False)  # a frozen weight: a leaf without grad
    x = torch.randn(8, 48, requires_grad=True)  # so the frozen layer still saves weight.t()
    offload = _emulated()
    with offload, _CopySpy() as spy:
        loss = model(x).square().mean()
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert offload.stats.kept_bytes["parameter"] > 0  # weight.t() views were saved, and kept
    assert len(spy.sources) == offload.stats.copies > 0  # activations were copied...
    assert not params & set(spy.sources)  # ...and no parameter storage ever was


def test_views_of_one_storage_are_moved_once() -> None:
    h0 = torch.randn(8, 32, requires_grad=True)
    offload = _emulated()
    with offload:
        h = h0 * 2  # a fresh activation
        y = (h[:, :16] * h[:, 16:]).sum() + (h * h).sum()  # two views of h, and h saved twice
    assert offload.stats.copies == 1
    assert offload.stats.shared_hits >= 3
    y.backward()
    expected = torch.autograd.grad(((h0 * 2)[:, :16] * (h0 * 2)[:, 16:]).sum() + ((h0 * 2) ** 2).sum(), h0)[0]
    assert torch.equal(h0.grad, expected)


def test_inplace_change_after_save_makes_a_new_copy() -> None:
    a = torch.randn(64, requires_grad=True)
    offload = _emulated()
    with offload:
        h = a * 1.5
        z = (h * a).sum()  # saves h at version 0 (copied now: backward sees these values)
        with torch.no_grad():
            h.add_(1)  # version 1, same storage
        w = (h * a).sum()  # saves h at version 1: must not be served by the version-0 copy
    assert offload.stats.copies == 2
    (z + w).backward()
    # dz/da = 1.5a + 1.5a; dw/da = (1.5a + 1) + 1.5a. Reusing the old copy would give 6a.
    assert torch.allclose(a.grad, 6 * a.detach() + 1, rtol=0, atol=1e-5)


def test_kept_tensor_modified_in_place_raises_like_autograd() -> None:
    w = torch.randn(4, requires_grad=True)
    with offload_activations():  # CPU: tensors stay where they are, by reference
        h = w * 2
        y = (h * h).sum()
        with torch.no_grad():
            h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_hooks_removed_after_normal_exit_exception_and_nesting() -> None:
    assert _top_hooks() is None
    offload = _emulated()
    with offload:
        assert _top_hooks() is not None
        with offload:  # re-entering the same engine
            pass
        assert _top_hooks() is not None
    assert _top_hooks() is None
    with pytest.raises(ZeroDivisionError), offload:
        _ = 1 / 0
    assert _top_hooks() is None
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="boom"), offload:
        (x * 2).sum()
        raise ValueError("boom")
    assert _top_hooks() is None


def test_no_grad_and_torch_checkpoint_nested_both_ways() -> None:
    model = _mlp(depth=4)
    x = torch.randn(8, 48, requires_grad=True)
    _, grads0 = _step(model, _mlp_loss(x), contextlib.nullcontext())

    def offload_inside_checkpoint(m):
        def inner(t):
            with _emulated():
                return m(t)

        return torch_checkpoint.checkpoint(inner, x, use_reentrant=False).square().mean()

    def checkpoint_inside_offload(m):
        with torch.no_grad():
            m(x)  # saves nothing, must not disturb the hooks
        return torch_checkpoint.checkpoint(m, x, use_reentrant=False).square().mean()

    _, grads1 = _step(model, offload_inside_checkpoint, contextlib.nullcontext())
    offload = _emulated()
    _, grads2 = _step(model, checkpoint_inside_offload, offload)
    assert offload.stats.copies >= 1  # the checkpoint's kept input went through the offload hooks
    for a, b, c in zip(grads0, grads1, grads2, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    assert _top_hooks() is None


def test_double_backward() -> None:
    model = _mlp(depth=2, width=16)
    x = torch.randn(4, 16, requires_grad=True)

    def loss_under(ctx):
        with ctx:
            return model(x).pow(2).sum()

    # A second backward through a freed graph: autograd's own clear error, not stale host data.
    loss = loss_under(_emulated())
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    # retain_graph: the host copies outlive the first backward, both backwards are exact.
    model.zero_grad(set_to_none=True)
    loss = loss_under(contextlib.nullcontext())
    loss.backward(retain_graph=True)
    loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss = loss_under(_emulated())
    loss.backward(retain_graph=True)
    loss.backward()
    for a, p in zip(reference, model.parameters(), strict=True):
        assert torch.equal(a, p.grad)
    # Gradient of a gradient (create_graph) through offloaded tensors.
    results = []
    for ctx in (contextlib.nullcontext(), _emulated()):
        g = torch.autograd.grad(loss_under(ctx), x, create_graph=True)[0]
        results.append(torch.autograd.grad(g.square().sum(), x)[0])
    assert torch.equal(results[0], results[1])


def test_host_buffers_are_recycled_across_steps() -> None:
    model = _mlp(depth=4)
    x = torch.randn(16, 48)
    offload = _emulated()
    pool = host_buffer_pool(False)
    _step(model, _mlp_loss(x), offload)
    allocations, reuses = pool.allocations, pool.reuses
    _step(model, _mlp_loss(x), offload)
    assert pool.allocations == allocations  # the second step pinned/allocated nothing new
    assert pool.reuses - reuses == offload.stats.copies // 2 > 0


def test_small_tensors_stay() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    offload = offload_activations(min_bytes=1 << 20, emulate_device=True)
    with offload:
        (x * 2).exp().sum()
    assert offload.stats.copies == 0 and offload.stats.kept_bytes["small"] > 0


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="min_bytes"):
        offload_activations(min_bytes=-1)
    with pytest.raises(ValueError, match="prefetch"):
        offload_activations(prefetch=-2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True"):
            offload_activations(pin_memory=True)
        with pytest.raises(ValueError, match="use_streams=True"):
            offload_activations(use_streams=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (side streams, pinned memory)")
def test_cuda_streams_exact_and_prefetched() -> None:
    device = torch.device("cuda")
    model = _mlp(depth=8, width=256).to(device)
    x = torch.randn(512, 256, device=device)
    loss0, grads0 = _step(model, _mlp_loss(x), contextlib.nullcontext())
    offload = offload_activations(min_bytes=0)
    assert offload.pin_memory and offload.use_streams
    alive = {}
    for name, ctx in (("none", contextlib.nullcontext()), ("offload", offload)):
        with ctx:
            with SavedTensorCounter(exclude=[model, x]) as counter:
                loss = model(x).square().mean()
        alive[name] = counter.alive_bytes("cuda")
        loss.backward()
        model.zero_grad(set_to_none=True)
    assert alive["offload"] <= 0.1 * alive["none"]
    loss1, grads1 = _step(model, _mlp_loss(x), offload)
    torch.cuda.synchronize()
    assert torch.equal(loss0, loss1)
    for a, b in zip(grads0, grads1, strict=True):
        assert torch.equal(a, b)
    assert offload.stats.prefetched > 0


def test_offload_benchmark_quick_rows_are_exact_and_offload_rows_resident_free() -> None:
    from lowmem.bench.offload import build_parser, run

    args = build_parser().parse_args(["--quick", "--device", "cpu", "--min-bytes", "0"])
    args.preset, args.seq_len, args.batch_size, args.repeats, args.warmup = "micro", 16, 1, 1, 1
    rows = run(args)["rows"]
    tokenwise = ["tokenwise-0.25", "tokenwise-0.5", "tokenwise-0.75"]
    assert set(rows) == {"none", "checkpoint", "offload", "offload-checkpoint", "partial-0.5", *tokenwise}
    assert all(r["exact"] for m, r in rows.items() if m not in tokenwise)
    # Token-wise: the loss is bitwise, weight gradients are summed over tokens in two parts.
    assert all(rows[m]["loss"] == rows["none"]["loss"] and rows[m]["grad_rel_diff"] < 2e-6 for m in tokenwise)
    host = [rows[m]["host_bytes"] for m in tokenwise]
    recompute = [rows[m]["recompute_flops"] for m in tokenwise]
    assert host == sorted(host) and host[0] < host[-1]  # more tokens offloaded, more host bytes...
    assert recompute == sorted(recompute, reverse=True) and recompute[-1] > 0  # ...less recompute
    assert rows["none"]["recompute_flops"] == rows["offload"]["recompute_flops"] == 0
    assert rows["checkpoint"]["resident_bytes"] < rows["none"]["resident_bytes"]
    assert rows["offload"]["saved_bytes"] == rows["none"]["saved_bytes"] > 0  # the counter saw it all
    for mode in ("offload", "offload-checkpoint", "partial-0.5", *tokenwise):
        assert rows[mode]["resident_ratio"] <= 0.1
        assert rows[mode]["copied_bytes"] > 0
