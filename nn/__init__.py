"""Memory-saving nn.Module replacements and the ``convert_*`` functions that swap them in.

- :class:`SparseLowRankLinear`: W = (alpha/r)·B@A + S on a fixed random support (SLTrain, Han et
  al. 2024); :class:`LowRankLinear`: W = B@A. :func:`convert_to_sparse_low_rank`,
  :func:`convert_to_low_rank` swap them into a model; :func:`refactorize_` re-balances B and A
  (Glentis et al. 2025).
- :class:`LowPrecisionLinear`: int8 / fp8 training matmuls with per-row or per-tensor scales;
  :func:`convert_to_low_precision` / :func:`convert_from_low_precision`, :func:`to_dense`.
- :func:`iter_target_linears`: the module matching every ``convert_*`` uses (names, substrings,
  regexes, ``"all-linear"``, as transformers' ``optim_target_modules``).

Nothing here imports Triton: the kernels load on first use.
"""

from lowmem.nn.convert import (
    ConversionReport,
    convert_to_low_rank,
    convert_to_sparse_low_rank,
    iter_target_linears,
)
from lowmem.nn.convert_low_precision import (
    LowPrecisionReport,
    convert_from_low_precision,
    convert_to_low_precision,
)
from lowmem.nn.low_precision import LowPrecisionLinear, to_dense
from lowmem.nn.low_rank import LowRankLinear
from lowmem.nn.refactorize import refactorize_
from lowmem.nn.sparse_low_rank import SparseLowRankLinear

__all__ = [
    "ConversionReport",
    "LowPrecisionLinear",
    "LowPrecisionReport",
    "LowRankLinear",
    "SparseLowRankLinear",
    "convert_from_low_precision",
    "convert_to_low_precision",
    "convert_to_low_rank",
    "convert_to_sparse_low_rank",
    "iter_target_linears",
    "refactorize_",
    "to_dense",
]
