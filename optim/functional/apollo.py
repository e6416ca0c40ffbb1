"""APOLLO's step: scale the raw gradient by factors that a low-rank Adam state estimates.

Zhu et al. 2024, "APOLLO: SGD-like Memory, AdamW-level Performance" (arXiv:2412.05270),
Algorithm 1, with torch.optim.AdamW's eps placement and decay order.
"""

from __future__ import annotations

from torch import Tensor

from lowmem.optim.functional.adamw import adam_direction_update
from lowmem.optim.functional.scaling import (
    NORM_GROWTH_LIMIT,
    ReduceSum,
    channel_axis,
    channel_norms,
    limit_norm_growth,
    norm_ratio,
    tensor_norm,
)
from lowmem.optim.projector import Side, project


def lowrank_apollo_update(
    weight: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    left: Tensor | None,
    right: Tensor | None,
    update_norm: Tensor,
    *,
    side: Side,
    scale_type: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    step: float,
    maximize: bool,
    absmax: tuple[Tensor, Tensor] | None = None,
    gamma: float = NORM_GROWTH_LIMIT,
    reduce_sum: ReduceSum | None = None,
) -> None:
    """One APOLLO step for one m×n weight, in place.

    Math, for ``side="right"`` (R = G Qᵀ, m×r; ``left`` works on columns instead of rows)::

        R = G Qᵀ ;  N = AdamDirection(R)                # moments M, V: m×r
        s = ‖N_i‖ / (‖R_i‖ + 1e-8) per row i            # scale_type="channel"
          = ‖N‖ / (‖R‖ + 1e-8)                         # scale_type="tensor" (APOLLO-Mini)
        U = s ⊙ G ;  c = norm-growth limiter on ‖U‖ (γ = 1.01)
        W ← (1 − lr·wd) W − lr · √scale · c · U

    Only the m (or n, or 1) factors come from the low-rank state; the update direction is the
    raw gradient, so a random projection (not orthonormal) is enough. ‖U‖ is computed from the
    row norms of G (‖U‖² = Σ s_i² ‖G_i‖²), so nothing m×n is allocated.

    Args:
        weight: m×n view of the parameter, updated in place. grad: m×n gradient.
        exp_avg, exp_avg_sq: low-rank moments (m×r or r×n), updated in place.
        left, right: the projection (P: m×r or Q: r×n; one is set).
        update_norm: 0-d tensor, ‖c·U‖ of the previous step (negative: none), updated in place.
        scale_type: ``"channel"`` or ``"tensor"``.
        scale: the update is multiplied by √scale (apollo-torch's convention; APOLLO-Mini uses 128).
        absmax: the moments' fp32 block scales when they are 8-bit codes (``state_dtype="int8"``).
        reduce_sum: for a row block of a row-sharded (FSDP2) weight, ``side="right"``: the sum
            over the ranks. Channel factors are per row (local); the tensor-wise ‖N‖, ‖R‖, ‖G‖
            and the limiter's ‖U‖ are summed as squared norms over the ranks, so each rank
            computes the single-process update of its rows.
    """
    if reduce_sum is not None and side != "right":
        raise ValueError(f"a row-sharded weight is projected on the right, got side {side!r}")
    axis = channel_axis(side) if scale_type == "channel" else None
    low = project(grad, left, right)
    if maximize:
        low.neg_()
        grad = -grad
    direction = adam_direction_update(
        low, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps, step=step, absmax=absmax
    )
    factors = norm_ratio(channel_norms(direction, axis, reduce_sum), channel_norms(low, axis, reduce_sum))
    # ‖s ⊙ G‖: per row, summed over the ranks; tensor-wise, s·‖G‖ is already the whole matrix's.
    update_norm_now = tensor_norm(
        factors * channel_norms(grad, axis, reduce_sum), reduce_sum if axis is not None else None
    )
    factors.mul_(limit_norm_growth(update_norm_now, update_norm, gamma)).mul_(scale**0.5)
    if weight_decay != 0:
        weight.mul_(1.0 - lr * weight_decay)
    weight.addcmul_(grad, factors, value=-lr)
