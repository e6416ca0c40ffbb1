"""Scaled fp8 matmul: ``out = (a_fp8 * scale_a) @ (b_fp8 * scale_b) (+ bias)``.

fp8 training (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"; torchao float8; survey
"Low-precision training of large language models", 2025): operands are cast to
``float8_e4m3fn`` (forward) or ``float8_e5m2`` (gradients) after absmax scaling
(:func:`lowmem.kernels.fp8_quantize.quantize_fp8`), multiplied on fp8 tensor cores with fp32
accumulation, and the scales applied to the output. Scales are tensor-wise (shape ``()``) or
row-wise (``scale_a`` (M, 1), ``scale_b`` (1, N)), the two layouts ``torch._scaled_mm`` takes.

Implementations (the ``fp8_matmul`` op in :mod:`lowmem._ops`):

``fp8_matmul_ref`` (any device)
    Upcasts both fp8 operands to fp32 (exact) and runs an fp32 GEMM, then scales. A product of
    two fp8 values has at most 8 significant bits, so each product is exact in fp32 and the
    result differs from an fp8 tensor-core GEMM only by fp32 summation order. This is the CPU
    path: it reproduces the numerics, not the speed (it costs an fp32 GEMM plus two casts).
``fp8_matmul_scaled_mm`` (CUDA, compute capability >= 8.9)
    ``torch._scaled_mm`` (cuBLASLt fp8 GEMM). Operand layout it needs is arranged here (a
    row-major, b column-major, K and N padded to multiples of 16 with zeros, which add nothing).
    If cuBLASLt rejects a combination (e.g. row-wise scales with an e5m2 operand on some torch
    versions), it warns once per combination and uses the reference for it, so a run is slower
    but never wrong; ``lowmem.bench.lowp_linear`` prints which path ran.
``lowmem.kernels.fp8_matmul_triton.fp8_matmul`` (Triton; CPU tensors under the interpreter)
    The same contract as one Triton kernel with the scales and bias in its epilogue.
``lowmem.kernels.fp8_matmul_select.fp8_matmul_fastest`` (CUDA, the automatic choice)
    Whichever of the two above measured faster for the problem's size bucket.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fp8_matmul_ref", "fp8_matmul_scaled_mm", "fp8_supported", "scaled_mm_fallbacks"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# Combinations torch._scaled_mm rejected in this process, with its reason (read by the bench).
_FALLBACKS: dict[tuple, str] = {}


def fp8_supported(device: torch.device | str) -> bool:
    """Whether ``device`` has fp8 tensor cores (CUDA compute capability 8.9 or newer)."""
    device = torch.device(device)
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) >= (8, 9)
    )


def scaled_mm_fallbacks() -> dict[tuple, str]:
    """``{(a dtype, b dtype, scale_a kind, scale_b kind, out dtype): reason}`` (kinds "tensor" or
    "row") for every combination that
    :func:`fp8_matmul_scaled_mm` had to run through the reference in this process."""
    return dict(_FALLBACKS)


def _check(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, bias: Tensor | None, name: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.dtype not in _FP8 or b.dtype not in _FP8:
        raise ValueError(
            f"{name}: a and b must be 2-D fp8 (float8_e4m3fn / float8_e5m2) tensors, got "
            f"{a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}"
        )
    m, k = a.shape
    if b.shape[0] != k:
        raise ValueError(
            f"{name}: a is {tuple(a.shape)} and b is {tuple(b.shape)}; need a (M, K) and b (K, N)"
        )
    n = b.shape[1]
    if scale_a.shape not in ((), (m, 1)) or scale_b.shape not in ((), (1, n)):
        raise ValueError(
            f"{name}: scale_a must have shape () or ({m}, 1) and scale_b () or (1, {n}); got "
            f"{tuple(scale_a.shape)} and {tuple(scale_b.shape)}"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{name}: bias must have shape ({n},), got {tuple(bias.shape)}")


def fp8_matmul_ref(
    a: Tensor,
    b: Tensor,
    scale_a: Tensor,
    scale_b: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Emulated scaled fp8 GEMM (see the module docstring).

    Args:
        a: (M, K) fp8; b: (K, N) fp8 (either fp8 dtype each, any strides).
        scale_a: fp32 () or (M, 1); scale_b: fp32 () or (1, N): dequantization factors.
        bias: (N,) or None, added in fp32. out_dtype: the output dtype.

    Returns:
        (M, N) ``out_dtype``: ``(a.float() @ b.float()) * scale_a * scale_b + bias``.
    """
    _check(a, b, scale_a, scale_b, bias, "fp8_matmul_ref")
    with torch.autocast(a.device.type, enabled=False):
        out = (a.float() @ b.float()) * scale_a.float() * scale_b.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _pad_to_16(t: Tensor, dim: int) -> Tensor:
    extra = -t.shape[dim] % 16
    if extra == 0:
        return t
    pad = [0, 0, 0, 0]
    pad[1 if dim == 1 else 3] = extra
    return F.pad(t.view(torch.uint8), pad).view(t.dtype)  # F.pad has no fp8 kernels; zero bits = 0.0


def fp8_matmul_scaled_mm(
    a: Tensor,
    b: Tensor,
    scale_a: Tensor,
    scale_b: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:func:`fp8_matmul_ref`'s contract through ``torch._scaled_mm`` on fp8-capable GPUs."""
    _check(a, b, scale_a, scale_b, bias, "fp8_matmul_scaled_mm")
    kind_a = "tensor" if scale_a.dim() == 0 else "row"
    kind_b = "tensor" if scale_b.dim() == 0 else "row"
    # Both kinds: a rejected mixed call (row x tensor) must not send all-row-wise calls with the
    # same dtypes to the emulation too.
    key = (a.dtype, b.dtype, kind_a, kind_b, out_dtype)
    if key in _FALLBACKS or not fp8_supported(a.device):
        return fp8_matmul_ref(a, b, scale_a, scale_b, bias, out_dtype)
    m, n = a.shape[0], b.shape[1]
    a_p = _pad_to_16(a, 1).contiguous()  # row-major (M, K16)
    b_p = _pad_to_16(_pad_to_16(b, 0), 1)
    b_p = b_p.t().contiguous().t()  # column-major (K16, N16)
    sb = scale_b.float()
    if kind_b == "row" and sb.shape[1] != b_p.shape[1]:
        sb = F.pad(sb, (0, b_p.shape[1] - sb.shape[1]), value=1.0)
    try:
        out = torch._scaled_mm(
            a_p, b_p, scale_a=scale_a.float().contiguous(), scale_b=sb.contiguous(), out_dtype=out_dtype
        )
    except RuntimeError as exc:  # a combination this cuBLASLt/torch build does not serve
        _FALLBACKS[key] = str(exc).splitlines()[0]
        warnings.warn(
            f"torch._scaled_mm rejected fp8 {a.dtype} x {b.dtype} with {kind_a}-wise x {kind_b}-wise scales "
            f"({_FALLBACKS[key]}); using the emulated fp8 matmul for this combination "
            "(slower, same numerics)",
            RuntimeWarning,
            stacklevel=2,
        )
        return fp8_matmul_ref(a, b, scale_a, scale_b, bias, out_dtype)
    out = out[:, :n] if out.shape[1] != n else out
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out[:m]
