"""``SparseLowRankLinear``: SLTrain's sparse + low-rank linear layer (Han et al. 2024).

``W = (alpha / rank) * B @ A + S``: B (out x r), A (r x in) and the values of S are trained; the
support of S (``round(density * out * in)`` positions, uniformly random, fixed for the layer's
life) is not. At rank d/4 and density 3% a d x d layer holds 0.5 d^2 + 0.03 d^2 = 53% of the
dense parameters. W itself is never stored: forward builds it, tile by tile on CUDA (one fused
Triton kernel, :mod:`lowmem.kernels.sparse_low_rank`), multiplies and drops it; backward builds
it again, so nothing of size out x in is saved for backward.

The support is stored as ``sparse_index``: int32 row-major flat positions (``row * in + col``,
sorted), a persistent buffer, so ``state_dict`` carries it and a reloaded layer has exactly the
same support. Why int32, and why stored rather than regenerated from a seed: an int64 position
costs 8 bytes next to each 2-byte bf16 value; at density 3% over LLaMA-7B's ~6.5e9 linear weights
that is ~1.6 GB, over a tenth of the bf16 model's footprint and int32
halves it. Regenerating from a seed would save it entirely but ties checkpoints to one RNG
implementation, and a support chosen by :meth:`SparseLowRankLinear.from_linear` (largest residual
entries) has no seed. Weights with ``out * in >= 2**31`` need int64 positions and get them.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from lowmem.nn.low_rank import dense_linear

if TYPE_CHECKING:
    from lowmem.kernels.sparse_support import SupportLayout

# lowmem.kernels.sparse_low_rank imports Triton (when installed): loaded on first use, so
# `import lowmem.nn` stays light (tests/test_import.py).

__all__ = ["SparseLowRankLinear", "random_support"]

_INT32_LIMIT = 2**31


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < _INT32_LIMIT else torch.int64


def _check_shape_args(in_features: int, out_features: int, rank: int, density: float) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"SparseLowRankLinear: {name} must be a positive int, got {value!r}")
    if not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"SparseLowRankLinear: rank must be an int in [1, min(in_features, out_features)] = "
            f"[1, {min(in_features, out_features)}], got {rank!r}; "
            "a larger rank stores more than the dense weight"
        )
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"SparseLowRankLinear: density must be in [0, 1], got {density!r}")


def random_support(out_features: int, in_features: int, density: float, seed: int) -> Tensor:
    """A uniformly random support: ``round(density * out * in)`` distinct sorted flat positions.

    Drawn on the CPU from ``torch.Generator().manual_seed(seed)``, so the same seed gives the
    same support on every device. Returns int32 (int64 if ``out * in >= 2**31``).
    """
    numel = out_features * in_features
    nnz = round(float(density) * numel)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(numel, generator=gen)[:nnz].sort().values.to(_index_dtype(numel))


class SparseLowRankLinear(nn.Module):
    """Linear layer with weight ``(alpha / rank) * B @ A + S``, S sparse on a fixed random support.

    Args:
        in_features, out_features: as ``nn.Linear``; input (..., in) -> output (..., out).
        rank: r, the inner size of B (out x r) and A (r x in); ``1 <= r <= min(out, in)``.
        density: fraction of W's entries in S's support (SLTrain uses 0.03).
        alpha: the low-rank scale is ``alpha / rank`` (LoRA's convention, which SLTrain keeps).
        bias: learn an additive bias.
        seed: seed of the random support (CPU generator; see :func:`random_support`). ``None``
            draws one from torch's global RNG, so ``torch.manual_seed`` makes models reproducible.

    Parameters: ``B`` (out, r), ``A`` (r, in), ``sparse_values`` (nnz,), ``bias`` (out,);
    buffer ``sparse_index`` (nnz,) int32. Initialization (SLTrain, Sec. 3): B = 0, A Kaiming-
    uniform as in ``nn.Linear`` (so W = S at step 0 and gradients reach B at once), sparse values
    uniform in ±1/sqrt(in), bias as ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        density: float = 0.03,
        alpha: float = 32.0,
        bias: bool = True,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_shape_args(in_features, out_features, rank, density)
        if not math.isfinite(alpha) or alpha == 0:
            raise ValueError(f"SparseLowRankLinear: alpha must be finite and nonzero, got {alpha!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.density = float(density)
        self.alpha = float(alpha)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self.seed = int(seed)
        factory = {"device": device, "dtype": dtype}
        index = random_support(out_features, in_features, density, self.seed)
        self.register_buffer("sparse_index", index.to(device))
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.sparse_values = nn.Parameter(torch.empty(index.numel(), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._orders: dict[tuple, object] = {}  # tile orders and support layouts, see below
        self.reset_parameters()

    @property
    def scale(self) -> float:
        """The low-rank scale ``alpha / rank``."""
        return self.alpha / self.rank

    @property
    def nnz(self) -> int:
        """Number of entries in S's support."""
        return self.sparse_index.numel()

    def reset_parameters(self) -> None:
        """SLTrain's initialization: B = 0, A Kaiming-uniform, S and bias uniform ±1/sqrt(in)."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            nn.init.zeros_(self.B)
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.uniform_(self.sparse_values, -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)

    def _tile_order(self) -> tuple[Tensor, Tensor]:
        # The Triton kernel's per-tile grouping of the support: a sort, so computed once per
        # (device, tiling) and kept; keyed on the buffer's version, so load_state_dict refreshes it.
        from lowmem.kernels.sparse_low_rank import block_shape, tile_order

        index = self.sparse_index
        block_m, block_n = block_shape(self.out_features, self.in_features, self.rank)
        key = (index.device, index.data_ptr(), index._version, block_m, block_n)
        order = self._orders.get(key)
        if order is None:
            for stale in [k for k in self._orders if k[0] != "layout"]:
                del self._orders[stale]
            order = tile_order(index, self.out_features, self.in_features, block_m, block_n)
            self._orders[key] = order
        return order

    def _support_layout(self) -> SupportLayout:
        # The CPU factorized path's grouping of the support by row and by column (two sorts):
        # cached like the tile order, keyed on the index buffer's version.
        from lowmem.kernels.sparse_support import support_layout

        index = self.sparse_index
        key = ("layout", index.device, index.data_ptr(), index._version)
        layout = self._orders.get(key)
        if layout is None:
            for stale in [k for k in self._orders if k[0] == "layout"]:
                del self._orders[stale]
            layout = support_layout(index, self.out_features, self.in_features)
            self._orders[key] = layout
        return layout

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out) through the op ``sparse_low_rank_linear`` (lowmem._ops): on
        CUDA W is built (not stored) by the Triton kernel; on CPU, fp32/fp64, the compiled
        factorized path multiplies by B, A and S without W where its cost model says it is
        cheaper (:mod:`lowmem.kernels.sparse_low_rank_cpu`)."""
        from lowmem._ops import dispatch

        fn = dispatch("sparse_low_rank_linear", x.device, x.dtype)
        return fn(
            x,
            self.B,
            self.A,
            self.sparse_values,
            self.sparse_index,
            self.bias,
            self.scale,
            order=functools.partial(SparseLowRankLinear._tile_order, self),
            layout=functools.partial(SparseLowRankLinear._support_layout, self),
        )

    @torch.no_grad()
    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W (out, in) as one dense tensor, computed in fp32 (fp64 stays fp64), returned in ``dtype``."""
        from lowmem.kernels.sparse_low_rank import sparse_low_rank_weight_ref

        compute = torch.float64 if self.B.dtype == torch.float64 else torch.float32
        w = sparse_low_rank_weight_ref(
            self.B.to(compute),
            self.A.to(compute),
            self.sparse_values.to(compute),
            self.sparse_index,
            self.scale,
        )
        return w.to(dtype or self.B.dtype)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (weight = :meth:`dense_weight`)."""
        return dense_linear(self.dense_weight(), self.bias)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        density: float = 0.03,
        alpha: float = 32.0,
        *,
        support: Literal["largest", "random"] = "largest",
        seed: int | None = None,
    ) -> SparseLowRankLinear:
        """A layer approximating ``linear``: truncated SVD for B @ A, the residual for S.

        With ``W = U diag(s) V^T`` (computed in fp32, or fp64 for fp64 weights), the rank-r part
        is split evenly, ``scale * B @ A = U_r diag(s_r) V_r^T`` with ``B = U_r diag(sqrt(s_r / scale))``
        and ``A = diag(sqrt(s_r / scale)) V_r^T``. The residual ``R = W - U_r diag(s_r) V_r^T``
        gives S: ``support="largest"`` keeps R's nnz largest-magnitude entries (the best sparse
        approximation of R in Frobenius norm), ``"random"`` keeps R on a random support (seeded
        as in the constructor), as SLTrain trains from. The result is on ``linear``'s device and
        dtype.
        """
        if type(linear) is not nn.Linear and not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if support not in ("largest", "random"):
            raise ValueError(f"from_linear: support must be 'largest' or 'random', got {support!r}")
        weight = linear.weight
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            rank,
            density,
            alpha,
            bias=linear.bias is not None,
            seed=seed,
            device=weight.device,
            dtype=weight.dtype,
        )
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w = weight.detach().to(compute)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = (s[:rank] / layer.scale).sqrt()
        b = u[:, :rank] * root
        a = root[:, None] * vh[:rank]
        residual = w - layer.scale * (b @ a)
        if support == "largest":
            top = residual.abs().view(-1).topk(layer.nnz, sorted=False).indices
            index = top.sort().values.to(layer.sparse_index.dtype)
            layer.sparse_index.copy_(index)
        values = residual.view(-1)[layer.sparse_index.long()]
        layer.B.copy_(b)
        layer.A.copy_(a)
        layer.sparse_values.copy_(values)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"density={self.density}, nnz={self.nnz}, alpha={self.alpha}, bias={self.bias is not None}"
        )
