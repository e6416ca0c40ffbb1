"""The CUDA implementation of the ``fp8_matmul`` op: ``torch._scaled_mm`` (cuBLASLt) or the
Triton kernel, whichever measured faster for this problem on this GPU.

Neither is faster everywhere: cuBLASLt's fp8 GEMMs are tuned by NVIDIA per architecture, while
the Triton kernel (:mod:`lowmem.kernels.fp8_matmul_triton`) takes any strides and fuses the
bias, and shapes off cuBLASLt's preferred grid (K or N not multiples of 16, which
``fp8_matmul_scaled_mm`` pads with copies) can favour it. So the first call for a problem
*bucket* times both and remembers the winner for the rest of the process:

- bucket key: device index, both operand dtypes, both scale kinds (tensor / row), output dtype,
  bias or not, M, N, K each rounded up to a power of two (a training run has a handful of
  shapes, so a handful of measurements, each a few milliseconds once), and the operand layout
  (``a`` K-major, ``b`` K-major): the Triton kernel copies a non-K-major operand first and
  ``fp8_matmul_scaled_mm`` copies to its own layout, so the layer's dX GEMM (``b`` is W, not
  K-major) and a K-major GEMM of the same sizes cost differently and are timed apart;
- measurement: on the operands' device, one warm-up call each (it compiles and autotunes the
  Triton kernel), then ``_REPEATS`` calls each between CUDA events, median; ties go to
  ``torch._scaled_mm``;
- CUDA-graph capture: no measurement (synchronizing is illegal there): ``torch._scaled_mm`` is
  used and nothing is cached. A bucket that chose Triton also uses ``torch._scaled_mm`` during
  capture unless Triton's autotuner already holds this exact key (M bucket, N, K, scale kinds,
  dtypes), since a new key benchmarks and synchronizes. So capture after an eager warm-up at
  the same shapes, or the captured graph runs cuBLASLt. A Triton launch may still compile a new
  specialization (e.g. another stride alignment) during capture; the warm-up avoids that too.
  Another thread capturing in global mode is not detected (``_capturing`` sees only this
  thread's current stream): a first call per bucket then synchronizes inside that capture;
- ``torch.compile``: the measurement is ``torch.compiler.disable``-d (events, synchronization
  and the Python dict of choices cannot be traced), so Dynamo breaks the graph there and runs it
  eagerly; with ``fullgraph=True`` that break is an error, so make the first call for each
  bucket eagerly (one eager step) before compiling;
- a kernel that fails (a Triton build without fp8 ``tl.dot`` for this GPU) loses, with its
  error kept in :func:`fp8_matmul_choices` for ``lowmem.bench.lowp_linear`` to print.

``LOWMEM_BACKEND=cuda`` (or ``lowmem.backend("cuda")``) means "the vendor library": cuBLASLt
only, no measurement; ``triton`` forces the Triton kernel, ``ref`` the emulation. GPUs without
fp8 tensor cores (compute capability < 8.9) get the reference.

Both implementations compute the same fp32-accumulated products and scale them in fp32, so the
choice changes speed, and results only by fp32 summation order and, with a bias, one rounding:
the Triton kernel adds the bias in fp32 before its single rounding to the output dtype (the
reference's order), ``fp8_matmul_scaled_mm`` adds it after cuBLASLt has rounded to bf16/fp16.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import Tensor

from lowmem._ops import forced_backend
from lowmem.kernels._triton import on_device
from lowmem.kernels.fp8_matmul import fp8_matmul_ref, fp8_matmul_scaled_mm, fp8_supported

__all__ = ["fp8_matmul_choices", "fp8_matmul_fastest"]

_REPEATS = 5
# bucket key -> "scaled_mm" | "triton"; and what was measured for it.
_CHOICE: dict[tuple, str] = {}
_MEASURED: dict[tuple, dict[str, float | str]] = {}


def _triton_fp8_matmul() -> Callable[..., Tensor]:
    from lowmem.kernels.fp8_matmul_triton import fp8_matmul

    return fp8_matmul


def _triton_autotuned(*args: object) -> bool:
    from lowmem.kernels.fp8_matmul_triton import autotuned

    return autotuned(*args)  # type: ignore[arg-type]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _median_ms(fn: Callable[[], object]) -> float:
    fn()  # warm-up: compiles and autotunes the Triton kernel on its first call
    torch.cuda.synchronize()
    times = []
    for _ in range(_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fp8_matmul_choices() -> dict[tuple, dict[str, float | str]]:
    """``{bucket key: {"choice": ..., "scaled_mm_ms": ..., "triton_ms" or "triton_error": ...}}``
    for every problem bucket measured in this process."""
    return {key: {"choice": _CHOICE[key], **value} for key, value in _MEASURED.items()}


def fp8_matmul_fastest(
    a: Tensor,
    b: Tensor,
    scale_a: Tensor,
    scale_b: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:func:`lowmem.kernels.fp8_matmul.fp8_matmul_ref`'s contract on CUDA, through the faster
    of ``torch._scaled_mm`` and the Triton kernel for this problem bucket (module docstring)."""
    args = (a, b, scale_a, scale_b, bias, out_dtype)
    if forced_backend() == "cuda":
        return fp8_matmul_scaled_mm(*args)
    if not fp8_supported(a.device):
        return fp8_matmul_ref(*args)
    m, k = a.shape
    n = b.shape[1]
    key = (
        a.device.index, a.dtype, b.dtype, scale_a.dim() == 0, scale_b.dim() == 0, out_dtype,
        bias is not None, _bucket(m), _bucket(n), _bucket(k), a.stride(1) == 1, b.stride(0) == 1,
    )  # fmt: skip
    choice = _CHOICE.get(key)
    if choice is None:
        if _capturing():
            return fp8_matmul_scaled_mm(*args)
        choice = _measure(key, args)
    # A key new to Triton's autotuner benchmarks and synchronizes: not inside a capture.
    if choice == "triton" and (not _capturing() or _triton_autotuned(*args)):
        return _triton_fp8_matmul()(*args)
    return fp8_matmul_scaled_mm(*args)


@torch.compiler.disable  # events, synchronize and the dict of choices: eager only (module docstring)
def _measure(key: tuple, args: tuple) -> str:
    with on_device(args[0]):  # events and synchronize() act on the current device: make it a's
        measured: dict[str, float | str] = {"scaled_mm_ms": _median_ms(lambda: fp8_matmul_scaled_mm(*args))}
        try:
            kernel = _triton_fp8_matmul()
            measured["triton_ms"] = _median_ms(lambda: kernel(*args))
        except Exception as exc:  # a Triton build or GPU that cannot compile fp8 tl.dot: cuBLASLt wins
            measured["triton_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    triton_ms = measured.get("triton_ms")
    faster = isinstance(triton_ms, float) and triton_ms < measured["scaled_mm_ms"]  # type: ignore[operator]
    _CHOICE[key] = "triton" if faster else "scaled_mm"
    _MEASURED[key] = measured
    return _CHOICE[key]
