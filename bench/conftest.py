"""Fixtures of the pytest-benchmark suites in ``bench/``.

Time them with ``pytest bench --benchmark-enable --benchmark-only`` (``--benchmark-enable``
overrides the ``--benchmark-disable`` of this project's pytest configuration).

The sizes are a sweep when benchmarks are timed and only the smallest point when they are
disabled (``--benchmark-disable``, this project's default), so that the suites double as fast
smoke tests in CI. ``LOWMEM_BENCH_DEVICE`` picks the device (default: CUDA when present).
"""

from __future__ import annotations

import os

import pytest
import torch

from lowmem.bench.micro import SWEEP


def _timed(config: pytest.Config) -> bool:
    # pyproject's addopts disable benchmarks; --benchmark-enable (with --benchmark-only) times them.
    if config.getoption("benchmark_enable", default=False):
        return True
    return not config.getoption("benchmark_disable", default=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    kind = "cuda" if _device().type == "cuda" else "cpu"
    points = SWEEP[kind] if _timed(metafunc.config) else [(4099, (97, 64, 8))]  # odd smoke sizes
    if "numel" in metafunc.fixturenames:
        metafunc.parametrize("numel", [p[0] for p in points], ids=lambda n: f"N{n}")
    if "matrix" in metafunc.fixturenames:
        metafunc.parametrize("matrix", [p[1] for p in points], ids=lambda s: "x".join(map(str, s)))


def _device() -> torch.device:
    name = os.environ.get("LOWMEM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture
def bench_device() -> torch.device:
    return _device()
