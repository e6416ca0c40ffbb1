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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem.kernels.blockwise_quant import num_blocks
from lowmem.optim.lowrank_adam import MIN_8BIT_SIZE, STATE_DTYPES
from lowmem.optim.lowrank_base import matrix_shape
from lowmem.optim.projector import lowrank_shape, projection_side

__all__ = ["OPTIMIZERS", "OptimizerSpec", "optimizer_spec", "param_state_bytes"]

_SCALAR_STEP = 4  # step: fp32 0-d tensor (torch.optim and lowmem alike)
_INT64 = 8


@dataclass(frozen=True)
class OptimizerSpec:
    """What fixes an optimizer's state layout.

    Attributes:
        family: ``"torch_adamw"`` (torch.optim.AdamW), ``"adam"`` (lowmem Adam, no projection),
            ``"galore"``, ``"fira"`` or ``"apollo"``.
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
        return self.family in ("galore", "fira", "apollo")


#: The optimizer names the estimator knows (lowmem's and torch's), with their state layout.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch_adamw"),
    "adamw8bit": OptimizerSpec("adam", "int8"),
    "galore_adamw": OptimizerSpec("galore"),
    "galore_adamw8bit": OptimizerSpec("galore", "int8"),
    "fira_adamw": OptimizerSpec("fira"),
    "apollo_adamw": OptimizerSpec("apollo"),
    "apollo_mini": OptimizerSpec("apollo", rank=1, scale_type="tensor"),
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


def param_state_bytes(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    spec: OptimizerSpec,
    *,
    rank: int | None = None,
    proj_type: str = "std",
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> int:
    """Bytes of optimizer state for one parameter of ``shape`` and ``dtype`` after its first step.

    Args:
        rank: the rank of the parameter's group; None for a group without ``rank`` (plain update).
        proj_type: the group's ``proj_type`` (GaLore's ``std`` projects the smaller side).
        min_8bit_size: moments with fewer elements stay fp32 under ``state_dtype="int8"``.
    """
    numel = 1
    for size in shape:
        numel *= size
    b = _dtype_bytes(dtype)
    if spec.family == "torch_adamw":
        return _SCALAR_STEP + 2 * numel * b
    side = None
    if spec.lowrank and rank is not None and len(shape) >= 2:
        m, n = matrix_shape(torch.empty(shape, device="meta"))
        if rank < min(m, n):
            side = projection_side((m, n), proj_type)
    if side is None:
        return _SCALAR_STEP + _moment_bytes(numel, dtype, spec.state_dtype, min_8bit_size)
    m, n = matrix_shape(torch.empty(shape, device="meta"))
    low = lowrank_shape((m, n), rank, side)
    total = _SCALAR_STEP + _INT64 + _moment_bytes(low[0] * low[1], dtype, spec.state_dtype, min_8bit_size)
    scalar = max(b, 4)  # residual_norm / update_norm: promote_types(param dtype, fp32)
    basis = {"right": rank * n, "left": m * rank, "full": m * rank + rank * n}[side] * b
    if spec.family == "galore":
        return total + basis
    if spec.family == "fira":
        return total + basis + scalar
    # APOLLO: seed and norm; a stored basis only with proj="svd".
    return total + _INT64 + scalar + (basis if spec.proj == "svd" else 0)
