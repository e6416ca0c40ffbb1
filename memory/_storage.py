"""Storage identity of tensors, and a ledger of the storages autograd saves for backward.

Activation offload reasons about *storages*, not tensors: ``nn.Linear`` saves ``weight.t()``, a
view that is not an ``nn.Parameter`` but shares the parameter's memory; attention saves several
views of one ``qkv`` buffer. Moving memory means moving a storage once and rebuilding every view
of it, and deciding "is this a parameter" means asking whether its storage is a parameter's.

``SavedTensorCounter`` is the measuring stick of DESIGN.md ("measure activation memory by
counting bytes in ``saved_tensors_hooks``"): it records the storage of every tensor saved for
backward, and later answers how many of those bytes are still alive. With offload on, the
originals die once copied, so the alive bytes are what really stays on the compute device.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["SavedTensorCounter", "byte_view", "root_of", "storage_key", "tensors_of"]


def storage_key(t: torch.Tensor) -> tuple[str, int, int]:
    """``(device, data_ptr, nbytes)`` of ``t``'s untyped storage: equal for every view of it.

    A data pointer alone is reused by the allocator once a storage dies, so callers that keep
    keys across time must also hold a ``StorageWeakRef`` and check it has not expired.
    """
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr(), s.nbytes())


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``t`` as a flat ``uint8`` tensor ``[storage.nbytes()]`` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def rebuild(
    storage_bytes: torch.Tensor,
    dtype: torch.dtype,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
) -> torch.Tensor:
    """A tensor of ``dtype`` over ``storage_bytes``' storage, at element ``offset`` with ``size``/``stride``.

    The inverse of :func:`byte_view` for one view: every view of a storage is rebuilt over the one
    copy, so aliasing between saved views survives the round trip.
    """
    out = torch.empty(0, dtype=dtype, device=storage_bytes.device)
    return out.set_(storage_bytes.untyped_storage(), offset, size, stride)


def root_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor at the end of ``t``'s ``._base`` chain (``t`` itself when it is not a view)."""
    while t._base is not None:
        t = t._base
    return t


def tensors_of(obj: nn.Module | torch.Tensor | Iterable[Any] | None) -> list[torch.Tensor]:
    """Tensors named by ``obj``: a module's parameters and buffers, a tensor, or an iterable of either."""
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, nn.Module):
        return [*obj.parameters(), *obj.buffers()]
    out: list[torch.Tensor] = []
    for item in obj:
        out.extend(tensors_of(item))
    return out


class SavedTensorCounter:
    """Context manager that records every tensor saved for backward inside it, by storage.

    It pushes its own ``saved_tensors_hooks`` pair and forwards each tensor to the pair that was
    active when it was entered (e.g. an :func:`~lowmem.memory.offload_activations` context), so it
    measures what an outer context does without changing it. Only the innermost hooks run:
    checkpointed regions inside it (their own hooks) save nothing here except their inputs, which is
    exactly what checkpointing keeps.

    Args:
        exclude: tensors, modules (parameters and buffers) or iterables of them whose storages are
            not activations and are left out of every count (weights, the caller's input batch).

    After the forward pass:

    - ``saved_bytes()`` — bytes of the distinct storages saved (each storage once).
    - ``alive_bytes(device_type)`` — bytes of those storages that are still alive now. Call it
      after dropping your own references to intermediates: a storage kept alive only by the
      autograd graph is resident activation memory; one that was copied to host and released is
      not.

    Bytes are storage bytes (``untyped_storage().nbytes()``), the memory actually held.
    """

    def __init__(self, exclude: nn.Module | torch.Tensor | Iterable[Any] | None = None) -> None:
        self._exclude = {storage_key(t)[:2] for t in tensors_of(exclude)}
        # Every distinct storage seen, in order; ``_live`` maps a key to its entry while it lives (a
        # dead storage's address may be reused by a new one, which is then a new entry).
        self._records: list[tuple[int, StorageWeakRef, str]] = []
        self._live: dict[tuple[str, int, int], int] = {}
        self._lock = threading.Lock()
        self._entered: torch.autograd.graph.saved_tensors_hooks | None = None
        self._inner: tuple[Any, Any] | None = None

    def __enter__(self) -> SavedTensorCounter:
        if self._entered is not None:
            raise RuntimeError("SavedTensorCounter is not re-entrant; create one per measured region")
        self._inner = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._entered = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._entered.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        entered, self._entered = self._entered, None
        if entered is not None:
            entered.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> Any:
        if t.layout == torch.strided and t.device.type != "meta":
            key = storage_key(t)
            if key[:2] not in self._exclude:
                with self._lock:
                    index = self._live.get(key)
                    if index is None or self._records[index][1].expired():
                        self._live[key] = len(self._records)
                        self._records.append((key[2], StorageWeakRef(t.untyped_storage()), t.device.type))
        if self._inner is None:
            # detach(): returning ``t`` itself would make an output saved by its own grad_fn a
            # reference cycle (torch's saved_tensors_hooks docs).
            return t.detach()
        return self._inner[0](t)

    def _unpack(self, packed: Any) -> torch.Tensor:
        return packed if self._inner is None else self._inner[1](packed)

    def saved_bytes(self, device_type: str | None = None) -> int:
        """Bytes of every distinct storage saved inside the context (optionally on one device type)."""
        return sum(n for n, _, dev in self._records if device_type in (None, dev))

    def alive_bytes(self, device_type: str | None = None) -> int:
        """Bytes of the saved storages still alive now (optionally on one device type)."""
        return sum(n for n, ref, dev in self._records if device_type in (None, dev) and not ref.expired())
