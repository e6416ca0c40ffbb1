"""The optimizer contract: what every lowmem optimizer must do, and the registry it runs over.

A new optimizer joins the contract suite (tests/optim/test_contract.py) by one line in
``OPTIMIZERS``. A case builds the optimizer from two lists of parameters: ``matrices`` (the
weights a low-rank method projects) and ``others`` (biases, norms, scalars: always a plain
group), so the same tests run plain groups, low-rank groups and both together.

Low-rank cases use ``rank=2`` and ``update_proj_gap=3`` on tiny matrices, so projector
refreshes (steps 1, 4, 7, ...) happen inside every multi-step test. On the tiny fp64
matrices used for trajectories, ``rank + 8 >= min(m, n)``, so the randomized projector's
sketch spans the whole row space and its basis equals the exact SVD's to rounding: one
exact-SVD reference covers both projectors.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from adafactor_reference import galore_adafactor_cases
from torch import Tensor

from lowmem.optim import ApolloAdamW, FiraAdamW, GaLoreAdamW, GaLoreAdamW8bit
from lowmem.optim.apollo_adamw import APOLLO_MINI, apollo_seed
from lowmem.optim.projector import gaussian_projection, stable_seed

# ---------------------------------------------------------------------------------------------
# Independent fp64 reference of GaLore-AdamW, written from the paper (Zhao et al. 2024, Alg. 2)
# and the documented conventions: torch.optim.AdamW's eps placement and decay order, signs
# fixed so each new basis vector has a non-negative dot product with its predecessor (the first
# basis: each right singular vector's largest-magnitude entry is positive), refresh on the
# first step and every ``gap`` steps after, moments kept / carried / reset on a refresh.
# ---------------------------------------------------------------------------------------------


def _signs_from_rows(rows: Tensor) -> Tensor:
    """+1/-1 per row so that the row's largest-magnitude entry becomes positive."""
    picked = rows[torch.arange(rows.shape[0]), rows.abs().argmax(dim=1)]
    return torch.where(picked < 0, -1.0, 1.0).to(rows.dtype)


def _signs_aligned(rows: Tensor, previous: Tensor | None) -> Tensor:
    """+1/-1 per row: the sign of its dot product with the previous row where that is nonzero,
    else the sign that makes its largest-magnitude entry positive."""
    signs = _signs_from_rows(rows)
    if previous is None:
        return signs
    dots = (rows * previous).sum(dim=1)
    return torch.where(dots > 0, 1.0, torch.where(dots < 0, -1.0, signs)).to(rows.dtype)


def reference_basis(
    grad: Tensor, rank: int, side: str, previous: tuple[Tensor | None, Tensor | None] = (None, None)
) -> tuple[Tensor | None, Tensor | None]:
    """Exact top-``rank`` singular vectors of ``grad``: (P: m×r or None, Q: r×n or None), signed
    to agree with the ``previous`` (P, Q) basis when there is one."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    p, q = u[:, :rank], vh[:rank]
    if side == "left":
        prev_rows = None if previous[0] is None else previous[0].T
        return p * _signs_aligned(p.T, prev_rows)[None, :], None
    signs = _signs_aligned(q, previous[1])  # a singular pair keeps one sign: the right vector's
    if side == "right":
        return None, q * signs[:, None]
    return p * signs[None, :], q * signs[:, None]


def reference_side(shape: tuple[int, int], proj_type: str) -> str:
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


class GaLoreReference:
    """GaLore-AdamW on one 2-D weight, the plain way: materialize everything, no fusion."""

    def __init__(self, weight: Tensor, hyper: dict[str, Any], lowrank: dict[str, Any]) -> None:
        self.w = weight.detach().clone()
        self.lr = hyper.get("lr", 1e-3)
        self.b1, self.b2 = hyper.get("betas", (0.9, 0.999))
        self.eps = hyper.get("eps", 1e-8)
        self.wd = hyper.get("weight_decay", 1e-2)
        self.maximize = hyper.get("maximize", False)
        self.rank = lowrank["rank"]
        self.gap = lowrank.get("update_proj_gap", 200)
        self.scale = lowrank.get("scale", 0.25)
        self.on_refresh = lowrank.get("on_refresh", "project")
        self.side = reference_side(tuple(weight.shape), lowrank.get("proj_type", "std"))
        self.t = 0
        self.last = None
        self.p = self.q = self.m = self.v = None

    def _project(self, g: Tensor) -> Tensor:
        if self.q is not None:
            g = g @ self.q.T
        if self.p is not None:
            g = self.p.T @ g
        return g

    def _back(self, n: Tensor) -> Tensor:
        if self.q is not None:
            n = n @ self.q
        if self.p is not None:
            n = self.p @ n
        return n

    def step(self, grad: Tensor) -> Tensor:
        self.t += 1
        if self.last is None or self.t - self.last >= self.gap:
            p, q = reference_basis(grad, self.rank, self.side, (self.p, self.q))
            if self.m is not None and self.on_refresh == "project":
                if q is not None:
                    rot = self.q @ q.T
                    self.m, self.v = self.m @ rot, self.v @ rot**2
                if p is not None:
                    rot = p.T @ self.p
                    self.m, self.v = rot @ self.m, rot**2 @ self.v
            self.p, self.q, self.last = p, q, self.t
            if self.m is None or self.on_refresh == "reset":
                low_shape = self._project(grad).shape
                self.m = torch.zeros(low_shape, dtype=grad.dtype)
                self.v = torch.zeros(low_shape, dtype=grad.dtype)
        r = self._project(-grad if self.maximize else grad)
        self.m = self.b1 * self.m + (1 - self.b1) * r
        self.v = self.b2 * self.v + (1 - self.b2) * r * r
        k = self.t - self.last + 1 if self.on_refresh == "reset" else self.t
        n = (self.m / (1 - self.b1**k)) / ((self.v / (1 - self.b2**k)).sqrt() + self.eps)
        self.w = self.w * (1 - self.lr * self.wd) - self.lr * self.update(
            -grad if self.maximize else grad, r, n
        )
        return self.w

    def update(self, grad: Tensor, r: Tensor, n: Tensor) -> Tensor:
        """The full-size update (before lr) from the signed gradient, R and the Adam direction N."""
        return self.scale * self._back(n)


class FiraReference(GaLoreReference):
    """Fira (Chen et al. 2024, Alg. 1) the plain way: the residual G − back(R) materialized,
    channel norms over the non-projected dimension, limiter γ = 1.01 on the scaled residual."""

    def __init__(self, weight: Tensor, hyper: dict[str, Any], lowrank: dict[str, Any]) -> None:
        lowrank = dict(lowrank)
        if "alpha" in lowrank:
            lowrank["scale"] = lowrank.pop("alpha")
        super().__init__(weight, hyper, lowrank)
        self.previous: float | None = None

    def update(self, grad: Tensor, r: Tensor, n: Tensor) -> Tensor:
        axis = 1 if self.side == "right" else 0  # rows of m×r, or columns of r×n
        s = n.norm(dim=axis, keepdim=True) / (r.norm(dim=axis, keepdim=True) + 1e-8)
        residual = s * (grad - self._back(r))
        norm = float(residual.norm())
        if self.previous is not None and norm / (self.previous + 1e-8) > 1.01:
            residual = residual * (1.01 / (norm / (self.previous + 1e-8)))
        self.previous = float(residual.norm())
        return self.scale * self._back(n) + residual


class ApolloReference:
    """APOLLO (Zhu et al. 2024, Alg. 1) on one 2-D weight, materializing everything.

    The random projection is drawn with lowmem's documented seed schedule (``apollo_seed`` for
    the first, ``stable_seed(seed, shape, step)`` at each refresh, ``gaussian_projection``): the
    reference checks the algorithm around the projection, not the random numbers themselves.
    """

    def __init__(self, weight: Tensor, hyper: dict[str, Any], lowrank: dict[str, Any]) -> None:
        self.w = weight.detach().clone()
        self.lr = hyper.get("lr", 1e-3)
        self.b1, self.b2 = hyper.get("betas", (0.9, 0.999))
        self.eps = hyper.get("eps", 1e-8)
        self.wd = hyper.get("weight_decay", 1e-2)
        self.maximize = hyper.get("maximize", False)
        self.rank = lowrank["rank"]
        self.gap = lowrank.get("update_proj_gap", 200)
        self.scale = lowrank.get("scale", 1.0)
        self.scale_type = lowrank.get("scale_type", "channel")
        self.proj = lowrank.get("proj", "random")
        self.on_refresh = lowrank.get("on_refresh", "keep")
        self.side = reference_side(tuple(weight.shape), lowrank.get("proj_type", "std"))
        self.seed = apollo_seed(lowrank.get("seed", 0), tuple(weight.shape), 0)
        self.t, self.last = 0, None
        self.basis = self.m = self.v = None
        self.previous: float | None = None

    def _project(self, g: Tensor) -> Tensor:
        return g @ self.basis.T if self.side == "right" else self.basis.T @ g

    def step(self, grad: Tensor) -> Tensor:
        self.t += 1
        if self.last is None or self.t - self.last >= self.gap:
            if self.proj == "random":
                if self.last is not None:
                    self.seed = stable_seed(self.seed, tuple(grad.shape), self.t)
                left, right = gaussian_projection(
                    tuple(grad.shape), self.rank, self.side, seed=self.seed, like=grad
                )
            else:
                prev = (self.basis, None) if self.side == "left" else (None, self.basis)
                left, right = reference_basis(grad, self.rank, self.side, prev if self.last else (None, None))
            new = left if self.side == "left" else right
            if self.m is not None and self.on_refresh == "project":
                rot = self.basis @ new.T if self.side == "right" else new.T @ self.basis
                self.m, self.v = (
                    (self.m @ rot, self.v @ rot**2)
                    if self.side == "right"
                    else (rot @ self.m, rot**2 @ self.v)
                )
            self.basis, self.last = new, self.t
            if self.m is None or self.on_refresh == "reset":
                self.m = torch.zeros_like(self._project(grad))
                self.v = torch.zeros_like(self.m)
        g = -grad if self.maximize else grad
        r = self._project(g)
        self.m = self.b1 * self.m + (1 - self.b1) * r
        self.v = self.b2 * self.v + (1 - self.b2) * r * r
        k = self.t - self.last + 1 if self.on_refresh == "reset" else self.t
        n = (self.m / (1 - self.b1**k)) / ((self.v / (1 - self.b2**k)).sqrt() + self.eps)
        if self.scale_type == "channel":
            axis = 1 if self.side == "right" else 0
            s = n.norm(dim=axis, keepdim=True) / (r.norm(dim=axis, keepdim=True) + 1e-8)
        else:
            s = n.norm() / (r.norm() + 1e-8)
        u = s * g
        norm = float(u.norm())
        if self.previous is not None and norm / (self.previous + 1e-8) > 1.01:
            u = u * (1.01 / (norm / (self.previous + 1e-8)))
        self.previous = float(u.norm())
        self.w = self.w * (1 - self.lr * self.wd) - self.lr * self.scale**0.5 * u
        return self.w


class AdamWReference:
    """torch.optim.AdamW(foreach=False) on a copy of one tensor."""

    def __init__(self, weight: Tensor, hyper: dict[str, Any]) -> None:
        self.w = torch.nn.Parameter(weight.detach().clone())
        self.opt = torch.optim.AdamW([self.w], foreach=False, fused=False, **hyper)

    def step(self, grad: Tensor) -> Tensor:
        self.w.grad = grad.clone()
        self.opt.step()
        return self.w.detach()


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

#: Group values each low-rank key must reject, with the key named in the message.
GALORE_INVALID_GROUP_VALUES: dict[str, list[Any]] = {
    "rank": [0, -1, 1.5, True, "2"],
    "update_proj_gap": [0, -3, 2.0],
    "scale": [0, -0.5, math.nan, math.inf],
    "proj_type": ["diag", None],
    "projector": ["qr", ""],
    "on_refresh": ["drop", None],
    "seed": [1.5, True, "0"],
}


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer configuration the contract runs over.

    Attributes:
        id: pytest id.
        factory: ``factory(matrices, others, lowrank, **hyper)`` → optimizer. ``matrices`` and
            ``others`` are lists of tensors or of ``(name, tensor)`` pairs, ``lowrank`` the
            low-rank group keys for ``matrices``, ``hyper`` AdamW's keywords.
        lowrank: the low-rank group keys used for ``matrices`` (empty: plain optimizer).
        reference: ``reference(weight, hyper)`` → object whose ``step(grad)`` returns the new
            weight, for a 2-D weight in ``matrices`` (fp64, independent implementation).
        invalid_group_values: group key → values the optimizer must reject naming the key.
        adam_family, lr_linear: which AdamW-specific contract tests apply.
    """

    id: str
    factory: Callable[..., torch.optim.Optimizer]
    lowrank: dict[str, Any] = field(default_factory=dict)
    reference: Callable[[Tensor, dict[str, Any]], Any] | None = None
    invalid_group_values: dict[str, list[Any]] = field(default_factory=dict)
    #: AdamW family: plain groups equal torch.optim.AdamW, groups have betas/eps, state exp_avg(_sq).
    adam_family: bool = True
    #: Each step's change is exactly lr × something lr-independent (no momentum over past lrs,
    #: no lr-free parameter scale), so LambdaLR must scale updates exactly.
    lr_linear: bool = True

    @property
    def refresh_gap(self) -> int | None:
        return self.lowrank.get("update_proj_gap") if self.lowrank else None

    def make(
        self,
        matrices: Sequence[Any],
        others: Sequence[Any] = (),
        *,
        lowrank: dict[str, Any] | None = None,
        **hyper: Any,
    ) -> torch.optim.Optimizer:
        """Build the optimizer; ``lowrank`` overrides some of the case's low-rank group keys."""
        return self.factory(list(matrices), list(others), {**self.lowrank, **(lowrank or {})}, **hyper)

    def __repr__(self) -> str:
        return self.id


def galore_case(
    case_id: str,
    *,
    optimizer: Callable[..., torch.optim.Optimizer] = GaLoreAdamW,
    reference_class: type[GaLoreReference] = GaLoreReference,
    invalid_values: dict[str, list[Any]] | None = None,
    exact: bool = True,
    **lowrank: Any,
) -> OptimizerCase:
    """A case of an Adam-family low-rank optimizer; ``lowrank`` empty means every group is plain AdamW.

    ``exact=False`` (quantized states): the AdamW-exactness tests and the LambdaLR linearity test
    do not apply; everything else in the contract does.
    """

    def factory(
        matrices: list[Any], others: list[Any], keys: dict[str, Any], **hyper: Any
    ) -> torch.optim.Optimizer:
        groups = []
        if matrices:
            groups.append({"params": matrices, **keys})
        if others:
            groups.append({"params": others})
        return optimizer(groups, **hyper)

    if lowrank:

        def reference(weight: Tensor, hyper: dict[str, Any]) -> Any:
            return reference_class(weight, hyper, lowrank)

        invalid = invalid_values if invalid_values is not None else GALORE_INVALID_GROUP_VALUES
    else:
        reference, invalid = AdamWReference, {}
    return OptimizerCase(
        case_id, factory, dict(lowrank), reference, invalid, adam_family=exact, lr_linear=exact
    )


_LOWRANK = {"rank": 2, "update_proj_gap": 3}
_LOWRANK_GAP = {"update_proj_gap": 3}
_APOLLO: dict[str, Any] = {
    "optimizer": ApolloAdamW,
    "reference_class": ApolloReference,
    "invalid_values": {
        **{k: v for k, v in GALORE_INVALID_GROUP_VALUES.items() if k != "projector"},
        "proj_type": ["diag", None, "full"],
        "scale_type": ["row", None],
        "proj": ["qr", ""],
    },
}
_FIRA: dict[str, Any] = {
    "optimizer": FiraAdamW,
    "reference_class": FiraReference,
    "invalid_values": {**GALORE_INVALID_GROUP_VALUES, "proj_type": ["diag", None, "full"]},
}

OPTIMIZERS: list[OptimizerCase] = [
    galore_case("GaLoreAdamW-plain"),
    galore_case("GaLoreAdamW-lowrank", **_LOWRANK),  # defaults: randomized projector, "project"
    galore_case("GaLoreAdamW-svd-keep", **_LOWRANK, projector="svd", on_refresh="keep"),
    galore_case("GaLoreAdamW-svd-project", **_LOWRANK, projector="svd", on_refresh="project", scale=1.0),
    galore_case("GaLoreAdamW-randomized-reset", **_LOWRANK, projector="randomized", on_refresh="reset"),
    galore_case("GaLoreAdamW-randomized-keep", **_LOWRANK, projector="randomized", on_refresh="keep"),
    galore_case(
        "GaLoreAdamW-full-svd-reset", **_LOWRANK, proj_type="full", projector="svd", on_refresh="reset"
    ),
    galore_case("GaLoreAdamW-reverse_std", **_LOWRANK, proj_type="reverse_std", on_refresh="project"),
    galore_case("FiraAdamW-plain", optimizer=FiraAdamW),
    galore_case("FiraAdamW-lowrank", **_FIRA, **_LOWRANK),
    galore_case(
        "FiraAdamW-svd-keep-alpha",
        **{**_FIRA, "invalid_values": {k: v for k, v in _FIRA["invalid_values"].items() if k != "scale"}},
        **_LOWRANK,
        projector="svd",
        on_refresh="keep",
        alpha=1.0,
    ),
    galore_case("FiraAdamW-left-reset", **_FIRA, **_LOWRANK, proj_type="left", on_refresh="reset"),
    galore_case("ApolloAdamW-plain", optimizer=ApolloAdamW),
    *galore_adafactor_cases(),
    # 8-bit states on the tiny test tensors: min_8bit_size=1 quantizes every moment.
    galore_case(
        "GaLoreAdamW8bit-plain", optimizer=functools.partial(GaLoreAdamW8bit, min_8bit_size=1), exact=False
    ),
    galore_case(
        "GaLoreAdamW8bit-lowrank",
        optimizer=functools.partial(GaLoreAdamW8bit, min_8bit_size=1),
        exact=False,
        **_LOWRANK,
    ),
    galore_case(
        "FiraAdamW-int8-left",
        optimizer=functools.partial(FiraAdamW, state_dtype="int8", min_8bit_size=1),
        exact=False,
        invalid_values={**GALORE_INVALID_GROUP_VALUES, "proj_type": ["diag", None, "full"]},
        **_LOWRANK,
        proj_type="left",
    ),
    galore_case("ApolloAdamW-channel", **_APOLLO, **_LOWRANK),
    galore_case("ApolloAdamW-mini", **_APOLLO, **_LOWRANK_GAP, **APOLLO_MINI),
    galore_case("ApolloAdamW-left-reset", **_APOLLO, **_LOWRANK, proj_type="left", on_refresh="reset"),
    galore_case(
        "ApolloAdamW-svd-project", **_APOLLO, **_LOWRANK, proj="svd", on_refresh="project", scale=4.0
    ),
    galore_case(
        "ApolloAdamW-reverse_std-tensor", **_APOLLO, **_LOWRANK, proj_type="reverse_std", scale_type="tensor"
    ),
]

LOWRANK_OPTIMIZERS = [case for case in OPTIMIZERS if case.lowrank]
ADAM_OPTIMIZERS = [case for case in OPTIMIZERS if case.adam_family]

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

MATRIX_SHAPES = {"tall": (10, 6), "wide": (5, 9)}
OTHER_SHAPES = {"bias": (6,), "norm": (9,)}


def make_params(
    dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.nn.Parameter]]:
    """Tiny named parameters: (matrices, others)."""
    gen = torch.Generator().manual_seed(seed)

    def new(shape: tuple[int, ...]) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))

    return {k: new(s) for k, s in MATRIX_SHAPES.items()}, {k: new(s) for k, s in OTHER_SHAPES.items()}


def clone_params(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    return {k: torch.nn.Parameter(p.detach().clone()) for k, p in params.items()}


def grad_for(name: str, shape: tuple[int, ...], step: int, dtype: torch.dtype) -> Tensor:
    """A deterministic gradient for parameter ``name`` at ``step`` (independent of everything else)."""
    seed = step * 1009 + sum(ord(c) * 31**i for i, c in enumerate(name)) % 100_003
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def set_grads(params: dict[str, Tensor], step: int) -> None:
    for name, p in params.items():
        p.grad = grad_for(name, tuple(p.shape), step, p.dtype)


def save_load(obj: Any) -> Any:
    """torch.save → torch.load(weights_only=True): what a checkpoint round trip does."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Nested equality where tensors must match bitwise, in dtype and in shape."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), f"{path}: {type(b).__name__} is not a Tensor"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"  # NaN == NaN here


def state_of(opt: torch.optim.Optimizer, param: Tensor) -> dict[str, Tensor]:
    return opt.state[param] if param in opt.state else {}
