"""Layer-wise stepping (``layerwise=True``): updates inside backward, accumulation, clipping, data
parallel, and the gradient-memory bound. The optimizer-independent tests run over every case in
contract.OPTIMIZERS whose optimizer takes the layer-wise keywords (its constructor calls
``LowRankOptimizer._init_layerwise``), so a new optimizer gets them by joining the registry."""

from __future__ import annotations

import copy
import gc
import itertools
import math
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from contract import (
    OPTIMIZERS,
    OptimizerCase,
    assert_same,
    clone_params,
    make_params,
    save_load,
)
from torch import Tensor

from lowmem.optim import GaLoreAdamW


def _offers_layerwise(case: OptimizerCase) -> bool:
    try:
        case.make([torch.nn.Parameter(torch.zeros(3, 3))], layerwise=True)
    except TypeError:  # a constructor without the keywords
        return False
    return True


LAYERWISE_CASES = [case for case in OPTIMIZERS if _offers_layerwise(case)]
all_cases = pytest.mark.parametrize("case", LAYERWISE_CASES, ids=lambda c: c.id)


def test_every_optimizer_offers_layerwise() -> None:
    """``layerwise=True`` is on every lowmem optimizer: the probe above must drop no case."""
    assert [case.id for case in LAYERWISE_CASES] == [case.id for case in OPTIMIZERS]


HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}

Params = dict[str, torch.nn.Parameter]


# ------------------------------------------------------------------------------ a tiny model


def batch(step: int, micro: int, size: int = 4) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7919 * step + micro)
    return (
        torch.randn(size, 6, generator=gen, dtype=torch.float64),
        torch.randn(size, 5, generator=gen, dtype=torch.float64),
    )


def loss_of(p: Params, x: Tensor, y: Tensor, use: frozenset[str] | None = None) -> Tensor:
    """A loss touching contract.make_params' tall (10×6), wide (5×9), bias (6) and norm (9);
    parameters left out of ``use`` get no gradient (their identity stands in for them)."""
    use = use if use is not None else frozenset(p)
    h = x + p["bias"] if "bias" in use else x
    h = torch.tanh(h @ p["tall"].T)[:, :9]  # (B, 9)
    h = h * p["norm"] if "norm" in use else h
    out = h @ p["wide"].T if "wide" in use else h[:, :5]
    return ((out - y) ** 2).mean()


def train(
    opt: torch.optim.Optimizer,
    params: Params,
    steps: range,
    micro_batches: int = 1,
    *,
    sched: Any = None,
    uses: Callable[[int, int], frozenset[str] | None] = lambda step, micro: None,
    after_backward: Callable[[int, int], None] = lambda step, micro: None,
) -> None:
    """The ordinary accumulation loop, the same with and without ``layerwise``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rank >= min")
        for step in steps:
            for micro in range(micro_batches):
                loss_of(params, *batch(step, micro), uses(step, micro)).backward()
                after_backward(step, micro)
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad()


def pair(
    case: OptimizerCase, **layerwise: Any
) -> tuple[Params, torch.optim.Optimizer, Params, torch.optim.Optimizer]:
    """(params, ordinary optimizer, params, layer-wise optimizer) from the same initial values."""
    matrices, others = make_params()
    ref = {**matrices, **others}
    lw = clone_params(ref)
    ref_opt = case.make([ref[k] for k in matrices], [ref[k] for k in others], **HYPER)
    lw_opt = case.make(
        [lw[k] for k in matrices], [lw[k] for k in others], layerwise=True, **layerwise, **HYPER
    )
    return ref, ref_opt, lw, lw_opt


def assert_equal_runs(ref: Params, ref_opt: Any, lw: Params, lw_opt: Any, exact: bool = True) -> None:
    for name, p in ref.items():
        assert lw[name].grad is None, name  # consumed by the hook
        if exact:
            assert torch.equal(p, lw[name]), name
            assert_same(ref_opt.state[p], lw_opt.state[lw[name]], name)
        else:
            torch.testing.assert_close(lw[name], p, rtol=0, atol=1e-12, msg=name)
            for key, value in ref_opt.state[p].items():
                torch.testing.assert_close(lw_opt.state[lw[name]][key], value, rtol=1e-9, atol=1e-12, msg=key)


# ------------------------------------------------------------------------------ trajectories


@all_cases
def test_layerwise_equals_step_bitwise(case: OptimizerCase) -> None:
    """7 updates (refreshes at 1, 4, 7): the update inside backward is the update of step()."""
    ref, ref_opt, lw, lw_opt = pair(case)
    moved = {k: p.detach().clone() for k, p in lw.items()}
    seen_during_backward = []

    def check(step: int, micro: int) -> None:  # updated by the time backward returns
        seen_during_backward.append(all(not torch.equal(lw[k], moved[k]) for k in lw))
        moved.update({k: p.detach().clone() for k, p in lw.items()})

    train(ref_opt, ref, range(1, 8))
    train(lw_opt, lw, range(1, 8), after_backward=check)
    assert all(seen_during_backward)
    assert_equal_runs(ref, ref_opt, lw, lw_opt)


@all_cases
def test_accumulation_equals_step_on_summed_gradients(case: OptimizerCase) -> None:
    """accumulation_steps=3 == 3 backward passes, then step(): the SUM of the micro-batch
    gradients (autograd's accumulation). Full-gradient accumulation is bitwise; low-rank
    accumulation (GaLore between refreshes) equal to rounding: Σ project(G_i) vs project(Σ G_i)."""
    k = 3
    ref, ref_opt, lw, lw_opt = pair(case, accumulation_steps=k)
    train(ref_opt, ref, range(1, 8), k)
    train(lw_opt, lw, range(1, 8), k)
    lowrank = case.lowrank and lw_opt._accumulates_projected_grad()
    assert_equal_runs(ref, ref_opt, lw, lw_opt, exact=not lowrank)


def test_lowrank_accumulation_between_refreshes_only() -> None:
    """GaLore, gap 3: updates 1, 4, 7 refresh (the basis needs the full summed gradient); in
    the windows of updates 2, 3, 5, 6 each micro-batch gradient is projected and freed at once."""
    matrices, others = make_params()
    params = {**matrices, **others}
    opt = GaLoreAdamW(
        [
            {"params": list(matrices.values()), "rank": 2, "update_proj_gap": 3},
            {"params": list(others.values())},
        ],
        layerwise=True,
        accumulation_steps=2,
        **HYPER,
    )
    stepper = opt._layerwise
    seen: dict[int, dict[str, Any]] = {}

    def record(step: int, micro: int) -> None:
        if micro == 0:
            seen[step] = {
                "grads": {k for k, p in params.items() if p.grad is not None},
                "low": {
                    k: tuple(stepper.lowrank_grads[p].shape)
                    for k, p in matrices.items()
                    if p in stepper.lowrank_grads
                },
            }
        else:  # the window is closed: nothing left over
            assert not stepper.lowrank_grads and all(p.grad is None for p in params.values())

    train(opt, params, range(1, 8), 2, after_backward=record)
    for step in (1, 4, 7):
        assert seen[step] == {"grads": set(params), "low": {}}, step
    for step in (2, 3, 5, 6):
        assert seen[step] == {"grads": {"bias", "norm"}, "low": {"tall": (10, 2), "wide": (2, 9)}}, step


@all_cases
def test_params_missing_from_some_micro_batches(case: OptimizerCase) -> None:
    """k=3: "wide" gets no gradient in the window's last micro-batch (updated when that backward
    ends), "norm" only in the last one, "bias" never in updates 2-3 (skipped, like grad=None)."""

    def uses(step: int, micro: int) -> frozenset[str]:
        names = {"tall", "wide", "norm", "bias"}
        if micro == 2:
            names.discard("wide")
        else:
            names.discard("norm")
        if step in (2, 3):
            names.discard("bias")
        return frozenset(names)

    ref, ref_opt, lw, lw_opt = pair(case, accumulation_steps=3)
    train(ref_opt, ref, range(1, 6), 3, uses=uses)
    train(lw_opt, lw, range(1, 6), 3, uses=uses)
    assert_equal_runs(
        ref, ref_opt, lw, lw_opt, exact=not (case.lowrank and lw_opt._accumulates_projected_grad())
    )
    assert int(lw_opt.state[lw["bias"]]["step"]) == 3  # skipped in updates 2 and 3


# ------------------------------------------------------------------------------ optimizer API


@all_cases
def test_lr_scheduler_applies(case: OptimizerCase) -> None:
    """The hook reads the group's current lr: a LambdaLR schedule gives step()'s trajectory."""
    factors = [1.0, 0.5, 0.0, 2.0, 0.25]
    ref, ref_opt, lw, lw_opt = pair(case)
    const = clone_params(ref)
    const_opt = case.make(
        [const["tall"], const["wide"]], [const["bias"], const["norm"]], layerwise=True, **HYPER
    )
    for opt, params in ((ref_opt, ref), (lw_opt, lw)):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factors[min(s, len(factors) - 1)])
        train(opt, params, range(1, 6), sched=sched)
    train(const_opt, const, range(1, 6))
    assert_equal_runs(ref, ref_opt, lw, lw_opt)
    assert not torch.equal(const["tall"], lw["tall"])  # the schedule mattered


@all_cases
@pytest.mark.parametrize("k", [1, 2])
def test_state_dict_round_trip_continues_bit_for_bit(case: OptimizerCase, k: int) -> None:
    """Save after update 3, load (weights_only=True) into a fresh layer-wise optimizer, continue
    across the refresh at update 4: identical to the uninterrupted run."""
    _, _, lw, lw_opt = pair(case, accumulation_steps=k)
    train(lw_opt, lw, range(1, 4), k)
    saved = save_load(lw_opt.state_dict())
    resumed = clone_params(lw)
    resumed_opt = case.make(
        [resumed["tall"], resumed["wide"]],
        [resumed["bias"], resumed["norm"]],
        layerwise=True,
        accumulation_steps=k,
        **HYPER,
    )
    resumed_opt.load_state_dict(saved)
    train(lw_opt, lw, range(4, 8), k)
    train(resumed_opt, resumed, range(4, 8), k)
    for name, p in lw.items():
        assert torch.equal(p, resumed[name]), name
        assert_same(lw_opt.state[p], resumed_opt.state[resumed[name]], name)
        assert all(isinstance(v, Tensor) for v in lw_opt.state[p].values())


@all_cases
def test_step_never_updates_twice(case: OptimizerCase) -> None:
    ref, ref_opt, lw, lw_opt = pair(case)

    def closure_for(params: Params, opt: torch.optim.Optimizer) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            opt.zero_grad()
            loss = loss_of(params, *batch(1, 0))
            loss.backward()
            return loss

        return closure

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rank >= min")
        expected = ref_opt.step(closure_for(ref, ref_opt))
        returned = lw_opt.step(closure_for(lw, lw_opt))  # the closure's backward updates, once
        assert torch.equal(returned, expected)
        after = {k: p.detach().clone() for k, p in lw.items()}
        for _ in range(3):
            lw_opt.step()
            lw_opt.zero_grad()
        loss_of(lw, *batch(2, 0)).backward()
        lw_opt.step()
        lw_opt.step()
        ref_opt.zero_grad()
        loss_of(ref, *batch(2, 0)).backward()
        ref_opt.step()
    assert any(not torch.equal(lw[k], after[k]) for k in lw)
    assert_equal_runs(ref, ref_opt, lw, lw_opt)


@all_cases
def test_frozen_params_are_ignored(case: OptimizerCase) -> None:
    matrices, others = make_params()
    frozen = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64), requires_grad=False)
    opt = case.make([*matrices.values(), frozen], list(others.values()), layerwise=True, **HYPER)
    before = frozen.detach().clone()
    train(opt, {**matrices, **others}, range(1, 3))
    assert frozen._post_accumulate_grad_hooks is None  # no hook registered
    assert torch.equal(frozen, before) and frozen not in opt.state and frozen.grad is None
    assert all(p in opt.state for p in [*matrices.values(), *others.values()])


@all_cases
def test_add_param_group_is_hooked(case: OptimizerCase) -> None:
    """A parameter that joins through add_param_group is updated inside backward too."""
    matrices, others = make_params()
    ref = {**matrices, **others}
    lw = clone_params(ref)
    opts = []
    for params, extra in ((ref, {}), (lw, {"layerwise": True})):
        opt = case.make([params["tall"], params["wide"]], [params["bias"]], **extra, **HYPER)
        assert params["norm"]._post_accumulate_grad_hooks is None
        opt.add_param_group({"params": [params["norm"]], "lr": 0.03})
        train(opt, params, range(1, 4))
        opts.append(opt)
    assert_equal_runs(ref, opts[0], lw, opts[1])


def test_zero_grad_discards_the_accumulated_gradients() -> None:
    """zero_grad() inside a window drops .grad and the low-rank accumulators alike, as in an
    ordinary loop; the micro-batch count goes on (it is the loop's i, not the gradients')."""
    matrices, others = make_params()
    ref, lw = {**matrices, **others}, clone_params({**matrices, **others})
    opts = [
        GaLoreAdamW(
            [
                {"params": [p["tall"], p["wide"]], "rank": 2, "update_proj_gap": 3},
                {"params": [p["bias"], p["norm"]]},
            ],
            **HYPER,
            **extra,
        )
        for p, extra in ((ref, {}), (lw, {"layerwise": True, "accumulation_steps": 2}))
    ]
    for step in range(1, 5):  # update 1 refreshes; 2-4: the dropped micro-batch was low-rank
        for opt, params in zip(opts, (ref, lw), strict=True):
            loss_of(params, *batch(step, 0)).backward()
            opt.zero_grad()  # discard micro-batch 0
            loss_of(params, *batch(step, 1)).backward()
            opt.step()
            opt.zero_grad()
        assert not opts[1]._layerwise.lowrank_grads
    for name, p in ref.items():  # only full micro-batch-1 gradients reached an update: bitwise
        assert torch.equal(lw[name], p), name


def test_step_warns_about_gradients_no_hook_consumed() -> None:
    matrices, _ = make_params()
    opt = GaLoreAdamW(list(matrices.values()), layerwise=True, **HYPER)
    before = {k: p.detach().clone() for k, p in matrices.items()}
    matrices["tall"].grad = torch.ones(10, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"params\[0\] of param group 0.*not applied"):
        opt.step()
    assert all(torch.equal(p, before[k]) for k, p in matrices.items()) and not opt.state


def test_copies_keep_layerwise_and_hook_their_own_params() -> None:
    matrices, others = make_params()
    params = {**matrices, **others}
    opt = GaLoreAdamW(list(params.values()), layerwise=True, max_grad_norm_per_param=0.5, **HYPER)
    train(opt, params, range(1, 2))
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied._layerwise_options == opt._layerwise_options and copied._layerwise is not opt._layerwise
        copied_params = [p for g in copied.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in copied_params]
        sum((p**2).sum() for p in copied_params).backward()  # updates the copy's params in backward
        assert all(
            not torch.equal(p, b) and p.grad is None for p, b in zip(copied_params, before, strict=True)
        )
    assert all(p.grad is None for p in params.values())


def test_hooks_go_with_the_optimizer() -> None:
    matrices, _ = make_params()
    opt = GaLoreAdamW(list(matrices.values()), layerwise=True, **HYPER)
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in matrices.values())
    del opt
    gc.collect()
    assert all(not p._post_accumulate_grad_hooks for p in matrices.values())
    before = {k: p.detach().clone() for k, p in matrices.items()}
    sum((p**2).sum() for p in matrices.values()).backward()
    assert all(torch.equal(p, before[k]) and p.grad is not None for k, p in matrices.items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layerwise": 1}, "Invalid layerwise: 1"),
        ({"layerwise": True, "accumulation_steps": 0}, "Invalid accumulation_steps: 0"),
        ({"layerwise": True, "accumulation_steps": 2.0}, "Invalid accumulation_steps: 2.0"),
        ({"layerwise": True, "accumulation_steps": True}, "Invalid accumulation_steps: True"),
        ({"accumulation_steps": 4}, "Invalid accumulation_steps: 4; it needs layerwise=True"),
        ({"max_grad_norm_per_param": 0.0}, "Invalid max_grad_norm_per_param: 0.0"),
        ({"max_grad_norm_per_param": -1.0}, "Invalid max_grad_norm_per_param: -1.0"),
        ({"max_grad_norm_per_param": math.inf}, "Invalid max_grad_norm_per_param: inf"),
        ({"max_grad_norm_per_param": math.nan}, "Invalid max_grad_norm_per_param: nan"),
        ({"process_group": object()}, "Invalid process_group: it needs layerwise=True"),
    ],
)
def test_invalid_options_raise(kwargs: dict[str, Any], message: str) -> None:
    matrices, _ = make_params()
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW(list(matrices.values()), **kwargs)
    assert all(p._post_accumulate_grad_hooks is None for p in matrices.values())


# ------------------------------------------------------------------------------ clipping


@all_cases
def test_per_param_clipping_is_clip_grad_norm_of_each_param(case: OptimizerCase) -> None:
    """max_grad_norm_per_param=c == clip_grad_norm_([p], c) for every p, then step(), bitwise;
    c sits between the gradient norms, so some are clipped and some are not."""
    c = 3.0
    matrices, others = make_params()
    clipped = {**matrices, **others}
    manual = clone_params(clipped)
    opt = case.make(list(matrices.values()), list(others.values()), max_grad_norm_per_param=c, **HYPER)
    manual_opt = case.make([manual["tall"], manual["wide"]], [manual["bias"], manual["norm"]], **HYPER)
    norms = []

    def clip_each(step: int, micro: int) -> None:
        for p in manual.values():
            norms.append(float(torch.nn.utils.clip_grad_norm_([p], c, foreach=False)))

    train(opt, clipped, range(1, 5))
    train(manual_opt, manual, range(1, 5), after_backward=clip_each)
    assert min(norms) < c < max(norms)
    for name, p in clipped.items():
        assert torch.equal(p, manual[name]), name


@all_cases
@pytest.mark.parametrize("k", [1, 2])
def test_per_param_clipping_layerwise_equals_step(case: OptimizerCase, k: int) -> None:
    """Clipping needs the norm of the whole summed gradient, so with it every window
    accumulates full gradients: bitwise step()'s result for every optimizer."""
    matrices, others = make_params()
    ref = {**matrices, **others}
    lw = clone_params(ref)
    kw = {"max_grad_norm_per_param": 3.0, **HYPER}
    ref_opt = case.make([ref["tall"], ref["wide"]], [ref["bias"], ref["norm"]], **kw)
    lw_opt = case.make(
        [lw["tall"], lw["wide"]], [lw["bias"], lw["norm"]], layerwise=True, accumulation_steps=k, **kw
    )
    train(ref_opt, ref, range(1, 6), k)
    train(lw_opt, lw, range(1, 6), k)
    assert_equal_runs(ref, ref_opt, lw, lw_opt)


# ------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant: bool) -> None:
    """Recomputation inside backward (nested graph tasks when reentrant) is one micro-batch."""
    from torch.utils.checkpoint import checkpoint

    def loss_ckpt(p: Params, x: Tensor, y: Tensor) -> Tensor:
        h = checkpoint(
            lambda t: torch.tanh((t + p["bias"]) @ p["tall"].T)[:, :9], x, use_reentrant=use_reentrant
        )
        return (((h * p["norm"]) @ p["wide"].T - y) ** 2).mean()

    matrices, others = make_params()
    ref, lw = {**matrices, **others}, clone_params({**matrices, **others})
    opts = []
    for p, extra in ((ref, {}), (lw, {"layerwise": True, "accumulation_steps": 2})):
        groups = [
            {"params": [p["tall"], p["wide"]], "rank": 2, "update_proj_gap": 3},
            {"params": [p["bias"], p["norm"]]},
        ]
        opts.append(GaLoreAdamW(groups, **HYPER, **extra))
    for step in range(1, 5):
        for opt, params in zip(opts, (ref, lw), strict=True):
            for micro in range(2):
                x, y = batch(step, micro)
                loss_ckpt(params, x.requires_grad_(use_reentrant), y).backward()
            opt.step()
            opt.zero_grad()
    for name, p in ref.items():
        torch.testing.assert_close(lw[name], p, rtol=0, atol=1e-12, msg=name)


def _reentrant_model() -> Params:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (6, 6), "b": (8, 6), "c": (5, 8)}
    return {
        k: torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for k, s in shapes.items()
    }


def _reentrant_loss(p: Params, x: Tensor, shared: bool) -> Tensor:
    """``a`` before a reentrant checkpointed segment holding ``b`` and ``c``: the first gradients
    of a backward arrive in the segment's nested graph task; ``shared`` also uses ``b`` outside."""
    from torch.utils.checkpoint import checkpoint

    out = checkpoint(lambda h: torch.tanh(h @ p["b"].T) @ p["c"].T, x @ p["a"].T, use_reentrant=True)
    if shared:
        out = out + (x @ p["b"].T)[:, :5]
    return out.square().mean()


@pytest.mark.parametrize(
    ("k", "shared", "error"),
    [(1, False, None), (2, False, "use_reentrant=False"), (1, True, "arrived twice")],
)
def test_reentrant_checkpointing_first_in_the_segment(k: int, shared: bool, error: str | None) -> None:
    """Without accumulation the update order does not matter: it works. With it, the window would
    close when the nested task ends, before ``a``'s gradient: that raises at the first backward,
    before any update. A parameter whose gradient comes in two parts cannot be updated from the
    first: that raises too."""
    ref, lw = _reentrant_model(), _reentrant_model()
    ref_opt = GaLoreAdamW(list(ref.values()), **HYPER)
    lw_opt = GaLoreAdamW(list(lw.values()), layerwise=True, accumulation_steps=k, **HYPER)
    before = {n: p.detach().clone() for n, p in lw.items()}
    for step in range(3):
        for opt, params in ((ref_opt, ref), (lw_opt, lw)):
            for micro in range(k):
                x = batch(step, micro)[0]
                if error is not None and opt is lw_opt:
                    with pytest.raises(RuntimeError, match=error):
                        _reentrant_loss(params, x, shared).backward()
                    if k > 1:
                        assert all(torch.equal(p, before[n]) for n, p in lw.items())
                    return
                _reentrant_loss(params, x, shared).backward()
            opt.step()
            opt.zero_grad()
    for name, p in ref.items():
        assert torch.equal(p, lw[name]), name


@all_cases
@pytest.mark.parametrize("poisoned", ["tall", "bias"])
def test_nan_gradient_stays_in_its_parameter(case: OptimizerCase, poisoned: str) -> None:
    """A NaN in one micro-batch gradient (update 2: low-rank accumulation for GaLore; update 4:
    a refresh window) reaches only its own parameter. The loss is a sum of one term per
    parameter, so a NaN parameter cannot reach the others through the forward pass."""

    def run(poison: bool) -> tuple[Params, torch.optim.Optimizer]:
        matrices, others = make_params()
        params = {**matrices, **others}
        opt = case.make(
            list(matrices.values()), list(others.values()), layerwise=True, accumulation_steps=2, **HYPER
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rank >= min")
            for step in range(1, 6):
                for micro in range(2):
                    gen = torch.Generator().manual_seed(31 * step + micro)
                    terms = {
                        k: (torch.tanh(p) * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum()
                        for k, p in params.items()
                    }
                    if poison and micro == 0 and step in (2, 4):
                        terms[poisoned] = terms[poisoned] * math.nan
                    sum(terms.values()).backward()
                opt.step()
                opt.zero_grad()
        return params, opt

    (clean, clean_opt), (dirty, dirty_opt) = run(False), run(True)
    assert not torch.isfinite(dirty[poisoned]).all()
    for name, p in clean.items():
        if name != poisoned:
            assert torch.equal(p, dirty[name]), name
            assert_same(clean_opt.state[p], dirty_opt.state[dirty[name]], name)


def test_full_rank_warning_in_layerwise_mode() -> None:
    matrices, _ = make_params()
    opt = GaLoreAdamW([{"params": [matrices["tall"]], "rank": 6}], layerwise=True, **HYPER)  # 6 >= min(10, 6)
    assert opt._layerwise is not None
    with pytest.warns(UserWarning, match=r"rank >= min\(m, n\) for params\[0\] of param group 0 \(10, 6\)"):
        (matrices["tall"] ** 2).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (matrices["tall"] ** 2).sum().backward()  # once: the state exists now


def test_state_dict_inside_an_accumulation_window_warns() -> None:
    matrices, others = make_params()
    params = {**matrices, **others}
    opt = GaLoreAdamW(list(params.values()), layerwise=True, accumulation_steps=2, **HYPER)
    loss_of(params, *batch(1, 0)).backward()
    with pytest.warns(UserWarning, match="inside an accumulation window"):
        opt.state_dict()
    loss_of(params, *batch(1, 1)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.state_dict()


def test_bf16_layerwise_accumulation_trains_like_step() -> None:
    """bf16 weights; the low-rank accumulators are bf16 (the gradients' dtype, as .grad is)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=gen)
    y = x @ (torch.randn(12, 2, generator=gen) @ torch.randn(2, 8, generator=gen))
    losses = {}
    for layerwise in (False, True):
        weight = torch.nn.Parameter(torch.zeros(8, 12, dtype=torch.bfloat16))
        extra = {"layerwise": True, "accumulation_steps": 2} if layerwise else {}
        opt = GaLoreAdamW(
            [{"params": [weight], "rank": 2, "update_proj_gap": 5}], lr=0.1, weight_decay=0.0, **extra
        )

        def loss(rows: slice, weight: Tensor = weight) -> Tensor:
            return ((x[rows].bfloat16() @ weight.T).float() - y[rows]).square().mean()

        curve = [loss(slice(None)).item()]
        for _ in range(30):
            loss(slice(0, 32)).backward()
            loss(slice(32, 64)).backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss(slice(None)).item())
        assert weight.dtype == torch.bfloat16 and opt.state[weight]["exp_avg"].dtype == torch.bfloat16
        losses[layerwise] = curve
    assert losses[True][-1] < 0.6 * losses[True][0]
    for step, (ref, lw) in enumerate(zip(losses[False], losses[True], strict=True)):
        assert abs(lw - ref) <= 0.05 * ref, (step, ref, lw)


# ------------------------------------------------------------------------------ data parallel


def test_data_parallel_two_processes_match_one_process(tmp_path: Path) -> None:
    """2 gloo ranks on CPU, each on half of every global batch, layer-wise with process_group:
    both end with identical parameters, equal to one process on the whole batch (step(), no
    layerwise), with and without accumulation (whose low-rank windows reduce R, not G). The same
    under a DistributedDataParallel-wrapped model with register_layerwise_ddp_hook (GaLore with
    and without no_sync accumulation, APOLLO)."""
    from gloo_launch import launch
    from layerwise_ddp_worker import CONFIGS, DDP_CONFIGS
    from layerwise_ddp_worker import train as train_shard

    expected = {name: train_shard(k) for name, k in CONFIGS.items()}
    expected |= {name: train_shard(k, optimizer_cls=cls) for name, (k, cls) in DDP_CONFIGS.items()}
    results = launch(Path(__file__).with_name("layerwise_ddp_worker.py"), tmp_path, timeout=120)
    # Without process_group or the DDP hook, a 2-rank run refuses to update from local gradients.
    assert all(bool(r.pop("refused_local_update")) for r in results)
    for name in [*CONFIGS, *DDP_CONFIGS]:
        for key, value in expected[name].items():
            assert torch.equal(results[0][name][key], results[1][name][key]), (name, key)
            torch.testing.assert_close(results[0][name][key], value, rtol=0, atol=1e-12, msg=f"{name} {key}")


# ------------------------------------------------------------------------------ gradient memory


def grad_memory_peaks(layerwise: bool, k: int) -> dict[str, Any]:
    """Peak bytes of live gradients in each of 4 updates (k backward passes each) of a 4-layer
    MLP stack, GaLore rank 4 with a refresh every 3 updates (updates 1 and 4).

    Live = every ``.grad`` of the model plus the optimizer's low-rank accumulators, counted in
    a post-accumulate-grad hook registered before the optimizer's (so it runs first, the moment
    each gradient exists, before the optimizer frees it).
    """
    torch.manual_seed(0)
    dims = [48, 96, 96, 96, 24]
    model = torch.nn.Sequential(
        *[m for a, b in itertools.pairwise(dims) for m in (torch.nn.Linear(a, b), torch.nn.GELU())]
    )
    params = list(model.parameters())
    live: dict[int, int] = {}
    lowrank: dict[int, int] = {}
    holder: dict[str, Any] = {}

    def measure(_: Tensor) -> None:
        update = holder["update"]
        low = sum(t.nbytes for t in holder["opt"]._layerwise.lowrank_grads.values()) if layerwise else 0
        now = sum(p.grad.nbytes for p in params if p.grad is not None) + low
        live[update] = max(live.get(update, 0), now)
        lowrank[update] = max(lowrank.get(update, 0), low)

    for p in params:
        p.register_post_accumulate_grad_hook(measure)
    weights = [p for p in params if p.dim() == 2]
    holder["opt"] = GaLoreAdamW(
        [
            {"params": weights, "rank": 4, "update_proj_gap": 3},
            {"params": [p for p in params if p.dim() == 1]},
        ],
        lr=1e-3,
        **({"layerwise": True, "accumulation_steps": k} if layerwise else {}),
    )
    x = torch.randn(8, dims[0])
    for update in range(1, 5):
        holder["update"] = update
        for _ in range(k):
            model(x).square().mean().backward()
        holder["opt"].step()
        holder["opt"].zero_grad()
    return {
        "live": live,
        "lowrank": lowrank,
        "largest": max(p.nbytes for p in params),
        "all": sum(p.nbytes for p in params),
        "biases": sum(p.nbytes for p in params if p.dim() == 1),
        # "std" projects the smaller side: R is r × max(m, n)
        "lowrank_all": sum(4 * max(p.shape) * p.element_size() for p in weights),
    }


def test_gradient_memory_is_one_gradient_at_a_time() -> None:
    """The target: in a layer-wise step the live gradients never exceed the largest one."""
    peaks = grad_memory_peaks(layerwise=True, k=1)
    assert all(low == 0 for low in peaks["lowrank"].values())
    assert max(peaks["live"].values()) <= peaks["largest"], peaks
    ordinary = grad_memory_peaks(layerwise=False, k=1)  # sanity: step() needs them all at once
    assert max(ordinary["live"].values()) == ordinary["all"] > 2 * peaks["largest"], ordinary


def test_gradient_memory_with_lowrank_accumulation() -> None:
    """k=2. Between refreshes (updates 2, 3) the weights accumulate m×r, so the live gradients
    stay within the largest gradient + the low-rank accumulators (+ the biases, a plain group,
    whose full gradients accumulate). A refresh window (updates 1, 4) needs each weight's full
    summed gradient for its new basis, so it holds them all, as step() does."""
    peaks = grad_memory_peaks(layerwise=True, k=2)
    for update in (2, 3):
        assert 0 < peaks["lowrank"][update] <= peaks["lowrank_all"] < peaks["largest"], peaks
        bound = peaks["largest"] + peaks["lowrank"][update] + peaks["biases"]
        assert peaks["live"][update] <= bound, (update, peaks)
    for update in (1, 4):
        assert peaks["lowrank"][update] == 0 and peaks["live"][update] == peaks["all"], peaks
    ordinary = grad_memory_peaks(layerwise=False, k=2)
    assert all(live == ordinary["all"] for live in ordinary["live"].values()), ordinary
    assert ordinary["all"] > 2 * peaks["live"][2], (ordinary, peaks)


def test_register_layerwise_ddp_hook_rejects_what_it_cannot_serve(tmp_path: Path) -> None:
    """Clear errors, naming the argument, for every configuration the DDP comm hook refuses; a
    one-rank gloo group in this process, destroyed afterwards."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lowmem.optim import register_layerwise_ddp_hook

    model = torch.nn.Linear(4, 3)
    with pytest.raises(TypeError, match=r"ddp_model must be a torch\.nn\.parallel\.DistributedDataParallel"):
        register_layerwise_ddp_hook(model, GaLoreAdamW(model.parameters(), layerwise=True))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        with pytest.raises(TypeError, match="optimizer must be a lowmem optimizer"):
            register_layerwise_ddp_hook(ddp, torch.optim.AdamW(model.parameters()))
        with pytest.raises(ValueError, match="without layerwise=True"):
            register_layerwise_ddp_hook(ddp, GaLoreAdamW(model.parameters()))
        with pytest.raises(ValueError, match="Invalid accumulation_steps: 2; under DDP"):
            register_layerwise_ddp_hook(
                ddp, GaLoreAdamW(model.parameters(), layerwise=True, accumulation_steps=2)
            )
        with pytest.raises(ValueError, match="Invalid process_group: DDP already averages"):
            register_layerwise_ddp_hook(
                ddp, GaLoreAdamW(model.parameters(), layerwise=True, process_group=dist.group.WORLD)
            )
        unused = DistributedDataParallel(torch.nn.Linear(4, 3), find_unused_parameters=True)
        with pytest.raises(ValueError, match="find_unused_parameters=True"):
            register_layerwise_ddp_hook(unused, GaLoreAdamW(unused.parameters(), layerwise=True))
        # Accepted: the hook updates in backward, step() then changes nothing and does not warn
        # about the averaged gradients DDP writes back to .grad.
        opt = GaLoreAdamW(model.parameters(), lr=0.1, layerwise=True)
        register_layerwise_ddp_hook(ddp, opt)
        before = model.weight.detach().clone()
        ddp(torch.randn(5, 4)).square().sum().backward()
        assert not torch.equal(model.weight, before)
        assert model.weight.grad is not None
        after_backward = model.weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        assert torch.equal(model.weight, after_backward)
    finally:
        dist.destroy_process_group()


def test_close_window_applies_a_short_accumulation_window() -> None:
    """close_window() after 2 of 3 micro-batches updates like step() after those 2 backward passes,
    and the next backward opens a new window (the HF Trainer's short last window of an epoch)."""
    torch.manual_seed(0)
    w0 = torch.randn(12, 10, dtype=torch.float64)
    xs = [torch.randn(4, 10, dtype=torch.float64) for _ in range(3)]

    def loss(w: torch.nn.Parameter, x: Tensor) -> Tensor:
        return (x @ w.T).tanh().square().sum()

    ref = torch.nn.Parameter(w0.clone())
    ref_opt = GaLoreAdamW([{"params": [ref], "rank": 3, "update_proj_gap": 5}], lr=1e-2)
    for x in xs[:2]:
        loss(ref, x).backward()
    ref_opt.step()
    ref_opt.zero_grad()
    loss(ref, xs[2]).backward()  # the next window's first micro-batch: accumulates, no update yet
    lw = torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW(
        [{"params": [lw], "rank": 3, "update_proj_gap": 5}], lr=1e-2, layerwise=True, accumulation_steps=3
    )
    for x in xs[:2]:
        loss(lw, x).backward()
    assert torch.equal(lw.detach(), w0)  # window still open
    opt._layerwise.close_window(opt)
    torch.testing.assert_close(lw.detach(), ref.detach(), rtol=0, atol=1e-12)
    opt._layerwise.close_window(opt)  # nothing open: no-op
    after_first = lw.detach().clone()
    loss(lw, xs[2]).backward()
    assert torch.equal(lw.detach(), after_first)  # position 0 of a new window of 3
    assert opt._layerwise.position == 0


def test_layerwise_hook_accepts_fsdp_shards_only(tmp_path: Path) -> None:
    """The multi-rank guard's DTensor branch (FSDP2 runs the hooks itself, after its reduce-scatter;
    tests/distributed/test_fsdp.py covers 2 ranks): a ``Shard(0)`` gradient is updated from and
    freed, a ``Partial`` one (not reduced) is refused, and so is ``process_group`` (a second
    average). A one-rank gloo group in this process, destroyed afterwards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(0)
        weight, grad = (torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(2))
        groups = {"rank": 2, "proj_type": "right"}

        def backward(grad_placement: Any, **kwargs: Any) -> tuple[torch.nn.Parameter, GaLoreAdamW]:
            """A DTensor parameter whose backward hands the hook ``grad`` with ``grad_placement``."""
            param = torch.nn.Parameter(DTensor.from_local(weight.clone(), mesh, [Shard(0)]))
            opt = GaLoreAdamW([{"params": [param], **groups}], layerwise=True, **kwargs)
            (param.to_local(grad_placements=[grad_placement]) * grad).sum().backward()
            return param, opt

        param, _ = backward(Shard(0))
        assert param.grad is None, "the hook did not free the gradient"
        ref = torch.nn.Parameter(weight.clone())
        ref.grad = grad.clone()
        GaLoreAdamW([{"params": [ref], **groups}]).step()
        torch.testing.assert_close(param.to_local(), ref.detach(), rtol=0, atol=1e-15)

        with pytest.raises(NotImplementedError, match=r"not FSDP2's reduced row shard \(Shard\(0\)\)"):
            backward(Partial())
        with pytest.raises(ValueError, match=r"Invalid process_group: .* already averaged"):
            backward(Shard(0), process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_a_refused_gradient_closes_the_backward_it_interrupts(tmp_path: Path) -> None:
    """A guard refusal in a hook that runs after another parameter's hook opened the backward
    (here a ``Partial`` DTensor gradient, refused by the same guard as a plain parameter's local
    gradient in a multi-rank group) leaves no open backward behind: without ``zero_grad()``, the
    next backward is the window's 2nd micro-batch and updates. A one-rank gloo group in this
    process, destroyed afterwards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(0)
        weight, grad = (torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(2))
        sharded, refused = (
            torch.nn.Parameter(DTensor.from_local(weight.clone(), mesh, [Shard(0)])) for _ in "ab"
        )
        opt = GaLoreAdamW([sharded, refused], lr=0.1, layerwise=True, accumulation_steps=2)
        stepper = opt._layerwise
        # `refused` is used first in forward, so `sharded`'s hook runs first and opens the backward.
        hidden = refused.to_local(grad_placements=[Partial()]) * grad
        loss = (sharded.to_local(grad_placements=[Shard(0)]) * hidden.tanh()).sum()
        with pytest.raises(NotImplementedError, match=r"not FSDP2's reduced row shard"):
            loss.backward()
        assert stepper.position == 0 and sharded.grad is not None  # micro-batch 1 of 2: accumulated
        assert stepper._root is None, "the interrupted backward was left open"
        refused.requires_grad_(False)
        before = sharded.to_local().clone()
        (sharded.to_local(grad_placements=[Shard(0)]) * grad).sum().backward()
        assert not torch.equal(sharded.to_local(), before), "the 2nd micro-batch did not update"
        assert stepper.position == -1 and sharded.grad is None
    finally:
        dist.destroy_process_group()
