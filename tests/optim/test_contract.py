"""The optimizer contract, run over every case in contract.OPTIMIZERS (see contract.py)."""

from __future__ import annotations

import copy
import itertools
import math
import pickle
import warnings

import pytest
import torch
from contract import (
    ADAM_OPTIMIZERS,
    LOWRANK_OPTIMIZERS,
    OPTIMIZERS,
    OptimizerCase,
    assert_same,
    clone_params,
    grad_for,
    make_params,
    save_load,
    set_grads,
    state_of,
)

all_cases = pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.id)
lowrank_only = pytest.mark.parametrize("case", LOWRANK_OPTIMIZERS, ids=lambda c: c.id)
# Tests that compare plain groups with torch.optim.AdamW or read Adam's state keys.
adam_family = pytest.mark.parametrize("case", ADAM_OPTIMIZERS, ids=lambda c: c.id)
adam_lowrank = pytest.mark.parametrize("case", [c for c in ADAM_OPTIMIZERS if c.lowrank], ids=lambda c: c.id)
lr_linear = pytest.mark.parametrize("case", [c for c in OPTIMIZERS if c.lr_linear], ids=lambda c: c.id)

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
HYPER_VARIANTS = [
    pytest.param({}, id="wd0.1"),
    pytest.param({"weight_decay": 0.0}, id="wd0"),
    pytest.param({"maximize": True, "weight_decay": 0.05}, id="maximize"),
]


def build(case: OptimizerCase, matrices: dict, others: dict, **hyper):
    return case.make(list(matrices.values()), list(others.values()), **{**HYPER, **hyper})


def quiet_step(opt: torch.optim.Optimizer, closure=None):
    """Step, ignoring the (tested elsewhere) rank >= min(m, n) warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rank >= min")
        return opt.step(closure)


# ------------------------------------------------------------------------------ trajectory


@adam_family
@pytest.mark.parametrize("extra", HYPER_VARIANTS)
def test_trajectory_matches_reference(case: OptimizerCase, extra: dict) -> None:
    """7 steps (refreshes at 1, 4, 7): matrices vs the case's reference; others vs AdamW bitwise."""
    hyper = {**HYPER, **extra}
    matrices, others = make_params()
    refs = {k: case.reference(p, hyper) for k, p in matrices.items()}
    plain = {k: torch.nn.Parameter(p.detach().clone()) for k, p in others.items()}
    adamw = torch.optim.AdamW(list(plain.values()), foreach=False, fused=False, **hyper)
    opt = build(case, matrices, others, **extra)
    for step in range(1, 8):
        set_grads(matrices, step)
        set_grads(others, step)
        set_grads(plain, step)
        quiet_step(opt)
        adamw.step()
        for name, p in matrices.items():
            expected = refs[name].step(grad_for(name, tuple(p.shape), step, p.dtype))
            if case.lowrank:
                torch.testing.assert_close(
                    p.detach(), expected, rtol=0, atol=1e-10, msg=f"{name} step {step}"
                )
            else:
                assert torch.equal(p.detach(), expected), f"{name} step {step}"
        for name, p in others.items():
            assert torch.equal(p, plain[name]), f"{name} step {step}"
            assert torch.equal(opt.state[p]["exp_avg"], adamw.state[plain[name]]["exp_avg"])
            assert torch.equal(opt.state[p]["exp_avg_sq"], adamw.state[plain[name]]["exp_avg_sq"])


@all_cases
def test_trajectory_moves_the_weights(case: OptimizerCase) -> None:
    """Guards the reference test against a vacuous pass: weights move by about lr per step."""
    matrices, others = make_params()
    before = {k: p.detach().clone() for k, p in matrices.items()}
    opt = build(case, matrices, others)
    for step in range(1, 4):
        set_grads(matrices, step)
        quiet_step(opt)
    for name, p in matrices.items():
        change = (p.detach() - before[name]).abs().max().item()
        assert 1e-4 < change < 1.0, (name, change)


# ------------------------------------------------------------------------------ state_dict


@all_cases
@pytest.mark.parametrize("save_at", [2, 3, 4])
def test_state_dict_round_trip_resumes_bit_for_bit(case: OptimizerCase, save_at: int) -> None:
    """Save at step 2, 3 or 4 (refresh at 4 with gap 3), load into a fresh optimizer, continue."""
    total = 8
    matrices, others = make_params(torch.float32)
    opt = build(case, matrices, others)
    for step in range(1, save_at + 1):
        set_grads(matrices, step)
        set_grads(others, step)
        quiet_step(opt)
    saved = save_load(opt.state_dict())
    resumed_m, resumed_o = clone_params(matrices), clone_params(others)
    resumed = build(case, resumed_m, resumed_o)
    resumed.load_state_dict(saved)
    # The loaded state is the saved state exactly: same dtypes (refresh counters stay int64).
    for name in matrices.keys() | others.keys():
        src = matrices.get(name, others.get(name))
        dst = resumed_m.get(name, resumed_o.get(name))
        assert_same(opt.state[src], resumed.state[dst], name)
    for step in range(save_at + 1, total + 1):
        for params in (matrices, others, resumed_m, resumed_o):
            set_grads(params, step)
        quiet_step(opt)
        quiet_step(resumed)
    for name, p in {**matrices, **others}.items():
        q = {**resumed_m, **resumed_o}[name]
        assert torch.equal(p, q), name
        assert_same(opt.state[p], resumed.state[q], name)
    assert_same(opt.state_dict()["param_groups"], resumed.state_dict()["param_groups"])


@all_cases
def test_state_dict_keys_and_refresh_counters_in_low_precision(case: OptimizerCase) -> None:
    """A bf16 model's state_dict round-trips without rounding step or refresh counters."""
    matrices, others = make_params(torch.bfloat16)
    opt = build(case, matrices, others)
    set_grads(matrices, 1)
    quiet_step(opt)
    for state in opt.state.values():  # as if 1001 steps had run (bf16 cannot hold 1001)
        state["step"].fill_(1001)
        if "last_refresh" in state:
            state["last_refresh"].fill_(1001)
    resumed_m = clone_params(matrices)
    resumed = build(case, resumed_m, clone_params(others))
    resumed.load_state_dict(save_load(opt.state_dict()))
    for name, p in matrices.items():
        assert_same(opt.state[p], resumed.state[resumed_m[name]], name)


# ------------------------------------------------------------------------------ param groups


@adam_family
def test_add_param_group_gets_defaults(case: OptimizerCase) -> None:
    matrices, _ = make_params()
    opt = build(case, matrices, {}, lr=0.03, maximize=True)
    extra = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt.add_param_group({"params": extra})
    group = opt.param_groups[-1]
    assert group["params"] == [extra]
    assert group["lr"] == 0.03 and group["maximize"] is True
    assert group["betas"] == HYPER["betas"] and group["eps"] == HYPER["eps"]
    assert group["weight_decay"] == HYPER["weight_decay"]
    if case.lowrank:
        extra_matrix = torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
        opt.add_param_group({"params": [extra_matrix], "rank": 1})
        group = opt.param_groups[-1]
        for key in ("update_proj_gap", "scale", "proj_type"):
            assert key in group, key
        extra.grad = torch.ones_like(extra)
        extra_matrix.grad = torch.randn(7, 5, dtype=torch.float64)
        opt.step()
        assert opt.state[extra_matrix]["exp_avg"].shape == (7, 1)


BAD_HYPERPARAMETERS = [
    ({"lr": -1.0}, "Invalid learning rate"),
    ({"lr": math.nan}, "Invalid learning rate"),
    ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
    ({"eps": -1e-8}, "Invalid epsilon value"),
    ({"weight_decay": -0.1}, "Invalid weight_decay value"),
]


@pytest.mark.parametrize(
    ("case", "bad", "message"),
    [
        pytest.param(case, bad, message, id=f"{case.id}-{next(iter(bad))}{index}")
        for case in OPTIMIZERS
        for index, (bad, message) in enumerate(BAD_HYPERPARAMETERS)
        if case.adam_family or "betas" not in bad  # Adafactor-like optimizers have no betas
    ],
)
def test_invalid_hyperparameters_raise(case: OptimizerCase, bad: dict, message: str) -> None:
    matrices, others = make_params()
    with pytest.raises(ValueError, match=message):
        build(case, matrices, others, **bad)
    # The same value in a group added later raises and leaves the optimizer untouched.
    opt = build(case, matrices, {})
    set_grads(matrices, 1)
    quiet_step(opt)
    groups_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": list(others.values()), **bad})
    assert len(opt.param_groups) == 1
    assert_same(groups_before, opt.state_dict())


@lowrank_only
def test_invalid_lowrank_group_values_raise_naming_the_key(case: OptimizerCase) -> None:
    matrices, _ = make_params()
    checked = 0
    for key, values in case.invalid_group_values.items():
        for value in values:
            with pytest.raises(ValueError, match=f"Invalid {key}"):
                case.make(list(matrices.values()), lowrank={key: value}, **HYPER)
            checked += 1
    assert checked >= 7
    # In a group added later: raises before anything changes.
    opt = case.make([matrices["tall"]], **HYPER)
    for key, values in case.invalid_group_values.items():
        with pytest.raises(ValueError, match=f"Invalid {key}"):
            opt.add_param_group({"params": [matrices["wide"]], **case.lowrank, key: values[0]})
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------------------------ LR schedulers


@all_cases
def test_step_lr_changes_group_lr(case: OptimizerCase) -> None:
    matrices, others = make_params()
    opt = build(case, matrices, others)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    seen = []
    for step in range(1, 6):
        set_grads(matrices, step)
        set_grads(others, step)
        quiet_step(opt)
        sched.step()
        seen.append([group["lr"] for group in opt.param_groups])
    expected = [HYPER["lr"] * 0.1 ** (s // 2) for s in range(1, 6)]
    for lrs, lr in zip(seen, expected, strict=True):
        assert lrs == pytest.approx([lr] * len(opt.param_groups), rel=1e-12)


@lr_linear
def test_lambda_lr_scales_the_update(case: OptimizerCase) -> None:
    """Gradients that do not depend on the weights make Adam's direction independent of lr, so
    with weight_decay=0 each step's change must scale exactly with the scheduler's factor, in
    low-rank groups too; a factor of 0 leaves every weight bitwise unchanged."""
    factors = [1.0, 0.5, 0.0, 2.0, 0.25, 1.0, 0.1]
    runs = {}
    for name, schedule in (("const", None), ("sched", factors)):
        matrices, others = make_params()
        opt = build(case, matrices, others, weight_decay=0.0)
        sched = (
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s, f=schedule: f[min(s, len(f) - 1)])
            if schedule
            else None
        )
        deltas = []
        for step in range(1, len(factors) + 1):
            params = {**matrices, **others}
            before = {k: p.detach().clone() for k, p in params.items()}
            set_grads(params, step)
            quiet_step(opt)
            if sched:
                sched.step()
            deltas.append({k: p.detach() - before[k] for k, p in params.items()})
        runs[name] = deltas
    for step, factor in enumerate(factors):
        for name, delta in runs["sched"][step].items():
            const = runs["const"][step][name]
            if factor == 0.0:
                assert torch.equal(delta, torch.zeros_like(delta)), (name, step)
            else:
                assert const.abs().max() > 0
                torch.testing.assert_close(delta, factor * const, rtol=1e-9, atol=1e-14, msg=f"{name} {step}")


@all_cases
def test_tensor_lr_matches_float_lr(case: OptimizerCase) -> None:
    runs = []
    for lr in (1e-2, torch.tensor(1e-2, dtype=torch.float64)):
        matrices, others = make_params()
        opt = build(case, matrices, others, lr=lr)
        for step in range(1, 5):
            set_grads({**matrices, **others}, step)
            quiet_step(opt)
        runs.append({**matrices, **others})
    for name, p in runs[0].items():
        assert torch.equal(p, runs[1][name]), name


# ------------------------------------------------------------------------------ closures, hooks, zero_grad


@all_cases
def test_step_hooks_run(case: OptimizerCase) -> None:
    matrices, others = make_params()
    opt = build(case, matrices, others)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", int(bool(o.state)))))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", int(bool(o.state)))))
    set_grads(matrices, 1)
    quiet_step(opt)
    assert calls == [("pre", 0), ("post", 1)]


@all_cases
def test_closure_runs_with_grad_enabled_and_returns_loss(case: OptimizerCase) -> None:
    matrices, others = make_params()
    opt = build(case, matrices, others)
    twin_m, twin_o = clone_params(matrices), clone_params(others)
    twin = build(case, twin_m, twin_o)
    target = torch.randn(10, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss_of(m, o):
        out = m["tall"] @ torch.tanh(m["wide"][:, :6].T @ m["wide"]) + o["bias"].sum() * o["norm"]
        return ((out[:, :9] - target) ** 2).mean()

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = loss_of(matrices, others)
        loss.backward()
        return loss

    for _ in range(4):
        with torch.no_grad():  # step enables grad for the closure even here
            returned = quiet_step(opt, closure)
        twin.zero_grad()
        expected = loss_of(twin_m, twin_o)
        expected.backward()
        quiet_step(twin)
        assert isinstance(returned, torch.Tensor) and torch.equal(returned.detach(), expected.detach())
    for name, p in {**matrices, **others}.items():
        assert torch.equal(p, {**twin_m, **twin_o}[name]), name
    assert quiet_step(opt) is None  # no closure: returns None


@all_cases
def test_zero_grad(case: OptimizerCase) -> None:
    matrices, others = make_params()
    opt = build(case, matrices, others)
    set_grads(matrices, 1)
    set_grads(others, 1)
    opt.zero_grad(set_to_none=False)
    for p in [*matrices.values(), *others.values()]:
        assert p.grad is not None and not p.grad.any()
    opt.zero_grad()
    assert all(p.grad is None for p in [*matrices.values(), *others.values()])


# ------------------------------------------------------------------------------ skipped params


@all_cases
def test_params_without_grad_are_skipped(case: OptimizerCase) -> None:
    matrices, others = make_params()
    frozen = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64), requires_grad=False)
    opt = build(case, {**matrices, "frozen": frozen}, others)
    before = {k: p.detach().clone() for k, p in {**matrices, **others}.items()}
    for step in range(1, 5):
        matrices["tall"].grad = grad_for("tall", (10, 6), step, torch.float64)  # only this one
        others["bias"].grad = grad_for("bias", (6,), step, torch.float64)
        quiet_step(opt)
    for name in ("wide", "norm"):
        p = {**matrices, **others}[name]
        assert torch.equal(p, before[name]) and not state_of(opt, p), name
    assert not state_of(opt, frozen) and frozen.grad is None
    for name in ("tall", "bias"):
        p = {**matrices, **others}[name]
        assert not torch.equal(p, before[name]) and state_of(opt, p), name


# ------------------------------------------------------------------------------ bf16


@adam_family
def test_bf16_params_train_a_tiny_regression(case: OptimizerCase) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=gen)
    w_true = torch.randn(12, 2, generator=gen) @ torch.randn(
        2, 8, generator=gen
    )  # rank 2: a rank-2 method fits it
    y = x @ w_true
    weight = torch.nn.Parameter(torch.zeros(8, 12, dtype=torch.bfloat16))
    bias = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    opt = case.make([weight], [bias], lr=0.1, weight_decay=0.0)

    def loss_fn():
        pred = x.bfloat16() @ weight.T + bias
        return ((pred.float() - y) ** 2).mean()

    losses = [loss_fn().item()]
    for step in range(1, 41):
        opt.zero_grad()
        loss_fn().backward()
        quiet_step(opt)
        if step % 10 == 0:
            losses.append(loss_fn().item())
    # Steadily down (scale=0.25 and low rank make some cases slow; plain AdamW reaches ~0.02x).
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses
    for p in (weight, bias):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].dtype == torch.bfloat16
            assert torch.isfinite(opt.state[p][key]).all()


# ------------------------------------------------------------------------------ odd shapes


@adam_family
def test_odd_shapes_in_plain_groups_match_adamw(case: OptimizerCase) -> None:
    shapes = {"scalar": (), "empty": (0,), "empty2d": (0, 3), "one": (1, 1), "row": (1, 4097)}
    params = {k: torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for k, s in shapes.items()}
    plain = clone_params(params)
    matrices, _ = make_params()
    opt = case.make(list(matrices.values()), list(params.values()), **HYPER)
    adamw = torch.optim.AdamW(list(plain.values()), foreach=False, **HYPER)
    for step in range(1, 4):
        set_grads(params, step)
        set_grads(plain, step)
        set_grads(matrices, step)
        quiet_step(opt)
        adamw.step()
        for name, p in params.items():
            assert p.shape == shapes[name] and torch.equal(p, plain[name]), name


@adam_lowrank
def test_odd_shapes_in_rank_groups(case: OptimizerCase) -> None:
    """1×4097 (rank 1 >= min: plain AdamW, bitwise), 7×3 and 3×7 (projected), 2×2 at rank 1."""
    shapes = {"row": (1, 4097), "col": (4097, 1), "tall": (7, 3), "wide": (3, 7), "square": (2, 2)}
    params = {k: torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for k, s in shapes.items()}
    plain = {k: clone_params(params)[k] for k in ("row", "col")}
    opt = case.make(list(params.values()), lowrank={"rank": 1}, **HYPER)
    adamw = torch.optim.AdamW(list(plain.values()), foreach=False, **HYPER)
    before = {k: p.detach().clone() for k, p in params.items()}
    for step in range(1, 6):
        set_grads(params, step)
        set_grads(plain, step)
        quiet_step(opt)
        adamw.step()
    for name in ("row", "col"):
        assert torch.equal(params[name], plain[name]), name
    for name in ("tall", "wide", "square"):
        p = params[name]
        assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name
        assert opt.state[p]["exp_avg"].numel() < p.numel(), name  # projected, not full size


# ------------------------------------------------------------------------------ NaN containment


def _run(case: OptimizerCase, steps: int, poison: dict[int, str]) -> tuple[dict, torch.optim.Optimizer]:
    """Run ``steps`` steps; at step s, parameter ``poison[s]`` gets a gradient with a NaN."""
    matrices, others = make_params(torch.float32)
    opt = build(case, matrices, others)
    params = {**matrices, **others}
    for step in range(1, steps + 1):
        set_grads(params, step)
        if step in poison:
            params[poison[step]].grad.view(-1)[1] = math.nan
        quiet_step(opt)
    return params, opt


@all_cases
@pytest.mark.parametrize("poison_step", [1, 2, 4], ids=["first-step", "mid", "refresh-step"])
@pytest.mark.parametrize("poisoned", ["tall", "bias"])
def test_nan_gradient_does_not_touch_other_params(
    case: OptimizerCase, poison_step: int, poisoned: str
) -> None:
    clean, clean_opt = _run(case, 6, {})
    dirty, dirty_opt = _run(case, 6, {poison_step: poisoned})  # must not raise
    assert not torch.isfinite(dirty[poisoned]).all()
    for name in clean:
        if name != poisoned:
            assert torch.equal(clean[name], dirty[name]), name
            assert_same(clean_opt.state[clean[name]], dirty_opt.state[dirty[name]], name)


@lowrank_only
@pytest.mark.parametrize("poison_step", [1, 4], ids=["first-step", "refresh-step"])
def test_nan_gradient_at_a_refresh_keeps_the_old_basis(case: OptimizerCase, poison_step: int) -> None:
    gap = case.refresh_gap
    assert poison_step in (1, 1 + gap)
    params, opt = _run(case, poison_step - 1, {})
    tall = params["tall"]
    state = state_of(opt, tall)
    old = {k: v.clone() for k, v in state.items() if k.startswith("proj_")}
    set_grads(params, poison_step)
    tall.grad[0, 0] = math.nan
    quiet_step(opt)
    state = opt.state[tall]
    basis = {k: v for k, v in state.items() if k.startswith("proj_")}
    assert basis and all(torch.isfinite(v).all() for v in basis.values())
    if old:
        assert_same(old, basis)
        assert int(state["last_refresh"]) == 1
    else:
        assert int(state["last_refresh"]) == -1  # no basis from a gradient yet: retried next step
    # The next finite gradient refreshes the basis.
    set_grads(params, poison_step + 1)
    quiet_step(opt)
    assert int(opt.state[tall]["last_refresh"]) == poison_step + 1


# ------------------------------------------------------------------------------ copies


@all_cases
def test_deepcopy_and_pickle(case: OptimizerCase) -> None:
    matrices, others = make_params(torch.float32)
    opt = build(case, matrices, others)
    for step in range(1, 3):
        set_grads({**matrices, **others}, step)
        quiet_step(opt)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert_same(opt.state_dict(), copied.state_dict())
        snapshot = copy.deepcopy(opt.state_dict())
        params_before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
        copied_params = [p for g in copied.param_groups for p in g["params"]]
        for index, p in enumerate(copied_params):
            p.grad = torch.randn_like(p)
            assert p is not [q for g in opt.param_groups for q in g["params"]][index]
        quiet_step(copied)
        assert_same(snapshot, opt.state_dict())
        for p, before in zip([p for g in opt.param_groups for p in g["params"]], params_before, strict=True):
            assert torch.equal(p, before)
        assert any(not torch.equal(p, b) for p, b in zip(copied_params, params_before, strict=True))


# ------------------------------------------------------------------------------ bad gradients


@all_cases
@pytest.mark.parametrize("kind", ["sparse", "complex"])
def test_unsupported_gradients_raise_naming_the_param(case: OptimizerCase, kind: str) -> None:
    matrices, others = make_params()
    if kind == "sparse":
        bad = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
        bad_grad = torch.sparse_coo_tensor(
            [[1, 3]], torch.ones(2, dtype=torch.float64), (5,), check_invariants=True
        )
    else:
        bad = torch.nn.Parameter(torch.randn(5, dtype=torch.complex128))
        bad_grad = torch.randn(5, dtype=torch.complex128)
    named_matrices = list(matrices.items())
    named_others = [*others.items(), ("encoder.bad_param", bad)]
    opt = case.make(named_matrices, named_others, **HYPER)
    set_grads({**matrices, **others}, 1)
    bad.grad = bad_grad
    before = {k: p.detach().clone() for k, p in {**matrices, **others, "bad": bad}.items()}
    with pytest.raises(RuntimeError, match=rf"{kind}.*encoder\.bad_param"):
        quiet_step(opt)
    for name, p in {**matrices, **others, "bad": bad}.items():
        assert torch.equal(p, before[name]) and not state_of(opt, p), name
    # Unnamed parameters are named by position.
    opt = case.make([], [bad], **HYPER)
    with pytest.raises(RuntimeError, match=r"params\[0\]"):
        quiet_step(opt)
