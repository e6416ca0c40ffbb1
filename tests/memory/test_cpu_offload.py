"""CPUOffloadOptimizer on a CPU "device": master-copy semantics, every optimizer family, resume, schedulers.

Without a GPU the device params live on the CPU too, so these tests check the bookkeeping
(hooks, version checks, masters, hyperparameter forwarding, state dicts) exactly, bit for bit
against the inner optimizer run directly on fp32 weights. The CUDA streams and pinned buffers
are exercised only on a GPU machine.
"""

from __future__ import annotations

import gc
import io
import threading

import pytest
import torch
from torch import nn

from lowmem.memory import CPUOffloadOptimizer
from lowmem.optim import APOLLO_MINI, AdamW8bit, ApolloAdamW, FiraAdamW, GaLoreAdamW, GaLoreAdamW8bit


def _model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 96x80 matrices: large enough for 8-bit states (>= 4096 elements) and rank-8 projections.
    layers = [nn.Linear(80, 96), nn.Tanh(), nn.Linear(96, 80), nn.Tanh(), nn.Linear(80, 4)]
    return nn.Sequential(*layers).to(dtype)


def _batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 80, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(steps)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    dtype = next(model.parameters()).dtype
    return nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def _groups(model: nn.Module, rank: dict | None) -> list[dict]:
    if rank is None:
        return [{"params": list(model.parameters())}]
    mats = [p for p in model.parameters() if p.dim() == 2 and min(p.shape) > 8]
    rest = [p for p in model.parameters() if all(p is not m for m in mats)]
    return [{"params": mats, **rank}, {"params": rest}]


CASES = {
    "torch-adamw": (torch.optim.AdamW, {"lr": 1e-2, "fused": True}, None),
    "adamw8bit": (AdamW8bit, {"lr": 1e-2}, None),
    "galore-int8": (GaLoreAdamW8bit, {"lr": 1e-2}, {"rank": 8, "update_proj_gap": 2}),
    "galore-bf16-states": (
        GaLoreAdamW,
        {"lr": 1e-2, "state_dtype": "bfloat16"},
        {"rank": 8, "update_proj_gap": 3},
    ),
    "fira": (FiraAdamW, {"lr": 1e-2}, {"rank": 8, "update_proj_gap": 2}),
    "apollo-mini": (ApolloAdamW, {"lr": 1e-2}, APOLLO_MINI),
}


def _run(make_opt, model: nn.Module, batches) -> torch.optim.Optimizer:
    opt = make_opt(model)
    for batch in batches:
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("case", CASES)
def test_fp32_params_match_the_inner_optimizer_bitwise(case: str) -> None:
    cls, kwargs, rank = CASES[case]
    batches = _batches(4)
    ref = _model()
    _run(lambda m: cls(_groups(m, rank), **kwargs), ref, batches)
    ours = _model()
    opt = _run(lambda m: CPUOffloadOptimizer(_groups(m, rank), cls, **kwargs), ours, batches)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(m.dtype == torch.float32 and m.device.type == "cpu" for m in opt.master_params())
    # optimizer.state maps the device params to the host states (8-bit codes where chosen).
    first = next(ours.parameters())
    assert opt.state[first] is opt.inner.state[opt.master_params()[0]]
    if cls is AdamW8bit:  # 96x80 weight: over min_8bit_size, so 8-bit codes
        assert opt.state[first]["exp_avg"].dtype == torch.uint8


def test_bf16_params_with_fp32_master_equal_fp32_adamw_then_cast() -> None:
    """The master keeps fp32 precision: bf16 weights are the fp32 AdamW trajectory, cast each step."""
    batches = _batches(5)
    model = _model(torch.bfloat16)
    master = [nn.Parameter(p.detach().float()) for p in model.parameters()]
    ref = torch.optim.AdamW(master, lr=1e-3, fused=True)
    opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    for batch in batches:
        _loss(model, batch).backward()
        for m, p in zip(master, model.parameters(), strict=True):
            m.grad = p.grad.float()
        ref.step()
        opt.step()
        opt.zero_grad()
        for m, p in zip(master, model.parameters(), strict=True):
            assert p.dtype == torch.bfloat16
            assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
    # lr 1e-3 moves weights by less than bf16's resolution near 1: only the master accumulates them.
    assert not torch.equal(master[0].detach(), master[0].detach().bfloat16().float())


def _save_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("case", ["torch-adamw", "galore-int8", "apollo-mini"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_weights_only_checkpoint_continues_bitwise(case: str, dtype: torch.dtype) -> None:
    cls, kwargs, rank = CASES[case]
    batches = _batches(6)

    def make(model):
        return CPUOffloadOptimizer(_groups(model, rank), cls, **kwargs)

    straight = _model(dtype)
    _run(make, straight, batches)

    first = _model(dtype)
    opt = _run(make, first, batches[:3])
    model_state, opt_state = _save_load(first.state_dict()), _save_load(opt.state_dict())
    if dtype == torch.bfloat16:
        assert len(opt_state["master_params"]) == len(list(first.parameters()))
    else:
        assert opt_state["master_params"] == {}  # fp32 device params are their own master
    resumed = _model(dtype, seed=123)  # different initial weights: everything must come from the checkpoint
    resumed.load_state_dict(model_state)
    opt2 = make(resumed)
    opt2.load_state_dict(opt_state)
    for batch in batches[3:]:
        _loss(resumed, batch).backward()
        opt2.step()
        opt2.zero_grad()
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_scheduler_drives_the_inner_optimizer() -> None:
    batches = _batches(5)
    ref = _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.1)
    ours = _model()
    opt = CPUOffloadOptimizer(ours.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    for batch in batches:
        for model, o, s in ((ref, ref_opt, ref_sched), (ours, opt, sched)):
            _loss(model, batch).backward()
            o.step()
            o.zero_grad()
            s.step()
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    # The 5th step ran after 4 scheduler steps (lr 1e-4), the 3rd after 2 (1e-3): both reached the host.
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(1e-4)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradient_changed_after_its_hook_is_copied_again() -> None:
    """clip_grad_norm_ runs after backward (after the hooks copied): step() must use the clipped gradient."""
    batch = _batches(1)[0]
    ref, ours = _model(), _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    opt = CPUOffloadOptimizer(ours.parameters(), lr=1e-2)
    for model, o in ((ref, ref_opt), (ours, opt)):
        _loss(model, batch).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        assert norm > 1e-2  # the clip really changed the gradients
        o.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradient_accumulation_grad_set_by_hand_and_params_without_grad() -> None:
    batches = _batches(2)
    ref, ours = _model(), _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    opt = CPUOffloadOptimizer(ours.parameters(), lr=1e-2)
    for model, o in ((ref, ref_opt), (ours, opt)):
        for batch in batches:  # two backward passes into the same .grad
            _loss(model, batch).backward()
        last = list(model.parameters())[-1]
        last.grad = torch.full_like(last, 0.5)  # a new tensor: no hook saw it
        next(iter(model.parameters())).grad = None  # no gradient: not updated, no state
        o.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert next(iter(ours.parameters())) not in opt.state


def test_closure_zero_grad_and_step_hooks() -> None:
    model = _model()
    opt = CPUOffloadOptimizer(model.parameters(), lr=1e-2)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    batch = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["post"]
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert all(m.grad is None for m in opt.master_params())


def test_named_params_and_add_param_group() -> None:
    model = _model()
    named = list(model.named_parameters())
    opt = CPUOffloadOptimizer(named[:2], lr=1e-2)
    opt.add_param_group({"params": named[2:], "lr": 1e-3})
    assert opt.inner.param_groups[0]["param_names"] == [n for n, _ in named[:2]]
    assert opt.inner.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["weight_decay"] == 0.01
    _loss(model, _batches(1)[0]).backward()
    opt.step()
    assert len(opt.state) == len(named)


def test_hooks_are_removed_with_the_optimizer() -> None:
    model = _model()
    first = next(model.parameters())
    hooks_before = len(getattr(first, "_post_accumulate_grad_hooks", None) or {})
    opt = CPUOffloadOptimizer(model.parameters(), lr=1e-2)
    assert len(first._post_accumulate_grad_hooks) == hooks_before + 1
    del opt
    gc.collect()
    assert len(first._post_accumulate_grad_hooks or {}) == hooks_before


def test_bad_arguments_raise_clear_errors() -> None:
    model = _model()
    with pytest.raises(TypeError, match=r"optimizer_class must be a torch\.optim\.Optimizer"):
        CPUOffloadOptimizer(model.parameters(), optimizer_class="adamw")
    with pytest.raises(ValueError, match="layerwise=True"):
        CPUOffloadOptimizer(model.parameters(), GaLoreAdamW, layerwise=True)
    with pytest.raises(ValueError, match="master_dtype"):
        CPUOffloadOptimizer(model.parameters(), master_dtype=torch.int32)
    with pytest.raises(TypeError, match="floating-point"):
        CPUOffloadOptimizer([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        CPUOffloadOptimizer(model.parameters(), lr=-1.0)  # the inner optimizer's own check
    embedding = nn.Embedding(10, 4, sparse=True)
    opt = CPUOffloadOptimizer(embedding.parameters())
    with pytest.raises(RuntimeError, match="sparse gradients"):
        embedding(torch.tensor([1, 2])).sum().backward()
    opt = CPUOffloadOptimizer(model.parameters())
    with pytest.raises(ValueError, match=r"CPUOffloadOptimizer\.state_dict"):
        opt.load_state_dict({"state": {}})
    with pytest.raises(TypeError, match="cannot be copied"):
        import copy

        copy.deepcopy(opt)


# ----------------------------------------------------------------- update_in_backward=True
OVERLAP_CASES = {
    **CASES,
    "torch-adamw-foreach": (torch.optim.AdamW, {"lr": 1e-2, "foreach": True}, None),
    "torch-adamw-for-loop": (torch.optim.AdamW, {"lr": 1e-2, "foreach": False}, None),
    # The clipping that still works: per parameter, on the host, just before each update.
    "adamw8bit-clip-per-param": (AdamW8bit, {"lr": 1e-2, "max_grad_norm_per_param": 0.01}, None),
}


def _assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts hold the same keys and bitwise-equal tensors (and equal other values)."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("case", OVERLAP_CASES)
def test_update_in_backward_equals_step_bitwise(case: str) -> None:
    """Updates queued from the hooks give the weights and the state dict of updates in step()."""
    cls, kwargs, rank = OVERLAP_CASES[case]
    batches = _batches(4)
    ref = _model()
    ref_opt = _run(lambda m: CPUOffloadOptimizer(_groups(m, rank), cls, **kwargs), ref, batches)
    ours = _model()
    opt = CPUOffloadOptimizer(_groups(ours, rank), cls, update_in_backward=True, **kwargs)
    for batch in batches:
        _loss(ours, batch).backward()
        assert all(p.grad is None for p in ours.parameters())  # freed on the device once on the host
        opt.step()
        opt.zero_grad()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    # Same format as without overlap, through a weights_only round trip.
    _assert_same_state(_save_load(opt.state_dict()), _save_load(ref_opt.state_dict()))


@pytest.mark.parametrize("case", ["torch-adamw", "adamw8bit"])
def test_update_in_backward_bf16_params_and_resume(case: str) -> None:
    cls, kwargs, rank = CASES[case]
    batches = _batches(6)

    def make(model, overlap):
        return CPUOffloadOptimizer(_groups(model, rank), cls, update_in_backward=overlap, **kwargs)

    straight = _model(torch.bfloat16)
    _run(lambda m: make(m, False), straight, batches)
    first = _model(torch.bfloat16)
    opt = _run(lambda m: make(m, True), first, batches[:3])
    model_state, opt_state = _save_load(first.state_dict()), _save_load(opt.state_dict())
    resumed = _model(torch.bfloat16, seed=123)
    resumed.load_state_dict(model_state)
    opt2 = make(resumed, True)
    opt2.load_state_dict(opt_state)
    for batch in batches[3:]:
        _loss(resumed, batch).backward()
        opt2.step()
        opt2.zero_grad()
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_update_in_backward_reads_the_lr_when_the_gradient_arrives() -> None:
    """Scheduler after step() (the usual order): as without overlap. Between backward and step(): one late."""
    batches = _batches(4)

    def train(overlap: bool, sched_before_step: bool) -> nn.Module:
        model = _model()
        opt = CPUOffloadOptimizer(model.parameters(), lr=1e-2, update_in_backward=overlap)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for batch in batches:
            _loss(model, batch).backward()
            if sched_before_step:
                sched.step()  # torch warns about this order (filtered above)
            opt.step()
            opt.zero_grad()
            if not sched_before_step:
                sched.step()
        return model

    ref, ours = train(False, False), train(True, False)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    # The update ran in backward, before sched.step(): it used the lr of the usual order.
    late = train(True, True)
    for a, b in zip(late.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    # Without overlap that order reaches step() with the new lr: the documented difference.
    assert not torch.equal(next(train(False, True).parameters()), next(ref.parameters()))


def test_update_in_backward_accumulation_steps() -> None:
    """k backward passes per update, as k backward() then step(); a param idle in the last pass is flushed."""
    batches = _batches(4)

    def train(overlap: bool) -> tuple[nn.Module, nn.Parameter]:
        model = _model()
        extra = nn.Parameter(torch.ones(4))  # gets a gradient in the first micro-batch of each window only
        params = [*model.parameters(), extra]
        kwargs = {"update_in_backward": True, "accumulation_steps": 2} if overlap else {}
        opt = CPUOffloadOptimizer(params, lr=1e-2, **kwargs)
        for i, batch in enumerate(batches):
            loss = _loss(model, batch)
            if i % 2 == 0:
                loss = loss + (extra * batch[1][0]).sum()
            loss.backward()
            if overlap:  # first micro-batch: gradients stay on the device; last: consumed by the hooks
                assert all((p.grad is not None) == (i % 2 == 0) for p in params)
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
        return model, extra

    (ref, ref_extra), (ours, extra) = train(False), train(True)
    assert not torch.equal(extra, torch.ones(4))
    for a, b in zip([*ours.parameters(), extra], [*ref.parameters(), ref_extra], strict=True):
        assert torch.equal(a, b)


def test_update_in_backward_overlaps_with_the_rest_of_backward() -> None:
    """The last layer's host update starts on the worker while backward is still before the first layer."""
    update_started = threading.Event()
    threads: list[str] = []

    class SignallingSGD(torch.optim.SGD):
        def step(self, closure=None):
            threads.append(threading.current_thread().name)
            update_started.set()
            return super().step(closure)

    seen_during_backward: list[bool] = []

    class WaitForUpdate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            # Runs after the second layer's gradients reached their hooks, before the first layer's.
            seen_during_backward.append(update_started.wait(timeout=10.0))
            return grad

    first, second = nn.Linear(6, 5), nn.Linear(5, 3)
    opt = CPUOffloadOptimizer(
        [*first.parameters(), *second.parameters()], SignallingSGD, lr=0.1, update_in_backward=True
    )
    second(WaitForUpdate.apply(first(torch.randn(2, 6)))).sum().backward()
    opt.step()
    assert seen_during_backward == [True]
    assert len(threads) == 4 and all(name.startswith("lowmem-offload") for name in threads)


def test_update_in_backward_error_on_the_worker_raises_at_step() -> None:
    class FailsOnBias(torch.optim.SGD):
        def step(self, closure=None):
            if any(p.dim() == 1 and p.numel() == 4 for g in self.param_groups for p in g["params"]):
                raise ValueError("boom")
            return super().step(closure)

    model = _model()
    opt = CPUOffloadOptimizer(model.parameters(), FailsOnBias, lr=0.1, update_in_backward=True)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, _batches(1)[0]).backward()  # the error happens on the worker: backward completes
    with pytest.raises(RuntimeError, match=r"host update of params\[5\] of param group 0 failed: boom"):
        opt.step()
    after = list(model.parameters())
    # The other parameters were updated and copied back; the failing one kept its weights.
    assert all(not torch.equal(a, b) for a, b in zip(after[:5], before[:5], strict=True))
    assert torch.equal(after[5], before[5])
    opt.step()  # the error was reported once; nothing is queued now


def test_update_in_backward_closure_and_unconsumed_gradient_warning() -> None:
    model = _model()
    opt = CPUOffloadOptimizer(model.parameters(), lr=1e-2, update_in_backward=True)
    batch = _batches(1)[0]

    def closure():
        loss = _loss(model, batch)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    assert isinstance(opt.step(closure), torch.Tensor)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    last = list(model.parameters())[-1]
    last.grad = torch.ones_like(last)  # set by hand after backward: no hook consumes it
    kept = last.detach().clone()
    with pytest.warns(UserWarning, match=r"params\[5\] of param group 0 still hold a gradient"):
        opt.step()
    assert torch.equal(last, kept)


def test_update_in_backward_bad_arguments() -> None:
    model = _model()
    with pytest.raises(ValueError, match="Invalid update_in_backward"):
        CPUOffloadOptimizer(model.parameters(), update_in_backward="yes")
    with pytest.raises(ValueError, match="Invalid accumulation_steps: 2; it needs update_in_backward=True"):
        CPUOffloadOptimizer(model.parameters(), accumulation_steps=2)
    with pytest.raises(ValueError, match="Invalid accumulation_steps: 0"):
        CPUOffloadOptimizer(model.parameters(), update_in_backward=True, accumulation_steps=0)


@pytest.mark.parametrize("case", ["torch-adamw", "adamw8bit"])
def test_close_window_applies_a_short_window_as_step_does(case: str) -> None:
    """Windows of 3, 2 and 3 micro-batches with k=3: ``close_window(); step()`` after the short one
    equals ``update_in_backward=False``'s ``step()`` after the same 2 backward passes (the summed
    gradient, not rescaled), bit for bit, and the next backward opens a full window again."""
    cls, kwargs, _ = CASES[case]
    batches = _batches(8)
    windows = [batches[:3], batches[3:5], batches[5:]]

    def train(overlap: bool) -> tuple[list[nn.Parameter], CPUOffloadOptimizer]:
        model = _model()
        extra = nn.Parameter(torch.ones(4))  # a gradient in each window's first micro-batch only
        params = [*model.parameters(), extra]
        window_kwargs = {"update_in_backward": True, "accumulation_steps": 3} if overlap else {}
        opt = CPUOffloadOptimizer(params, cls, **kwargs, **window_kwargs)
        for window in windows:
            for i, batch in enumerate(window):
                loss = _loss(model, batch)
                if i == 0:
                    loss = loss + (extra * batch[1][0]).sum()
                loss.backward()
            if overlap and len(window) < 3:
                # The window is open: the gradients wait on the device, nothing was applied.
                assert all(p.grad is not None for p in params)
                opt.close_window()
                assert all(p.grad is None for p in params)  # consumed (copied to the host, freed)
                opt.close_window()  # nothing open now: no-op
            opt.step()
            opt.zero_grad()
        return params, opt

    (ref, ref_opt), (ours, opt) = train(False), train(True)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
    _assert_same_state(_save_load(opt.state_dict()), _save_load(ref_opt.state_dict()))


def test_close_window_without_update_in_backward_changes_nothing() -> None:
    model = _model()
    opt = CPUOffloadOptimizer(model.parameters(), lr=1e-2)
    _loss(model, _batches(1)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.close_window()  # step() applies every gradient: there is no window to close
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("overlap", [False, True])
def test_parameters_moved_after_construction_are_refused(overlap: bool) -> None:
    """``model.to(...)`` after building the optimizer keeps the Parameter objects but not the device
    and dtype their host buffers were set up for: the hooks leave them alone, and step() (and
    close_window()) raise, naming the param and the fix."""
    batch = _batches(1)[0]
    model = _model()
    opt = CPUOffloadOptimizer(model.parameters(), lr=1e-2, update_in_backward=overlap)
    masters = [m.clone() for m in opt.master_params()]
    model.to(torch.float64)  # same Parameters, hooks still on them
    _loss(model, batch).backward()
    # Nothing copied into the float32 buffers, nothing queued: the gradients stay, the masters too.
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(opt.master_params(), masters, strict=True))
    moved = (
        r"params\[0\] of param group 0 changed after the optimizer was built \(dtype torch\.float32 -> "
        r"torch\.float64; model\.to\(\.\.\.\) after CPUOffloadOptimizer"
    )
    with pytest.raises(RuntimeError, match=moved):
        opt.close_window()
    with pytest.raises(RuntimeError, match=moved):
        opt.step()

    # A device move, caught at step(). On a CPU-only machine: to "meta", through swap_tensors (the
    # only way that keeps the Parameter objects there; it drops their hooks, so only step() sees it).
    model = _model()
    opt = CPUOffloadOptimizer(model.parameters(), lr=1e-2, update_in_backward=overlap)
    _loss(model, batch).backward()
    opt.zero_grad()  # swap_tensors refuses a gradient the optimizer holds a weak reference to
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    with pytest.raises(
        RuntimeError,
        match=r"params\[0\] of param group 0 changed .*\(device cpu -> meta; "
        r".*build the optimizer after moving or casting the model",
    ):
        opt.step()


@pytest.mark.parametrize(
    ("built", "cast"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["bf16-to-fp32", "fp32-to-bf16"],
)
def test_state_of_a_cast_model_loads_into_a_new_optimizer(built: torch.dtype, cast: torch.dtype) -> None:
    """The fix the error names: a model cast after building the optimizer keeps its fp32 masters through
    state_dict() into an optimizer built after the cast (the old one, still alive, stays out of its way)."""
    model = _model(built)
    opt = CPUOffloadOptimizer(model.parameters(), lr=1e-2)
    _run(lambda m: opt, model, _batches(2))
    masters = [m.clone() for m in opt.master_params()]
    model.to(cast)
    with pytest.raises(RuntimeError, match=rf"dtype {built} -> {cast}"):
        opt.step()
    # The weights hold bf16 values: a master read from them would lose the low bits.
    assert any(not torch.equal(m, p) for m, p in zip(masters, model.parameters(), strict=True))
    state = _save_load(opt.state_dict())
    rebuilt = CPUOffloadOptimizer(model.parameters(), lr=1e-2)
    rebuilt.load_state_dict(state)
    for a, b in zip(rebuilt.master_params(), masters, strict=True):
        assert torch.equal(a, b)
    _loss(model, _batches(1)[0]).backward()
    rebuilt.step()  # trains on
