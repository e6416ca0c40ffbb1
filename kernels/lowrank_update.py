"""Fused low-rank weight update ``W <- beta * W + alpha * (a @ b)``: the heart of a GaLore step.

GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection") keeps Adam's moments in an r-dim subspace of each weight's gradient and applies the
update projected back to full size. With the projector P (m x r, "left"), Q (r x n, "right") and
the r-dim Adam direction N, the three orientations are all one rank-r product::

    right (m >= n):  a = N (m x r),  b = Q (r x n)
    left:            a = P (m x r),  b = N (r x n)
    full:            a = P (m x r),  b = N @ Q (r x n)

and the step with decoupled weight decay is ``W <- (1 - lr*wd) * W - lr*scale * (a @ b)``, i.e.
``beta = 1 - lr*wd``, ``alpha = -lr*scale``. The unfused PyTorch form (what galore-torch does)
materializes the m x n product and reads/writes W twice; this kernel computes the product tile by
tile in registers and applies it in the GEMM epilogue, so W is read once and written once and no
m x n temporary exists.

Cost model (elements of size ``s`` bytes, a and b in their own dtype)::

    bytes = s_W * m*n  (read W) + s_W * m*n (write W) + s_a * m*k (read a) + s_b * k*n (read b)
    FLOPs = 2*m*n*k (the product) + 3*m*n (beta*W, alpha*acc, their sum)

For rank k << min(m, n) the op is memory-bound (arithmetic intensity ~ k/4 FLOP/byte in fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowmem.kernels._triton import (
    HAS_TRITON,
    _grouped_tile_offsets,
    _rounded_for,
    interpreting,
    on_device,
    tl,
    triton,
)

__all__ = ["lowrank_update", "lowrank_update_bytes", "lowrank_update_flops", "lowrank_update_ref"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if HAS_TRITON:

    @triton.jit
    def _lowrank_update_kernel(
        w_ptr,
        a_ptr,
        b_ptr,
        M,
        N,
        K,
        stride_wm,
        stride_wn,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        alpha,
        beta,
        HAS_BETA: tl.constexpr,  # beta == 0: W is not read (addmm semantics: NaN/inf in W vanish)
        INPUT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # interpreter only: it multiplies bf16 tiles as raw uint16 bits
        EMULATE_RTNE: tl.constexpr,  # only under the interpreter: see _rounded_for
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        offs_m, offs_n = _grouped_tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        mask_m = offs_m < M
        mask_n = offs_n < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K  # zero padding makes BLOCK_K >= 16 work for any k, k = 1 included
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            if DOT_IN_FP32:
                # Exact: a bf16 x bf16 product fits in fp32's mantissa, so this matches a bf16
                # tensor-core dot with fp32 accumulation up to summation order.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

        w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
        mask_w = mask_m[:, None] & mask_n[None, :]
        out = alpha * acc
        if HAS_BETA:
            w = tl.load(w_ptrs, mask=mask_w, other=0.0).to(tl.float32)
            out = beta * w + out
        tl.store(w_ptrs, _rounded_for(out, w_ptr, EMULATE_RTNE), mask=mask_w)

else:  # pragma: no cover - exercised only where triton is missing
    _lowrank_update_kernel = None


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The interpreter runs one program at a time
# in numpy, so big tiles (few programs) are fastest there; any size must be a power of two >= 16.
_INTERPRETER_CONFIG = (64, 64, 16, 4, 1)


def _gpu_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """A small fixed table, from a sweep of 44 configs on an H200 (bf16 and fp32; 4096x4096 with
    k = 32 and 256, 1024x1024 k=128, 4096x11008 k=128): 64x128 tiles with BLOCK_K = 32, 4 warps,
    3 stages were within ~10% of the best everywhere except small weights, which want more
    programs (64x64 tiles) to fill the SMs. Autotuning is avoided: it would run the in-place
    update repeatedly on the live weight."""
    block_k = 16 if k <= 16 else 32
    if m * n <= 2048 * 1024:
        return (64, 64, 64 if k >= 64 else block_k, 4, 3)
    return (64, 128, block_k, 4, 3)


def _check(weight: Tensor, a: Tensor, b: Tensor, dtypes: tuple[torch.dtype, ...] = _FLOAT_DTYPES) -> None:
    for name, t in (("weight", weight), ("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"lowrank_update: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"lowrank_update: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"lowrank_update: {name} has dtype {t.dtype}; supported: {names}")
        if t.device != weight.device:
            raise ValueError(f"lowrank_update: {name} is on {t.device} but weight is on {weight.device}")
    m, n = weight.shape
    if a.shape[0] != m or b.shape[1] != n or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"lowrank_update: shapes do not chain: weight {tuple(weight.shape)}, a {tuple(a.shape)}, "
            f"b {tuple(b.shape)}; need weight (m, n), a (m, k), b (k, n)"
        )
    if a.dtype != b.dtype:
        raise ValueError(f"lowrank_update: a has dtype {a.dtype} but b has dtype {b.dtype}; they must match")
    if a.dtype not in (weight.dtype, torch.float32):
        raise ValueError(
            f"lowrank_update: a and b have dtype {a.dtype} but weight has dtype {weight.dtype}; "
            "they must match it or be float32"
        )


def lowrank_update(weight: Tensor, a: Tensor, b: Tensor, *, alpha: float, beta: float) -> None:
    """In place ``weight <- beta * weight + alpha * (a @ b)`` with one fused Triton GEMM.

    Args:
        weight: (m, n), fp32 / bf16 / fp16, any strides (a transposed or sliced view works; it is
            updated through its own strides, never copied).
        a: (m, k), b: (k, n): weight's dtype, or fp32 for a low-precision weight. Any strides.
        alpha, beta: runtime scalars (new values never recompile). ``beta == 0`` ignores the
            old weight entirely, as ``torch.addmm`` does.

    The product accumulates in fp32 (``input_precision="ieee"`` for fp32 inputs: no TF32), the
    epilogue loads the weight tile, forms ``beta * w + alpha * acc`` in fp32 and stores it in
    weight's dtype. Memory traffic: see :func:`lowrank_update_bytes`; FLOPs:
    :func:`lowrank_update_flops`. GaLore (Zhao et al. 2024); see the module docstring for the
    three projection orientations.
    """
    if not HAS_TRITON:
        raise RuntimeError("lowrank_update: triton is not importable; use lowrank_update_ref")
    _check(weight, a, b)
    m, n = weight.shape
    k = a.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:  # an empty product: only the scaling remains (a bare beta, like addmm)
        if beta == 0:
            weight.zero_()
        else:
            weight.mul_(beta)
        return
    interpreted = interpreting()
    # Triton's interpreter stores bf16 as uint16 and its tl.dot runs np.matmul on those bits
    # (garbage); upcasting the tiles to fp32 first is exact, see the kernel.
    dot_in_fp32 = interpreted and a.dtype == torch.bfloat16
    if interpreted:
        block_m, block_n, block_k, num_warps, num_stages = _INTERPRETER_CONFIG
    else:
        block_m, block_n, block_k, num_warps, num_stages = _gpu_config(m, n, k)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    with on_device(weight):
        _lowrank_update_kernel[grid](
            weight,
            a,
            b,
            m,
            n,
            k,
            weight.stride(0),
            weight.stride(1),
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            float(alpha),
            float(beta),
            HAS_BETA=beta != 0,
            # tf32 is moot for 16-bit inputs; fp32 inputs must not be rounded to tf32.
            INPUT_PRECISION="ieee" if a.dtype == torch.float32 or dot_in_fp32 else "tf32",
            DOT_IN_FP32=dot_in_fp32,
            EMULATE_RTNE=interpreted,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            GROUP_M=8,
            num_warps=num_warps,
            num_stages=num_stages,
        )


def lowrank_update_ref(weight: Tensor, a: Tensor, b: Tensor, *, alpha: float, beta: float) -> None:
    """Pure-PyTorch :func:`lowrank_update`: ``weight.addmm_(a, b, beta=beta, alpha=alpha)``.

    One BLAS GEMM with a beta term, which is already the fused form on CPU (no m x n temporary
    for contiguous weights). a and b are cast to weight's dtype first when they differ (fp32
    factors for a low-precision weight).
    """
    _check(weight, a, b, (*_FLOAT_DTYPES, torch.float64))
    if a.dtype != weight.dtype:
        a = a.to(weight.dtype)
        b = b.to(weight.dtype)
    weight.addmm_(a, b, beta=beta, alpha=alpha)


def lowrank_update_bytes(m: int, n: int, k: int, w_itemsize: int, ab_itemsize: int | None = None) -> int:
    """Bytes moved by the fused update: read W + write W + read a + read b."""
    ab = w_itemsize if ab_itemsize is None else ab_itemsize
    return 2 * m * n * w_itemsize + (m * k + k * n) * ab


def lowrank_update_flops(m: int, n: int, k: int) -> int:
    """FLOPs of the fused update: ``2*m*n*k`` for the product, ``3*m*n`` for the epilogue."""
    return 2 * m * n * k + 3 * m * n
