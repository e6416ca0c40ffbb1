"""The fused Triton fp8 quantizers against the PyTorch references, bit for bit (codes and
scales): per row / column / tensor on odd shapes, every input dtype, both fp8 formats, values
spanning the subnormal range, exact ties (round half to even), signed zeros, zero / NaN / inf
groups, strided inputs, the multi-program partial maxima of the tensor-wise kernel, and the
delayed-scaling cast (saturation, zero amax, non-finite inputs, the current amax)."""

from __future__ import annotations

import pytest
import torch

import lowmem
from lowmem._ops import dispatch
from lowmem.kernels import fp8_quantize_triton
from lowmem.kernels.fp8_matmul import fp8_supported
from lowmem.kernels.fp8_quantize import FP8_MAX, quantize_fp8, quantize_fp8_delayed_ref

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 37), (37, 1), (7, 33), (100, 257), (257, 100)]


def _skip_without_fp8(device: torch.device) -> None:
    if device.type == "cuda" and not fp8_supported(device):
        pytest.skip("Triton's fp8e4nv type needs an sm89+ GPU when compiled")


def _quantize(device: torch.device):
    _skip_without_fp8(device)
    with lowmem.backend("triton"):
        return dispatch("quantize_fp8", device, torch.float32)


def _delayed(device: torch.device):
    _skip_without_fp8(device)
    with lowmem.backend("triton"):
        return dispatch("quantize_fp8_delayed", device, torch.float32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of fp8 codes (as bytes) or fp32 scales (NaN == NaN)."""
    a, b = a.cpu(), b.cpu()
    if a.dtype in (E4M3, E5M2):
        return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _wide_range(shape, dtype, device, seed: int) -> torch.Tensor:
    """Gaussian values times column factors from 1e-12 to 1e3: after scaling, many elements land
    in the fp8 subnormal range and below it."""
    gen = torch.Generator().manual_seed(seed)
    factors = torch.logspace(-12, 3, shape[1]) if shape[1] > 1 else torch.ones(1)
    x = torch.randn(shape, generator=gen) * factors[None, :]
    return x.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dim", [None, 1, 0])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_bit_for_bit(shape, dim, device: torch.device) -> None:
    for i, dtype in enumerate(DTYPES):
        for fp8 in (E4M3, E5M2):
            x = _wide_range(shape, dtype, device, seed=shape[0] * 100 + shape[1] + i)
            q, s = _quantize(device)(x, fp8, dim)
            q_ref, s_ref = quantize_fp8(x, fp8, dim)
            assert q.shape == x.shape and q.dtype == fp8 and s.shape == s_ref.shape
            assert _same(q, q_ref), f"{dtype} -> {fp8}, dim={dim}: codes differ"
            assert _same(s, s_ref), f"{dtype} -> {fp8}, dim={dim}: scales differ"


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
def test_ties_round_half_to_even_and_signed_zeros(fp8, device: torch.device) -> None:
    """One row whose absmax is max_fp8 (so inv = 1 exactly and the values are cast as they are):
    exact midpoints between neighbouring fp8 values, normal and subnormal, must go to the even
    code, and -0.0 and tiny negatives must keep their sign, like torch's cast."""
    fmax = FP8_MAX[fp8]
    step = 2.0**-3 if fp8 == E4M3 else 2.0**-2  # spacing of [1, 2)
    sub = 2.0**-9 if fp8 == E4M3 else 2.0**-16  # smallest subnormal
    ties = [1 + step / 2, 1 + 3 * step / 2, -(2 + step), sub / 2, 3 * sub / 2, -5 * sub / 2, 7 * sub / 2]
    values = [fmax, *ties, -0.0, -sub / 4, 0.0, sub, -sub * 0.49]
    x = torch.tensor([values], device=device)
    q, s = _quantize(device)(x, fp8, 1)
    q_ref, s_ref = quantize_fp8(x, fp8, 1)
    assert float(s_ref) == 1.0  # the test's premise: inv = scale = 1
    assert _same(q, q_ref) and _same(s, s_ref)
    codes = q.cpu().view(torch.uint8)
    assert int(codes[0, 1 + len(ties)]) == 0x80 and int(codes[0, 2 + len(ties)]) == 0x80  # -0.0 kept
    decoded = q.cpu().float()[0, 1 : 1 + len(ties)]
    assert decoded.tolist() == [1.0, 1 + 2 * step, -2.0, 0.0, 2 * sub, -2 * sub, 4 * sub]


@pytest.mark.parametrize("dim", [None, 1, 0])
def test_zero_tiny_and_non_finite_groups(dim, device: torch.device) -> None:
    x = _wide_range((9, 40), torch.float32, device, seed=5)
    x[2] = 0.0
    x[3] = 2.0**-125  # at most TINY: quantizes to zeros with scale 0
    x[:, 7] = 0.0
    x[5, 11] = float("nan")
    x[6, 12] = float("-inf")
    for fp8 in (E4M3, E5M2):
        q, s = _quantize(device)(x, fp8, dim)
        q_ref, s_ref = quantize_fp8(x, fp8, dim)
        assert _same(q, q_ref) and _same(s, s_ref)
    if dim == 1:
        assert float(s[2]) == 0.0 and float(s[3]) == 0.0 and bool(s[5:7].isnan().all())
    if dim is None:
        assert bool(s.isnan())  # one scale: a NaN anywhere makes it NaN


@pytest.mark.parametrize("dim", [None, 1, 0])
def test_strided_inputs(dim, device: torch.device) -> None:
    base = _wide_range((90, 70), torch.bfloat16, device, seed=6)
    for x in (base.t(), base[::3, 1:68]):
        q, s = _quantize(device)(x, E4M3, dim)
        q_ref, s_ref = quantize_fp8(x, E4M3, dim)
        assert q.is_contiguous() and _same(q, q_ref) and _same(s, s_ref)


def test_tensorwise_partials_across_many_programs(monkeypatch: pytest.MonkeyPatch, device) -> None:
    """Few allowed partials: each program of the absmax pass loops over several tiles, and the
    maximum sits in the last of them."""
    monkeypatch.setattr(fp8_quantize_triton, "MAX_PARTIALS", 3)
    x = _wide_range((257, 300), torch.float32, device, seed=7)
    x[256, 299] = 1e6  # the absmax, in the last row and column
    q, s = _quantize(device)(x, E5M2, None)
    q_ref, s_ref = quantize_fp8(x, E5M2, None)
    assert _same(q, q_ref) and _same(s, s_ref)
    x[200, 5] = float("inf")
    assert bool(_quantize(device)(x, E5M2, None)[1].isnan())


def test_empty_inputs(device: torch.device) -> None:
    for dim, scale_shape in ((None, ()), (1, (0, 1)), (0, (1, 5))):
        q, s = _quantize(device)(torch.zeros(0, 5, device=device), E4M3, dim)
        assert q.shape == (0, 5) and s.shape == scale_shape and bool((s == 0).all())


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (257, 100)])
def test_delayed_cast_matches_reference(shape, device: torch.device) -> None:
    for i, dtype in enumerate(DTYPES):
        x = _wide_range(shape, dtype, device, seed=10 + i)
        true_amax = x.float().abs().max()
        # amax from the history: half the current one (saturates), 0 (all zeros), 4x (no clipping)
        for factor in (0.5, 0.0, 4.0):
            amax = (true_amax * factor).to(device)
            for fp8 in (E4M3, E5M2):
                got = _delayed(device)(x, fp8, amax)
                want = quantize_fp8_delayed_ref(x, fp8, amax)
                assert all(_same(g, w) for g, w in zip(got, want, strict=True)), (dtype, factor, fp8)
                assert float(got[2]) == float(true_amax)  # the current absmax, for the history
                if factor == 0.5:  # saturated, never inf/NaN: some codes sit at ±max_fp8
                    assert float(got[0].float().abs().max()) == FP8_MAX[fp8]
                if factor == 0.0:
                    assert float(got[1]) == 0.0 and bool((got[0].float() == 0).all())


def test_delayed_cast_non_finite_and_empty(device: torch.device) -> None:
    x = _wide_range((20, 30), torch.float32, device, seed=11)
    finite_amax = float(x.abs().max())
    x[3, 4] = float("nan")
    x[5, 6] = float("inf")
    amax = torch.tensor(1.0, device=device)
    q, s, now = _delayed(device)(x, E4M3, amax)
    assert all(_same(g, w) for g, w in zip((q, s, now), quantize_fp8_delayed_ref(x, E4M3, amax), strict=True))
    assert bool(s.isnan()) and float(now) == finite_amax  # NaN scale; the history stays finite
    q, s, now = _delayed(device)(torch.zeros(0, 3, device=device), E5M2, amax)
    assert q.shape == (0, 3) and float(now) == 0.0 and float(s) == float(torch.tensor(1.0) / FP8_MAX[E5M2])


def test_cpu_dispatch_uses_torch() -> None:
    assert dispatch("quantize_fp8", "cpu", torch.float32) is quantize_fp8
    assert dispatch("quantize_fp8_delayed", "cpu", torch.float32) is quantize_fp8_delayed_ref


def test_bad_arguments(device: torch.device) -> None:
    kernel = _quantize(device)
    with pytest.raises(ValueError, match="fp8_dtype"):
        kernel(torch.ones(2, 2, device=device), torch.int8, None)
    with pytest.raises(ValueError, match="2-D"):
        kernel(torch.ones(2, device=device), E4M3, None)
    with pytest.raises(ValueError, match="dim"):
        kernel(torch.ones(2, 2, device=device), E4M3, 2)
    with pytest.raises(ValueError, match="float64"):
        kernel(torch.ones(2, 2, device=device, dtype=torch.float64), E4M3, None)


def test_tile_grids_fit_cuda_launch_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA grids allow 2**31 - 1 programs on axis 0 but 65535 on axes 1 and 2. A (1, 70000)
    tensor cut into one-column tiles (as a not column-contiguous activation with ~1M columns
    is on a GPU: BLOCK_C = 16) needs 70000 tiles in a row: the tensor-wise cast and the delayed
    cast must put them on axis 0. The kernels are recorded, not run (the interpreter does not
    enforce the limits and would be slow at this size)."""
    grids: dict[str, tuple] = {}

    class Record:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: tuple):
            grids[self.name] = grid
            return lambda *args, **kwargs: None

    for name in ("_absmax_partials_kernel", "_quantize_fp8_tensor_kernel", "_cast_fp8_delayed_kernel"):
        monkeypatch.setattr(fp8_quantize_triton, name, Record(name))
    monkeypatch.setattr(fp8_quantize_triton, "_tile_2d", lambda rows, cols, col_contiguous: (1, 1, 4))
    x = torch.zeros(1, 70_000)
    fp8_quantize_triton.quantize_fp8_triton(x, E4M3, None)
    fp8_quantize_triton.quantize_fp8_delayed_triton(x, E4M3, torch.tensor(1.0))
    assert grids["_quantize_fp8_tensor_kernel"][0] == 70_000
    assert grids["_cast_fp8_delayed_kernel"][0] == 70_000
    for name, grid in grids.items():
        assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), (name, grid)


@pytest.mark.parametrize("shape", [(37, 70), (1, 45), (45, 1)])
def test_small_tiles_in_both_axes_match_bit_for_bit(shape, monkeypatch, device: torch.device) -> None:
    """Tiles of 16 x 16 (more than one along both axes for (37, 70): 3 x 5): the 1-D grid's
    (row, column) mapping of the tensor-wise and delayed casts covers every tile exactly once,
    and the delayed cast's per-tile partials cover the tensor."""
    monkeypatch.setattr(fp8_quantize_triton, "_tile_2d", lambda rows, cols, col_contiguous: (16, 16, 4))
    x = _wide_range(shape, torch.float32, device, seed=21)
    x[-1, -1] = 1e5  # the absmax in the last tile
    for fp8 in (E4M3, E5M2):
        q, s = _quantize(device)(x, fp8, None)
        q_ref, s_ref = quantize_fp8(x, fp8, None)
        assert _same(q, q_ref) and _same(s, s_ref)
        amax = torch.tensor(3e4, device=device)
        got = _delayed(device)(x, fp8, amax)
        want = quantize_fp8_delayed_ref(x, fp8, amax)
        assert all(_same(g, w) for g, w in zip(got, want, strict=True)) and float(got[2]) == 1e5
