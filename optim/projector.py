"""Gradient subspace projectors for low-rank optimizers (GaLore, Zhao et al. 2024).

A weight's gradient ``G`` (m×n, matricized) is projected onto an r-dimensional subspace
spanned by its top singular vectors, the Adam moments live in that subspace, and the update is
projected back. The basis is one or two tensors, never a Python object, so it goes into the
optimizer state and ``torch.load(weights_only=True)`` round-trips it:

========  ===================  ===================  ===============  =====================
side      ``left`` basis       ``right`` basis      low-rank grad    back-projection of N
========  ===================  ===================  ===============  =====================
right     —                    Q: r×n, rows ⟂       G Qᵀ   (m×r)     N Q
left      P: m×r, columns ⟂    —                    Pᵀ G   (r×n)     P N
full      P: m×r               Q: r×n               Pᵀ G Qᵀ (r×r)    P N Q
========  ===================  ===================  ===============  =====================

Two ways to find the basis:

``svd``
    Exact thin SVD of ``G`` in fp32 (galore-torch's choice): O(m·n·min(m, n)).
``randomized``
    Randomized range finder (Halko, Martinsson & Tropp 2011) with ``oversample`` extra
    columns and ``power_iters`` subspace iterations, warm-started from the previous basis, then
    a Rayleigh–Ritz step: O(m·n·(r + oversample)·(2·power_iters + 1)). Its random matrix is
    drawn from a generator seeded by a pure function of ``(seed, shape, step)``, never from the
    global RNG or the parameter's position in the optimizer, so runs and resumes reproduce.

Signs are fixed deterministically: each new singular vector points the way its predecessor in
the previous basis did (the first basis: its largest-magnitude entry is positive), so refreshing
on a nearly identical gradient does not flip basis vectors, and moments kept across a refresh
keep their meaning.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from torch import Tensor

Side = Literal["left", "right", "full"]
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTORS = ("svd", "randomized")
OVERSAMPLE = 8
POWER_ITERS = 2


def projection_side(shape: tuple[int, int], proj_type: str) -> Side:
    """Which side of an m×n matrix is projected, following galore-torch's ``proj_type``.

    ``std`` projects the smaller dimension (right when m >= n), which minimizes state:
    moments m×r and basis n×r for m >= n. ``reverse_std`` does the opposite.
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type  # type: ignore[return-value]
    raise ValueError(f"Invalid proj_type: {proj_type!r}; choose one of {PROJ_TYPES}")


def lowrank_shape(shape: tuple[int, int], rank: int, side: Side) -> tuple[int, int]:
    """Shape of the projected gradient (and of the Adam moments) for an m×n matrix."""
    m, n = shape
    return {"right": (m, rank), "left": (rank, n), "full": (rank, rank)}[side]


def project(grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """Project an m×n gradient: ``Pᵀ G``, ``G Qᵀ`` or ``Pᵀ G Qᵀ``; a new tensor in grad's dtype."""
    out = grad
    if right is not None:
        out = out @ right.t()
    if left is not None:
        out = left.t() @ out
    return out


def stable_seed(seed: int, shape: tuple[int, ...], step: int) -> int:
    """A 63-bit seed that depends only on (seed, shape, step): stable across runs and processes."""
    digest = hashlib.blake2b(
        repr((int(seed), tuple(int(s) for s in shape), int(step))).encode(), digest_size=8
    )
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def _gaussian(rows: int, cols: int, seed: int, like: Tensor) -> Tensor:
    """Standard normal rows×cols drawn on the CPU (the same numbers on every device), fp32."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(like.device)


def _fix_signs(left: Tensor, right_rows: Tensor, previous_rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """Choose each singular pair's sign deterministically; returns ``(left, right_rows)`` flipped.

    With a previous basis (k×n rows, same shape) each new vector is turned to point the way its
    predecessor did (non-negative dot product), so a refresh on a similar gradient never flips a
    coordinate of the subspace: moments kept across the refresh (``on_refresh="keep"``) keep
    their meaning. Without one, or where a dot product is exactly 0, the largest-magnitude
    entry of the right vector is made positive. ``left``: m×k (columns are vectors),
    ``right_rows``: k×n (rows are vectors); a pair gets one sign, so ``left·diag(s)·right_rows``
    is unchanged.
    """
    idx = right_rows.abs().argmax(dim=1, keepdim=True)
    signs = torch.gather(right_rows, 1, idx).sign()
    if previous_rows is not None and previous_rows.shape == right_rows.shape:
        alignment = (right_rows * previous_rows.to(right_rows.dtype)).sum(dim=1, keepdim=True).sign()
        signs = torch.where(alignment != 0, alignment, signs)
    signs[signs == 0] = 1
    return left * signs.t(), right_rows * signs


def _svd_basis(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top-``rank`` singular vectors (U: m×r, Vh: r×n) by exact thin SVD."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], vh[:rank]


def _randomized_basis(
    matrix: Tensor, rank: int, seed: int, warm_right: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Top-``rank`` singular vectors (U: m×r, Vh: r×n) by a warm-started randomized SVD.

    Subspace iteration runs in the row space (n-dim): ``Y ← orth(Gᵀ G Y)``. Starting from the
    previous basis (plus fresh Gaussian columns) makes one or two iterations enough once the
    subspace drifts slowly, as it does between GaLore refreshes.
    """
    m, n = matrix.shape
    k = min(rank + OVERSAMPLE, m, n)
    if warm_right is not None and warm_right.shape == (rank, n):
        fresh = _gaussian(n, k - rank, seed, matrix) if k > rank else matrix.new_zeros(n, 0)
        start = torch.cat([warm_right.t().to(matrix.dtype), fresh.to(matrix.dtype)], dim=1)
    else:
        start = _gaussian(n, k, seed, matrix).to(matrix.dtype)
    basis = torch.linalg.qr(start).Q
    for _ in range(POWER_ITERS):
        basis = torch.linalg.qr(matrix.t() @ (matrix @ basis)).Q
    # Rayleigh–Ritz: the SVD of the m×k sketch G·Y gives the singular vectors within span(Y).
    u, _, vh_small = torch.linalg.svd(matrix @ basis, full_matrices=False)
    return u[:, :rank], vh_small[:rank] @ basis.t()


def compute_basis(
    grad: Tensor,
    rank: int,
    side: Side,
    method: str,
    *,
    seed: int = 0,
    step: int = 0,
    warm_left: Tensor | None = None,
    warm_right: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """The new (left, right) basis for an m×n gradient, in the gradient's dtype.

    Args:
        grad: m×n gradient; must be finite (the caller checks, so no SVD ever sees NaN).
        rank: r, with 1 <= r < min(m, n).
        side: ``"left"`` (returns P, None), ``"right"`` (None, Q) or ``"full"`` (P, Q).
        method: ``"svd"`` or ``"randomized"``.
        seed, step: the randomized projector's random matrix is a function of these and the shape.
        warm_left, warm_right: the previous basis, used to warm-start ``randomized``.

    Raises:
        torch.linalg.LinAlgError: if the factorization fails to converge (the caller keeps its old basis).
    """
    work = grad.float() if grad.dtype not in (torch.float32, torch.float64) else grad
    transposed = side == "left"
    if transposed:
        # For a left basis work on Gᵀ, whose right singular vectors are G's left ones; this keeps
        # the warm start (P: m×r) in the space that the subspace iteration runs in.
        work = work.t()
    # The previous basis as k×n rows of the matrix worked on: warm start and sign reference.
    previous = warm_left.t() if transposed and warm_left is not None else (None if transposed else warm_right)
    if previous is not None and not bool(torch.isfinite(previous).all()):
        previous = None
    if method == "svd":
        u, vh = _svd_basis(work, rank)
    elif method == "randomized":
        u, vh = _randomized_basis(work, rank, stable_seed(seed, tuple(grad.shape), step), previous)
    else:
        raise ValueError(f"Invalid projector: {method!r}; choose one of {PROJECTORS}")
    u, vh = _fix_signs(u, vh, previous)
    if transposed:
        return vh.t().to(grad.dtype).contiguous(), None
    if side == "right":
        return None, vh.to(grad.dtype).contiguous()
    return u.to(grad.dtype).contiguous(), vh.to(grad.dtype).contiguous()


def random_basis(
    shape: tuple[int, int], rank: int, side: Side, *, seed: int, like: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """A random orthonormal basis, for a first step whose gradient is not finite."""
    m, n = shape
    gen_seed = stable_seed(seed, shape, -1)
    left = right = None
    if side in ("left", "full"):
        left = torch.linalg.qr(_gaussian(m, rank, gen_seed, like)).Q.to(like.dtype)
    if side in ("right", "full"):
        right = torch.linalg.qr(_gaussian(n, rank, gen_seed + 1, like)).Q.t().contiguous().to(like.dtype)
    return left, right


def transport_moments(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    old: tuple[Tensor | None, Tensor | None],
    new: tuple[Tensor | None, Tensor | None],
) -> None:
    """Carry the Adam moments from the old basis into the new one, in place.

    With R = Q_old Q_newᵀ (right) or R = P_newᵀ P_old (left), a low-rank gradient in the old
    basis maps to the new one as ``g R`` (or ``R g``). The first moment is linear in g, so it
    maps the same way. The second moment is a per-coordinate E[g²]; treating the old
    coordinates as uncorrelated gives E[(g R)_k²] = Σ_j E[g_j²] R_jk², i.e. ``v (R∘R)``, which
    stays non-negative.
    """
    work = torch.promote_types(exp_avg.dtype, torch.float32)  # fp32, or fp64 for fp64 states
    m = exp_avg.to(work)
    v = exp_avg_sq.to(work)
    old_left, old_right = old
    new_left, new_right = new
    if old_right is not None and new_right is not None:
        r = old_right.to(work) @ new_right.to(work).t()
        m, v = m @ r, v @ r.square()
    if old_left is not None and new_left is not None:
        r = new_left.to(work).t() @ old_left.to(work)
        m, v = r @ m, r.square() @ v
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v.clamp_min_(0))


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    """One reusable generator per device: creating a CUDA generator every step costs more than
    the r×n draw itself; reseeding it (``manual_seed``) makes each draw a pure function of the seed."""
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    return gen


def gaussian_projection(
    shape: tuple[int, int], rank: int, side: Side, *, seed: int, like: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """APOLLO's random projection for an m×n matrix: Gaussian entries of variance 1/r.

    Returns ``(P, None)`` with P: m×r for ``side="left"`` (R = Pᵀ G) or ``(None, Q)`` with Q:
    r×n for ``side="right"`` (R = G Qᵀ), in ``like``'s dtype and device. The matrix is a pure
    function of ``seed`` and the shape (drawn by a generator on ``like``'s device), so an
    optimizer stores the 63-bit seed and regenerates the matrix instead of keeping it.
    Columns are not orthonormal: E[Q Qᵀ] = (n/r)·I, and E‖G Qᵀ‖² = ‖G‖² (Johnson–Lindenstrauss),
    which is all the norm ratios of APOLLO need (Zhu et al. 2024).
    """
    m, n = shape
    gen = _generator(like.device).manual_seed(seed)
    rows, cols = (m, rank) if side == "left" else (rank, n)
    if side not in ("left", "right"):
        raise ValueError(f"a Gaussian projection is one-sided; got side {side!r}")
    matrix = torch.randn(rows, cols, generator=gen, device=like.device, dtype=torch.float32)
    matrix = (matrix / rank**0.5).to(like.dtype)
    return (matrix, None) if side == "left" else (None, matrix)
