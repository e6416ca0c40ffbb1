"""ApolloAdamW: SGD-like memory — a low-rank Adam state only sets scaling factors for the raw gradient."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lowmem.optim import sharded
from lowmem.optim._checks import check_choice
from lowmem.optim.functional.apollo import lowrank_apollo_update
from lowmem.optim.lowrank_adam import AdamLowRankOptimizer
from lowmem.optim.projector import Side, compute_basis, gaussian_projection, stable_seed

__all__ = ["APOLLO_DEFAULTS", "APOLLO_MINI", "ApolloAdamW", "apollo_seed"]

#: Defaults for groups that set ``rank`` (apollo-torch's keys).
APOLLO_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 1.0,
    "scale_type": "channel",
    "proj": "random",
    "proj_type": "std",
    "on_refresh": "keep",
    "seed": 0,
}

#: APOLLO-Mini (Zhu et al. 2024): rank 1, one tensor-wise factor, update scaled by √128.
#: Use as ``{"params": matrices, **APOLLO_MINI}``.
APOLLO_MINI: dict[str, Any] = {"rank": 1, "scale_type": "tensor", "scale": 128.0, "proj": "random"}


def apollo_seed(group_seed: int, shape: tuple[int, ...], ordinal: int) -> int:
    """The first projection seed of a parameter: the ``ordinal``-th of its shape in the optimizer.

    Same-shaped layers get different projections (ordinal 0, 1, 2, ... in param-group order),
    and adding a parameter of another shape changes no one else's seed.
    """
    return stable_seed(group_seed, (*shape, ordinal), 0)


class ApolloAdamW(AdamLowRankOptimizer):
    r"""APOLLO (Zhu et al. 2024, arXiv:2412.05270): AdamW-level training at SGD-like memory.

    Adam runs on a random low-rank projection of each weight's gradient, but its result is only
    used to estimate how much Adam would rescale each channel; the update is the raw gradient
    with those factors applied::

        R = project(G)   (random Gaussian P, regenerated from a seed; refreshed every gap steps)
        N = AdamDirection(R)                       # moments: r-shaped, like GaLore
        s = ‖N‖ / (‖R‖ + 1e-8), per channel (scale_type="channel") or per tensor ("tensor")
        W ← (1 − lr·wd) · W − lr · √scale · c · (s ⊙ G)    # c: norm-growth limiter, γ = 1.01

    A channel is a row of G when the projection is on the right (``proj_type="std"`` with
    m >= n) and a column when it is on the left.

    Memory per m×n weight (m >= n, ``std``): 2·m·r moment elements plus three scalars (step,
    seed, previous update norm). The projection matrix is never stored: it is regenerated from
    the seed each step (an r×n Gaussian draw, negligible next to the GEMM). APOLLO-Mini
    (``APOLLO_MINI``: rank 1, tensor-wise, scale 128) keeps 2·m elements per weight.

    Param-group keys (apollo-torch's, so its user code ports by changing the import):
    ``rank``; ``update_proj_gap`` (200); ``scale`` (1.0; the update is multiplied by √scale as in
    apollo-torch); ``scale_type`` (``"channel"`` | ``"tensor"``); ``proj`` (``"random"`` |
    ``"svd"``: GaLore's exact top-r basis instead); ``proj_type`` (``std``, ``reverse_std``,
    ``left``, ``right``). Ours: ``on_refresh`` (``"keep"``: apollo-torch; ``"reset"``: momentum
    reset, Glentis et al. 2025; ``"project"``: only with ``proj="svd"``, where bases are
    orthonormal), ``seed`` (int, 0).

    How this differs from apollo-torch: the projection seed is a tensor in the state (apollo-torch
    pickles a projector object), so ``torch.load(weights_only=True)`` works and resumes continue
    bit-for-bit; the first seed depends on the parameter's shape and its ordinal among
    same-shaped parameters, not on a shared counter; eps after bias correction and decay before
    the update (torch.optim.AdamW; apollo-torch uses the legacy HuggingFace AdamW); rank >=
    min(m, n), conv weights and every ``proj_type`` orientation work; NaN gradients stay contained.

    Args: as :class:`lowmem.optim.GaLoreAdamW`.
    """

    lowrank_defaults: ClassVar[dict[str, Any]] = APOLLO_DEFAULTS
    proj_types: ClassVar[tuple[str, ...]] = ("std", "reverse_std", "left", "right")
    cpu_state_keys: ClassVar[tuple[str, ...]] = ("last_refresh", "proj_seed")

    def _check_lowrank_keys(self, group: dict[str, Any]) -> None:
        check_choice("scale_type", group["scale_type"], ("channel", "tensor"))
        check_choice("proj", group["proj"], ("random", "svd"))
        if group["on_refresh"] == "project" and group["proj"] != "svd":
            raise ValueError(
                "Invalid on_refresh: 'project' needs orthonormal bases; use proj='svd' with it, "
                "or on_refresh='keep' / 'reset' with random projections"
            )

    def _ordinal(self, param: Tensor) -> int:
        """How many parameters of the same shape come before ``param`` in the param groups."""
        count = 0
        for group in self.param_groups:
            for other in group["params"]:
                if other is param:
                    return count
                count += other.shape == param.shape
        return count

    def _init_state(
        self, state: dict[str, Any], param: Tensor, group: dict[str, Any], side: Side | None, shape: tuple
    ) -> None:
        super()._init_state(state, param, group, side, shape)
        if side is not None:
            # FSDP2: param is a rank's rows; the seed comes from the whole parameter, as on one process.
            param_ = sharded.global_param(self, param)
            seed = apollo_seed(group["seed"], tuple(param_.shape), self._ordinal(param_))
            state["proj_seed"] = torch.tensor(seed, dtype=torch.int64)
            dtype = torch.promote_types(param.dtype, torch.float32)
            # ‖update‖ of the previous step after limiting; negative: no previous step yet.
            state["update_norm"] = torch.tensor(-1.0, dtype=dtype, device=param.device)

    def _keeps_state_dtype(self, key: str, value: Tensor, group: dict[str, Any]) -> bool:
        return key == "update_norm" or super()._keeps_state_dtype(key, value, group)

    # ----------------------------------------------------------------- projection
    def _basis(self, state: dict[str, Any], group: dict[str, Any], grad: Tensor, side: Side):
        if group["proj"] == "random":
            seed = int(state["proj_seed"].item())
            return gaussian_projection(tuple(grad.shape), group["rank"], side, seed=seed, like=grad)
        return state.get("proj_left"), state.get("proj_right")

    def _new_basis(self, grad, group, state, side, step, old):  # type: ignore[no-untyped-def]
        return compute_basis(grad, group["rank"], side, "svd", warm_left=old[0], warm_right=old[1])

    def _refresh_reads_grad(self, group: dict[str, Any]) -> bool:
        # A random refresh reads only the gradient's finiteness and shape: FSDP2 shards are not
        # gathered for it (optim/sharded.py).
        return group["proj"] != "random"

    def _refresh(
        self, grad: Tensor, group: dict[str, Any], state: dict[str, Any], side: Side, step: int
    ) -> None:
        if group["proj"] != "random":
            super()._refresh(grad, group, state, side, step)
            return
        # A random projection does not look at the gradient, but a non-finite gradient still
        # postpones the refresh to the next step, as in every lowmem low-rank optimizer, so the
        # moments are not reset on a step whose statistics are garbage. The first projection
        # comes from the initial seed; later ones from a new seed. FSDP2: ``grad`` is this rank's
        # rows; finiteness and shape are the whole gradient's, so every rank decides alike.
        if not sharded.all_finite(self, grad):
            return
        if int(state["last_refresh"].item()) >= 0:
            shape = sharded.global_shape(self, grad)
            state["proj_seed"].fill_(stable_seed(int(state["proj_seed"].item()), shape, step))
            if group["on_refresh"] == "reset":
                self._reset_moments(state)
        state["last_refresh"].fill_(step)

    def _lowrank_step(
        self,
        weight: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        side: Side,
        moment_step: int,
    ) -> None:
        left, right = self._basis(state, group, grad, side)
        lowrank_apollo_update(
            weight,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            left,
            right,
            state["update_norm"],
            side=side,
            scale_type=group["scale_type"],
            scale=float(group["scale"]),
            **self._adam_hyper(group, moment_step),
            absmax=self._absmax(state),
            reduce_sum=sharded.reduce_sum_of(self),  # FSDP2: whole-matrix norms over every rank's rows
        )
