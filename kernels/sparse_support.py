"""Products with SLTrain's sparse matrix S on its support, in PyTorch: the references, the support's
row / column groupings, and the cost model that picks the factorized CPU path.

SLTrain (Han et al. 2024) keeps S (out x in) as ``values`` (nnz,) at row-major flat positions
``index`` (nnz, int32/int64, distinct). The factorized linear (:mod:`lowmem.kernels.sparse_low_rank_cpu`)
never builds S or W; it needs three products over token activations X (T x in), dY (T x out)::

    X S^T   (T x out)    forward,  y += X S^T
    dY S    (T x in)     backward, dX += dY S
    SDDMM   (nnz,)       backward, dS[k] = sum_t dY[t, row_k] * X[t, col_k]  (dW = dY^T X on the support)

Their references are here (:func:`sparse_matmul_ref`, :func:`sparse_matmul_t_ref`,
:func:`sparse_sddmm_ref`); the compiled kernels (``csrc/sparse_support_mm.cpp``) take the support
grouped by output row (CSR: for ``X S^T`` and the SDDMM) or by input column (CSC: for ``dY S``),
which :func:`support_layout` builds once per support (a sort; the layer caches it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SPARSE_FLOP_COST",
    "SupportLayout",
    "factorized_flops",
    "factorized_is_cheaper",
    "rebuild_flops",
    "sparse_matmul_ref",
    "sparse_matmul_t_ref",
    "sparse_sddmm_ref",
    "support_layout",
]


class SupportLayout(NamedTuple):
    """S's support grouped two ways, for the compiled sparse products.

    By row (for ``X S^T`` and the SDDMM): ``row_ptr`` (out + 1,) int64 delimits row o's entries in
    ``row_index``, the flat positions ``row * in + col`` in row-major order: ``index`` itself when
    it is sorted (the layer's supports are; then ``row_perm`` is ``None`` and nothing is copied),
    else a sorted copy with ``row_perm`` (nnz,) int64 mapping it back to ``index``'s order. The
    kernels read column ``row_index[k] - o * in_features`` (stride ``in_features``).

    By column (for ``dY S``): ``col_ptr`` (in + 1,) int64, ``col_src`` (nnz,) int32 the rows, and
    ``col_perm`` (nnz,) int32 the entries' positions in ``index``.

    Memory the layer keeps for it: ``8 * nnz + 8 * (out + in)`` bytes (int32 rows and positions,
    plus the two pointer arrays): next to the 4-byte values and 4-byte index, it is as much again
    as the sparse part and about a tenth of a rank-d/4 layer's parameters.
    """

    out_features: int
    in_features: int
    row_ptr: Tensor
    row_index: Tensor
    row_perm: Tensor | None
    col_ptr: Tensor
    col_src: Tensor
    col_perm: Tensor

    @property
    def nnz(self) -> int:
        return self.row_index.numel()

    def row_values(self, values: Tensor) -> Tensor:
        """``values`` in row order (``values`` itself when ``index`` is sorted)."""
        return values if self.row_perm is None else values.index_select(0, self.row_perm)

    def col_values(self, values: Tensor) -> Tensor:
        """``values`` in column order (a gather of nnz values)."""
        return values.index_select(0, self.col_perm)


def _ptr(groups: Tensor, count: int) -> Tensor:
    ptr = torch.zeros(count + 1, dtype=torch.int64, device=groups.device)
    torch.cumsum(torch.bincount(groups, minlength=count), 0, out=ptr[1:])
    return ptr


def support_layout(index: Tensor, out_features: int, in_features: int) -> SupportLayout:
    """Group S's support by row and by column (CPU tensors; a sort of nnz keys).

    Args:
        index: (nnz,) int32/int64 row-major flat positions ``row * in_features + col``, distinct.

    Raises:
        ValueError: a position outside ``[0, out_features * in_features)``, a repeated position,
            a matrix side of ``2**31`` or more, or more than ``2**31 - 1`` entries (the kernels
            index features and entries in int32).
    """
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"support_layout: index must be 1-D int32/int64, got {index.dtype} {index.dim()}-D")
    if index.device.type != "cpu":
        raise ValueError(f"support_layout: index must be a CPU tensor, got {index.device}")
    if max(out_features, in_features, index.numel()) >= 2**31:
        raise ValueError("support_layout: out_features, in_features and nnz must be below 2**31")
    flat = index.long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= out_features * in_features):
        raise ValueError(
            f"support_layout: index has positions outside [0, {out_features * in_features}) "
            f"for a {out_features} x {in_features} matrix"
        )
    row_index, row_perm = index.contiguous(), None
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        row_perm = torch.argsort(flat, stable=True)
        flat = flat[row_perm]
        row_index = index[row_perm].contiguous()
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise ValueError("support_layout: index holds a position twice; S's support must be distinct")
    rows = flat // in_features
    cols = flat - rows * in_features
    col_order = torch.argsort(cols * out_features + rows)
    col_perm = col_order if row_perm is None else row_perm[col_order]
    return SupportLayout(
        out_features,
        in_features,
        _ptr(rows, out_features),
        row_index,
        row_perm,
        _ptr(cols, in_features),
        rows[col_order].to(torch.int32),
        col_perm.to(torch.int32),
    )


def _dense_s(values: Tensor, index: Tensor, out_features: int, in_features: int) -> Tensor:
    s = torch.zeros(out_features * in_features, dtype=values.dtype, device=values.device)
    return s.index_put_((index.long(),), values).view(out_features, in_features)


def sparse_matmul_ref(
    x: Tensor, values: Tensor, index: Tensor, out_features: int, in_features: int
) -> Tensor:
    """``x @ S^T``: x (T, in) -> (T, out), S built dense (reference; memory out x in)."""
    return x @ _dense_s(values, index, out_features, in_features).t()


def sparse_matmul_t_ref(
    dy: Tensor, values: Tensor, index: Tensor, out_features: int, in_features: int
) -> Tensor:
    """``dy @ S``: dy (T, out) -> (T, in), S built dense (reference)."""
    return dy @ _dense_s(values, index, out_features, in_features)


def sparse_sddmm_ref(dy: Tensor, x: Tensor, index: Tensor) -> Tensor:
    """``(dy^T @ x).flatten()[index]``: dy (T, out), x (T, in) -> (nnz,), S's gradient (reference)."""
    return (dy.t() @ x).reshape(-1).index_select(0, index.long())


#: How many GEMM FLOPs one FLOP of the compiled sparse products costs in time, for the cost model
#: below. Measured on the 2-core Sapphire Rapids dev box, fp32, 2048 x 2048, density 3%, 2048
#: tokens, same process (a shared machine, so ranges): the three sparse products plus the three
#: token-blocking copies they need ran at 35-45 GFLOP/s (1.55 GFLOP in 35-45 ms), MKL's square
#: GEMM at 190-215 GFLOP/s: a ratio of about 5, with 1 thread or 2. Between the paths' measured
#: crossovers (bench/layers.py shapes in report h4b) a ratio anywhere in 4-8 picks the same path.
SPARSE_FLOP_COST = 5.0


def factorized_flops(tokens: int, out_features: int, in_features: int, rank: int, nnz: int) -> int:
    """FLOPs of forward+backward of the factorized path: 7 rank-r GEMMs and 3 sparse products.

    ``X A^T``, ``(X A^T) B^T``; ``dY B``, ``(dY B) A``, ``(dY B)^T X``, ``X A^T`` again (not
    saved: it would break the saved-bytes budget), ``dY^T (X A^T)``: ``2 T r (4 in + 3 out)``;
    ``X S^T``, ``dY S``, the SDDMM: ``3 * 2 T nnz``.
    """
    return 2 * tokens * rank * (4 * in_features + 3 * out_features) + 6 * tokens * nnz


def rebuild_flops(tokens: int, out_features: int, in_features: int, rank: int) -> int:
    """FLOPs of forward+backward of the rebuild-W path (:class:`SparseLowRankLinearFunction`).

    W built twice (``2 * 2 out in r``), three dense GEMMs (``3 * 2 T out in``), and dB, dA from dW
    (``2 * 2 out in r``) or factorized (``2 * 2 T r (out + in)``), whichever is cheaper.
    """
    o, i = out_features, in_features
    return 6 * tokens * o * i + 4 * o * i * rank + min(4 * o * i * rank, 4 * tokens * rank * (o + i))


def factorized_is_cheaper(tokens: int, out_features: int, in_features: int, rank: int, nnz: int) -> bool:
    """Whether the factorized path should beat rebuilding W, by FLOPs with the sparse FLOPs
    weighted by :data:`SPARSE_FLOP_COST` (the factorized path is linear in tokens; rebuilding
    costs at least ``4 out in r`` (building W twice) on top of a dense layer's work at any T)."""
    o, i = out_features, in_features
    dense_part = factorized_flops(tokens, o, i, rank, 0)
    sparse_part = 6 * tokens * nnz * SPARSE_FLOP_COST
    return dense_part + sparse_part < rebuild_flops(tokens, o, i, rank)
