"""The compiled sparse products (csrc/sparse_support_mm.cpp) against their references, and the
factorized CPU autograd path of SLTrain's linear against autograd through a dense W.

Error budget (DESIGN.md): against a float64 ground truth, the kernel's max error in fp32 is at most
2x the fp32 reference's own max error plus ``atol = 2**-20 * max|truth|`` (a few ulps of summation
order: the kernel sums a row's entries token-vector by token-vector with fused multiply-adds, the
reference through a dense GEMM). fp64 runs are compared with the fp64 reference at 1e-12.
"""

from __future__ import annotations

import pytest
import torch

import lowmem
from lowmem.kernels.sparse_low_rank import SparseLowRankLinearFunction
from lowmem.kernels.sparse_support import (
    factorized_flops,
    factorized_is_cheaper,
    rebuild_flops,
    sparse_matmul_ref,
    sparse_matmul_t_ref,
    sparse_sddmm_ref,
    support_layout,
)
from lowmem.nn.sparse_low_rank import SparseLowRankLinear

cpu = pytest.importorskip("lowmem.kernels.sparse_low_rank_cpu", reason="the C++ op needs a compiler")

# (tokens, out, in, density): 1s, primes, token counts on both sides of the block sizes (16 and
# 64, several blocks and a ragged last one), an empty and a full support.
SHAPES = [(1, 1, 1, 1.0), (13, 37, 53, 0.2), (67, 41, 29, 0.05), (130, 17, 31, 1.0), (23, 19, 40, 0.0)]
DTYPES = [torch.float32, torch.float64]


def _support(out: int, inp: int, density: float, seed: int, *, shuffled: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    nnz = round(density * out * inp)
    index = torch.randperm(out * inp, generator=gen)[:nnz]
    return (index if shuffled else index.sort().values).to(torch.int32)


def _within_budget(got: torch.Tensor, ref_low: torch.Tensor, truth: torch.Tensor) -> None:
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)
        return
    scale = truth.abs().max().item() if truth.numel() else 0.0
    err = (got.double() - truth).abs().max().item() if truth.numel() else 0.0
    ref_err = (ref_low.double() - truth).abs().max().item() if truth.numel() else 0.0
    assert err <= 2 * ref_err + 2.0**-20 * scale, (err, ref_err, scale)


@pytest.mark.parametrize("shuffled", [False, True], ids=["sorted", "shuffled"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_products_match_references(shape, dtype, shuffled) -> None:
    tokens, out, inp, density = shape
    index = _support(out, inp, density, seed=tokens, shuffled=shuffled)
    layout = support_layout(index, out, inp)
    assert (layout.row_perm is None) == (not shuffled or index.numel() <= 1)
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(index.numel(), generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, inp, generator=gen, dtype=torch.float64)
    dy = torch.randn(tokens, out, generator=gen, dtype=torch.float64)
    y0 = torch.randn(tokens, out, generator=gen, dtype=torch.float64)  # out= accumulates into it
    low = [t.to(dtype) for t in (values, x, dy, y0)]
    lv, lx, ldy, ly0 = low

    got = cpu.sparse_matmul(lx, lv, layout, out=ly0.clone())
    truth = y0 + sparse_matmul_ref(x, values, index, out, inp)
    _within_budget(got, ly0 + sparse_matmul_ref(lx, lv, index, out, inp), truth)

    got = cpu.sparse_matmul_t(ldy, lv, layout)
    _within_budget(
        got, sparse_matmul_t_ref(ldy, lv, index, out, inp), sparse_matmul_t_ref(dy, values, index, out, inp)
    )

    got = cpu.sparse_sddmm(ldy, lx, layout)
    assert got.shape == index.shape
    _within_budget(got, sparse_sddmm_ref(ldy, lx, index), sparse_sddmm_ref(dy, x, index))


@pytest.mark.parametrize("tokens", [1, 16, 17, 64, 130])
def test_token_blocks_layout(tokens: int) -> None:
    x = torch.randn(tokens, 37)
    blocks = cpu.token_blocks(x)
    tb = cpu.token_block_size(tokens)
    assert blocks.shape == (-(-tokens // tb), 37, tb)
    flat = blocks.permute(0, 2, 1).reshape(-1, 37)  # (padded tokens, features)
    torch.testing.assert_close(flat[:tokens], x, rtol=0, atol=0)
    assert bool((flat[tokens:] == 0).all())


def test_support_layout_groups_and_errors() -> None:
    out, inp = 7, 5
    index = _support(out, inp, 0.6, seed=3, shuffled=True)
    layout = support_layout(index, out, inp)
    flat = index.long()
    rows, cols = flat // inp, flat % inp
    for o in range(out):  # row grouping: the entries of row o, columns ascending
        seg = layout.row_index[layout.row_ptr[o] : layout.row_ptr[o + 1]].long()
        assert torch.equal(seg, flat[rows == o].sort().values)
    for i in range(inp):  # column grouping: rows ascending, and col_perm points at those entries
        sl = slice(layout.col_ptr[i], layout.col_ptr[i + 1])
        assert torch.equal(layout.col_src[sl].long(), rows[cols == i].sort().values)
        assert torch.equal(flat[layout.col_perm[sl].long()], (layout.col_src[sl].long() * inp + i))
    with pytest.raises(ValueError, match="outside"):
        support_layout(torch.tensor([0, out * inp], dtype=torch.int32), out, inp)
    with pytest.raises(ValueError, match="twice"):
        support_layout(torch.tensor([3, 1, 3], dtype=torch.int32), out, inp)
    with pytest.raises(ValueError, match="int32/int64"):
        support_layout(torch.tensor([1.0]), out, inp)


def test_bad_arguments_name_the_fix() -> None:
    index = _support(6, 5, 0.5, seed=0)
    layout = support_layout(index, 6, 5)
    values = torch.randn(index.numel())
    with pytest.raises(ValueError, match=r"x must be \(T, 5\)"):
        cpu.sparse_matmul(torch.randn(3, 4), values, layout)
    with pytest.raises(ValueError, match="dtypes differ"):
        cpu.sparse_matmul(torch.randn(3, 5, dtype=torch.float64), values, layout)
    with pytest.raises(ValueError, match="fp32/fp64"):
        cpu.sparse_matmul_t(torch.randn(3, 6).bfloat16(), values.bfloat16(), layout)
    with pytest.raises(ValueError, match=r"need dy \(T, 6\) and x \(T, 5\)"):
        cpu.sparse_sddmm(torch.randn(3, 6), torch.randn(4, 5), layout)
    with pytest.raises(ValueError, match="layout's 15 entries"):
        cpu.sparse_matmul(torch.randn(3, 5), values[:-1], layout)
    b, a = torch.randn(40, 2), torch.randn(2, 30)
    index = _support(40, 30, 0.1, seed=0)
    assert factorized_is_cheaper(1, 40, 30, 2, index.numel())  # so the layout is used, and checked
    other = support_layout(_support(40, 30, 0.05, seed=1), 40, 30)
    with pytest.raises(ValueError, match="pass support_layout"):
        cpu.sparse_low_rank_linear_cpu(
            torch.randn(1, 30), b, a, torch.randn(index.numel()), index, None, 1.0, layout=other
        )


def _factorized(x, b, a, values, index, bias, scale):
    layout = support_layout(index, b.shape[0], a.shape[1])
    return cpu.SparseLowRankLinearCpuFunction.apply(x, b, a, values, index, bias, scale, layout)


# Rank 1 and a full support, 3-D input, no bias, a shuffled support, one token.
@pytest.mark.parametrize(
    ("x_shape", "out", "rank", "density", "bias", "shuffled"),
    [
        ((3, 5, 7), 6, 2, 0.3, True, False),
        ((1, 7), 11, 1, 1.0, False, False),
        ((19, 7), 5, 3, 0.4, True, True),
    ],
)
def test_gradcheck_factorized_fp64(x_shape, out, rank, density, bias, shuffled) -> None:
    gen = torch.Generator().manual_seed(2)
    inp = x_shape[-1]
    index = _support(out, inp, density, seed=5, shuffled=shuffled)
    tensors = [
        torch.randn(x_shape, generator=gen, dtype=torch.float64),
        torch.randn(out, rank, generator=gen, dtype=torch.float64),
        torch.randn(rank, inp, generator=gen, dtype=torch.float64),
        torch.randn(index.numel(), generator=gen, dtype=torch.float64),
    ]
    if bias:
        tensors.append(torch.randn(out, generator=gen, dtype=torch.float64))
    leaves = [t.requires_grad_() for t in tensors]

    def fn(x, b, a, values, bias=None):
        return _factorized(x, b, a, values, index, bias, 0.5)

    assert torch.autograd.gradcheck(fn, leaves)


def test_factorized_fp32_equals_dense_autograd_in_fp64() -> None:
    out, inp, rank, tokens, scale = 29, 43, 4, 70, 0.25
    gen = torch.Generator().manual_seed(3)
    index = _support(out, inp, 0.1, seed=7)
    truth = [
        torch.randn(tokens, inp, generator=gen, dtype=torch.float64),
        torch.randn(out, rank, generator=gen, dtype=torch.float64),
        torch.randn(rank, inp, generator=gen, dtype=torch.float64),
        torch.randn(index.numel(), generator=gen, dtype=torch.float64),
        torch.randn(out, generator=gen, dtype=torch.float64),
    ]
    grad = torch.randn(tokens, out, generator=gen, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in truth]
    x, b, a, v, bias = leaves64
    w = scale * b @ a + torch.zeros(out * inp, dtype=torch.float64).index_put((index.long(),), v).view(
        out, inp
    )
    want = torch.autograd.grad(x @ w.t() + bias, leaves64, grad)
    y64 = (x @ w.t() + bias).detach()

    leaves32 = [t.float().requires_grad_() for t in truth]
    y = _factorized(*leaves32[:4], index, leaves32[4], scale)
    got = torch.autograd.grad(y, leaves32, grad.float())
    for g32, g64, name in zip((y, *got), (y64, *want), ("y", "x", "b", "a", "values", "bias"), strict=True):
        # fp32 sums of at most max(tokens, in, out) = 70 terms: a few hundred ulps at worst.
        tol = 1e-4 * g64.abs().max().item()
        assert (g32.double() - g64).abs().max().item() <= tol, name


def test_saved_tensors_within_input_plus_params() -> None:
    out, inp, rank, tokens = 96, 80, 16, 33
    layer = SparseLowRankLinear(inp, out, rank, density=0.05, seed=0)
    x = torch.randn(tokens, inp, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert type(y.grad_fn).__name__ == "SparseLowRankLinearCpuFunctionBackward"
    assert saved, "the hook saw nothing: the test would not detect a saved W"
    assert all(t.numel() < out * inp for t in saved), [tuple(t.shape) for t in saved]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    own = sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
    assert sum(storages.values()) <= x.numel() * x.element_size() + own


def test_layer_dispatch_and_fallbacks() -> None:
    layer = SparseLowRankLinear(40, 24, 6, density=0.1, seed=1)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(5, 40, requires_grad=True)
    y = layer(x)  # few tokens: the factorized path is cheaper
    assert type(y.grad_fn).__name__ == "SparseLowRankLinearCpuFunctionBackward"
    with lowmem.backend("ref"):
        y_ref = layer(x)
    assert type(y_ref.grad_fn).__name__ == f"{SparseLowRankLinearFunction.__name__}Backward"
    torch.testing.assert_close(y, y_ref)
    # bf16 has no compiled kernel: the rebuild-W path.
    y16 = layer.to(torch.bfloat16)(x.detach().bfloat16())
    assert type(y16.grad_fn).__name__ == f"{SparseLowRankLinearFunction.__name__}Backward"
    # Full rank and many tokens: rebuilding W costs fewer FLOPs, and the cpp op does that.
    full = SparseLowRankLinear(8, 8, 8, density=0.5, seed=2)
    assert not factorized_is_cheaper(4096, 8, 8, 8, full.nnz)
    y_full = cpu.sparse_low_rank_linear_cpu(
        torch.randn(4096, 8), full.B, full.A, full.sparse_values, full.sparse_index, full.bias, full.scale
    )
    assert type(y_full.grad_fn).__name__ == f"{SparseLowRankLinearFunction.__name__}Backward"


def test_layout_cached_per_index_version() -> None:
    layer = SparseLowRankLinear(20, 12, 3, density=0.2, seed=0)
    first = layer._support_layout()
    assert layer._support_layout() is first
    state = layer.state_dict()
    state["sparse_index"] = torch.sort(torch.randperm(240)[: layer.nnz]).values.to(torch.int32)
    layer.load_state_dict(state)  # copies into the buffer: its version moves on
    second = layer._support_layout()
    assert second is not first
    assert torch.equal(second.row_index, layer.sparse_index)
    assert layer._tile_order() is layer._tile_order()  # the Triton tile order shares the cache
    assert layer._support_layout() is second


def test_cost_model_scales_with_tokens() -> None:
    out, inp, rank, nnz = 2048, 2048, 512, round(0.03 * 2048 * 2048)
    # Rebuilding W pays 4 out*in*r (two builds) on top of a dense layer at any token count; the factorized
    # path is linear in tokens, so it wins at few tokens and at rank d/4.
    assert rebuild_flops(1, out, inp, rank) > 4 * out * inp * rank
    assert factorized_flops(2, out, inp, rank, nnz) == 2 * factorized_flops(1, out, inp, rank, nnz)
    assert factorized_is_cheaper(1, out, inp, rank, nnz)
    assert factorized_is_cheaper(2048, out, inp, rank, nnz)
    assert not factorized_is_cheaper(8192, 1024, 1024, 1024, nnz // 4)


def test_op_rejects_a_malformed_grouping() -> None:
    """The raw op checks its grouping, so a bad one is an error rather than an out-of-bounds read."""
    index = _support(6, 5, 0.5, seed=0)
    layout = support_layout(index, 6, 5)
    x = torch.randn(3, 5)
    blocks = cpu.token_blocks(x)
    values = torch.randn(index.numel())
    out = torch.zeros(3, 6)
    with pytest.raises(RuntimeError, match="outside"):  # stride 0 reads the flat positions as features
        torch.ops.lowmem.sparse_support_mm(out, blocks, layout.row_ptr, layout.row_index, values, 0)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        bad_ptr = layout.row_ptr.clone()
        bad_ptr[1] = index.numel()  # row 0 claims every entry, row 1 then starts before it ends
        torch.ops.lowmem.sparse_support_mm(out, blocks, bad_ptr, layout.row_index, values, 5)
    with pytest.raises(RuntimeError, match="token block"):
        odd_block = torch.zeros(1, 5, 3)
        torch.ops.lowmem.sparse_support_mm(out, odd_block, layout.row_ptr, layout.row_index, values, 5)
