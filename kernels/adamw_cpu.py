"""``adam_direction`` on CPU through PyTorch's own fused C++ Adam kernel (``aten::_fused_adam_``).

The reference :func:`lowmem.kernels.adamw.adam_direction_ref` spends about nine PyTorch ops,
each a full pass over the m×r moments, per step; ``torch._fused_adam_`` (the kernel behind
``torch.optim.Adam(fused=True)`` on CPU, vectorized and multi-threaded, computing in fp32 for
low-precision tensors) updates both moments and a parameter in one pass. Run on a zeroed
buffer with lr = 1 it leaves ``-N`` there, N being the bias-corrected normalized direction::

    buf = 0 - 1 · (m̂ / (sqrt(v̂) + eps)) = -N        (torch's eps placement: after bias correction)

so this costs one fused pass plus a zero-fill and a negation, against the reference's nine
passes. It is registered as the ``cpp`` backend of ``adam_direction`` (a compiled C++ CPU op,
though PyTorch's rather than one of ``csrc/``); moments of another dtype than the gradient
(fp32 states for a bf16 gradient) are outside what the fused kernel takes and go to the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowmem.kernels.adamw import adam_direction_ref

__all__ = ["adam_direction_cpu"]


def adam_direction_cpu(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    out: Tensor | None = None,
) -> Tensor:
    """:func:`lowmem.kernels.adamw.adam_direction` for CPU tensors, in one fused pass.

    Same contract as the Triton launcher: moments updated in place, N returned in ``out``
    (which may alias ``grad``) or in a new tensor of grad's dtype.
    """
    same_dtype = grad.dtype == exp_avg.dtype == exp_avg_sq.dtype
    dense = grad.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()
    if not (same_dtype and dense and grad.device.type == "cpu" and grad.shape == exp_avg.shape):
        return adam_direction_ref(
            grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps, step=step, out=out
        )
    buf = torch.zeros_like(exp_avg)
    torch._fused_adam_(
        [buf],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],
        [torch.tensor(float(step))],
        lr=1.0,
        beta1=beta1,
        beta2=beta2,
        weight_decay=0.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
    if out is None:
        return buf.neg_()
    return torch.neg(buf, out=out)
