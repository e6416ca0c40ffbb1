"""What the training benchmark measures besides loss: state bytes, peak tensor memory, step times.

Following DESIGN.md, tensor memory on CPU is measured with the PyTorch profiler
(``profile_memory=True``), never process RSS or tracemalloc, which see allocator caching and
Python objects rather than live tensors. On CUDA, ``torch.cuda.max_memory_allocated`` is used.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch


def tensor_bytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Sum of ``nbytes`` of every distinct tensor reachable from ``obj``.

    Walks dicts, lists, tuples and plain objects' ``__dict__`` (galore-torch keeps a projector
    object holding its basis in the optimizer state; its tensors count too). A tensor reached
    twice is counted once.
    """
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, step counters, projection bases)."""
    return tensor_bytes(list(optimizer.state.values()))


def parameter_bytes(params: Iterable[torch.Tensor]) -> int:
    """Total ``nbytes`` of the given tensors."""
    return sum(p.nbytes for p in params)


def profiled_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of live tensor bytes *allocated while* ``fn()`` runs, above what was live before.

    Runs ``fn`` under ``torch.profiler`` with ``profile_memory=True`` and replays its allocation
    events (``+nbytes`` on allocate, ``-nbytes`` on free) in time order; the running sum's maximum
    is the answer. Frees of tensors allocated before the profile are not reported by the profiler,
    so a step that replaces old tensors is slightly over-counted, never under-counted.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with warnings.catch_warnings():
        # Some torch versions warn that events are cleared per cycle; there is only one cycle.
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        with profile(activities=activities, profile_memory=True) as prof:
            fn()
    kineto = prof.profiler.kineto_results if prof.profiler is not None else None
    if kineto is None:
        raise RuntimeError("torch.profiler returned no results; cannot measure peak memory")
    wanted = torch.device(device).type
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in kineto.events()
        if e.name() == "[memory]" and str(e.device_type()).rsplit(".", 1)[-1].lower() == wanted
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


class StepTimer:
    """Wall-clock and CPU timer for one region, synchronising CUDA so GPU work is inside the interval.

    ``seconds``: wall time per entry. ``cpu_seconds``: the process's CPU time (all threads, user +
    system) per entry, so on a CPU run with 2 threads it approaches twice the wall time when
    both are busy, and on a GPU run it is the host's share.
    """

    def __init__(self, device: torch.device) -> None:
        self._sync = device.type == "cuda"
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []

    def __enter__(self) -> StepTimer:
        if self._sync:
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu_seconds.append(time.process_time() - self._cpu_start)


def median_after_warmup(seconds: list[float], warmup: int) -> float:
    """Median of ``seconds[warmup:]`` (all of them if fewer remain); NaN for an empty list."""
    kept = seconds[warmup:] or seconds
    return statistics.median(kept) if kept else float("nan")
