"""The fused low-rank weight update kernel against ``weight.addmm_`` (its reference).

Error budget (DESIGN.md): with a float64 ground truth ``beta*W + alpha*(a @ b)``, the kernel's
max error must be at most 2x the reference's own max error when the reference runs in the low
dtype, plus ``atol = REL[dtype] * max|truth|``. The kernel accumulates in fp32 and rounds once at
the store, so for 16-bit dtypes its error is about half an ulp of the output, like the reference;
REL = one machine epsilon (bf16 2**-7, fp16 2**-10) covers a value near a rounding midpoint that
the two fp32 accumulation orders round different ways. For fp32, both errors come from fp32
accumulation (~sqrt(k) ulps); REL = 2**-20 (~1e-6, 8 ulps of the largest value) absorbs the
different summation order on shapes where the reference happens to be exact.
"""

from __future__ import annotations

import pytest
import torch

import lowmem
from lowmem._ops import dispatch
from lowmem.kernels import lowrank_update as lr_mod
from lowmem.kernels.lowrank_update import (
    lowrank_update_bytes,
    lowrank_update_flops,
    lowrank_update_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REL = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
LR, SCALE, WD = 0.1, 0.25, 0.1
ALPHA, BETA = -LR * SCALE, 1 - LR * WD  # a GaLore step with decoupled weight decay


def _kernel(device: torch.device):
    with lowmem.backend("triton"):
        return dispatch("lowrank_update", device)


def _randn(shape, dtype, device, gen, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _check_update(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha=ALPHA, beta=BETA) -> None:
    """Run kernel and reference on copies of ``weight`` (same strides) and check the budget."""
    truth = beta * weight.double() + alpha * (a.double() @ b.double())
    got = weight.clone()  # clone keeps a dense view's strides (preserve_format)
    want = weight.clone()
    if not weight.is_contiguous() and not weight.t().is_contiguous():
        got = _strided_copy(weight)
    _kernel(weight.device)(got, a, b, alpha=alpha, beta=beta)
    lowrank_update_ref(want, a, b, alpha=alpha, beta=beta)
    assert got.dtype == weight.dtype and got.shape == weight.shape
    truth = truth.cpu()
    err_got = (got.double().cpu() - truth).abs().max().item()
    err_ref = (want.double().cpu() - truth).abs().max().item()
    atol = REL[weight.dtype] * truth.abs().max().item()
    assert err_got <= 2 * err_ref + atol, (
        f"kernel error {err_got:.3g} exceeds 2 x reference error {err_ref:.3g} + atol {atol:.3g}"
    )


def _strided_copy(w: torch.Tensor) -> torch.Tensor:
    base = torch.zeros((w.shape[0] * 2, w.shape[1] + 3), dtype=w.dtype, device=w.device)
    view = base[::2, 1 : 1 + w.shape[1]]
    view.copy_(w)
    return view


def _orthonormal(rows: int, cols: int, dtype, device, gen) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=gen, dtype=torch.float64))
    q = q if rows >= cols else q.t()
    return q.to(dtype=dtype, device=device)


SHAPES = [(1, 1, 1), (7, 33, 1), (33, 7, 100), (100, 257, 7), (257, 100, 33), (1, 257, 16), (257, 1, 17)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_matches_ref_on_odd_shapes(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w = _randn((m, n), dtype, device, gen)
    a = _randn((m, k), dtype, device, gen)
    b = _randn((k, n), dtype, device, gen, scale=k**-0.5)
    _check_update(w, a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("orientation", ["right", "left", "full"])
def test_galore_orientations(orientation: str, dtype: torch.dtype, device: torch.device) -> None:
    """The three products a GaLore step applies (Zhao et al. 2024), r = 7."""
    gen = torch.Generator().manual_seed(1)
    r = 7
    if orientation == "right":  # m >= n: project on the right, Q (r x n)
        m, n = 100, 33
        a = _randn((m, r), dtype, device, gen)  # N, the low-rank Adam direction
        b = _orthonormal(r, n, dtype, device, gen)  # Q
    elif orientation == "left":  # m < n: project on the left, P (m x r)
        m, n = 33, 100
        a = _orthonormal(m, r, dtype, device, gen)  # P
        b = _randn((r, n), dtype, device, gen)  # N
    else:  # "full": both sides, b = N @ Q
        m, n = 57, 41
        a = _orthonormal(m, r, dtype, device, gen)  # P
        n_low = _randn((r, r), dtype, device, gen)
        b = (n_low.float() @ _orthonormal(r, n, torch.float32, device, gen)).to(dtype)
    w = _randn((m, n), dtype, device, gen)
    _check_update(w, a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_weight_view(dtype: torch.dtype, device: torch.device) -> None:
    """weight = W.t(): updated through its strides, in place, and the base tensor sees it."""
    gen = torch.Generator().manual_seed(2)
    base = _randn((40, 70), dtype, device, gen)
    w = base.t()  # (70, 40), strides (1, 70)
    a = _randn((70, 9), dtype, device, gen)
    b = _randn((9, 40), dtype, device, gen)
    _check_update(w, a, b)
    expected = base.clone().t()
    lowrank_update_ref(expected, a, b, alpha=ALPHA, beta=BETA)
    _kernel(device)(w, a, b, alpha=ALPHA, beta=BETA)
    assert w.data_ptr() == base.data_ptr()
    atol = REL[dtype] * expected.abs().max().item() * 4
    torch.testing.assert_close(base.t(), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_of_weight_and_factors(dtype: torch.dtype, device: torch.device) -> None:
    """A sliced (non-dense) weight and transposed factors a = x.t(), b = y.t()."""
    gen = torch.Generator().manual_seed(3)
    w = _strided_copy(_randn((29, 31), dtype, device, gen))
    a = _randn((5, 29), dtype, device, gen).t()
    b = _randn((31, 5), dtype, device, gen).t()
    _check_update(w, a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_factors_with_low_precision_weight(dtype: torch.dtype, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(4)
    w = _randn((65, 47), dtype, device, gen)
    a = _randn((65, 8), torch.float32, device, gen)
    b = _randn((8, 47), torch.float32, device, gen)
    _check_update(w, a, b)


def test_rank_above_size_and_alpha_beta_values(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(5)
    w = _randn((5, 3), torch.float32, device, gen)
    a = _randn((5, 40), torch.float32, device, gen)
    b = _randn((40, 3), torch.float32, device, gen)
    for alpha, beta in [(1.0, 1.0), (-2.5, 0.5), (0.0, 1.0), (1.0, 0.0)]:
        _check_update(w, a, b, alpha=alpha, beta=beta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounds_to_nearest_once(dtype: torch.dtype, device: torch.device) -> None:
    """The 16-bit result is the fp32 result rounded to nearest, not truncated.

    The 2x-reference budget cannot tell round-to-nearest from truncation (both stay within an
    ulp), so compare with torch's fp32 computation rounded once: only values within an fp32 ulp
    of a rounding midpoint (a ~2**-16 chance each) may differ; truncation would flip ~half.
    """
    gen = torch.Generator().manual_seed(7)
    w = _randn((64, 48), dtype, device, gen)
    a = _randn((64, 16), dtype, device, gen)
    b = _randn((16, 48), dtype, device, gen)
    want = (BETA * w.float() + ALPHA * (a.float() @ b.float())).to(dtype)
    _kernel(device)(w, a, b, alpha=ALPHA, beta=BETA)
    mismatched = (w != want).float().mean().item()
    assert mismatched <= 0.01, f"{mismatched:.1%} of elements are not the fp32 result rounded to nearest"


def test_beta_zero_ignores_nan_in_weight_like_addmm(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(6)
    w = torch.full((17, 19), float("nan"), device=device)
    a = _randn((17, 3), torch.float32, device, gen)
    b = _randn((3, 19), torch.float32, device, gen)
    want = w.clone()
    lowrank_update_ref(want, a, b, alpha=2.0, beta=0.0)
    _kernel(device)(w, a, b, alpha=2.0, beta=0.0)
    assert not w.isnan().any()
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)


def test_empty_shapes_are_noops_or_scaling(device: torch.device) -> None:
    fn = _kernel(device)
    w = torch.zeros(0, 5, device=device)
    fn(w, torch.zeros(0, 3, device=device), torch.zeros(3, 5, device=device), alpha=1.0, beta=1.0)
    assert w.shape == (0, 5)
    w = torch.ones(4, 5, device=device)
    fn(w, torch.zeros(4, 0, device=device), torch.zeros(0, 5, device=device), alpha=1.0, beta=0.5)
    assert torch.equal(w, torch.full((4, 5), 0.5, device=device))


def test_validation_messages(device: torch.device) -> None:
    fn = _kernel(device)
    w = torch.zeros(4, 5, device=device)
    with pytest.raises(ValueError, match="shapes do not chain"):
        fn(w, torch.zeros(4, 3, device=device), torch.zeros(2, 5, device=device), alpha=1.0, beta=1.0)
    with pytest.raises(ValueError, match="must be 2-D"):
        fn(w, torch.zeros(4, device=device), torch.zeros(1, 5, device=device), alpha=1.0, beta=1.0)
    with pytest.raises(ValueError, match="a has dtype"):
        fn(
            w,
            torch.zeros(4, 3, device=device, dtype=torch.float16),
            torch.zeros(3, 5, device=device),
            alpha=1.0,
            beta=1.0,
        )
    with pytest.raises(ValueError, match="must match it or be float32"):
        h = torch.zeros(4, 3, device=device, dtype=torch.float16)
        fn(w, h, torch.zeros(3, 5, device=device, dtype=torch.float16), alpha=1.0, beta=1.0)


def test_cost_model() -> None:
    assert lowrank_update_bytes(1024, 512, 16, 4) == 2 * 1024 * 512 * 4 + (1024 * 16 + 16 * 512) * 4
    assert lowrank_update_bytes(8, 4, 2, 2, ab_itemsize=4) == 2 * 8 * 4 * 2 + (8 * 2 + 2 * 4) * 4
    assert lowrank_update_flops(1024, 512, 16) == 2 * 1024 * 512 * 16 + 3 * 1024 * 512


def test_dispatch(device: torch.device) -> None:
    assert dispatch("lowrank_update", "cpu") is lowrank_update_ref
    with lowmem.backend("cpp"), pytest.raises(lowmem.BackendUnavailableError, match="no cpp implementation"):
        dispatch("lowrank_update", "cpu")
    with lowmem.backend("triton"):  # on CPU-only machines the tests set TRITON_INTERPRET=1
        assert dispatch("lowrank_update", device) is lr_mod.lowrank_update
