"""An independent fp64 GaLore-Adafactor reference, and the adapters that enter GaLoreAdafactor in
the shared optimizer contract (contract.py / test_contract.py).

The reference is written from the papers (Shazeer & Stern 2018, Algorithm 4 with update
clipping, relative step and parameter scale; Zhao et al. 2024, Algorithm 2) and lowmem's
documented conventions: α_t uses RMS of the full weight and the training step, β2_t restarts
after a ``"reset"`` refresh, ``"project"`` carries the first moment with the basis change and
the second moment as the carried rank-1 estimate. Everything is materialized: V̂ as an explicit
outer product, the update divided by its square root, no in-place tricks, no fusion.

contract.py imports this module, and this module needs contract.py's ``OptimizerCase`` and
``reference_basis``: those are imported inside functions, so either module may be imported first.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from contract import OptimizerCase

#: transformers.optimization.Adafactor's defaults (and GaLoreAdafactor's).
ADAFACTOR_DEFAULTS: dict[str, Any] = {
    "lr": None,
    "eps": (1e-30, 1e-3),
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "beta1": None,
    "weight_decay": 0.0,
    "scale_parameter": True,
    "relative_step": True,
    "warmup_init": False,
    "maximize": False,
}


def _rms(x: Tensor) -> float:
    return math.sqrt(float((x * x).mean()))


class GaLoreAdafactorReference:
    """GaLore-Adafactor on one 2-D weight in fp64, the plain way.

    ``hyper``: GaLoreAdafactor's keywords (missing ones take Adafactor's defaults); ``lowrank``:
    the low-rank group keys (``rank`` required). ``step(grad)`` returns the new weight.
    """

    def __init__(self, weight: Tensor, hyper: dict[str, Any], lowrank: dict[str, Any]) -> None:
        h = {**ADAFACTOR_DEFAULTS, **hyper}
        self.w = weight.detach().to(torch.float64).clone()
        self.lr = float(h["lr"]) if h["lr"] is not None else None
        self.eps1, self.eps2 = h["eps"]
        self.clip = h["clip_threshold"]
        self.decay = h["decay_rate"]
        self.beta1 = h["beta1"]
        self.wd = h["weight_decay"]
        self.scale_parameter = h["scale_parameter"]
        self.relative_step = h["relative_step"]
        self.warmup_init = h["warmup_init"]
        self.maximize = h["maximize"]
        self.rank = lowrank["rank"]
        self.gap = lowrank.get("update_proj_gap", 200)
        self.scale = lowrank.get("scale", 0.25)
        self.on_refresh = lowrank.get("on_refresh", "project")
        m, n = weight.shape
        proj_type = lowrank.get("proj_type", "std")
        self.side = {
            "std": "right" if m >= n else "left",
            "reverse_std": "left" if m >= n else "right",
        }.get(proj_type, proj_type)
        self.t = 0
        self.last: int | None = None
        self.p: Tensor | None = None
        self.q: Tensor | None = None
        self.row: Tensor | None = None  # mean over R's columns of the EMA of R² + eps1
        self.col: Tensor | None = None  # mean over R's rows
        self.m: Tensor | None = None

    def _project(self, g: Tensor) -> Tensor:
        if self.q is not None:
            g = g @ self.q.T
        if self.p is not None:
            g = self.p.T @ g
        return g

    def _back(self, u: Tensor) -> Tensor:
        if self.q is not None:
            u = u @ self.q
        if self.p is not None:
            u = self.p @ u
        return u

    def _refresh(self, grad: Tensor) -> None:
        from contract import reference_basis

        p, q = reference_basis(grad, self.rank, self.side, (self.p, self.q))
        if self.row is not None and self.on_refresh == "project":
            # Carry V̂ = row colᵀ / mean(row) like a full second moment, then refactor it exactly.
            v = torch.outer(self.row, self.col) / self.row.mean()
            if q is not None:
                turn = self.q @ q.T
                v = v @ turn**2
                self.m = self.m @ turn if self.m is not None else None
            if p is not None:
                turn = p.T @ self.p
                v = turn**2 @ v
                self.m = turn @ self.m if self.m is not None else None
            self.row, self.col = v.mean(dim=1), v.mean(dim=0)
        self.p, self.q, self.last = p, q, self.t
        if self.row is None or self.on_refresh == "reset":
            rows, cols = self._project(grad).shape
            self.row = torch.zeros(rows, dtype=torch.float64)
            self.col = torch.zeros(cols, dtype=torch.float64)
            self.m = torch.zeros(rows, cols, dtype=torch.float64) if self.beta1 is not None else None

    def step(self, grad: Tensor) -> Tensor:
        grad = grad.to(torch.float64)
        self.t += 1
        if self.last is None or self.t - self.last >= self.gap:
            self._refresh(grad)
        k = self.t - self.last + 1 if self.on_refresh == "reset" else self.t
        if self.relative_step:
            rho = min(1e-6 * self.t if self.warmup_init else 1e-2, 1 / math.sqrt(self.t))
        else:
            rho = self.lr
        alpha = max(self.eps2, _rms(self.w)) * rho if self.scale_parameter else rho
        beta2 = 1 - k**self.decay
        r = self._project(-grad if self.maximize else grad)
        s = r * r + self.eps1
        self.row = beta2 * self.row + (1 - beta2) * s.mean(dim=1)
        self.col = beta2 * self.col + (1 - beta2) * s.mean(dim=0)
        v_hat = torch.outer(self.row, self.col) / self.row.mean()
        u = r / v_hat.sqrt()
        u = u / max(1.0, _rms(u) / self.clip)
        u = alpha * u
        if self.beta1 is not None:
            self.m = self.beta1 * self.m + (1 - self.beta1) * u
            u = self.m
        self.w = self.w - self.wd * alpha * self.w - self.scale * self._back(u)
        return self.w


class TransformersAdafactorReference:
    """``transformers.optimization.Adafactor`` on a copy of one tensor (``hyper``: its keywords)."""

    def __init__(self, weight: Tensor, hyper: dict[str, Any]) -> None:
        from transformers.optimization import Adafactor

        hyper = dict(hyper)
        self.sign = -1.0 if hyper.pop("maximize", False) else 1.0
        self.w = torch.nn.Parameter(weight.detach().clone())
        self.opt = Adafactor([self.w], **hyper)

    def step(self, grad: Tensor) -> Tensor:
        self.w.grad = grad.clone() if self.sign > 0 else -grad
        self.opt.step()
        return self.w.detach()


# ---------------------------------------------------------------------------------------------
# The contract adapters: the suite passes AdamW's keywords (lr, betas, eps, weight_decay,
# maximize); Adafactor has no β2 (decay_rate plays its part) and its eps is a pair.
# ---------------------------------------------------------------------------------------------


def adafactor_kwargs(hyper: dict[str, Any], fixed: dict[str, Any], first_moment: bool) -> dict[str, Any]:
    """GaLoreAdafactor keywords for the contract's AdamW-style ``hyper``.

    ``lr``, ``weight_decay`` and ``maximize`` pass through; ``eps`` becomes ``(eps, 1e-3)``
    (eps1, so a negative eps still reaches validation); ``betas[0]`` becomes ``beta1`` when
    ``first_moment``, ``betas[1]`` is dropped. ``fixed`` (the case's own Adafactor options) is
    applied first; the external lr needs ``relative_step=False``, the default here.
    """
    out: dict[str, Any] = {"lr": 1e-3, "relative_step": False, "scale_parameter": False, **fixed}
    for key, value in hyper.items():
        if key == "betas":
            if first_moment:
                out["beta1"] = value[0]
        elif key == "eps":
            out["eps"] = (value, 1e-3)
        else:
            out[key] = value
    return out


def galore_adafactor_case(
    case_id: str, adafactor: dict[str, Any] | None = None, *, first_moment: bool = False, **lowrank: Any
) -> OptimizerCase:
    """A contract case for GaLoreAdafactor; ``lowrank`` empty means every group is plain Adafactor.

    ``adafactor``: fixed GaLoreAdafactor options for the case (e.g. ``scale_parameter=True``);
    ``first_moment``: use the contract's ``betas[0]`` as ``beta1``.
    """
    from contract import GALORE_INVALID_GROUP_VALUES, OptimizerCase

    fixed = dict(adafactor or {})

    def factory(
        matrices: list[Any], others: list[Any], keys: dict[str, Any], **hyper: Any
    ) -> torch.optim.Optimizer:
        from lowmem.optim.galore_adafactor import GaLoreAdafactor

        groups = []
        if matrices:
            groups.append({"params": matrices, **keys})
        if others:
            groups.append({"params": others})
        return GaLoreAdafactor(groups, **adafactor_kwargs(hyper, fixed, first_moment))

    if lowrank:

        def reference(weight: Tensor, hyper: dict[str, Any]) -> Any:
            return GaLoreAdafactorReference(weight, adafactor_kwargs(hyper, fixed, first_moment), lowrank)

        invalid = GALORE_INVALID_GROUP_VALUES
    else:

        def reference(weight: Tensor, hyper: dict[str, Any]) -> Any:
            return TransformersAdafactorReference(weight, adafactor_kwargs(hyper, fixed, first_moment))

        invalid = {}
    # No first moment and no parameter scale: each step's change is exactly lr × a fixed direction.
    lr_linear = not first_moment and not fixed.get("scale_parameter", False)
    return OptimizerCase(
        case_id, factory, dict(lowrank), reference, invalid, adam_family=False, lr_linear=lr_linear
    )


def galore_adafactor_cases() -> list[OptimizerCase]:
    """The GaLoreAdafactor entries for contract.OPTIMIZERS (rank 2, refresh every 3 steps)."""
    lowrank = {"rank": 2, "update_proj_gap": 3}
    return [
        galore_adafactor_case("GaLoreAdafactor-plain"),
        # defaults: randomized projector, on_refresh="project"; no first moment, external lr
        galore_adafactor_case("GaLoreAdafactor-lowrank", **lowrank),
        galore_adafactor_case(
            "GaLoreAdafactor-svd-keep-beta1-scaled",
            {"scale_parameter": True, "clip_threshold": 0.5},
            first_moment=True,
            **lowrank,
            projector="svd",
            on_refresh="keep",
        ),
        galore_adafactor_case(
            "GaLoreAdafactor-full-reset-beta1",
            first_moment=True,
            **lowrank,
            proj_type="full",
            projector="svd",
            on_refresh="reset",
        ),
        galore_adafactor_case(
            "GaLoreAdafactor-reverse_std-project-beta1",
            first_moment=True,
            **lowrank,
            proj_type="reverse_std",
            on_refresh="project",
            scale=1.0,
        ),
    ]
