"""``adamw8bit`` on CPU: the compiled C++ kernel of ``csrc/adamw8bit.cpp`` (OpenMP + SIMD).

Importing this module builds the kernel (first time on a machine: 15-30 s; later: a cached
load), so ``lowmem._ops`` imports it only when the ``cpp`` backend of ``adamw8bit`` is
first considered; a machine without a compiler gets the reason recorded there and the reference
instead. Semantics, state layout and the NaN rule: :mod:`lowmem.kernels.adamw8bit`.
:func:`adamw8bit_cpu_multi` steps a list of tensors with one op call and one parallel region.

The kernel takes, per dynamic map, the map and the lookup table of
:func:`lowmem.kernels.blockwise_quant.quantization_tables` (its portable path searches that) and
the search table of :func:`search_table` (its AVX-512 path searches that one).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lowmem.kernels._cpp import load_cpp_op
from lowmem.kernels.adamw8bit import (
    adamw8bit_scalars,
    check_adamw8bit_args,
    check_equal_lengths,
    contiguous_views,
    copy_back,
)
from lowmem.kernels.blockwise_quant import LUT_KEY_OFFSET, order_key, quantization_tables

__all__ = ["SEARCH_GUARD", "adamw8bit_cpu", "adamw8bit_cpu_multi", "search_table"]

_op = load_cpp_op("adamw8bit").default
_multi_op = torch.ops.lowmem.adamw8bit_multi.default  # registered by the same library

#: Keys of slack around each midpoint in the AVX-512 quantization: ``kGuard`` in
#: csrc/adamw8bit.cpp, which checks that the search tables were built for it.
SEARCH_GUARD = 5
_SHIFT_STEP = 40503  # candidate shifts k * _SHIFT_STEP mod 2^16, k = 1, 2, ...: well spread


def _from_key(key: Tensor) -> Tensor:
    """fp32 values of int64 order keys (the inverse of ``order_key``)."""
    key = key.to(torch.int32)
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).view(torch.float32)


@functools.cache
def search_table(signed: bool) -> Tensor:
    """The AVX-512 kernel's code search for the signed or unsigned map (int32, CPU; cached).

    Like the lookup table of ``quantization_tables`` it has one entry per bucket of 2^16
    consecutive order keys of ``y`` in [-1, 1], but the buckets start at a *shift*: bucket
    ``t`` holds the keys with ``(key + shift) >> 16 == t``. The shift is the first that puts every
    midpoint key, and the keys of 0, -0, 1 and -1, more than ``2 * SEARCH_GUARD`` keys from a
    bucket's ends (so a key within ``SEARCH_GUARD`` of a midpoint is in the midpoint's bucket, and
    the values every block holds are never flagged). With ``low`` the low 16 bits of
    ``key + shift``, ``threshold`` those of the bucket's midpoint (``0xFFFF`` if none), and
    ``first`` the code of the bucket's first key, the entry is::

        ((first - t) << 16) + ((SEARCH_GUARD + 1 - threshold) mod 2^16) + shift   (mod 2^32)

    so that ``entry + key`` (mod 2^32) holds ``first`` plus a carry in bits 16..23 and
    ``low - threshold + SEARCH_GUARD + 1`` (mod 2^16) in bits 0..15. The carry is the exact
    "``y`` above the midpoint" except for ``low - threshold`` in ``[-SEARCH_GUARD - 1, 0]``,
    where it comes early; those are among the keys the kernel treats as near a midpoint (bits
    0..15 below ``2 * SEARCH_GUARD``), whose blocks it quantizes again by the division, taking
    the early carries back (see csrc/adamw8bit.cpp, ``avx512::Plan``).

    Layout: ``[shift, SEARCH_GUARD, entry(-LUT_KEY_OFFSET), ..., entry(LUT_KEY_OFFSET)]``.
    Checked here against ``bucketize`` at every bucket's ends and around every midpoint.
    """
    tables = quantization_tables(signed, "cpu")
    mids = tables.midpoints[:255]
    mid_keys = order_key(mids).long()
    special = order_key(torch.tensor([0.0, -0.0, 1.0, -1.0])).long()
    margin = 2 * SEARCH_GUARD
    for k in range(1, 1 << 16):
        shift = (k * _SHIFT_STEP) & 0xFFFF
        low = (torch.cat([mid_keys, special]) + shift) & 0xFFFF
        if bool(((low > margin) & (low < 0xFFFF - margin)).all()):
            break
    else:  # pragma: no cover - the maps' 255 midpoints leave most shifts free
        raise AssertionError("no bucket shift keeps the midpoints away from the bucket edges")
    top = torch.arange(-LUT_KEY_OFFSET, LUT_KEY_OFFSET + 1, dtype=torch.int64)
    first_key = (top << 16) - shift
    first = torch.bucketize(_from_key(first_key), mids)
    inside = torch.bucketize(_from_key(first_key + 0xFFFF), mids, right=True) - first
    assert int(inside.max()) <= 1, "a search table bucket holds two midpoints: the map is too dense for it"
    mid_low = (order_key(tables.midpoints[first.clamp(max=254)]).long() + shift) & 0xFFFF
    threshold = torch.where(inside == 1, mid_low, 0xFFFF)
    entry = ((first - top) << 16) + ((SEARCH_GUARD + 1 - threshold) & 0xFFFF) + shift
    entry = ((entry + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)  # two's complement int32
    table = torch.cat([torch.tensor([shift, SEARCH_GUARD]), entry]).to(torch.int32)
    probes = torch.cat([first_key, first_key + 0xFFFF, *(mid_keys + d for d in range(-margin, margin + 1))])
    probes = _from_key(probes[(probes >= int(order_key(torch.tensor(-1.0)))) & (probes <= 0x3F800000)])
    assert torch.equal(_search(probes, table), torch.bucketize(probes, mids)), "search table is wrong"
    return table


def _search(y: Tensor, table: Tensor) -> Tensor:
    """The exact code search on a search table (int64 codes of fp32 ``y`` in [-1, 1])."""
    shift, guard = int(table[0]), int(table[1])
    key = order_key(y).long()
    total = (table.long()[((key + shift) >> 16) + LUT_KEY_OFFSET + 2] + key) & 0xFFFFFFFF
    early = (total & 0xFFFF) <= guard + 1
    return ((total >> 16) - early.long()) & 0xFF


@functools.cache
def _tables() -> tuple[Tensor, ...]:
    """The op's table arguments, in its schema's order."""
    signed = quantization_tables(True, "cpu")
    unsigned = quantization_tables(False, "cpu")
    return signed.qmap, signed.lut, unsigned.qmap, unsigned.lut, search_table(True), search_table(False)


def adamw8bit_cpu(
    param: Tensor,
    grad: Tensor,
    exp_avg_codes: Tensor,
    exp_avg_absmax: Tensor,
    exp_avg_sq_codes: Tensor,
    exp_avg_sq_absmax: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool = False,
) -> None:
    """:func:`lowmem.kernels.adamw8bit.adamw8bit` for CPU tensors, with the compiled kernel.

    Same signature and in-place contract: param and grad fp32 / bf16 / fp16 (same dtype), uint8
    codes with param's numel, fp32 absmax ``[ceil(numel / 256)]``. Non-contiguous tensors run on
    contiguous copies that are copied back.
    """
    originals = [param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax]
    check_adamw8bit_args("adamw8bit_cpu", *originals, step=step)
    if param.device.type != "cpu":
        raise ValueError(f"adamw8bit_cpu: tensors must be on the CPU, not {param.device}")
    if param.numel() == 0:
        return
    # The kernel reads numel and the data pointer only, so contiguous tensors of any shape go in
    # as they are (an optimizer calls this once per parameter: every microsecond here counts).
    contiguous = all(t.is_contiguous() for t in originals)
    tensors = originals if contiguous else contiguous_views(originals)
    scalars = adamw8bit_scalars(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, maximize=maximize
    )
    # Positional, in the schema's order (csrc/adamw8bit.cpp): keyword arguments cost the op
    # call a third more.
    _op(*tensors, *_tables(), *scalars.values())
    if not contiguous:
        copy_back([originals[0], *originals[2:]], [tensors[0], *tensors[2:]])


def adamw8bit_cpu_multi(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_codes: list[Tensor],
    exp_avg_absmax: list[Tensor],
    exp_avg_sq_codes: list[Tensor],
    exp_avg_sq_absmax: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool = False,
) -> None:
    """:func:`adamw8bit_cpu` for lists of tensors (element ``i`` of each list is one parameter's
    state; dtypes may differ between parameters), with one op call whose threads split the blocks
    of all of them: a step over many small tensors saves an op call and a parallel region per
    tensor. The results equal one :func:`adamw8bit_cpu` call per tensor, bit for bit."""
    lists = [params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax]
    check_equal_lengths("adamw8bit_cpu_multi", lists)
    flat: list[list[Tensor]] = [[] for _ in lists]
    copied: list[tuple[list[Tensor], list[Tensor]]] = []
    for originals in zip(*lists, strict=True):
        check_adamw8bit_args("adamw8bit_cpu_multi", *originals, step=step)
        if originals[0].device.type != "cpu":
            raise ValueError(f"adamw8bit_cpu_multi: tensors must be on the CPU, not {originals[0].device}")
        tensors = list(originals)
        if not all(t.is_contiguous() for t in originals):
            tensors = contiguous_views(tensors)
            copied.append(([originals[0], *originals[2:]], [tensors[0], *tensors[2:]]))
        for out, t in zip(flat, tensors, strict=True):
            out.append(t)
    scalars = adamw8bit_scalars(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, maximize=maximize
    )
    _multi_op(*flat, *_tables(), *scalars.values())
    for originals, tensors in copied:
        copy_back(originals, tensors)
