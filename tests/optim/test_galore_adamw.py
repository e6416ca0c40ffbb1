"""GaLoreAdamW-specific behaviour (the shared optimizer contract is in test_contract.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from contract import GaLoreReference, assert_same, grad_for, save_load

import lowmem
from lowmem.optim import GaLoreAdamW

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}


def param(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))


def step_with(opt: GaLoreAdamW, params: dict[str, torch.Tensor], step: int) -> None:
    for name, p in params.items():
        p.grad = grad_for(name, tuple(p.shape), step, p.dtype)
    opt.step()


# ------------------------------------------------------------------------------ rank >= min(m, n)


def test_rank_at_least_min_dim_is_plain_adamw_with_one_warning() -> None:
    params = {"a": param(3, 8), "b": param(5, 4, seed=1), "c": param(2, 2, 3, 3, seed=2)}  # c: 2×18
    plain = {k: torch.nn.Parameter(p.detach().clone()) for k, p in params.items()}
    opt = GaLoreAdamW([{"params": list(params.values()), "rank": 4, "update_proj_gap": 2}], **HYPER)
    adamw = torch.optim.AdamW(list(plain.values()), foreach=False, **HYPER)
    for step in range(1, 6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step_with(opt, params, step)
        messages = [str(w.message) for w in caught]
        if step == 1:
            assert len(messages) == 1, messages
            assert "rank >= min(m, n)" in messages[0]
            for shape in ("(3, 8)", "(5, 4)", "(2, 2, 3, 3)"):
                assert shape in messages[0]
        else:
            assert messages == [], messages
        for name, p in plain.items():
            p.grad = grad_for(name, tuple(p.shape), step, p.dtype)
        adamw.step()
        for name, p in params.items():
            assert torch.equal(p, plain[name]), (name, step)
            assert "last_refresh" not in opt.state[p]


def test_full_rank_warning_again_for_a_param_initialized_later() -> None:
    early, late = param(3, 8), param(2, 5, seed=1)
    opt = GaLoreAdamW([{"params": [early, late], "rank": 3}], **HYPER)
    with pytest.warns(UserWarning, match=r"\(3, 8\)"):
        step_with(opt, {"early": early}, 1)
    with pytest.warns(UserWarning, match=r"\(2, 5\)") as record:
        step_with(opt, {"early": early, "late": late}, 2)
    assert len(record) == 1 and "(3, 8)" not in str(record[0].message)


# ------------------------------------------------------------------------------ conv weights


def test_conv_weight_is_projected_as_out_by_in_k_k() -> None:
    conv = param(6, 2, 3, 3)
    ref = GaLoreReference(conv.detach().reshape(6, 18), HYPER, {"rank": 2, "update_proj_gap": 3})
    opt = GaLoreAdamW([{"params": [conv], "rank": 2, "update_proj_gap": 3, "projector": "svd"}], **HYPER)
    for step in range(1, 6):
        step_with(opt, {"conv": conv}, step)
        expected = ref.step(grad_for("conv", (6, 2, 3, 3), step, torch.float64).reshape(6, 18))
        torch.testing.assert_close(conv.detach().reshape(6, 18), expected, rtol=0, atol=1e-10)
    state = opt.state[conv]
    assert state["exp_avg"].shape == (2, 18)  # 6 < 18: std projects the left side
    assert state["proj_left"].shape == (6, 2) and "proj_right" not in state


def test_channels_last_conv_weight_matches_contiguous() -> None:
    dense = param(8, 3, 3, 3, dtype=torch.float32)
    channels_last = torch.nn.Parameter(dense.detach().clone().to(memory_format=torch.channels_last))
    assert not channels_last.is_contiguous()
    opts = [
        GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 2}], **HYPER)
        for p in (dense, channels_last)
    ]
    for step in range(1, 5):
        for opt, p in zip(opts, (dense, channels_last), strict=True):
            p.grad = grad_for("conv", (8, 3, 3, 3), step, torch.float32).to(memory_format=torch.channels_last)
            opt.step()
        assert torch.equal(dense, channels_last), step
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert opts[1].state[channels_last]["exp_avg"].shape == (2, 27)  # (8, 27): std projects the left side


# ------------------------------------------------------------------------------ construction errors


def test_1d_param_in_a_rank_group_raises_naming_it() -> None:
    weight, bias = param(4, 3), param(3)
    with pytest.raises(ValueError, match=r"layer\.bias.*\(3,\).*rank=2"):
        GaLoreAdamW([{"params": [("layer.weight", weight), ("layer.bias", bias)], "rank": 2}])
    with pytest.raises(ValueError, match=r"params\[1\]"):
        GaLoreAdamW([{"params": [weight, bias], "rank": 2}])
    with pytest.raises(ValueError, match=r"params\[0\].*\(\)"):
        GaLoreAdamW([{"params": [param()], "rank": 1}])


def test_changing_rank_after_the_first_step_raises_clearly() -> None:
    weight = param(6, 4)
    opt = GaLoreAdamW([{"params": [weight], "rank": 2}])
    step_with(opt, {"w": weight}, 1)
    opt.param_groups[0]["rank"] = 3
    before = weight.detach().clone()
    with pytest.raises(RuntimeError, match="rank and proj_type cannot change"):
        step_with(opt, {"w": weight}, 2)
    assert torch.equal(weight, before)


# ------------------------------------------------------------------------------ state


def _leaves(obj, path=""):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _leaves(value, f"{path}[{index}]")
    else:
        yield path, obj


@pytest.mark.parametrize("on_refresh", ["keep", "project", "reset"])
@pytest.mark.parametrize("projector", ["svd", "randomized"])
def test_state_holds_tensors_only(projector: str, on_refresh: str) -> None:
    params = {"w": param(6, 4), "conv": param(4, 2, 2, 2, seed=1), "b": param(4, seed=2)}
    opt = GaLoreAdamW(
        [
            {
                "params": [params["w"], params["conv"]],
                "rank": 2,
                "update_proj_gap": 2,
                "projector": projector,
                "on_refresh": on_refresh,
            },
            {"params": [params["b"]]},
        ],
        **HYPER,
    )
    for step in range(1, 4):
        step_with(opt, params, step)
    state = opt.state_dict()["state"]
    leaves = list(_leaves(state))
    assert len(leaves) == 5 + 5 + 3  # two projected params (5 entries each), one plain (3)
    for path, leaf in leaves:
        assert isinstance(leaf, torch.Tensor), (path, type(leaf))
    for path, leaf in _leaves(opt.state_dict()["param_groups"]):
        assert isinstance(leaf, (int, float, str, bool, type(None))), (path, type(leaf))


@pytest.mark.parametrize(("m", "n", "r"), [(12, 5, 2), (40, 40, 3), (64, 8, 1)])
def test_state_memory_is_2mr_plus_nr(m: int, n: int, r: int) -> None:
    weight = param(m, n)
    opt = GaLoreAdamW([{"params": [weight], "rank": r, "proj_type": "std"}])
    step_with(opt, {"w": weight}, 1)
    numel = sum(t.numel() for t in opt.state[weight].values())
    assert numel == 2 * m * r + n * r + 2  # moments m×r, basis r×n, step and last_refresh


@pytest.mark.parametrize(
    ("proj_type", "shape", "moments", "left", "right"),
    [
        ("std", (12, 5), (12, 2), None, (2, 5)),
        ("std", (5, 12), (2, 12), (5, 2), None),
        ("reverse_std", (12, 5), (2, 5), (12, 2), None),
        ("reverse_std", (5, 12), (5, 2), None, (2, 12)),
        ("left", (12, 5), (2, 5), (12, 2), None),
        ("left", (5, 12), (2, 12), (5, 2), None),
        ("right", (12, 5), (12, 2), None, (2, 5)),
        ("right", (5, 12), (5, 2), None, (2, 12)),
        ("full", (12, 5), (2, 2), (12, 2), (2, 5)),
        ("full", (5, 12), (2, 2), (5, 2), (2, 12)),
    ],
)
def test_proj_type_orientation(proj_type, shape, moments, left, right) -> None:
    weight = param(*shape)
    lowrank = {"rank": 2, "update_proj_gap": 2, "proj_type": proj_type, "projector": "svd"}
    opt = GaLoreAdamW([{"params": [weight], **lowrank}], **HYPER)
    ref = GaLoreReference(weight, HYPER, lowrank)
    for step in range(1, 4):
        step_with(opt, {"w": weight}, step)
        expected = ref.step(grad_for("w", shape, step, torch.float64))
        torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-10)
    state = opt.state[weight]
    assert state["exp_avg"].shape == moments and state["exp_avg_sq"].shape == moments
    assert (state["proj_left"].shape if "proj_left" in state else None) == left
    assert (state["proj_right"].shape if "proj_right" in state else None) == right


# ------------------------------------------------------------------------------ refreshes


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_reset_step_after_a_refresh_equals_a_fresh_first_step(proj_type: str) -> None:
    """With the exact SVD the basis depends only on the gradient, so a fresh optimizer handed the
    same weight and gradient at the refresh step must compute exactly the same update."""
    lowrank = {"rank": 2, "update_proj_gap": 3, "projector": "svd", "proj_type": proj_type}
    results = {}
    for on_refresh in ("reset", "keep", "project"):
        weight = param(9, 6, dtype=torch.float32)
        opt = GaLoreAdamW([{"params": [weight], **lowrank, "on_refresh": on_refresh}], **HYPER)
        for step in range(1, 4):
            step_with(opt, {"w": weight}, step)
        fresh_weight = torch.nn.Parameter(weight.detach().clone())
        fresh = GaLoreAdamW([{"params": [fresh_weight], **lowrank, "on_refresh": on_refresh}], **HYPER)
        step_with(opt, {"w": weight}, 4)  # refresh step
        fresh_weight.grad = weight.grad.clone()
        fresh.step()
        assert int(opt.state[weight]["last_refresh"]) == 4
        results[on_refresh] = (weight, fresh_weight, opt.state[weight], fresh.state[fresh_weight])
    weight, fresh_weight, state, fresh_state = results["reset"]
    assert torch.equal(weight, fresh_weight)
    for key in ("exp_avg", "exp_avg_sq", "proj_left", "proj_right"):
        if key in state:
            assert torch.equal(state[key], fresh_state[key]), key
    for other in ("keep", "project"):  # the check can tell: the moments there carry history
        weight, fresh_weight, _, _ = results[other]
        assert not torch.equal(weight, fresh_weight), other


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_project_keeps_exp_avg_sq_non_negative(proj_type: str) -> None:
    weight = param(10, 7, dtype=torch.float32)
    opt = GaLoreAdamW(
        [
            {
                "params": [weight],
                "rank": 3,
                "update_proj_gap": 1,
                "on_refresh": "project",
                "proj_type": proj_type,
            }
        ],
        **HYPER,
    )
    for step in range(1, 12):
        step_with(opt, {"w": weight}, step)
        assert int(opt.state[weight]["last_refresh"]) == step  # gap 1: every step refreshes
        assert (opt.state[weight]["exp_avg_sq"] >= 0).all(), step
    assert torch.isfinite(weight).all()


@pytest.mark.parametrize("gap", [1, 3, 5])
def test_refresh_schedule(gap: int) -> None:
    weight = param(8, 5)
    opt = GaLoreAdamW([{"params": [weight], "rank": 2, "update_proj_gap": gap}], **HYPER)
    bases = []
    for step in range(1, 3 * gap + 2):
        step_with(opt, {"w": weight}, step)
        expected_last = 1 + ((step - 1) // gap) * gap
        assert int(opt.state[weight]["last_refresh"]) == expected_last, step
        assert opt.state[weight]["last_refresh"].dtype == torch.int64
        bases.append(opt.state[weight]["proj_right"].clone())
    for step in range(2, len(bases) + 1):  # the basis changes exactly at steps 1 + k·gap
        changed = not torch.equal(bases[step - 1], bases[step - 2])
        assert changed == ((step - 1) % gap == 0), step


def test_resume_of_bf16_keeps_refresh_schedule_past_256_steps() -> None:
    """Regression: load_state_dict used to cast last_refresh to the param's dtype (257 → 256 in bf16)."""
    weight = param(6, 4, dtype=torch.bfloat16)
    opt = GaLoreAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 256}], lr=1e-3)
    for step in range(1, 259):  # refreshes at 1 and 257
        weight.grad = grad_for("w", (6, 4), step % 7, torch.bfloat16)
        opt.step()
    resumed_weight = torch.nn.Parameter(weight.detach().clone())
    resumed = GaLoreAdamW([{"params": [resumed_weight], "rank": 2, "update_proj_gap": 256}], lr=1e-3)
    resumed.load_state_dict(save_load(opt.state_dict()))
    assert_same(opt.state[weight], resumed.state[resumed_weight])
    assert int(resumed.state[resumed_weight]["last_refresh"]) == 257


# ------------------------------------------------------------------------------ randomized projector


def _randomized_bases(order: list[str], seed: int = 0, scramble_global_rng: bool = False) -> dict:
    shapes = {"a": (40, 30), "b": (30, 40), "c": (40, 30)}  # rank + 8 < 30: the sketch is random
    params = {k: param(*shapes[k], dtype=torch.float32, seed=i) for i, k in enumerate(("a", "b", "c"))}
    opt = GaLoreAdamW(
        [
            {
                "params": [params[k] for k in order],
                "rank": 2,
                "update_proj_gap": 2,
                "projector": "randomized",
                "seed": seed,
            }
        ],
        **HYPER,
    )
    bases = {}
    for step in range(1, 4):
        if scramble_global_rng:
            torch.manual_seed(1234 + step)
            torch.randn(100)
        for k in order:
            params[k].grad = grad_for(k, shapes[k], step, torch.float32)
        opt.step()
        for k in order:
            state = opt.state[params[k]]
            bases[(k, step)] = state.get("proj_right", state.get("proj_left")).clone()
    return bases


def test_randomized_projector_is_deterministic() -> None:
    reference = _randomized_bases(["a", "b", "c"])
    assert_same(reference, _randomized_bases(["a", "b", "c"]))
    assert_same(reference, _randomized_bases(["a", "b", "c"], scramble_global_rng=True))
    assert_same(reference, _randomized_bases(["c", "b", "a"]))
    other_seed = _randomized_bases(["a", "b", "c"], seed=1)
    assert not torch.equal(reference[("a", 1)], other_seed[("a", 1)])  # the seed does matter
    # Same seed and shape ("a" and "c" are both 40×30), different gradients: different bases.
    assert not torch.equal(reference[("a", 1)], reference[("c", 1)])


def test_randomized_projector_does_not_consume_global_rng() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    _randomized_bases(["a"])
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------ backends


def test_ref_backend_matches_the_default_on_cpu() -> None:
    """Forcing the references changes only rounding: on CPU the default runs adam_direction
    through torch's fused kernel (the ``cpp`` backend), plain groups through the same reference."""
    runs = []
    for forced in (None, "ref"):
        params = {
            "w": param(10, 6, dtype=torch.float32),
            "v": param(4, 9, dtype=torch.float32, seed=1),
            "b": param(6, dtype=torch.float32, seed=2),
        }
        opt = GaLoreAdamW(
            [
                {"params": [params["w"], params["v"]], "rank": 2, "update_proj_gap": 2},
                {"params": [params["b"]]},
            ],
            **HYPER,
        )
        for step in range(1, 5):
            if forced:
                with lowmem.backend(forced):
                    step_with(opt, params, step)
            else:
                step_with(opt, params, step)
        runs.append((params, opt.state_dict()))
    assert torch.equal(runs[0][0]["b"], runs[1][0]["b"])  # plain AdamW: the reference either way
    for name in ("w", "v"):
        torch.testing.assert_close(runs[0][0][name], runs[1][0][name], rtol=1e-5, atol=1e-6)
    for pid, state in runs[0][1]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, runs[1][1]["state"][pid][key], rtol=1e-5, atol=1e-6)


def test_lowrank_state_of_low_precision_params() -> None:
    weight = param(12, 6, dtype=torch.bfloat16)
    opt = GaLoreAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 2}], **HYPER)
    for step in range(1, 4):
        step_with(opt, {"w": weight}, step)
    state = opt.state[weight]
    assert state["exp_avg"].dtype == state["proj_right"].dtype == torch.bfloat16
    assert state["step"].dtype == torch.float32 and state["last_refresh"].dtype == torch.int64
    # The basis is orthonormal to bf16 precision.
    q = state["proj_right"].float()
    torch.testing.assert_close(q @ q.T, torch.eye(2), atol=2e-2, rtol=0)
