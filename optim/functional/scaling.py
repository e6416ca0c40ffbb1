"""Norm-based scaling shared by Fira and APOLLO: channel norms and the norm-growth limiter.

Both methods turn a low-rank Adam state into scaling factors for a full-rank matrix: the ratio
of the norm of the Adam direction N to the norm of the projected gradient R, per *channel*
(the dimension that is not projected) or for the whole tensor, and both damp sudden growth of
the resulting update with Fira's norm-growth limiter (Chen et al. 2024, arXiv:2410.01623, §4.3).
All functions here are pure tensor code (no ``.item()``), so a CUDA step never syncs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowmem.optim.projector import Side

#: Added to the norm of R before dividing, as in Fira and APOLLO (Chen et al.; Zhu et al.).
RATIO_EPS = 1e-8
#: Fira's norm-growth limit γ: an update's norm may grow by at most 1 % per step.
NORM_GROWTH_LIMIT = 1.01


def channel_axis(side: Side) -> int:
    """The axis of the low-rank matrix that runs along the rank, i.e. that a channel norm reduces.

    ``right`` (R = G Qᵀ, m×r): channels are the m rows, norms over axis 1. ``left`` (R = Pᵀ G,
    r×n): channels are the n columns, norms over axis 0.
    """
    if side == "right":
        return 1
    if side == "left":
        return 0
    raise ValueError(f"channel-wise scaling needs a one-sided projection, got side {side!r}")


def channel_norms(x: Tensor, axis: int | None) -> Tensor:
    """‖x‖ over ``axis`` (kept as a size-1 dim), or over everything when ``axis`` is None; fp32+."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if axis is None:
        return torch.linalg.vector_norm(x, dtype=dtype)
    return torch.linalg.vector_norm(x, dim=axis, keepdim=True, dtype=dtype)


def norm_ratio(direction_norm: Tensor, lowrank_norm: Tensor) -> Tensor:
    """s = ‖N‖ / (‖R‖ + 1e-8), per channel or per tensor; a new tensor."""
    return direction_norm / (lowrank_norm + RATIO_EPS)


def limit_norm_growth(norm: Tensor, previous: Tensor, gamma: float = NORM_GROWTH_LIMIT) -> Tensor:
    """Fira's norm-growth limiter: the factor c to multiply this step's update by; updates ``previous``.

    Math (Chen et al. 2024, eq. 9): if ‖S_t‖ / ‖S_{t-1}‖ > γ then S_t ← S_t · γ‖S_{t-1}‖ / ‖S_t‖,
    where ‖S_{t-1}‖ is the norm *after* limiting. With the papers' 1e-8 guard this is
    c = min(1, γ(‖S_{t-1}‖ + 1e-8) / ‖S_t‖) and the limited norm is min(‖S_t‖, γ(‖S_{t-1}‖ + 1e-8)),
    which is how it is computed: eight small tensor ops and no host sync, since on a GPU every op
    here costs a launch. ``previous`` is a 0-d tensor holding ‖S_{t-1}‖, or a negative number
    before the first step (no limit then). A NaN norm gives c = NaN (that parameter's update is
    garbage anyway) and moves ``previous`` to the bound, never to NaN, so later steps recover.

    Args:
        norm: 0-d tensor, ‖S_t‖ before limiting.
        previous: 0-d tensor, updated in place to ‖S_t‖ after limiting.
    """
    norm = norm.to(previous.dtype)
    bound = previous.add(RATIO_EPS).mul_(gamma).masked_fill_(previous < 0, math.inf)
    factor = (bound / norm).clamp_(max=1.0)  # ‖S_t‖ = 0 gives inf here, so c = 1
    previous.copy_(torch.fmin(norm, bound))
    return factor
