"""Activation offload: tensors saved for backward wait in host memory between forward and backward.

Training memory at long sequences is dominated by activations: every op saves some of its inputs
or outputs for backward, and all of them stay on the accelerator until backward reaches them.
``offload_activations()`` is a ``torch.autograd.graph.saved_tensors_hooks`` context that copies
each saved storage to host memory in the forward pass and brings it back in the backward pass,
layer by layer, as in MEMO (2025, "activations offloaded to host memory layer by layer,
overlapped with compute"):

- forward (pack hook): the copy to host runs on a side CUDA stream that first waits for the compute
  stream, so it overlaps with the next layers' forward; ``record_stream`` keeps the caching
  allocator from reusing the device memory before the copy has read it. Host buffers are pinned
  (page-locked, so the copy is a real asynchronous DMA) and come from :class:`HostBufferPool`,
  which recycles them across layers and steps instead of pinning new memory each time.
- backward (unpack hook): the needed storage comes back on another side stream and the compute
  stream waits on its event; then the next ``prefetch`` storages in reverse pack order — the ones
  backward needs next — start their copies, overlapped with this layer's backward.
- What stays: tensors below ``min_bytes`` (a copy's fixed cost outweighs them), parameters and every
  view of a parameter's storage (``nn.Linear`` saves ``weight.t()``: matching is by storage, so a
  view, a frozen weight or a ``keep=`` tensor is never copied), tensors already on the host, and
  tensor subclasses or non-strided layouts. Moving a parameter frees nothing: it lives on anyway.
- One storage is moved once: attention saves several views of one buffer, ops save the same
  tensor twice; all of them share one host copy and come back as views of one device copy, keyed
  by storage and version counter (an in-place change in between makes a new copy).

On a CPU-only machine it works and changes nothing numerically: CPU tensors already live on the
host, so they stay. ``emulate_device=True`` treats CPU tensors as if they were on a compute device
(copied to separate host buffers and back into fresh storages, no pinning or streams), so the
bookkeeping — what is copied, what is kept, that originals are released — can be tested and
measured without a GPU.

Gradients are bitwise identical to running without the context: the copies are exact, and the
backward runs the same kernels on the same values.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from lowmem.memory._storage import byte_view, rebuild, root_of, storage_key, tensors_of

__all__ = [
    "DEFAULT_MIN_BYTES",
    "ActivationOffload",
    "HostBufferPool",
    "OffloadStats",
    "host_buffer_pool",
    "offload_activations",
]

#: Below 64 KiB a host copy costs more in launch latency (~5-10 us each way) than it frees.
DEFAULT_MIN_BYTES = 1 << 16
#: Host buffers are handed out in multiples of this, so storages of nearly equal size share buffers.
_POOL_GRANULE = 4096


class HostBufferPool:
    """Recycled host byte buffers (optionally pinned) for offloaded storages.

    ``take(nbytes)`` returns a ``uint8`` buffer of at least ``nbytes`` (rounded up to 4 KiB) and the
    CUDA event that must complete before the buffer may be overwritten (the last copy that read it),
    or ``None``; ``give(buffer, event)`` returns it. Pinning memory (``cudaHostAlloc``) costs
    milliseconds per call, and a training step offloads the same sizes layer after layer, step after
    step: after the first step, ``take`` is served from the pool.

    Thread-safe: buffers come back from autograd's backward threads.
    """

    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self._idle: dict[int, list[tuple[torch.Tensor, Any]]] = defaultdict(list)
        self._lock = threading.Lock()
        #: Buffers created (each a fresh, possibly pinned, allocation).
        self.allocations = 0
        #: ``take`` calls served by an idle buffer.
        self.reuses = 0
        #: Bytes of every buffer this pool has created and not dropped.
        self.allocated_bytes = 0

    def take(self, nbytes: int) -> tuple[torch.Tensor, Any]:
        """A ``uint8`` buffer of ``>= nbytes`` and the event to wait for before writing it (or None)."""
        size = max(_POOL_GRANULE, -(-nbytes // _POOL_GRANULE) * _POOL_GRANULE)
        with self._lock:
            idle = self._idle.get(size)
            if idle:
                self.reuses += 1
                return idle.pop()
            self.allocations += 1
            self.allocated_bytes += size
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin_memory), None

    def give(self, buffer: torch.Tensor, event: Any = None) -> None:
        """Return ``buffer``; ``event`` (a CUDA event or None) marks the last copy that used it."""
        with self._lock:
            self._idle[buffer.numel()].append((buffer, event))

    @property
    def idle_bytes(self) -> int:
        """Bytes of buffers waiting in the pool."""
        with self._lock:
            return sum(size * len(items) for size, items in self._idle.items())

    def clear(self) -> None:
        """Drop every idle buffer (memory in use by live offloaded tensors is unaffected)."""
        with self._lock:
            dropped = sum(size * len(items) for size, items in self._idle.items())
            self._idle.clear()
            self.allocated_bytes -= dropped


_POOLS: dict[bool, HostBufferPool] = {}
_POOLS_LOCK = threading.Lock()


def host_buffer_pool(pinned: bool) -> HostBufferPool:
    """The process-wide pool of pinned (or pageable) host buffers shared by every offload context."""
    with _POOLS_LOCK:
        if pinned not in _POOLS:
            _POOLS[pinned] = HostBufferPool(pin_memory=pinned)
        return _POOLS[pinned]


@dataclass
class OffloadStats:
    """What an :class:`ActivationOffload` did, in bytes of tensors as saved (``Tensor.nbytes``).

    ``kept_bytes`` maps the reason a tensor stayed on its device (``"parameter"``, ``"small"``,
    ``"host"``: already in host memory, ``"unsupported"``: a subclass or non-strided layout) to
    bytes; ``offloaded_bytes`` counts tensors packed to host, ``copied_bytes`` the storage bytes
    actually copied (shared storages once), ``shared_hits`` the saves served by an existing copy,
    ``prefetched`` / ``fetched_on_demand`` how backward got its storages.
    """

    offloaded_bytes: int = 0
    copied_bytes: int = 0
    copies: int = 0
    shared_hits: int = 0
    kept_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    prefetched: int = 0
    fetched_on_demand: int = 0


class _Kept:
    """A saved tensor left where it was; its version is checked when backward reads it."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        # detach(): the same storage and version counter, but no grad_fn, so an output saved by its
        # own node does not become a reference cycle (saved_tensors_hooks docs).
        self.tensor = tensor.detach()
        self.version = tensor._version


class _HostStorage:
    """One storage copied to host: its buffer, the copy's event, and its way back to the device."""

    __slots__ = (
        "__weakref__",
        "d2h_event",
        "device",
        "device_copy",
        "h2d_event",
        "host",
        "nbytes",
        "owner",
        "pool",
        "seq",
        "slots",
        "source",
        "unpacked",
        "version",
    )

    def __del__(self) -> None:
        # The last saved slot naming this storage is gone (backward consumed it, or the graph was
        # dropped): the buffer goes back to the pool, guarded by the last copy that touched it.
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.give(self.host, self.h2d_event if self.h2d_event is not None else self.d2h_event)


class _Packed:
    """One saved slot: a view (dtype, offset, size, stride) of an offloaded storage."""

    __slots__ = ("dtype", "offset", "record", "size", "stride")

    def __init__(self, record: _HostStorage, t: torch.Tensor) -> None:
        self.record = record
        self.dtype = t.dtype
        self.offset = t.storage_offset()
        self.size = tuple(t.shape)
        self.stride = tuple(t.stride())


class ActivationOffload:
    """The offload engine and its context manager; see the module docstring for what it does.

    Reusable and re-entrant: enter it around every step's forward (and backward, if you like); the
    host pool, CUDA streams and statistics persist across entries. Create it through
    :func:`offload_activations`.
    """

    def __init__(
        self,
        min_bytes: int = DEFAULT_MIN_BYTES,
        pin_memory: bool | None = None,
        use_streams: bool | None = None,
        *,
        keep: nn.Module | torch.Tensor | Iterable[Any] | None = None,
        prefetch: int = 2,
        emulate_device: bool = False,
    ) -> None:
        if not isinstance(min_bytes, int) or isinstance(min_bytes, bool) or min_bytes < 0:
            raise ValueError(f"min_bytes must be an int >= 0 (bytes), got {min_bytes!r}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0 (storages fetched ahead), got {prefetch!r}")
        cuda = torch.cuda.is_available()
        if pin_memory and not cuda:
            raise ValueError("pin_memory=True needs a CUDA device; pass pin_memory=None (automatic)")
        if use_streams and not cuda:
            raise ValueError("use_streams=True needs a CUDA device; pass use_streams=None (automatic)")
        self.min_bytes = min_bytes
        self.pin_memory = cuda if pin_memory is None else bool(pin_memory)
        self.use_streams = cuda if use_streams is None else bool(use_streams)
        self.prefetch = prefetch
        self.emulate_device = bool(emulate_device)
        self.stats = OffloadStats()
        self._lock = threading.RLock()
        # Storages that never move: (device, data_ptr) -> weak ref (a dead one no longer counts).
        self._kept: dict[tuple[str, int], StorageWeakRef] = {}
        for t in tensors_of(keep):
            self._remember_kept(t)
        # Live offloaded storages by storage key, to move each one once.
        self._by_storage: dict[tuple[str, int, int], weakref.ref[_HostStorage]] = {}
        # Offloaded storages in pack order: backward wants them back in reverse.
        self._order: list[weakref.ref[_HostStorage]] = []
        self._streams: dict[tuple[str, torch.device], Any] = {}
        self._hooks: list[torch.autograd.graph.saved_tensors_hooks] = []

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> ActivationOffload:
        if not self._hooks:
            self._prune()
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        hooks.__enter__()
        self._hooks.append(hooks)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.pop().__exit__(*exc)

    # -- which tensors move ------------------------------------------------------------------

    def _remember_kept(self, t: torch.Tensor) -> None:
        # An FSDP2 parameter is a DTensor, which has no storage of its own: keep its local shard's.
        local = getattr(t, "_local_tensor", None)
        if isinstance(local, torch.Tensor):
            t = local
        if t.layout == torch.strided and t.device.type != "meta":
            self._kept[storage_key(t)[:2]] = StorageWeakRef(t.untyped_storage())

    def keep_reason(self, t: torch.Tensor) -> str | None:
        """Why ``t`` would stay on its device (``"parameter"``, ``"small"``, ``"host"``,
        ``"unsupported"``), or ``None`` if it would be offloaded."""
        if (
            type(t) not in (torch.Tensor, nn.Parameter)
            or t.layout != torch.strided
            or t.is_quantized
            or t.device.type == "meta"
        ):
            return "unsupported"
        if t.device.type == "cpu" and not self.emulate_device:
            return "host"
        key = storage_key(t)[:2]
        with self._lock:
            ref = self._kept.get(key)
            if ref is not None and not ref.expired():
                return "parameter"
            root = root_of(t)
            # A leaf that requires grad is a parameter (or an input the caller differentiates and
            # holds anyway); a frozen nn.Parameter is a leaf without grad. Their storages, and every
            # view of them seen later, stay put.
            if root.is_leaf and (root.requires_grad or isinstance(root, nn.Parameter)):
                self._remember_kept(root)
                return "parameter"
        if t.nbytes < self.min_bytes:
            return "small"
        return None

    # -- forward: pack -----------------------------------------------------------------------

    def pack(self, t: torch.Tensor) -> Any:
        """Pack hook: keep ``t`` (see :meth:`keep_reason`) or copy its storage to host memory once."""
        reason = self.keep_reason(t)
        if reason is not None:
            with self._lock:
                self.stats.kept_bytes[reason] += t.nbytes
            return _Kept(t)
        key = storage_key(t)
        with self._lock:
            ref = self._by_storage.get(key)
            record = ref() if ref is not None else None
            if record is None or record.source.expired() or record.version != t._version:
                record = self._copy_to_host(t, key)
            else:
                self.stats.shared_hits += 1
            record.slots += 1
            self.stats.offloaded_bytes += t.nbytes
        return _Packed(record, t)

    def _stream(self, kind: str, device: torch.device) -> Any:
        key = (kind, device)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=device)
        return self._streams[key]

    def _copy_to_host(self, t: torch.Tensor, key: tuple[str, int, int]) -> _HostStorage:
        source = byte_view(t)
        nbytes = source.numel()
        cuda = t.device.type == "cuda"
        pool = host_buffer_pool(self.pin_memory and cuda)
        buffer, ready = pool.take(nbytes)
        host = buffer[:nbytes]
        event = None
        if cuda and self.use_streams:
            compute = torch.cuda.current_stream(t.device)
            side = self._stream("d2h", t.device)
            side.wait_stream(compute)  # the tensor is written by work already queued on compute
            if ready is not None:
                side.wait_event(ready)  # the buffer's previous copy back must have read it
            with torch.cuda.stream(side):
                host.copy_(source, non_blocking=pool.pin_memory)
                event = side.record_event()
            # The caching allocator may hand this memory to the compute stream as soon as the
            # tensor dies; record_stream makes it wait for the side stream's copy first.
            source.record_stream(side)
        elif cuda:
            compute = torch.cuda.current_stream(t.device)
            if ready is not None:
                compute.wait_event(ready)
            host.copy_(source, non_blocking=pool.pin_memory)
            event = compute.record_event()
        else:
            host.copy_(source)
        record = _HostStorage()
        record.owner = self
        record.pool = pool
        record.host = buffer
        record.nbytes = nbytes
        record.device = t.device
        record.d2h_event = event
        record.h2d_event = None
        record.device_copy = None
        record.source = StorageWeakRef(t.untyped_storage())
        record.version = t._version
        record.slots = 0
        record.unpacked = 0
        record.seq = len(self._order)
        self._order.append(weakref.ref(record))
        self._by_storage[key] = weakref.ref(record)
        self.stats.copies += 1
        self.stats.copied_bytes += nbytes
        return record

    # -- backward: unpack and prefetch -------------------------------------------------------

    def _copy_to_device(self, record: _HostStorage) -> tuple[torch.Tensor, bool]:
        """Start the copy of ``record`` back to its device; returns (bytes, allocated on a side stream)."""
        device = record.device
        host = record.host[: record.nbytes]
        if device.type == "cuda" and self.use_streams:
            side = self._stream("h2d", device)
            if record.d2h_event is not None:
                side.wait_event(record.d2h_event)
            with torch.cuda.stream(side):
                out = torch.empty(record.nbytes, dtype=torch.uint8, device=device)
                out.copy_(host, non_blocking=record.pool.pin_memory)
                record.h2d_event = side.record_event()
            return out, True
        if device.type == "cuda":
            out = host.to(device, non_blocking=record.pool.pin_memory)
            record.h2d_event = torch.cuda.current_stream(device).record_event()
            return out, False
        # emulate_device on CPU (or another accelerator): a fresh storage, as a device copy would be.
        return host.to(device, copy=True), False

    def prefetch_records(self, records: Iterable[_HostStorage]) -> None:
        """Start copying ``records`` back now (only with CUDA side streams; otherwise a no-op)."""
        with self._lock:
            for record in records:
                if record.device_copy is None and record.device.type == "cuda" and self.use_streams:
                    record.device_copy = (*self._copy_to_device(record), True)

    def unpack(self, packed: Any) -> torch.Tensor:
        """Unpack hook: the saved tensor, on its device, with its original values."""
        if isinstance(packed, _Kept):
            if packed.tensor._version != packed.version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an "
                    f"inplace operation (a saved tensor of shape {tuple(packed.tensor.shape)} is at "
                    f"version {packed.tensor._version}; expected version {packed.version}); "
                    "lowmem.memory.offload_activations kept it in place because it is a parameter "
                    "or smaller than min_bytes"
                )
            return packed.tensor
        record = packed.record
        with self._lock:
            copy = record.device_copy
            if copy is None:
                copy = (*self._copy_to_device(record), False)
                self.stats.fetched_on_demand += 1
            elif copy[2]:
                self.stats.prefetched += 1
            data, on_side_stream, _ = copy
            if on_side_stream:
                compute = torch.cuda.current_stream(record.device)
                compute.wait_event(record.h2d_event)
                # Allocated on the side stream, used and freed on the compute stream.
                data.record_stream(compute)
            record.unpacked += 1
            # Views of one storage share one device copy; drop our reference once each saved
            # slot has had it, so the memory goes when autograd is done with it.
            record.device_copy = None if record.unpacked % record.slots == 0 else (data, False, False)
            self._prefetch_before(record)
        return rebuild(data, packed.dtype, packed.offset, packed.size, packed.stride)

    def _prefetch_before(self, record: _HostStorage) -> None:
        """Start the copies of the next ``prefetch`` storages backward will need (reverse pack order)."""
        if not (self.use_streams and record.device.type == "cuda" and self.prefetch):
            return
        pending = 0
        i = record.seq - 1
        while i >= 0 and pending < self.prefetch:
            earlier = self._order[i]()
            i -= 1
            if earlier is None or earlier.unpacked > 0 or earlier.device != record.device:
                continue
            pending += 1
            if earlier.device_copy is None:
                earlier.device_copy = (*self._copy_to_device(earlier), True)

    def _prune(self) -> None:
        """Forget dead records between steps so the pack-order list does not grow without bound."""
        with self._lock:
            alive = [r for r in (ref() for ref in self._order) if r is not None]
            for seq, record in enumerate(alive):
                record.seq = seq
            self._order = [weakref.ref(r) for r in alive]
            self._by_storage = {k: v for k, v in self._by_storage.items() if v() is not None}
            self._kept = {k: v for k, v in self._kept.items() if not v.expired()}


def offload_activations(
    min_bytes: int = DEFAULT_MIN_BYTES,
    pin_memory: bool | None = None,
    use_streams: bool | None = None,
    *,
    keep: nn.Module | torch.Tensor | Iterable[Any] | None = None,
    prefetch: int = 2,
    emulate_device: bool = False,
) -> ActivationOffload:
    """Context manager: tensors saved for backward inside it live in host memory until backward.

    Example::

        offload = lowmem.memory.offload_activations(keep=model)  # reuse it every step
        for batch in data:
            with offload:
                loss = model(batch).loss
            loss.backward()

    Args:
        min_bytes: tensors smaller than this (``Tensor.nbytes``) stay on the device.
        pin_memory: page-locked host buffers (asynchronous DMA). ``None``: on when CUDA is present.
        use_streams: copy on side CUDA streams overlapped with compute, and prefetch in backward.
            ``None``: on when CUDA is present.
        keep: a module (its parameters and buffers), tensors, or iterables of them whose storages
            must never be copied. Trainable parameters and frozen ``nn.Parameter``s are recognised
            without it (through their views' ``._base``); ``keep`` also covers detached aliases and
            buffers.
        prefetch: how many storages ahead (in reverse pack order) backward copies back early.
        emulate_device: treat CPU tensors as if they lived on an accelerator (copy them to separate
            host buffers and back into fresh storages). For tests and CPU benchmarks of the
            bookkeeping; it saves no memory.

    Returns:
        An :class:`ActivationOffload`; its ``stats`` (:class:`OffloadStats`) say what moved.

    Nesting: only the innermost ``saved_tensors_hooks`` context applies (PyTorch's rule), so
    ``torch.utils.checkpoint`` regions inside it keep their own behaviour (this context then moves
    only the inputs checkpointing keeps); ``torch.no_grad`` regions save nothing. Leaving the context,
    normally or by an exception, removes its hooks.
    """
    return ActivationOffload(
        min_bytes,
        pin_memory,
        use_streams,
        keep=keep,
        prefetch=prefetch,
        emulate_device=emulate_device,
    )
