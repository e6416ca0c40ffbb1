r"""Adafactor and GaLore-projected Adafactor updates as functions of explicit tensors.

Adafactor (Shazeer & Stern, ICML 2018, arXiv:1804.04235) keeps, for a matrix, only the row and
column means of the second-moment EMA instead of the full m×n matrix, and rebuilds the estimate
as their rank-1 product (their Algorithm 4)::

    ρ_t  = min(1e-2, 1/sqrt(t))          (relative_step; warmup_init: min(1e-6·t, 1/sqrt(t)))
           or the external lr            (relative_step=False)
    α_t  = max(eps2, RMS(W_{t-1})) · ρ_t (scale_parameter; else α_t = ρ_t)
    β2_t = 1 - t^decay_rate              (decay_rate = -0.8: β2_1 = 0, then → 1)
    S    = G² + eps1
    r    ← β2_t r + (1-β2_t) mean_cols(S)        # m   (the last-but-one dim)
    c    ← β2_t c + (1-β2_t) mean_rows(S)        # n   (the last dim)
    V̂    = r cᵀ / mean(r)                        # never materialized: rsqrt(r/mean r) ⊗ rsqrt(c)
    U    = G / sqrt(V̂) ;  U ← U / max(1, RMS(U)/clip_threshold) ;  U ← α_t U
    M    ← β1 M + (1-β1) U ;  U = M              (only when beta1 is set; no bias correction)
    W    ← W - weight_decay·α_t·W - U

Tensors with fewer than two dimensions keep the full EMA ``V ← β2_t V + (1-β2_t) S``.
Tensors with more than two factor over their last two dimensions (``r`` has shape
``shape[:-1]``, ``c`` has ``shape[:-2] + shape[-1:]``), as ``transformers.optimization.Adafactor``
does. :func:`adafactor_update` performs these operations in the same order as that class
(checked against transformers 5.24), so plain groups match it bitwise on CPU.

GaLore (Zhao et al., ICML 2024, arXiv:2403.03507) runs the same update on the projected gradient
R = project(G) (m×r, r×n or r×r), so the factored moments are ``m + r`` numbers for an m×n weight
projected on the right, and the back-projected update is scaled by ``scale``
(:func:`lowrank_adafactor_update`), as galore-torch's ``GaLoreAdafactor`` does.

Low-precision (fp16/bf16) parameters are updated in fp32: states are fp32 and the weight is
rounded once per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowmem._ops import dispatch
from lowmem.optim.functional.scaling import ReduceSum
from lowmem.optim.projector import project

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype Adafactor computes and keeps its state in for a parameter of ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def rms(tensor: Tensor, reduce_sum: ReduceSum | None = None) -> Tensor:
    """Root mean square ``‖x‖₂ / sqrt(numel)`` as a 0-d tensor (fp32 for low-precision input).

    ``reduce_sum`` (``tensor`` is a row block of a row-sharded FSDP2 tensor, :mod:`lowmem.optim.sharded`):
    the RMS of the whole tensor, sqrt(Σ_k ‖x_k‖²) / sqrt(Σ_k numel_k), one all-reduce of two scalars.
    """
    dtype = compute_dtype(tensor.dtype)
    norm = torch.linalg.vector_norm(tensor, dtype=dtype if dtype != tensor.dtype else None)
    if reduce_sum is None:
        return norm / (tensor.numel() ** 0.5)
    total = reduce_sum(torch.stack([norm.square(), norm.new_tensor(float(tensor.numel()))]))
    return total[0].sqrt() / total[1].sqrt()


def _whole_mean(x: Tensor, reduce_sum: ReduceSum | None) -> Tensor:
    """mean(x) as a 0-d tensor; with ``reduce_sum``, the mean over every rank's elements of x."""
    if reduce_sum is None:
        return x.mean()
    total = reduce_sum(torch.stack([x.sum(), x.new_tensor(float(x.numel()))]))
    return total[0] / total[1]


def adafactor_step_size(
    weight: Tensor,
    step: int,
    *,
    lr: float | Tensor | None,
    eps2: float,
    relative_step: bool,
    warmup_init: bool,
    scale_parameter: bool,
    reduce_sum: ReduceSum | None = None,
) -> float | Tensor:
    """α_t: the step size of Adafactor step ``step`` (1-based) for the weight before the update.

    ``relative_step`` uses ρ_t = min(1e-2, 1/sqrt(t)) (``warmup_init``: min(1e-6·t, 1/sqrt(t)))
    instead of ``lr``; ``scale_parameter`` multiplies by max(eps2, RMS(weight)) (section 8 of the
    paper). Returns a Python float, or a 0-d tensor in :func:`compute_dtype` of the weight when
    the parameter scale wins: the same value, rounded the same way, as transformers' Adafactor.
    ``reduce_sum``: ``weight`` is a row block of a sharded weight; RMS over the whole weight.
    """
    if relative_step:
        min_step = 1e-6 * step if warmup_init else 1e-2
        relative = min(min_step, 1.0 / math.sqrt(step))
    else:
        relative = float(lr) if isinstance(lr, Tensor) else lr  # type: ignore[assignment]
    if not scale_parameter:
        return relative
    weight_rms = rms(weight, reduce_sum)
    # max(eps2, rms) written out: the tensor product rounds in the weight's compute dtype.
    return weight_rms * relative if bool(weight_rms > eps2) else eps2 * relative


def beta2_at(step: int, decay_rate: float) -> float:
    """β2_t = 1 - t^decay_rate: 0 at t = 1 (the EMA starts as the first S), then approaching 1."""
    return 1.0 - math.pow(step, decay_rate)


def _factored_direction(
    grad: Tensor, row: Tensor, col: Tensor, beta2: float, eps1: float, reduce_sum: ReduceSum | None = None
) -> Tensor:
    """Update the factored EMA of grad² + eps1 in place and return grad / sqrt(V̂), a new tensor.

    ``reduce_sum`` (``grad`` is the row block G_k, m_k×n, of a row-sharded m×n matrix): the row
    statistics are the rank's own; the column means and mean(r) span every rank's rows, so the
    local column sums, Σ r_k and m_k go through one all-reduce of n + 2 numbers and are divided
    by m. Every rank then holds the same c, as one process would.
    """
    squared = grad**2 + eps1
    row.mul_(beta2).add_(squared.mean(dim=-1), alpha=1.0 - beta2)
    # A tensor of 3+ dims (a conv weight (out, in, k...)) is factored over its last two dims, for
    # each index of the leading ones; FSDP2 shards dim 0, a leading dim, so its statistics are the
    # rank's own and need no reduction (only RMS(W) and RMS(U) below span the whole tensor).
    if reduce_sum is None or grad.dim() > 2:
        col_mean = squared.mean(dim=-2)
        row_mean = row.mean(dim=-1, keepdim=True)
    else:
        local = torch.cat([squared.sum(dim=0), row.sum().reshape(1), row.new_tensor([float(grad.shape[0])])])
        total = reduce_sum(local)
        col_mean, row_mean = total[:-2] / total[-1], total[-2:-1] / total[-1]
    col.mul_(beta2).add_(col_mean, alpha=1.0 - beta2)
    # sqrt(V̂) factors: rsqrt(r / mean(r)) per row times rsqrt(c) per column.
    row_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
    col_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(row_factor, col_factor).mul_(grad)


def _full_direction(grad: Tensor, exp_avg_sq: Tensor, beta2: float, eps1: float) -> Tensor:
    """Update the unfactored EMA of grad² + eps1 in place and return grad / sqrt(V), a new tensor."""
    squared = grad**2 + eps1
    exp_avg_sq.mul_(beta2).add_(squared, alpha=1.0 - beta2)
    return exp_avg_sq.rsqrt().mul_(grad)


def _clip_and_scale(
    update: Tensor,
    clip_threshold: float,
    step_size: float | Tensor,
    exp_avg: Tensor | None,
    beta1: float | None,
    reduce_sum: ReduceSum | None = None,
) -> Tensor:
    """U / max(1, RMS(U)/d) · α, then the optional first-moment EMA; returns the final update.

    ``reduce_sum``: U is a row block of a sharded update; RMS(U) over the whole update.
    """
    update.div_((rms(update, reduce_sum) / clip_threshold).clamp_(min=1.0))
    update.mul_(step_size)
    if exp_avg is not None and beta1 is not None:
        exp_avg.mul_(beta1).add_(update, alpha=1.0 - beta1)
        return exp_avg
    return update


def adafactor_update(
    param: Tensor,
    grad: Tensor,
    exp_avg_sq_row: Tensor | None,
    exp_avg_sq_col: Tensor | None,
    exp_avg_sq: Tensor | None,
    exp_avg: Tensor | None,
    *,
    lr: float | Tensor | None,
    step: int,
    eps: tuple[float, float],
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    maximize: bool = False,
    reduce_sum: ReduceSum | None = None,
) -> None:
    """One Adafactor step for one tensor, in place; ``transformers.optimization.Adafactor`` bitwise.

    Args:
        param: the parameter, any shape and float dtype; fp16/bf16 are updated through an fp32 copy.
        grad: its gradient, same shape.
        exp_avg_sq_row, exp_avg_sq_col: for ``param.dim() >= 2``: the factored second moment,
            shapes ``shape[:-1]`` and ``shape[:-2] + shape[-1:]``, dtype :func:`compute_dtype`.
        exp_avg_sq: for ``param.dim() < 2``: the full second moment (param's shape), else None.
        exp_avg: the first moment (param's shape) when ``beta1`` is set, else None.
        step: this step's 1-based count (the state's step after incrementing).
        eps: (eps1 added to grad², eps2 the floor of the parameter scale).
        weight_decay: decoupled, multiplied by α_t (the full step size), applied before the update.
        maximize: ascend instead (an extension; transformers' Adafactor has no such option).
        reduce_sum: for the row block (dim 0) of a row-sharded FSDP2 tensor, the sum over the
            ranks (:func:`lowmem.optim.sharded.reduce_sum_of`): RMS(W), RMS(U) and, for a matrix,
            the column means and mean(r) then span the whole tensor; a tensor of 3 or more dims
            factors over its last two, inside the rank's rows; None: one process.
    """
    weight = param.float() if param.dtype in _LOW_PRECISION else param
    grad = grad.float() if grad.dtype in _LOW_PRECISION else grad
    if maximize:
        grad = -grad
    step_size = adafactor_step_size(
        weight,
        step,
        lr=lr,
        eps2=eps[1],
        relative_step=relative_step,
        warmup_init=warmup_init,
        scale_parameter=scale_parameter,
        reduce_sum=reduce_sum,
    )
    beta2 = beta2_at(step, decay_rate)
    if exp_avg_sq_row is not None and exp_avg_sq_col is not None:
        update = _factored_direction(grad, exp_avg_sq_row, exp_avg_sq_col, beta2, eps[0], reduce_sum)
    else:
        assert exp_avg_sq is not None, "unfactored Adafactor needs exp_avg_sq"
        update = _full_direction(grad, exp_avg_sq, beta2, eps[0])  # element-wise: local
    update = _clip_and_scale(update, clip_threshold, step_size, exp_avg, beta1, reduce_sum)
    if weight_decay != 0:
        weight.add_(weight, alpha=-weight_decay * step_size)
    weight.add_(-update)
    if weight is not param:
        param.copy_(weight)


def lowrank_adafactor_update(
    weight: Tensor,
    grad: Tensor,
    exp_avg_sq_row: Tensor,
    exp_avg_sq_col: Tensor,
    exp_avg: Tensor | None,
    left: Tensor | None,
    right: Tensor | None,
    *,
    lr: float | Tensor | None,
    step: int,
    moment_step: int,
    eps: tuple[float, float],
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    scale: float,
    maximize: bool = False,
    reduce_sum: ReduceSum | None = None,
) -> None:
    """One GaLore-Adafactor step for one m×n weight, in place.

    Math (Zhao et al. 2024, with Adafactor as the inner optimizer, as galore-torch's
    ``GaLoreAdafactor``)::

        R   = project(G)                          # G Qᵀ (m×r), Pᵀ G (r×n) or Pᵀ G Qᵀ (r×r)
        U   = Adafactor direction of R with factored moments r (R's rows) and c (R's columns),
              clipped to RMS <= clip_threshold, times α_t; U = M after the β1 EMA if beta1 is set
        W  ← (1 - weight_decay·α_t) · W - scale · back(U)     # back(U) = U Q, P U or P U Q

    α_t uses RMS of the full weight W and the training step ``step`` (the relative step size is
    a schedule of training time); β2_t uses ``moment_step`` (equal to ``step`` unless the moments
    were reset at a refresh, when it restarts at 1 so that the zeroed factors are replaced).
    The last line is one GEMM with a beta term (``lowrank_update``): no m×n temporary.

    Memory: r and c hold ``m + r`` (right), ``r + n`` (left) or ``2r`` (full) numbers; M (if
    beta1) has the low-rank shape.

    Args:
        weight: m×n view of the parameter (any float dtype), updated in place.
        grad: m×n gradient in weight's dtype; projected in that dtype (the GEMM accumulates in
            fp32), then everything runs in :func:`compute_dtype`.
        exp_avg_sq_row, exp_avg_sq_col: the factored second moment of R: shapes (R.shape[0],) and
            (R.shape[1],), dtype :func:`compute_dtype` of weight's.
        exp_avg: first moment in R's shape, or None.
        left, right: the basis P (m×r) and/or Q (r×n), see :mod:`lowmem.optim.projector`.
        scale: multiplies the back-projected update (galore-torch's ``scale``).
        reduce_sum: for the row block W_k (m_k×n) of a row-sharded FSDP2 weight, projected on the
            right (``left`` None): R_k = G_k Qᵀ is the row block k of R, so r is local, and c,
            mean(r), RMS(U) and RMS(W) are summed over the ranks (see :func:`adafactor_update`).
    """
    if reduce_sum is not None and left is not None:
        raise ValueError("a row-sharded weight is projected on the right (left basis must be None)")
    work = compute_dtype(weight.dtype)
    low = project(grad, left, right).to(work)
    if maximize:
        low.neg_()
    step_size = adafactor_step_size(
        weight,
        step,
        lr=lr,
        eps2=eps[1],
        relative_step=relative_step,
        warmup_init=warmup_init,
        scale_parameter=scale_parameter,
        reduce_sum=reduce_sum,
    )
    update = _factored_direction(
        low, exp_avg_sq_row, exp_avg_sq_col, beta2_at(moment_step, decay_rate), eps[0], reduce_sum
    )
    update = _clip_and_scale(update, clip_threshold, step_size, exp_avg, beta1, reduce_sum)
    step_value = float(step_size)
    # Factors in the compute dtype (fp32 for a low-precision weight: lowrank_update accepts that).
    left = left.to(work) if left is not None else None
    right = right.to(work) if right is not None else None
    if left is None:
        a, b = update, right
    elif right is None:
        a, b = left, update
    else:
        a, b = left, update @ right
    dispatch("lowrank_update", weight.device, weight.dtype)(
        weight, a, b, alpha=-scale, beta=1.0 - weight_decay * step_value
    )


def transport_factored_moments(
    exp_avg_sq_row: Tensor,
    exp_avg_sq_col: Tensor,
    exp_avg: Tensor | None,
    old: tuple[Tensor | None, Tensor | None],
    new: tuple[Tensor | None, Tensor | None],
    reduce_sum: ReduceSum | None = None,
) -> None:
    """Carry Adafactor's factored moments from the old GaLore basis into the new one, in place.

    With T_R = Q_old Q_newᵀ (right) and T_L = P_newᵀ P_old (left), a low-rank gradient in the
    old basis maps to the new one as ``T_L g T_R``; the first moment is linear in g and maps the
    same way. For the second moment, take Adafactor's own estimate V̂ = r cᵀ / s (s = mean(r) =
    mean(c), the grand mean) and carry it as :func:`lowmem.optim.projector.transport_moments`
    carries a full one (uncorrelated coordinates: V ↦ (T_L∘T_L) V (T_R∘T_R)). The carried V̂ is
    again rank 1, and its exact row and column means are::

        a = (T_L∘T_L) r,   b = (T_R∘T_R)ᵀ c
        r ← a · mean(b) / s,   c ← b · mean(a) / s

    so the rotated side's factor is carried through the rotation and the other factor is
    rescaled to keep mean(r) = mean(c); both stay non-negative. When the new basis spans the
    old subspace, the rows of T∘T sum to 1 and the grand mean is unchanged.

    Args:
        exp_avg_sq_row: (R.shape[0],), exp_avg_sq_col: (R.shape[1],), exp_avg: R's shape or None.
        old, new: (P, Q) before and after the refresh (None for the side not projected).
        reduce_sum: the row block of a row-sharded weight (right bases only): mean(r) and mean(a)
            span every rank's rows.
    """
    if reduce_sum is not None and (old[0] is not None or new[0] is not None):
        raise ValueError("a row-sharded weight is projected on the right (left bases must be None)")
    work = torch.promote_types(exp_avg_sq_row.dtype, torch.float32)
    row = exp_avg_sq_row.to(work)
    col = exp_avg_sq_col.to(work)
    grand_mean = _whole_mean(row, reduce_sum).clamp_min(torch.finfo(work).tiny)
    moment = exp_avg.to(work) if exp_avg is not None else None
    old_left, old_right = old
    new_left, new_right = new
    if old_right is not None and new_right is not None:
        turn = old_right.to(work) @ new_right.to(work).t()
        col = col @ turn.square()
        moment = moment @ turn if moment is not None else None
    if old_left is not None and new_left is not None:
        turn = new_left.to(work).t() @ old_left.to(work)
        row = turn.square() @ row
        moment = turn @ moment if moment is not None else None
    row_mean, col_mean = _whole_mean(row, reduce_sum), col.mean()
    exp_avg_sq_row.copy_(row * (col_mean / grand_mean))
    exp_avg_sq_col.copy_(col * (row_mean / grand_mean))
    if exp_avg is not None and moment is not None:
        exp_avg.copy_(moment)
