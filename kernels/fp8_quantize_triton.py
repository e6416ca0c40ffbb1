"""Fused fp8 quantization in Triton: absmax, scale and cast in one kernel per row / column, two
for a whole tensor, and the delayed-scaling cast that needs no absmax before it.

The contracts, bit for bit, of :func:`lowmem.kernels.fp8_quantize.quantize_fp8` (dynamic
absmax scaling; Micikevicius et al. 2022, "FP8 Formats for Deep Learning") and
:func:`lowmem.kernels.fp8_quantize.quantize_fp8_delayed_ref` (delayed scaling, torchao float8 /
NVIDIA Transformer Engine): ``inv = max_fp8 / absmax`` (one IEEE division), ``scale = absmax /
max_fp8``, ``x_fp8 = cast(clamp(x * inv, -max_fp8, max_fp8))`` with round-to-nearest-even;
zero groups get scale 0 and codes ±0, groups holding NaN/inf get scale NaN and codes ±0.

Kernels:

``_quantize_fp8_groups_kernel`` (``dim=1`` rows / ``dim=0`` columns)
    One program per tile of groups: pass 1 reads the group for its absmax over finite values
    (and whether it holds a non-finite one), pass 2 re-reads it (mostly from L2) and casts. One
    launch, no host synchronization.
``_absmax_partials_kernel`` + ``_quantize_fp8_tensor_kernel`` (``dim=None``, one scale)
    A tensor-wide maximum needs every element before the first cast, so it takes two launches:
    the first writes one partial absmax per program (``+inf`` for a block holding NaN/inf; at most
    ``MAX_PARTIALS`` programs, each looping over its share of the tensor), the second has every
    program reduce those few partials itself (a max is order independent, so each program gets
    the same absmax bit for bit; no atomics, no host sync, deterministic), derive inv/scale and
    cast its tile.
``_cast_fp8_delayed_kernel`` (delayed scaling)
    Casts with a scale derived from a given ``amax`` (the max of an amax history) and, in the
    same pass, writes per-program partial absmaxes of the current tensor for the history update
    (reduced by a tiny ``amax`` afterwards). The cast does not wait for any reduction of the
    tensor it casts, which is the point of delayed scaling; values past the delayed amax
    saturate at ``±max_fp8``.

Rounding: Triton's interpreter converts fp32 to fp8 by rounding half away from zero on the
first dropped bit only (and breaks when the mantissa carries), where GPUs round to nearest
even. So every kernel first rounds the fp32 value onto the fp8 grid itself (:func:`_to_fp8_grid`:
integer round-half-even of the fp32 bits for normal values, ``(|y| + C) - C`` with a power-of-two
``C`` for subnormals), after which the cast is exact on both; it is a handful of integer ops
in a memory-bound kernel, and the tests then check the very arithmetic the GPU runs.

On CUDA GPUs without fp8 support (compute capability < 8.9) the launchers return the PyTorch
references' results (Triton cannot convert to fp8 there; torch can, with the same bits).

Cost model (bytes): groups: ``2 * numel * in_itemsize + numel + 4 * groups``; tensor-wise:
the same plus the partials; delayed: ``numel * (in_itemsize + 1)`` (one read).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowmem.kernels._triton import HAS_TRITON, interpreting, on_device, tl, triton
from lowmem.kernels.fp8_matmul import fp8_supported
from lowmem.kernels.fp8_quantize import FP8_MAX, TINY, _check_fp8_args, quantize_fp8, quantize_fp8_delayed_ref

__all__ = ["MAX_PARTIALS", "quantize_fp8_bytes", "quantize_fp8_delayed_triton", "quantize_fp8_triton"]

#: Most partial maxima the tensor-wise absmax pass writes (each program of the cast reads them
#: all). The delayed cast is not capped: it writes one per tile, reduced by one torch ``amax``.
#: 256, a guess for GPU speed not yet measured: every cast program re-reads all partials (at
#: 1024, ~16 MB of L2 reads for an 8192x4096 bf16 tensor of 64 MB), while 256 programs looping
#: over their share still fill a GPU for the partial pass. A max is order independent, so the
#: codes and scale are the same bits for any value (the tests check them against the reference).
MAX_PARTIALS = 256

# (mantissa bits, smallest normal, subnormal rounding constant 1.5 * 2**(23 + log2(smallest
# subnormal)): |y| + C lies in [C, 2C) whose fp32 spacing is the smallest subnormal).
_GRID = {
    torch.float8_e4m3fn: (3, 2.0**-6, 1.5 * 2.0**14),  # smallest subnormal 2**-9
    torch.float8_e5m2: (2, 2.0**-14, 1.5 * 2.0**7),  # smallest subnormal 2**-16
}

if HAS_TRITON:
    from lowmem.kernels.quantize import _group_absmax_tiles  # the absmax pass shared with int8

    @triton.jit
    def _to_fp8_grid(y, MANT_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr):
        """Finite fp32 ``y`` (``|y| <= max_fp8``) rounded to nearest even on the fp8 grid, as fp32.

        Normal range: drop the low ``23 - MANT_BITS`` mantissa bits with round-half-even in
        integer arithmetic on the bits (a carry into the exponent is the correct next binade).
        Subnormal range: ``(|y| + C) - C`` rounds to a multiple of the smallest subnormal (one
        IEEE addition, nearest even). The sign bit is put back as is, so -0.0 and tiny negative
        values give -0.0 like torch's cast.
        """
        DROP: tl.constexpr = 23 - MANT_BITS
        HALF_MINUS_ONE: tl.constexpr = (1 << (DROP - 1)) - 1
        KEEP: tl.constexpr = 0x7FFFFFFF - ((1 << DROP) - 1)
        bits = y.to(tl.uint32, bitcast=True)
        sign = bits & 0x80000000
        mag = bits & 0x7FFFFFFF
        normal = (mag + HALF_MINUS_ONE + ((mag >> DROP) & 1)) & KEEP
        a = tl.abs(y)
        sub = ((a + SUB_MAGIC) - SUB_MAGIC).to(tl.uint32, bitcast=True)
        rounded = tl.where(a < MIN_NORMAL, sub, normal)
        return (rounded | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _scale_from_absmax(absmax, bad, FP8_MAX_VAL: tl.constexpr, TINY_ABSMAX: tl.constexpr):
        """(inv, scale) of the contract: zero groups inv 0 / scale 0, bad groups inv 0 / scale NaN."""
        zero = absmax <= TINY_ABSMAX
        safe = tl.where(zero, 1.0, absmax)
        fmax = tl.full(safe.shape, FP8_MAX_VAL, tl.float32)
        inv = tl.where(zero | bad, 0.0, tl.div_rn(fmax, safe))
        scale = tl.where(zero, 0.0, tl.div_rn(safe, fmax))
        scale = tl.where(bad, float("nan"), scale)
        return inv, scale

    @triton.jit
    def _cast_tile(x, inv, FP8_MAX_VAL: tl.constexpr, MANT_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
                   SUB_MAGIC: tl.constexpr):  # fmt: skip
        """fp32 values of ``cast(clamp(where(finite, x, 0) * inv, ±max))`` on the fp8 grid."""
        x = x.to(tl.float32)
        y = tl.where(tl.abs(x) < float("inf"), x, 0.0) * inv
        y = tl.minimum(tl.maximum(y, -FP8_MAX_VAL), FP8_MAX_VAL)
        return _to_fp8_grid(y, MANT_BITS, MIN_NORMAL, SUB_MAGIC)

    @triton.jit
    def _quantize_fp8_groups_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        G,  # number of groups (each gets one scale)
        R,  # elements per group (the reduced axis)
        stride_xg,
        stride_xr,
        stride_qg,
        stride_qr,
        FP8_MAX_VAL: tl.constexpr,
        MANT_BITS: tl.constexpr,
        MIN_NORMAL: tl.constexpr,
        SUB_MAGIC: tl.constexpr,
        TINY_ABSMAX: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
        mask_g = offs_g < G

        absmax, bad = _group_absmax_tiles(
            x_ptr, offs_g, offs_r, mask_g, R, stride_xg, stride_xr, BLOCK_G, BLOCK_R
        )

        inv, scale = _scale_from_absmax(absmax, bad > 0, FP8_MAX_VAL, TINY_ABSMAX)
        tl.store(scale_ptr + offs_g, scale, mask=mask_g)

        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            mask = mask_g[:, None] & (rr < R)[None, :]
            x = tl.load(x_ptr + offs_g[:, None] * stride_xg + rr[None, :] * stride_xr, mask=mask, other=0.0)
            y = _cast_tile(x, inv[:, None], FP8_MAX_VAL, MANT_BITS, MIN_NORMAL, SUB_MAGIC)
            q_ptrs = q_ptr + offs_g[:, None] * stride_qg + rr[None, :] * stride_qr
            tl.store(q_ptrs, y.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _absmax_partials_kernel(
        x_ptr,
        partial_ptr,
        R,
        C,
        stride_xr,
        stride_xc,
        ROWS_PER_PROGRAM,  # a multiple of BLOCK_R
        COLS_PER_PROGRAM,  # a multiple of BLOCK_C
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """partial[i, j] = absmax of finite values of program (i, j)'s block, +inf if it holds NaN/inf."""
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        r_start = pid_r.to(tl.int64) * ROWS_PER_PROGRAM
        c_start = pid_c.to(tl.int64) * COLS_PER_PROGRAM
        offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
        absmax = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for r0 in range(0, ROWS_PER_PROGRAM, BLOCK_R):
            rr = r_start + r0 + offs_r
            for c0 in range(0, COLS_PER_PROGRAM, BLOCK_C):
                cc = c_start + c0 + offs_c
                mask = (rr < R)[:, None] & (cc < C)[None, :]
                x = tl.load(x_ptr + rr[:, None] * stride_xr + cc[None, :] * stride_xc, mask=mask, other=0.0)
                a = tl.abs(x.to(tl.float32))
                a = tl.where(a < float("inf"), a, float("inf"))  # NaN -> +inf: "non-finite seen"
                absmax = tl.maximum(absmax, a)
        tl.store(partial_ptr + pid_r * tl.num_programs(1) + pid_c, tl.max(tl.max(absmax, axis=1), axis=0))

    @triton.jit
    def _reduce_partials(partial_ptr, P, BLOCK_P: tl.constexpr):
        """(absmax over finite values, any non-finite) from the partials."""
        offs = tl.arange(0, BLOCK_P)
        part = tl.load(partial_ptr + offs, mask=offs < P, other=0.0)
        bad = tl.max(tl.where(part == float("inf"), 1, 0), axis=0) > 0
        return tl.max(tl.where(part == float("inf"), 0.0, part), axis=0), bad

    @triton.jit
    def _quantize_fp8_tensor_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        partial_ptr,
        P,
        R,
        C,
        stride_xr,
        stride_xc,
        stride_qr,
        stride_qc,
        FP8_MAX_VAL: tl.constexpr,
        MANT_BITS: tl.constexpr,
        MIN_NORMAL: tl.constexpr,
        SUB_MAGIC: tl.constexpr,
        TINY_ABSMAX: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        absmax, bad = _reduce_partials(partial_ptr, P, BLOCK_P)
        inv, scale = _scale_from_absmax(absmax, bad, FP8_MAX_VAL, TINY_ABSMAX)
        # 1-D grid (2**31 - 1 programs) of row-major tiles: a 2-D grid's axis 1 stops at 65535.
        pid = tl.program_id(0)
        tiles_c = tl.cdiv(C, BLOCK_C)
        pid_r = pid // tiles_c
        pid_c = pid % tiles_c
        if pid == 0:
            tl.store(scale_ptr, scale)
        rr = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cc = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rr < R)[:, None] & (cc < C)[None, :]
        x = tl.load(x_ptr + rr[:, None] * stride_xr + cc[None, :] * stride_xc, mask=mask, other=0.0)
        y = _cast_tile(x, inv, FP8_MAX_VAL, MANT_BITS, MIN_NORMAL, SUB_MAGIC)
        tl.store(
            q_ptr + rr[:, None] * stride_qr + cc[None, :] * stride_qc, y.to(q_ptr.dtype.element_ty), mask=mask
        )

    @triton.jit
    def _cast_fp8_delayed_kernel(
        x_ptr,
        q_ptr,
        amax_ptr,  # 0-d fp32: the delayed amax (max of the history)
        partial_ptr,  # one per program: absmax of the finite values of its tile
        bad_ptr,  # one per program: 1 if its tile holds NaN/inf
        R,
        C,
        stride_xr,
        stride_xc,
        stride_qr,
        stride_qc,
        FP8_MAX_VAL: tl.constexpr,
        MANT_BITS: tl.constexpr,
        MIN_NORMAL: tl.constexpr,
        SUB_MAGIC: tl.constexpr,
        TINY_ABSMAX: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        amax = tl.load(amax_ptr)
        zero = amax <= TINY_ABSMAX
        inv = tl.where(zero, 0.0, tl.div_rn(FP8_MAX_VAL, tl.where(zero, 1.0, amax)))
        pid = tl.program_id(0)  # 1-D grid of row-major tiles, as _quantize_fp8_tensor_kernel
        tiles_c = tl.cdiv(C, BLOCK_C)
        pid_r = pid // tiles_c
        pid_c = pid % tiles_c
        rr = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cc = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rr < R)[:, None] & (cc < C)[None, :]
        x = tl.load(x_ptr + rr[:, None] * stride_xr + cc[None, :] * stride_xc, mask=mask, other=0.0)
        x = x.to(tl.float32)
        a = tl.abs(x)
        finite = a < float("inf")  # False for NaN too
        tl.store(partial_ptr + pid, tl.max(tl.max(tl.where(finite, a, 0.0), axis=1), axis=0))
        tl.store(bad_ptr + pid, tl.max(tl.max(tl.where(finite, 0, 1), axis=1), axis=0))
        y = _cast_tile(x, inv, FP8_MAX_VAL, MANT_BITS, MIN_NORMAL, SUB_MAGIC)
        tl.store(
            q_ptr + rr[:, None] * stride_qr + cc[None, :] * stride_qc, y.to(q_ptr.dtype.element_ty), mask=mask
        )

else:  # pragma: no cover - exercised only where triton is missing
    _quantize_fp8_groups_kernel = None
    _absmax_partials_kernel = None
    _quantize_fp8_tensor_kernel = None
    _cast_fp8_delayed_kernel = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _constants(fp8_dtype: torch.dtype) -> dict:
    mant, min_normal, magic = _GRID[fp8_dtype]
    return {
        "FP8_MAX_VAL": FP8_MAX[fp8_dtype],
        "MANT_BITS": mant,
        "MIN_NORMAL": min_normal,
        "SUB_MAGIC": magic,
        "TINY_ABSMAX": TINY,
    }


def _tile_2d(rows: int, cols: int, col_contiguous: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the elementwise tile kernels (tensor-wise, delayed):
    long runs along the contiguous axis; the interpreter gets big tiles (few programs)."""
    if interpreting():
        return min(64, _next_pow2(rows)), min(256, _next_pow2(cols)), 1
    if col_contiguous:
        return min(16, _next_pow2(rows)), min(512, max(16, _next_pow2(cols))), 4
    return min(512, max(16, _next_pow2(rows))), min(16, _next_pow2(cols)), 4


def _groups_config(groups: int, reduced: int, reduced_is_contiguous: bool) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_R, num_warps), as :func:`lowmem.kernels.quantize._config` (untuned on GPU)."""
    if interpreting():
        return min(64, _next_pow2(groups)), min(256, _next_pow2(reduced)), 1
    if reduced_is_contiguous:
        return 2, min(2048, max(16, _next_pow2(reduced))), 8
    return min(32, max(16, _next_pow2(groups))), 64, 4


def _quantize_tensorwise(x: Tensor, q: Tensor, consts: dict) -> Tensor:
    rows, cols = x.shape
    block_r, block_c, warps = _tile_2d(rows, cols, x.stride(1) == 1)
    # Partials: at most MAX_PARTIALS programs, each covering whole tiles.
    tiles_r, tiles_c = triton.cdiv(rows, block_r), triton.cdiv(cols, block_c)
    grid_c = min(tiles_c, MAX_PARTIALS)
    grid_r = min(tiles_r, max(1, MAX_PARTIALS // grid_c))
    rows_per = triton.cdiv(tiles_r, grid_r) * block_r
    cols_per = triton.cdiv(tiles_c, grid_c) * block_c
    grid_r, grid_c = triton.cdiv(rows, rows_per), triton.cdiv(cols, cols_per)
    partials = torch.empty(grid_r * grid_c, dtype=torch.float32, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    with on_device(x):
        # (grid_r, grid_c): at most MAX_PARTIALS programs, far below the 65535 of grid axis 1.
        _absmax_partials_kernel[(grid_r, grid_c)](
            x, partials, rows, cols, x.stride(0), x.stride(1), rows_per, cols_per,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
        _quantize_fp8_tensor_kernel[(tiles_r * tiles_c,)](
            x, q, scale, partials, partials.numel(), rows, cols,
            x.stride(0), x.stride(1), q.stride(0), q.stride(1),
            **consts, BLOCK_P=_next_pow2(partials.numel()), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
    return scale


def quantize_fp8_triton(x: Tensor, fp8_dtype: torch.dtype, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Triton :func:`lowmem.kernels.fp8_quantize.quantize_fp8`: same arguments, same results bit
    for bit (codes and scales), absmax + scale + cast fused (module docstring).

    Args:
        x: (rows, cols) fp32 / bf16 / fp16, any strides.
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        dim: ``None`` one scale per tensor, 1 per row, 0 per column.

    Returns:
        ``(x_fp8, scale)``: x_fp8 (rows, cols) contiguous; scale fp32 ``()``, ``(rows, 1)`` or
        ``(1, cols)``.
    """
    if not HAS_TRITON:
        raise RuntimeError("quantize_fp8_triton: triton is not importable; use quantize_fp8")
    _check_fp8_args(x, fp8_dtype, dim, "quantize_fp8_triton", (torch.float32, torch.bfloat16, torch.float16))
    if x.is_cuda and not fp8_supported(x.device):  # Triton converts to fp8 only on sm89+
        return quantize_fp8(x, fp8_dtype, dim)
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=fp8_dtype, device=x.device)
    consts = _constants(fp8_dtype)
    if dim is None:
        if x.numel() == 0:
            return q, torch.zeros((), dtype=torch.float32, device=x.device)
        return q, _quantize_tensorwise(x, q, consts)
    groups, reduced = (rows, cols) if dim == 1 else (cols, rows)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    shape = (rows, 1) if dim == 1 else (1, cols)
    if x.numel() == 0:
        return q, scale.zero_().view(shape)
    if dim == 1:
        sxg, sxr, sqg, sqr = x.stride(0), x.stride(1), q.stride(0), q.stride(1)
    else:
        sxg, sxr, sqg, sqr = x.stride(1), x.stride(0), q.stride(1), q.stride(0)
    block_g, block_r, warps = _groups_config(groups, reduced, sxr == 1)
    with on_device(x):
        _quantize_fp8_groups_kernel[(triton.cdiv(groups, block_g),)](
            x, q, scale, groups, reduced, sxg, sxr, sqg, sqr,
            **consts, BLOCK_G=block_g, BLOCK_R=block_r, num_warps=warps,
        )  # fmt: skip
    return q, scale.view(shape)


def quantize_fp8_delayed_triton(
    x: Tensor, fp8_dtype: torch.dtype, amax: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton :func:`lowmem.kernels.fp8_quantize.quantize_fp8_delayed_ref` (delayed scaling):
    cast with the scale of the given ``amax``, and measure the current absmax in the same pass.

    Args:
        x: (rows, cols) fp32 / bf16 / fp16, any strides.
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        amax: fp32 0-d tensor on x's device, finite and >= 0 (the max of an amax history).

    Returns:
        ``(x_fp8, scale, amax_now)`` as the reference, bit for bit.
    """
    if not HAS_TRITON:
        raise RuntimeError(
            "quantize_fp8_delayed_triton: triton is not importable; use quantize_fp8_delayed_ref"
        )
    _check_fp8_args(
        x, fp8_dtype, None, "quantize_fp8_delayed_triton", (torch.float32, torch.bfloat16, torch.float16)
    )
    if x.is_cuda and not fp8_supported(x.device):  # Triton converts to fp8 only on sm89+
        return quantize_fp8_delayed_ref(x, fp8_dtype, amax)
    amax = amax.to(device=x.device, dtype=torch.float32).reshape(())
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=fp8_dtype, device=x.device)
    fmax = FP8_MAX[fp8_dtype]
    if x.numel() == 0:
        zero = amax <= TINY
        safe = torch.where(zero, 1.0, amax)
        scale = torch.where(zero, 0.0, safe / torch.full_like(safe, fmax))
        return q, scale, torch.zeros((), dtype=torch.float32, device=x.device)
    block_r, block_c, warps = _tile_2d(rows, cols, x.stride(1) == 1)
    tiles = triton.cdiv(rows, block_r) * triton.cdiv(cols, block_c)
    partials = torch.empty(tiles, dtype=torch.float32, device=x.device)
    bad = torch.empty(tiles, dtype=torch.int32, device=x.device)
    with on_device(x):
        _cast_fp8_delayed_kernel[(tiles,)](
            x, q, amax, partials, bad, rows, cols, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
            **_constants(fp8_dtype), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
    # Small device-side reductions over the partials: no host sync, nothing waits on them but
    # the GEMM epilogue (scale) and the history update (amax_now).
    zero = amax <= TINY
    safe = torch.where(zero, 1.0, amax)
    scale = torch.where(zero, 0.0, safe / torch.full_like(safe, fmax))  # the reference's IEEE division
    scale = torch.where(bad.amax() > 0, float("nan"), scale)
    return q, scale, partials.amax()


def quantize_fp8_bytes(rows: int, cols: int, in_itemsize: int, dim: int | None) -> int:
    """Bytes moved by :func:`quantize_fp8_triton`: x read twice, fp8 codes written, the scales."""
    groups = {None: 1, 1: rows, 0: cols}[dim]
    return 2 * rows * cols * in_itemsize + rows * cols + 4 * groups
