r"""Layer-wise stepping: each parameter is updated inside backward, as soon as its gradient is ready.

With ``layerwise=True`` a lowmem optimizer registers a post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``) on every parameter that requires grad. When
autograd has accumulated a parameter's gradient, the hook updates that parameter with the
optimizer's ordinary per-parameter step and sets ``param.grad = None``, so the gradients of the
whole model never coexist: the peak is about one full gradient (the largest) plus whatever was
accumulated in low-rank form (below). This is GaLore's per-layer weight update (Zhao et al.
2024) and LOMO's fused update (Lv et al. 2023), kept a real ``torch.optim.Optimizer``:

- ``param_groups`` drive every update: the hook reads the group's *current* ``lr``, so LR
  schedulers apply (galore-torch's layer-wise mode builds one optimizer per parameter, which no
  scheduler on the user's optimizer reaches);
- ``state_dict`` / ``load_state_dict`` hold and restore all optimizer state (tensors only);
- ``step()`` updates nothing (the parameters were updated in backward) but is safe and useful
  to call: it runs the closure, runs step hooks, keeps LR schedulers' "step() before
  scheduler.step()" bookkeeping, and warns about gradients that no hook consumed;
- ``zero_grad()`` also drops gradients accumulated in low-rank form.

Usage (the same loop as without ``layerwise``; only the constructor changes)::

    opt = GaLoreAdamW(lowrank_param_groups(model, rank=128), lr=1e-3,
                      layerwise=True, accumulation_steps=4, max_grad_norm_per_param=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=num_updates)
    for i, batch in enumerate(loader):
        loss = model(batch) / 4       # gradients are SUMMED over micro-batches; scaling is yours
        loss.backward()               # every 4th backward updates the parameters, inside it
        if (i + 1) % 4 == 0:
            opt.step()                # updates nothing; runs hooks, keeps scheduler bookkeeping
            sched.step()              # the next update uses the new lr
            opt.zero_grad()

Micro-batches (``accumulation_steps=k``)
    The optimizer counts backward passes itself: a *micro-batch* is one ``backward()`` call
    that reaches at least one of its parameters (recognized by autograd's graph-task id, so
    nested reentrant-checkpoint backward passes inside it are part of it). The k-th backward
    of each window updates; the others accumulate. Counting backward passes instead of hook
    calls per parameter keeps every parameter on the same schedule even when some get no
    gradient in some micro-batch: a parameter that had gradients earlier in the window but
    none in its last micro-batch is updated when that last backward finishes (an autograd
    final callback); one with no gradient in the whole window is skipped, as ``step()``
    skips ``grad=None``. ``zero_grad()`` discards what was accumulated, like it discards
    ``.grad`` in an ordinary loop, but does not move the count (an ordinary loop's counter is
    the user's ``i``, which ``zero_grad`` does not touch either). Two ``backward()`` calls per
    micro-batch (two losses) count as two micro-batches: sum the losses first.

    What is accumulated is the SUM of the micro-batch gradients, as autograd does: the update
    equals the non-layer-wise optimizer's ``step()`` after the same k backward passes.

Low-rank accumulation
    For a projected parameter whose coming update keeps its basis (no refresh due), each
    micro-batch gradient G_i is projected at once, R += project(G_i) (m×r for an m×n weight
    with m >= n), and the full gradient is freed; the update then runs from R through
    ``_lowrank_step_projected``. Projection is linear, so this is the update on project(Σ G_i)
    up to floating-point rounding. On a refresh step the new basis is computed from the full
    summed gradient, so that window accumulates full gradients in ``.grad``, as do plain
    parameters. R is a *gradient*, not optimizer state: it lives in
    :attr:`LayerwiseStepper.lowrank_grads`, outside ``optimizer.state``, is empty at every
    optimizer-step boundary (where checkpoints are taken), and is dropped by ``zero_grad()``,
    exactly like ``.grad``, which no ``state_dict`` contains either. Only optimizers whose
    low-rank update depends on G through project(G) alone can do this (GaLore); Fira needs the
    full-rank residual G − back(project(G)) and APOLLO applies its scaling to the raw G, so they
    accumulate full gradients. A subclass opts in by overriding
    ``LowRankOptimizer._lowrank_step_projected`` (and ``_project_grad`` if its projection is
    not ``project(G, *basis)``).

Clipping
    ``max_grad_norm_per_param=c`` scales each parameter's (accumulated, averaged) gradient by
    min(1, c / (‖g‖₂ + 1e-6)), i.e. ``torch.nn.utils.clip_grad_norm_([p], c)`` for every p
    separately, just before its update (also without ``layerwise``). Global-norm clipping
    (``clip_grad_norm_(model.parameters(), c)``) needs the norm of the *whole* gradient before
    the first update, which layer-wise stepping never holds; it is not available in this mode
    (LOMO gets it with a second backward pass). With per-parameter clipping the exact norm of a
    summed gradient is needed, so ``accumulation_steps > 1`` then accumulates full gradients.

Data parallel
    Two ways. With a ``DistributedDataParallel``-wrapped model, call
    :func:`lowmem.optim.register_layerwise_ddp_hook` (``optim/layerwise_ddp.py``): the updates
    then run in a DDP comm hook after each bucket's all-reduce (plain layer-wise hooks would
    run before DDP averages); DDP keeps full-size bucket buffers, so this gives overlap but not
    the memory saving. For the memory saving, do not wrap the model and pass ``process_group`` (for example
    ``torch.distributed.group.WORLD``): the hook all-reduces the gradient (sum, then divides by
    the group's size: DDP's average) right before the update, so every rank applies the same
    update. With accumulation it reduces once per window, like ``DDP.no_sync``, and a low-rank
    accumulator is reduced in its r-dimensional form (less communication than DDP). Like DDP
    (whose constructor broadcasts rank 0's parameters) the ranks must start from identical
    parameters; and every rank must produce gradients for the same parameters in each
    backward, in the same order (DDP without ``find_unused_parameters``), since each hook
    issues a collective.

FSDP2 (``fully_shard``)
    Works with no extra call: FSDP2 runs these hooks itself on each sharded (DTensor)
    parameter after its reduce-scatter, with ``.grad`` the averaged row shard, so each hook
    updates the rank's rows (:mod:`lowmem.optim.sharded`) and frees that shard: a rank holds one
    layer's sharded gradient at a time, not the model's. Build the optimizer without
    ``process_group`` (FSDP2 already averaged; refused). Accumulate with
    ``accumulation_steps=k`` (a reduce-scatter per micro-batch; FSDP2 adds the shards into
    ``.grad``), or with ``set_requires_gradient_sync(False)`` and ``accumulation_steps=1``,
    never both. Why the collectives the hooks issue (basis gathers, norm all-reduces) line up
    across ranks: see :mod:`lowmem.optim.sharded`. Per-parameter clipping uses the norm of the
    whole (all ranks') gradient.

Limits
    Every ``backward()`` that reaches the parameters trains them; to look at gradients without
    training, use ``torch.autograd.grad`` (it accumulates nothing, so no hook runs). An error in a
    hook (a sparse gradient, say, or a gradient the data-parallel guards refuse) raises from
    ``backward()`` after the parameters hooked before it were updated, and a backward that raised
    still counts as a micro-batch; the next ``backward()`` starts the next one, with or without
    ``zero_grad()`` in between. A parameter whose gradient arrives twice in one backward
    (reentrant checkpointing, ``use_reentrant=True``, with the parameter used inside and outside a
    checkpointed segment) cannot be updated from a partial gradient: this raises, as does
    accumulation when the first gradients of a backward come from a reentrant segment (the
    micro-batch count would be unreliable); use ``use_reentrant=False``, as PyTorch recommends.
    Checkpoint (``state_dict``) between optimizer steps: gradients accumulated inside an open
    window are not saved, exactly as ``.grad`` is not (``state_dict()`` warns). Refresh windows
    with accumulation hold every projected weight's full gradient, as ``step()`` does.

Other constructors
    ``AdamLowRankOptimizer`` (GaLoreAdamW, FiraAdamW, ApolloAdamW) takes the keywords. Any other
    ``LowRankOptimizer`` subclass offers them by accepting them and ending its ``__init__`` with
    ``self._init_layerwise(layerwise=..., accumulation_steps=..., max_grad_norm_per_param=...,
    process_group=...)``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lowmem.optim import sharded
from lowmem.optim._checks import check_positive_float, check_positive_int

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from lowmem.optim.lowrank_base import LowRankOptimizer
    from lowmem.optim.projector import Side

__all__ = [
    "LayerwiseOptions",
    "LayerwiseStepper",
    "clip_grad_per_param_",
    "current_graph_task",
    "layerwise_options",
    "queue_end_of_backward",
]

#: torch.nn.utils.clip_grad_norm_'s guard against a zero norm.
CLIP_EPS = 1e-6


@dataclass(frozen=True)
class LayerwiseOptions:
    """The constructor keywords of layer-wise stepping and per-parameter clipping (validated)."""

    layerwise: bool = False
    accumulation_steps: int = 1
    max_grad_norm_per_param: float | None = None
    process_group: Any = None


def layerwise_options(
    layerwise: Any = False,
    accumulation_steps: Any = 1,
    max_grad_norm_per_param: Any = None,
    process_group: Any = None,
) -> LayerwiseOptions:
    """Validate the keywords (torch-style ValueErrors naming the argument) and bundle them."""
    if not isinstance(layerwise, bool):
        raise ValueError(f"Invalid layerwise: {layerwise!r}; it must be True or False")
    check_positive_int("accumulation_steps", accumulation_steps)
    if max_grad_norm_per_param is not None:
        check_positive_float("max_grad_norm_per_param", max_grad_norm_per_param)
    if accumulation_steps > 1 and not layerwise:
        raise ValueError(
            f"Invalid accumulation_steps: {accumulation_steps}; it needs layerwise=True (without it, "
            "accumulate as usual: call backward() k times, then step())"
        )
    if process_group is not None and not layerwise:
        raise ValueError(
            "Invalid process_group: it needs layerwise=True (without it, wrap the model in "
            "DistributedDataParallel, which averages the gradients before step())"
        )
    return LayerwiseOptions(layerwise, accumulation_steps, max_grad_norm_per_param, process_group)


def clip_grad_per_param_(
    grad: Tensor, max_norm: float, reduce_sum: Callable[[Tensor], Tensor] | None = None
) -> None:
    """Scale ``grad`` in place by min(1, max_norm / (‖grad‖₂ + 1e-6)).

    The same arithmetic as ``torch.nn.utils.clip_grad_norm_([p], max_norm)`` (norm, coefficient
    and product in the gradient's dtype), without a host sync: the coefficient stays a tensor.
    ``reduce_sum`` (``grad`` is a rank's row block of a row-sharded FSDP2 gradient,
    :meth:`lowmem.optim.sharded.ShardedParam.reduce_sum`): the norm of the whole gradient,
    sqrt(Σ_k ‖g_k‖²), one all-reduce of a scalar; every rank then scales by the same coefficient.
    """
    norm = torch.linalg.vector_norm(grad, 2.0)
    if reduce_sum is not None:
        norm = reduce_sum(norm.square()).sqrt()
    coef = torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
    grad.mul_(coef)


def current_graph_task() -> int:
    """Autograd's id of the graph task (backward pass) running on this thread; -1 outside one."""
    return torch._C._current_graph_task_id()


def queue_end_of_backward(callback: Any) -> None:
    """Run ``callback`` when the current graph task finishes (what DDP and FSDP use)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class LayerwiseStepper:
    """The hooks and micro-batch bookkeeping of one layer-wise optimizer.

    Created by ``LowRankOptimizer._init_layerwise``; holds the optimizer weakly (the hooks live
    on the model's parameters, which may outlive it: the hooks are removed when it is collected).

    Attributes:
        options: the validated keywords.
        lowrank_grads: param → its gradient accumulated in the low-rank basis in the open window.
        position: index of the backward pass in progress (or last finished) within the window;
            -1 before the window's first backward.
    """

    def __init__(self, optimizer: LowRankOptimizer, options: LayerwiseOptions) -> None:
        self.options = options
        self._optimizer = weakref.ref(optimizer)
        self._handles: dict[int, RemovableHandle] = {}
        self._ddp_params: set[int] = set()  # updated by a DDP comm hook instead (layerwise_ddp.py)
        # The world size when plain gradients are local to a multi-rank group (refused), 0 when
        # not; None until the first hook (the group may be initialized after the optimizer).
        self._multi_rank_local: int | None = None
        self._locations: dict[int, tuple[int, int]] = {}
        self.lowrank_grads: dict[Tensor, Tensor] = {}
        # Params with a gradient accumulated in the open window but not applied yet (ordered,
        # so every rank flushes in the same order).
        self._pending: dict[Tensor, None] = {}
        self.position = -1
        self._root: int | None = None  # graph task of the backward in progress
        self._last_task = -1  # the newest graph task a hook ran in
        self._updated: set[int] = set()  # ids of params updated in the backward in progress
        weakref.finalize(optimizer, _remove_hooks, self._handles)
        optimizer.register_state_dict_pre_hook(_warn_if_window_open)
        for group in optimizer.param_groups:
            self.register(group["params"])

    # ----------------------------------------------------------------- registration
    def register(self, params: list[Tensor]) -> None:
        """Hook every parameter that requires grad (frozen ones get no gradient to consume)."""
        for param in params:
            if (
                isinstance(param, Tensor)
                and param.requires_grad
                and id(param) not in self._handles
                and id(param) not in self._ddp_params
            ):
                self._handles[id(param)] = param.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._locations.clear()

    def reset(self) -> None:
        """Forget the open window (after ``load_state_dict``: the groups and the run changed)."""
        self.drop_gradients()
        self.position = -1
        self._updated.clear()
        self._locations.clear()

    def drop_gradients(self) -> None:
        """``zero_grad()``: discard low-rank accumulations; a backward that raised is over."""
        self.lowrank_grads.clear()
        self._pending.clear()
        self._root = None

    # ----------------------------------------------------------------- lookups
    def _locate(self, optimizer: LowRankOptimizer, param: Tensor) -> tuple[dict[str, Any], str] | None:
        """The param's group and display name, or None if it is no longer in the optimizer."""
        for attempt in range(2):
            location = self._locations.get(id(param))
            if location is not None:
                group_index, index = location
                groups = optimizer.param_groups
                if group_index < len(groups) and index < len(groups[group_index]["params"]):
                    group = groups[group_index]
                    if group["params"][index] is param:
                        return group, optimizer._name(group, index, group_index)
            if attempt == 0:  # groups were added or replaced (load_state_dict): rebuild
                self._locations = {
                    id(p): (gi, i)
                    for gi, g in enumerate(optimizer.param_groups)
                    for i, p in enumerate(g["params"])
                }
        return None

    def _side(
        self, optimizer: LowRankOptimizer, param: Tensor, group: dict[str, Any], name: str
    ) -> Side | None:
        if param.grad is None:  # accumulated in low-rank form: validated when it arrived
            return optimizer._projected_side(param, group)
        return optimizer._validate_param(param, group, name)

    # ----------------------------------------------------------------- the hook
    def _on_grad_ready(self, param: Tensor) -> None:
        optimizer = self._optimizer()
        if optimizer is None or param.grad is None:
            return
        located = self._locate(optimizer, param)
        if located is None:
            return
        group, name = located
        try:
            # Inside the try: a refusal after another parameter's hook opened this backward must
            # close it too, or the next backward would be counted as part of this one.
            self._check_grad_is_global(optimizer, param, name)
            self._enter_backward(name)
            with torch.no_grad():
                side = optimizer._validate_param(param, group, name)
                if self.position == self.options.accumulation_steps - 1:
                    if id(param) in self._updated:
                        raise RuntimeError(
                            f"{type(optimizer).__name__} (layerwise=True): the gradient of {name} "
                            "arrived twice in one backward pass (reentrant activation checkpointing with "
                            "the parameter used inside and outside a checkpointed segment?), after it was "
                            "already updated from the first part; use "
                            "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
                        )
                    self._update(optimizer, param, group, side, name)
                else:
                    self._accumulate(optimizer, param, group, side)
        except BaseException:
            # The backward stops here and its final callback never runs: close it, so the next
            # backward counts as a new micro-batch (this one still counts as one if a hook opened
            # it before this error; a refusal in its first hook leaves the count untouched).
            self._root = None
            raise

    def _check_grad_is_global(self, optimizer: LowRankOptimizer, param: Tensor, name: str) -> None:
        """Refuse to update from a rank's local gradient in a multi-process run.

        Under DDP without :func:`~lowmem.optim.register_layerwise_ddp_hook`, or in any process
        group without ``process_group=``, these hooks would run before any averaging and every
        rank would drift apart silently. An FSDP2 (DTensor) parameter is the exception: FSDP2
        runs these hooks itself, after its reduce-scatter, on the averaged row shard (checked:
        a DTensor gradient must be ``Shard(0)``), and it must not be averaged a second time.
        """
        what = f"{type(optimizer).__name__} (layerwise=True)"
        if sharded.is_dtensor(param):
            if self.options.process_group is not None:
                raise ValueError(
                    f"Invalid process_group: {what} got the gradient of {name}, a row-sharded FSDP2 "
                    "parameter, which fully_shard already averaged over the ranks; build the optimizer "
                    "without process_group and use fully_shard's averaging alone (a second all-reduce "
                    "would sum the ranks' different rows)"
                )
            sharded.check_reduced_grad(param, f"{what}, {name}")
            return
        if self._multi_rank_local is None:
            self._multi_rank_local = self._world_size_if_local()
        if self._multi_rank_local:
            raise RuntimeError(
                f"{what} runs in a process group of {self._multi_rank_local} ranks, but its update of "
                f"{name} would use this rank's local gradient: "
                "wrap the model in DistributedDataParallel and call "
                "lowmem.optim.register_layerwise_ddp_hook(ddp_model, optimizer), or shard it with "
                "torch.distributed.fsdp.fully_shard (whose reduced gradients the hooks use), or pass "
                "process_group=torch.distributed.group.WORLD (for ranks that train independently, pass "
                "process_group=torch.distributed.new_group([rank]))"
            )

    def _world_size_if_local(self) -> int:
        """The world size if plain gradients here are local to a multi-rank group, else 0."""
        import torch.distributed as dist

        if self.options.process_group is not None or not (dist.is_available() and dist.is_initialized()):
            return 0
        size = dist.get_world_size()
        return size if size > 1 else 0

    def _enter_backward(self, name: str) -> None:
        """Recognize the start of a new backward pass (micro-batch) from autograd's graph-task id.

        Ids grow with every graph task. A backward in progress owns every task that runs until
        its final callback (nested reentrant ones included); after that, only a newer task is a
        new backward. An older one means the final callback ran on a nested task because no
        hook ran in its parent before it (reentrant checkpointing of the first layers to get
        gradients): the window would have been closed too early, so with accumulation this raises.
        """
        task = current_graph_task()
        if self._root is not None:
            self._last_task = max(self._last_task, task)
            return
        if task <= self._last_task:
            if self.options.accumulation_steps > 1:
                raise RuntimeError(
                    f"layerwise=True with accumulation_steps > 1: the gradient of {name} arrived after "
                    "its backward pass seemed finished, because the first gradients came from a reentrant "
                    "checkpointed segment; micro-batches cannot be counted reliably then. Use "
                    "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
                )
            # Without accumulation every hook updates at once: go on with the same pass.
            self.position = 0
        else:
            self._updated.clear()
            self.position += 1
            self._last_task = task
        self._root = task
        queue_end_of_backward(lambda: self._end_backward(task))

    def _end_backward(self, task: int) -> None:
        if self._root != task:
            return
        self._root = None
        if self.position == self.options.accumulation_steps - 1:
            optimizer = self._optimizer()
            if optimizer is not None:
                self._flush(optimizer)
            self.position = -1

    def _flush(self, optimizer: LowRankOptimizer) -> None:
        """Update the params that accumulated in this window but got no gradient in its last pass."""
        with torch.no_grad():
            for param in list(self._pending):
                located = self._locate(optimizer, param)
                if located is None or (param.grad is None and param not in self.lowrank_grads):
                    self._pending.pop(param, None)
                    continue
                group, name = located
                self._update(optimizer, param, group, self._side(optimizer, param, group, name), name)

    # ----------------------------------------------------------------- accumulate / update
    def _projects(
        self, optimizer: LowRankOptimizer, param: Tensor, group: dict[str, Any], side: Side | None
    ) -> bool:
        """Whether this window accumulates ``param``'s gradient in its low-rank basis."""
        if side is None or self.options.max_grad_norm_per_param is not None:
            return False  # a clipped update needs the norm of the full summed gradient
        if not optimizer._accumulates_projected_grad():
            return False
        state = optimizer.state.get(param)
        if not state or "last_refresh" not in state:
            return False  # the first update computes the first basis from the full gradient
        return not optimizer._refresh_due(state, group, int(state["step"].item()) + 1)

    def _accumulate(
        self, optimizer: LowRankOptimizer, param: Tensor, group: dict[str, Any], side: Side | None
    ) -> None:
        self._pending[param] = None
        if param in self.lowrank_grads or self._projects(optimizer, param, group, side):
            low = optimizer._project_grad(param, param.grad, optimizer.state[param])
            param.grad = None  # free the full gradient now: this is the memory saving
            accumulated = self.lowrank_grads.get(param)
            if accumulated is None:
                self.lowrank_grads[param] = low
            else:
                accumulated.add_(low)
        # else: keep .grad; autograd adds the next micro-batch's gradient into it.

    def _update(
        self, optimizer: LowRankOptimizer, param: Tensor, group: dict[str, Any], side: Side | None, name: str
    ) -> None:
        self._updated.add(id(param))
        self._pending.pop(param, None)
        low = self.lowrank_grads.pop(param, None)
        if low is not None:
            if param.grad is not None:
                low.add_(optimizer._project_grad(param, param.grad, optimizer.state[param]))
                param.grad = None
            self._average(low)
            optimizer._step_param(param, group, side, projected_grad=low)
            return
        self._average(param.grad)
        self._step_full_grad(optimizer, param, group, side, name)
        param.grad = None

    @staticmethod
    def _step_full_grad(
        optimizer: LowRankOptimizer, param: Tensor, group: dict[str, Any], side: Side | None, name: str
    ) -> None:
        if "rank" in group and side is None and not optimizer.state.get(param):
            warnings.warn(
                f"{type(optimizer).__name__}: rank >= min(m, n) for {name} {tuple(param.shape)}; it gets the "
                "full-rank update (projecting onto a rank that large saves nothing)",
                stacklevel=2,
            )
        optimizer._step_param(param, group, side)

    # ----------------------------------------------------------------- DDP (layerwise_ddp.py)
    def hand_over_to_ddp(self, params: list[Tensor]) -> None:
        """Stop hooking ``params``: a DDP comm hook updates them after DDP's all-reduce."""
        for param in params:
            self._ddp_params.add(id(param))
            handle = self._handles.pop(id(param), None)
            if handle is not None:
                handle.remove()

    def update_with_grad(self, optimizer: LowRankOptimizer, param: Tensor, grad: Tensor) -> None:
        """Update ``param`` from ``grad`` (DDP's averaged bucket view) instead of ``param.grad``.

        ``param.grad`` is pointed at ``grad`` for the update (the per-parameter step reads it,
        and clipping scales it in place, so DDP then writes back the gradient that was used)
        and restored afterwards; DDP overwrites it with the bucket when backward finishes.
        """
        located = self._locate(optimizer, param)
        if located is None:
            return  # managed by DDP but not by this optimizer
        group, name = located
        original = param.grad
        param.grad = grad
        try:
            side = optimizer._validate_param(param, group, name)
            self._step_full_grad(optimizer, param, group, side, name)
        finally:
            param.grad = original

    def _average(self, tensor: Tensor) -> None:
        """All-reduce ``tensor`` in place to its mean over the process group (DDP's average)."""
        group = self.options.process_group
        if group is None:
            return
        import torch.distributed as dist

        work = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
        work.div_(dist.get_world_size(group))
        if work is not tensor:
            tensor.copy_(work)

    def close_window(self, optimizer: LowRankOptimizer) -> None:
        """End the open accumulation window early: apply what it accumulated now.

        For a loop whose last window has fewer micro-batches than ``accumulation_steps`` (the
        HF Trainer at the end of an epoch); the next backward starts a new window. No-op when
        no window is open.
        """
        if self.position == -1:
            return
        self._flush(optimizer)
        self.position = -1

    # ----------------------------------------------------------------- step()
    def on_step(self, optimizer: LowRankOptimizer) -> None:
        """What ``step()`` does in layer-wise mode: no update, only checks."""
        if self._root is not None:  # step() never runs inside a backward: that one raised
            self._root = None
        if self.position != -1:
            return  # inside a window: full gradients legitimately wait in .grad
        stray = [
            optimizer._name(group, index, group_index)
            for group_index, group in enumerate(optimizer.param_groups)
            for index, param in enumerate(group["params"])
            if param.grad is not None and param.requires_grad and id(param) not in self._ddp_params
        ]
        if stray:
            warnings.warn(
                f"{type(optimizer).__name__} (layerwise=True): step() updates nothing, but "
                f"{', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''} still hold a gradient that no "
                "backward hook consumed (set by hand, or written back by a DistributedDataParallel model: "
                "call lowmem.optim.register_layerwise_ddp_hook(ddp_model, optimizer)); it is not applied",
                stacklevel=3,
            )


def _remove_hooks(handles: dict[int, RemovableHandle]) -> None:
    for handle in handles.values():
        handle.remove()
    handles.clear()


def _warn_if_window_open(optimizer: LowRankOptimizer) -> None:
    stepper = optimizer._layerwise
    if stepper is not None and stepper.position != -1 and stepper.options.accumulation_steps > 1:
        warnings.warn(
            f"{type(optimizer).__name__}: state_dict() inside an accumulation window (after backward pass "
            f"{stepper.position + 1} of {stepper.options.accumulation_steps}): the gradients accumulated so "
            "far are not part of it; checkpoint between optimizer steps",
            stacklevel=3,
        )
