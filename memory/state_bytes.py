"""Bytes of optimizer state per parameter, by the rules the lowmem optimizers allocate with.

Each rule below restates what an optimizer's ``_init_state`` / first step allocates, using the
same shape functions (``matrix_shape``, ``projection_side``, ``lowrank_shape``) and the same
8-bit threshold and block size; ``tests/memory/test_estimator.py`` checks every optimizer name
against the bytes of the state tensors that the real optimizer holds after a step.

Per parameter with p elements, of dtype size b (state dtype size s: b, or that of ``state_dtype``):

=======================  ==========================================================================
``adamw``                torch.optim.AdamW: ``step`` (fp32 scalar, 4) + 2 moments of p·b
plain (lowmem Adam)      ``step`` (4) + moments: 2·p·s, or for ``state_dtype="int8"`` and p >= 4096:
                         2·p (uint8 codes) + 2·4·⌈p/256⌉ (fp32 absmax per block of 256)
projected m×n, rank r    ``step`` (4) + ``last_refresh`` (int64, 8) + the moments above with p the
                         low-rank shape's size (m·r for ``std`` with m >= n, r·n otherwise, r·r
                         for ``full``), plus:
  GaLore                 the basis: r·n (right) / m·r (left) / both (full) elements of b
  Fira                   GaLore's + ``residual_norm`` (a scalar of max(b, 4))
  APOLLO                 ``proj_seed`` (int64, 8) + ``update_norm`` (a scalar of max(b, 4));
                         the random projection is regenerated from the seed, never stored
                         (``proj="svd"`` stores GaLore's basis instead)
=======================  ==========================================================================

A weight in a ``rank`` group with rank >= min(m, n) gets the plain update and plain state.

Adafactor (Shazeer & Stern 2018, arXiv:1804.04235) keeps its statistics in the compute dtype
(size c: 4 for fp16/bf16/fp32 parameters, 8 for fp64), and a first moment only when ``beta1`` is
set (the default ``beta1=None`` keeps none). For a tensor of shape (d_1, ..., d_k, x, y):

=======================  ==========================================================================
factored (>= 2 dims)     ``exp_avg_sq_row`` d_1···d_k·x + ``exp_avg_sq_col`` d_1···d_k·y, each c
                         (the last two dims, for every index of the leading ones)
1-D / 0-d                ``exp_avg_sq``: p·c
first moment (beta1)     ``exp_avg``: p·c
``adafactor``            transformers.optimization.Adafactor: the above + ``RMS`` (a 0-d tensor of
                         c); ``step`` is a Python int (no tensor)
``galore_adafactor``     plain groups: the above + ``step`` (4); a projected m×n weight: the above
                         for the low-rank shape (row m + column r for ``std`` with m >= n; the
                         first moment m·r) + ``step`` (4) + ``last_refresh`` (8) + GaLore's basis
                         (in the parameter's dtype, b)
=======================  ==========================================================================

Under FSDP2 (:mod:`lowmem.optim.sharded`, every projected weight on the right) each rank holds
its rows of the row statistics, of ``exp_avg_sq`` and of the first moment, and its columns of
the basis; the column statistics of a matrix (n numbers for a plain m×n weight, r for a
projected one) and the counters are whole on every rank: :func:`param_state_split` tells the
two parts apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lowmem.kernels.blockwise_quant import num_blocks
from lowmem.optim.functional.adafactor import compute_dtype
from lowmem.optim.lowrank_adam import MIN_8BIT_SIZE, STATE_DTYPES
from lowmem.optim.lowrank_base import matrix_shape
from lowmem.optim.projector import lowrank_shape, projection_side

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "StateBytes",
    "optimizer_spec",
    "param_state_bytes",
    "param_state_split",
]

_SCALAR_STEP = 4  # step: fp32 0-d tensor (torch.optim and lowmem alike)
_INT64 = 8


@dataclass(frozen=True)
class OptimizerSpec:
    """What fixes an optimizer's state layout.

    Attributes:
        family: ``"torch_adamw"`` (torch.optim.AdamW), ``"adam"`` (lowmem Adam, no projection),
            ``"galore"``, ``"fira"``, ``"apollo"``, ``"hf_adafactor"``
            (transformers.optimization.Adafactor) or ``"galore_adafactor"``.
        state_dtype: lowmem's ``state_dtype`` (None: the param's dtype; ``"int8"``: 8-bit blocks).
        rank: the default rank of projected weights (None: the estimator picks one).
        proj: APOLLO's ``proj`` (``"random"``: no stored basis; ``"svd"``: GaLore's basis).
        scale_type: APOLLO's ``scale_type`` (memory is the same for both).
    """

    family: str
    state_dtype: str | None = None
    rank: int | None = None
    proj: str = "random"
    scale_type: str = "channel"

    @property
    def lowrank(self) -> bool:
        return self.family in ("galore", "fira", "apollo", "galore_adafactor")

    @property
    def adafactor(self) -> bool:
        """Factored second moment, first moment only with ``beta1`` (the estimator's ``beta1``)."""
        return self.family in ("hf_adafactor", "galore_adafactor")


#: The optimizer names the estimator knows (lowmem's and torch's), with their state layout.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch_adamw"),
    "adamw8bit": OptimizerSpec("adam", "int8"),
    "galore_adamw": OptimizerSpec("galore"),
    "galore_adamw8bit": OptimizerSpec("galore", "int8"),
    "fira_adamw": OptimizerSpec("fira"),
    "apollo_adamw": OptimizerSpec("apollo"),
    "apollo_mini": OptimizerSpec("apollo", rank=1, scale_type="tensor"),
    "adafactor": OptimizerSpec("hf_adafactor"),
    "galore_adafactor": OptimizerSpec("galore_adafactor"),
}


def optimizer_spec(name: str) -> OptimizerSpec:
    """The :class:`OptimizerSpec` of an optimizer name (case and ``-`` vs ``_`` ignored)."""
    key = name.lower().replace("-", "_")
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[key]


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _moment_bytes(numel: int, param_dtype: torch.dtype, state_dtype: str | None, min_8bit_size: int) -> int:
    """Both Adam moments of ``numel`` elements, as AdamLowRankOptimizer._init_state allocates them."""
    if state_dtype == "int8" and numel >= min_8bit_size:
        return 2 * numel + 2 * 4 * num_blocks(numel)
    dtype = STATE_DTYPES[state_dtype] or param_dtype
    return 2 * numel * _dtype_bytes(dtype)


class StateBytes(NamedTuple):
    """One parameter's optimizer state in bytes, split by what FSDP2 full sharding does with it.

    ``sharded``: the part each of w ranks holds 1/w of (rows of moments and statistics, columns of
    a basis; for the Adam-family rules, everything: their scalars are ignored under sharding).
    ``replicated``: the part every rank holds whole (Adafactor's column statistics of a matrix,
    its counters).
    """

    sharded: int
    replicated: int = 0

    @property
    def total(self) -> int:
        """Bytes on one process."""
        return self.sharded + self.replicated


def param_state_bytes(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    spec: OptimizerSpec,
    *,
    rank: int | None = None,
    proj_type: str = "std",
    min_8bit_size: int = MIN_8BIT_SIZE,
    first_moment: bool = False,
) -> int:
    """Bytes of optimizer state for one parameter of ``shape`` and ``dtype`` after its first step.

    Args:
        rank: the rank of the parameter's group; None for a group without ``rank`` (plain update).
        proj_type: the group's ``proj_type`` (GaLore's ``std`` projects the smaller side).
        min_8bit_size: moments with fewer elements stay fp32 under ``state_dtype="int8"``.
        first_moment: Adafactor with ``beta1`` set (ignored by the Adam-family rules).
    """
    return param_state_split(
        shape,
        dtype,
        spec,
        rank=rank,
        proj_type=proj_type,
        min_8bit_size=min_8bit_size,
        first_moment=first_moment,
    ).total


def param_state_split(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    spec: OptimizerSpec,
    *,
    rank: int | None = None,
    proj_type: str = "std",
    min_8bit_size: int = MIN_8BIT_SIZE,
    first_moment: bool = False,
) -> StateBytes:
    """:func:`param_state_bytes` as (bytes FSDP2 shards by rows or columns, bytes every rank holds)."""
    numel = math.prod(shape)
    b = _dtype_bytes(dtype)
    if spec.family == "torch_adamw":
        return StateBytes(_SCALAR_STEP + 2 * numel * b)
    side = None
    m, n = 0, 0
    if spec.lowrank and rank is not None and len(shape) >= 2:
        m, n = matrix_shape(torch.empty(shape, device="meta"))
        if rank < min(m, n):
            side = projection_side((m, n), proj_type)
    basis = 0
    if side is not None:
        assert rank is not None
        basis = {"right": rank * n, "left": m * rank, "full": m * rank + rank * n}[side] * b
    if spec.adafactor:
        stats = tuple(shape) if side is None else lowrank_shape((m, n), rank, side)  # type: ignore[arg-type]
        return _adafactor_split(stats, dtype, spec, first_moment, projected=side is not None, basis=basis)
    if side is None:
        return StateBytes(_SCALAR_STEP + _moment_bytes(numel, dtype, spec.state_dtype, min_8bit_size))
    low = lowrank_shape((m, n), rank, side)  # type: ignore[arg-type]
    total = _SCALAR_STEP + _INT64 + _moment_bytes(low[0] * low[1], dtype, spec.state_dtype, min_8bit_size)
    scalar = max(b, 4)  # residual_norm / update_norm: promote_types(param dtype, fp32)
    if spec.family == "galore":
        return StateBytes(total + basis)
    if spec.family == "fira":
        return StateBytes(total + basis + scalar)
    # APOLLO: seed and norm; a stored basis only with proj="svd".
    return StateBytes(total + _INT64 + scalar + (basis if spec.proj == "svd" else 0))


def _adafactor_split(
    stats: tuple[int, ...],
    dtype: torch.dtype,
    spec: OptimizerSpec,
    first_moment: bool,
    *,
    projected: bool,
    basis: int,
) -> StateBytes:
    """Adafactor's state for statistics of shape ``stats`` (the parameter's, or the low-rank R's).

    As GaLoreAdafactor._init_state and transformers' Adafactor allocate it: in the compute dtype
    (fp32 for fp16/bf16 parameters), factored over the last two dims of a tensor of >= 2 dims.
    """
    c = _dtype_bytes(compute_dtype(dtype))
    if len(stats) >= 2:
        row = math.prod(stats[:-1]) * c
        col = math.prod(stats[:-2]) * stats[-1] * c
        # FSDP2 shards dim 0: a matrix's column statistics span every rank's rows and are whole on
        # each rank; with 3+ dims, dim 0 is a leading dim of both factors, so both are the rank's own.
        sharded, replicated = (row, col) if len(stats) == 2 else (row + col, 0)
    else:
        sharded, replicated = math.prod(stats) * c, 0  # exp_avg_sq, element-wise
    if first_moment:
        sharded += math.prod(stats) * c  # exp_avg, the statistics' shape
    if spec.family == "hf_adafactor":
        # transformers keeps ``step`` as a Python int and ``RMS`` as a 0-d tensor of the compute dtype.
        return StateBytes(sharded, replicated + c)
    replicated += _SCALAR_STEP
    if projected:
        sharded += basis  # the basis: its columns per rank under FSDP2
        replicated += _INT64  # last_refresh
    return StateBytes(sharded, replicated)
