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
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

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
    grad: Tensor | None = None  # host buffer in the param's dtype (pinned on CUDA)
    grad32: Tensor | None = None  # master-dtype gradient, when the param's dtype differs
    staging: Tensor | None = None  # pinned master cast to the param's dtype, for the copy back (CUDA)
    copied: Any = None  # weakref to the device gradient tensor last copied into ``grad``
    copied_version: int = -1  # that tensor's version counter at the copy
    handle: RemovableHandle | None = field(default=None, repr=False)


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
        **kwargs: the inner optimizer's arguments (``lr``, ``betas``, ``state_dtype``, ...).
            ``layerwise=True`` is rejected: it updates on the device inside backward.

    Attributes:
        inner: the host optimizer (its params are the fp32 masters).
        state: device param → the inner optimizer's state of its master (refreshed by ``step``
            and ``load_state_dict``), so code that sums ``optimizer.state`` bytes sees the host states.

    State dict: the inner optimizer's, plus ``"master_params"`` {index: fp32 tensor} for params
    whose dtype differs from ``master_dtype`` (for the others the model's own weights are the
    master, and ``load_state_dict`` re-reads them from the device).

    Not supported: sparse gradients, ``layerwise=True`` inner optimizers, gradients that live
    only on the host (offloading gradients too; here the device keeps them until ``zero_grad``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        master_dtype: torch.dtype = torch.float32,
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
        chooses_impl = "fused" in kwargs or "foreach" in kwargs
        if issubclass(optimizer_class, _TORCH_FUSED_CPU) and not chooses_impl:
            kwargs["fused"] = True
        self.master_dtype = master_dtype
        self._slots: dict[int, _Slot] = {}
        self._pending_inner_groups: list[dict[str, Any]] | None = []
        self._d2h_streams: dict[torch.device, Any] = {}
        self._h2d_events: list[Any] = []
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
        for index, param in enumerate(group["params"]):
            if id(param) in self._slots:
                raise ValueError(f"parameter params[{index}] appears in more than one param group")
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
        slot = _Slot(master=master)
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

    # ----------------------------------------------------------------- gradients to the host
    def _copy_grad(self, param: Tensor, non_blocking: bool) -> None:
        """Copy ``param.grad`` into its host buffer (queued on a side stream if ``non_blocking``)."""
        grad = param.grad
        if grad is None:
            return
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
        else:
            slot.grad.copy_(grad)
        slot.copied = weakref.ref(grad)
        slot.copied_version = grad._version

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

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update the masters on the host with the inner optimizer and copy them to the device params.

        Args:
            closure: reevaluates the model and returns the loss (run with grad enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gather_grads()
        self._wait_for_copies_back()
        self._copy_hyper(self.param_groups, self.inner.param_groups)  # LR schedulers write the outer groups
        self.inner.step()
        self._copy_back(work)
        for _, slot in work:
            slot.master.grad = None
        self._link_state()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the device gradients; the host buffers are reused by the next backward."""
        super().zero_grad(set_to_none)
        for slot in self._slots.values():
            slot.master.grad = None

    # ----------------------------------------------------------------- masters
    @torch.no_grad()
    def load_master_from_params(self) -> None:
        """Re-read every master from its device param (after the model's weights were changed by hand)."""
        self._wait_for_copies_back()
        for group in self.param_groups:
            for param in group["params"]:
                self._slots[id(param)].master.copy_(param)

    def master_params(self) -> list[Tensor]:
        """The host fp32 masters, in param-group order (the inner optimizer's parameters)."""
        return [self._slots[id(p)].master for group in self.param_groups for p in group["params"]]

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus the masters that the device params cannot restore.

        ``"master_params"``: {index in param-group order: fp32 master} for each param whose dtype is
        not ``master_dtype`` (bf16 weights lose the master's low bits); tensors only, so
        ``torch.load(weights_only=True)`` reads it.
        """
        self._wait_for_copies_back()
        self._copy_hyper(self.param_groups, self.inner.param_groups)
        state = self.inner.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        state["master_params"] = {
            index: self._slots[id(param)].master.clone()
            for index, param in enumerate(params)
            if param.dtype != self.master_dtype
        }
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
        if optimizer is not None and id(param) in optimizer._slots:
            optimizer._copy_grad(param, non_blocking=True)


def _remove_hooks(slots: dict[int, _Slot]) -> None:
    for slot in slots.values():
        if slot.handle is not None:
            slot.handle.remove()
