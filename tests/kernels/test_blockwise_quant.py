"""Block-wise 8-bit quantization (the reference every 8-bit backend matches): maps, the exact
nearest-code rule, round trips, odd sizes, SQNR and NaN containment."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from lowmem.kernels.blockwise_quant import (
    BLOCK,
    blockwise_zeros,
    dequantize_blockwise,
    dynamic_map,
    lut_search,
    num_blocks,
    quantization_tables,
    quantize_blockwise,
    zero_code,
)

SIGNS = [True, False]


def _sample(n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return x if signed else x.square()  # the second moment is a square


def _sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return 10 * math.log10(x.square().sum().item() / (x - y).square().sum().item())


@pytest.mark.parametrize("signed", SIGNS)
def test_maps_are_256_sorted_values_with_zero_and_one(signed: bool) -> None:
    qmap = dynamic_map(signed)
    assert qmap.shape == (256,) and qmap.dtype == torch.float32
    assert bool((qmap.diff() > 0).all())
    assert qmap[-1].item() == 1.0 and qmap[zero_code(signed)].item() == 0.0
    assert zero_code(signed) == (127 if signed else 0)
    if signed:
        assert qmap[0].item() == pytest.approx(-0.99296875)
        positive = qmap[128:255]  # 127 positive values below 1.0 mirror the 127 negatives
        assert torch.equal(positive, -qmap[:127].flip(0))
    else:
        assert qmap[0].item() == 0.0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside bitsandbytes' import
@pytest.mark.parametrize("signed", SIGNS)
def test_maps_equal_bitsandbytes(signed: bool) -> None:
    """Our construction is bitsandbytes' dynamic map bit for bit, so states mean the same thing."""
    import bitsandbytes.functional as bnbf

    assert torch.equal(dynamic_map(signed), bnbf.create_dynamic_map(signed=signed).float())


@pytest.mark.parametrize("signed", SIGNS)
def test_map_values_round_trip_exactly(signed: bool) -> None:
    """Every map value times a power-of-two absmax comes back with its own code and value."""
    qmap = dynamic_map(signed)
    codes = torch.arange(256).repeat(3)  # 768 = 3 blocks, each containing 1.0 (its absmax)
    scale = torch.tensor([1.0, 2.0**-10, 2.0**7]).repeat_interleave(BLOCK)
    x = qmap[codes] * scale
    got_codes, absmax = quantize_blockwise(x, signed)
    assert torch.equal(absmax, torch.tensor([1.0, 2.0**-10, 2.0**7]))
    assert torch.equal(got_codes.long(), codes)
    assert torch.equal(dequantize_blockwise(got_codes, absmax, signed), x)


@pytest.mark.parametrize("signed", SIGNS)
def test_tie_at_a_midpoint_takes_the_lower_code(signed: bool) -> None:
    tables = quantization_tables(signed)
    mids = tables.midpoints[:255]
    # Block 0: 1.0 fixes absmax = 1, so y = x exactly; then every midpoint and its neighbours.
    above = torch.nextafter(mids, torch.tensor(2.0))
    below = torch.nextafter(mids, torch.tensor(-2.0))
    for values, offset in ((mids, 0), (above, 1), (below, 0)):
        x = torch.cat([torch.tensor([1.0]), values])
        codes, absmax = quantize_blockwise(x, signed)
        assert absmax.tolist() == [1.0]  # 256 values: one block
        assert torch.equal(codes[1:].long(), torch.arange(255) + offset)


@pytest.mark.parametrize("signed", SIGNS)
def test_codes_are_the_nearest_map_value(signed: bool) -> None:
    x = _sample(4097, signed, seed=1)
    codes, absmax = quantize_blockwise(x, signed)
    y = x / absmax.repeat_interleave(BLOCK)[: x.numel()]
    distance = (dynamic_map(signed)[None, :] - y[:, None]).abs()
    best = distance.min(dim=1).values
    assert torch.equal(distance.gather(1, codes.long()[:, None])[:, 0], best)


@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("numel", [1, 7, 255, 256, 257, 4097])
def test_odd_sizes(numel: int, signed: bool) -> None:
    x = _sample(numel, signed, seed=numel)
    codes, absmax = quantize_blockwise(x, signed)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert absmax.shape == (num_blocks(numel),) and absmax.dtype == torch.float32
    padded = torch.nn.functional.pad(x.abs(), (0, num_blocks(numel) * BLOCK - numel))
    assert torch.equal(absmax, padded.view(-1, BLOCK).amax(dim=1))
    back = dequantize_blockwise(codes, absmax, signed)
    # Nearest value: the error is at most half the widest gap of the map (or, for y = -1 in the
    # signed map, the distance to its end value -0.993), times absmax, plus fp32 rounding.
    qmap = dynamic_map(signed)
    half_gap = max(qmap.diff().max().item() / 2, 1 + qmap[0].item() if signed else 0.0)
    bound = half_gap * absmax.repeat_interleave(BLOCK)[:numel]
    assert bool(((back - x).abs() <= bound * (1 + 1e-4)).all())


@pytest.mark.parametrize("signed", SIGNS)
def test_any_shape_and_dtype_in_flattened_order(signed: bool) -> None:
    x = _sample(13 * 41, signed, seed=5).view(13, 41)
    codes, absmax = quantize_blockwise(x, signed)
    flat_codes, flat_absmax = quantize_blockwise(x.reshape(-1), signed)
    assert codes.shape == (13, 41) and torch.equal(codes.reshape(-1), flat_codes)
    assert torch.equal(absmax, flat_absmax)
    t_codes, _ = quantize_blockwise(x.t(), signed)  # a transposed view: its own row-major order
    assert torch.equal(t_codes, quantize_blockwise(x.t().contiguous(), signed)[0])
    bf16_codes, _ = quantize_blockwise(x.bfloat16(), signed)
    assert torch.equal(bf16_codes, quantize_blockwise(x.bfloat16().float(), signed)[0])


@pytest.mark.parametrize("signed", SIGNS)
def test_empty_tensors(signed: bool) -> None:
    codes, absmax = quantize_blockwise(torch.empty(0), signed)
    assert codes.shape == (0,) and codes.dtype == torch.uint8 and absmax.shape == (0,)
    assert dequantize_blockwise(codes, absmax, signed).shape == (0,)
    codes, absmax = quantize_blockwise(torch.empty(0, 5), signed)
    assert codes.shape == (0, 5) and absmax.shape == (0,)


@pytest.mark.parametrize(("signed", "min_db"), [(True, 37.0), (False, 40.0)])
def test_sqnr(signed: bool, min_db: float) -> None:
    """Gaussian values (signed) and squared Gaussians (unsigned): measured 39.3 and 42.0 dB."""
    x = _sample(1 << 16, signed, seed=2)
    codes, absmax = quantize_blockwise(x, signed)
    db = _sqnr_db(x, dequantize_blockwise(codes, absmax, signed))
    assert db >= min_db, f"SQNR {db:.1f} dB < {min_db} dB"


def test_blockwise_beats_one_scale_per_tensor_with_outliers() -> None:
    """The reason for blocks: one outlier costs only its own block's resolution."""
    x = _sample(1 << 14, True, seed=3)
    x[100] = 1000.0
    codes, absmax = quantize_blockwise(x, True)
    blockwise_db = _sqnr_db(x[BLOCK:], dequantize_blockwise(codes, absmax, True)[BLOCK:])
    whole = x.abs().max()
    qmap = dynamic_map(True)
    per_tensor = qmap[torch.bucketize(x / whole, quantization_tables(True).midpoints[:255])] * whole
    per_tensor_db = _sqnr_db(x[BLOCK:], per_tensor[BLOCK:])
    assert blockwise_db > per_tensor_db + 10, (
        f"block-wise {blockwise_db:.1f} dB, per tensor {per_tensor_db:.1f}"
    )


@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_elements_do_not_poison_their_block(signed: bool, bad: float) -> None:
    x = _sample(600, signed, seed=4)
    poisoned = x.clone()
    poisoned[[3, 300]] = bad
    cleaned = x.clone()
    cleaned[[3, 300]] = 0.0  # what the NaN rule says the element becomes
    codes, absmax = quantize_blockwise(poisoned, signed)
    want_codes, want_absmax = quantize_blockwise(cleaned, signed)
    assert torch.equal(absmax, want_absmax) and bool(absmax.isfinite().all())
    assert torch.equal(codes, want_codes)
    assert codes[3].item() == codes[300].item() == zero_code(signed)
    assert torch.isfinite(dequantize_blockwise(codes, absmax, signed)).all()


@pytest.mark.parametrize("signed", SIGNS)
def test_all_zero_and_all_nan_blocks(signed: bool) -> None:
    x = torch.zeros(600)
    x[256:512] = float("nan")
    codes, absmax = quantize_blockwise(x, signed)
    assert absmax.tolist() == [0.0, 0.0, 0.0]
    assert bool((codes == zero_code(signed)).all())
    zeros_codes, zeros_absmax = blockwise_zeros((600,), signed)
    assert torch.equal(codes, zeros_codes) and torch.equal(absmax, zeros_absmax)
    # Zero absmax decodes to 0 whatever the codes say, so torch.zeros is a valid state too.
    junk = torch.randint(0, 256, (600,), dtype=torch.uint8)
    assert bool((dequantize_blockwise(junk, absmax, signed) == 0).all())


def test_dequantize_checks_the_number_of_blocks() -> None:
    with pytest.raises(ValueError, match="one per block of 256"):
        dequantize_blockwise(torch.zeros(257, dtype=torch.uint8), torch.zeros(1), True)


@pytest.mark.parametrize("signed", SIGNS)
def test_cpu_lookup_table_search_equals_bucketize(signed: bool) -> None:
    """The C++ kernel's O(1) search (modelled by lut_search) against bucketize: on both ends of
    every bucket (the top 16 bits of an fp32 in [-1, 1]), every 1009th fp32 in between, and on each
    midpoint and its neighbours, for both signs."""
    tables = quantization_tables(signed)
    mids = tables.midpoints[:255]
    top = torch.arange(0, 0x3F81, dtype=torch.int64) << 16
    magnitudes = torch.cat([top, top | 0xFFFF, torch.arange(0, 0x3F800001, 1009, dtype=torch.int64)])
    magnitudes = magnitudes[magnitudes <= 0x3F800000]  # |y| <= 1
    positive = magnitudes.to(torch.int32).view(torch.float32)
    y = torch.cat(
        [
            positive,
            -positive,
            mids,
            torch.nextafter(mids, torch.tensor(2.0)),
            torch.nextafter(mids, torch.tensor(-2.0)),
            tables.qmap,
            torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0]),
        ]
    )
    assert torch.equal(lut_search(y, tables.lut), torch.bucketize(y, mids))
