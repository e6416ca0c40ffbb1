"""FiraAdamW: GaLore's low-rank Adam plus the norm-scaled full-rank residual of the gradient."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lowmem.optim import sharded
from lowmem.optim.functional.fira import lowrank_fira_update
from lowmem.optim.lowrank_adam import AdamLowRankOptimizer
from lowmem.optim.projector import Side

__all__ = ["FiraAdamW"]


class FiraAdamW(AdamLowRankOptimizer):
    r"""Fira (Chen et al. 2024, arXiv:2410.01623): full-rank training under GaLore's memory.

    GaLore throws away the part of the gradient outside the r-dimensional subspace. Fira keeps
    it: the residual G − back(R) is added to the update, scaled channel by channel with the
    ratio by which Adam rescaled that channel inside the subspace, and its norm may grow by at
    most γ = 1.01 per step (the norm-growth limiter, against loss spikes)::

        R = project(G) ;  N = AdamDirection(R)          # as GaLoreAdamW: moments are r-shaped
        s = ‖N‖_channel / (‖R‖_channel + 1e-8)         # per row of G (std, m >= n) or column
        S = c · s ⊙ (G − back(R))                       # c from the norm-growth limiter
        W ← (1 − lr·wd) · W − lr · (scale · back(N) + S)

    Memory: GaLoreAdamW's (2·m·r moment elements + the n×r basis for an m×n weight, m >= n)
    plus one scalar. Nothing m×n is allocated (see :func:`lowrank_fira_update`).

    Param groups take GaLoreAdamW's keys (``rank``, ``update_proj_gap``, ``scale``,
    ``proj_type``, ``projector``, ``on_refresh``, ``seed``; same defaults) and fira's ``alpha``
    as another name for ``scale``, so ``fira.FiraAdamW`` user code ports by changing the import.
    ``proj_type="full"`` is rejected: a channel needs one side left unprojected.

    How this differs from the fira package: the residual is the true orthogonal complement
    G − back(R), independent of ``scale`` (fira subtracts scale·back(R), so with scale 0.25 three
    quarters of the in-subspace gradient re-enter as "residual", scaled by s instead of by
    Adam); eps after bias correction and weight decay before the update (torch.optim.AdamW's
    conventions; fira uses the legacy HuggingFace AdamW); the limiter keeps its old norm when a
    step's norm is not finite; plus everything GaLoreAdamW fixes (tensor-only state, resumes
    bit-for-bit, rank >= min(m, n), conv weights, NaN at a refresh, LR schedulers).

    Args: as :class:`lowmem.optim.GaLoreAdamW`.
    """

    proj_types: ClassVar[tuple[str, ...]] = ("std", "reverse_std", "left", "right")
    key_aliases: ClassVar[dict[str, str]] = {"alpha": "scale"}

    def _init_state(
        self, state: dict[str, Any], param: Tensor, group: dict[str, Any], side: Side | None, shape: tuple
    ) -> None:
        super()._init_state(state, param, group, side, shape)
        if side is not None:
            # ‖S‖ of the previous step after limiting; negative: no previous step yet.
            dtype = torch.promote_types(param.dtype, torch.float32)  # fp64 for fp64 weights
            state["residual_norm"] = torch.tensor(-1.0, dtype=dtype, device=param.device)

    def _keeps_state_dtype(self, key: str, value: Tensor, group: dict[str, Any]) -> bool:
        return key == "residual_norm" or super()._keeps_state_dtype(key, value, group)

    def _lowrank_step(
        self,
        weight: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        side: Side,
        moment_step: int,
    ) -> None:
        lowrank_fira_update(
            weight,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state.get("proj_left"),
            state.get("proj_right"),
            state["residual_norm"],
            side=side,
            scale=float(group["scale"]),
            **self._adam_hyper(group, moment_step),
            absmax=self._absmax(state),
            reduce_sum=sharded.reduce_sum_of(self),  # FSDP2: ‖S‖ over every rank's rows
        )
