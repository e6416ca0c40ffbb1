"""``LowRankLinear``: a linear layer whose weight is the product ``W = B @ A`` of rank r.

The plain low-rank baseline of memory-efficient pretraining (Kamalakara et al. 2022, "Exploring
Low Rank Training of Deep Neural Networks"; benchmarked as "Low-Rank" by Glentis et al. 2025,
"Scalable Parameter and Memory Efficient Pretraining for LLM", who add weight refactorization,
:func:`lowmem.nn.refactorize_`, and momentum reset, :func:`lowmem.optim.reset_momentum`). A
d x d layer at rank r holds 2 d r parameters instead of d^2. The forward is factorized,
``y = (x @ A^T) @ B^T + bias``: 4 r/d of the dense FLOPs, and W (out x in) is never formed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LowRankLinear"]


@torch.no_grad()
def dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A new ``nn.Linear`` holding copies of ``weight`` ``[out, in]`` and ``bias`` ``[out]`` (same
    device and dtype): the ``to_dense()`` export of the factorized layers."""
    out_features, in_features = weight.shape
    linear = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


class LowRankLinear(nn.Module):
    """``y = x @ (B @ A)^T + bias`` with B (out x r), A (r x in); input (..., in) -> (..., out).

    Args:
        in_features, out_features: as ``nn.Linear``.
        rank: r, ``1 <= r <= min(out, in)``.
        bias: learn an additive bias.

    Initialization: A uniform in ±1/sqrt(in) (``nn.Linear``'s bound for an in-wide layer) and B
    uniform in ±sqrt(3/r), so each entry of B @ A has ``nn.Linear``'s variance 1/(3 in) (sum of r
    products of variances 1/r and 1/(3 in)), and the model trains from the dense model's scale.
    Saved for backward: x and ``x @ A^T`` (tokens x r), never an out x in tensor.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LowRankLinear: {name} must be a positive int, got {value!r}")
        if not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"LowRankLinear: rank must be an int in [1, min(in_features, out_features)] = "
                f"[1, {min(in_features, out_features)}], got {rank!r}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A ~ U(±1/sqrt(in)), B ~ U(±sqrt(3/r)): B @ A has nn.Linear's entry variance."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            nn.init.uniform_(self.A, -bound, bound)
            nn.init.uniform_(self.B, -math.sqrt(3.0 / self.rank), math.sqrt(3.0 / self.rank))
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out), as two thin matmuls."""
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    @torch.no_grad()
    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W = B @ A (out, in), computed in fp32 (fp64 stays fp64), returned in ``dtype``."""
        compute = torch.float64 if self.B.dtype == torch.float64 else torch.float32
        return (self.B.to(compute) @ self.A.to(compute)).to(dtype or self.B.dtype)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function."""
        return dense_linear(self.dense_weight(), self.bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-r approximation of ``linear`` (truncated SVD, Eckart-Young), split evenly.

        ``W ≈ U_r diag(s_r) V_r^T``, ``B = U_r diag(sqrt(s_r))``, ``A = diag(sqrt(s_r)) V_r^T``
        (computed in fp32, or fp64 for fp64 weights; stored in ``linear``'s dtype and device).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            rank,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        u, s, vh = torch.linalg.svd(weight.detach().to(compute), full_matrices=False)
        root = s[:rank].sqrt()
        layer.B.copy_(u[:, :rank] * root)
        layer.A.copy_(root[:, None] * vh[:rank])
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )
