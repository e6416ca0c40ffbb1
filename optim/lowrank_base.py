"""The bookkeeping every lowmem low-rank optimizer shares; the math lives in ``optim/functional``.

:class:`LowRankOptimizer` owns what GaLore, Fira, APOLLO and GaLore-Adafactor have in common:
param-group validation (galore-torch's keys plus ours), which parameters are projected and on
which side, when the projector is refreshed and what happens to the moments then, NaN
containment at a refresh, the shape rules (rank >= min(m, n) → full-rank update with one
warning, conv weights as their (out, in·k·k) matricization, 1-D parameters rejected), and a
``load_state_dict`` that keeps the integer refresh counters exact. A subclass supplies the
algorithm: its hyperparameter checks, its state, its full-rank step and its low-rank step,
each a call into one functional core.

Per-parameter flow of :meth:`LowRankOptimizer.step`::

    validate every gradient (raise before anything moves)
    for each parameter with a gradient:
        first time: allocate its state (subclass)
        not projected → _full_rank_step (subclass)
        projected     → refresh the basis if due (first step, then every update_proj_gap)
                        → _lowrank_step(weight as m×n, grad as m×n, ...) (subclass)

With ``layerwise=True`` (:meth:`LowRankOptimizer._init_layerwise`, :mod:`lowmem.optim.layerwise`)
the same per-parameter update runs inside backward, from a post-accumulate-grad hook, and
``step()`` updates nothing.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from lowmem.optim import sharded
from lowmem.optim._checks import (
    check_choice,
    check_gradient,
    check_positive_float,
    check_positive_int,
)
from lowmem.optim.layerwise import (
    LayerwiseOptions,
    LayerwiseStepper,
    clip_grad_per_param_,
    layerwise_options,
)
from lowmem.optim.projector import (
    PROJ_TYPES,
    PROJECTORS,
    Side,
    compute_basis,
    lowrank_shape,
    project,
    projection_side,
    random_basis,
)

ON_REFRESH = ("keep", "project", "reset")

#: Defaults for groups that set ``rank``; galore-torch's where it has the key.
LOWRANK_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "projector": "randomized",
    "on_refresh": "project",
    "seed": 0,
}


def matrix_shape(param: Tensor) -> tuple[int, int]:
    """The (m, n) a parameter is projected as: (out, in·k·k) for conv weights, (m, n) for 2-D."""
    rows = param.shape[0]
    return rows, (param.numel() // rows if rows else math.prod(param.shape[1:]))


class LowRankOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base class: param groups with ``rank`` are projected, the others get the full-rank update.

    Subclasses set :attr:`lowrank_defaults` (group keys and their defaults), may narrow
    :attr:`proj_types` and :attr:`on_refresh_choices`, and implement:

    - ``_check_hyperparameters(group)``: raise ValueError for bad non-low-rank hyperparameters.
    - ``_check_lowrank_keys(group)``: extra low-rank keys (after the shared ones were checked).
    - ``_init_state(state, param, group, side, shape)``: allocate the algorithm's state;
      ``shape`` is the low-rank shape when ``side`` is set, else the parameter's shape.
    - ``_full_rank_step(param, state, group)`` and
      ``_lowrank_step(weight, grad, state, group, side, moment_step)``.
    - ``_carry_moments(state, old, new)`` / ``_reset_moments(state)`` for ``on_refresh``.
    - optionally ``_lowrank_step_projected(weight, low, state, group, side, moment_step)``: the
      low-rank step from an already-projected gradient, which lets layer-wise accumulation keep
      micro-batch gradients in the low-rank space (GaLore; see :mod:`lowmem.optim.layerwise`).

    A subclass constructor ends with ``self._init_layerwise(layerwise=..., accumulation_steps=...,
    max_grad_norm_per_param=..., process_group=...)`` to offer layer-wise stepping and
    per-parameter clipping (AdamLowRankOptimizer does).
    """

    lowrank_defaults: ClassVar[dict[str, Any]] = LOWRANK_DEFAULTS
    proj_types: ClassVar[tuple[str, ...]] = PROJ_TYPES
    on_refresh_choices: ClassVar[tuple[str, ...]] = ON_REFRESH
    #: Group keys that are accepted as another name of a key (e.g. fira's ``alpha`` for ``scale``).
    key_aliases: ClassVar[dict[str, str]] = {}
    # Layer-wise stepping and per-parameter clipping; class-level defaults (off) for subclasses
    # whose constructor does not call _init_layerwise.
    _layerwise_options: LayerwiseOptions = LayerwiseOptions()
    _layerwise: LayerwiseStepper | None = None

    # ----------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Raise ValueError (torch-style message) for bad non-low-rank hyperparameters of ``group``."""

    def _check_lowrank_keys(self, group: dict[str, Any]) -> None:
        """Validate keys a subclass adds on top of :data:`LOWRANK_DEFAULTS`."""

    @abc.abstractmethod
    def _init_state(
        self, state: dict[str, Any], param: Tensor, group: dict[str, Any], side: Side | None, shape: tuple
    ) -> None:
        """Allocate the algorithm's state; ``shape``: low-rank if ``side`` is set, else the param's."""

    @abc.abstractmethod
    def _full_rank_step(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Update a parameter that is not projected (plain group, or rank >= min(m, n)); counts ``step``."""

    @abc.abstractmethod
    def _lowrank_step(
        self,
        weight: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        side: Side,
        moment_step: int,
    ) -> None:
        """Update the m×n ``weight`` from the m×n ``grad`` in the current basis (``step`` already counted)."""

    @abc.abstractmethod
    def _carry_moments(
        self,
        state: dict[str, Any],
        old: tuple[Tensor | None, Tensor | None],
        new: tuple[Tensor | None, Tensor | None],
    ) -> None:
        """Move the moments from basis ``old`` into basis ``new`` (``on_refresh="project"``)."""

    @abc.abstractmethod
    def _reset_moments(self, state: dict[str, Any]) -> None:
        """Zero the moments (``on_refresh="reset"``); bias correction restarts through ``moment_step``."""

    def _moment_shape_key(self) -> str:
        """A state key whose shape is the low-rank shape (used to detect changed rank settings)."""
        return "exp_avg"

    def _lowrank_step_projected(
        self,
        weight: Tensor,
        low: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        side: Side,
        moment_step: int,
    ) -> None:
        """``_lowrank_step`` from ``low = _project_grad(G)`` instead of G (``low`` may be overwritten).

        Optional: override it only if the low-rank update depends on G through project(G) alone
        (GaLore); then layer-wise accumulation keeps micro-batch gradients low-rank. Optimizers
        that need the full G (Fira's residual, APOLLO's scaled raw gradient) leave it alone.
        """
        raise NotImplementedError(
            f"{type(self).__name__} updates from the full gradient only; layer-wise accumulation "
            "checks _accumulates_projected_grad() before calling this"
        )

    def _accumulates_projected_grad(self) -> bool:
        """Whether :meth:`_lowrank_step_projected` is implemented (layer-wise accumulation uses it)."""
        return type(self)._lowrank_step_projected is not LowRankOptimizer._lowrank_step_projected

    def _project_grad(self, param: Tensor, grad: Tensor, state: dict[str, Any]) -> Tensor:
        """``grad`` (param-shaped) in the current low-rank basis: the input of _lowrank_step_projected."""
        if sharded.is_dtensor(param):
            # FSDP2 (layer-wise accumulation): project this rank's rows with the whole basis,
            # all-gathered for the projection (the rows of R = G Qᵀ, optim/sharded.py).
            with sharded.ShardedParam(param, state):
                rows = sharded.local_tensor(grad).reshape(matrix_shape(sharded.local_tensor(param)))
                return project(rows, *self._current_basis(state))
        return project(grad.reshape(matrix_shape(param)), *self._current_basis(state))

    # ----------------------------------------------------------------- layer-wise stepping
    def _init_layerwise(
        self,
        *,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        max_grad_norm_per_param: float | None = None,
        process_group: Any = None,
    ) -> None:
        """Validate and apply the layer-wise keywords; call at the end of a subclass ``__init__``.

        See :mod:`lowmem.optim.layerwise` for what they do. Raises ValueError naming the argument.
        """
        options = layerwise_options(layerwise, accumulation_steps, max_grad_norm_per_param, process_group)
        self._layerwise_options = options
        if options.layerwise:
            self._layerwise = LayerwiseStepper(self, options)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if self._layerwise_options != LayerwiseOptions():
            if self._layerwise_options.process_group is not None:
                raise TypeError(
                    f"cannot copy or pickle a {type(self).__name__} with a process_group; build a new one "
                    "and load_state_dict() into it"
                )
            state["_layerwise_options"] = self._layerwise_options
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        stepper = self.__dict__.get("_layerwise")
        if stepper is not None:
            stepper.reset()  # load_state_dict: new group dicts, and a window of the old run is void
        elif self._layerwise_options.layerwise:
            self._layerwise = LayerwiseStepper(self, self._layerwise_options)  # a copy: hook its params

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; in layer-wise mode also drops low-rank accumulations."""
        super().zero_grad(set_to_none)
        if self._layerwise is not None:
            self._layerwise.drop_gradients()

    # ----------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating its hyperparameters and low-rank keys before anything changes."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group["params"] = params
        for alias, key in self.key_aliases.items():
            if alias in param_group:
                if key in param_group and param_group[key] != param_group[alias]:
                    raise ValueError(
                        f"{type(self).__name__}: param group sets both {key!r} and its alias {alias!r} "
                        f"to different values ({param_group[key]!r} vs {param_group[alias]!r}); set one"
                    )
                param_group[key] = param_group.pop(alias)
        self._check_hyperparameters({**self.defaults, **param_group})
        if "rank" in param_group:
            for key, value in self.lowrank_defaults.items():
                param_group.setdefault(key, value)
            check_positive_int("rank", param_group["rank"])
            check_positive_int("update_proj_gap", param_group["update_proj_gap"])
            check_positive_float("scale", param_group["scale"])
            check_choice("proj_type", param_group["proj_type"], self.proj_types)
            check_choice("on_refresh", param_group["on_refresh"], self.on_refresh_choices)
            if "projector" in self.lowrank_defaults:
                check_choice("projector", param_group["projector"], PROJECTORS)
            if not isinstance(param_group["seed"], int) or isinstance(param_group["seed"], bool):
                raise ValueError(f"Invalid seed: {param_group['seed']!r}; it must be an integer")
            self._check_lowrank_keys(param_group)
            for index, item in enumerate(params):
                name, tensor = item if isinstance(item, tuple) else (f"params[{index}]", item)
                if isinstance(tensor, Tensor) and tensor.dim() < 2:
                    raise ValueError(
                        f"{type(self).__name__}: parameter {name} of shape {tuple(tensor.shape)} is in a "
                        f"group with rank={param_group['rank']}, but only parameters with 2 or more "
                        "dimensions can be projected; move biases and norm weights to a group without "
                        "'rank' (lowmem.optim.lowrank_param_groups does this)"
                    )
        super().add_param_group(param_group)
        if self._layerwise is not None:
            self._layerwise.register(self.param_groups[-1]["params"])

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _name(group: dict[str, Any], index: int, group_index: int) -> str:
        names = group.get("param_names")
        if names:
            return repr(names[index])
        return f"params[{index}] of param group {group_index}"

    @staticmethod
    def _projected_side(param: Tensor, group: dict[str, Any]) -> Side | None:
        """The side this parameter is projected on, or None when it gets the full-rank update."""
        if "rank" not in group or param.dim() < 2:
            return None
        shape = matrix_shape(param)
        if group["rank"] >= min(shape):
            return None
        if sharded.is_dtensor(param):  # FSDP2: project the unsharded side (optim/sharded.py)
            return sharded.sharded_side(param, group["proj_type"])  # type: ignore[return-value]
        return projection_side(shape, group["proj_type"])

    def _check_state(self, param: Tensor, group: dict[str, Any], side: Side | None, name: str) -> None:
        state = self.state[param]
        key = self._moment_shape_key()
        local = sharded.local_tensor(param)  # FSDP2: the state has the local rows' shapes
        expected = lowrank_shape(matrix_shape(local), group["rank"], side) if side else tuple(local.shape)
        if tuple(state[key].shape) != tuple(expected) or (side is not None) != ("last_refresh" in state):
            raise RuntimeError(
                f"{type(self).__name__}: the state of {name} has {key} of shape {tuple(state[key].shape)} "
                f"but the group's settings (rank={group.get('rank')}, proj_type={group.get('proj_type')}) "
                f"need {tuple(expected)}; rank and proj_type cannot change after the first step"
            )

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss.

        With ``layerwise=True`` the parameters were already updated inside backward: this only
        runs the closure (whose backward updates them) and checks for unconsumed gradients.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._layerwise is not None:
            # Every parameter was updated inside backward; updating here would update twice.
            self._layerwise.on_step(self)
            return loss

        # Validate everything first, so a bad gradient raises before any parameter moves.
        work: list[tuple[dict[str, Any], Tensor, Side | None]] = []
        full_rank: list[str] = []
        for group_index, group in enumerate(self.param_groups):
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                name = self._name(group, index, group_index)
                side = self._validate_param(param, group, name)
                if "rank" in group and side is None and not self.state.get(param):
                    full_rank.append(f"{name} {tuple(param.shape)}")
                work.append((group, param, side))
        if full_rank:
            warnings.warn(
                f"{type(self).__name__}: rank >= min(m, n) for {', '.join(full_rank)}; these get the "
                "full-rank update (projecting onto a rank that large saves nothing)",
                stacklevel=2,
            )
        self._step_params(work)
        return loss

    def _step_params(self, work: list[tuple[dict[str, Any], Tensor, Side | None]]) -> None:
        """Update every ``(group, param, side)`` of a ``step()`` (validated); a subclass may batch."""
        for group, param, side in work:
            self._step_param(param, group, side)

    def _validate_param(self, param: Tensor, group: dict[str, Any], name: str) -> Side | None:
        """Check ``param.grad`` and the state's shapes; return the projection side."""
        check_gradient(type(self).__name__, name, param, param.grad)
        side = self._projected_side(param, group)
        if self.state.get(param):
            self._check_state(param, group, side, name)
        return side

    def _step_param(
        self, param: Tensor, group: dict[str, Any], side: Side | None, projected_grad: Tensor | None = None
    ) -> None:
        """Update one parameter from ``param.grad`` (already validated).

        ``projected_grad`` (layer-wise accumulation): the gradient already in the parameter's
        current low-rank basis, given only for a projected parameter with state and no refresh
        due; the update then runs through :meth:`_lowrank_step_projected`.
        """
        state = self.state[param]
        # FSDP2 (optim/sharded.py): update this rank's rows, with its local gradient and the whole
        # basis set up for the update and released after it; the state holds local tensors.
        shard = sharded.ShardedParam.of(self, param, side, state)
        if shard is None:
            self._update_param(param, state, group, side, projected_grad, None)
            return
        with shard:
            self._update_param(shard.local, state, group, side, projected_grad, shard)

    def _update_param(
        self,
        param: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        side: Side | None,
        projected_grad: Tensor | None,
        shard: sharded.ShardedParam | None,
    ) -> None:
        """The body of :meth:`_step_param`: ``param`` is a plain tensor (an FSDP2 shard's rows)."""
        max_norm = self._layerwise_options.max_grad_norm_per_param
        if max_norm is not None and projected_grad is None:
            # FSDP2: the norm of the whole gradient, the ranks' squared norms all-reduced.
            clip_grad_per_param_(param.grad, max_norm, None if shard is None else shard.reduce_sum)
        if not state:
            shape = lowrank_shape(matrix_shape(param), group["rank"], side) if side else tuple(param.shape)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            self._init_state(state, param, group, side, shape)
            if side:
                # -1: no basis computed from a gradient yet (a refresh is due).
                state["last_refresh"] = torch.tensor(-1, dtype=torch.int64)
        if side is None:
            self._full_rank_step(param, state, group)
            return
        state["step"] += 1
        step = int(state["step"].item())
        shape = matrix_shape(param)
        grad = param.grad.reshape(shape) if projected_grad is None else None
        if param.dim() == 2:
            weight, copy_back = param, False
        elif param.is_contiguous():
            weight, copy_back = param.view(shape), False
        else:  # e.g. a channels_last conv weight: update a contiguous copy, then write it back
            weight, copy_back = param.reshape(shape), True
        if self._refresh_due(state, group, step):
            if grad is None:
                raise RuntimeError("projected_grad was given for a step that refreshes the basis")
            # FSDP2: the basis comes from the whole gradient, gathered for the refresh only, unless
            # the refresh reads no more of it than its finiteness and shape (APOLLO's random one).
            gather = shard is not None and self._refresh_reads_grad(group)
            self._refresh(shard.full_grad() if gather else grad, group, state, side, step)
        last = int(state["last_refresh"].item())
        # "reset" restarts bias correction at each refresh; "keep"/"project" carry the moments on.
        moment_step = step - last + 1 if group["on_refresh"] == "reset" and last >= 0 else step
        if grad is None:
            self._lowrank_step_projected(weight, projected_grad, state, group, side, moment_step)
        else:
            self._lowrank_step(weight, grad, state, group, side, moment_step)
        if copy_back:
            param.copy_(weight.view(param.shape))

    def _refresh_reads_grad(self, group: dict[str, Any]) -> bool:
        """Whether :meth:`_refresh` computes the new basis from the gradient's values (GaLore's SVD).

        Then a row-sharded (FSDP2) parameter's refresh gets the whole m×n gradient, all-gathered.
        A subclass whose refresh reads only whether the gradient is finite and its shape returns
        False: it then gets this rank's rows (m_i×n) and must decide through
        :func:`lowmem.optim.sharded.all_finite` and :func:`lowmem.optim.sharded.global_shape`, which
        answer for the whole gradient on every rank (one all-reduce of a scalar, no gather).
        """
        return True

    @staticmethod
    def _refresh_due(state: dict[str, Any], group: dict[str, Any], step: int) -> bool:
        """Whether update number ``step`` recomputes the basis: the first, then every update_proj_gap."""
        last = int(state["last_refresh"].item())
        return last < 0 or step - last >= group["update_proj_gap"]

    # ----------------------------------------------------------------- projector
    def _has_basis(self, state: dict[str, Any]) -> bool:
        return "proj_left" in state or "proj_right" in state

    def _current_basis(self, state: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        return state.get("proj_left"), state.get("proj_right")

    def _new_basis(
        self,
        grad: Tensor,
        group: dict[str, Any],
        state: dict[str, Any],
        side: Side,
        step: int,
        old: tuple[Tensor | None, Tensor | None],
    ) -> tuple[Tensor | None, Tensor | None]:
        """The basis after a refresh on the finite gradient ``grad`` (GaLore: its top-r subspace)."""
        return compute_basis(
            grad,
            group["rank"],
            side,
            group["projector"],
            seed=group["seed"],
            step=step,
            warm_left=old[0],
            warm_right=old[1],
        )

    def _fallback_basis(
        self, grad: Tensor, group: dict[str, Any], state: dict[str, Any], side: Side
    ) -> tuple[Tensor | None, Tensor | None]:
        """A basis for a first step whose gradient is not finite: random, retried next step."""
        return random_basis(tuple(grad.shape), group["rank"], side, seed=group["seed"], like=grad)

    def _store_basis(self, state: dict[str, Any], basis: tuple[Tensor | None, Tensor | None]) -> None:
        for key, tensor in zip(("proj_left", "proj_right"), basis, strict=True):
            if tensor is not None:
                state[key] = tensor

    def _refresh(
        self, grad: Tensor, group: dict[str, Any], state: dict[str, Any], side: Side, step: int
    ) -> None:
        """Recompute the basis from ``grad``; keep the old one if ``grad`` is not finite."""
        has_basis = self._has_basis(state)
        old = self._current_basis(state) if has_basis else (None, None)
        new: tuple[Tensor | None, Tensor | None] | None = None
        # A sum is non-finite whenever an element is (and, harmlessly, when it overflows), at a
        # tenth of the cost of isfinite(grad).all(): no bool temporary of grad's size.
        if bool(torch.isfinite(grad.sum(dtype=torch.promote_types(grad.dtype, torch.float32)))):
            try:
                new = self._new_basis(grad, group, state, side, step, old)
            except torch.linalg.LinAlgError as exc:
                warnings.warn(
                    f"{type(self).__name__}: projector refresh failed ({exc}); keeping the old basis",
                    stacklevel=4,
                )
        if new is None:
            if not has_basis:
                # First step with a non-finite gradient: start from a fallback basis and retry
                # the real refresh next step (last_refresh stays -1).
                self._store_basis(state, self._fallback_basis(grad, group, state, side))
            return
        if has_basis and group["on_refresh"] == "project":
            self._carry_moments(state, old, new)
        elif group["on_refresh"] == "reset":
            self._reset_moments(state)
        self._store_basis(state, new)
        state["last_refresh"].fill_(step)

    # ----------------------------------------------------------------- checkpoints
    #: State keys that live on the CPU whatever the parameter's device (counters read every step).
    cpu_state_keys: ClassVar[tuple[str, ...]] = ("last_refresh",)

    def _keeps_state_dtype(self, key: str, value: Tensor, group: dict[str, Any]) -> bool:
        """Whether a loaded state tensor keeps its saved dtype instead of taking the param's.

        torch.optim casts every floating state tensor but ``step`` to its parameter's dtype on
        load, and integer tensors too when the parameter is floating point: that would turn an
        int64 refresh counter into a bf16 (exact only up to 256) or int8 codes into floats.
        Integer tensors always keep their dtype; subclasses add keys with a fixed dtype.
        """
        return not value.is_floating_point()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict; states of FSDP2 (DTensor) parameters as DTensors for DCP."""
        params = [param for group in self.param_groups for param in group["params"]]
        return sharded.distribute_state(self, super().state_dict(), params)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; counters and quantized states keep their saved dtypes exactly."""
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        group_of = {pid: group for group in state_dict["param_groups"] for pid in group["params"]}
        kept = {
            pid: {
                key: value
                for key, value in entry.items()
                if key != "step"
                and isinstance(value, Tensor)
                and self._keeps_state_dtype(key, value, group_of.get(pid, {}))
            }
            for pid, entry in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        params = [param for group in self.param_groups for param in group["params"]]
        for pid, param in zip(saved_ids, params, strict=True):
            for key, value in kept.get(pid, {}).items():
                device = "cpu" if key in self.cpu_state_keys else param.device
                self.state[param][key] = value.to(device, copy=True)
        sharded.localize_state(self)  # FSDP2: DTensor states back to local tensors
