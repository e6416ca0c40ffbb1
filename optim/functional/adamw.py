"""AdamW and low-rank-projected AdamW updates as functions of explicit tensors.

The optimizer classes decide *when* (steps, refreshes, state allocation); these functions
do the math, each through the dispatch point so the same call runs the Triton kernel on CUDA
and the PyTorch reference (or a compiled op) on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowmem._ops import dispatch
from lowmem.optim.projector import project


def adamw_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool,
) -> None:
    """One ``torch.optim.AdamW`` step for one tensor, in place (decay, moments, update).

    On CPU this is bitwise ``torch.optim.AdamW(foreach=False)``; on CUDA it is one fused kernel.
    """
    dispatch("adamw", param.device, param.dtype)(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        maximize=maximize,
    )


def adam_direction_update(
    low: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    out: Tensor | None = None,
    absmax: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Update Adam's moments with ``low`` in place and return N = m̂ / (sqrt(v̂) + eps).

    ``absmax=None``: ``exp_avg`` / ``exp_avg_sq`` are plain tensors (the ``adam_direction`` op).
    ``absmax=(m_absmax, v_absmax)``: they are 8-bit block-wise codes (Dettmers et al. 2022), and
    the fused ``adamw8bit`` op does dequantize, update and requantize in one pass: run on a zero
    "parameter" with lr = 1 and no decay it leaves -N there (0 - 1·N), as torch's fused Adam does
    for ``adam_direction`` on CPU.
    """
    if absmax is None:
        return dispatch("adam_direction", low.device, low.dtype)(
            low, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps, step=step, out=out
        )
    buf = torch.zeros_like(low, memory_format=torch.contiguous_format)
    dispatch("adamw8bit", low.device, low.dtype)(
        buf,
        low.contiguous(),
        exp_avg,
        absmax[0],
        exp_avg_sq,
        absmax[1],
        lr=1.0,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=0.0,
        step=step,
        maximize=False,
    )
    return buf.neg_() if out is None else torch.neg(buf, out=out)


def lowrank_adamw_update(
    weight: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    left: Tensor | None,
    right: Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    step: float,
    maximize: bool,
    absmax: tuple[Tensor, Tensor] | None = None,
    projected: bool = False,
) -> None:
    """One GaLore-AdamW step for one m×n weight, in place.

    Math (Zhao et al. 2024, Algorithm 2, with torch.optim.AdamW's eps placement and decay order)::

        R  = project(G)                      # G Qᵀ (m×r), Pᵀ G (r×n) or Pᵀ G Qᵀ (r×r)
        M ← β1 M + (1-β1) R ;  V ← β2 V + (1-β2) R²
        N  = (M / (1-β1ᵗ)) / (sqrt(V / (1-β2ᵗ)) + eps)
        W ← (1 - lr·wd) · W - lr · scale · back(N)   # back(N) = N Q, P N or P N Q

    The last line is one GEMM whose epilogue applies decay and update to W in place
    (``lowrank_update``), so no m×n temporary is allocated and W is read and written once.

    Args:
        weight: m×n view of the parameter (any strides), updated in place.
        grad: m×n gradient.
        exp_avg, exp_avg_sq: moments in the low-rank shape, updated in place.
        left, right: the basis P (m×r) and/or Q (r×n), see :mod:`lowmem.optim.projector`.
        step: the bias-correction step of the moments (restarts at 1 after a moment reset).
        projected: ``grad`` is already R = project(G) (low-rank shaped: layer-wise accumulation
            sums micro-batch gradients there); it is then overwritten, as scratch for N.
        absmax: the moments' fp32 block scales when they are 8-bit codes (``state_dtype="int8"``).
    """
    low = grad if projected else project(grad, left, right)
    if maximize:
        low.neg_()
    direction = adam_direction_update(
        low, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps, step=step, out=low, absmax=absmax
    )
    if left is None:
        a, b = direction, right
    elif right is None:
        a, b = left, direction
    else:
        a, b = left, direction @ right
    dispatch("lowrank_update", weight.device, weight.dtype)(
        weight, a, b, alpha=-lr * scale, beta=1.0 - lr * weight_decay
    )
