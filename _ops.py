"""The one dispatch point: maps (op, device) to an implementation.

Every compute op that has more than one implementation is registered here with the
implementations it has, each named by an import path (``"lowmem.kernels.adamw:adamw"``) so
that nothing heavy is imported until the op is first used on a device that needs it.

Backends:

``ref``
    The pure-PyTorch reference. Always available; runs on any device.
``triton``
    A Triton kernel. Needs CUDA tensors and an importable ``triton``; on CPU tensors it runs
    only under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests use it.
``cpp``
    A compiled C++ CPU op (``csrc/``). Needs CPU tensors and a built extension.
``cuda``
    A compiled CUDA op (``csrc/``). Needs CUDA tensors and a built extension.

Automatic choice: on CUDA tensors ``triton``, else ``cuda``, else ``ref``; on CPU tensors
``cpp``, else ``ref``. ``LOWMEM_BACKEND=ref|triton|cpp|cuda`` or the context manager
:func:`backend` force one backend for every op; forcing a backend an op cannot use on that
device raises :class:`BackendUnavailableError` with the reason. There is no other global state.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

BACKENDS = ("ref", "triton", "cpp", "cuda")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "ref"), "cpu": ("cpp", "ref")}

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("lowmem_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for (by ``LOWMEM_BACKEND`` or :func:`backend`) that cannot run here."""


@dataclass
class _Op:
    name: str
    impls: dict[str, str]  # backend -> "module:attribute"
    dtypes: dict[str, tuple[torch.dtype, ...]]  # backend -> dtypes it supports (absent: any)
    prefer: dict[str, tuple[str, ...]]  # device type -> automatic order, when not the default
    _loaded: dict[str, Callable[..., Any]] = field(default_factory=dict)
    _load_errors: dict[str, str] = field(default_factory=dict)

    def load(self, backend_name: str) -> Callable[..., Any] | None:
        if backend_name in self._loaded:
            return self._loaded[backend_name]
        if backend_name in self._load_errors:
            return None
        module_name, _, attr = self.impls[backend_name].partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # an optional backend failing to import is a reason, not a crash
            self._load_errors[backend_name] = f"importing {self.impls[backend_name]} failed: {exc!r}"
            return None
        if fn is None:
            self._load_errors[backend_name] = f"{self.impls[backend_name]} is not defined in this build"
            return None
        self._loaded[backend_name] = fn
        return fn


_REGISTRY: dict[str, _Op] = {}

# What dispatch chose, keyed by everything the choice depends on that can change while a
# process runs (the forced backend, TRITON_INTERPRET, whether CUDA is visible); an optimizer
# step calls dispatch for every parameter, so the choice must cost a dict lookup, not a search.
_CHOSEN: dict[tuple[Any, ...], Callable[..., Any]] = {}


def register_op(
    name: str,
    *,
    dtypes: dict[str, tuple[torch.dtype, ...]] | None = None,
    prefer: dict[str, tuple[str, ...]] | None = None,
    **impls: str,
) -> None:
    """Register op ``name`` with implementations given as ``backend="module:attribute"``.

    ``ref`` is required: every op has a pure-PyTorch reference. ``dtypes`` restricts a backend
    to the dtypes it supports (others fall through to the next backend, e.g. fp64 to ``ref``).
    ``prefer`` replaces the automatic order on a device type, for ops where a measurement
    showed a vendor library beats our kernel (say why next to the registration).
    """
    unknown = (set(impls) | set(dtypes or {})) - set(BACKENDS)
    for order in (prefer or {}).values():
        unknown |= set(order) - set(BACKENDS)
    if unknown:
        raise ValueError(f"register_op({name!r}): unknown backends {sorted(unknown)}; known: {BACKENDS}")
    if "ref" not in impls:
        raise ValueError(f"register_op({name!r}): a 'ref' implementation is required")
    _REGISTRY[name] = _Op(name, dict(impls), dict(dtypes or {}), dict(prefer or {}))
    for key in [k for k in _CHOSEN if k[0] == name]:
        del _CHOSEN[key]


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def _triton_importable() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({exc!r})"
    return None


# dispatch() runs for every op of every parameter in every optimizer step, so reading the two
# environment variables it depends on must be cheap: os.environ.get re-encodes the key on each
# call (~1 µs); on POSIX the mapping's own bytes-keyed dict answers the same question in ~50 ns
# and stays in sync with os.environ (monkeypatch.setenv, os.environ[...] = ...).
_ENVIRON_DATA: dict[bytes, bytes] | None = (
    getattr(os.environ, "_data", None) if os.name == "posix" else None  # type: ignore[assignment]
)


def _getenv(name: str, name_bytes: bytes) -> str | None:
    if isinstance(_ENVIRON_DATA, dict):
        value = _ENVIRON_DATA.get(name_bytes)
        return None if value is None else os.fsdecode(value)
    return os.environ.get(name)


def _interpreting() -> bool:
    return _getenv("TRITON_INTERPRET", b"TRITON_INTERPRET") == "1"


def unavailable_reason(
    op: str, backend_name: str, device: torch.device | str, dtype: torch.dtype | None = None
) -> str | None:
    """Why ``backend_name`` cannot run ``op`` on ``device`` (for ``dtype``); ``None`` if it can."""
    device = torch.device(device)
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {registered_ops()}")
    if backend_name not in BACKENDS:
        raise ValueError(f"unknown backend {backend_name!r}; choose one of {BACKENDS}")
    entry = _REGISTRY[op]
    if backend_name not in entry.impls:
        return f"op {op!r} has no {backend_name} implementation"
    supported = entry.dtypes.get(backend_name)
    if dtype is not None and supported is not None and dtype not in supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported)
        asked = str(dtype).removeprefix("torch.")
        return f"the {backend_name} implementation of {op!r} supports {names}, not {asked}"
    if backend_name in ("triton", "cuda") and device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device (CPU-only build or no driver)"
    if backend_name == "triton":
        if device.type == "cpu" and not _interpreting():
            return "Triton kernels need CUDA tensors (set TRITON_INTERPRET=1 to run them on CPU, slowly)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device.type} tensors"
        reason = _triton_importable()
        if reason:
            return reason
    elif backend_name == "cpp" and device.type != "cpu":
        return f"compiled C++ ops run on CPU tensors, not {device.type}"
    elif backend_name == "cuda" and device.type != "cuda":
        return f"compiled CUDA ops run on CUDA tensors, not {device.type}"
    if entry.load(backend_name) is None:
        return entry._load_errors[backend_name]
    return None


def forced_backend() -> str | None:
    """The backend forced by :func:`backend` or, failing that, ``LOWMEM_BACKEND``; else ``None``."""
    forced = _forced_backend.get()
    if forced is None:
        forced = _getenv("LOWMEM_BACKEND", b"LOWMEM_BACKEND") or None
        if forced is not None and forced not in BACKENDS:
            raise ValueError(f"LOWMEM_BACKEND={forced!r} is not a backend; use one of {', '.join(BACKENDS)}")
    return forced


def choose_backend(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend that :func:`dispatch` would use for ``op`` on ``device`` (and ``dtype``)."""
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        reason = unavailable_reason(op, forced, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {forced!r} was requested for op {op!r} on {device.type} "
                f"but is unavailable: {reason}"
            )
        return forced
    order = _REGISTRY[op].prefer.get(device.type) or _AUTO_ORDER.get(device.type, ("ref",))
    for candidate in order:
        if unavailable_reason(op, candidate, device, dtype) is None:
            return candidate
    return "ref"


def dispatch(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> Callable[..., Any]:
    """The implementation of ``op`` to call for tensors on ``device`` (of ``dtype``, if given)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (
        op,
        device_type,
        dtype,
        forced_backend(),
        _interpreting(),
        device_type == "cuda" and torch.cuda.is_available(),
    )
    fn = _CHOSEN.get(key)
    if fn is None:
        fn = _REGISTRY[op].load(choose_backend(op, device, dtype))
        assert fn is not None  # choose_backend only returns loadable backends
        _CHOSEN[key] = fn
    return fn


def explain(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, str | None]:
    """For each backend, ``None`` if it could run ``op`` on ``device``, else why not."""
    return {b: unavailable_reason(op, b, device, dtype) for b in BACKENDS}


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force every op inside the ``with`` block onto backend ``name``.

    Example::

        with lowmem.backend("ref"):
            opt.step()  # every fused op uses its pure-PyTorch reference
    """
    if name not in BACKENDS:
        raise ValueError(f"backend({name!r}): unknown backend; use one of {', '.join(BACKENDS)}")
    token = _forced_backend.set(name)
    try:
        yield
    finally:
        _forced_backend.reset(token)


# The registry of ops. Keep it here, in one place, so `python -m lowmem.env` sees them all.
_LOW_PRECISION_AND_FP32 = (torch.float32, torch.bfloat16, torch.float16)
register_op(
    "adamw",
    ref="lowmem.kernels.adamw:adamw_ref",
    triton="lowmem.kernels.adamw:adamw",
    dtypes={"triton": _LOW_PRECISION_AND_FP32},
)
# On CPU, torch's fused C++ Adam kernel does the moments and the direction in one pass where
# the reference takes nine (lowmem/kernels/adamw_cpu.py).
register_op(
    "adam_direction",
    ref="lowmem.kernels.adamw:adam_direction_ref",
    triton="lowmem.kernels.adamw:adam_direction",
    cpp="lowmem.kernels.adamw_cpu:adam_direction_cpu",
    dtypes={"triton": _LOW_PRECISION_AND_FP32, "cpp": (*_LOW_PRECISION_AND_FP32, torch.float64)},
)
# On CUDA the reference is cuBLAS's GEMM with beta (`addmm_`), which already reads and writes W
# once with no m×n temporary; on an H200 it matched our Triton kernel in fp32 (0.230 vs 0.222 ms)
# and beat it in bf16 (0.029 vs 0.038 ms) at 4096×4096, rank 256. So CUDA prefers it, and the
# Triton kernel stays available (LOWMEM_BACKEND=triton) and tested.
register_op(
    "lowrank_update",
    ref="lowmem.kernels.lowrank_update:lowrank_update_ref",
    triton="lowmem.kernels.lowrank_update:lowrank_update",
    dtypes={"triton": _LOW_PRECISION_AND_FP32},
    prefer={"cuda": ("ref",)},
)
# 8-bit block-wise AdamW (Dettmers et al. 2022): the C++ CPU kernel is built on first use
# (lowmem/kernels/_cpp.py); without a compiler its import fails and CPU falls back to the reference.
register_op(
    "adamw8bit",
    ref="lowmem.kernels.adamw8bit:adamw8bit_ref",
    triton="lowmem.kernels.adamw8bit:adamw8bit",
    cpp="lowmem.kernels.adamw8bit_cpu:adamw8bit_cpu",
    dtypes={"triton": _LOW_PRECISION_AND_FP32, "cpp": _LOW_PRECISION_AND_FP32},
)
# The same over lists of parameters (one optimizer step): on CPU one C++ call whose threads split
# the blocks of all tensors (one parallel region instead of one per tensor: 61M parameters in 84
# tensors went from 1.72x to 1.43x torch's fused AdamW); on CUDA one Triton launch per tensor.
register_op(
    "adamw8bit_multi",
    ref="lowmem.kernels.adamw8bit:adamw8bit_multi_ref",
    triton="lowmem.kernels.adamw8bit:adamw8bit_multi",
    cpp="lowmem.kernels.adamw8bit_cpu:adamw8bit_cpu_multi",
    dtypes={"triton": _LOW_PRECISION_AND_FP32, "cpp": _LOW_PRECISION_AND_FP32},
)
# int8 training linears (lowmem/nn/low_precision.py): absmax quantization with one scale per row
# or column, and the int8 x int8 -> int32 GEMM with the dequantizing epilogue. On CPU the
# references emulate the numerics in fp32 (exact integer sums); they are for checking, not speed.
register_op(
    "quantize_int8",
    ref="lowmem.kernels.quantize:quantize_int8_ref",
    triton="lowmem.kernels.quantize:quantize_int8",
    dtypes={"triton": _LOW_PRECISION_AND_FP32},
)
register_op(
    "int8_matmul",
    ref="lowmem.kernels.int8_matmul:int8_matmul_ref",
    triton="lowmem.kernels.int8_matmul:int8_matmul",
)
# SLTrain's W = scale * B @ A + S (Han et al. 2024): built tile by tile by one Triton kernel on
# CUDA; on CPU the reference (one addmm into a fresh buffer, then index_add_ of the sparse values)
# is what we measured fastest, so there is no C++ op (lowmem/kernels/sparse_low_rank.py).
register_op(
    "sparse_low_rank_weight",
    ref="lowmem.kernels.sparse_low_rank:sparse_low_rank_weight_ref",
    triton="lowmem.kernels.sparse_low_rank:sparse_low_rank_weight",
    dtypes={"triton": _LOW_PRECISION_AND_FP32},
)
# SLTrain's linear y = x (scale B A + S)^T + bias as one op: the reference rebuilds W (Triton on
# CUDA through sparse_low_rank_weight); on CPU, fp32/fp64, the compiled factorized path multiplies
# by B, A and S without W (fewer FLOPs than a dense layer at rank d/4; csrc/sparse_support_mm.cpp),
# and itself falls back to rebuilding W where its cost model says that is cheaper.
register_op(
    "sparse_low_rank_linear",
    ref="lowmem.kernels.sparse_low_rank:sparse_low_rank_linear",
    cpp="lowmem.kernels.sparse_low_rank_cpu:sparse_low_rank_linear_cpu",
    dtypes={"cpp": (torch.float32, torch.float64)},
)
# fp8 (lowmem/nn/low_precision.py). CUDA: the faster of torch._scaled_mm and the Triton fp8 GEMM, measured
# once per problem bucket (lowmem/kernels/fp8_matmul_select.py); LOWMEM_BACKEND=cuda there means
# cuBLASLt only, =triton the Triton kernel. CPU: the fp32 emulation. Quantizers: absmax + scale +
# cast fused in Triton on CUDA, torch's elementwise ops on CPU (bit-identical results).
register_op(
    "fp8_matmul",
    ref="lowmem.kernels.fp8_matmul:fp8_matmul_ref",
    triton="lowmem.kernels.fp8_matmul_triton:fp8_matmul",
    cuda="lowmem.kernels.fp8_matmul_select:fp8_matmul_fastest",
    prefer={"cuda": ("cuda", "triton", "ref")},
)
register_op(
    "quantize_fp8",
    ref="lowmem.kernels.fp8_quantize:quantize_fp8",
    triton="lowmem.kernels.fp8_quantize_triton:quantize_fp8_triton",
    dtypes={"triton": _LOW_PRECISION_AND_FP32},
)
register_op(
    "quantize_fp8_delayed",
    ref="lowmem.kernels.fp8_quantize:quantize_fp8_delayed_ref",
    triton="lowmem.kernels.fp8_quantize_triton:quantize_fp8_delayed_triton",
    dtypes={"triton": _LOW_PRECISION_AND_FP32},
)
