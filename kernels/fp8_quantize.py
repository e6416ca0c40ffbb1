"""Absmax quantization to fp8 (``float8_e4m3fn`` / ``float8_e5m2``): one scale per tensor,
row or column, the operand quantizer of fp8 training matmuls.

The rules of :mod:`lowmem.kernels.quantize` (int8) with ``max_fp8`` (448 for e4m3, 57344 for
e5m2) in place of 127 and the round-to-nearest-even cast to the fp8 dtype in place of integer
rounding, plus ``dim=None`` for one scale per tensor (tensor-wise scaling, torchao's default
recipe); zero groups get scale 0, groups holding NaN/inf get scale NaN. Pure PyTorch on every
device: it is elementwise and bandwidth-bound, torch's own kernels serve it, and importing this
module does not import Triton (``lowmem.nn`` depends on it).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FP8_MAX", "TINY", "quantize_fp8", "quantize_fp8_delayed_ref"]

#: Groups whose absmax is at most this quantize to zeros (max / absmax would overflow fp32).
TINY = 2.0**-120
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_fp8_args(
    x: Tensor, fp8_dtype: torch.dtype, dim: int | None, name: str, dtypes: tuple[torch.dtype, ...]
) -> None:
    if fp8_dtype not in FP8_MAX:
        raise ValueError(
            f"{name}: fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype}"
        )
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: x must be a 2-D tensor (rows, cols), got {shape}")
    if dim not in (None, 0, 1):
        raise ValueError(f"{name}: dim must be None (tensor), 1 (row) or 0 (column), not {dim!r}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: x has dtype {x.dtype}; supported: {names}")


def quantize_fp8(x: Tensor, fp8_dtype: torch.dtype, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Quantize 2-D ``x`` to ``float8_e4m3fn`` or ``float8_e5m2`` with absmax scaling.

    Args:
        x: (rows, cols), fp32 / bf16 / fp16.
        fp8_dtype: ``torch.float8_e4m3fn`` (forward operands: more mantissa) or
            ``torch.float8_e5m2`` (gradients: more range), the split of Micikevicius et al. 2022,
            "FP8 Formats for Deep Learning".
        dim: ``None`` = one scale for the whole tensor (tensor-wise); 1 = one per row; 0 = one
            per column.

    Returns:
        ``(x_fp8, scale)``: x_fp8 (rows, cols) in ``fp8_dtype``; scale fp32 of shape ``()``,
        ``(rows, 1)`` or ``(1, cols)`` (the shapes ``torch._scaled_mm`` takes), with
        ``x ~= x_fp8.float() * scale``. ``inv = max_fp8 / absmax``, ``scale = absmax / max_fp8``,
        ``x_fp8 = cast(clamp(x * inv, -max_fp8, max_fp8))`` (round to nearest even); zero and
        non-finite groups as in :mod:`lowmem.kernels.quantize`.
    """
    _check_fp8_args(x, fp8_dtype, dim, "quantize_fp8", _FLOAT_DTYPES)
    fmax = FP8_MAX[fp8_dtype]
    xf = x.detach().float()
    a = xf.abs()
    finite = a < float("inf")
    if dim is None:
        absmax = torch.where(finite, a, 0.0).amax() if xf.numel() else xf.new_zeros(())
        bad = (~finite).any()
    else:
        absmax = torch.where(finite, a, 0.0).amax(dim=dim, keepdim=True)
        bad = (~finite).any(dim=dim, keepdim=True)
    zero = absmax <= TINY
    safe = torch.where(zero, 1.0, absmax)
    inv = torch.where(zero | bad, 0.0, torch.full_like(safe, fmax) / safe)
    # Tensor / tensor: one IEEE division on every device (CUDA turns `t / python_float` into a
    # multiplication by the reciprocal, which the Triton kernels' div_rn would not match).
    scale = torch.where(bad, float("nan"), torch.where(zero, 0.0, safe / torch.full_like(safe, fmax)))
    y = (torch.where(finite, xf, 0.0) * inv).clamp_(-fmax, fmax)
    return y.to(fp8_dtype), scale


def quantize_fp8_delayed_ref(
    x: Tensor, fp8_dtype: torch.dtype, amax: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Delayed-scaling cast (torchao float8 / Transformer Engine): quantize ``x`` with the scale
    of an ``amax`` known *before* this tensor (the max of an amax history of earlier steps), and
    return this tensor's absmax for the history. Pure PyTorch; the Triton version is
    :func:`lowmem.kernels.fp8_quantize_triton.quantize_fp8_delayed_triton`.

    Args:
        x: (rows, cols) fp32 / bf16 / fp16 (fp64 too here).
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        amax: fp32 0-d tensor, finite, >= 0.

    Returns:
        ``(x_fp8, scale, amax_now)``: ``inv = max_fp8 / amax`` (0 if ``amax <= TINY``),
        ``x_fp8 = cast(clamp(x * inv, -max_fp8, max_fp8))`` (round to nearest even; values past
        ``amax`` *saturate* at ``±max_fp8`` instead of overflowing to inf/NaN), ``scale =
        amax / max_fp8`` (0 if ``amax <= TINY``; NaN if ``x`` holds NaN/inf, so the GEMM output
        is NaN as with dynamic scaling and loss scalers see the overflow; the codes of non-finite
        elements are 0), ``amax_now = max |x|`` over finite elements (0 for an empty ``x``): the
        history keeps finite values, so one overflowing step does not poison the next ones.
    """
    _check_fp8_args(x, fp8_dtype, None, "quantize_fp8_delayed_ref", _FLOAT_DTYPES)
    fmax = FP8_MAX[fp8_dtype]
    amax = amax.to(device=x.device, dtype=torch.float32).reshape(())
    xf = x.detach().float()
    a = xf.abs()
    finite = a < float("inf")
    amax_now = torch.where(finite, a, 0.0).amax() if xf.numel() else xf.new_zeros(())
    bad = (~finite).any()
    zero = amax <= TINY
    safe = torch.where(zero, 1.0, amax)
    inv = torch.where(zero, 0.0, torch.full_like(safe, fmax) / safe)
    scale = torch.where(bad, float("nan"), torch.where(zero, 0.0, safe / torch.full_like(safe, fmax)))
    y = (torch.where(finite, xf, 0.0) * inv).clamp_(-fmax, fmax)
    return y.to(fp8_dtype), scale, amax_now
