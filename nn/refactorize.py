"""Weight refactorization: re-split each low-rank product ``B @ A`` into balanced factors.

Glentis et al. 2025 ("Scalable Parameter and Memory Efficient Pretraining for LLM: Recent
Algorithmic Advances and Benchmarking") observe that training the factors of ``W = B @ A``
lets them drift out of balance (one factor's scale grows while the other's shrinks), which
slows low-rank pretraining, and periodically refactorize the product through its SVD. With
thin QR factorizations ``B = Q_B R_B`` (out x r, r x r) and ``A^T = Q_A R_A`` (in x r, r x r),
and the SVD of the small core ``R_B R_A^T = U diag(s) V^T``::

    B @ A = Q_B R_B R_A^T Q_A^T = (Q_B U) diag(s) (Q_A V)^T
    B' = Q_B U diag(sqrt(s)),   A' = diag(sqrt(s)) (Q_A V)^T,    B' @ A' = B @ A

so both new factors have the same singular values sqrt(s) and orthogonal columns / rows, at a
cost of O((out + in) r^2): no out x in matrix is formed. Computed in fp32 (fp64 stays fp64) and
copied into the existing parameters, so optimizers keep their references. The optimizer's
moments for B and A describe the old factors; Glentis et al. pair refactorization with
:func:`lowmem.optim.reset_momentum`.

Directions with (numerically) zero singular value get ``B' = 0`` and a unit-scale row of A'
(sqrt of the median nonzero singular value) instead of zero in both factors: a direction that is
zero in both B and A receives no gradient ever again (both partial derivatives vanish), while
SLTrain's ``B = 0``, ``A ≠ 0`` form trains. A layer whose product is exactly zero (SLTrain at
initialization) is left as it is.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["refactorize_"]


@torch.no_grad()
def _refactorize_factors_(b: torch.Tensor, a: torch.Tensor) -> bool:
    if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
        raise ValueError(
            "refactorize_: the factors hold NaN or inf; refusing to spread them over both factors"
        )
    compute = torch.float64 if b.dtype == torch.float64 else torch.float32
    q_b, r_b = torch.linalg.qr(b.to(compute))
    q_a, r_a = torch.linalg.qr(a.to(compute).t())
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())
    if s.max() == 0:
        return False
    tiny = s <= s.max() * s.numel() * torch.finfo(compute).eps
    root = s.sqrt()
    new_b = (q_b @ u) * torch.where(tiny, torch.zeros_like(root), root)
    row_scale = torch.where(tiny, root[~tiny].median(), root)
    new_a = row_scale[:, None] * (vh @ q_a.t())
    b.copy_(new_b)
    a.copy_(new_a)
    return True


def refactorize_(module: nn.Module) -> int:
    """Balance the factors of every low-rank layer in ``module`` (itself included), in place.

    Applies to :class:`~lowmem.nn.LowRankLinear` (``W = B @ A``) and the low-rank part of
    :class:`~lowmem.nn.SparseLowRankLinear` (``scale * B @ A``; S is untouched). The function
    each layer computes is unchanged up to rounding (see the module docstring for the math).

    Returns:
        The number of layers refactorized (layers whose product is zero are skipped). Raises
        ValueError if ``module`` contains no low-rank layer.
    """
    from lowmem.nn.low_rank import LowRankLinear
    from lowmem.nn.sparse_low_rank import SparseLowRankLinear

    layers = [m for m in module.modules() if isinstance(m, (LowRankLinear, SparseLowRankLinear))]
    if not layers:
        raise ValueError(
            f"refactorize_: {type(module).__name__} holds no LowRankLinear or SparseLowRankLinear; "
            "convert it first (lowmem.nn.convert_to_low_rank / convert_to_sparse_low_rank)"
        )
    return sum(_refactorize_factors_(layer.B, layer.A) for layer in layers)
