"""adam_direction's CPU backend (torch's fused Adam kernel) against the reference."""

import pytest
import torch

from lowmem.kernels.adamw import adam_direction_ref
from lowmem.kernels.adamw_cpu import adam_direction_cpu

# Relative error of N against the reference: the fused kernel computes low-precision tensors in
# fp32 and rounds once, the reference rounds after every op, so allow a few units in the last place.
TOL = {torch.float64: 1e-14, torch.float32: 2e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    m = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    v = 0.01 * torch.rand(shape, generator=gen, dtype=torch.float64) + 1e-6
    return grad.to(dtype), m.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (4097,), (33, 7), (0, 5)])
def test_matches_reference_over_steps(shape, dtype):
    g, m_ref, v_ref = _inputs(shape, dtype)
    m_cpu, v_cpu = m_ref.clone(), v_ref.clone()
    for step in (1.0, 2.0, 10.0):
        kw = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step": step}
        expected = adam_direction_ref(g.clone(), m_ref, v_ref, **kw)
        out = g.clone()
        got = adam_direction_cpu(out, m_cpu, v_cpu, **kw, out=out)  # out aliases grad, as GaLore calls it
        assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
        scale = expected.abs().max().item() if expected.numel() else 1.0
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL[dtype] * max(scale, 1e-30))
        torch.testing.assert_close(m_cpu, m_ref, rtol=TOL[dtype], atol=0)
        torch.testing.assert_close(v_cpu, v_ref, rtol=TOL[dtype], atol=0)


def test_without_out_allocates_and_leaves_grad_alone():
    g, m, v = _inputs((5, 3), torch.float32)
    g_before = g.clone()
    n = adam_direction_cpu(g, m, v, beta1=0.9, beta2=0.99, eps=1e-8, step=1.0)
    assert n.data_ptr() != g.data_ptr() and torch.equal(g, g_before)
    # At step 1 with zero-initialised moments N = g / (|g| + eps): the sign of the gradient.
    g2, _, _ = _inputs((5, 3), torch.float32, seed=1)
    n2 = adam_direction_cpu(
        g2, torch.zeros(5, 3), torch.zeros(5, 3), beta1=0.9, beta2=0.99, eps=1e-8, step=1.0
    )
    torch.testing.assert_close(n2, g2.sign(), rtol=1e-6, atol=1e-6)


def test_mixed_dtypes_and_views_fall_back_to_the_reference():
    g, m, v = _inputs((6, 4), torch.bfloat16)
    m32, v32 = m.float(), v.float()
    kw = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step": 3.0}
    expected = adam_direction_ref(g.clone(), m32.clone(), v32.clone(), **kw)
    assert torch.equal(adam_direction_cpu(g.clone(), m32, v32, **kw), expected)  # fp32 states
    gt, mt, vt = (t.float().t() for t in _inputs((4, 6), torch.float32))  # non-contiguous
    expected = adam_direction_ref(gt.clone(), mt.clone(), vt.clone(), **kw)
    assert torch.equal(adam_direction_cpu(gt.clone(), mt, vt, **kw), expected)


def test_nan_gradient_stays_in_its_own_elements():
    g, m, v = _inputs((8,), torch.float32)
    g[3] = float("nan")
    n = adam_direction_cpu(g.clone(), m, v, beta1=0.9, beta2=0.999, eps=1e-8, step=2.0)
    assert torch.isnan(n[3]) and torch.isfinite(n[torch.arange(8) != 3]).all()
