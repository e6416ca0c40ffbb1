"""Norm-based scaling shared by Fira and APOLLO: channel norms and the norm-growth limiter.

Both methods turn a low-rank Adam state into scaling factors for a full-rank matrix: the ratio
of the norm of the Adam direction N to the norm of the projected gradient R, per *channel*
(the dimension that is not projected) or for the whole tensor, and both damp sudden growth of
the resulting update with Fira's norm-growth limiter (Chen et al. 2024, arXiv:2410.01623, §4.3).
All functions here are pure tensor code (no ``.item()``), so a CUDA step never syncs.

**Row-sharded matrices (FSDP2, :mod:`lowmem.optim.sharded`).** A rank holds a block of rows and
projects it on the right, so per-row (channel) norms are local, while a norm over the whole
tensor spans every rank's rows: given ``reduce_sum`` (the sum of a tensor over the ranks), it is
sqrt(reduce_sum(‖x_i‖²)), the norm of the whole matrix whose row block x_i is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


#: The sum of a tensor over the ranks that hold the row blocks of one matrix (an all-reduce).
ReduceSum = Callable[[Tensor], Tensor]


def tensor_norm(x: Tensor, reduce_sum: ReduceSum | None = None) -> Tensor:
    """‖x‖ over every element, 0-d, fp32+; with ``reduce_sum``, ‖X‖ of the matrix X whose row block x is.

    The sharded form sums the ranks' squared norms, sqrt(Σ_k ‖x_k‖²): one all-reduce of a scalar.
    """
    norm = torch.linalg.vector_norm(x, dtype=torch.promote_types(x.dtype, torch.float32))
    return norm if reduce_sum is None else reduce_sum(norm.square()).sqrt()


def channel_norms(x: Tensor, axis: int | None, reduce_sum: ReduceSum | None = None) -> Tensor:
    """‖x‖ over ``axis`` (kept as a size-1 dim), or over everything when ``axis`` is None; fp32+.

    ``reduce_sum`` (x is a row block of a row-sharded matrix): a norm over everything spans the
    ranks (:func:`tensor_norm`); a norm per row (``axis=1``) is local and needs none.
    """
    if axis is None:
        return tensor_norm(x, reduce_sum)
    if reduce_sum is not None and axis != 1:
        raise ValueError(f"a row-sharded matrix has local channel norms along axis 1 only, got axis {axis}")
    dtype = torch.promote_types(x.dtype, torch.float32)
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
