"""int8 x int8 -> int32 matmul with the dequantization (and bias) fused into its epilogue.

The matmul of int8 training (SwitchBack, Wortsman et al. 2023, "Stable and low-precision
training for large-scale vision-language models"; survey: "Low-precision training of large
language models", 2025). With ``a ~= qa * sa[:, None]`` (one scale per row of a) and
``b ~= qb * sb[None, :]`` (one scale per column of b), the scales do not depend on the summed
index k, so they leave the sum::

    (a @ b)[m, n] ~= sum_k qa[m,k] sa[m] qb[k,n] sb[n] = sa[m] * sb[n] * acc[m, n],
    acc[m, n] = sum_k qa[m,k] * qb[k,n]                                   (exact, int32)

Epilogue, exactly (fp32, this order): ``out = float(acc) * sa[m] * sb[n] (+ float(bias[n]))``,
stored in the output dtype (round to nearest even). ``float(acc)`` rounds only when
``|acc| > 2**24``. With ``sa`` / ``sb`` of ``None`` the kernel returns ``acc`` itself (int32),
which is how the tests check the accumulation bit for bit.

Overflow: ``|qa * qb| <= 2**14`` (``2**14`` only for the code -128, which our quantizer never
produces), so ``acc`` fits int32 for ``K <= MAX_K = 2**17``; longer sums are rejected (chunk K).

The reference emulates the integer GEMM with fp32 BLAS, exactly: it splits K into chunks of
``2**10``, so every partial sum in any summation order is an integer of magnitude
``<= 2**10 * 2**14 = 2**24``, exactly representable in fp32 (int8 values are exact even in
bf16/TF32, so reduced-precision matmul settings cannot change it), then adds the chunks in int32.
On CPU that is ~40x faster than ``torch._int_mm``; it is still not faster than an fp32 matmul,
so the CPU path exists for its numerics, not its speed.

Cost model: ``bytes = M*K + K*N (int8 operands) + M*N*out_itemsize + 4*(M + N) (+ bias)``,
``ops = 2*M*N*K`` integer multiply-adds counted as 2 ops (TOPS).
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

__all__ = ["MAX_K", "int8_matmul", "int8_matmul_bytes", "int8_matmul_ops", "int8_matmul_ref"]

#: Longest reduction the int32 accumulator holds without overflow (see the module docstring).
MAX_K = 2**17
_REF_CHUNK = 2**10
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if HAS_TRITON:

    @triton.jit
    def _int8_matmul_kernel(
        a_ptr,
        b_ptr,
        out_ptr,
        sa_ptr,
        sb_ptr,
        bias_ptr,
        M,
        N,
        K,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        stride_om,
        stride_on,
        DEQUANT: tl.constexpr,  # False: store the int32 accumulator
        HAS_BIAS: tl.constexpr,
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

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K  # zero padding: any K works, K = 1 included
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0,
            )
            b = tl.load(
                b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0,
            )
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)

        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        mask_out = mask_m[:, None] & mask_n[None, :]
        if DEQUANT:
            sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
            sb = tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)
            out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
            if HAS_BIAS:
                out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, _rounded_for(out, out_ptr, EMULATE_RTNE), mask=mask_out)
        else:
            tl.store(out_ptrs, acc, mask=mask_out)

    # int8 MMA wants BLOCK_K >= 32; the configs span small (few-program) to large problems.
    _GPU_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 128, 128, 8, 3),
            (128, 128, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
            (32, 64, 64, 4, 3),
        ]
    ]
    _int8_matmul_kernel_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["M", "N", "K", "DEQUANT"])(
        _int8_matmul_kernel
    )

else:  # pragma: no cover - exercised only where triton is missing
    _int8_matmul_kernel = None
    _int8_matmul_kernel_tuned = None

# The interpreter runs one program at a time in numpy: big tiles (few programs) are fastest.
_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}


def _check(
    a: Tensor,
    b: Tensor,
    a_scale: Tensor | None,
    b_scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    name: str,
) -> None:
    for arg, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.dtype != torch.int8:
            raise ValueError(
                f"{name}: {arg} must be a 2-D int8 tensor, got {t.dtype} of shape {tuple(t.shape)}"
            )
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"{name}: a is {tuple(a.shape)} and b is {tuple(b.shape)}; need a (M, K) and b (K, N)"
        )
    if b.device != a.device:
        raise ValueError(f"{name}: b is on {b.device} but a is on {a.device}")
    if a.shape[1] > MAX_K:
        raise ValueError(
            f"{name}: K = {a.shape[1]} exceeds {MAX_K}, past which the int32 accumulator can overflow; "
            "split K and add the dequantized partial products"
        )
    if (a_scale is None) != (b_scale is None):
        raise ValueError(f"{name}: give both a_scale and b_scale (dequantized output) or neither (int32)")
    if a_scale is None and bias is not None:
        raise ValueError(f"{name}: bias needs the dequantized output; pass a_scale and b_scale too")
    for arg, t, n in (
        ("a_scale", a_scale, a.shape[0]),
        ("b_scale", b_scale, b.shape[1]),
        ("bias", bias, b.shape[1]),
    ):
        if t is None:
            continue
        if t.shape != (n,):
            raise ValueError(f"{name}: {arg} must have shape ({n},), got {tuple(t.shape)}")
        if t.device != a.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but a is on {a.device}")
        if arg != "bias" and t.dtype != torch.float32:
            raise ValueError(f"{name}: {arg} must be float32, got {t.dtype}")
    if a_scale is not None and out_dtype not in _OUT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be one of float32, bfloat16, float16, got {out_dtype}")


def int8_matmul(
    a: Tensor,
    b: Tensor,
    a_scale: Tensor | None = None,
    b_scale: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Triton: ``a @ b`` of int8 matrices with int32 accumulation and a fused dequant epilogue.

    Args:
        a: (M, K) int8, any strides. b: (K, N) int8, any strides (pass ``w.t()`` for ``x @ w.T``).
        a_scale: fp32 (M,), one scale per row of a; b_scale: fp32 (N,), one per column of b.
            Both ``None``: return the raw int32 accumulator.
        bias: (N,) any float dtype, added in fp32 in the epilogue.
        out_dtype: fp32 / bf16 / fp16 for the dequantized output.

    Returns:
        (M, N): ``out_dtype`` ``float(acc) * a_scale[:, None] * b_scale[None, :] + bias``, or the
        int32 ``acc``. See the module docstring for the exact epilogue and the K limit.
    """
    if not HAS_TRITON:
        raise RuntimeError("int8_matmul: triton is not importable; use int8_matmul_ref")
    _check(a, b, a_scale, b_scale, bias, out_dtype, "int8_matmul")
    m, k = a.shape
    n = b.shape[1]
    dequant = a_scale is not None
    out = torch.empty((m, n), dtype=out_dtype if dequant else torch.int32, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.zero_()
        return out + bias.to(out.dtype) if bias is not None else out
    interpreted = interpreting()
    dummy = out  # a pointer for the unused scale/bias arguments; never read
    args = (
        a, b, out,
        a_scale if dequant else dummy, b_scale if dequant else dummy, bias if bias is not None else dummy,
        m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
    flags = {"DEQUANT": dequant, "HAS_BIAS": bias is not None, "EMULATE_RTNE": interpreted}
    if interpreted:
        cfg = _INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        with on_device(a):
            _int8_matmul_kernel[grid](*args, **flags, **cfg, num_warps=4, num_stages=1)
    else:

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        with on_device(a):
            _int8_matmul_kernel_tuned[grid](*args, **flags)
    return out


def _int32_acc_exact(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of int8 matrices as int32, from fp32 GEMMs over K-chunks whose sums are exact."""
    m, k = a.shape
    acc = torch.zeros((m, b.shape[1]), dtype=torch.int32, device=a.device)
    for k0 in range(0, k, _REF_CHUNK):
        part = a[:, k0 : k0 + _REF_CHUNK].float() @ b[k0 : k0 + _REF_CHUNK].float()
        acc += part.to(torch.int32)  # exact: |part| <= 2**24
    return acc


def int8_matmul_ref(
    a: Tensor,
    b: Tensor,
    a_scale: Tensor | None = None,
    b_scale: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Pure-PyTorch :func:`int8_matmul`: exact int32 accumulation emulated with fp32 GEMMs over
    K-chunks of 1024 (module docstring), then the same fp32 epilogue, so the results equal the
    kernel's bit for bit (up to FMA contraction of the epilogue on GPU)."""
    _check(a, b, a_scale, b_scale, bias, out_dtype, "int8_matmul_ref")
    with torch.autocast(a.device.type, enabled=False):  # the exactness argument needs fp32 GEMMs
        acc = _int32_acc_exact(a, b)
    if a_scale is None:
        return acc
    out = acc.float() * a_scale[:, None] * b_scale[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    return out.to(out_dtype)


def int8_matmul_bytes(m: int, n: int, k: int, out_itemsize: int, has_bias: bool = False) -> int:
    """Bytes moved: int8 operands once, the output once, the scales (and bias) once."""
    return m * k + k * n + m * n * out_itemsize + 4 * (m + n) + (4 * n if has_bias else 0)


def int8_matmul_ops(m: int, n: int, k: int) -> int:
    """Integer ops of the product (a multiply-add counts as 2), for TOPS."""
    return 2 * m * n * k
