"""Fira's low-rank step: GaLore-Adam in the subspace plus the norm-scaled full-rank residual.

Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?" (arXiv:2410.01623), Algorithm 1, with torch.optim.AdamW's eps placement and decay
order.
"""

from __future__ import annotations

from torch import Tensor

from lowmem._ops import dispatch
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


def lowrank_fira_update(
    weight: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    left: Tensor | None,
    right: Tensor | None,
    residual_norm: Tensor,
    *,
    side: Side,
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
    """One Fira step for one m×n weight, in place.

    Math, for ``side="right"`` (R = G Qᵀ, m×r, channels = rows; ``left`` is the transpose)::

        R  = G Qᵀ ;  N = AdamDirection(R)                     # moments M, V: m×r, as GaLore
        s_i = ‖N_i‖ / (‖R_i‖ + 1e-8)                          # one factor per channel (row)
        S  = diag(s) (G − R Q)                                # residual: G's part outside span(Q)
        c  = norm-growth limiter on ‖S‖ (γ = 1.01)
        W ← (1 − lr·wd) W − lr · (scale · N Q + c · S)

    Fira's reference code forms the residual as G − scale·R Q, which leaves (1 − scale)·R Q of
    the in-subspace gradient inside the "residual"; here the residual is the true orthogonal
    complement G − R Q, independent of ``scale``. Nothing m×n is materialized: with Q's rows
    orthonormal, ‖S‖² = Σ_i s_i² (‖G_i‖² − ‖R_i‖²) (Pythagoras per row), and the update is
    rewritten as one low-rank GEMM plus a row-scaled copy of G::

        W ← (1 − lr·wd) W − lr · (scale·N − c·s⊙R) Q  − lr · c · s⊙G

    Args:
        weight: m×n view of the parameter, updated in place. grad: m×n gradient.
        exp_avg, exp_avg_sq: low-rank moments (m×r or r×n), updated in place.
        left, right: the orthonormal basis P (m×r) or Q (r×n); only one is set.
        residual_norm: 0-d fp32 tensor, ‖S‖ after limiting at the previous step (negative: none).
        step: the moments' bias-correction step.
        absmax: the moments' fp32 block scales when they are 8-bit codes (``state_dtype="int8"``).
        reduce_sum: for a row block of a row-sharded (FSDP2) weight, ``side="right"``: the sum
            over the ranks. Everything is per row except ‖S‖, summed as Σ_k ‖S_k‖² (one
            all-reduce of a scalar), so each rank computes the single-process update of its rows.
    """
    if reduce_sum is not None and side != "right":
        raise ValueError(f"a row-sharded weight is projected on the right, got side {side!r}")
    axis = channel_axis(side)
    low = project(grad, left, right)
    if maximize:
        low.neg_()
        grad = -grad
    direction = adam_direction_update(
        low, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps, step=step, absmax=absmax
    )
    low_norms = channel_norms(low, axis)
    factors = norm_ratio(channel_norms(direction, axis), low_norms)  # s: m×1 (right) or 1×n (left)
    # s_i·‖G_i − (RQ)_i‖ = s_i·sqrt(‖G_i‖² − ‖R_i‖²); rounding can make the difference slightly < 0.
    residual = channel_norms(grad, axis).square_().addcmul_(low_norms, low_norms, value=-1)
    residual = residual.clamp_min_(0).sqrt_().mul_(factors)
    factors.mul_(limit_norm_growth(tensor_norm(residual, reduce_sum), residual_norm, gamma))  # c·s
    # direction is a fresh tensor: build scale·N − c·s⊙R in place (in fp32 math, stored in its dtype).
    inner = direction.mul_(scale).addcmul_(low, factors, value=-1)
    a, b = (inner, right) if side == "right" else (left, inner)
    dispatch("lowrank_update", weight.device, weight.dtype)(
        weight, a, b, alpha=-lr, beta=1.0 - lr * weight_decay
    )
    weight.addcmul_(grad, factors, value=-lr)
