"""GaLoreAdafactor: Adafactor whose factored second moment lives in a low-rank gradient subspace."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lowmem.optim import sharded
from lowmem.optim.functional.adafactor import (
    adafactor_update,
    compute_dtype,
    lowrank_adafactor_update,
    transport_factored_moments,
)
from lowmem.optim.lowrank_base import LowRankOptimizer, matrix_shape
from lowmem.optim.projector import Side, lowrank_shape

__all__ = ["GaLoreAdafactor", "check_adafactor_hyperparameters"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_adafactor_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ValueError for Adafactor hyperparameters that cannot work, naming the key and the fix.

    Covers what ``transformers.optimization.Adafactor`` rejects (a manual lr with
    ``relative_step=True``, ``warmup_init`` without ``relative_step``) and what it would only
    fail on later or silently misuse (no lr without ``relative_step``, negative values, β1 >= 1).
    """
    lr, relative_step = group["lr"], group["relative_step"]
    for key in ("relative_step", "scale_parameter", "warmup_init", "maximize"):
        if not isinstance(group.get(key, False), bool):
            raise ValueError(f"Invalid {key}: {group[key]!r}; it must be True or False")
    if lr is not None and relative_step:
        raise ValueError(
            f"Invalid learning rate: lr={lr} cannot be combined with relative_step=True, which "
            "computes its own step size min(1e-2, 1/sqrt(t)); pass relative_step=False (and usually "
            "scale_parameter=False) to use an external lr, or leave lr=None"
        )
    if lr is None and not relative_step:
        raise ValueError(
            "Invalid learning rate: None; relative_step=False needs an external lr (e.g. lr=1e-3), "
            "or set relative_step=True for Adafactor's own step size"
        )
    if lr is not None:
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
            lr = float(lr.item())
        if not _is_number(lr) or math.isnan(lr) or lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
    if group["warmup_init"] and not relative_step:
        raise ValueError(
            "Invalid warmup_init: True requires relative_step=True (it shapes the relative step size "
            "min(1e-6·t, 1/sqrt(t))); set relative_step=True or warmup_init=False"
        )
    eps = group["eps"]
    if not isinstance(eps, Sequence) or isinstance(eps, str) or len(eps) != 2:
        raise ValueError(
            f"Invalid epsilon value: {eps!r}; Adafactor's eps is a pair (eps1 added to grad², eps2 the "
            "floor of the parameter scale), e.g. (1e-30, 1e-3)"
        )
    for index, value in enumerate(eps):
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"Invalid epsilon value at index {index}: {value!r}; it must be a finite number >= 0"
            )
    clip = group["clip_threshold"]
    if not _is_number(clip) or math.isnan(clip) or clip <= 0:
        raise ValueError(
            f"Invalid clip_threshold: {clip!r}; it must be > 0 "
            "(the paper uses 1.0; math.inf disables clipping)"
        )
    decay = group["decay_rate"]
    if not _is_number(decay) or not math.isfinite(decay) or decay > 0:
        raise ValueError(
            f"Invalid decay_rate: {decay!r}; it must be <= 0 (β2 at step t is 1 - t^decay_rate, "
            "which must stay in [0, 1); the paper uses -0.8)"
        )
    beta1 = group["beta1"]
    if beta1 is not None and (not _is_number(beta1) or not 0.0 <= beta1 < 1.0):
        raise ValueError(f"Invalid beta1: {beta1!r}; pass None (no first moment) or a number in [0, 1)")
    weight_decay = group["weight_decay"]
    if not _is_number(weight_decay) or not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class GaLoreAdafactor(LowRankOptimizer):
    r"""Adafactor (Shazeer & Stern 2018, arXiv:1804.04235) with GaLore gradient low-rank projection
    (Zhao et al., ICML 2024, arXiv:2403.03507).

    A drop-in for ``transformers.optimization.Adafactor`` and for galore-torch's
    ``GaLoreAdafactor``: the constructor takes the same arguments with the same defaults and
    validation. Param groups without ``rank`` are ``transformers.optimization.Adafactor`` exactly
    (bitwise on CPU): factored second moment over the last two dims for tensors with >= 2 dims,
    the full one otherwise, update clipping to RMS <= ``clip_threshold``, the relative step size
    min(1e-2, 1/sqrt(t)) when ``relative_step``, times max(eps2, RMS(W)) when
    ``scale_parameter``, an optional β1 EMA of the update, and weight decay ``W -= wd·α_t·W``.

    Groups with ``rank`` project each weight's gradient G (m×n; conv weights as their
    (out, in·k·k) matricization) to R (m×r for m >= n with ``proj_type="std"``), run the
    Adafactor update on R with factored row and column moments of that m×r matrix, and apply
    ``W ← (1 - wd·α_t) W - scale · back(U)``. α_t uses RMS of the full weight and the training
    step; see :func:`lowmem.optim.functional.adafactor.lowrank_adafactor_update`.

    Memory: for an m×n weight with m >= n and ``proj_type="std"`` (right projection) at rank r,
    the state is ``m + r`` second-moment numbers (plus ``m·r`` for the first moment when
    ``beta1`` is set), the r×n basis, and two scalars (``step``, ``last_refresh``). Adafactor
    on the full weight keeps m + n (+ m·n); GaLore-AdamW 2·m·r.

    State layout (tensors only; ``torch.load(weights_only=True)`` round-trips it bit-for-bit):

    - ``step``: float32 0-d CPU tensor, the training step.
    - ``exp_avg_sq_row`` / ``exp_avg_sq_col``: the factored second moment: shapes ``shape[:-1]``
      and ``shape[:-2] + shape[-1:]`` of the parameter (plain) or of R (low-rank: (m,), (r,)
      for a right projection); ``exp_avg_sq`` (the parameter's shape) for 1-D and 0-d tensors.
    - ``exp_avg``: first moment (the parameter's or R's shape), only when ``beta1`` is set.
    - ``proj_left`` (m×r) / ``proj_right`` (r×n): the basis, in the parameter's dtype.
    - ``last_refresh``: int64 0-d CPU tensor, the step of the last refresh (-1: none yet).

    Moments are fp32 for fp16/bf16 parameters (as in transformers) and the update is computed in
    fp32; other dtypes keep theirs. Loading a state dict keeps every state tensor's saved dtype
    (torch.optim would cast fp32 moments of a bf16 model to bf16).

    Param-group keys for low-rank groups (galore-torch's, so its user code ports by changing the
    import): ``rank``, ``update_proj_gap`` (200), ``scale`` (0.25), ``proj_type`` ("std"); and
    ours, as in :class:`lowmem.optim.GaLoreAdamW`: ``projector`` ("randomized" or "svd"),
    ``seed`` (0), and ``on_refresh``, what a refresh does to the moments:

    - ``"keep"`` (galore-torch): nothing; they stay in the old basis.
    - ``"project"`` (default, as GaLoreAdamW's): the first moment is carried with the basis
      change (M ↦ T_L M T_R); the factored second moment is carried as Adafactor's own rank-1
      estimate V̂ = r cᵀ/mean(r) would be, coordinates treated as uncorrelated (V ↦ T_L² V T_R²,
      element-wise squares), which maps the projected side's factor through the squared
      rotation and rescales the other to keep their means equal; all stays non-negative
      (:func:`~lowmem.optim.functional.adafactor.transport_factored_moments`). Why carry rather
      than reset: Adafactor's β2_t = 1 - t^-0.8 is already near 1 after a few hundred steps, so a
      reset factor would be rebuilt from one gradient with full weight while the relative step
      size stays where training is. The default was chosen for consistency with GaLoreAdamW,
      whose benchmark favoured "project"; it has not been benchmarked for Adafactor.
    - ``"reset"``: zero all moments and restart β2_t at t = 1 (so the first step after a refresh
      takes the fresh gradient's statistics only); the relative step size keeps the training step.

    How this differs from galore-torch's ``GaLoreAdafactor``: the basis is a tensor in the state
    (galore-torch pickles a projector object), so ``weights_only`` checkpoints work and resumed
    runs continue bit-for-bit; ``on_refresh`` can carry or reset the moments; rank >= min(m, n)
    gives the plain update with one warning, conv weights are projected as matrices, and a
    non-finite gradient never reaches the SVD. LR schedulers apply when ``relative_step=False``
    (with ``relative_step=True`` the lr is internal, as in transformers; its
    ``AdafactorSchedule`` is not supported).

    FSDP2 (``fully_shard``, row-sharded): low-rank groups (projected on the right) and plain
    groups follow the single-process update; the column means of matrices, mean(r) and the RMS
    values are all-reduced over the ranks, while tensors of 3 or more dims (conv weights) factor
    over their last two dims, inside each rank's rows (:mod:`lowmem.optim.sharded`).

    Args:
        params: parameters or param groups (dicts); named parameters work too.
        lr: external learning rate; only with ``relative_step=False`` (then required).
        eps: (eps1 added to grad², eps2 the floor of the parameter scale RMS(W)).
        clip_threshold: d: the update is scaled down to RMS <= d.
        decay_rate: ĉ in β2_t = 1 - t^ĉ (<= 0).
        beta1: first-moment EMA coefficient, or None for no first moment (the memory-saving default).
        weight_decay: decoupled, times the step size α_t.
        scale_parameter: multiply the step size by max(eps2, RMS(W)).
        relative_step: use min(1e-2, 1/sqrt(t)) (``warmup_init``: min(1e-6·t, 1/sqrt(t))) instead of lr.
        warmup_init: see ``relative_step``.
        maximize: maximize the objective (keyword-only; not in transformers).
        layerwise, accumulation_steps, max_grad_norm_per_param, process_group: per-layer
            stepping inside backward, as for every lowmem optimizer (:mod:`lowmem.optim.layerwise`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        maximize: bool = False,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        max_grad_norm_per_param: float | None = None,
        process_group: Any = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": tuple(eps) if isinstance(eps, (list, tuple)) else eps,
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
            "maximize": maximize,
        }
        check_adafactor_hyperparameters(defaults)
        super().__init__(params, defaults)
        self._init_layerwise(
            layerwise=layerwise,
            accumulation_steps=accumulation_steps,
            max_grad_norm_per_param=max_grad_norm_per_param,
            process_group=process_group,
        )

    # ----------------------------------------------------------------- hooks
    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        check_adafactor_hyperparameters(group)

    def _init_state(
        self, state: dict[str, Any], param: Tensor, group: dict[str, Any], side: Side | None, shape: tuple
    ) -> None:
        dtype = compute_dtype(param.dtype)
        shape = tuple(shape)
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=dtype, device=param.device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=dtype, device=param.device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=param.device)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)

    @staticmethod
    def _first_moment(state: dict[str, Any], group: dict[str, Any], shape: tuple) -> Tensor | None:
        """exp_avg when beta1 is set (allocated here if beta1 was set after the first step)."""
        if group["beta1"] is None:
            return None
        if "exp_avg" not in state:
            row = state.get("exp_avg_sq_row", state.get("exp_avg_sq"))
            state["exp_avg"] = torch.zeros(shape, dtype=row.dtype, device=row.device)
        return state["exp_avg"]

    @staticmethod
    def _adafactor_hyper(group: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        """The keywords both functional cores take, from ``group`` and the training step."""
        keys = ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay")
        flags = ("scale_parameter", "relative_step", "warmup_init", "maximize")
        return {
            **{key: group[key] for key in keys + flags},
            "step": int(state["step"].item()),
        }

    def _full_rank_step(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] += 1
        adafactor_update(
            param,
            param.grad,
            state.get("exp_avg_sq_row"),
            state.get("exp_avg_sq_col"),
            state.get("exp_avg_sq"),
            self._first_moment(state, group, tuple(param.shape)),
            reduce_sum=sharded.reduce_sum_of(self),  # FSDP2: whole-tensor statistics over the ranks
            **self._adafactor_hyper(group, state),
        )

    def _lowrank_step(
        self,
        weight: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        side: Side,
        moment_step: int,
    ) -> None:
        shape = (state["exp_avg_sq_row"].shape[0], state["exp_avg_sq_col"].shape[0])
        lowrank_adafactor_update(
            weight,
            grad,
            state["exp_avg_sq_row"],
            state["exp_avg_sq_col"],
            self._first_moment(state, group, shape),
            state.get("proj_left"),
            state.get("proj_right"),
            moment_step=moment_step,
            scale=float(group["scale"]),
            reduce_sum=sharded.reduce_sum_of(self),  # FSDP2: c, mean(r), RMS(U), RMS(W) over the ranks
            **self._adafactor_hyper(group, state),
        )

    def _carry_moments(
        self,
        state: dict[str, Any],
        old: tuple[Tensor | None, Tensor | None],
        new: tuple[Tensor | None, Tensor | None],
    ) -> None:
        transport_factored_moments(
            state["exp_avg_sq_row"],
            state["exp_avg_sq_col"],
            state.get("exp_avg"),
            old,
            new,
            reduce_sum=sharded.reduce_sum_of(self),  # FSDP2: mean(r) over every rank's rows
        )

    def _reset_moments(self, state: dict[str, Any]) -> None:
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg"):
            if key in state:
                state[key].zero_()

    def _check_state(self, param: Tensor, group: dict[str, Any], side: Side | None, name: str) -> None:
        """The base checks one moment against the low-rank shape; ours are factored, so check both."""
        state = self.state[param]
        local = sharded.local_tensor(param)  # FSDP2: the state has the local rows' shapes
        shape = lowrank_shape(matrix_shape(local), group["rank"], side) if side else tuple(local.shape)
        expected = (
            {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
            if len(shape) >= 2
            else {"exp_avg_sq": shape}
        )
        found = {key: tuple(state[key].shape) if key in state else None for key in expected}
        if found != expected or (side is not None) != ("last_refresh" in state):
            raise RuntimeError(
                f"{type(self).__name__}: the state of {name} has second-moment factors of shapes {found} "
                f"but the group's settings (rank={group.get('rank')}, proj_type={group.get('proj_type')}) "
                f"need {expected}; rank and proj_type cannot change after the first step"
            )

    def _keeps_state_dtype(self, key: str, value: Tensor, group: dict[str, Any]) -> bool:
        # Moments are fp32 for low-precision params by design; keep every saved dtype.
        return True
