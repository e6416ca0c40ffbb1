"""CPUOffloadOptimizer: fp32 master weights and optimizer states in host memory, update on the host.

The recipe of ZeRO-Offload (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model
Training", arXiv:2101.06840; DeepSpeed's CPUAdam) and of torchao's ``CPUOffloadOptimizer``: the
accelerator holds only the model's weights (often bf16) and, transiently, their gradients; the
fp32 master copy of every weight and the optimizer's states live in host memory, where an
optimizer of any kind updates them; the new weights are copied back. Per step and parameter::

    backward:  grad ready on the device ──(post-accumulate-grad hook, side stream)──▶ pinned host buffer
    step():    wait for the copies; master.grad = host grad (cast to fp32)
               inner_optimizer.step()              # on the host, on fp32 masters
               param ◀──(non_blocking, current stream)── master (cast to the param's dtype)

Device memory per parameter: its weight and gradient only (2 + 2 bytes in bf16), against
2 + 2 + 4 (master) + 8 (AdamW moments) without offload. Host memory: the fp32 master (4 bytes),
the inner optimizer's states (8 for AdamW, about 2.03 for 8-bit states), a gradient buffer in the
param's dtype and, for params not in fp32, an fp32 gradient and a staging buffer for the copy back.

Synchronization (CUDA). Each gradient copy is queued on a side stream that first waits for the
stream that produced the gradient, so it overlaps with the rest of backward; the gradient's
memory is marked as used by that stream (``record_stream``) so freeing it early is safe.
``step()`` waits for the side streams before the host reads any buffer. The copies back are
queued non-blocking on the current stream, so the next forward, queued after them on the same
stream, sees the new weights; an event recorded after them is waited on before the next
``step()`` writes the host buffers they read from.

A gradient changed on the device after its hook copied it (``clip_grad_norm_``, GradScaler's
``unscale_``, a hand-written ``grad.mul_``) is detected by the tensor's version counter and copied
again in ``step()``, so the update always uses the gradient the device holds when ``step()`` runs.

On a machine without an accelerator the "device" is the CPU: nothing is pinned, copies are plain
copies, and the optimizer still keeps a separate fp32 master (bf16 weights on CPU train with fp32
precision, as torch.optim on fp32 weights followed by a cast).

Updating during backward (``update_in_backward=True``)
    The host update of each parameter starts as soon as its gradient is on the host, on one
    worker thread, so the updates of the last layers run while backward still computes the first
    ones (ZeRO-Offload's overlap of the CPU step with backward)::

        backward:  grad ready ──hook──▶ host buffer ──▶ param.grad = None (device memory freed)
                                                   └──▶ worker: inner step of this master alone
        step():    wait for the worker; param ◀── master (as above)

    It takes the contract of lowmem's ``layerwise=True`` (:mod:`lowmem.optim.layerwise`), because
    the update happens before anything that runs between ``backward()`` and ``step()`` could act:

    - hyperparameters are those of the param group *when the gradient arrives* (read in the hook,
      handed to the worker), so an LR scheduler stepped after ``step()`` (the usual order) applies
      to the next backward exactly as without overlap; one stepped between ``backward()`` and
      ``step()`` applies one step late;
    - global-norm clipping (``clip_grad_norm_`` after backward) is not available: the device
      gradients are already gone (it sees none and clips nothing). Inner lowmem optimizers offer
      ``max_grad_norm_per_param``, applied on the host just before each update;
    - gradient accumulation is declared: ``accumulation_steps=k`` counts backward passes (autograd
      graph tasks, as layer-wise stepping does); the first k-1 accumulate in ``.grad`` on the
      device as usual, the k-th copies and updates; a parameter with gradients earlier in the
      window but none in its last backward is updated when that backward ends; a short last
      window (an epoch whose micro-batch count is not a multiple of k) is applied by
      ``close_window()`` before ``step()``, equal to ``step()`` after those backward passes without
      overlap (the summed gradient, not rescaled, as layer-wise ``close_window``);
    - every ``backward()`` that reaches the parameters trains the host masters; ``step()`` waits for
      the worker, raises the first error an update raised (naming the parameter; the others were
      updated) and copies the new weights to the device, so call it before the next forward;
      gradients set by hand after backward are not applied (``step()`` warns).

    The inner optimizer steps one master at a time (its groups narrowed to that master for the
    call), so its ``state_dict`` is the same as without overlap, and results are bitwise equal to
    it for optimizers whose update of a parameter depends on that parameter's gradient and state
    alone (tested: torch AdamW fused, foreach and for-loop; lowmem AdamW8bit with and without
    ``max_grad_norm_per_param``, GaLore 8-bit and bf16 states, Fira, APOLLO-Mini). An optimizer
    that couples parameters within a step (a norm over the whole group) would differ.
"""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lowmem.optim._checks import check_positive_int
from lowmem.optim.layerwise import current_graph_task, queue_end_of_backward

__all__ = ["CPUOffloadOptimizer"]

#: Optimizer classes whose ``fused=True`` runs torch's vectorized, multi-threaded C++ kernel on
#: CPU; it is the default host path for them (measured in ``python -m lowmem.bench.offload_optim``).
_TORCH_FUSED_CPU = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
#: Group keys that are not hyperparameters: never copied between the outer and the inner groups.
_NOT_HYPER = ("params", "param_names")


@dataclass
class _Slot:
    """The host-side buffers of one device parameter."""

    master: Tensor  # fp32 (master_dtype) copy on the host; the inner optimizer's parameter
    device: torch.device  # the param's device and dtype when the optimizer was built: its buffers'
    dtype: torch.dtype  # pinning and dtypes follow them, so a later model.to(...) is refused
    grad: Tensor | None = None  # host buffer in the param's dtype (pinned on CUDA)
    grad32: Tensor | None = None  # master-dtype gradient, when the param's dtype differs
    staging: Tensor | None = None  # pinned master cast to the param's dtype, for the copy back (CUDA)
    copied: Any = None  # weakref to the device gradient tensor last copied into ``grad``
    copied_version: int = -1  # that tensor's version counter at the copy
    handle: RemovableHandle | None = field(default=None, repr=False)
    update: Future | None = field(default=None, repr=False)  # its queued host update (update_in_backward)


class CPUOffloadOptimizer(torch.optim.Optimizer):
    """Run any optimizer on host-resident fp32 master weights and states; only weights stay on the device.

    ``CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)`` is used like the
    optimizer it wraps: ``backward()``, ``step()``, ``zero_grad()``; param groups (with the inner
    optimizer's keys, e.g. ``rank`` for :class:`lowmem.optim.GaLoreAdamW`), LR schedulers (they
    drive this optimizer's ``param_groups``, copied to the inner optimizer at every step), closures,
    step hooks, ``state_dict`` / ``load_state_dict`` (``torch.load(weights_only=True)`` works; a
    resumed run continues bit for bit) all behave as for the inner optimizer.

    Args:
        params: the model's parameters (any device; on CUDA, host buffers are pinned), or param
            groups (dicts), or named parameters.
        optimizer_class: the optimizer to run on the host, e.g. ``torch.optim.AdamW`` (default;
            with ``fused=True`` unless ``fused`` or ``foreach`` is given: torch's C++ kernel) or
            any ``lowmem.optim`` class with any ``state_dtype`` (``lowmem.optim.AdamW8bit`` runs
            the 8-bit C++ kernel of ``csrc/adamw8bit.cpp``).
        master_dtype: dtype of the host master weights and the gradients the inner optimizer sees
            (fp32; params already in it are still copied, since the device copy is a separate tensor).
        update_in_backward: run each parameter's host update on a worker thread as soon as its
            gradient is on the host, overlapped with the rest of backward, and free the device
            gradient then. Off by default because it changes the loop's contract (that of
            ``layerwise=True``: no global-norm clipping, hyperparameters read when the gradient
            arrives, declared accumulation; see the module docstring); results equal the
            default's bit for bit under that contract.
        accumulation_steps: with ``update_in_backward=True``, the number of backward passes
            (micro-batches) whose summed gradients make one update.
        **kwargs: the inner optimizer's arguments (``lr``, ``betas``, ``state_dtype``, ...).
            ``layerwise=True`` is rejected: it updates on the device inside backward.

    Attributes:
        inner: the host optimizer (its params are the fp32 masters).
        state: device param → the inner optimizer's state of its master (refreshed by ``step``
            and ``load_state_dict``), so code that sums ``optimizer.state`` bytes sees the host states.

    State dict: the inner optimizer's, plus ``"master_params"`` {index: fp32 tensor} for params
    whose dtype differs from ``master_dtype`` (for the others the model's own weights are the
    master, and ``load_state_dict`` re-reads them from the device).

    Not supported: sparse gradients, ``layerwise=True`` inner optimizers, multi-process runs with
    ``update_in_backward=True`` (the hooks would update from each rank's local gradient), moving
    or casting the model after building the optimizer (``model.to(...)`` keeps the ``Parameter``
    objects but not the device and dtype the host buffers were set up for): the hooks then leave
    the moved params alone and the next ``step()`` (or ``close_window``, ``load_state_dict``,
    ``load_master_from_params``) raises, naming the parameter; build the optimizer after moving
    the model (``state_dict()`` still works, to carry the state over). Without
    ``update_in_backward`` the device keeps the gradients until ``zero_grad``; with it, each is
    freed as soon as it is on the host.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        master_dtype: torch.dtype = torch.float32,
        update_in_backward: bool = False,
        accumulation_steps: int = 1,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(
                f"optimizer_class must be a torch.optim.Optimizer subclass (e.g. torch.optim.AdamW or "
                f"lowmem.optim.AdamW8bit), not {optimizer_class!r}"
            )
        if issubclass(optimizer_class, CPUOffloadOptimizer):
            raise TypeError(
                "optimizer_class=CPUOffloadOptimizer: offloading twice does nothing; pass the inner class"
            )
        if kwargs.get("layerwise"):
            raise ValueError(
                "layerwise=True updates each parameter on the device inside backward, which defeats "
                "CPUOffloadOptimizer (the update runs on the host in step()); drop layerwise, or use "
                f"{optimizer_class.__name__}(..., layerwise=True) without offload"
            )
        if not isinstance(master_dtype, torch.dtype) or not master_dtype.is_floating_point:
            raise ValueError(
                f"Invalid master_dtype: {master_dtype!r}; pass a floating dtype such as torch.float32"
            )
        if not isinstance(update_in_backward, bool):
            raise ValueError(f"Invalid update_in_backward: {update_in_backward!r}; it must be True or False")
        check_positive_int("accumulation_steps", accumulation_steps)
        if accumulation_steps > 1 and not update_in_backward:
            raise ValueError(
                f"Invalid accumulation_steps: {accumulation_steps}; it needs update_in_backward=True "
                "(without it, accumulate as usual: call backward() k times, then step())"
            )
        chooses_impl = "fused" in kwargs or "foreach" in kwargs
        if issubclass(optimizer_class, _TORCH_FUSED_CPU) and not chooses_impl:
            kwargs["fused"] = True
        self.master_dtype = master_dtype
        self._slots: dict[int, _Slot] = {}
        self._pending_inner_groups: list[dict[str, Any]] | None = []
        self._d2h_streams: dict[torch.device, Any] = {}
        self._h2d_events: list[Any] = []
        self._in_backward = _BackwardUpdates(accumulation_steps) if update_in_backward else None
        self._locations: dict[int, tuple[int, int]] = {}  # id(param) -> (group index, index in group)
        self.inner: torch.optim.Optimizer
        super().__init__(params, {})
        inner_groups, self._pending_inner_groups = self._pending_inner_groups, None
        self.inner = optimizer_class(inner_groups, **kwargs)
        self.defaults = self.inner.defaults
        self._copy_hyper(self.inner.param_groups, self.param_groups)
        self._link_state()
        # Hooks live on the model's params, which may outlive the optimizer: remove them with it.
        weakref.finalize(self, _remove_hooks, self._slots)

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of device params: allocate their host masters and hand them to the inner optimizer."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names")
        masters = []
        self._drain()  # the worker steps the inner optimizer, whose groups change here
        for index, param in enumerate(group["params"]):
            if id(param) in self._slots:
                raise ValueError(f"parameter params[{index}] appears in more than one param group")
            self._locations[id(param)] = (len(self.param_groups) - 1, index)
            if not param.is_floating_point():
                raise TypeError(
                    f"CPUOffloadOptimizer: params[{index}] has dtype {param.dtype}; only floating-point "
                    "parameters can be optimized"
                )
            masters.append(self._add_slot(param).master)
        inner_group = {k: v for k, v in group.items() if k not in _NOT_HYPER}
        inner_group["params"] = list(zip(names, masters, strict=True)) if names else masters
        if self._pending_inner_groups is not None:  # inside __init__: the inner optimizer comes next
            self._pending_inner_groups.append(inner_group)
            return
        self.inner.add_param_group(inner_group)
        self._copy_hyper(self.inner.param_groups[-1:], self.param_groups[-1:])

    def _add_slot(self, param: Tensor) -> _Slot:
        with torch.no_grad():
            master = torch.empty(param.shape, dtype=self.master_dtype, pin_memory=self._pinned(param))
            master.copy_(param.detach())
        slot = _Slot(master=master, device=param.device, dtype=param.dtype)
        if param.requires_grad:
            slot.handle = param.register_post_accumulate_grad_hook(_GradCopyHook(self))
        self._slots[id(param)] = slot
        return slot

    @staticmethod
    def _pinned(param: Tensor) -> bool:
        # Pinned (page-locked) host memory is what lets a copy run asynchronously; only CUDA has it here.
        return param.device.type == "cuda"

    @staticmethod
    def _copy_hyper(sources: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
        for source, target in zip(sources, targets, strict=True):
            for key, value in source.items():
                if key not in _NOT_HYPER:
                    target[key] = value

    def _link_state(self) -> None:
        state: defaultdict[Tensor, Any] = defaultdict(dict)
        for group in self.param_groups:
            for param in group["params"]:
                master = self._slots[id(param)].master
                if master in self.inner.state:
                    state[param] = self.inner.state[master]
        self.state = state

    def _moved(self, param: Tensor) -> bool:
        """Whether ``param`` was moved or cast since the optimizer was built (``model.to(...)`` afterwards).

        Its host buffers were set up for the old device and dtype (pinned only for CUDA; the
        gradient buffer in the old dtype would round a wider gradient), and ``model.to`` keeps the
        same ``Parameter`` object, so nothing else would notice.
        """
        slot = self._slots[id(param)]
        return not (
            param.device == slot.device and param.dtype == slot.dtype and param.shape == slot.master.shape
        )

    def _check_in_place(self, param: Tensor) -> None:
        """Raise, naming the param and the fix, if it was moved or cast since the optimizer was built."""
        if not self._moved(param):
            return
        slot = self._slots[id(param)]
        changes = [
            f"{what} {old} -> {new}"
            for what, old, new in (
                ("device", slot.device, param.device),
                ("dtype", slot.dtype, param.dtype),
                ("shape", tuple(slot.master.shape), tuple(param.shape)),
            )
            if old != new
        ]
        raise RuntimeError(
            f"CPUOffloadOptimizer: {self._name(*self._locations[id(param)])} changed after the optimizer "
            f"was built ({', '.join(changes)}; model.to(...) after CPUOffloadOptimizer(...)?), but its host "
            "master and buffers were set up for the old one; build the optimizer after moving or casting "
            "the model (state_dict() still works: load it into the new optimizer to keep the state)"
        )

    def _check_all_in_place(self) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                self._check_in_place(param)

    # ----------------------------------------------------------------- gradients to the host
    def _copy_grad(self, param: Tensor, non_blocking: bool) -> Any:
        """Copy ``param.grad`` into its host buffer (queued on a side stream if ``non_blocking``).

        Returns a CUDA event recorded after a queued copy (None when the copy is already done).
        """
        grad = param.grad
        if grad is None:
            return None
        if grad.is_sparse:
            raise RuntimeError(
                "CPUOffloadOptimizer does not support sparse gradients; pass sparse=False to nn.Embedding"
            )
        slot = self._slots[id(param)]
        if slot.grad is None:
            slot.grad = torch.empty(param.shape, dtype=param.dtype, pin_memory=self._pinned(param))
        if non_blocking and grad.device.type == "cuda":
            stream = self._d2h_streams.get(grad.device)
            if stream is None:
                stream = self._d2h_streams[grad.device] = torch.cuda.Stream(grad.device)
            # The copy must start after the kernels that produced the gradient (current stream).
            stream.wait_stream(torch.cuda.current_stream(grad.device))
            with torch.cuda.stream(stream):
                slot.grad.copy_(grad, non_blocking=True)
            # The gradient may be freed (zero_grad) before the copy ran: keep its memory until then.
            grad.record_stream(stream)
            copied = torch.cuda.Event()
            copied.record(stream)
        else:
            slot.grad.copy_(grad)
            copied = None
        slot.copied = weakref.ref(grad)
        slot.copied_version = grad._version
        return copied

    def _gather_grads(self) -> list[tuple[Tensor, _Slot]]:
        """Set every master's ``.grad`` to its param's gradient as it is now; return the pairs to update."""
        for stream in self._d2h_streams.values():
            stream.synchronize()
        work = []
        for group in self.param_groups:
            for param in group["params"]:
                slot = self._slots[id(param)]
                grad = param.grad
                if grad is None:
                    slot.master.grad = None
                    continue
                current = slot.copied is not None and slot.copied() is grad
                if not current or slot.copied_version != grad._version:
                    self._copy_grad(param, non_blocking=False)  # no hook ran, or the grad changed since
                host = slot.grad
                if host.dtype != slot.master.dtype:
                    if slot.grad32 is None:
                        slot.grad32 = torch.empty_like(slot.master)
                    host = slot.grad32.copy_(host)
                slot.master.grad = host
                work.append((param, slot))
        return work

    # ----------------------------------------------------------------- weights back to the device
    def _copy_back(self, work: list[tuple[Tensor, _Slot]]) -> None:
        devices = set()
        for param, slot in work:
            if param.device.type == "cuda":
                source = slot.master
                if source.dtype != param.dtype:
                    if slot.staging is None:
                        slot.staging = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)
                    source = slot.staging.copy_(slot.master)  # cast on the host: half the bytes to move
                param.copy_(source, non_blocking=True)
                devices.add(param.device)
            else:
                param.copy_(slot.master)
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._h2d_events.append(event)

    def _wait_for_copies_back(self) -> None:
        """The last step's copies back read the masters and staging buffers: wait before rewriting them."""
        for event in self._h2d_events:
            event.synchronize()
        self._h2d_events.clear()

    # ----------------------------------------------------------------- update_in_backward=True
    def _name(self, group_index: int, index: int) -> str:
        names = self.param_groups[group_index].get("param_names")
        return repr(names[index]) if names else f"params[{index}] of param group {group_index}"

    def _on_grad_ready(self, param: Tensor) -> None:
        """The hook with ``update_in_backward=True``: accumulate, or copy, free and queue the update."""
        updates = self._in_backward
        assert updates is not None
        if param.grad is None:
            return
        name = self._name(*self._locations[id(param)])
        updates.check_single_process(name)
        try:
            self._enter_backward(name)
            if updates.position == updates.accumulation_steps - 1:
                if id(param) in updates.updated:
                    raise RuntimeError(
                        f"CPUOffloadOptimizer (update_in_backward=True): the gradient of {name} arrived "
                        "twice in one backward pass (reentrant activation checkpointing with the parameter "
                        "used inside and outside a checkpointed segment?), after its update was queued "
                        "from the first part; use torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
                    )
                self._queue_update(param)
            else:
                updates.pending[id(param)] = param  # autograd adds the next micro-batch into .grad
        except BaseException:
            # The backward stops here and its final callback never runs: close it, so the next
            # backward counts as a new micro-batch (this one still counts as one).
            updates.root = None
            raise

    def _enter_backward(self, name: str) -> None:
        """Count backward passes by autograd's graph-task id, as ``LayerwiseStepper._enter_backward``."""
        updates = self._in_backward
        assert updates is not None
        task = current_graph_task()
        if updates.root is not None:
            updates.last_task = max(updates.last_task, task)
            return
        if task <= updates.last_task:
            if updates.accumulation_steps > 1:
                raise RuntimeError(
                    "CPUOffloadOptimizer (update_in_backward=True) with accumulation_steps > 1: the gradient "
                    f"of {name} arrived after its backward pass seemed finished, because the first gradients "
                    "came from a reentrant checkpointed segment; micro-batches cannot be counted reliably "
                    "then. Use torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
                )
            updates.position = 0  # without accumulation every hook updates: the same pass goes on
        else:
            updates.updated.clear()
            updates.position += 1
            updates.last_task = task
        updates.root = task
        ref = weakref.ref(self)
        queue_end_of_backward(lambda: _end_backward(ref, task))

    def _end_backward(self, task: int) -> None:
        """When the window's last backward ends: queue the params that got no gradient in it."""
        updates = self._in_backward
        assert updates is not None
        if updates.root != task:
            return
        updates.root = None
        if updates.position == updates.accumulation_steps - 1:
            self._flush_pending()
            updates.position = -1

    @torch.no_grad()
    def _flush_pending(self) -> None:
        """Queue the update of every param that accumulated a gradient in the open window."""
        updates = self._in_backward
        assert updates is not None
        for param in list(updates.pending.values()):
            if param.grad is None:  # dropped by hand since: nothing to apply, as step() skips it
                updates.pending.pop(id(param))
            else:
                self._queue_update(param)

    def _queue_update(self, param: Tensor) -> None:
        """Copy the gradient to the host, free it on the device, queue the host update of its master."""
        updates = self._in_backward
        assert updates is not None
        slot = self._slots[id(param)]
        if slot.update is not None and not slot.update.done():
            # Two backward passes without step(): the last update still reads this host buffer.
            wait_futures([slot.update])
        group_index, index = self._locations[id(param)]
        group = self.param_groups[group_index]
        # The hyperparameters as they are now: what step() would use if backward ended here.
        hyper = {key: value for key, value in group.items() if key not in _NOT_HYPER}
        copied = self._copy_grad(param, non_blocking=True)
        # On CUDA record_stream keeps the memory until the queued copy ran.
        param.grad = None
        slot.update = updates.submit(
            self._host_update, slot, group_index, index, hyper, copied, self._name(group_index, index)
        )
        updates.to_copy_back[id(param)] = param
        updates.updated.add(id(param))
        updates.pending.pop(id(param), None)

    @torch.no_grad()
    def _host_update(
        self, slot: _Slot, group_index: int, index: int, hyper: dict[str, Any], copied: Any, name: str
    ) -> None:
        """Runs on the worker thread: one master's inner step, with the hook's hyperparameters."""
        try:
            self._wait_for_copies_back()  # the last step's copies back read this master
            if copied is not None:
                copied.synchronize()  # the gradient's copy to the host
            assert slot.grad is not None
            host = slot.grad
            if host.dtype != slot.master.dtype:
                if slot.grad32 is None:
                    slot.grad32 = torch.empty_like(slot.master)
                host = slot.grad32.copy_(host)
            slot.master.grad = host
            try:
                self._step_one(group_index, index, slot.master, hyper)
            finally:
                slot.master.grad = None
        except Exception as exc:
            raise RuntimeError(
                f"CPUOffloadOptimizer (update_in_backward=True): the host update of {name} failed: {exc}"
            ) from exc

    def _step_one(self, group_index: int, index: int, master: Tensor, hyper: dict[str, Any]) -> None:
        """``inner.step()`` with its groups narrowed to ``master`` alone (its own group, its own name).

        The state dict stays the inner optimizer's; elementwise optimizers update a tensor the same
        whether it is stepped alone or in a list (fused/foreach kernels group tensors only for speed).
        """
        inner = self.inner
        groups = inner.param_groups
        group = groups[group_index]
        params, names = group["params"], group.get("param_names")
        group.update(hyper)
        group["params"] = [master]
        if names:
            group["param_names"] = [names[index]]
        inner.param_groups = [group]
        try:
            inner.step()
        finally:
            inner.param_groups = groups
            group["params"] = params
            if names:
                group["param_names"] = names

    def _drain(self) -> None:
        """Wait for every queued host update; raise the first error one of them raised."""
        updates = self._in_backward
        if updates is None or not updates.futures:
            return
        futures, updates.futures = updates.futures, []
        wait_futures(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error

    def _finish_backward_updates(self) -> None:
        """``step()`` with ``update_in_backward=True``: wait for the worker, copy the new weights back."""
        updates = self._in_backward
        assert updates is not None
        updates.root = None  # step() never runs inside a backward: one that raised is over
        try:
            self._drain()
        finally:
            # After an error too: the masters that were updated reach the device (the failed one's
            # master holds whatever its update left, and the device gets the same).
            work = [(param, self._slots[id(param)]) for param in updates.to_copy_back.values()]
            updates.to_copy_back.clear()
            self._wait_for_copies_back()  # the staging buffers may still be read by the last copies back
            self._copy_back(work)
            self._link_state()
        if updates.position == -1:
            stray = [
                self._name(group_index, index)
                for group_index, group in enumerate(self.param_groups)
                for index, param in enumerate(group["params"])
                if param.grad is not None and param.requires_grad
            ]
            if stray:
                warnings.warn(
                    "CPUOffloadOptimizer (update_in_backward=True): step() applies the updates made during "
                    f"backward, but {', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''} still hold a "
                    "gradient that no backward hook consumed (set or changed by hand after backward); it is "
                    "not applied",
                    stacklevel=3,
                )

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update the masters on the host with the inner optimizer and copy them to the device params.

        Args:
            closure: reevaluates the model and returns the loss (run with grad enabled).
        """
        self._check_all_in_place()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._in_backward is not None:
            self._finish_backward_updates()
            return loss
        work = self._gather_grads()
        self._wait_for_copies_back()
        self._copy_hyper(self.param_groups, self.inner.param_groups)  # LR schedulers write the outer groups
        self.inner.step()
        self._copy_back(work)
        for _, slot in work:
            slot.master.grad = None
        self._link_state()
        return loss

    def close_window(self) -> None:
        """End the open accumulation window early: queue the updates of what it accumulated now.

        For a loop whose last window has fewer micro-batches than ``accumulation_steps`` (an epoch
        whose length is not a multiple of it; the HF Trainer's last update of an epoch): call
        ``close_window()`` then ``step()`` after the window's last ``backward()``. Every param with
        a gradient accumulated in the window is updated from it, on the worker, with the param
        group's hyperparameters as they are now; ``step()`` waits and copies the weights back. The
        next ``backward()`` opens a new window of ``accumulation_steps``.

        What is applied is the SUM of the window's micro-batch gradients (what autograd
        accumulated in ``.grad``), with no rescaling, as ``close_window`` of lowmem's
        ``layerwise=True`` does: ``close_window(); step()`` after j < k backward passes gives the
        weights and state of ``update_in_backward=False`` with ``step()`` after the same j passes,
        bit for bit (same contract as the module docstring's). If each loss was divided by k, the
        short window's update sees j/k of the mean gradient; divide its losses by j instead (the
        HF Trainer does).

        No-op when no window is open (right after an update, or with ``update_in_backward=False``,
        where ``step()`` applies every gradient anyway). Not to be called inside a backward.
        """
        self._check_all_in_place()
        updates = self._in_backward
        if updates is None:
            return
        updates.root = None  # never inside a backward: one that raised is over
        if updates.position == -1:
            return
        self._flush_pending()
        updates.position = -1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the device gradients; the host buffers are reused by the next backward.

        With ``update_in_backward=True`` it drops what the open accumulation window gathered in
        ``.grad`` (the hooks already freed every gradient they consumed) and, as an ordinary
        loop's counter, leaves the window's count of backward passes where it is.
        """
        super().zero_grad(set_to_none)
        updates = self._in_backward
        if updates is not None:
            updates.pending.clear()
            updates.root = None  # zero_grad never runs inside a backward: one that raised is over
            return  # the masters' .grad are set and cleared by the worker alone
        for slot in self._slots.values():
            slot.master.grad = None

    # ----------------------------------------------------------------- masters
    @torch.no_grad()
    def load_master_from_params(self) -> None:
        """Re-read every master from its device param (after the model's weights were changed by hand)."""
        self._check_all_in_place()
        self._drain()
        self._wait_for_copies_back()
        for group in self.param_groups:
            for param in group["params"]:
                self._slots[id(param)].master.copy_(param)

    def master_params(self) -> list[Tensor]:
        """The host fp32 masters, in param-group order (the inner optimizer's parameters)."""
        self._drain()
        return [self._slots[id(p)].master for group in self.param_groups for p in group["params"]]

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus the masters that the device params cannot restore.

        ``"master_params"``: {index in param-group order: fp32 master} for each param whose dtype is
        not ``master_dtype``, now or when the optimizer was built (bf16 weights lose the master's
        low bits); tensors only, so ``torch.load(weights_only=True)`` reads it.
        """
        self._drain()
        updates = self._in_backward
        if updates is not None and updates.position != -1 and updates.accumulation_steps > 1:
            warnings.warn(
                f"CPUOffloadOptimizer: state_dict() inside an accumulation window (after backward pass "
                f"{updates.position + 1} of {updates.accumulation_steps}): the gradients accumulated so far "
                "are not part of it; checkpoint between optimizer steps",
                stacklevel=2,
            )
        self._wait_for_copies_back()
        self._copy_hyper(self.param_groups, self.inner.param_groups)
        state = self.inner.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        # Also by the dtype at construction: the state of a model cast since (refused elsewhere)
        # can still be saved, with every master its params cannot restore, for a new optimizer.
        state["master_params"] = {}
        for index, param in enumerate(params):
            slot = self._slots[id(param)]
            if param.dtype != self.master_dtype or slot.dtype != self.master_dtype:
                state["master_params"][index] = slot.master.clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict from :meth:`state_dict`; masters missing from it are read from the params.

        Load the model's weights first: params whose dtype is ``master_dtype`` take their master
        from the device.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict from CPUOffloadOptimizer.state_dict()")
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_params", {})
        self._check_all_in_place()
        self._drain()
        if self._in_backward is not None:
            self._in_backward.reset()
        self._wait_for_copies_back()
        self.inner.load_state_dict(state_dict)
        self._copy_hyper(self.inner.param_groups, self.param_groups)
        params = [p for group in self.param_groups for p in group["params"]]
        unknown = set(masters) - set(range(len(params)))
        if unknown:
            raise ValueError(
                f"state_dict['master_params'] has indices {sorted(unknown)} beyond the {len(params)} params"
            )
        for index, param in enumerate(params):
            slot = self._slots[id(param)]
            if index in masters:
                saved = masters[index]
                if tuple(saved.shape) != tuple(param.shape):
                    raise ValueError(
                        f"state_dict['master_params'][{index}] has shape {tuple(saved.shape)}, but param "
                        f"{index} has shape {tuple(param.shape)}"
                    )
                slot.master.copy_(saved)
                param.copy_(slot.master)
            else:
                slot.master.copy_(param)
        self._link_state()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "CPUOffloadOptimizer cannot be copied or pickled (it holds hooks and host buffers); save "
            "state_dict() and load it into a new one"
        )


class _GradCopyHook:
    """The post-accumulate-grad hook of every param: copy its gradient to the host as soon as it is ready.

    Holds the optimizer weakly: the hook lives on the model's parameter.
    """

    def __init__(self, optimizer: CPUOffloadOptimizer) -> None:
        self._optimizer = weakref.ref(optimizer)

    def __call__(self, param: Tensor) -> None:
        optimizer = self._optimizer()
        if optimizer is None or id(param) not in optimizer._slots:
            return
        if optimizer._moved(param):
            # step() raises. Not here: this may be an optimizer the user already replaced after
            # model.to(...) but that is not collected yet; it must leave the new one's params alone.
            return
        if optimizer._in_backward is None:
            optimizer._copy_grad(param, non_blocking=True)
        else:
            optimizer._on_grad_ready(param)


def _remove_hooks(slots: dict[int, _Slot]) -> None:
    for slot in slots.values():
        if slot.handle is not None:
            slot.handle.remove()


def _end_backward(ref: Any, task: int) -> None:
    optimizer = ref()
    if optimizer is not None and optimizer._in_backward is not None:
        optimizer._end_backward(task)


class _BackwardUpdates:
    """The bookkeeping of ``update_in_backward=True``: the accumulation window and the worker thread.

    Attributes:
        position: index of the backward pass in progress (or last finished) within the window;
            -1 before the window's first backward.
        pending: params with a gradient accumulated in the open window, not queued yet.
        to_copy_back: params whose master was updated since the last ``step()``.
    """

    def __init__(self, accumulation_steps: int) -> None:
        self.accumulation_steps = accumulation_steps
        self.position = -1
        self.root: int | None = None  # graph task of the backward in progress
        self.last_task = -1  # the newest graph task a hook ran in
        self.updated: set[int] = set()  # ids of params queued in the backward in progress
        self.pending: dict[int, Tensor] = {}
        self.to_copy_back: dict[int, Tensor] = {}
        self.futures: list[Future] = []
        self._executor: ThreadPoolExecutor | None = None
        self._multi_rank: int | None = None  # world size when gradients are rank-local, else 0

    def submit(self, fn: Callable[..., None], *args: Any) -> Future:
        """Queue ``fn(*args)`` on the one worker thread (updates run in the order they are queued)."""
        if self._executor is None:
            # One thread: torch's CPU kernels release the GIL and use the intra-op pool themselves.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowmem-offload")
            weakref.finalize(self, self._executor.shutdown, wait=False)
        future = self._executor.submit(fn, *args)
        self.futures.append(future)
        return future

    def reset(self) -> None:
        """Forget the open window (``load_state_dict``: the run changed)."""
        self.position = -1
        self.root = None
        self.updated.clear()
        self.pending.clear()

    def check_single_process(self, name: str) -> None:
        """Refuse to update from a rank's local gradient (the hooks run before DDP averages)."""
        if self._multi_rank is None:
            import torch.distributed as dist

            initialized = dist.is_available() and dist.is_initialized()
            size = dist.get_world_size() if initialized else 1
            self._multi_rank = size if size > 1 else 0
        if self._multi_rank:
            raise RuntimeError(
                "CPUOffloadOptimizer (update_in_backward=True) runs in a process group of "
                f"{self._multi_rank} ranks, but its update of {name} would use this rank's local gradient "
                "(the hooks run before DistributedDataParallel averages); use update_in_backward=False, "
                "whose step() reads the averaged gradients"
            )
