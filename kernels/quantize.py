"""Absmax quantization of a matrix to int8 with one scale per row or per column (fused Triton kernel).

The operand quantizer of low-precision training matmuls (survey: "Low-precision training of
large language models", 2025; SwitchBack, Wortsman et al. 2023, "Stable and low-precision
training for large-scale vision-language models"; torchao float8 training). A 2-D tensor ``x``
is split into *groups* along one axis and each group gets one fp32 scale from its absolute
maximum, so that a matmul whose sum runs over the *other* axis can take the scales outside the
sum (see :mod:`lowmem.kernels.int8_matmul`)::

    dim = 1 (row-wise, one scale per row):    groups are rows,    scale has shape [rows]
    dim = 0 (column-wise, one per column):    groups are columns, scale has shape [cols]

int8, exactly (every backend does these IEEE fp32 operations in this order)::

    absmax = max |x| over the group's finite elements        (fp32)
    inv    = 127 / absmax          (one correctly rounded division per group)
    scale  = absmax / 127          (the dequantization factor, returned)
    q      = clamp(round_half_even(x * inv), -127, 127)      (int8)
    x     ~= q * scale

The code -128 is never produced, so ``q`` is symmetric and ``-q`` never overflows.

Edge cases, the contract every backend keeps:

- A group whose absmax is at most ``TINY = 2**-120`` (all zeros, or only values so small that
  ``127 / absmax`` would overflow fp32) quantizes to all zeros with ``scale = 0``: its products
  are exactly 0, never 0/0 = NaN.
- A group holding a NaN or ±inf gets ``scale = NaN`` and codes 0, so every output that sums over
  it is NaN: non-finite values propagate at group granularity (as fp32 math would propagate them
  through the matmul, and as mixed-precision loss scalers need in order to detect overflow),
  never turning into silently finite numbers.

fp8 quantization follows the same rules in :mod:`lowmem.kernels.fp8_quantize` (pure PyTorch, so
importing it does not import Triton).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowmem.kernels._triton import HAS_TRITON, interpreting, on_device, tl, triton
from lowmem.kernels.fp8_quantize import TINY

__all__ = [
    "INT8_MAX",
    "TINY",
    "quantize_bytes",
    "quantize_int8",
    "quantize_int8_ref",
]

INT8_MAX = 127
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(x: Tensor, dim: int, name: str, dtypes: tuple[torch.dtype, ...] = _FLOAT_DTYPES) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D (rows, cols), got shape {tuple(x.shape)}; reshape first")
    if dim not in (0, 1):
        raise ValueError(f"{name}: dim must be 1 (one scale per row) or 0 (one per column), got {dim!r}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: x has dtype {x.dtype}; supported: {names}")


if HAS_TRITON:

    @triton.jit
    def _round_half_even(y):
        # floor + exact fraction: x - floor(x) is exact in fp32, so ties are detected exactly
        # (floor(y + 0.5) is wrong for y = 0.5 - 2**-25). libdevice.rint is not in the interpreter.
        r = tl.floor(y)
        frac = y - r
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return r + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)

    @triton.jit
    def _group_absmax_tiles(
        x_ptr, offs_g, offs_r, mask_g, R, stride_xg, stride_xr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr
    ):
        """Per group (row of the (G, R) view): the absmax of its finite elements (fp32) and 1 if it
        holds a NaN/inf (int32), reading the group in BLOCK_R chunks. Shared by the int8 and fp8
        quantizers (lowmem/kernels/fp8_quantize_triton.py)."""
        absmax = tl.zeros((BLOCK_G,), dtype=tl.float32)
        bad = tl.zeros((BLOCK_G,), dtype=tl.int32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            mask = mask_g[:, None] & (rr < R)[None, :]
            x = tl.load(x_ptr + offs_g[:, None] * stride_xg + rr[None, :] * stride_xr, mask=mask, other=0.0)
            a = tl.abs(x.to(tl.float32))
            finite = a < float("inf")  # False for NaN too
            absmax = tl.maximum(absmax, tl.max(tl.where(finite, a, 0.0), axis=1))
            bad = tl.maximum(bad, tl.max(tl.where(finite, 0, 1), axis=1))
        return absmax, bad

    @triton.jit
    def _quantize_int8_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        G,  # number of groups (each gets one scale)
        R,  # elements per group (the reduced axis)
        stride_xg,
        stride_xr,
        stride_qg,
        stride_qr,
        TINY_ABSMAX: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
        mask_g = offs_g < G

        # Pass 1: absmax over finite elements and whether the group holds a non-finite one.
        absmax, bad = _group_absmax_tiles(
            x_ptr, offs_g, offs_r, mask_g, R, stride_xg, stride_xr, BLOCK_G, BLOCK_R
        )

        zero = absmax <= TINY_ABSMAX
        safe = tl.where(zero, 1.0, absmax)
        inv = tl.where(zero | (bad > 0), 0.0, tl.div_rn(tl.full((BLOCK_G,), 127.0, tl.float32), safe))
        scale = tl.where(zero, 0.0, tl.div_rn(safe, tl.full((BLOCK_G,), 127.0, tl.float32)))
        scale = tl.where(bad > 0, float("nan"), scale)
        tl.store(scale_ptr + offs_g, scale, mask=mask_g)

        # Pass 2: quantize (the group's second read mostly hits L2 on GPU).
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            mask = mask_g[:, None] & (rr < R)[None, :]
            x = tl.load(x_ptr + offs_g[:, None] * stride_xg + rr[None, :] * stride_xr, mask=mask, other=0.0)
            x = x.to(tl.float32)
            x = tl.where(tl.abs(x) < float("inf"), x, 0.0)
            y = _round_half_even(x * inv[:, None])
            y = tl.minimum(tl.maximum(y, -127.0), 127.0)
            tl.store(q_ptr + offs_g[:, None] * stride_qg + rr[None, :] * stride_qr, y.to(tl.int8), mask=mask)

else:  # pragma: no cover - exercised only where triton is missing
    _quantize_int8_kernel = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _config(groups: int, reduced: int, reduced_is_contiguous: bool) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_R, num_warps). Tiles run along memory: row-wise quantization of a
    row-major matrix reads long runs of one row; column-wise reads runs across many columns.
    The interpreter runs one program at a time, so it gets the biggest tiles."""
    if interpreting():
        return min(64, _next_pow2(groups)), min(256, _next_pow2(reduced)), 1
    if reduced_is_contiguous:
        return 2, min(2048, max(16, _next_pow2(reduced))), 8
    # Column groups: 32 columns (64-byte bf16 runs) per program keeps K/32 programs busy (128 for
    # a 4096-wide weight), where 128-column tiles would leave most SMs idle. Untuned (no GPU yet).
    return min(32, max(16, _next_pow2(groups))), 64, 4


def quantize_int8(x: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Triton: quantize 2-D ``x`` to int8 with one absmax scale per row (``dim=1``) or column
    (``dim=0``), absmax and quantization fused in one kernel (one program per tile of groups).

    Args:
        x: (rows, cols), fp32 / bf16 / fp16, any strides.
        dim: the axis each scale reduces over: 1 = one scale per row, 0 = one per column.

    Returns:
        ``(q, scale)``: q int8 (rows, cols) contiguous; scale fp32 [rows] (dim=1) or [cols]
        (dim=0). ``x ~= q * scale`` broadcast along ``dim``. Exact rules and edge cases (zero
        groups, NaN/inf) in the module docstring; equal bit for bit to :func:`quantize_int8_ref`.
    """
    if not HAS_TRITON:
        raise RuntimeError("quantize_int8: triton is not importable; use quantize_int8_ref")
    _check(x, dim, "quantize_int8")
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    groups, reduced = (rows, cols) if dim == 1 else (cols, rows)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, scale.zero_()
    if dim == 1:
        sxg, sxr, sqg, sqr = x.stride(0), x.stride(1), q.stride(0), q.stride(1)
    else:
        sxg, sxr, sqg, sqr = x.stride(1), x.stride(0), q.stride(1), q.stride(0)
    block_g, block_r, num_warps = _config(groups, reduced, sxr == 1)
    grid = (triton.cdiv(groups, block_g),)
    with on_device(x):
        _quantize_int8_kernel[grid](
            x, q, scale, groups, reduced, sxg, sxr, sqg, sqr,
            TINY_ABSMAX=TINY, BLOCK_G=block_g, BLOCK_R=block_r, num_warps=num_warps,
        )  # fmt: skip
    return q, scale


def _group_absmax(xf: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(finite mask, absmax over finite elements, group holds a non-finite element)."""
    a = xf.abs()
    finite = a < float("inf")
    absmax = torch.where(finite, a, 0.0).amax(dim=dim)
    bad = (~finite).any(dim=dim)
    return finite, absmax, bad


def quantize_int8_ref(x: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`quantize_int8` (same arguments, same results bit for bit)."""
    _check(x, dim, "quantize_int8_ref", (*_FLOAT_DTYPES, torch.float64))
    xf = x.detach().float()
    if xf.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.int8, device=x.device), torch.zeros(
            x.shape[1 - dim], dtype=torch.float32, device=x.device
        )
    finite, absmax, bad = _group_absmax(xf, dim)
    zero = absmax <= TINY
    safe = torch.where(zero, 1.0, absmax)
    # torch.full_like(...) / safe is one IEEE division; `127 / safe` would be 127 * (1 / safe).
    inv = torch.where(zero | bad, 0.0, torch.full_like(safe, 127.0) / safe)
    scale = torch.where(zero, 0.0, safe / 127.0)
    scale = torch.where(bad, float("nan"), scale)
    y = torch.where(finite, xf, 0.0) * inv.unsqueeze(dim)
    q = torch.round(y).clamp_(-127.0, 127.0).to(torch.int8)  # torch.round: half to even
    return q, scale


def quantize_bytes(rows: int, cols: int, in_itemsize: int) -> int:
    """Bytes moved by :func:`quantize_int8`: x read twice (absmax pass, quantize pass), int8
    codes written, one fp32 scale per group (counted for the larger group count)."""
    return 2 * rows * cols * in_itemsize + rows * cols + 4 * max(rows, cols)
