"""Block-wise 8-bit quantization with dynamic maps: the reference every 8-bit backend matches.

Dettmers, Lewis, Shleifer & Zettlemoyer 2022, "8-bit Optimizers via Block-wise Quantization"
(ICLR 2022). A tensor is flattened (row-major, i.e. contiguous order) and split into blocks of
``BLOCK = 256`` elements (the last block may be shorter). Each block keeps one fp32 scale, its
absolute maximum ``absmax``, and each element one uint8 *code*: the index of the value in a fixed
256-entry *dynamic map* nearest to ``x / absmax``::

    codes[i]  = argmin_k |qmap[k] - x[i] / absmax[block(i)]|        (uint8, x's shape)
    absmax[b] = max_{i in block b, x[i] finite} |x[i]|              (fp32, [ceil(numel / 256)])
    x[i]     ~= qmap[codes[i]] * absmax[block(i)]                   (dequantization)

Normalizing per block of 256 rather than per tensor confines outliers to their own block, which
is what makes 8-bit Adam states as good as 32-bit ones in the paper.

The dynamic maps (dynamic tree quantization, Dettmers 2016, "8-Bit Approximations for
Parallelism in Deep Learning", as used by the 2022 paper and by bitsandbytes): a code is a sign
bit, then a run of ``e`` zero bits and a one bit selecting the decade ``10**-e``, then the
remaining bits as a linear fraction in [0.1, 1]. Decade ``10**(i - 6)``, ``i = 0..6``, holds the
midpoints of ``2**f + 1`` evenly spaced points of [0.1, 1] (``f = i`` fraction bits), scaled by
the decade: small magnitudes get fine absolute resolution, large ones fine relative resolution.

``signed`` (first moment)
    127 positive values, their 127 negations, 0 and 1.0: 256 values in [-0.993, 1]; the code of
    0 is 127. Smallest magnitude 5.5e-7.
``unsigned`` (second moment, never negative)
    The sign bit becomes one more fraction bit, so decade ``i`` holds ``2**(i+1)`` values: 254
    positive values, 0 and 1.0, in [0, 1]; the code of 0 is 0. Smallest nonzero 3.25e-7.

Both contain exactly 0 and 1, so zeros and a block's largest-magnitude element, when positive,
round-trip exactly (the signed map's most negative value is -0.993, not -1).
:func:`dynamic_map` builds them from that definition; it equals
``bitsandbytes.functional.create_dynamic_map(signed=...)`` bit for bit (tests/kernels check this
when bitsandbytes is installed). We build it ourselves rather than importing bitsandbytes at run
time: that import takes seconds and prints warnings on CPU-only machines, and a checkpoint's codes
must mean the same thing whether or not bitsandbytes happens to be installed.

Nearest-value rule, exactly: ``codes = bucketize(y, midpoints)`` with ``midpoints[k] =
(qmap[k] + qmap[k+1]) * 0.5`` in fp32, i.e. the code is the number of midpoints strictly below
``y``; a ``y`` exactly at a midpoint takes the lower code. ``y = x / absmax`` is an IEEE fp32
division (every backend divides; none multiplies by a reciprocal).

Non-finite values (NaN, ±inf) must not poison their block: absmax is taken over the finite
elements only, and a non-finite element is stored as the code of 0 (it dequantizes to 0). A block
whose absmax is 0 (all zeros, or nothing finite) is all codes of 0.

Initial state: any codes with ``absmax == 0`` dequantize to 0 (``qmap[c] * 0``), so
``torch.zeros(shape, dtype=torch.uint8)`` and ``torch.zeros(num_blocks(numel))`` are a valid
all-zero state; :func:`blockwise_zeros` returns the canonical one (codes of 0).

For the compiled CPU kernel (``csrc/adamw8bit.cpp``) :func:`quantization_tables` also builds a
lookup table that makes the nearest-code search one table read and one compare. fp32 ``y`` is
mapped to its order-preserving integer *key* (the bit pattern, with all but the sign bit flipped
for negative values, so keys compare as signed integers like the floats they encode); the key's
top 16 bits pick a bucket, whose int32 entry packs the code of the bucket's smallest value and
the low 16 bits of the key of the one midpoint inside the bucket, if any. One more compare of the
low 16 bits finishes the search; no bucket holds two midpoints (checked when the table is built),
so the result equals ``bucketize`` exactly. :func:`lut_search` is the same search in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "LUT_KEY_OFFSET",
    "LUT_SIZE",
    "QuantTables",
    "blockwise_zeros",
    "dequantize_blockwise",
    "dynamic_map",
    "lut_search",
    "num_blocks",
    "order_key",
    "quantization_tables",
    "quantize_blockwise",
    "zero_code",
]

#: Elements per quantization block (the paper's block size for 8-bit optimizers' states).
BLOCK = 256

#: The CPU lookup table has one bucket per value of the top 16 bits of a key (see
#: :func:`order_key`). Keys of y in [-1, 1] have top 16 bits in [-0x3F81, 0x3F80]; adding
#: ``LUT_KEY_OFFSET`` makes them indices into a table of ``LUT_SIZE`` entries (127 KiB; the
#: buckets real moments use are a small part of it). A bucket spans 2**-7 of a binade, finer
#: than any two midpoints of either map are apart (the unsigned map's densest spacing is 0.007
#: in [0.5, 1), where a bucket is 0.0039 wide).
LUT_KEY_OFFSET = 0x3F81
LUT_SIZE = 2 * LUT_KEY_OFFSET
_NO_MIDPOINT = 0xFFFF  # a threshold the low 16 bits of a key never exceed

_MAX_EXPONENT_BITS = 7  # decades 10**-6 .. 10**0


def num_blocks(numel: int) -> int:
    """Number of quantization blocks (= absmax entries) for a tensor of ``numel`` elements."""
    return -(-numel // BLOCK)


_MAPS: dict[bool, Tensor] = {}


def dynamic_map(signed: bool) -> Tensor:
    """The 256 sorted fp32 values of the signed or unsigned dynamic map (CPU tensor, cached).

    See the module docstring for the construction. Treat the result as read-only.
    """
    cached = _MAPS.get(signed)
    if cached is not None:
        return cached
    values: list[Tensor] = []
    for i in range(_MAX_EXPONENT_BITS):
        fraction_bits = i if signed else i + 1  # unsigned: the sign bit is one more fraction bit
        edges = torch.linspace(0.1, 1.0, 2**fraction_bits + 1, dtype=torch.float32)
        centers = (edges[:-1] + edges[1:]) / 2.0
        # The decade scale is rounded to fp32 before the product, as fp32 tensor math does.
        magnitudes = centers * (10.0 ** (i - (_MAX_EXPONENT_BITS - 1)))
        values.append(magnitudes)
        if signed:
            values.append(-magnitudes)
    values.append(torch.tensor([0.0, 1.0]))
    qmap = torch.cat(values).sort().values
    assert qmap.numel() == 256 and bool((qmap.diff() > 0).all()), "dynamic map must be 256 sorted values"
    _MAPS[signed] = qmap
    return qmap


def zero_code(signed: bool) -> int:
    """The code whose map value is exactly 0 (127 for the signed map, 0 for the unsigned one)."""
    return int((dynamic_map(signed) == 0).nonzero().item())


@dataclass(frozen=True)
class QuantTables:
    """Everything a backend needs to (de)quantize against one dynamic map, on one device.

    Attributes:
        qmap: fp32 [256], the sorted map values.
        midpoints: fp32 [256]; ``midpoints[k] = (qmap[k] + qmap[k+1]) * 0.5`` for k < 255 and
            ``midpoints[255] = +inf``, so a branchless search over 256 entries never runs off
            the end.
        lut: int32 [LUT_SIZE] for the CPU kernel: per bucket of keys, ``candidate << 16 |
            threshold`` (see :func:`lut_search`).
    """

    qmap: Tensor
    midpoints: Tensor
    lut: Tensor


def order_key(y: Tensor) -> Tensor:
    """int32 keys of fp32 ``y`` that order like the floats: ``y1 < y2`` iff ``key1 < key2``.

    ``key = bits ^ ((bits >> 31) & 0x7FFFFFFF)`` with ``bits`` the fp32 pattern read as int32:
    non-negative floats keep their (increasing) pattern; negative ones flip all but the sign bit,
    which reverses their order and keeps them below every non-negative key. (-0.0 gets key -1,
    just below +0.0's 0: no midpoint lies between them.) The map is its own inverse.
    """
    bits = y.float().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _from_key(key: Tensor) -> Tensor:
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(torch.int32).view(torch.float32)


def lut_search(y: Tensor, lut: Tensor) -> Tensor:
    """Codes of fp32 ``y`` in [-1, 1] by the C++ kernel's table search (int64; equals
    ``bucketize(y, midpoints)``).

    ``entry = lut[(key >> 16) + LUT_KEY_OFFSET]`` holds ``candidate = entry >> 16``, the code of
    the bucket's smallest value, and ``threshold = entry & 0xFFFF``, the low 16 bits of the key of
    the midpoint inside the bucket (0xFFFF if none). All keys in a bucket share their top 16
    bits, so "y > midpoint" is "low 16 bits of y's key > threshold".
    """
    key = order_key(y).long()
    entry = lut.long()[(key >> 16) + LUT_KEY_OFFSET]
    return (entry >> 16) + ((key & 0xFFFF) > (entry & 0xFFFF)).long()


def _build_lut(midpoints: Tensor) -> Tensor:
    """The packed table of :func:`lut_search`, checked to hold at most one midpoint per bucket."""
    top = torch.arange(LUT_SIZE, dtype=torch.int64) - LUT_KEY_OFFSET
    start = _from_key(top << 16)  # the bucket's smallest value
    end = _from_key((top << 16) | 0xFFFF)  # and its largest
    mids = midpoints[:255]
    candidate = torch.bucketize(start, mids)  # the code of the bucket's smallest value
    inside = torch.bucketize(end, mids, right=True) - candidate  # midpoints in [start, end]
    assert int(inside.max()) <= 1, "a lookup table bucket holds two midpoints: the map is too dense for it"
    mid_low = order_key(midpoints[candidate.clamp(max=254)]).long() & 0xFFFF
    threshold = torch.where(inside == 1, mid_low, _NO_MIDPOINT)
    return ((candidate << 16) | threshold).to(torch.int32)


_TABLES: dict[tuple[bool, str], QuantTables] = {}


def quantization_tables(signed: bool, device: torch.device | str = "cpu") -> QuantTables:
    """The map, its padded midpoints and the CPU lookup table, on ``device`` (cached per device)."""
    device = torch.device(device)
    key = (signed, str(device))
    cached = _TABLES.get(key)
    if cached is not None:
        return cached
    qmap = dynamic_map(signed)
    midpoints = torch.cat([(qmap[:-1] + qmap[1:]) * 0.5, torch.tensor([float("inf")])])
    tables = QuantTables(qmap.to(device), midpoints.to(device), _build_lut(midpoints).to(device))
    _TABLES[key] = tables
    return tables


def _block_scales(absmax: Tensor, numel: int) -> Tensor:
    """absmax expanded to one entry per element (fp32 [numel])."""
    return absmax.repeat_interleave(BLOCK)[:numel]


def quantize_blockwise(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` block-wise against the signed or unsigned dynamic map.

    Args:
        x: any shape, any floating dtype (converted to fp32 first), read in flattened
            contiguous order.
        signed: the signed map (values of both signs, e.g. Adam's first moment) or the unsigned
            one (non-negative values, e.g. the second moment; negative inputs clamp to code 0).

    Returns:
        ``(codes, absmax)``: codes uint8 of ``x``'s shape, absmax fp32 ``[num_blocks(numel)]``.
        Non-finite elements are left out of absmax and get the code of 0.
    """
    flat = x.detach().reshape(-1).float()
    numel = flat.numel()
    tables = quantization_tables(signed, x.device)
    finite = flat.isfinite()
    magnitude = torch.where(finite, flat.abs(), 0.0)
    padded = torch.nn.functional.pad(magnitude, (0, num_blocks(numel) * BLOCK - numel))
    absmax = padded.view(-1, BLOCK).amax(dim=1)
    scale = _block_scales(absmax, numel)
    # Division by a zero scale or of a non-finite x gives NaN/inf here; both are replaced by 0.
    y = torch.where(finite & (scale > 0), flat / scale, 0.0)
    codes = torch.bucketize(y, tables.midpoints[:255]).to(torch.uint8)
    return codes.view(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """fp32 values ``qmap[codes] * absmax[block]`` in ``codes``' shape (the inverse of
    :func:`quantize_blockwise` up to the map's rounding)."""
    flat = codes.reshape(-1)
    if absmax.numel() != num_blocks(flat.numel()):
        raise ValueError(
            f"dequantize_blockwise: absmax has {absmax.numel()} entries but {flat.numel()} codes "
            f"need {num_blocks(flat.numel())} (one per block of {BLOCK})"
        )
    qmap = quantization_tables(signed, codes.device).qmap
    values = qmap[flat.long()] * _block_scales(absmax.float(), flat.numel())
    return values.view(codes.shape)


def blockwise_zeros(
    shape: torch.Size | tuple[int, ...], signed: bool, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """The quantized all-zero tensor: codes of 0 (uint8, ``shape``) and absmax zeros (fp32)."""
    numel = 1
    for size in shape:
        numel *= size
    codes = torch.full(tuple(shape), zero_code(signed), dtype=torch.uint8, device=device)
    return codes, torch.zeros(num_blocks(numel), dtype=torch.float32, device=device)
