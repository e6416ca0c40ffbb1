"""Absmax int8 quantization (Triton kernel against its reference, bit for bit) and fp8
quantization: odd shapes, both axes, strided inputs, every input dtype, zero / tiny / outlier
groups, exact round-half-even, and NaN/inf propagation at group granularity."""

from __future__ import annotations

import pytest
import torch

import lowmem
from lowmem._ops import dispatch
from lowmem.kernels.fp8_quantize import FP8_MAX, TINY, quantize_fp8
from lowmem.kernels.quantize import quantize_int8_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 37), (37, 1), (7, 33), (100, 257), (257, 100)]


def _kernel(device: torch.device):
    with lowmem.backend("triton"):
        return dispatch("quantize_int8", device, torch.float32)


def _randn(shape, dtype, device, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype=dtype, device=device)


def _same_scales(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality with NaN == NaN (non-finite groups get a NaN scale by contract)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _assert_kernel_equals_ref(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _kernel(x.device)(x, dim)
    q_ref, s_ref = quantize_int8_ref(x, dim)
    assert q.dtype == torch.int8 and q.shape == x.shape and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (x.shape[1 - dim],)
    assert torch.equal(q.cpu(), q_ref.cpu()), "int8 codes differ from the reference"
    assert _same_scales(s.cpu(), s_ref.cpu()), "scales differ from the reference"
    return q_ref, s_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_ref_bit_for_bit(shape, dim: int, dtype: torch.dtype, device: torch.device) -> None:
    x = _randn(shape, dtype, device, seed=shape[0] * 1000 + shape[1] + dim)
    q, s = _assert_kernel_equals_ref(x, dim)
    # The round trip is within half a step of every element (the step is the group's scale).
    err = (x.float().cpu() - q.float() * s.unsqueeze(dim)).abs()
    assert bool((err <= 0.5 * s.unsqueeze(dim) * (1 + 2**-12)).all())  # slack: inv and scale round apart
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127  # the group max maps to ±127, never -128


@pytest.mark.parametrize("dim", [0, 1])
def test_strided_and_transposed_inputs(dim: int, device: torch.device) -> None:
    base = _randn((90, 70), torch.float32, device, seed=3)
    for x in (base.t(), base[::3, 1:68]):  # a transposed view and a sliced, strided one
        _assert_kernel_equals_ref(x, dim)


def test_rounding_is_half_to_even(device: torch.device) -> None:
    # absmax 127 makes inv exactly 1, so the codes are round_half_even(x).
    row = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 0.49999997]], device=device)
    q, _ = _assert_kernel_equals_ref(row, 1)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3, 0]]


@pytest.mark.parametrize("dim", [0, 1])
def test_zero_tiny_and_outlier_groups(dim: int, device: torch.device) -> None:
    x = _randn((9, 40), torch.float32, device, seed=4)
    x = x if dim == 1 else x.t().contiguous()
    pick = (slice(None), 0) if dim == 0 else (0, slice(None))
    x[pick] = 0.0  # an all-zero group
    pick1 = (slice(None), 1) if dim == 0 else (1, slice(None))
    x[pick1] = TINY / 2  # absmax below TINY: 127 / absmax would overflow
    pick2 = (5, 2) if dim == 0 else (2, 5)
    x[pick2] = 1e30  # one huge outlier in its group
    q, s = _assert_kernel_equals_ref(x, dim)
    assert float(s[0]) == 0.0 and float(s[1]) == 0.0
    assert not bool(q[pick].any()) and not bool(q[pick1].any())
    assert int(q[pick2]) == 127 and float(s[2]) == pytest.approx(1e30 / 127)
    assert bool(torch.isfinite(s).all())


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_groups_get_nan_scale_and_leave_others_alone(dim: int, bad: float, device) -> None:
    x = _randn((10, 50) if dim == 1 else (50, 10), torch.bfloat16, device, seed=5)
    clean_q, clean_s = quantize_int8_ref(x, dim)
    dirty = x.clone()
    dirty[(3, 7) if dim == 1 else (7, 3)] = bad  # group 3 either way
    q, s = _assert_kernel_equals_ref(dirty, dim)
    assert bool(s[3].isnan()) and int(s.isnan().sum()) == 1
    group = (3, slice(None)) if dim == 1 else (slice(None), 3)
    assert not bool(q[group].any())  # codes of a poisoned group are 0; its NaN scale carries the news
    others = (torch.arange(q.shape[1 - dim], device=q.device) != 3).nonzero().squeeze(1)
    assert torch.equal(q.index_select(1 - dim, others), clean_q.index_select(1 - dim, others))
    assert torch.equal(s[others], clean_s[others])


def test_empty_and_bad_arguments(device: torch.device) -> None:
    q, s = _kernel(device)(torch.empty(0, 5, device=device), 1)
    assert q.shape == (0, 5) and s.shape == (0,)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8_ref(torch.ones(3), 1)
    with pytest.raises(ValueError, match="dim"):
        quantize_int8_ref(torch.ones(3, 3), 2)
    with pytest.raises(ValueError, match="dtype"):
        _kernel(device)(torch.ones(3, 3, dtype=torch.int32, device=device), 1)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dim", [None, 0, 1])
def test_fp8_round_trip_and_edge_groups(fp8: torch.dtype, dim, device: torch.device) -> None:
    x = _randn((33, 70), torch.float32, device, seed=6)
    x[0] = 0.0
    x[:, 0] = 0.0
    xq, s = quantize_fp8(x, fp8, dim)
    assert xq.dtype == fp8 and xq.shape == x.shape
    assert s.shape == {None: (), 0: (1, 70), 1: (33, 1)}[dim]
    back = xq.float() * s
    assert float(xq.float().abs().max()) == FP8_MAX[fp8]  # the absmax lands on the format's max
    # Relative error of one rounding: half an ulp, 2**-4 for e4m3 (3 mantissa bits), 2**-3 for e5m2,
    # for values in the normal range (others lose at most half the smallest subnormal step).
    rel = 2.0**-4 if fp8 == torch.float8_e4m3fn else 2.0**-3
    smallest_normal = 2.0**-6 if fp8 == torch.float8_e4m3fn else 2.0**-14
    big = x.abs() >= smallest_normal * s
    assert bool(((back - x).abs() <= rel * x.abs() + 1e-7)[big].all())
    assert bool(back[0].eq(0).all()) and bool(torch.isfinite(s).all())
    dirty = x.clone()
    dirty[4, 9] = float("inf")
    _, s_bad = quantize_fp8(dirty, fp8, dim)
    if dim is None:
        assert bool(s_bad.isnan())
    else:
        assert int(s_bad.isnan().sum()) == 1 and bool(s_bad.flatten()[4 if dim == 1 else 9].isnan())


def test_fp8_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fp8_dtype"):
        quantize_fp8(torch.ones(2, 2), torch.int8)
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(torch.ones(2), torch.float8_e4m3fn)
