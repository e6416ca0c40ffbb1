"""The fused build-W kernel against its reference, the autograd function, and saved-tensor bytes.

Error budget (DESIGN.md): against a float64 ground truth ``scale * B @ A + S``, the kernel's max
error is at most 2x the reference's own max error when the reference runs in the low dtype, plus
``atol = REL[dtype] * max|truth|``. Both accumulate the product in fp32 and round at the store
and again after adding S (the reference's addmm then index_add_ do the same), so REL is one
machine epsilon for 16-bit dtypes (a value near a rounding midpoint can round either way after
a different summation order) and 2**-20 for fp32 (a few ulps of summation order).
"""

from __future__ import annotations

import pytest
import torch

import lowmem
from lowmem._ops import dispatch
from lowmem.kernels.sparse_low_rank import (
    SparseLowRankLinearFunction,
    sparse_low_rank_linear,
    sparse_low_rank_weight_bytes,
    sparse_low_rank_weight_flops,
    sparse_low_rank_weight_ref,
    tile_order,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REL = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# (out, in, rank, density): 1s, primes, non-powers of two, a tile-straddling shape, empty S.
SHAPES = [(1, 1, 1, 1.0), (37, 53, 5, 0.2), (64, 33, 17, 0.05), (71, 97, 3, 0.03), (19, 40, 8, 0.0)]


def _operands(out, inp, rank, density, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(out, rank, generator=gen, dtype=torch.float64)
    a = torch.randn(rank, inp, generator=gen, dtype=torch.float64)
    nnz = round(density * out * inp)
    index = torch.randperm(out * inp, generator=gen)[:nnz].sort().values.to(torch.int32)
    values = torch.randn(nnz, generator=gen, dtype=torch.float64)
    return b.to(dtype).to(device), a.to(dtype).to(device), values.to(dtype).to(device), index.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape, dtype, device) -> None:
    b, a, values, index = _operands(*shape, dtype, device)
    scale = 0.75
    with lowmem.backend("triton"):
        kernel = dispatch("sparse_low_rank_weight", device, dtype)
    got = kernel(b, a, values, index, scale)
    want = sparse_low_rank_weight_ref(b, a, values, index, scale)
    truth = sparse_low_rank_weight_ref(b.double(), a.double(), values.double(), index, scale).cpu()
    assert got.shape == truth.shape and got.dtype == dtype
    err_got = (got.double().cpu() - truth).abs().max().item()
    err_ref = (want.double().cpu() - truth).abs().max().item()
    atol = REL[dtype] * truth.abs().max().item()
    assert err_got <= 2 * err_ref + atol, (
        f"kernel error {err_got:.3g} vs reference {err_ref:.3g} + atol {atol:.3g}"
    )


def test_kernel_adds_every_sparse_value_once(device) -> None:
    # With B = 0 the kernel's output is exactly S: every support entry once, zeros elsewhere.
    b, a, values, index = _operands(45, 67, 4, 0.3, torch.float32, device, seed=3)
    with lowmem.backend("triton"):
        w = dispatch("sparse_low_rank_weight", device, torch.float32)(
            torch.zeros_like(b), a, values, index, 1.0
        )
    expected = torch.zeros(45 * 67, dtype=torch.float32, device=device)
    expected[index.long()] = values
    assert torch.equal(w.view(-1), expected)


def test_tile_order_groups_entries_by_tile() -> None:
    index = torch.tensor([0, 3, 4, 9, 10, 14], dtype=torch.int32)  # in a 3 x 5 matrix
    perm, ptr = tile_order(index, 3, 5, 2, 2)  # tiles: 2 rows of tiles x 3 columns of tiles
    rows, cols = index.long() // 5, index.long() % 5
    tile = (rows // 2) * 3 + cols // 2
    assert ptr.tolist()[0] == 0 and ptr.tolist()[-1] == index.numel() and ptr.numel() == 7
    for t in range(6):
        members = perm[ptr[t] : ptr[t + 1]].long()
        assert sorted(members.tolist()) == sorted((tile == t).nonzero().flatten().tolist())


def test_reference_rejects_bad_input() -> None:
    b, a, values, index = _operands(5, 7, 2, 0.3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="do not chain"):
        sparse_low_rank_weight_ref(b, a.t(), values, index, 1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        sparse_low_rank_weight_ref(b, a, values.double(), index, 1.0)
    with pytest.raises(ValueError, match="int32/int64"):
        sparse_low_rank_weight_ref(b, a, values, index.float(), 1.0)


# 12 tokens: dB, dA from the dense dW; 1 token (tokens*(out+in) < out*in): the factorized forms.
@pytest.mark.parametrize("x_shape", [(3, 4, 5), (1, 5)], ids=["dW-route", "factorized"])
def test_gradcheck_reference_fp64(x_shape) -> None:
    b, a, values, index = _operands(6, 5, 2, 0.3, torch.float64, "cpu", seed=1)
    x = torch.randn(*x_shape, dtype=torch.float64)  # (..., in)
    bias = torch.randn(6, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, b, a, values, bias)]

    def fn(x, b, a, values, bias):
        return sparse_low_rank_linear(x, b, a, values, index, bias, 0.5)

    assert torch.autograd.gradcheck(fn, leaves)


def test_function_equals_dense_linear_and_its_gradients() -> None:
    b, a, values, index = _operands(13, 11, 3, 0.2, torch.float64, "cpu", seed=2)
    x = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    params = [t.clone().requires_grad_() for t in (b, a, values)]
    y = sparse_low_rank_linear(x, *params, index, None, 0.25)
    pb, pa, pv = params  # W in differentiable torch ops: autograd's own gradients are the truth
    sparse = torch.zeros(13 * 11, dtype=torch.float64).index_put((index.long(),), pv).view(13, 11)
    w = 0.25 * pb @ pa + sparse
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ w.t()
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params], g)
    grads2 = torch.autograd.grad(y2, [x2, *params], g)
    for got, want in zip(grads, grads2, strict=True):
        torch.testing.assert_close(got, want)


def test_no_dense_weight_saved_for_backward() -> None:
    out, inp, rank, tokens = 64, 48, 8, 5
    b, a, values, index = _operands(out, inp, rank, 0.03, torch.float32, "cpu")
    params = [t.requires_grad_() for t in (b, a, values)]
    x = torch.randn(tokens, inp, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse_low_rank_linear(x, *params, index, None, 1.0).sum().backward()
    assert saved, "the hook saw nothing: the test would not detect a saved W"
    assert all(t.numel() < out * inp for t in saved), [tuple(t.shape) for t in saved]
    total = sum(t.numel() * t.element_size() for t in saved)
    budget = x.numel() * 4 + sum(t.numel() * t.element_size() for t in (b, a, values, index))
    assert total <= budget
    # The same hook does see nn.Linear's weight, so it would catch a saved W.
    seen: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.numel()) or t, lambda t: t):
        torch.nn.functional.linear(x, torch.randn(out, inp, requires_grad=True))
    assert out * inp in seen


def test_function_class_is_the_entry_point() -> None:
    # sparse_low_rank_linear is a thin wrapper: the graph node is the custom Function.
    b, a, values, index = _operands(4, 3, 1, 0.5, torch.float32, "cpu")
    y = sparse_low_rank_linear(torch.randn(2, 3), b.requires_grad_(), a, values, index, None, 1.0)
    assert type(y.grad_fn).__name__ == f"{SparseLowRankLinearFunction.__name__}Backward"


def test_cost_model() -> None:
    m, n, r, nnz = 64, 32, 8, 100
    assert sparse_low_rank_weight_flops(m, n, r, nnz) == 2 * m * n * r + m * n + nnz
    assert sparse_low_rank_weight_bytes(m, n, r, nnz, 2) == 2 * (m * r + r * n + m * n) + nnz * (2 + 8 + 4)
