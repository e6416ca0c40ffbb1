"""GaLoreAdafactor: plain groups against transformers' Adafactor, low-rank groups against the fp64
reference in adafactor_reference.py, and the parts of the shared contract that apply to it."""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import pytest
import test_contract as contract_suite
import torch
from adafactor_reference import (
    GaLoreAdafactorReference,
    TransformersAdafactorReference,
    galore_adafactor_cases,
)
from contract import assert_same, grad_for, make_params, save_load, set_grads

from lowmem.optim.functional.adafactor import transport_factored_moments
from lowmem.optim.galore_adafactor import GaLoreAdafactor


@pytest.fixture
def transformers_adafactor() -> type[torch.optim.Optimizer]:
    return pytest.importorskip("transformers.optimization").Adafactor


def param(
    *shape: int, dtype: torch.dtype = torch.float64, seed: int = 0, std: float = 1.0
) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype))


def clone(p: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(p.detach().clone())


def step_with(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor], step: int) -> None:
    for name, p in params.items():
        p.grad = grad_for(name, tuple(p.shape), step, p.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rank >= min")
        opt.step()


ADAFACTOR_VARIANTS = [
    pytest.param({}, id="defaults"),
    pytest.param({"beta1": 0.9, "weight_decay": 0.1}, id="beta1-wd"),
    pytest.param({"warmup_init": True, "beta1": 0.0}, id="warmup"),
    pytest.param(
        {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "weight_decay": 0.05}, id="manual-lr"
    ),
    pytest.param(
        {"lr": 3e-3, "relative_step": False, "clip_threshold": 0.5, "decay_rate": -0.5, "eps": (1e-8, 1e-2)},
        id="clip-decay-eps",
    ),
]

# ------------------------------------------------------------------------------ plain groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hyper", ADAFACTOR_VARIANTS)
def test_plain_groups_match_transformers_adafactor_bitwise(transformers_adafactor, dtype, hyper) -> None:
    """1-D, 2-D, 3-D, 0-d and an RMS < eps2 matrix (the eps2 floor of the parameter scale), 6 steps:
    weights and states bitwise equal to transformers' Adafactor (same op order on CPU)."""
    shapes = {"bias": (7,), "weight": (6, 4), "stack": (3, 5, 2), "scalar": (), "tiny": (4, 4)}
    params = {
        k: param(*s, dtype=dtype, seed=i, std=1e-5 if k == "tiny" else 1.0)
        for i, (k, s) in enumerate(shapes.items())
    }
    twins = {k: clone(p) for k, p in params.items()}
    opt = GaLoreAdafactor(list(params.values()), **hyper)
    theirs = transformers_adafactor(list(twins.values()), **hyper)
    for step in range(1, 7):
        step_with(opt, params, step)
        step_with(theirs, twins, step)
        for name, p in params.items():
            assert torch.equal(p, twins[name]), (name, step)
    for name, p in params.items():
        ours, reference = opt.state[p], theirs.state[twins[name]]
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
            assert (key in ours) == (key in reference), (name, key)
            if key in ours:
                assert torch.equal(ours[key], reference[key]), (name, key)
                assert ours[key].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        assert ours["step"].dtype == torch.float32 and int(ours["step"]) == reference["step"] == 6
    if not hyper.get("warmup_init"):  # warmup steps (1e-6·t) are below bf16's resolution
        assert not torch.equal(params["weight"], param(6, 4, dtype=dtype, seed=1))  # it did move


def test_rank_at_least_min_dim_is_plain_adafactor_with_one_warning(transformers_adafactor) -> None:
    params = {"a": param(3, 8), "b": param(5, 4, seed=1), "conv": param(2, 2, 3, 3, seed=2)}  # conv: 2×18
    twins = {k: clone(p) for k, p in params.items()}
    opt = GaLoreAdafactor([{"params": list(params.values()), "rank": 4, "update_proj_gap": 2}], beta1=0.9)
    theirs = transformers_adafactor(list(twins.values()), beta1=0.9)
    for step in range(1, 5):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name, p in params.items():
                p.grad = grad_for(name, tuple(p.shape), step, p.dtype)
            opt.step()
        messages = [str(w.message) for w in caught]
        if step == 1:
            assert len(messages) == 1 and "rank >= min(m, n)" in messages[0], messages
            assert all(s in messages[0] for s in ("(3, 8)", "(5, 4)", "(2, 2, 3, 3)"))
        else:
            assert messages == [], messages
        step_with(theirs, twins, step)
        for name, p in params.items():
            assert torch.equal(p, twins[name]), (name, step)
            assert "last_refresh" not in opt.state[p]


# ------------------------------------------------------------------------------ low-rank trajectory

LOWRANK_VARIANTS = [
    pytest.param({"proj_type": "std", "projector": "svd", "on_refresh": "keep"}, id="std-svd-keep"),
    pytest.param(
        {"proj_type": "std", "projector": "randomized", "on_refresh": "project"}, id="std-rand-project"
    ),
    pytest.param(
        {"proj_type": "reverse_std", "projector": "svd", "on_refresh": "project"}, id="reverse-project"
    ),
    pytest.param({"proj_type": "full", "projector": "svd", "on_refresh": "project"}, id="full-project"),
    pytest.param({"proj_type": "full", "projector": "svd", "on_refresh": "reset"}, id="full-reset"),
    pytest.param(
        {"proj_type": "left", "projector": "randomized", "on_refresh": "reset"}, id="left-rand-reset"
    ),
]
REFERENCE_HYPER = [
    pytest.param({}, id="defaults"),
    pytest.param({"beta1": 0.9, "weight_decay": 0.1}, id="beta1-wd"),
    pytest.param(
        {
            "lr": 1e-2,
            "relative_step": False,
            "scale_parameter": False,
            "beta1": 0.5,
            "maximize": True,
            "clip_threshold": 0.3,
            "eps": (1e-8, 1e-3),
        },
        id="manual-maximize-clip",
    ),
]


@pytest.mark.parametrize("shape", [(10, 6), (5, 9)], ids=["tall", "wide"])
@pytest.mark.parametrize("lowrank", LOWRANK_VARIANTS)
@pytest.mark.parametrize("hyper", REFERENCE_HYPER)
def test_lowrank_trajectory_matches_fp64_reference(shape, lowrank, hyper) -> None:
    """8 steps, refreshes at 1, 4, 7 (the randomized sketch spans these tiny matrices, so its basis
    is the exact SVD's to rounding and one reference covers both projectors)."""
    lowrank = {"rank": 2, "update_proj_gap": 3, "scale": 0.5, **lowrank}
    weight = param(*shape)
    before = weight.detach().clone()
    ref = GaLoreAdafactorReference(weight, hyper, lowrank)
    opt = GaLoreAdafactor([{"params": [weight], **lowrank}], **hyper)
    for step in range(1, 9):
        step_with(opt, {"w": weight}, step)
        expected = ref.step(grad_for("w", shape, step, torch.float64))
        torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-10, msg=f"step {step}")
    assert (weight.detach() - before).abs().max() > 1e-4  # not a vacuous pass
    state = opt.state[weight]
    assert state["exp_avg_sq_row"].shape == ref.row.shape and state["exp_avg_sq_col"].shape == ref.col.shape
    torch.testing.assert_close(state["exp_avg_sq_row"], ref.row, rtol=1e-9, atol=0)
    torch.testing.assert_close(state["exp_avg_sq_col"], ref.col, rtol=1e-9, atol=0)


def test_mixed_groups_match_reference_and_transformers(transformers_adafactor) -> None:
    """One optimizer with a rank group and a plain group: each part matches its own reference."""
    hyper = {"beta1": 0.9, "weight_decay": 0.1}
    matrices, others = make_params()
    refs = {
        k: GaLoreAdafactorReference(p, hyper, {"rank": 2, "update_proj_gap": 3}) for k, p in matrices.items()
    }
    twins = {k: clone(p) for k, p in others.items()}
    theirs = transformers_adafactor(list(twins.values()), **hyper)
    opt = GaLoreAdafactor(
        [
            {"params": list(matrices.values()), "rank": 2, "update_proj_gap": 3},
            {"params": list(others.values())},
        ],
        **hyper,
    )
    for step in range(1, 8):
        step_with(opt, {**matrices, **others}, step)
        step_with(theirs, twins, step)
        for name, p in matrices.items():
            expected = refs[name].step(grad_for(name, tuple(p.shape), step, torch.float64))
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-10)
        for name, p in others.items():
            assert torch.equal(p, twins[name]), (name, step)


def test_transformers_reference_adapter_handles_maximize(transformers_adafactor) -> None:
    weight = param(4, 3)
    ref = TransformersAdafactorReference(weight, {"maximize": True})
    ours, mirror = clone(weight), clone(weight)
    opt = GaLoreAdafactor([ours], maximize=True)
    mirrored = GaLoreAdafactor([mirror])
    for step in range(1, 4):
        grad = grad_for("w", (4, 3), step, torch.float64)
        expected = ref.step(grad)
        ours.grad = grad.clone()
        opt.step()
        mirror.grad = -grad
        mirrored.step()
        assert torch.equal(ours, expected) and torch.equal(mirror, expected), step


# ------------------------------------------------------------------------------ shapes and memory


def test_conv_weight_is_projected_as_out_by_in_k_k() -> None:
    conv = param(6, 2, 3, 3)
    lowrank = {"rank": 2, "update_proj_gap": 3, "projector": "svd"}
    ref = GaLoreAdafactorReference(conv.detach().reshape(6, 18), {"beta1": 0.9}, lowrank)
    opt = GaLoreAdafactor([{"params": [conv], **lowrank}], beta1=0.9)
    for step in range(1, 6):
        step_with(opt, {"conv": conv}, step)
        expected = ref.step(grad_for("conv", (6, 2, 3, 3), step, torch.float64).reshape(6, 18))
        torch.testing.assert_close(conv.detach().reshape(6, 18), expected, rtol=0, atol=1e-10)
    state = opt.state[conv]
    # 6 < 18: std projects the left side; R is 2×18
    assert state["exp_avg_sq_row"].shape == (2,) and state["exp_avg_sq_col"].shape == (18,)
    assert state["exp_avg"].shape == (2, 18)
    assert state["proj_left"].shape == (6, 2) and "proj_right" not in state


def test_channels_last_conv_weight_matches_contiguous() -> None:
    dense = param(8, 3, 3, 3, dtype=torch.float32)
    channels_last = torch.nn.Parameter(dense.detach().clone().to(memory_format=torch.channels_last))
    opts = [
        GaLoreAdafactor([{"params": [p], "rank": 2, "update_proj_gap": 2}]) for p in (dense, channels_last)
    ]
    for step in range(1, 5):
        for opt, p in zip(opts, (dense, channels_last), strict=True):
            p.grad = grad_for("conv", (8, 3, 3, 3), step, torch.float32).to(memory_format=torch.channels_last)
            opt.step()
        assert torch.equal(dense, channels_last), step
    assert channels_last.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("m", "n", "r"), [(12, 5, 2), (40, 40, 3), (64, 8, 1)])
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_state_memory_is_m_plus_r_plus_nr(m: int, n: int, r: int, beta1: float | None) -> None:
    """Right projection (m >= n): m + r second-moment numbers (+ m·r with beta1) + the n×r basis
    + step and last_refresh; and the mirror image for a wide matrix."""
    for shape in ((m, n), (n, m)):
        weight = param(*shape)
        opt = GaLoreAdafactor([{"params": [weight], "rank": r, "proj_type": "std"}], beta1=beta1)
        step_with(opt, {"w": weight}, 1)
        numel = sum(t.numel() for t in opt.state[weight].values())
        assert numel == m + r + (m * r if beta1 is not None else 0) + n * r + 2, shape


def _leaves(obj: Any, path: str = ""):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _leaves(value, f"{path}[{index}]")
    else:
        yield path, obj


def test_state_layout_and_dtypes_of_a_bf16_model() -> None:
    params = {"w": param(12, 6, dtype=torch.bfloat16), "b": param(6, dtype=torch.bfloat16, seed=1)}
    opt = GaLoreAdafactor(
        [{"params": [params["w"]], "rank": 2, "update_proj_gap": 2}, {"params": [params["b"]]}], beta1=0.9
    )
    for step in range(1, 4):
        step_with(opt, params, step)
    w_state, b_state = opt.state[params["w"]], opt.state[params["b"]]
    assert set(w_state) == {
        "step",
        "exp_avg_sq_row",
        "exp_avg_sq_col",
        "exp_avg",
        "proj_right",
        "last_refresh",
    }
    assert set(b_state) == {"step", "exp_avg_sq", "exp_avg"}
    for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg"):
        assert w_state[key].dtype == torch.float32, key  # fp32 moments for a low-precision weight
    assert w_state["proj_right"].dtype == torch.bfloat16
    assert w_state["step"].dtype == torch.float32 and w_state["step"].device.type == "cpu"
    assert w_state["last_refresh"].dtype == torch.int64
    for path, leaf in _leaves(opt.state_dict()["state"]):
        assert isinstance(leaf, torch.Tensor), path
    for path, leaf in _leaves(opt.state_dict()["param_groups"]):
        assert isinstance(leaf, (int, float, str, bool, type(None))), (path, type(leaf))


# ------------------------------------------------------------------------------ hyperparameters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 1e-3}, r"Invalid learning rate: lr=0.001 cannot be combined with relative_step=True"),
        ({"relative_step": False}, r"Invalid learning rate: None; relative_step=False needs"),
        ({"lr": -1.0, "relative_step": False}, r"Invalid learning rate: -1.0"),
        ({"lr": math.nan, "relative_step": False}, r"Invalid learning rate"),
        ({"lr": torch.tensor([1e-3, 1e-3]), "relative_step": False}, r"Tensor lr must be 1-element"),
        (
            {"lr": 1e-3, "relative_step": False, "warmup_init": True},
            r"Invalid warmup_init.*relative_step=True",
        ),
        ({"eps": (-1e-30, 1e-3)}, r"Invalid epsilon value at index 0"),
        ({"eps": (1e-30, math.inf)}, r"Invalid epsilon value at index 1"),
        ({"eps": 1e-8}, r"Invalid epsilon value: 1e-08; Adafactor's eps is a pair"),
        ({"eps": (1e-30, 1e-3, 0.0)}, r"Invalid epsilon value"),
        ({"clip_threshold": 0.0}, r"Invalid clip_threshold: 0.0"),
        ({"clip_threshold": math.nan}, r"Invalid clip_threshold"),
        ({"decay_rate": 0.8}, r"Invalid decay_rate: 0.8; it must be <= 0"),
        ({"beta1": 1.0}, r"Invalid beta1: 1.0"),
        ({"beta1": -0.1}, r"Invalid beta1"),
        ({"weight_decay": -0.1}, r"Invalid weight_decay value: -0.1"),
        ({"scale_parameter": "yes"}, r"Invalid scale_parameter: 'yes'"),
        ({"maximize": 1}, r"Invalid maximize"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs: dict, message: str) -> None:
    weight, bias = param(6, 4), param(4, seed=1)
    with pytest.raises(ValueError, match=message):
        GaLoreAdafactor([weight], **kwargs)
    # In a group added later: raises before anything changes.
    opt = GaLoreAdafactor([{"params": [weight], "rank": 2}])
    step_with(opt, {"w": weight}, 1)
    snapshot = save_load(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [bias], **kwargs})
    assert len(opt.param_groups) == 1
    assert_same(snapshot, opt.state_dict())


def test_valid_hyperparameter_corners() -> None:
    weight = param(6, 4)
    for kwargs in (
        {"lr": torch.tensor(1e-3), "relative_step": False},
        {"clip_threshold": math.inf, "decay_rate": 0.0, "beta1": 0.0, "eps": [0.0, 0.0]},
        {"warmup_init": True},
    ):
        opt = GaLoreAdafactor([{"params": [weight], "rank": 2}], **kwargs)
        step_with(opt, {"w": weight}, 1)
        assert torch.isfinite(weight).all(), kwargs


def test_changing_rank_after_the_first_step_raises_clearly() -> None:
    weight = param(6, 4)
    opt = GaLoreAdafactor([{"params": [weight], "rank": 2}])
    step_with(opt, {"w": weight}, 1)
    opt.param_groups[0]["rank"] = 3
    before = weight.detach().clone()
    with pytest.raises(RuntimeError, match="rank and proj_type cannot change"):
        step_with(opt, {"w": weight}, 2)
    assert torch.equal(weight, before)


def test_beta1_set_after_the_first_step_allocates_the_first_moment() -> None:
    weight = param(8, 5)
    opt = GaLoreAdafactor([{"params": [weight], "rank": 2}])
    step_with(opt, {"w": weight}, 1)
    assert "exp_avg" not in opt.state[weight]
    opt.param_groups[0]["beta1"] = 0.9
    step_with(opt, {"w": weight}, 2)
    assert opt.state[weight]["exp_avg"].shape == (8, 2) and opt.state[weight]["exp_avg"].any()


# ------------------------------------------------------------------------------ refreshes


def test_transport_factored_moments_equals_refactoring_the_carried_estimate() -> None:
    """The closed form (carry one factor, rescale the other) against carrying the full V̂."""
    gen = torch.Generator().manual_seed(0)
    q_old, q_new = (
        torch.linalg.qr(torch.randn(9, 3, generator=gen, dtype=torch.float64)).Q.T for _ in range(2)
    )
    p_old, p_new = (
        torch.linalg.qr(torch.randn(7, 3, generator=gen, dtype=torch.float64)).Q for _ in range(2)
    )
    for old, new, shape in (
        ((None, q_old), (None, q_new), (7, 3)),
        ((p_old, None), (p_new, None), (3, 9)),
        ((p_old, q_old), (p_new, q_new), (3, 3)),
    ):
        row = torch.rand(shape[0], generator=gen, dtype=torch.float64) + 0.1
        col = torch.rand(shape[1], generator=gen, dtype=torch.float64)
        col *= row.mean() / col.mean()  # Adafactor's factors share their grand mean
        moment = torch.randn(shape, generator=gen, dtype=torch.float64)
        v_hat, expected_moment = torch.outer(row, col) / row.mean(), moment.clone()
        if old[1] is not None:
            turn = old[1] @ new[1].T
            v_hat, expected_moment = v_hat @ turn**2, expected_moment @ turn
        if old[0] is not None:
            turn = new[0].T @ old[0]
            v_hat, expected_moment = turn**2 @ v_hat, turn @ expected_moment
        transport_factored_moments(row, col, moment, old, new)
        torch.testing.assert_close(row, v_hat.mean(dim=1), rtol=1e-12, atol=0)
        torch.testing.assert_close(col, v_hat.mean(dim=0), rtol=1e-12, atol=0)
        torch.testing.assert_close(moment, expected_moment, rtol=1e-12, atol=1e-14)
        assert (row >= 0).all() and (col >= 0).all()


def test_project_onto_the_same_subspace_equals_keep() -> None:
    """A refresh whose new basis is the old one (the same gradient every step, exact SVD) must
    leave the carried moments as they are: "project" then runs exactly like "keep"."""
    grad = grad_for("w", (10, 6), 1, torch.float64)
    runs = {}
    for on_refresh in ("keep", "project"):
        weight = param(10, 6)
        opt = GaLoreAdafactor(
            [
                {
                    "params": [weight],
                    "rank": 2,
                    "update_proj_gap": 2,
                    "projector": "svd",
                    "on_refresh": on_refresh,
                }
            ],
            beta1=0.9,
        )
        for _ in range(5):  # refreshes at 1, 3, 5
            weight.grad = grad.clone()
            opt.step()
        runs[on_refresh] = (weight, opt.state[weight])
    (kept, kept_state), (carried, carried_state) = runs["keep"], runs["project"]
    assert int(carried_state["last_refresh"]) == 5
    torch.testing.assert_close(carried, kept, rtol=0, atol=1e-13)
    for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg"):
        torch.testing.assert_close(carried_state[key], kept_state[key], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_project_keeps_factors_positive_and_the_weights_finite(proj_type: str) -> None:
    weight = param(10, 7, dtype=torch.float32)
    opt = GaLoreAdafactor(
        [{"params": [weight], "rank": 3, "update_proj_gap": 1, "proj_type": proj_type}], beta1=0.9
    )
    for step in range(1, 12):
        step_with(opt, {"w": weight}, step)
        state = opt.state[weight]
        assert int(state["last_refresh"]) == step  # gap 1: every step refreshes
        assert (state["exp_avg_sq_row"] > 0).all() and (state["exp_avg_sq_col"] > 0).all(), step
    assert torch.isfinite(weight).all()


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_reset_step_after_a_refresh_equals_a_fresh_first_step(proj_type: str) -> None:
    """With a constant step size (external lr, no parameter scale) and the exact SVD, a "reset"
    refresh step must equal a fresh optimizer's first step on the same weight and gradient."""
    lowrank = {"rank": 2, "update_proj_gap": 3, "projector": "svd", "proj_type": proj_type}
    hyper = {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9}
    results = {}
    for on_refresh in ("reset", "keep", "project"):
        weight = param(9, 6, dtype=torch.float32)
        opt = GaLoreAdafactor([{"params": [weight], **lowrank, "on_refresh": on_refresh}], **hyper)
        for step in range(1, 4):
            step_with(opt, {"w": weight}, step)
        fresh_weight = clone(weight)
        fresh = GaLoreAdafactor([{"params": [fresh_weight], **lowrank, "on_refresh": on_refresh}], **hyper)
        step_with(opt, {"w": weight}, 4)  # refresh step
        fresh_weight.grad = weight.grad.clone()
        fresh.step()
        assert int(opt.state[weight]["last_refresh"]) == 4
        results[on_refresh] = (weight, fresh_weight, opt.state[weight], fresh.state[fresh_weight])
    weight, fresh_weight, state, fresh_state = results["reset"]
    assert torch.equal(weight, fresh_weight)
    for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg", "proj_left", "proj_right"):
        if key in state:
            assert torch.equal(state[key], fresh_state[key]), key
    for other in ("keep", "project"):  # the check can tell: the moments there carry history
        weight, fresh_weight, _, _ = results[other]
        assert not torch.equal(weight, fresh_weight), other


# ------------------------------------------------------------------------------ checkpoints, NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("on_refresh", ["keep", "project", "reset"])
@pytest.mark.parametrize("save_at", [3, 4])
def test_state_dict_round_trip_continues_bit_for_bit_across_a_refresh(dtype, on_refresh, save_at) -> None:
    """Save before (3) or at (4) the refresh at step 4, torch.load(weights_only=True), resume to 9."""

    def build(params):
        return GaLoreAdafactor(
            [
                {
                    "params": [params["w"], params["conv"]],
                    "rank": 2,
                    "update_proj_gap": 3,
                    "on_refresh": on_refresh,
                },
                {"params": [params["b"]]},
            ],
            beta1=0.9,
            weight_decay=0.01,
        )

    params = {
        "w": param(9, 5, dtype=dtype),
        "conv": param(4, 2, 2, 2, dtype=dtype, seed=1),
        "b": param(5, dtype=dtype, seed=2),
    }
    opt = build(params)
    for step in range(1, save_at + 1):
        step_with(opt, params, step)
    resumed_params = {k: clone(p) for k, p in params.items()}
    resumed = build(resumed_params)
    resumed.load_state_dict(save_load(opt.state_dict()))
    for name, p in params.items():
        assert_same(opt.state[p], resumed.state[resumed_params[name]], name)  # fp32 moments stay fp32
    for step in range(save_at + 1, 10):
        step_with(opt, params, step)
        step_with(resumed, resumed_params, step)
    for name, p in params.items():
        assert torch.equal(p, resumed_params[name]), name
        assert_same(opt.state[p], resumed.state[resumed_params[name]], name)
    assert int(opt.state[params["w"]]["last_refresh"]) == 7


@pytest.mark.parametrize("poison_step", [1, 2, 4], ids=["first-step", "mid", "refresh-step"])
@pytest.mark.parametrize("poisoned", ["w", "stack", "b"])
def test_nan_gradient_does_not_touch_other_params(poison_step: int, poisoned: str) -> None:
    def run(poison: bool):
        params = {
            "w": param(9, 5, dtype=torch.float32),
            "stack": param(2, 3, 4, dtype=torch.float32, seed=1),
            "b": param(5, dtype=torch.float32, seed=2),
        }
        opt = GaLoreAdafactor(
            [
                {"params": [params["w"]], "rank": 2, "update_proj_gap": 3},
                {"params": [params["stack"], params["b"]]},
            ],
            beta1=0.9,
        )
        for step in range(1, 7):
            for name, p in params.items():
                p.grad = grad_for(name, tuple(p.shape), step, p.dtype)
            if poison and step == poison_step:
                params[poisoned].grad.view(-1)[1] = math.inf if poisoned == "stack" else math.nan
            opt.step()
        return params, opt

    clean, clean_opt = run(False)
    dirty, dirty_opt = run(True)
    assert not torch.isfinite(dirty[poisoned]).all()
    for name in clean:
        if name != poisoned:
            assert torch.equal(clean[name], dirty[name]), name
            assert_same(clean_opt.state[clean[name]], dirty_opt.state[dirty[name]], name)
    if poisoned == "w":  # the basis never saw the NaN
        assert torch.isfinite(dirty_opt.state[dirty["w"]]["proj_right"]).all()


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("rank", [None, 2])
def test_bf16_params_train_a_tiny_regression(rank: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=gen)
    y = x @ (torch.randn(12, 2, generator=gen) @ torch.randn(2, 8, generator=gen))  # rank 2
    weight = torch.nn.Parameter(0.1 * torch.randn(8, 12, generator=gen).bfloat16())
    bias = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    group = {"params": [weight], **({"rank": rank, "update_proj_gap": 10, "scale": 1.0} if rank else {})}
    opt = GaLoreAdafactor(
        [group, {"params": [bias]}], lr=0.05, relative_step=False, scale_parameter=False, beta1=0.9
    )

    def loss_fn():
        return (((x.bfloat16() @ weight.T + bias).float() - y) ** 2).mean()

    losses = [loss_fn().item()]
    for step in range(1, 41):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        if step % 10 == 0:
            losses.append(loss_fn().item())
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.4 * losses[0], losses  # rank 2 reaches about 0.3x, full rank 0.15x
    assert weight.dtype == torch.bfloat16 and torch.isfinite(weight).all()
    assert opt.state[weight]["exp_avg"].dtype == torch.float32


# ------------------------------------------------------------------------------ the shared contract
# GaLoreAdafactor's cases are in contract.OPTIMIZERS (flagged adam_family=False), so the shared
# suite runs every test that does not assume AdamW. Its trajectory test compares plain groups
# with torch.optim.AdamW; the matrix half of it, with Adafactor's references, runs here.

CASES = galore_adafactor_cases()
ids = {"ids": lambda case: case.id}


@pytest.mark.parametrize("case", CASES, **ids)
def test_contract_matrices_follow_the_case_reference(case) -> None:
    """The matrix half of contract.test_trajectory_matches_reference (its other half compares
    plain groups with torch.optim.AdamW); the plain groups here follow transformers' Adafactor."""
    if not case.lowrank:
        pytest.importorskip("transformers.optimization")
    for extra in ({}, {"weight_decay": 0.0}, {"maximize": True, "weight_decay": 0.05}):
        hyper = {**contract_suite.HYPER, **extra}
        matrices, others = make_params()
        refs = {k: case.reference(p, hyper) for k, p in matrices.items()}
        opt = case.make(list(matrices.values()), list(others.values()), **hyper)
        for step in range(1, 8):
            set_grads(matrices, step)
            set_grads(others, step)
            contract_suite.quiet_step(opt)
            for name, p in matrices.items():
                expected = refs[name].step(grad_for(name, tuple(p.shape), step, p.dtype))
                if case.lowrank:
                    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-10)
                else:
                    assert torch.equal(p.detach(), expected), (name, step)
