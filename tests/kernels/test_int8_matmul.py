"""int8 x int8 -> int32 GEMM with the fused dequant epilogue, against its reference and against
exact int64 products: bit-exact accumulation on odd shapes (K = 1, sizes off the block grid),
exactness of the fp32-emulated reference past 2**24, the epilogue, zero / outlier / non-finite
rows end to end, and SQNR >= 30 dB against fp32 for row-wise int8 on Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

import lowmem
from lowmem._ops import dispatch
from lowmem.kernels.int8_matmul import MAX_K, int8_matmul_bytes, int8_matmul_ops, int8_matmul_ref
from lowmem.kernels.quantize import quantize_int8_ref

SHAPES = [(1, 1, 1), (7, 33, 1), (33, 7, 100), (67, 71, 130), (1, 257, 16), (257, 1, 17), (65, 129, 63)]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _kernel(device: torch.device):
    with lowmem.backend("triton"):
        return dispatch("int8_matmul", device)


def _ints(shape, device, seed: int, low: int = -128, high: int = 128) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int8).to(device)


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu().long() @ b.cpu().long()).int()


def _sqnr_db(truth: torch.Tensor, approx: torch.Tensor) -> float:
    truth, approx = truth.double().cpu(), approx.double().cpu()
    return 10 * math.log10(truth.square().sum().item() / (truth - approx).square().sum().item())


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_int32_accumulation_is_exact(m: int, n: int, k: int, device: torch.device) -> None:
    a = _ints((m, k), device, seed=m * 7 + k)
    b_t = _ints((n, k), device, seed=n * 11 + k)  # a weight (N, K): the kernel reads b = w.t()
    want = _exact(a, b_t.t())
    got = _kernel(device)(a, b_t.t())
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(int8_matmul_ref(a, b_t.t()).cpu(), want)
    assert torch.equal(_kernel(device)(a, b_t.t().contiguous()).cpu(), want)  # row-major b too


def test_sums_past_2_to_the_24_stay_exact(device: torch.device) -> None:
    """|acc| > 2**24, where fp32 stops holding every integer: the kernel accumulates in int32 and
    the reference chunks K so each fp32 partial sum stays exact."""
    k = 1500
    a = _ints((3, k), device, seed=1, low=100)  # same sign, large: sums reach ~1.9e7 > 2**24
    b = _ints((k, 5), device, seed=2, low=100)
    want = _exact(a, b)
    assert int(want.min()) > 2**24
    assert not torch.equal((a.cpu().float() @ b.cpu().float()).long(), want.long())  # plain fp32 is not exact
    assert torch.equal(_kernel(device)(a, b).cpu(), want)
    k = 5000  # several reference chunks, worst-case products (-128 * -128)
    a = torch.full((2, k), -128, dtype=torch.int8, device=device)
    b = _ints((k, 3), device, seed=3)
    assert torch.equal(int8_matmul_ref(a, b).cpu(), _exact(a, b))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (67, 71, 130), (65, 129, 63)])
def test_dequant_epilogue_matches_ref(m, n, k, with_bias: bool, out_dtype: torch.dtype, device) -> None:
    gen = torch.Generator().manual_seed(m + n + k)
    a, b = _ints((m, k), device, seed=5), _ints((k, n), device, seed=6)
    sa = (torch.rand(m, generator=gen) * 1e-3 + 1e-4).to(device)  # outputs stay inside fp16's range
    sb = (torch.rand(n, generator=gen) * 1e-2 + 1e-3).to(device)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=torch.bfloat16) if with_bias else None
    got = _kernel(device)(a, b, sa, sb, bias, out_dtype)
    want = int8_matmul_ref(a, b, sa, sb, bias, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    if device.type == "cpu":  # the interpreter does the same fp32 operations: bit for bit
        assert torch.equal(got, want)
    else:  # the GPU compiler may contract the epilogue into an FMA: one rounding apart
        torch.testing.assert_close(
            got, want, rtol=2.0**-7 if out_dtype != torch.float32 else 2.0**-20, atol=0
        )
    truth = (_exact(a, b).double() * sa.cpu().double()[:, None] * sb.cpu().double()[None, :]).float()
    if bias is not None:
        truth = truth + bias.cpu().float()
    torch.testing.assert_close(
        want.float().cpu(), truth, rtol={torch.float32: 1e-6}.get(out_dtype, 1e-2), atol=1e-6
    )


def _linear_int8(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, fn) -> torch.Tensor:
    xq, xs = quantize_int8_ref(x, 1)
    wq, ws = quantize_int8_ref(w, 1)
    return fn(xq, wq.t(), xs, ws, bias, torch.float32)


def test_zero_outlier_and_non_finite_rows_end_to_end(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(12, 90, generator=gen).to(device)
    w = torch.randn(37, 90, generator=gen).to(device)
    bias = torch.randn(37, generator=gen).to(device)
    x[2] = 0.0  # an all-zero token: output is exactly the bias, no 0/0
    x[5, 17] = 1e4  # one huge outlier in a token
    kernel = _kernel(device)
    got = _linear_int8(x, w, bias, kernel)
    want = _linear_int8(x, w, bias, int8_matmul_ref)
    torch.testing.assert_close(got, want, rtol=0 if device.type == "cpu" else 2.0**-20, atol=0)
    assert torch.equal(got[2].cpu(), bias.cpu())
    assert bool(torch.isfinite(got).all())
    # The outlier token keeps its dominant product: error relative to the row's norm stays small.
    truth5 = x[5].double() @ w.double().t() + bias.double()
    assert (got[5].double() - truth5).norm() / truth5.norm() < 0.02
    dirty = x.clone()
    dirty[8, 3] = float("nan")
    dirty[9, 0] = float("inf")
    out = _linear_int8(dirty, w, bias, kernel)
    assert bool(out[8:10].isnan().all()), "a token holding NaN/inf must give a NaN output row"
    rows = [i for i in range(12) if i not in (8, 9)]
    assert torch.equal(out[rows].cpu(), got[rows].cpu())  # other tokens are untouched


@pytest.mark.parametrize(("m", "n", "k"), [(64, 48, 256), (33, 65, 1000)])
def test_sqnr_against_fp32_on_gaussian_data(m: int, n: int, k: int, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen).to(device)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(device)
    truth = x.double() @ w.double().t()
    sqnr = _sqnr_db(truth, _linear_int8(x, w, None, _kernel(device)))
    assert sqnr >= 30.0, f"int8 row-wise SQNR {sqnr:.1f} dB < 30 dB"


def test_bad_arguments(device: torch.device) -> None:
    a, b = _ints((4, 8), device, seed=0), _ints((8, 3), device, seed=1)
    kernel = _kernel(device)
    with pytest.raises(ValueError, match="need a"):
        kernel(a, b.t())
    with pytest.raises(ValueError, match="int8"):
        kernel(a.float(), b)
    with pytest.raises(ValueError, match="both"):
        kernel(a, b, torch.ones(4, device=device), None)
    with pytest.raises(ValueError, match="shape"):
        kernel(a, b, torch.ones(5, device=device), torch.ones(3, device=device))
    with pytest.raises(ValueError, match="overflow"):
        int8_matmul_ref(
            torch.zeros(1, MAX_K + 1, dtype=torch.int8), torch.zeros(MAX_K + 1, 1, dtype=torch.int8)
        )


def test_cost_model() -> None:
    assert int8_matmul_ops(2, 3, 5) == 60
    assert int8_matmul_bytes(2, 3, 5, out_itemsize=2) == 10 + 15 + 12 + 20
