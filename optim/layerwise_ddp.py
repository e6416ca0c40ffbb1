r"""Layer-wise stepping inside a ``DistributedDataParallel``-wrapped model, through a DDP comm hook.

A layer-wise optimizer (``layerwise=True``) updates each parameter from a post-accumulate-grad
hook. Under DDP that hook would run on the *local* gradient, before DDP's reducer has averaged
it over the ranks, and the ranks would drift apart. :func:`register_layerwise_ddp_hook` moves
the update to the right moment instead: it removes the optimizer's per-parameter hooks for the
parameters DDP manages and registers a DDP communication hook (``DDP.register_comm_hook``) that,
for every gradient bucket,

1. divides the bucket's flat gradient buffer by the world size and all-reduces it (sum), which
   is exactly DDP's default ``allreduce_hook``, so the averaged gradient is bit-for-bit what
   plain DDP hands to ``step()``;
2. when that all-reduce completes (a ``Future.then`` callback, so communication of later
   buckets and the backward of earlier layers still overlap with it), updates each parameter
   of the bucket with the optimizer's ordinary per-parameter step, reading the averaged
   gradient from the bucket.

So every rank applies the same update, equal to a single process on the global batch, and the
update of layer *l* overlaps with the backward of layers *< l*, as layer-wise stepping intends.

What DDP changes (documented, not hidden):

- **Memory.** DDP keeps every gradient in its bucket buffers (plus ``.grad`` unless
  ``gradient_as_bucket_view=True``) whatever the optimizer does, so layer-wise stepping under
  DDP does not bring gradient memory down to one layer; it brings the overlap and keeps one
  code path for single- and multi-process runs. For the memory saving in data-parallel runs
  pass ``process_group=`` to the optimizer and do not wrap the model (each hook then
  all-reduces one gradient and frees it; see :mod:`lowmem.optim.layerwise`).
- **Accumulation.** DDP's way is ``with ddp_model.no_sync(): loss.backward()`` for all but the
  last micro-batch; gradients then accumulate in ``.grad`` and the comm hook of the last
  backward sees their sum. The optimizer must therefore have ``accumulation_steps=1`` (its own
  counting would run against DDP's); this is checked.
- **After backward** DDP writes the averaged gradients back to ``.grad`` (that is how DDP
  finishes every backward); they are the gradients the updates used, useful for logging
  (e.g. a gradient norm), and ``zero_grad()`` clears them as usual. ``step()`` updates nothing.
- ``find_unused_parameters=True`` is refused: DDP then fills the buckets of unused parameters
  with zeros, and updating from those would move them by weight decay and momentum, where
  ``step()`` skips a parameter without a gradient.

Usage::

    model = DDP(model)
    opt = GaLoreAdamW(lowrank_param_groups(model.module, rank=128), lr=1e-3, layerwise=True)
    register_layerwise_ddp_hook(model, opt)
    for i, batch in enumerate(loader):
        ctx = model.no_sync() if (i + 1) % k else contextlib.nullcontext()
        with ctx:
            (model(batch) / k).backward()   # the k-th backward updates, inside it
        if (i + 1) % k == 0:
            opt.step(); sched.step(); opt.zero_grad()
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

    from lowmem.optim.lowrank_base import LowRankOptimizer

__all__ = ["register_layerwise_ddp_hook"]


class _HookState:
    """What the comm hook needs: the optimizer (weakly), DDP's process group, a lock.

    The ``then`` callbacks of different buckets may run on the communication backend's threads;
    the lock serializes the updates, since optimizer bookkeeping (dispatch caches, APOLLO's
    cached generator) is shared between parameters.
    """

    def __init__(self, optimizer: LowRankOptimizer, process_group: Any) -> None:
        self.optimizer = weakref.ref(optimizer)
        self.process_group = process_group
        self.lock = threading.Lock()

    def update_bucket(self, params: list[Tensor], grads: list[Tensor]) -> None:
        optimizer = self.optimizer()
        if optimizer is None or optimizer._layerwise is None:
            return
        with self.lock, torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                optimizer._layerwise.update_with_grad(optimizer, param, grad)


def _layerwise_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]
    """DDP's default all-reduce (divide, then sum), then the bucket's per-parameter updates.

    (state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]. No annotations:
    DDP's ``_check_comm_hook`` compares them with the real classes, and under ``from __future__
    import annotations`` they are strings.
    """
    import torch.distributed as dist

    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(group))
    future = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    params, grads = bucket.parameters(), bucket.gradients()

    def update(done: torch.futures.Future[list[Tensor]]) -> Tensor:
        reduced = done.value()[0]
        state.update_bucket(params, grads)  # grads are views of the (now averaged) buffer
        return reduced

    return future.then(update)


def register_layerwise_ddp_hook(ddp_model: DistributedDataParallel, optimizer: LowRankOptimizer) -> None:
    """Make a layer-wise lowmem optimizer update ``ddp_model``'s parameters after DDP averages them.

    Args:
        ddp_model: a ``torch.nn.parallel.DistributedDataParallel`` module with no comm hook yet
            and ``find_unused_parameters=False``.
        optimizer: a lowmem optimizer built with ``layerwise=True``, ``accumulation_steps=1``
            and no ``process_group`` (DDP does the averaging); it may hold parameters DDP does
            not manage, which keep their ordinary layer-wise hooks.

    Raises:
        TypeError: ``ddp_model`` is not DDP, or ``optimizer`` is not a lowmem optimizer.
        ValueError: the optimizer is not layer-wise, accumulates itself, has a process group,
            or DDP finds unused parameters.

    See the module docstring for the semantics (and what DDP costs in memory).
    """
    from torch.nn.parallel import DistributedDataParallel

    from lowmem.optim.lowrank_base import LowRankOptimizer

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp_model).__name__}"
        )
    if not isinstance(optimizer, LowRankOptimizer):
        raise TypeError(f"optimizer must be a lowmem optimizer, got {type(optimizer).__name__}")
    options = optimizer._layerwise_options
    name = type(optimizer).__name__
    if optimizer._layerwise is None:
        raise ValueError(
            f"{name} was built without layerwise=True; without it DDP needs nothing from lowmem: call "
            "step() after backward as usual"
        )
    if options.accumulation_steps != 1:
        raise ValueError(
            f"Invalid accumulation_steps: {options.accumulation_steps}; under DDP build the optimizer with "
            "accumulation_steps=1 and accumulate with `with ddp_model.no_sync(): loss.backward()` for all "
            "but the last micro-batch"
        )
    if options.process_group is not None:
        raise ValueError(
            "Invalid process_group: DDP already averages the gradients; build the optimizer without "
            "process_group (it would average them a second time)"
        )
    if ddp_model.find_unused_parameters:
        raise ValueError(
            "ddp_model was built with find_unused_parameters=True: DDP then hands zero gradients for "
            "unused parameters to the comm hook, and updating from them would move those parameters "
            "(weight decay, momentum); build DDP with find_unused_parameters=False"
        )
    ignored = getattr(ddp_model, "parameters_to_ignore", set())
    managed = [p for n, p in ddp_model.module.named_parameters() if p.requires_grad and n not in ignored]
    optimizer._layerwise.hand_over_to_ddp(managed)
    ddp_model.register_comm_hook(_HookState(optimizer, ddp_model.process_group), _layerwise_allreduce_hook)
