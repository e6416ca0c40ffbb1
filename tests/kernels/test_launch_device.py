"""Triton launches on the current CUDA device, not the tensors' one: ``on_device`` (kernels/_triton)
makes the tensor's device current around every launch. On CPU the helper is a no-op; with a
fake CUDA tensor it enters ``torch.cuda.device`` with that tensor's device; and every Triton
launcher in lowmem.kernels launches inside ``on_device`` of one of its operands (checked on CPU
tensors under the interpreter, with the kernel objects wrapped to see where they are launched)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from lowmem.kernels import (
    adamw,
    adamw8bit,
    fp8_matmul_triton,
    fp8_quantize_triton,
    int8_matmul,
    lowrank_update,
    quantize,
    sparse_low_rank,
)
from lowmem.kernels._triton import on_device
from lowmem.kernels.blockwise_quant import blockwise_zeros


class _FakeCudaDevice:
    """Stands in for ``torch.cuda.device``: records the device it was entered with."""

    entered: ClassVar[list[object]] = []

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> None:
        _FakeCudaDevice.entered.append(self.device)

    def __exit__(self, *exc: object) -> None:
        _FakeCudaDevice.entered.append("exit")  # type: ignore[arg-type]


def test_on_device_is_a_no_op_for_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(device: object) -> None:
        raise AssertionError(f"torch.cuda.device entered for a CPU tensor ({device})")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    with on_device(torch.zeros(3)):
        pass


def test_on_device_skips_the_exchange_with_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """One visible GPU: the current device is the tensor's, so no device exchange per launch."""

    def no_exchange(device: object) -> None:
        raise AssertionError(f"torch.cuda.device entered with one GPU ({device})")

    monkeypatch.setattr(torch.cuda, "device", no_exchange)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with on_device(SimpleNamespace(device=torch.device("cuda", 0))):  # type: ignore[arg-type]
        pass


def test_on_device_enters_the_tensors_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(_FakeCudaDevice, "entered", [])
    fake_cuda_tensor = SimpleNamespace(device=torch.device("cuda", 1))
    with on_device(fake_cuda_tensor):  # type: ignore[arg-type]
        assert _FakeCudaDevice.entered == [torch.device("cuda", 1)]
    assert _FakeCudaDevice.entered == [torch.device("cuda", 1), "exit"]


class _Watch:
    """Wraps ``module.on_device`` and the module's kernels: logs each launch with the devices of
    the ``on_device`` contexts open at that moment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, kernels: list[str]) -> None:
        self.open: list[torch.device] = []
        self.launches: list[list[torch.device]] = []

        @contextlib.contextmanager
        def watched_on_device(t: torch.Tensor):
            self.open.append(t.device)
            with on_device(t):
                yield
            self.open.pop()

        monkeypatch.setattr(module, "on_device", watched_on_device)
        for name in kernels:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

    def _wrap(self, kernel: object) -> object:
        watch = self

        class Wrapped:
            def __getitem__(self, grid: object) -> Callable[..., object]:
                launch = kernel[grid]  # type: ignore[index]

                def run(*args: object, **kwargs: object) -> object:
                    watch.launches.append(list(watch.open))
                    return launch(*args, **kwargs)

                return run

        return Wrapped()


def _adamw() -> None:
    p, g = torch.randn(70), torch.randn(70)
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "step": 1.0}
    adamw.adamw(p, g, torch.zeros(70), torch.zeros(70), **hyper)
    adamw.adam_direction(g, torch.zeros(70), torch.zeros(70), beta1=0.9, beta2=0.999, eps=1e-8, step=1.0)


def _adamw8bit() -> None:
    p = torch.randn(70)
    states = [*blockwise_zeros((70,), True, "cpu"), *blockwise_zeros((70,), False, "cpu")]
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "step": 1.0}
    adamw8bit.adamw8bit(p, torch.randn(70), *states, **hyper)


def _int8() -> None:
    a = torch.randint(-5, 5, (5, 7), dtype=torch.int8)
    int8_matmul.int8_matmul(a, a.t(), torch.ones(5), torch.ones(5))
    quantize.quantize_int8(torch.randn(5, 7), 1)


def _fp8() -> None:
    a = torch.zeros(5, 7, dtype=torch.float8_e4m3fn)
    one = torch.ones(())
    fp8_matmul_triton.fp8_matmul(a, a.t(), one, one)


def _fp8_quantize() -> None:
    x = torch.randn(5, 7)
    for dim in (None, 1):
        fp8_quantize_triton.quantize_fp8_triton(x, torch.float8_e4m3fn, dim)
    fp8_quantize_triton.quantize_fp8_delayed_triton(x, torch.float8_e4m3fn, torch.tensor(1.0))


def _lowrank() -> None:
    lowrank_update.lowrank_update(
        torch.randn(5, 7), torch.randn(5, 2), torch.randn(2, 7), alpha=1.0, beta=1.0
    )


def _sparse_low_rank() -> None:
    index = torch.tensor([0, 3, 9], dtype=torch.int32)
    sparse_low_rank.sparse_low_rank_weight(torch.randn(3, 2), torch.randn(2, 5), torch.randn(3), index, 0.5)


LAUNCHERS = [
    (adamw, ["_adamw_kernel"], _adamw, 2),
    (adamw8bit, ["_adamw8bit_kernel"], _adamw8bit, 1),
    (int8_matmul, ["_int8_matmul_kernel"], _int8, 1),
    (quantize, ["_quantize_int8_kernel"], _int8, 1),
    (fp8_matmul_triton, ["_fp8_matmul_kernel"], _fp8, 1),
    (
        fp8_quantize_triton,
        [
            "_absmax_partials_kernel",
            "_quantize_fp8_tensor_kernel",
            "_quantize_fp8_groups_kernel",
            "_cast_fp8_delayed_kernel",
        ],
        _fp8_quantize,
        4,
    ),
    (lowrank_update, ["_lowrank_update_kernel"], _lowrank, 1),
    (sparse_low_rank, ["_sparse_low_rank_weight_kernel"], _sparse_low_rank, 1),
]


@pytest.mark.parametrize(
    ("module", "kernels", "call", "launches"),
    LAUNCHERS,
    ids=[module.__name__.rsplit(".", 1)[-1] for module, *_ in LAUNCHERS],
)
def test_every_launch_is_inside_on_device(monkeypatch, module, kernels, call, launches: int) -> None:
    watch = _Watch(monkeypatch, module, kernels)
    call()
    assert len(watch.launches) == launches
    assert all(opened == [torch.device("cpu")] for opened in watch.launches), watch.launches
