"""Bytes of saved activations resident on the compute device during a whole training step, and their peak.

:class:`~lowmem.memory.SavedTensorCounter` answers "what is still alive after the forward". The
activation modes of :func:`lowmem.memory.estimate` are claims about the *peak* over forward and
backward, which happens elsewhere: with checkpointing, while a layer is recomputed in backward
(its recomputed tensors are saved under torch's own hooks, which a counter entered around the
forward never sees); with offload, while backward holds the copies it brought back. This module
follows every storage that is saved for backward or handed back to backward, wherever it comes
from, and samples their alive bytes after every operator:

- :meth:`ResidentActivations.hooks`: a ``saved_tensors_hooks`` pair that records each saved storage
  and forwards to whatever hooks were active (nothing changes in what autograd keeps);
- :meth:`ResidentActivations.recompute_context_fn`: a ``context_fn`` for ``torch.utils.checkpoint``
  whose recompute context enters those hooks, on top of torch's recomputation hook, so the
  tensors recomputed in backward are recorded as well;
- :meth:`ResidentActivations.offloader`: an :class:`~lowmem.memory.ActivationOffload` that records
  the storages it is given (they die on the device once copied and released) and the device
  copies it hands back to backward;
- :meth:`ResidentActivations.watch`: a ``TorchDispatchMode`` that samples the alive bytes after every
  operator of forward and backward and keeps the peak.

Bytes are storage bytes. Parameters (and anything in ``exclude``) are left out; host buffers of the
offload engine are never recorded, so with ``emulate_device=True`` on a CPU the alive bytes are
what would stay on an accelerator. Transients that are never saved (the logits before the loss,
activation gradients) are not counted: the estimator does not model them either.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.memory._storage import storage_key, tensors_of
from lowmem.memory.offload import ActivationOffload

__all__ = ["ResidentActivations"]


class ResidentActivations:
    """Ledger of the storages saved for backward (or returned to it) and of their peak alive bytes.

    Args:
        exclude: tensors, modules or iterables of them (weights; the batch if wanted) never counted.

    Attributes:
        peak_bytes: the largest :meth:`alive_bytes` sampled inside :meth:`watch`.
        peak_phase: ``"forward"`` or ``"backward"``: where the peak was (backward once
            :meth:`backward_started` was called, or once a saved tensor was unpacked).
    """

    def __init__(self, exclude: nn.Module | torch.Tensor | Iterable[Any] | None = None) -> None:
        self._exclude = {storage_key(t)[:2] for t in tensors_of(exclude)}
        self._live: dict[tuple[str, int, int], tuple[int, StorageWeakRef]] = {}
        self._alive = 0
        self._lock = threading.Lock()
        self.peak_bytes = 0
        self.peak_phase = "forward"
        self._phase = "forward"

    # -- the ledger --------------------------------------------------------------------------

    def record(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage while it lives (once, however many views of it are recorded)."""
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
            return
        key = storage_key(t)
        if key[:2] in self._exclude:
            return
        with self._lock:
            entry = self._live.get(key)
            if entry is not None and not entry[1].expired():
                return
            self._live[key] = (key[2], StorageWeakRef(t.untyped_storage()))
            self._alive += key[2]

    def alive_bytes(self) -> int:
        """Bytes of recorded storages alive now."""
        with self._lock:
            dead = [k for k, (_, ref) in self._live.items() if ref.expired()]
            for k in dead:
                self._alive -= self._live.pop(k)[0]
            return self._alive

    def sample(self) -> int:
        """Take :meth:`alive_bytes` now and keep it if it is the peak."""
        alive = self.alive_bytes()
        if alive > self.peak_bytes:
            self.peak_bytes = alive
            self.peak_phase = self._phase
        return alive

    def backward_started(self) -> None:
        """Mark that samples from now on are in backward."""
        self._phase = "backward"

    # -- where tensors come from -------------------------------------------------------------

    @contextlib.contextmanager
    def hooks(self) -> Iterator[ResidentActivations]:
        """Saved-tensor hooks that record every saved storage and forward to the hooks below."""
        inner = torch._C._autograd._top_saved_tensors_default_hooks(False)

        def pack(t: torch.Tensor) -> Any:
            self.record(t)
            # detach(): an output saved by its own node must not become a reference cycle.
            return t.detach() if inner is None else inner[0](t)

        def unpack(packed: Any) -> torch.Tensor:
            out = packed if inner is None else inner[1](packed)
            self._phase = "backward"
            self.record(out)
            return out

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield self

    def recompute_context_fn(self) -> Callable[[], tuple[Any, Any]]:
        """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): records what recomputation saves."""
        return lambda: (contextlib.nullcontext(), self.hooks())

    def offloader(self, **kwargs: Any) -> ActivationOffload:
        """An :class:`ActivationOffload` (``kwargs`` as :func:`~lowmem.memory.offload_activations`) that
        records what it packs (on the device until copied and released) and the device copies it
        returns in backward."""
        return _RecordingOffload(self, **kwargs)

    @contextlib.contextmanager
    def watch(self) -> Iterator[ResidentActivations]:
        """Sample :meth:`alive_bytes` after every operator run inside (forward and backward)."""
        with _Sampler(self):
            yield self


class _RecordingOffload(ActivationOffload):
    def __init__(self, ledger: ResidentActivations, **kwargs: Any) -> None:
        min_bytes = kwargs.pop("min_bytes", None)
        super().__init__(**({"min_bytes": min_bytes} if min_bytes is not None else {}), **kwargs)
        self._ledger = ledger

    def pack(self, t: torch.Tensor) -> Any:
        self._ledger.record(t)
        return super().pack(t)

    def unpack(self, packed: Any) -> torch.Tensor:
        out = super().unpack(packed)
        self._ledger._phase = "backward"
        self._ledger.record(out)
        return out


class _Sampler(TorchDispatchMode):
    def __init__(self, ledger: ResidentActivations) -> None:
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ledger.sample()
        return out
