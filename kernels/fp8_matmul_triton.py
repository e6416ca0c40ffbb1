"""Scaled fp8 matmul in Triton: ``out = (a_fp8 @ b_fp8) * scale_a * scale_b (+ bias)``.

The contract of :func:`lowmem.kernels.fp8_matmul.fp8_matmul_ref` (fp8 training, Micikevicius et
al. 2022, "FP8 Formats for Deep Learning"; torchao float8; survey "Low-precision training of
large language models", 2025), as one Triton kernel: fp8 tiles go straight into ``tl.dot``
(fp8 tensor cores, sm89+), the products are accumulated in fp32, and the epilogue applies the
scales and the bias before one store in the output dtype::

    acc[m, n] = sum_k a[m, k] * b[k, n]           (fp32 accumulator; each product is exact)
    out[m, n] = acc[m, n] * sa * sb (+ float(bias[n]))    (fp32, this order, then one rounding)

``sa`` / ``sb`` are one scalar each (tensor-wise scaling) or ``scale_a[m]`` / ``scale_b[n]``
(row-wise: one scale per row of ``a``, one per column of ``b``). Operands: e4m3 x e4m3 (forward)
or e5m2 x e4m3 / e4m3 x e5m2 (the gradient GEMMs); any mix of the two fp8 formats is accepted.
Output fp32, bf16 or fp16.

Accumulation: on Hopper (sm90) an fp8 ``wgmma`` sums its products in an accumulator that
keeps only about 14 bits of mantissa (DeepSeek-V3 technical report, 2024, section 3.3.2);
``tl.dot(..., max_num_imprecise_acc=BLOCK_K)`` makes Triton add each K-tile's partial sum into a
full fp32 register accumulator, the promotion DeepSeek-V3 does every 128 elements and cuBLASLt
does with ``use_fast_accum=False`` (``torch._scaled_mm``'s default). So "fp32 accumulation"
holds across K-tiles; within one tile the hardware's own precision applies (the GPU tests allow
for it; the interpreter cannot show it). On sm89 the ``mma`` accumulates in fp32.

What the Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests) covers, read from Triton
3.9's ``runtime/interpreter.py`` and checked by the tests: fp8 tensors load as their bytes;
``tl.dot`` on fp8 tiles (either format, mixed) decodes both exactly to fp16 and runs numpy's
fp32 matmul, so the products are exact and only the fp32 summation order differs from a GPU;
the epilogue is the same fp32 arithmetic. So the tests run this very kernel, masks, strides,
grouped tile order and epilogue included; they cannot see the tensor-core instruction
selection, the partial-accumulator promotion, or FMA contraction of the epilogue. The
interpreter decodes the e4m3 NaN code 0x7F as 480 and e5m2 inf/NaN codes as finite numbers;
:func:`lowmem.kernels.fp8_quantize.quantize_fp8` never produces those codes (it clamps to the
finite range and marks non-finite groups with a NaN *scale*), and a NaN scale propagates
through the epilogue in both the interpreter and on a GPU.

Cost model: ``bytes = M*K + K*N (fp8) + M*N*out_itemsize + scales (+ bias)``,
``flops = 2*M*N*K``.
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
from lowmem.kernels.fp8_matmul import _check, fp8_supported

__all__ = ["autotuned", "fp8_matmul", "fp8_matmul_bytes", "fp8_matmul_flops"]

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if HAS_TRITON:

    @triton.jit
    def _fp8_matmul_kernel(
        a_ptr,
        b_ptr,
        out_ptr,
        sa_ptr,
        sb_ptr,
        bias_ptr,
        M,
        N,
        K,
        M_BUCKET,  # M rounded up to a power of two: only the autotune key (below)
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        stride_om,
        stride_on,
        ROW_A: tl.constexpr,  # False: sa_ptr holds one scalar (tensor-wise), else M scales
        ROW_B: tl.constexpr,  # False: sb_ptr holds one scalar, else N scales
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

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K  # zero padding (fp8 0x00 is +0.0): any K works, K = 1 included
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
            # Promote the tensor-core partial sum into the fp32 accumulator every K-tile (sm90).
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K, out_dtype=tl.float32)

        if ROW_A:
            out = acc * tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        else:
            out = acc * tl.load(sa_ptr)
        if ROW_B:
            out = out * tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        else:
            out = out * tl.load(sb_ptr)
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, _rounded_for(out, out_ptr, EMULATE_RTNE), mask=mask_m[:, None] & mask_n[None, :])

    # fp8 MMA wants BLOCK_K >= 32 (64 / 128 feed wgmma best); small tiles for few-program shapes.
    # Untuned on hardware so far (no GPU in this session). The autotuner picks per (M bucket, N,
    # K, operand dtypes): keyed by the exact M it would re-tune (~1 s) at every new token count,
    # which variable-length batches produce every step.
    _GPU_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 256, 128, 8, 3),
            (256, 128, 128, 8, 3),
            (128, 128, 128, 8, 4),
            (128, 128, 64, 4, 4),
            (64, 128, 128, 4, 4),
            (64, 64, 128, 4, 4),
            (32, 64, 128, 4, 3),
        ]
    ]
    _TUNE_KEY = ["M_BUCKET", "N", "K", "ROW_A", "ROW_B"]
    _fp8_matmul_kernel_tuned = triton.autotune(configs=_GPU_CONFIGS, key=_TUNE_KEY)(_fp8_matmul_kernel)

else:  # pragma: no cover - exercised only where triton is missing
    _fp8_matmul_kernel = None
    _fp8_matmul_kernel_tuned = None

# The interpreter runs one program at a time in numpy: big tiles (few programs) are fastest.
_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}


def fp8_matmul(
    a: Tensor,
    b: Tensor,
    scale_a: Tensor,
    scale_b: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Triton: scaled fp8 GEMM with fp32 accumulation and the scales and bias in the epilogue.

    Args:
        a: (M, K) ``float8_e4m3fn`` or ``float8_e5m2``, any strides.
        b: (K, N) either fp8 dtype, any strides (pass ``w_fp8.t()`` for ``x @ w.T``).
        scale_a: fp32 ``()`` (tensor-wise) or ``(M, 1)`` (row-wise); scale_b: ``()`` or
            ``(1, N)`` (the kinds may differ). Dequantization factors: ``a ~= a_fp8 * scale_a``.
        bias: (N,) any float dtype or None, added in fp32 in the epilogue.
        out_dtype: fp32, bf16 or fp16.

    Returns:
        (M, N) ``out_dtype``: ``(a.float() @ b.float()) * scale_a * scale_b + bias``, equal to
        :func:`lowmem.kernels.fp8_matmul.fp8_matmul_ref` up to fp32 summation order (module
        docstring).

    Raises:
        ValueError: on a CUDA device below compute capability 8.9 (no fp8 tensor cores; reached
            by forcing ``LOWMEM_BACKEND=triton`` there).
    """
    if not HAS_TRITON:
        raise RuntimeError(
            "fp8_matmul: triton is not importable; use lowmem.kernels.fp8_matmul.fp8_matmul_ref"
        )
    _check(a, b, scale_a, scale_b, bias, "fp8_matmul")
    _require_fp8_tensor_cores(a.device)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"fp8_matmul: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    for name, t in (("b", b), ("scale_a", scale_a), ("scale_b", scale_b), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise ValueError(f"fp8_matmul: {name} is on {t.device} but a is on {a.device}")
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    sa = scale_a.float().reshape(-1).contiguous()  # (M,) or (1,): tiny
    sb = scale_b.float().reshape(-1).contiguous()
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it with stride 1
    if k == 0:  # an empty sum: 0 * scales (NaN scales stay NaN, as in the reference) + bias
        out.copy_(torch.zeros((m, n), device=a.device) * sa.view(-1, 1) * sb.view(1, -1))
        return out + bias.to(out_dtype) if bias is not None else out
    interpreted = interpreting()
    if not interpreted:
        # fp8 MMA reads both operands K-major (wgmma transposes only 16-bit types in shared
        # memory): give it that layout with one fp8 copy, as fp8_matmul_scaled_mm does for
        # cuBLASLt, rather than rely on the compiler's fallback for transposed fp8 tiles.
        a = a if a.stride(1) == 1 else a.contiguous()
        b = b if b.stride(0) == 1 else b.t().contiguous().t()
    args = (
        a, b, out, sa, sb, bias if bias is not None else out,  # out: a pointer never read
        m, n, k, 1 << max(0, (m - 1).bit_length()),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
    flags = {
        "ROW_A": scale_a.dim() != 0,
        "ROW_B": scale_b.dim() != 0,
        "HAS_BIAS": bias is not None,
        "EMULATE_RTNE": interpreted,
    }
    if interpreted:
        cfg = _INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        with on_device(a):
            _fp8_matmul_kernel[grid](*args, **flags, **cfg, num_warps=4, num_stages=1)
    else:

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        with on_device(a):
            _fp8_matmul_kernel_tuned[grid](*args, **flags)
    return out


def _require_fp8_tensor_cores(device: torch.device) -> None:
    """Raise for a CUDA device without fp8 tensor cores, where Triton cannot compile an fp8
    ``tl.dot`` (its error, "fp8e4nv not supported ...", names neither the cause nor the fix)."""
    if device.type == "cuda" and not fp8_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"fp8_matmul: the Triton fp8 GEMM needs fp8 tensor cores (CUDA compute capability 8.9+, "
            f"sm89+); {device} is sm{major}{minor}. Use lowmem.kernels.fp8_matmul.fp8_matmul_ref "
            "(LOWMEM_BACKEND=ref) or leave LOWMEM_BACKEND unset, which picks it on this GPU"
        )


def autotuned(
    a: Tensor,
    b: Tensor,
    scale_a: Tensor,
    scale_b: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> bool:
    """Whether the GPU autotuner already holds a config for this call's problem, so that
    :func:`fp8_matmul` would launch without benchmarking (arguments as :func:`fp8_matmul`).

    The autotuner benchmarks every config and synchronizes on a key it has not seen, which is
    illegal inside CUDA-graph capture; :mod:`lowmem.kernels.fp8_matmul_select` asks this first.
    The key is rebuilt as Triton 3.9's ``Autotuner.run`` builds it: the values of
    ``_TUNE_KEY``, then ``str(dtype)`` of every tensor argument in argument order (checked in
    tests/kernels against the autotuner itself).
    """
    if not HAS_TRITON:
        return False
    m, k = a.shape
    n = b.shape[1]
    named = {
        "a_ptr": a.dtype, "b_ptr": b.dtype, "out_ptr": out_dtype, "sa_ptr": torch.float32,
        "sb_ptr": torch.float32, "bias_ptr": bias.dtype if bias is not None else out_dtype,
        "M_BUCKET": 1 << max(0, (m - 1).bit_length()), "N": n, "K": k,
        "ROW_A": scale_a.dim() != 0, "ROW_B": scale_b.dim() != 0,
    }  # fmt: skip
    tuner = _fp8_matmul_kernel_tuned
    key = [named[name] for name in tuner.keys]
    key += [str(named[name]) for name in tuner.arg_names if isinstance(named.get(name), torch.dtype)]
    return tuple(key) in tuner.cache


def fp8_matmul_bytes(m: int, n: int, k: int, out_itemsize: int, rowwise: bool, has_bias: bool = False) -> int:
    """Bytes moved: fp8 operands once, the output once, the scales (and bias) once."""
    scales = 4 * (m + n) if rowwise else 8
    return m * k + k * n + m * n * out_itemsize + scales + (4 * n if has_bias else 0)


def fp8_matmul_flops(m: int, n: int, k: int) -> int:
    """Floating-point ops of the product (a multiply-add counts as 2)."""
    return 2 * m * n * k
