"""The C++ 8-bit AdamW's helpers: the AVX-512 search table and the multi-tensor entry point."""

from __future__ import annotations

import pytest
import torch

from lowmem.kernels.blockwise_quant import blockwise_zeros, quantization_tables

cpu_op = pytest.importorskip("lowmem.kernels.adamw8bit_cpu", reason="the C++ op needs a compiler")

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}


@pytest.mark.parametrize("signed", [True, False])
def test_search_table_equals_bucketize(signed: bool) -> None:
    """Random values, every map value and the fp32 neighbours of every midpoint."""
    table = cpu_op.search_table(signed)
    tables = quantization_tables(signed, "cpu")
    mids = tables.midpoints[:255]
    low = -1.0 if signed else 0.0
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(20_000, generator=gen) * (1.0 - low) + low
    near = torch.cat([torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), mids])
    y = torch.cat([y, tables.qmap, near.clamp(low, 1.0)])
    assert torch.equal(cpu_op._search(y, table), torch.bucketize(y, mids))


def _state(shape: tuple[int, ...]) -> list[torch.Tensor]:
    return [*blockwise_zeros(shape, True), *blockwise_zeros(shape, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_step_equals_single_tensor_steps(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(1,), (300,), (0,), (17, 241), (4097,)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    singles = [p.clone() for p in params]
    states = [_state(s) for s in shapes]
    single_states = [[t.clone() for t in st] for st in states]
    for step in (1, 2, 3):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        cpu_op.adamw8bit_cpu_multi(
            params, grads, *[[st[i] for st in states] for i in range(4)], step=float(step), **HYPER
        )
        for p, g, st in zip(singles, grads, single_states, strict=True):
            cpu_op.adamw8bit_cpu(p, g, *st, step=float(step), **HYPER)
    for a, b in zip(params, singles, strict=True):
        assert torch.equal(a, b)
    for st, single in zip(states, single_states, strict=True):
        for a, b in zip(st, single, strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(params[3], torch.zeros_like(params[3]))


def test_multi_ops_reject_lists_of_different_lengths() -> None:
    from lowmem.kernels.adamw8bit import adamw8bit_multi_ref

    p = torch.zeros(300)
    m, m_max = blockwise_zeros(p.shape, True, p.device)
    v, v_max = blockwise_zeros(p.shape, False, p.device)
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "step": 1.0}
    for fn in (adamw8bit_multi_ref, cpu_op.adamw8bit_cpu_multi):
        with pytest.raises(ValueError, match=r"lists have lengths \[2, 1, 1, 1, 1, 1\]"):
            fn([p, p.clone()], [p], [m], [m_max], [v], [v_max], **hyper)
