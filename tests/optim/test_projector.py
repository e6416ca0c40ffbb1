"""lowmem.optim.projector: bases, signs, moment transport, seeds."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim.projector import (
    compute_basis,
    lowrank_shape,
    project,
    projection_side,
    random_basis,
    stable_seed,
    transport_moments,
)


def matrix_with_spectrum(m: int, n: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = spectrum.numel()
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    return u @ torch.diag(spectrum.double()) @ v.T


def exact_projectors(g: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal projectors onto the top-r left (m×m) and right (n×n) singular subspaces."""
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u[:, :r] @ u[:, :r].T, vh[:r].T @ vh[:r]


def basis_projectors(left, right):
    """P Pᵀ and Qᵀ Q for the bases compute_basis returns (None stays None)."""
    pl = left.double() @ left.double().T if left is not None else None
    pr = right.double().T @ right.double() if right is not None else None
    return pl, pr


def sin_largest_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """a, b: orthonormal columns spanning two subspaces of equal dimension."""
    cosines = torch.linalg.svdvals(a.double().T @ b.double())
    return float((1 - cosines.min().clamp(max=1) ** 2).clamp_min(0).sqrt())


SIDES = ["left", "right", "full"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_svd_basis_spans_top_singular_space(side: str, shape: tuple[int, int]) -> None:
    spectrum = torch.tensor([10.0, 5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    g = matrix_with_spectrum(*shape, spectrum)
    left, right = compute_basis(g, 3, side, "svd")
    assert (left is not None) == (side in ("left", "full")) and (right is not None) == (
        side in ("right", "full")
    )
    exact_left, exact_right = exact_projectors(g, 3)
    pl, pr = basis_projectors(left, right)
    if pl is not None:
        assert left.shape == (shape[0], 3)
        torch.testing.assert_close(pl, exact_left, atol=1e-12, rtol=0)
        torch.testing.assert_close(left.T @ left, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    if pr is not None:
        assert right.shape == (3, shape[1])
        torch.testing.assert_close(pr, exact_right, atol=1e-12, rtol=0)
        torch.testing.assert_close(right @ right.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    low = project(g, left, right)
    assert low.shape == lowrank_shape(shape, 3, side)
    if side == "full":  # Pᵀ G Qᵀ of the top singular vectors is diag(σ1..σr)
        torch.testing.assert_close(low, torch.diag(spectrum[:3].double()), atol=1e-12, rtol=0)


@pytest.mark.parametrize("side", SIDES)
def test_randomized_captures_top_subspace_of_decaying_spectrum(side: str) -> None:
    spectrum = 0.5 ** torch.arange(30, dtype=torch.float64)
    g = matrix_with_spectrum(60, 40, spectrum)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    left, right = compute_basis(g, 4, side, "randomized", seed=3, step=1)
    if left is not None:
        assert sin_largest_principal_angle(left, u[:, :4]) < 1e-6
    if right is not None:
        assert sin_largest_principal_angle(right.T, vh[:4].T) < 1e-6


def test_randomized_warm_start_converges() -> None:
    """Slow decay (ratio 0.97): one cold call is rough; feeding the basis back converges."""
    spectrum = 0.97 ** torch.arange(100, dtype=torch.float64)
    g = matrix_with_spectrum(150, 100, spectrum).float()
    _, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    exact = vh[:4].T
    right = None
    errors = []
    for step in range(1, 9):
        _, right = compute_basis(g, 4, "right", "randomized", seed=0, step=step, warm_right=right)
        errors.append(sin_largest_principal_angle(right.T, exact))
    assert errors[-1] < 0.1 * errors[0], errors
    assert errors[-1] < 0.05, errors


def test_randomized_is_exact_when_the_sketch_spans_everything() -> None:
    g = torch.randn(20, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for side in SIDES:
        exact = compute_basis(g, 2, side, "svd")
        randomized = compute_basis(g, 2, side, "randomized", seed=5, step=9)
        for a, b in zip(exact, randomized, strict=True):
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-10, rtol=0)  # signs fixed the same way


@pytest.mark.parametrize("method", ["svd", "randomized"])
@pytest.mark.parametrize("side", SIDES)
def test_signs_do_not_flip_under_tiny_noise(method: str, side: str) -> None:
    gen = torch.Generator().manual_seed(1)
    g = matrix_with_spectrum(30, 20, torch.linspace(5, 0.5, 20), seed=2)
    noisy = g + 1e-7 * torch.randn(30, 20, generator=gen, dtype=torch.float64)
    before = compute_basis(g, 4, side, method, seed=0, step=1)
    after = compute_basis(noisy, 4, side, method, seed=0, step=1)
    checked = 0
    for a, b, vectors_are in zip(before, after, ("columns", "rows"), strict=True):
        if a is None:
            continue
        dots = (a * b).sum(dim=0 if vectors_are == "columns" else 1)
        assert (dots > 0.99).all(), dots
        checked += 1
    assert checked == (2 if side == "full" else 1)


@pytest.mark.parametrize("side", SIDES)
def test_signs_are_canonical(side: str) -> None:
    """Each singular pair's right vector has a positive largest-magnitude entry, whatever -G gives."""
    g = matrix_with_spectrum(9, 6, torch.tensor([6.0, 4.0, 2.0, 1.0, 0.5, 0.1]))
    left, right = compute_basis(g, 3, side, "svd")
    left_neg, right_neg = compute_basis(-g, 3, side, "svd")
    if right is not None:
        rows = right.gather(1, right.abs().argmax(dim=1, keepdim=True))
        assert (rows > 0).all()
        assert torch.allclose(right, right_neg, atol=1e-12)  # right vectors of -G are the same
    if side == "left":
        cols = left.gather(0, left.abs().argmax(dim=0, keepdim=True))
        assert (cols > 0).all()
        assert torch.allclose(left, left_neg, atol=1e-12)
    if side == "full":
        assert torch.allclose(left, -left_neg, atol=1e-12)  # the pair's sign follows the right vector


@pytest.mark.parametrize("method", ["svd", "randomized"])
@pytest.mark.parametrize("side", SIDES)
def test_a_refresh_keeps_each_vector_pointing_like_its_predecessor(method: str, side: str) -> None:
    """With a previous basis, new vectors are signed to agree with it, whatever the canonical sign."""
    g = matrix_with_spectrum(30, 20, torch.linspace(5, 0.5, 20), seed=3)
    left, right = compute_basis(g, 4, side, "svd")
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)  # a previous basis with other signs
    prev_left = None if left is None else left * flip[None, :]
    prev_right = None if right is None else right * flip[:, None]
    new_left, new_right = compute_basis(g, 4, side, method, warm_left=prev_left, warm_right=prev_right)
    for new, prev, dim in ((new_left, prev_left, 0), (new_right, prev_right, 1)):
        if new is not None:
            assert ((new * prev).sum(dim=dim) > 0.99).all()
    if side == "full":  # a singular pair still shares one sign: P diag(s) Q is unchanged
        torch.testing.assert_close(new_left @ new_right, left @ right, atol=1e-8, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_basis_dtype_follows_the_gradient(dtype: torch.dtype) -> None:
    g = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)).to(dtype)
    for method in ("svd", "randomized"):
        left, right = compute_basis(g, 3, "full", method)
        assert left.dtype == right.dtype == dtype
        assert left.is_contiguous() and right.is_contiguous()


# ------------------------------------------------------------------------------ transport


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("side", SIDES)
def test_transport_with_an_unchanged_basis_keeps_the_moments(side: str) -> None:
    g = _rand(12, 8)
    basis = compute_basis(g, 3, side, "svd")
    shape = lowrank_shape((12, 8), 3, side)
    exp_avg, exp_avg_sq = _rand(*shape, seed=1), _rand(*shape, seed=2).abs()
    m0, v0 = exp_avg.clone(), exp_avg_sq.clone()
    transport_moments(exp_avg, exp_avg_sq, basis, basis)
    torch.testing.assert_close(exp_avg, m0, atol=1e-13, rtol=0)
    torch.testing.assert_close(exp_avg_sq, v0, atol=1e-13, rtol=0)


def test_transport_follows_a_permuted_and_sign_flipped_basis_exactly() -> None:
    """New basis = old basis with vectors permuted and one flipped: M's columns move (and flip), V's move."""
    _, old = compute_basis(_rand(12, 8), 3, "right", "svd")
    perm, signs = torch.tensor([2, 0, 1]), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    new = old[perm] * signs[:, None]
    exp_avg, exp_avg_sq = _rand(12, 3, seed=1), _rand(12, 3, seed=2).abs()
    m0, v0 = exp_avg.clone(), exp_avg_sq.clone()
    transport_moments(exp_avg, exp_avg_sq, (None, old), (None, new))
    torch.testing.assert_close(exp_avg, m0[:, perm] * signs, atol=1e-13, rtol=0)
    torch.testing.assert_close(exp_avg_sq, v0[:, perm], atol=1e-13, rtol=0)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_transport_keeps_exp_avg_sq_non_negative(side: str, dtype: torch.dtype) -> None:
    old = compute_basis(_rand(12, 8).to(dtype), 3, side, "svd")
    new = compute_basis(_rand(12, 8, seed=5).to(dtype), 3, side, "svd")
    shape = lowrank_shape((12, 8), 3, side)
    exp_avg, exp_avg_sq = _rand(*shape, seed=1).to(dtype), _rand(*shape, seed=2).abs().to(dtype)
    transport_moments(exp_avg, exp_avg_sq, old, new)
    assert exp_avg.dtype == exp_avg_sq.dtype == dtype
    assert (exp_avg_sq >= 0).all() and torch.isfinite(exp_avg).all()
    assert exp_avg_sq.sum() > 0


def test_transport_is_computed_in_float64_for_float64_moments() -> None:
    """Regression: fp64 moments used to be carried through fp32 (errors ~1e-8 instead of ~1e-16)."""
    _, old = compute_basis(_rand(12, 8), 3, "right", "svd")
    _, new = compute_basis(_rand(12, 8, seed=9), 3, "right", "svd")
    exp_avg, exp_avg_sq = _rand(12, 3, seed=1), _rand(12, 3, seed=2).abs()
    rotation = old @ new.T
    expected_m, expected_v = exp_avg @ rotation, exp_avg_sq @ rotation**2
    transport_moments(exp_avg, exp_avg_sq, (None, old), (None, new))
    torch.testing.assert_close(exp_avg, expected_m, atol=1e-14, rtol=0)
    torch.testing.assert_close(exp_avg_sq, expected_v, atol=1e-14, rtol=0)


# ------------------------------------------------------------------------------ seeds, helpers


def test_stable_seed_is_stable() -> None:
    first = stable_seed(0, (40, 30), 7)
    assert all(stable_seed(0, (40, 30), 7) == first for _ in range(3))
    assert stable_seed(0, torch.Size([40, 30]), 7) == first  # any int sequence of the same shape
    # Pinned: blake2b of the inputs, so it cannot change between processes or releases.
    assert first == 4746539066942879336
    assert 0 <= first < 2**63
    others = {stable_seed(1, (40, 30), 7), stable_seed(0, (30, 40), 7), stable_seed(0, (40, 30), 8), first}
    assert len(others) == 4


@pytest.mark.parametrize(
    ("shape", "proj_type", "side"),
    [
        ((5, 3), "std", "right"),
        ((3, 5), "std", "left"),
        ((4, 4), "std", "right"),
        ((5, 3), "reverse_std", "left"),
        ((3, 5), "reverse_std", "right"),
        ((5, 3), "left", "left"),
        ((5, 3), "right", "right"),
        ((3, 5), "full", "full"),
    ],
)
def test_projection_side(shape, proj_type, side) -> None:
    assert projection_side(shape, proj_type) == side


def test_projection_side_rejects_unknown_types() -> None:
    with pytest.raises(ValueError, match="Invalid proj_type"):
        projection_side((4, 3), "diag")


@pytest.mark.parametrize("side", SIDES)
def test_random_basis_is_orthonormal_and_seeded(side: str) -> None:
    like = torch.zeros(1, dtype=torch.float32)
    left, right = random_basis((9, 6), 2, side, seed=0, like=like)
    again = random_basis((9, 6), 2, side, seed=0, like=like)
    if left is not None:
        assert left.shape == (9, 2)
        torch.testing.assert_close(left.T @ left, torch.eye(2), atol=1e-6, rtol=0)
        assert torch.equal(left, again[0])
    if right is not None:
        assert right.shape == (2, 6)
        torch.testing.assert_close(right @ right.T, torch.eye(2), atol=1e-6, rtol=0)
        assert torch.equal(right, again[1])
