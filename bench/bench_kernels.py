"""pytest-benchmark suite of the kernels: ``pytest bench --benchmark-enable --benchmark-only``.

Each benchmark times one implementation of one op at one size of the sweep, on the device
``LOWMEM_BENCH_DEVICE`` names (default: CUDA when present, else CPU), and records in
``extra_info`` what pytest-benchmark cannot know: the op's bytes and FLOPs model, the achieved
GB/s and TFLOP/s from its own median, and the backend. With ``--benchmark-disable`` (the
default in this project's pytest configuration) each case runs once at the smallest size, as
a smoke test in CI; ``python -m lowmem.bench micro`` prints the same ops as one table with
ratios measured in one run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from lowmem._ops import choose_backend, dispatch
from lowmem.kernels.adamw import (
    adam_direction_bytes,
    adam_direction_flops,
    adamw_bytes,
    adamw_flops,
    adamw_ref,
)
from lowmem.kernels.adamw8bit import adamw8bit_bytes, adamw8bit_flops, adamw8bit_ref
from lowmem.kernels.blockwise_quant import quantize_blockwise
from lowmem.kernels.lowrank_update import lowrank_update_bytes, lowrank_update_flops, lowrank_update_ref

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "step": 10.0}


def _record(benchmark, backend: str, nbytes: int, flops: int) -> None:
    """Put the cost model and, when timed, the achieved rates into ``extra_info``."""
    benchmark.extra_info.update({"backend": backend, "bytes": nbytes, "flops": flops})
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None) if stats else None
    if median:
        benchmark.extra_info["gbs"] = nbytes / median / 1e9
        benchmark.extra_info["tflops"] = flops / median / 1e12


def _run(benchmark, fn: Callable[[], object], device: torch.device) -> None:
    if device.type == "cuda":

        def synced() -> None:
            fn()
            torch.cuda.synchronize(device)

        benchmark(synced)
    else:
        benchmark(fn)


@pytest.mark.parametrize("impl", ["dispatched", "reference"])
def test_adamw(benchmark, bench_device: torch.device, numel: int, impl: str) -> None:
    gen = torch.Generator(device=bench_device).manual_seed(0)
    p, g = (torch.randn(numel, generator=gen, device=bench_device) for _ in range(2))
    m, v = g * 0.1, g * g
    fn = dispatch("adamw", bench_device) if impl == "dispatched" else adamw_ref
    _run(benchmark, lambda: fn(p, g, m, v, **HYPER), bench_device)
    assert torch.isfinite(p).all()
    backend = choose_backend("adamw", bench_device) if impl == "dispatched" else "ref"
    _record(benchmark, backend, adamw_bytes(numel, 4), adamw_flops(numel))


def test_adam_direction(benchmark, bench_device: torch.device, numel: int) -> None:
    gen = torch.Generator(device=bench_device).manual_seed(1)
    g = torch.randn(numel, generator=gen, device=bench_device)
    m, v, out = g * 0.1, g * g, torch.empty_like(g)
    fn = dispatch("adam_direction", bench_device)
    hyper = {k: HYPER[k] for k in ("beta1", "beta2", "eps", "step")}
    _run(benchmark, lambda: fn(g, m, v, out=out, **hyper), bench_device)
    assert torch.isfinite(out).all()
    _record(
        benchmark,
        choose_backend("adam_direction", bench_device),
        adam_direction_bytes(numel, 4),
        adam_direction_flops(numel),
    )


@pytest.mark.parametrize("impl", ["dispatched", "reference"])
def test_adamw8bit(benchmark, bench_device: torch.device, numel: int, impl: str) -> None:
    gen = torch.Generator(device=bench_device).manual_seed(2)
    p, g = (torch.randn(numel, generator=gen, device=bench_device) for _ in range(2))
    m_codes, m_absmax = quantize_blockwise(g * 0.1, signed=True)
    v_codes, v_absmax = quantize_blockwise(g * g, signed=False)
    fn = dispatch("adamw8bit", bench_device, torch.float32) if impl == "dispatched" else adamw8bit_ref
    _run(benchmark, lambda: fn(p, g, m_codes, m_absmax, v_codes, v_absmax, **HYPER), bench_device)
    assert torch.isfinite(p).all()
    backend = choose_backend("adamw8bit", bench_device, torch.float32) if impl == "dispatched" else "ref"
    _record(benchmark, backend, adamw8bit_bytes(numel, 4), adamw8bit_flops(numel))


def test_lowrank_update(benchmark, bench_device: torch.device, matrix: tuple[int, int, int]) -> None:
    m, n, r = matrix
    gen = torch.Generator(device=bench_device).manual_seed(3)
    w = torch.randn(m, n, generator=gen, device=bench_device)
    a = torch.randn(m, r, generator=gen, device=bench_device) / math.sqrt(r)
    b = torch.randn(r, n, generator=gen, device=bench_device) / math.sqrt(n)
    fn = dispatch("lowrank_update", bench_device)
    _run(benchmark, lambda: fn(w, a, b, alpha=-1e-3 * 0.25, beta=1 - 1e-5), bench_device)
    expected = w.clone()
    lowrank_update_ref(expected, a, b, alpha=-1e-3 * 0.25, beta=1 - 1e-5)
    fn(w, a, b, alpha=-1e-3 * 0.25, beta=1 - 1e-5)
    torch.testing.assert_close(w, expected, rtol=1e-4, atol=1e-5)
    _record(
        benchmark,
        choose_backend("lowrank_update", bench_device),
        lowrank_update_bytes(m, n, r, 4),
        lowrank_update_flops(m, n, r),
    )
