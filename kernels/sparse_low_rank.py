"""Sparse + low-rank weight ``W = scale * (B @ A) + S``, built tile by tile: SLTrain's forward.

SLTrain (Han et al. 2024, "SLTrain: a sparse plus low-rank approach for parameter and memory
efficient pretraining") parameterizes a linear layer's (out x in) weight as a rank-r product
``B (out x r) @ A (r x in)`` scaled by ``scale = alpha / r``, plus a sparse matrix S whose support
(``nnz = density * out * in`` positions, fixed at initialization, uniformly random) never changes:
only its values are trained. S is stored as its values (``nnz``, the parameter's dtype) and the
row-major flat positions ``index`` (``nnz``, int32; ``row * in + col``, sorted ascending).

The layer never keeps W: forward builds it, multiplies, and drops it; backward builds it again
(:class:`SparseLowRankLinearFunction`). Building W is this file's op:

``sparse_low_rank_weight_ref``
    ``torch.addmm(W, B, A, beta=0, alpha=scale, out=W)`` (one BLAS GEMM into a fresh buffer)
    then ``W.view(-1).index_add_(0, index, values)`` (a scatter of nnz values). On CPU this is
    the fastest form we measured: the scatter costs ~3% of the GEMM at 2048x2048, rank 512.
``sparse_low_rank_weight`` (Triton)
    One program per (BLOCK_M x BLOCK_N) tile of W: the K-loop computes ``B[tile_m] @ A[:, tile_n]``
    in fp32 registers, the epilogue scales and stores the tile, then the same program adds the
    sparse values that fall in its tile (read-modify-write of its own, just-stored entries after a
    block barrier). Each tile's sparse entries are found through a *tile order*: the entries'
    positions in ``index`` sorted by tile (``perm``, int32) and each tile's range in that list
    (``tile_ptr``, ``num_tiles + 1``), from :func:`tile_order` (a sort; the layer caches it, the
    support being fixed). W is written exactly once per entry plus once per sparse entry.

Cost model for building W (``s`` bytes per element; int32 index)::

    bytes = s * (out*r + r*in)            (read B, A; each tile re-reads its panel, L2 absorbs it)
          + s * out*in                    (write W)
          + nnz * (s + 4 + 4 + 2*s)       (values, index, perm; read-modify-write of W at S)
    FLOPs = 2*out*in*r + out*in + nnz     (product, scale, sparse add)

The backward (see :class:`SparseLowRankLinearFunction`) gathers ``dS = dW.flatten()[index]``
from the dense ``dW = dY^T X``, and forms ``dB = scale * dW @ A^T``, ``dA = scale * B^T @ dW``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowmem.kernels._triton import HAS_TRITON, _rounded_for, interpreting, on_device, tl, triton

__all__ = [
    "SparseLowRankLinearFunction",
    "sparse_low_rank_linear",
    "sparse_low_rank_weight",
    "sparse_low_rank_weight_bytes",
    "sparse_low_rank_weight_flops",
    "sparse_low_rank_weight_ref",
    "tile_order",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if HAS_TRITON:

    @triton.jit
    def _sparse_low_rank_weight_kernel(
        w_ptr,
        b_ptr,
        a_ptr,
        val_ptr,
        idx_ptr,
        perm_ptr,
        tile_ptr,
        M,
        N,
        K,
        stride_wm,
        stride_wn,
        stride_bm,
        stride_bk,
        stride_ak,
        stride_an,
        scale,
        INPUT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # interpreter only: it multiplies bf16 tiles as raw uint16 bits
        EMULATE_RTNE: tl.constexpr,  # interpreter only: see _rounded_for
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        # Row-major tile order: the program id IS the tile id that tile_order() sorted by.
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n

        # int64: row * stride of a large weight exceeds 2**31.
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        mask_m = offs_m < M
        mask_n = offs_n < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K  # zero padding: any rank works, rank 1 included
            b = tl.load(
                b_ptr + offs_m[:, None] * stride_bm + kk[None, :] * stride_bk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            a = tl.load(
                a_ptr + kk[:, None] * stride_ak + offs_n[None, :] * stride_an,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            if DOT_IN_FP32:
                # Exact: a bf16 x bf16 product fits in fp32's mantissa.
                b = b.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(b, a, acc, input_precision=INPUT_PRECISION)

        w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
        tl.store(
            w_ptrs, _rounded_for(scale * acc, w_ptr, EMULATE_RTNE), mask=mask_m[:, None] & mask_n[None, :]
        )

        # The sparse entries of this tile: registers cannot be scattered into, so add them to
        # the entries this program just stored. The barrier makes every thread's stores of the
        # tile visible to the others first (same CTA, so no other program touches the tile).
        tl.debug_barrier()
        start = tl.load(tile_ptr + pid)
        end = tl.load(tile_ptr + pid + 1)
        offs_s = tl.arange(0, BLOCK_S)
        for j0 in range(start, end, BLOCK_S):
            j = j0 + offs_s
            mask_s = j < end
            p = tl.load(perm_ptr + j, mask=mask_s, other=0)
            flat = tl.load(idx_ptr + p, mask=mask_s, other=0).to(tl.int64)
            v = tl.load(val_ptr + p, mask=mask_s, other=0.0).to(tl.float32)
            ptrs = w_ptr + (flat // N) * stride_wm + (flat % N) * stride_wn
            w = tl.load(ptrs, mask=mask_s, other=0.0).to(tl.float32)
            tl.store(ptrs, _rounded_for(w + v, w_ptr, EMULATE_RTNE), mask=mask_s)

else:  # pragma: no cover - exercised only where triton is missing
    _sparse_low_rank_weight_kernel = None


# (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_S, num_warps, num_stages). The interpreter runs one program
# at a time in numpy, so big tiles are fastest there. The GPU config is the lowrank_update
# kernel's (same K-loop shape, from its H200 sweep); not separately tuned yet.
_INTERPRETER_CONFIG = (32, 32, 16, 32, 4, 1)


def _gpu_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int, int]:
    block_k = 16 if k <= 16 else 32
    if m * n <= 2048 * 1024:
        return (64, 64, 64 if k >= 64 else block_k, 64, 4, 3)
    return (64, 128, block_k, 64, 4, 3)


def block_shape(m: int, n: int, k: int) -> tuple[int, int]:
    """The (BLOCK_M, BLOCK_N) tile the Triton launcher uses for an m x n weight of rank k."""
    config = _INTERPRETER_CONFIG if interpreting() else _gpu_config(m, n, k)
    return config[0], config[1]


def tile_order(index: Tensor, m: int, n: int, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    """Where each (block_m x block_n) tile's sparse entries are, for the Triton kernel.

    Args:
        index: (nnz,) int32/int64 row-major flat positions in an m x n matrix.

    Returns:
        ``perm`` (nnz,) int32: positions in ``index`` grouped by tile (row-major tile order,
        ascending within a tile); ``tile_ptr`` (num_tiles + 1,) int32: tile t's entries are
        ``perm[tile_ptr[t]:tile_ptr[t + 1]]``.
    """
    flat = index.long()
    tiles_n = -(-n // block_n)
    tiles = -(-m // block_m) * tiles_n
    tile = (flat // n // block_m) * tiles_n + (flat % n) // block_n
    sorted_tile, perm = torch.sort(tile, stable=True)
    tile_ptr = torch.searchsorted(sorted_tile, torch.arange(tiles + 1, device=index.device))
    return perm.to(torch.int32), tile_ptr.to(torch.int32)


def _check(b: Tensor, a: Tensor, values: Tensor, index: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    for name, t in (("b", b), ("a", a)):
        if t.dim() != 2:
            raise ValueError(f"sparse_low_rank_weight: {name} must be 2-D, got shape {tuple(t.shape)}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(
            f"sparse_low_rank_weight: b {tuple(b.shape)} and a {tuple(a.shape)} do not chain; "
            "need b (out, r) and a (r, in)"
        )
    for name, t in (("b", b), ("a", a), ("values", values)):
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"sparse_low_rank_weight: {name} has dtype {t.dtype}; supported: {names}")
        if t.device != b.device or index.device != b.device:
            raise ValueError("sparse_low_rank_weight: b, a, values and index must be on one device")
    if a.dtype != b.dtype or values.dtype != b.dtype:
        raise ValueError(
            "sparse_low_rank_weight: b, a, values must share a dtype, "
            f"got {b.dtype}, {a.dtype}, {values.dtype}"
        )
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
        raise ValueError(
            f"sparse_low_rank_weight: index must be 1-D int32/int64, got {index.dtype} {index.dim()}-D"
        )
    if values.shape != index.shape:
        raise ValueError(
            f"sparse_low_rank_weight: values {tuple(values.shape)} and index {tuple(index.shape)} must match"
        )


def sparse_low_rank_weight_ref(b: Tensor, a: Tensor, values: Tensor, index: Tensor, scale: float) -> Tensor:
    """Pure-PyTorch ``W = scale * (b @ a) + S`` with ``S.view(-1)[index] = values``.

    Args:
        b: (out, r), a: (r, in), values: (nnz,): one float dtype (fp64 too: gradcheck uses it).
        index: (nnz,) int32 or int64 row-major flat positions, all distinct.
        scale: the low-rank scale (``alpha / r`` in SLTrain).

    Returns:
        W (out, in), contiguous, in b's dtype. In a 16-bit dtype W is rounded twice at the
        sparse positions (the product, then the sum), as the Triton kernel does.
    """
    _check(b, a, values, index, (*_FLOAT_DTYPES, torch.float64))
    w = torch.empty(b.shape[0], a.shape[1], dtype=b.dtype, device=b.device)
    torch.addmm(w, b, a, beta=0, alpha=scale, out=w)
    w.view(-1).index_add_(0, index, values)
    return w


def sparse_low_rank_weight(
    b: Tensor,
    a: Tensor,
    values: Tensor,
    index: Tensor,
    scale: float,
    *,
    order: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Triton ``W = scale * (b @ a) + S``: one fused kernel, W written tile by tile.

    Args and result as :func:`sparse_low_rank_weight_ref` (fp32 / bf16 / fp16). ``order`` is
    :func:`tile_order` for :func:`block_shape` (computed here when not given; the layer caches
    it). The product accumulates in fp32 (``input_precision="ieee"`` for fp32: no TF32).
    """
    if not HAS_TRITON:
        raise RuntimeError("sparse_low_rank_weight: triton is not importable; use sparse_low_rank_weight_ref")
    _check(b, a, values, index, _FLOAT_DTYPES)
    m, k = b.shape
    n = a.shape[1]
    w = torch.empty(m, n, dtype=b.dtype, device=b.device)
    if m == 0 or n == 0:
        return w
    interpreted = interpreting()
    config = _INTERPRETER_CONFIG if interpreted else _gpu_config(m, n, k)
    block_m, block_n, block_k, block_s, num_warps, num_stages = config
    if order is None:
        order = tile_order(index, m, n, block_m, block_n)
    perm, tile_ptr = order
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if tile_ptr.numel() != tiles + 1 or perm.numel() != index.numel():
        raise ValueError(
            f"sparse_low_rank_weight: order was built for another tiling ({tile_ptr.numel() - 1} tiles, "
            f"need {tiles}); pass tile_order(index, {m}, {n}, {block_m}, {block_n}) or order=None"
        )
    dot_in_fp32 = interpreted and b.dtype == torch.bfloat16
    with on_device(w):
        _sparse_low_rank_weight_kernel[(tiles,)](
            w,
            b,
            a,
            values,
            index,
            perm,
            tile_ptr,
            m,
            n,
            k,
            w.stride(0),
            w.stride(1),
            b.stride(0),
            b.stride(1),
            a.stride(0),
            a.stride(1),
            float(scale),
            INPUT_PRECISION="ieee" if b.dtype == torch.float32 or dot_in_fp32 else "tf32",
            DOT_IN_FP32=dot_in_fp32,
            EMULATE_RTNE=interpreted,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_S=block_s,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return w


def sparse_low_rank_weight_bytes(
    m: int, n: int, r: int, nnz: int, itemsize: int, index_itemsize: int = 4
) -> int:
    """Bytes moved building W: read B and A, write W, read values/index/perm, update W at S."""
    return itemsize * (m * r + r * n + m * n) + nnz * (itemsize + 2 * index_itemsize + 2 * itemsize)


def sparse_low_rank_weight_flops(m: int, n: int, r: int, nnz: int) -> int:
    """FLOPs building W: ``2*m*n*r`` for the product, ``m*n`` for the scale, ``nnz`` for S."""
    return 2 * m * n * r + m * n + nnz


def _build(b: Tensor, a: Tensor, values: Tensor, index: Tensor, scale: float, order) -> Tensor:
    from lowmem._ops import dispatch  # lazy: _ops imports kernel modules by name

    fn = dispatch("sparse_low_rank_weight", b.device, b.dtype)
    if fn is sparse_low_rank_weight:
        return fn(b, a, values, index, scale, order=order() if callable(order) else order)
    return fn(b, a, values, index, scale)


class SparseLowRankLinearFunction(torch.autograd.Function):
    """``y = x @ W^T + bias`` with ``W = scale * B @ A + S``, W never saved for backward.

    Saved for backward: x, B, A, the sparse values and index (what the layer already holds,
    plus its input). Backward, with X = x as (tokens, in) and dY as (tokens, out)::

        W  = build(B, A, values, index)       (again: one extra rank-r GEMM instead of out x in saved)
        dX = dY @ W                           (then W is freed)
        dW = dY^T @ X                         (into W's buffer: one out x in temporary)
        d_values = dW.flatten()[index]
        dB = scale * dW @ A^T,   dA = scale * B^T @ dW,   d_bias = dY.sum(0)

    (for few tokens, ``tokens * (out + in) < out * in``, dB and dA are factorized instead:
    ``dB = scale * dY^T (X A^T)``, ``dA = scale * (dY B)^T X``, fewer FLOPs.)

    Measured on CPU (2 cores, fp32, 2048x2048, r = 512, 2048 tokens) against cheaper-looking
    factorized forms (``dX = scale*(dY B) A + dY S`` and ``Y = scale*(X A^T) B^T + X S^T`` with
    torch's CSR matmul): those were slower (1.43x vs 1.37x nn.Linear), because CSR SpMM ran at
    ~15 GFLOP/s and needs transposed copies. Arithmetic floor of this form: 4 extra rank-r GEMMs,
    ``1 + 4 r / (3 tokens)`` times nn.Linear's FLOPs.

    ``order`` (GPU only) is the Triton kernel's :func:`tile_order`, or a callable returning it;
    it is held on ``ctx`` rather than saved because it is the layer's cached copy (no new
    memory) and not a function of the inputs' values.
    """

    @staticmethod
    def forward(ctx, x, b, a, values, index, bias, scale, order):  # type: ignore[override]
        w = _build(b, a, values, index, scale, order)
        y = F.linear(x, w, bias)
        ctx.save_for_backward(x, b, a, values, index)
        ctx.scale = scale
        ctx.order = order
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, b, a, values, index = ctx.saved_tensors
        scale = ctx.scale
        need_x, need_b, need_a, need_v, _, need_bias = ctx.needs_input_grad[:6]
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_b = grad_a = grad_v = grad_bias = None
        x2d = x.reshape(-1, x.shape[-1])
        w = None
        if need_x:
            w = _build(b, a, values, index, scale, ctx.order)
            grad_x = (dy @ w).view(*grad_y.shape[:-1], w.shape[1])
        if need_b or need_a or need_v:
            # dW reuses W's buffer: one out x in temporary in backward, allocated once.
            dw = torch.mm(dy.t(), x2d, out=w) if w is not None and w.dtype == dy.dtype else dy.t() @ x2d
            if need_v:
                grad_v = dw.view(-1).index_select(0, index)
            # dB, dA from dW (2 out*in*r FLOPs) or factorized through X A^T and dY B
            # (2 tokens*r*(out+in)): the cheaper one, i.e. factorized when tokens < out*in/(out+in).
            tokens = x2d.shape[0]
            factorized = tokens * (dw.shape[0] + dw.shape[1]) < dw.shape[0] * dw.shape[1]
            if need_b:
                grad_b = (dy.t() @ (x2d @ a.t()) if factorized else dw @ a.t()).mul_(scale)
            if need_a:
                grad_a = ((dy @ b).t() @ x2d if factorized else b.t() @ dw).mul_(scale)
        if need_bias and ctx.has_bias:
            grad_bias = dy.sum(0)
        return grad_x, grad_b, grad_a, grad_v, None, grad_bias, None, None


def sparse_low_rank_linear(
    x: Tensor,
    b: Tensor,
    a: Tensor,
    values: Tensor,
    index: Tensor,
    bias: Tensor | None,
    scale: float,
    *,
    order=None,
    layout=None,
) -> Tensor:
    """``x @ (scale * b @ a + S)^T + bias`` (x: (..., in) -> (..., out)) without saving W.

    W is built by the op ``sparse_low_rank_weight`` through :func:`lowmem._ops.dispatch`
    (Triton on CUDA, the reference on CPU). See :class:`SparseLowRankLinearFunction`. This is
    the ``ref`` backend of the op ``sparse_low_rank_linear``, whose ``cpp`` backend
    (:mod:`lowmem.kernels.sparse_low_rank_cpu`) multiplies by the factors instead; ``layout``
    is that backend's support grouping, accepted here so both share one signature, and unused.
    """
    return SparseLowRankLinearFunction.apply(x, b, a, values, index, bias, float(scale), order)
