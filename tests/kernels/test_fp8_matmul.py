"""Scaled fp8 matmul: the fp32-emulated reference against exact float64 products of the fp8
values and against ``torch._scaled_mm`` where this build runs it; the CUDA wrapper (operand
layout, padding to 16) against the reference on fp8 GPUs; SQNR of e4m3 / e5m2 operands."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.kernels import fp8_matmul as fp8_module
from lowmem.kernels.fp8_matmul import fp8_matmul_ref, fp8_matmul_scaled_mm, fp8_supported
from lowmem.kernels.fp8_quantize import quantize_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _operands(m: int, n: int, k: int, a_dtype, b_dtype, rowwise: bool, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device)
    w = torch.randn(n, k, generator=gen).to(device)
    xq, xs = quantize_fp8(x, a_dtype, 1 if rowwise else None)
    wq, ws = quantize_fp8(w, b_dtype, 1 if rowwise else None)
    return x, w, xq, xs, wq.t(), ws.t()


def _sqnr_db(truth: torch.Tensor, approx: torch.Tensor) -> float:
    truth, approx = truth.double().cpu(), approx.double().cpu()
    return 10 * math.log10(truth.square().sum().item() / (truth - approx).square().sum().item())


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize(("a_dtype", "b_dtype"), [(E4M3, E4M3), (E5M2, E4M3)])
def test_reference_is_the_exact_product_up_to_fp32_summation(a_dtype, b_dtype, rowwise: bool) -> None:
    m, n, k = 17, 23, 300
    _, _, a, sa, b, sb = _operands(m, n, k, a_dtype, b_dtype, rowwise, "cpu")
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    got = fp8_matmul_ref(a, b, sa, sb, bias, torch.float32)
    exact = (a.double() @ b.double()) * sa.double() * sb.double() + bias.double()
    # fp32 summation of k exact products: error <= k * 2**-24 * sum |terms| (a loose bound).
    bound = k * 2.0**-24 * ((a.double().abs() @ b.double().abs()) * sa.double() * sb.double()) + 1e-6
    assert bool(((got.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("rowwise", [False, True])
def test_reference_agrees_with_torch_scaled_mm_where_it_runs(rowwise: bool) -> None:
    _, _, a, sa, b, sb = _operands(32, 48, 64, E4M3, E4M3, rowwise, "cpu")
    try:
        want = torch._scaled_mm(a, b.t().contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm does not run on CPU in this build: {exc}")
    torch.testing.assert_close(fp8_matmul_ref(a, b, sa, sb, None, torch.float32), want, rtol=1e-5, atol=1e-5)


def test_scaled_mm_wrapper_without_fp8_hardware_is_the_reference() -> None:
    assert not fp8_supported("cpu")
    _, _, a, sa, b, sb = _operands(5, 7, 9, E4M3, E4M3, False, "cpu")
    assert torch.equal(fp8_matmul_scaled_mm(a, b, sa, sb), fp8_matmul_ref(a, b, sa, sb))


@pytest.mark.skipif(not fp8_supported("cuda"), reason="needs a CUDA GPU with fp8 tensor cores (sm89+)")
@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize(("m", "n", "k"), [(16, 32, 64), (7, 33, 50), (128, 96, 17)])
def test_scaled_mm_matches_reference_on_gpu(m: int, n: int, k: int, rowwise: bool) -> None:
    _, _, a, sa, b, sb = _operands(m, n, k, E4M3, E4M3, rowwise, "cuda")
    bias = torch.randn(n, device="cuda")
    got = fp8_matmul_scaled_mm(a, b, sa, sb, bias, torch.float32)
    torch.testing.assert_close(got, fp8_matmul_ref(a, b, sa, sb, bias, torch.float32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rowwise", [False, True])
def test_sqnr_of_fp8_products_on_gaussian_data(rowwise: bool) -> None:
    """Measured (seed 0, 64 x 48 x 512): e4m3 x e4m3 ~ 28.7 dB, e5m2 x e4m3 ~ 24.7 dB; the
    floors sit 1.5 dB below (theory: ~31 dB per e4m3 operand, ~25 dB per e5m2 operand)."""
    for a_dtype, floor in ((E4M3, 27.0), (E5M2, 23.0)):
        x, w, a, sa, b, sb = _operands(64, 48, 512, a_dtype, E4M3, rowwise, "cpu")
        sqnr = _sqnr_db(x.double() @ w.double().t(), fp8_matmul_ref(a, b, sa, sb))
        assert sqnr >= floor, f"{a_dtype} x e4m3 SQNR {sqnr:.1f} dB < {floor} dB"


def test_bad_arguments() -> None:
    a = torch.zeros(4, 8, dtype=E4M3)
    with pytest.raises(ValueError, match="fp8"):
        fp8_matmul_ref(a.float(), a.t(), torch.ones(()), torch.ones(()))
    with pytest.raises(ValueError, match="need a"):
        fp8_matmul_ref(a, a, torch.ones(()), torch.ones(()))
    with pytest.raises(ValueError, match="scale_a"):
        fp8_matmul_ref(a, a.t(), torch.ones(3, 1), torch.ones(()))


def test_scaled_mm_fallback_is_keyed_on_both_scale_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cuBLASLt rejection of mixed scale kinds sends that combination to the emulation, and only
    it: all-tensor-wise calls with the same dtypes keep using ``torch._scaled_mm``. Row x tensor
    (N not a multiple of 16) reaches ``_scaled_mm`` too (it used to index the 0-d scale_b as a row).
    The CPU stands in for an fp8 GPU; the fake ``_scaled_mm`` computes the product and rejects
    mixed kinds, as some torch builds do."""
    calls: list[tuple[int, int]] = []

    def fake_scaled_mm(a, b, *, scale_a, scale_b, out_dtype):
        calls.append((scale_a.dim(), scale_b.dim()))
        if (scale_a.numel() == 1) != (scale_b.numel() == 1):
            raise RuntimeError("Invalid scaling configuration\nmore lines")
        return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)

    monkeypatch.setattr(fp8_module, "fp8_supported", lambda device: True)
    monkeypatch.setattr(fp8_module, "_FALLBACKS", {})
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    _, _, a, sa, b, sb = _operands(16, 13, 32, E4M3, E4M3, True, "cpu")
    one = torch.ones(())
    with pytest.warns(RuntimeWarning, match="rejected"):
        mixed = fp8_matmul_scaled_mm(a, b, one, sb)
    assert torch.equal(mixed, fp8_matmul_ref(a, b, one, sb))
    assert list(fp8_module.scaled_mm_fallbacks()) == [(E4M3, E4M3, "tensor", "row", torch.float32)]
    tensorwise = fp8_matmul_scaled_mm(a, b, one, one)  # not rejected: still through _scaled_mm
    assert calls == [(0, 2), (0, 0)]
    torch.testing.assert_close(tensorwise, fp8_matmul_ref(a, b, one, one))
    fp8_matmul_scaled_mm(a, b, one, sb)  # the rejected combination: emulated, not retried
    assert len(calls) == 2
    with pytest.warns(RuntimeWarning, match="row-wise x tensor-wise"):
        fp8_matmul_scaled_mm(a, b, sa, one)
    assert calls[-1] == (2, 0) and len(fp8_module.scaled_mm_fallbacks()) == 2
