"""SLTrain's linear on CPU without building W: the factorized path over compiled sparse kernels.

SLTrain (Han et al. 2024) has ``W = scale * B @ A + S`` (B out x r, A r x in, S sparse on a fixed
support of nnz entries). Rebuilding W (:class:`lowmem.kernels.sparse_low_rank.SparseLowRankLinearFunction`)
costs a dense layer's three GEMMs plus four rank-r GEMMs of out x in x r: at least
``1 + 4 r / (3 T)`` times ``nn.Linear`` (1.33x at r = 512, T = 2048). Multiplying by the factors
instead costs fewer FLOPs than the dense layer when ``r < out, in`` are small enough, with X (T x in),
dY (T x out)::

    forward    Y  = scale (X A^T) B^T + X S^T + bias
    backward   G  = scale dY B                          (T x r)
               dX = G A + dY S
               dA = G^T X
               dB = scale dY^T (X A^T)                  (X A^T recomputed: see below)
               dS = SDDMM(dY, X) on the support         (dS[k] = sum_t dY[t, row_k] X[t, col_k])
               dbias = sum_t dY

The rank-r products are BLAS GEMMs; the three sparse ones are the compiled kernels of
``csrc/sparse_support_mm.cpp`` (OpenMP + AVX-512/AVX2), which run on token-blocked copies of X and
dY (the token axis made the fast one, in blocks of 64, zero-padded) and the support grouped by row
and by column (:func:`lowmem.kernels.sparse_support.support_layout`, which the layer caches).

Saved for backward: x, B, A, the values and the index, as in the rebuild path; ``X A^T`` (T x r)
is recomputed rather than saved, because the layer's budget is "input activation plus the
parameters' own size" and T x r (4 MB at T = 2048, r = 512, fp32) does not fit in it.

Which path runs is a cost model (:func:`lowmem.kernels.sparse_support.factorized_is_cheaper`):
FLOPs of each, with a sparse FLOP weighted by its measured cost. The factorized path is linear in
T and rebuilding costs at least ``4 out in r`` more than a dense layer at any T, so few tokens favour
the factorized path and high ranks (``r`` near ``min(out, in)``) favour rebuilding.

Importing this module builds the kernels (first time: ~15 s; later a cached load); ``lowmem._ops``
imports it lazily as the ``cpp`` backend of ``sparse_low_rank_linear`` and records why when it
cannot. fp32 and fp64 only: other dtypes (and mixed dtypes) take the rebuild path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lowmem.kernels._cpp import load_cpp_op
from lowmem.kernels.sparse_low_rank import sparse_low_rank_linear
from lowmem.kernels.sparse_support import SupportLayout, factorized_is_cheaper, support_layout

__all__ = [
    "SparseLowRankLinearCpuFunction",
    "sparse_low_rank_linear_cpu",
    "sparse_matmul",
    "sparse_matmul_t",
    "sparse_sddmm",
    "token_blocks",
]

_mm_op = load_cpp_op("sparse_support_mm").default
_blocks_op = torch.ops.lowmem.sparse_support_blocks.default  # registered by the same library
_sddmm_op = torch.ops.lowmem.sparse_support_sddmm.default

_DTYPES = (torch.float32, torch.float64)


def token_block_size(tokens: int) -> int:
    """Tokens per block: 64 (a 2048-feature fp32 block is 512 KiB, an L2's share), or 16 for at
    most 16 tokens, where 64 would be mostly padding."""
    return 16 if tokens <= 16 else 64


def token_blocks(x: Tensor, block: int | None = None) -> Tensor:
    """x (T, F) -> (ceil(T / block), F, block): each block of tokens transposed, zeros past T."""
    x = x.contiguous()
    tokens, features = x.shape
    block = block or token_block_size(tokens)
    out = torch.empty(-(-tokens // block), features, block, dtype=x.dtype)
    _blocks_op(x, out)
    return out


def _check(name: str, layout: SupportLayout, values: Tensor | None, *acts: Tensor) -> None:
    if values is not None and (values.dim() != 1 or values.numel() != layout.nnz):
        raise ValueError(f"{name}: values must be 1-D with the layout's {layout.nnz} entries")
    tensors = [t for t in (values, *acts) if t is not None]
    for t in tensors:
        if t.dtype not in _DTYPES or t.device.type != "cpu":
            raise ValueError(f"{name}: tensors must be fp32/fp64 CPU tensors, got {t.dtype} on {t.device}")
        if t.dtype != tensors[0].dtype:
            raise ValueError(f"{name}: dtypes differ ({t.dtype} vs {tensors[0].dtype}); cast them to one")


def sparse_matmul(
    x: Tensor,
    values: Tensor,
    layout: SupportLayout,
    *,
    out: Tensor | None = None,
    blocks: Tensor | None = None,
) -> Tensor:
    """``out += x @ S^T`` (x (T, in); out (T, out_features), zeros if not given), compiled.

    ``blocks`` is :func:`token_blocks` of x when the caller has it already.
    """
    _check("sparse_matmul", layout, values, x)
    if x.dim() != 2 or x.shape[1] != layout.in_features:
        raise ValueError(f"sparse_matmul: x must be (T, {layout.in_features}), got {tuple(x.shape)}")
    if out is None:
        out = torch.zeros(x.shape[0], layout.out_features, dtype=x.dtype)
    if blocks is None:
        blocks = token_blocks(x)
    _mm_op(
        out,
        blocks,
        layout.row_ptr,
        layout.row_index,
        layout.row_values(values).contiguous(),
        layout.in_features,
    )
    return out


def sparse_matmul_t(
    dy: Tensor,
    values: Tensor,
    layout: SupportLayout,
    *,
    out: Tensor | None = None,
    blocks: Tensor | None = None,
) -> Tensor:
    """``out += dy @ S`` (dy (T, out_features); out (T, in), zeros if not given), compiled."""
    _check("sparse_matmul_t", layout, values, dy)
    if dy.dim() != 2 or dy.shape[1] != layout.out_features:
        raise ValueError(f"sparse_matmul_t: dy must be (T, {layout.out_features}), got {tuple(dy.shape)}")
    if out is None:
        out = torch.zeros(dy.shape[0], layout.in_features, dtype=dy.dtype)
    if blocks is None:
        blocks = token_blocks(dy)
    _mm_op(out, blocks, layout.col_ptr, layout.col_src, layout.col_values(values).contiguous(), 0)
    return out


def sparse_sddmm(
    dy: Tensor,
    x: Tensor,
    layout: SupportLayout,
    *,
    dy_blocks: Tensor | None = None,
    x_blocks: Tensor | None = None,
) -> Tensor:
    """``(dy^T @ x)`` at S's support, in ``index`` order: dy (T, out), x (T, in) -> (nnz,)."""
    _check("sparse_sddmm", layout, None, dy, x)
    tokens = dy.shape[0]
    if (
        dy.dim() != 2
        or x.dim() != 2
        or x.shape[0] != tokens
        or dy.shape[1] != layout.out_features
        or x.shape[1] != layout.in_features
    ):
        raise ValueError(f"sparse_sddmm: need dy (T, {layout.out_features}) and x (T, {layout.in_features})")
    block = token_block_size(tokens)
    dy_blocks = token_blocks(dy, block) if dy_blocks is None else dy_blocks
    x_blocks = token_blocks(x, block) if x_blocks is None else x_blocks
    ds = torch.empty(layout.nnz, dtype=dy.dtype)
    _sddmm_op(ds, dy_blocks, x_blocks, layout.row_ptr, layout.row_index, layout.in_features, tokens)
    if layout.row_perm is None:
        return ds
    return torch.empty_like(ds).index_copy_(0, layout.row_perm, ds)


class SparseLowRankLinearCpuFunction(torch.autograd.Function):
    """``y = x @ (scale * B @ A + S)^T + bias`` by the factors: see the module docstring.

    Saved for backward: x, B, A, values, index. ``layout`` is the layer's cached
    :class:`SupportLayout` of ``index``, held on ``ctx`` (not a function of the inputs' values).
    """

    @staticmethod
    def forward(ctx, x, b, a, values, index, bias, scale, layout):  # type: ignore[override]
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        h = x2d @ a.t()
        y = torch.addmm(bias, h, b.t(), alpha=scale) if bias is not None else torch.mm(h, b.t()).mul_(scale)
        sparse_matmul(x2d, values, layout, out=y)
        ctx.save_for_backward(x, b, a, values, index)
        ctx.scale = scale
        ctx.layout = layout
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[1])

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, b, a, values, _ = ctx.saved_tensors
        scale, layout = ctx.scale, ctx.layout
        need_x, need_b, need_a, need_v, _, need_bias = ctx.needs_input_grad[:6]
        dy = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()  # the grad of a sum is a stride-0 view
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        grad_x = grad_b = grad_a = grad_v = grad_bias = None
        block = token_block_size(dy.shape[0])
        dy_blocks = token_blocks(dy, block) if need_x or need_v else None
        if need_x or need_a:
            g = torch.mm(dy, b).mul_(scale)
            if need_x:
                grad_x = sparse_matmul_t(dy, values, layout, out=g @ a, blocks=dy_blocks)
                grad_x = grad_x.view(*grad_y.shape[:-1], grad_x.shape[1])
            if need_a:
                grad_a = g.t() @ x2d
        if need_b:
            grad_b = dy.t() @ torch.mm(x2d, a.t()).mul_(scale)
        if need_v:
            grad_v = sparse_sddmm(dy, x2d, layout, dy_blocks=dy_blocks, x_blocks=token_blocks(x2d, block))
        if need_bias and ctx.has_bias:
            grad_bias = dy.sum(0)
        return grad_x, grad_b, grad_a, grad_v, None, grad_bias, None, None


def sparse_low_rank_linear_cpu(
    x: Tensor,
    b: Tensor,
    a: Tensor,
    values: Tensor,
    index: Tensor,
    bias: Tensor | None,
    scale: float,
    *,
    order=None,
    layout: SupportLayout | Callable[[], SupportLayout] | None = None,
) -> Tensor:
    """:func:`lowmem.kernels.sparse_low_rank.sparse_low_rank_linear` on CPU, factorized.

    Same arguments and result (x (..., in) -> (..., out)). ``layout`` is
    :func:`support_layout` of ``index`` or a callable returning it (the layer passes its cached
    one); computed here when not given. Falls back to the rebuild-W path for dtypes other than
    fp32 / fp64, mixed dtypes, non-CPU tensors, and shapes where the cost model says rebuilding
    W is cheaper (``order`` is passed on to it).
    """
    out_features, rank = b.shape
    in_features = a.shape[-1]
    tensors = [t for t in (x, b, a, values, bias) if t is not None]
    usable = (
        x.dtype in _DTYPES
        and all(t.dtype == x.dtype and t.device.type == "cpu" for t in tensors)
        and index.device.type == "cpu"
        and b.dim() == 2
        and a.dim() == 2
        and a.shape[0] == rank
        and x.shape[-1] == in_features
        and values.shape == index.shape
    )
    tokens = x.numel() // max(1, x.shape[-1])
    if not usable or not factorized_is_cheaper(tokens, out_features, in_features, rank, index.numel()):
        return sparse_low_rank_linear(x, b, a, values, index, bias, scale, order=order)
    if callable(layout):
        layout = layout()
    if layout is None:
        layout = support_layout(index, out_features, in_features)
    if (layout.out_features, layout.in_features, layout.nnz) != (out_features, in_features, index.numel()):
        raise ValueError(
            f"sparse_low_rank_linear_cpu: layout is for a {layout.out_features} x {layout.in_features} "
            f"support of {layout.nnz} entries, the weight is {out_features} x {in_features} with "
            f"{index.numel()}; pass support_layout(index, {out_features}, {in_features})"
        )
    return SparseLowRankLinearCpuFunction.apply(x, b, a, values, index, bias, float(scale), layout)
